"""ONNX ``Loop`` and the recurrent ops ``LSTM`` / ``GRU`` / ``RNN`` -> torch, through onnx2torch's registry.

onnx2torch 1.5.15 has no converter for any of them. What tf2onnx 1.17 emits for Keras 3 recurrent
layers (measured, Keras 3.15 / TF 2.21, opset 17):

* ``GRU`` and ``SimpleRNN`` (frozen and ``trainable=True`` exports) and ``LSTM`` (``trainable=True``
  export; trainable exports of RNNs need :mod:`mmbridge.export.trainable` to place the ``mmb_var__``
  markers outside the while body, else tf2onnx refuses them): the ``tf.while_loop`` of
  ``keras.ops.rnn`` becomes one ONNX ``Loop``. Its trip count
  ``M`` is the sequence length (an initializer, or computed from ``Shape`` when the length is
  dynamic), ``cond`` is computed in the main graph, and the loop-carried values are the time
  counter, the state(s) ``h`` (``c``) ``[N, units]`` and the layer's weights (passed through the
  body unchanged); the body reads the time-major input ``[T, N, F]`` from the outer scope
  (``Gather(x, t)``) and has one scan output, ``h`` per step (``[T, N, units]``);
* ``LSTM`` (frozen export): tf2onnx's LSTM rewriter recognises the cell and emits one native
  ONNX ``LSTM`` node (``W`` / ``R`` / ``B`` initializers, ``B = [Wb, Rb]`` with ``Rb = 0``).

What this module registers (importing :mod:`.converters` imports it):

* ``Loop`` (every opset version) -> :class:`OnnxLoop`: the body ``GraphProto`` becomes a
  ``ModelProto`` whose inputs are the body inputs (``iteration_num``, ``cond``, the carried
  values) followed by every outer-scope value the body (or a nested subgraph) reads; it is
  converted by ``onnx2torch.convert`` itself, with the same registry and the opset of the outer
  model, and run in a Python loop with ONNX ``Loop`` semantics
  (https://onnx.ai/onnx/operators/onnx__Loop.html). The outer-scope values and the carried
  initial values are inputs of the ``Loop`` call in the outer graph, so initializers among them
  (the Keras weights) stay single ``nn.Parameter`` s of the outer module
  (:func:`mmbridge.convert.core.to_torch` decides parameter / buffer by name or by
  :func:`loop_weight_initializers`) and are never copied into the body;
* ``LSTM`` / ``GRU`` / ``RNN`` (versions 7, 14, 22) -> :class:`OnnxRecurrent`: the ONNX equations
  (https://onnx.ai/onnx/operators/onnx__LSTM.html, ``onnx__GRU.html``, ``onnx__RNN.html``) step by
  step, with ``W`` / ``R`` / ``B`` / ``P`` as call inputs (parameters of the outer module):
  ``direction`` forward / reverse / bidirectional, ``sequence_lens``, initial states, peepholes,
  ``layout``, ``clip``, ``linear_before_reset`` and the activation functions of the spec.

Not supported (the converter raises ``NotImplementedError`` naming the node, which
:func:`~mmbridge.convert.core.to_torch` reports as :class:`~mmbridge.errors.ConversionError`
telling the user to keep the graph in onnxruntime with ``artifact.to_ort()``): a ``Loop`` whose
carried values or scan outputs are sequences or optionals (ONNX ``Loop-13+`` tensor lists), a
body with an op that has no converter, LSTM ``input_forget=1``, and unknown activation names.

Notes: the loop runs in Python, so ``torch.compile`` / ``torch.jit.trace`` see one graph break (or
an unrolled loop) per ``Loop`` and every iteration reads ``cond`` on the host (a device sync on
GPU) unless the body passes ``cond`` through unchanged.
"""

from __future__ import annotations

import operator
import sys
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import fx, nn

_TO_ORT = "keep this bridge in onnxruntime instead (artifact.to_ort())"


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


