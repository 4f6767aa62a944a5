"""ONNX ``Loop`` -> :class:`OnnxLoop`, a Python loop around the converted body (issue 3).

onnx2torch 1.5.15 has no ``Loop`` converter. What tf2onnx 1.17 emits for Keras 3 recurrent layers
(measured, Keras 3.15 / TF 2.21, opset 17): ``GRU`` and ``SimpleRNN`` (frozen and
``trainable=True`` exports) and ``LSTM`` (``trainable=True`` export; trainable exports of RNNs
need :mod:`mmbridge.export.trainable` to place the ``mmb_var__`` markers outside the while body,
else tf2onnx refuses them): the ``tf.while_loop`` of ``keras.ops.rnn`` becomes one ONNX
``Loop``. Its trip count ``M`` is the sequence length (an initializer, or computed from
``Shape`` when the length is dynamic), ``cond`` is computed in the main graph, and the
loop-carried values are the time counter, the state(s) ``h`` (``c``) ``[N, units]`` and the
layer's weights (passed through the body unchanged); the body reads the time-major input
``[T, N, F]`` from the outer scope (``Gather(x, t)``) and has one scan output, ``h`` per step
(``[T, N, units]``). (A frozen ``LSTM`` becomes a native ONNX ``LSTM``: :mod:`.recurrent`.)

``Loop`` (every opset version): the body ``GraphProto`` becomes a ``ModelProto`` whose inputs
are the body inputs (``iteration_num``, ``cond``, the carried values) followed by every
outer-scope value the body (or a nested subgraph) reads; it is converted by ``onnx2torch.convert``
itself, inside the same :func:`~mmbridge.convert.registry.consult_op_converters` hook and at the
outer model's opsets (:func:`~mmbridge.convert.registry.current_opsets`), and run in a Python
loop with ONNX ``Loop`` semantics (https://onnx.ai/onnx/operators/onnx__Loop.html). The
outer-scope values and the carried initial values are inputs of the ``Loop`` call in the outer
graph, so initializers among them (the Keras weights) stay single ``nn.Parameter`` s of the outer
module (:func:`mmbridge.convert.core.to_torch` decides parameter / buffer by name or by
:func:`loop_weight_initializers`) and are never copied into the body.

When exactly one of the Loop's outputs is read (tf2onnx's ``Cumprod`` carries three values and
returns one), the module returns only that one (:func:`~mmbridge.convert.ops.multi_output.keep_only_used_output`);
before, a graph output fed by such a Loop came back as the whole tuple.

Not supported (the converter raises ``NotImplementedError`` naming the node, which
:func:`~mmbridge.convert.core.to_torch` reports as :class:`~mmbridge.errors.ConversionError`
telling the user to keep the graph in onnxruntime with ``artifact.to_ort()``): a ``Loop`` whose
carried values or scan outputs are sequences or optionals (ONNX ``Loop-13+`` tensor lists), and
a body with an op that has no converter.

Notes: the loop runs in Python, so ``torch.compile`` / ``torch.jit.trace`` see one graph break (or
an unrolled loop) per ``Loop`` and every iteration reads ``cond`` on the host (a device sync on
GPU) unless the body passes ``cond`` through unchanged.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Any

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import fx, nn

from mmbridge.convert.ops._common import TO_ORT as _TO_ORT
from mmbridge.convert.ops._common import register
from mmbridge.convert.ops.multi_output import keep_only_used_output
from mmbridge.convert.registry import current_opsets
from mmbridge.graph.walk import all_nodes, free_values


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------
class OnnxLoop(nn.Module, OnnxToTorchModule):
    """ONNX ``Loop`` (https://onnx.ai/onnx/operators/onnx__Loop.html) around a converted body.

    Call inputs, in order: ``M`` (int64 scalar trip count; only if the node has one), ``cond``
    (bool scalar; only if the node has one), the ``N`` loop-carried initial values, then the
    outer-scope values the body reads (any dtype / shape). Runs
    ``while (M absent or i < M) and cond: cond, v = body(i, cond, v, outer)`` and collects the
    ``K`` scan outputs of every iteration.

    Returns the ``N`` final carried values followed by the ``K`` scan outputs, each stacked along a
    new first axis (``[iterations, *per-step shape]``; promoted to a common dtype if the steps
    differ, e.g. under autocast); one tensor when ``N + K == 1``.

    Raises:
        RuntimeError: the loop ran zero iterations and a scan output's per-step shape is not
            static in the ONNX body (its ``[0, ...]`` shape is unknown).
    """

    def __init__(self, body: fx.GraphModule | None, name: str, has_trip: bool, has_cond: bool, n_carried: int,
                 n_scan: int, sources: list[tuple[str, int]], consts: list[torch.Tensor],
                 scan_specs: list[tuple[tuple[int, ...] | None, torch.dtype]]):
        super().__init__()
        self.body = body
        self.node_name = name
        self.has_trip, self.has_cond = has_trip, has_cond
        self.n_carried, self.n_scan = n_carried, n_scan
        self.sources = list(sources)  # per body output: ("body", k) | ("arg", j) | ("const", c)
        for k, c in enumerate(consts):
            self.register_buffer(f"const_{k}", c)
        self.scan_specs = list(scan_specs)
        # a body that passes cond_in straight out: no need to read it on the host every step
        self.cond_passthrough = self.sources[0] == ("arg", 1)

    def _value(self, src: tuple[str, int], produced: tuple[torch.Tensor, ...], args: list[torch.Tensor]) -> torch.Tensor:
        kind, k = src
        if kind == "body":
            return produced[k]
        if kind == "arg":
            return args[k]
        return getattr(self, f"const_{k}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        pos = 0
        trip = None
        if self.has_trip:
            trip = int(inputs[0].reshape(-1)[0])
            pos += 1
        # the counter lives with the data (M / cond may be CPU-side scalars)
        data = inputs[int(self.has_trip) + int(self.has_cond):]
        device = data[0].device if data else (inputs[0].device if inputs else torch.device("cpu"))
        if self.has_cond:
            cond = inputs[pos].reshape(()).to(torch.bool)
            pos += 1
        else:
            cond = torch.ones((), dtype=torch.bool, device=device)
        carried = list(inputs[pos:pos + self.n_carried])
        outer = list(inputs[pos + self.n_carried:])
        keep = bool(cond)
        scans: list[list[torch.Tensor]] = [[] for _ in range(self.n_scan)]
        i = 0
        while keep and (trip is None or i < trip):
            args = [torch.tensor(i, dtype=torch.int64, device=device), cond, *carried, *outer]
            produced: Any = self.body(*args) if self.body is not None else ()
            if not isinstance(produced, (tuple, list)):
                produced = (produced,)
            outs = [self._value(src, produced, args) for src in self.sources]
            if not self.cond_passthrough:
                cond = outs[0].reshape(()).to(torch.bool)
                keep = bool(cond)
            carried = outs[1:1 + self.n_carried]
            for k, s in enumerate(outs[1 + self.n_carried:]):
                scans[k].append(s)
            i += 1
        results = list(carried) + [self._stack(k, s, device) for k, s in enumerate(scans)]
        return results[0] if len(results) == 1 else tuple(results)

    def _stack(self, k: int, steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if not steps:
            shape, dtype = self.scan_specs[k]
            if shape is None:
                raise RuntimeError(f"Loop node {self.node_name!r} ran zero iterations and the per-step shape of its scan "
                                   f"output {k} is not static, so its empty [0, ...] result has no known shape")
            return torch.zeros((0, *shape), dtype=dtype, device=device)
        dtype = reduce(torch.promote_types, (s.dtype for s in steps))
        return torch.stack([s.to(dtype) for s in steps])

    def extra_repr(self) -> str:
        return f"node={self.node_name!r}, carried={self.n_carried}, scan_outputs={self.n_scan}"


def _value_info(name: str, graph: OnnxGraph) -> Any:
    """A typed ``ValueInfoProto`` for an outer-scope value (untyped if the outer graph has none)."""
    import onnx

    if name in graph.value_info:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(graph.value_info[name])
        return vi
    if name in graph.initializers:
        t = graph.initializers[name].proto
        return onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
    vi = onnx.ValueInfoProto()
    vi.name = name
    return vi


def _static_shape(vi: Any) -> tuple[tuple[int, ...] | None, torch.dtype]:
    import onnx

    tt = vi.type.tensor_type
    try:
        dtype = getattr(torch, str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    except (KeyError, TypeError, AttributeError):
        dtype = torch.float32
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        return None, dtype
    return tuple(int(d.dim_value) for d in tt.shape.dim), dtype


def _convert_body(body: Any, extra: list[Any], opsets: dict[str, int], computed: list[str], where: str) -> fx.GraphModule:
    """``onnx2torch.convert`` of ``body`` with ``extra`` inputs; returns ``computed`` as a tuple."""
    import onnx
    import onnx2torch

    g = onnx.GraphProto()
    g.CopyFrom(body)
    g.name = f"{body.name or 'body'}__mmb_loop_body"
    g.input.extend(extra)
    by_name = {o.name: o for o in body.output}
    del g.output[:]
    for name in computed:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(by_name[name])
        g.output.append(vi)
    imports = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = onnx.helper.make_model(g, opset_imports=imports)
    try:
        model.ir_version = onnx.helper.find_min_ir_version_for(imports, ignore_unknown=True)
    except Exception:  # noqa: BLE001 - an unknown domain: any IR >= 3 suits onnx2torch
        model.ir_version = 8
    try:
        gm = onnx2torch.convert(model, attach_onnx_mapping=True)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{where}: its body has an operator without a converter ({exc}); "
                                  f"register one, or {_TO_ORT}") from exc
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise NotImplementedError(f"{where}: converting its body failed ({type(exc).__name__}: {exc}); {_TO_ORT}") from exc
    producer: dict[str, tuple[fx.Node, int, int]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mapping = getattr(gm.get_submodule(n.target), "onnx_mapping", None)
        if mapping is not None:
            for k, v in enumerate(mapping.outputs):
                if v:
                    producer[v] = (n, k, len(mapping.outputs))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = []
    with gm.graph.inserting_before(out_node):
        for name in computed:
            if name not in producer:
                raise NotImplementedError(f"{where}: body output {name!r} has no producing module after conversion; {_TO_ORT}")
            n, k, total = producer[name]
            values.append(gm.graph.call_function(operator.getitem, (n, k)) if total > 1 else n)
    out_node.args = (tuple(values),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    for mod in gm.modules():
        if hasattr(mod, "onnx_mapping"):
            del mod.onnx_mapping
    return gm


@register("Loop", 1, 11, 13, 16, 19, 21, 23, 24, 25)
def loop(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    import onnx

    where = f"Loop node {node.name!r}"
    body = next((a.g for a in node.proto.attribute if a.name == "body"), None)
    if body is None:
        raise NotImplementedError(f"{where} has no 'body' graph")
    ins = list(node.input_values)
    trip_name = ins[0] if len(ins) > 0 else ""
    cond_name = ins[1] if len(ins) > 1 else ""
    carried = ins[2:]
    n_carried = len(carried)
    n_scan = len(body.output) - 1 - n_carried
    if len(body.input) != 2 + n_carried or n_scan < 0:
        raise NotImplementedError(f"{where}: body has {len(body.input)} inputs / {len(body.output)} outputs for "
                                  f"{n_carried} loop-carried values (ONNX needs 2 + N / 1 + N + K)")
    if any(not x for x in carried):
        raise NotImplementedError(f"{where}: an omitted (empty) loop-carried initial value is not supported; {_TO_ORT}")
    for vi in list(body.input) + list(body.output):
        kind = vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            raise NotImplementedError(
                f"{where}: loop-carried / scan value {vi.name!r} has ONNX type {kind!r} (not a tensor), "
                f"which the torch Loop does not support; {_TO_ORT}")
    outer = free_values(body)
    extra = [_value_info(x, graph) for x in outer]
    body_inputs = [i.name for i in body.input] + outer
    arg_index = {name: j for j, name in enumerate(body_inputs)}  # later duplicates never happen in valid ONNX
    consts: list[torch.Tensor] = []
    body_inits = {t.name: t for t in body.initializer}
    computed: list[str] = []
    sources: list[tuple[str, int]] = []
    for o in body.output:
        if o.name in arg_index:
            sources.append(("arg", arg_index[o.name]))
        elif o.name in body_inits:
            consts.append(torch.from_numpy(onnx.numpy_helper.to_array(body_inits[o.name]).copy()))
            sources.append(("const", len(consts) - 1))
        else:
            if o.name not in computed:
                computed.append(o.name)
            sources.append(("body", computed.index(o.name)))
    gm = _convert_body(body, extra, current_opsets(), computed, where) if computed else None
    scan_specs = [_static_shape(o) for o in body.output[1 + n_carried:]]
    module = OnnxLoop(gm, node.name, bool(trip_name), bool(cond_name), n_carried, n_scan, sources, consts, scan_specs)
    inputs = tuple(x for x in (trip_name, cond_name) if x) + tuple(carried) + tuple(outer)
    converted = OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))
    # tf2onnx's Cumprod (and other while-loops) carry several values of which the graph reads one:
    # onnx2torch would return the Loop's whole tuple as that graph output (3 outputs for 1).
    return keep_only_used_output(node, graph, converted)


# ---------------------------------------------------------------------------------------------
# which outer initializers a Loop body uses as weights (for graphs without trainable markers)
# ---------------------------------------------------------------------------------------------
_LAYOUT_OPS = ("Identity", "Cast", "Split", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Slice", "Flatten")


def loop_weight_initializers(graph: Any, float_inits: set[str], weight_inputs: dict[str, tuple[int, ...]]) -> set[str]:
    """Float initializers of ``graph`` that a ``Loop`` body uses as weights (``to_torch`` makes them Parameters).

    Used for graphs without ``mmb_var__`` markers (frozen exports): tf2onnx passes a Keras RNN's
    kernel, recurrent kernel and bias into the ``Loop`` as loop-carried values that the body
    returns unchanged (or the body reads them from the outer scope). Such a loop-invariant
    initializer with at least one dim is a weight when, in the body, it reaches (through
    ``Split`` / ``Squeeze`` / ``Reshape`` / ``Transpose`` / ``Slice`` / ``Cast`` / ``Identity``)
    a weight slot of ``weight_inputs`` (``MatMul``, ``Gemm``, ``Conv``...) or an ``Add`` / ``Sub``
    (a bias), in the body or in a subgraph nested in it.

    Args:
        graph: the outer ``GraphProto``.
        float_inits: names of its float initializers with at least one dim.
        weight_inputs: op type -> input positions that hold weights
            (:data:`mmbridge.convert.core.WEIGHT_INPUTS`).

    Returns:
        The initializer names.
    """
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "Loop":
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None or len(body.input) != len(node.input):
            continue
        alias: dict[str, str] = {}
        outs = [o.name for o in body.output]
        for k, x in enumerate(node.input[2:]):
            inner = body.input[2 + k].name
            if x in float_inits and 1 + k < len(outs) and outs[1 + k] == inner:
                alias[inner] = x
        for x in free_values(body):
            if x in float_inits:
                alias[x] = x
        nodes = all_nodes(body)  # nested subgraphs read the same outer names
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if n.op_type in _LAYOUT_OPS and n.input and n.input[0] in alias:
                    for o in n.output:
                        if o and o not in alias:
                            alias[o] = alias[n.input[0]]
                            changed = True
        for n in nodes:
            for pos, x in enumerate(n.input):
                if x not in alias:
                    continue
                if (n.op_type in weight_inputs and pos in weight_inputs[n.op_type]) or n.op_type in ("Add", "Sub"):
                    found.add(alias[x])
    return found