def _subgraphs(node: Any) -> list[Any]:
    import onnx

    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _all_nodes(graph: Any) -> list[Any]:
    """The nodes of ``graph`` and of every subgraph nested in it."""
    out = []
    for n in graph.node:
        out.append(n)
        for g in _subgraphs(n):
            out += _all_nodes(g)
    return out


def free_values(graph: Any) -> list[str]:
    """Names ``graph`` (a ``GraphProto``, nested subgraphs included) reads but does not define.

    These are the outer-scope values of an ONNX subgraph, in order of first use.
    """
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    seen: dict[str, None] = {}
    for n in graph.node:
        for x in list(n.input) + [y for g in _subgraphs(n) for y in free_values(g)]:
            if x and x not in defined:
                seen.setdefault(x, None)
    for o in graph.output:
        if o.name and o.name not in defined:
            seen.setdefault(o.name, None)
    return list(seen)


def _caller_opsets(default_version: int) -> dict[str, int]:
    """The ``opset_import`` of the model that ``onnx2torch.convert`` is converting right now.

    onnx2torch hands converters only the graph; the body must be converted at the outer model's
    opset (``Split`` / ``Squeeze`` / ``Reduce*`` changed between versions). Read from the calling
    ``onnx2torch.converter.convert`` frame; ``{"": default_version}`` if there is none.
    """
    from onnx2torch import converter

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is converter.convert.__code__:
            found = frame.f_locals.get("opset_import")
            if isinstance(found, dict) and found:
                return {str(k): int(v) for k, v in found.items()}
        frame = frame.f_back
    return {"": default_version}


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


def _loop_converter(version: int):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
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
        gm = _convert_body(body, extra, _caller_opsets(version), computed, where) if computed else None
        scan_specs = [_static_shape(o) for o in body.output[1 + n_carried:]]
        module = OnnxLoop(gm, node.name, bool(trip_name), bool(cond_name), n_carried, n_scan, sources, consts, scan_specs)
        inputs = tuple(x for x in (trip_name, cond_name) if x) + tuple(carried) + tuple(outer)
        return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))

    return convert


# ---------------------------------------------------------------------------------------------
# LSTM / GRU / RNN
# ---------------------------------------------------------------------------------------------
# name -> (fn(x, alpha, beta), default alpha, default beta, number of parameters it consumes)
_ACTIVATIONS: dict[str, tuple[Any, float, float, int]] = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), 0.0, 0.0, 0),
    "tanh": (lambda x, a, b: torch.tanh(x), 0.0, 0.0, 0),
    "relu": (lambda x, a, b: torch.relu(x), 0.0, 0.0, 0),
    "softsign": (lambda x, a, b: F.softsign(x), 0.0, 0.0, 0),
    "softplus": (lambda x, a, b: F.softplus(x), 0.0, 0.0, 0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, 0.0, 1),
    "thresholdedrelu": (lambda x, a, b: x * (x > a).to(x.dtype), 1.0, 0.0, 1),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, 0.0, 1),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5, 2),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0, 2),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0, 2),
}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class OnnxRecurrent(nn.Module, OnnxToTorchModule):
    """ONNX ``LSTM`` / ``GRU`` / ``RNN`` (https://onnx.ai/onnx/operators/onnx__LSTM.html, ``onnx__GRU.html``,
    ``onnx__RNN.html``), computed step by step from the weights given as call inputs.

    Shapes (``layout=0``; ``layout=1`` swaps the first two axes of ``X``, ``Y``, ``Y_h``, ``Y_c``):
    ``X [T, N, I]``, ``W [D, G*H, I]``, ``R [D, G*H, H]``, ``B [D, 2*G*H]`` (``[Wb, Rb]``),
    ``sequence_lens [N]`` (int), ``initial_h`` / ``initial_c [D, N, H]``, ``P [D, 3*H]`` (LSTM
    peepholes, order ``i, o, f``); ``G`` = 4 (LSTM, gate order ``i, o, f, c``), 3 (GRU, ``z, r, h``)
    or 1 (RNN), ``D`` = 2 if bidirectional else 1. Float dtypes; under autocast the matmuls run
    in the autocast dtype.

    Returns ``(Y [T, D, N, H], Y_h [D, N, H], Y_c [D, N, H])`` truncated to the node's outputs
    (LSTM only has ``Y_c``); one tensor if the node has one output. Steps at or beyond a batch
    entry's ``sequence_lens`` give zeros in ``Y`` and leave its state unchanged.
    """

    def __init__(self, kind: str, hidden_size: int, direction: str, activations: list[tuple[str, float, float]],
                 clip: float | None, layout: int, linear_before_reset: bool, n_outputs: int):
        super().__init__()
        self.kind = kind
        self.hidden_size = hidden_size
        self.direction = direction
        self.activations = activations
        self.clip = clip
        self.layout = layout
        self.linear_before_reset = linear_before_reset
        self.n_outputs = n_outputs

    def _act(self, d: int, k: int, x: torch.Tensor) -> torch.Tensor:
        per_dir = len(_DEFAULT_ACTS[self.kind])
        name, a, b = self.activations[d * per_dir + k]
        return _ACTIVATIONS[name][0](x, a, b)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)

    def forward(self, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
                sequence_lens: torch.Tensor | None = None, initial_h: torch.Tensor | None = None,
                initial_c: torch.Tensor | None = None, p: torch.Tensor | None = None):
        if self.layout:
            x = x.transpose(0, 1)
            initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
            initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
        steps, batch = x.shape[0], x.shape[1]
        hs, g = self.hidden_size, _GATES[self.kind]
        ys, last_h, last_c = [], [], []
        for d in range(w.shape[0]):
            reverse = self.direction == "reverse" or d == 1
            xw = torch.matmul(x, w[d].t())  # [T, N, G*H]: all input projections at once
            wb = rb = None
            if b is not None:
                wb, rb = b[d, :g * hs], b[d, g * hs:]
                xw = xw + wb
            h = initial_h[d] if initial_h is not None else x.new_zeros(batch, hs)
            c = initial_c[d] if initial_c is not None else x.new_zeros(batch, hs)
            outs: list[torch.Tensor | None] = [None] * steps
            for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
                if self.kind == "LSTM":
                    gates = xw[t] + torch.matmul(h, r[d].t())
                    if rb is not None:
                        gates = gates + rb
                    gi, go, gf, gc = gates.split(hs, dim=-1)
                    if p is not None:
                        pi, po, pf = p[d].split(hs)
                        gi, gf = gi + pi * c, gf + pf * c
                    i_t, f_t = self._act(d, 0, self._pre(gi)), self._act(d, 0, self._pre(gf))
                    c_new = f_t * c + i_t * self._act(d, 1, self._pre(gc))
                    if p is not None:
                        go = go + po * c_new
                    h_new = self._act(d, 0, self._pre(go)) * self._act(d, 2, c_new)
                elif self.kind == "GRU":
                    xz, xr, xh = xw[t].split(hs, dim=-1)
                    rz, rr, rh = r[d].split(hs, dim=0)
                    bz, br, bh = rb.split(hs) if rb is not None else (None, None, None)
                    hz, hr = torch.matmul(h, rz.t()), torch.matmul(h, rr.t())
                    if rb is not None:
                        hz, hr = hz + bz, hr + br
                    z_t, r_t = self._act(d, 0, self._pre(xz + hz)), self._act(d, 0, self._pre(xr + hr))
                    if self.linear_before_reset:
                        hh = torch.matmul(h, rh.t())
                        hh = r_t * (hh + bh if bh is not None else hh)
                    else:
                        hh = torch.matmul(r_t * h, rh.t())
                        hh = hh + bh if bh is not None else hh
                    h_new = (1 - z_t) * self._act(d, 1, self._pre(xh + hh)) + z_t * h
                    c_new = c
                else:
                    pre = xw[t] + torch.matmul(h, r[d].t())
                    if rb is not None:
                        pre = pre + rb
                    h_new = self._act(d, 0, self._pre(pre))
                    c_new = c
                if sequence_lens is not None:
                    valid = (t < sequence_lens.to(torch.int64)).unsqueeze(-1)
                    h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
                    outs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
                else:
                    h, c = h_new, c_new
                    outs[t] = h_new
            steps_out = [o for o in outs if o is not None]
            dtype = reduce(torch.promote_types, (o.dtype for o in steps_out)) if steps_out else x.dtype
            ys.append(torch.stack([o.to(dtype) for o in steps_out]) if steps_out else x.new_zeros(0, batch, hs))
            last_h.append(h)
            last_c.append(c)
        y = torch.stack(ys, dim=1)  # [T, D, N, H]
        y_h = torch.stack([v.to(y.dtype) for v in last_h])
        y_c = torch.stack([v.to(y.dtype) for v in last_c])
        if self.layout:
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        results = (y, y_h, y_c)[:self.n_outputs]
        return results[0] if len(results) == 1 else results

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden_size={self.hidden_size}, direction={self.direction!r}, layout={self.layout}"


def _recurrent_converter(kind: str):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        where = f"{kind} node {node.name!r}"
        attrs = node.attributes
        if int(attrs.get("input_forget", 0)):
            raise NotImplementedError(f"{where}: input_forget=1 is not supported; {_TO_ORT}")
        direction = attrs.get("direction", "forward")
        n_dir = 2 if direction == "bidirectional" else 1
        names = list(attrs.get("activations", [])) or _DEFAULT_ACTS[kind] * n_dir
        if len(names) == len(_DEFAULT_ACTS[kind]) and n_dir == 2:
            names = names * 2
        alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
        acts = []
        for name in names:
            key = name.lower()
            if key not in _ACTIVATIONS:
                raise NotImplementedError(f"{where}: activation {name!r} is not supported; {_TO_ORT}")
            _, a, b, n_params = _ACTIVATIONS[key]
            if n_params >= 1 and alphas:
                a = float(alphas.pop(0))
            if n_params >= 2 and betas:
                b = float(betas.pop(0))
            acts.append((key, a, b))
        hidden = attrs.get("hidden_size")
        if hidden is None:
            raise NotImplementedError(f"{where}: the hidden_size attribute is required")
        clip = attrs.get("clip")
        module = OnnxRecurrent(kind, int(hidden), direction, acts, float(clip) if clip is not None else None,
                               int(attrs.get("layout", 0)), bool(attrs.get("linear_before_reset", 0)),
                               len(node.output_values))
        return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
            inputs=node.input_values, outputs=node.output_values))

    return convert


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
        nodes = _all_nodes(body)  # nested subgraphs read the same outer names
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


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
_LOOP_VERSIONS = (1, 11, 13, 16, 19, 21, 23, 24, 25)
_RECURRENT_VERSIONS = (7, 14, 22)


def register_all() -> list[str]:
    """Register the ``Loop`` / ``LSTM`` / ``GRU`` / ``RNN`` converters with onnx2torch (idempotent).

    Returns:
        ``"Op-version"`` strings of what this module provides.
    """
    provided: list[tuple[str, int, Any]] = [("Loop", v, _loop_converter(v)) for v in _LOOP_VERSIONS]
    for kind in _GATES:
        provided += [(kind, v, _recurrent_converter(kind)) for v in _RECURRENT_VERSIONS]
    for op, version, fn in provided:
        if OperationDescription("", op, version) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=op, version=version)(fn)
    return [f"{op}-{v}" for op, v, _ in provided]


register_all()
