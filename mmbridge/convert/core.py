"""ONNX -> trainable ``torch.nn.Module``: onnx2torch plus mmbridge's converters plus what training needs.

:func:`to_torch` (also ``mmbridge.convert``, ``mmbridge.to_torch`` and
``BridgeArtifact.to_torch``) runs onnx2torch 1.5.15 with :data:`mmbridge.op_converters`
consulted first for every node (:mod:`mmbridge.convert.ops`, one file per op family; the hook is
:func:`mmbridge.convert.registry.consult_op_converters`), and then fixes the module so that it
trains like the Keras original (docs/design.md part 4):

* **every weight is an ``nn.Parameter``.** onnx2torch keeps every initializer that is an operand
  (MatMul / Add / Gather / Mul...) as a buffer, one copy per use. Here each ONNX initializer
  becomes exactly one tensor in the submodule ``weights``: an ``nn.Parameter`` when it is a
  weight, a buffer otherwise. For artifacts exported with ``trainable=True`` the initializer names
  say which is which exactly (``mmb_var__<keras path>`` = trainable, ``mmb_state__`` = state; see
  :mod:`mmbridge.export.trainable`), so the parameter count equals the Keras trainable count. For other
  graphs a float initializer is a weight when it feeds MatMul / Gemm / Conv / ConvTranspose /
  Einsum, the table input of Gather, the scale / bias of a normalisation, ``W`` / ``R`` / ``B`` /
  ``P`` of LSTM / GRU / RNN, or an Add / Sub right after one of those (a bias) -- including zero
  biases -- and a loop-invariant input of a ``Loop`` whose body feeds it to one of those slots or
  to any Add / Sub (Keras RNN weights, :func:`.ops.loop.loop_weight_initializers`);
* the converters themselves give what training and ``torch.compile`` need (see each file in
  :mod:`mmbridge.convert.ops`): **BatchNormalization** becomes :class:`BatchNorm1d` /
  :class:`BatchNorm2d` / :class:`BatchNorm3d` (Keras momentum, population-variance running
  statistics), **Dropout** ``nn.Dropout(p)``, **Resize** with constant scales ORT's output size
  and coordinates, ``auto_pad=SAME_*`` Conv / MaxPool a :class:`~.ops.pad.SamePad` in front,
  and constant Reshape / Squeeze / Unsqueeze / Pad / Expand / Tile arguments Python ints;
* ``MatMul(x, W) + Add(b)`` with weights becomes :class:`Linear` (an ``nn.Linear``: one
  ``addmm``, stays in the autocast dtype); ``x * sigmoid(x)`` becomes ``nn.SiLU``;
* reshape targets that tf2onnx computes at run time become constants where ONNX shape inference
  (with data propagation) pins them, so ``torch.compile`` traces CNN and Transformer bridges
  with a static spec (all dims but the batch fixed) without graph breaks;
* the module is returned in ``eval()`` mode; ``train()`` / ``eval()`` switch BatchNorm and
  Dropout like Keras ``training=True`` / ``False``.

Unsupported operators are reported all at once (:class:`~mmbridge.errors.ConversionError`),
with the way to register a converter.

Shape notation: ``N`` batch, ``C`` channels, ``H``/``W`` spatial; layouts are those of the
artifact's input specs (``artifact.input_specs``; NHWC unless exported with ``inputs_as_nchw``).
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from mmbridge.errors import ConversionError
from mmbridge.graph import STATE_MARK, VAR_MARK
from mmbridge.graph.walk import nodes_with_subgraphs

# ONNX op -> input positions that hold weights (when they are float initializers).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1, 2),
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Einsum": tuple(range(8)),
    "Gather": (0,),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
    "LSTM": (1, 2, 3, 7),  # W, R, B, P
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
}
# ONNX op -> input positions that hold non-trainable state (buffers).
STATE_INPUTS: dict[str, tuple[int, ...]] = {"BatchNormalization": (3, 4)}
# Ops whose output an Add / Sub with a float initializer is a bias of.
_BIAS_PRODUCERS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


# ---------------------------------------------------------------------------------------------
# modules mmbridge puts into converted graphs
# ---------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """ONNX ``MatMul(x, W) [+ b]`` with weight ``W`` ``[in, out]`` (Keras Dense layout) as ``nn.Linear``.

    ``weight`` is ``W.T`` (``[out, in]``, torch layout), ``bias`` is ``b`` (``[out]``) or None.
    Input ``[..., in]``, output ``[..., out]``. Being a real ``nn.Linear`` makes it run as one
    ``addmm`` and keeps it in the autocast dtype (a separate ``Add`` with an fp32 bias would
    promote every bf16 activation back to fp32).
    """


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def to_torch(source: Any, *, trainable: bool | None = None, allow_unverified: bool = False) -> fx.GraphModule:
    """Convert an ONNX bridge into a ``torch.nn.Module`` (an ``fx.GraphModule``), in eval mode.

    Args:
        source: a :class:`~mmbridge.BridgeArtifact`, an ``onnx.ModelProto``, or a path to a
            ``.onnx`` file or an artifact directory. Not modified.
        trainable: None (default): follow the artifact
            (:func:`mmbridge.convert.contract.resolve_trainable`): False for an inference export
            of a Keras model, True otherwise. True: weights are ``nn.Parameter`` with ``requires_grad=True``
            (see the module doc for which initializers are weights), BatchNorm keeps running
            statistics as buffers. False: a frozen module: the same parameters, all with
            ``requires_grad=False`` (:func:`frozen_parameters` lists them; unfreeze with
            ``requires_grad_(True)``). A frozen module has nothing for DDP to synchronise:
            keep it outside ``DistributedDataParallel``.
        allow_unverified: convert even when the artifact's export found the torch backend wrong
            (``meta["backends"]["torch"]``: it did not convert, or did not match TensorFlow at
            some shape). Default False: such an artifact raises with the recorded reason.

    Returns:
        The module, in ``eval()`` mode. Call it with positional tensors in the order of the
        artifact's input specs (same dtypes; float32 images ``[N, H, W, C]`` for a Keras CNN unless
        exported with ``inputs_as_nchw``); any batch size works when the spec's batch dim is
        symbolic. It returns one tensor, or a tuple in ``artifact.output_names`` order.
        ``module.mmbridge_sources`` maps each parameter / buffer name to the ONNX initializer it
        came from (for trainable exports that name contains the Keras variable path).

    Raises:
        ConversionError: the artifact records that export found the torch backend wrong
            (:func:`mmbridge.convert.contract.check_torch_verified`: the reason and the fix,
            ``to_ort()``), unless ``allow_unverified``. Also: ``trainable=True`` for an inference export of a Keras model (re-export
            with ``trainable=True``, or ``trainable=False``), or the weight audit of a trainable
            Keras export fails. Also: the graph has operators no converter handles; the message lists every
            one (op type, opset, node names) and how to register a converter. Also raised when a
            converter fails on a node, naming that node.
        FileNotFoundError: ``source`` is a path that does not exist.
        TypeError: ``source`` is none of the accepted kinds.
    """
    from mmbridge._torch_stack import guard_torch_stack

    guard_torch_stack("mmbridge.to_torch()")  # onnx2torch imports torchvision: segfault after TF
    import onnx2torch

    from mmbridge.convert.contract import audit_converted, check_torch_verified, resolve_trainable
    from mmbridge.convert.registry import consult_op_converters

    check_torch_verified(source, allow_unverified)  # export checked torch and recorded a failure
    trainable = resolve_trainable(source, trainable)  # raises for trainable=True on a Keras inference export
    model = _prepare(_load(source))
    check_supported(model)
    aliases = _undot_domains(model)
    opsets = {o.domain or "": o.version for o in model.opset_import}
    with warnings.catch_warnings(), consult_op_converters(opsets, aliases):
        warnings.simplefilter("ignore")
        try:
            gm = onnx2torch.convert(model, attach_onnx_mapping=True)
        except NotImplementedError as exc:
            raise ConversionError(f"a converter refused the graph: {exc}. {_HOW_TO_REGISTER}") from exc
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"converting the graph failed: {type(exc).__name__}: {exc}") from exc
    nodes = {_unique_name(n): n for n in model.graph.node}
    _materialise_weights(gm, model, nodes, trainable)
    _fuse_linear(gm, nodes)
    _fuse_silu(gm)
    from mmbridge.convert import fusions as _fusions
    from mmbridge.convert.fusions import run_all as _run_fusions  # GELU, constant element-wise chains, views

    constants_before = dict(gm.named_buffers())
    gm.mmbridge_fusions = _run_fusions(gm)
    gm.graph.eliminate_dead_code()  # Constant nodes whose value a converter folded into its module
    gm.delete_all_unused_submodules()
    _drop_unused_weights(gm)
    after = dict(gm.named_buffers())
    # small constants only (scalars, a wrap's N, GELU's 0.5): nothing weight-sized is kept alive for this
    dropped = {k: v.detach().clone() for k, v in constants_before.items() if k not in after and v.numel() <= 1024}
    if dropped:  # a state_dict saved before a fusion dropped them still loads (strict), when they are equal
        gm._register_load_state_dict_pre_hook(FoldedConstants(dropped))
    for _, mod in list(gm.named_modules()):
        if hasattr(mod, "onnx_mapping"):
            del mod.onnx_mapping
    gm.graph.lint()
    gm.recompile()
    _fusions.fast_call(gm)  # after recompile(), which resets __call__ (issue 16 item 4)
    if not trainable:
        for p in gm.parameters():
            p.requires_grad_(False)
    specs = getattr(source, "input_specs", None)
    if specs is not None:  # lets compose() infer the branch width with a dry run
        gm.input_specs = tuple(specs)
    audit_converted(gm, source, trainable)  # the Keras weight audit, when the artifact has an inventory
    return gm.eval()


_HOW_TO_REGISTER = (
    "To support an op, register a converter in one file that is imported before to_torch (or is an "
    "mmbridge.plugins entry point): `@mmbridge.op_converters.register(\"Op\", since_version=N)` on a "
    "function `(node, graph) -> torch.nn.Module` (docs/authoring-guide.md, 'Adding an ONNX op converter'; "
    "examples in mmbridge/convert/ops/), or re-export at another opset (mmbridge.export(..., opset=17) or "
    "onnx.version_converter), or keep this bridge frozen in onnxruntime (artifact.to_ort())."
)


def check_supported(model: Any) -> None:
    """Raise one error listing every node of ``model`` that neither mmbridge nor onnx2torch converts.

    Args:
        model: an ``onnx.ModelProto``.

    Raises:
        ConversionError: lists each unsupported ``(domain, op_type, opset)`` with its node names
            and how to register a converter.
    """
    from mmbridge.convert.ops import op_converters  # noqa: F401  (registers mmbridge's converters)
    from mmbridge.convert.registry import find_converter, resolve_since_version

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[tuple[str, str, int], list[str]] = {}
    for node, label in nodes_with_subgraphs(model.graph):
        domain = node.domain or ""
        version = opsets.get(domain, opsets.get("ai.onnx", 0)) if domain not in ("", "ai.onnx") else opsets.get("", opsets.get("ai.onnx", 0))
        try:
            find_converter(node.op_type, version, domain)
        except NotImplementedError:
            missing.setdefault((domain or "ai.onnx", node.op_type, version), []).append(label)
    if missing:
        lines = []
        for (domain, op, version), names in sorted(missing.items()):
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            lines.append(f"  - {op} (domain {domain}, opset {version}): {len(names)} node(s): {shown}")
        domain, op, version = sorted(missing)[0]
        since = resolve_since_version(op, version, domain) or version
        where = f', domain="{domain}"' if domain != "ai.onnx" else ""
        example = f'`@mmbridge.op_converters.register("{op}", since_version={since}{where})`'
        raise ConversionError(
            f"cannot convert the ONNX graph to torch: {sum(len(v) for v in missing.values())} node(s) of "
            f"{len(missing)} operator type(s) have no converter:\n" + "\n".join(lines) + "\n"
            + _HOW_TO_REGISTER.replace('`@mmbridge.op_converters.register(\"Op\", since_version=N)`', example)
        )


def _load(source: Any) -> Any:
    import onnx

    if hasattr(source, "onnx_path") and hasattr(source, "meta"):  # BridgeArtifact
        return copy.deepcopy(source.model)
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"to_torch({os.fspath(source)!r}): no such ONNX file or artifact directory")
        return onnx.load(path)
    raise TypeError(f"to_torch(): expected a BridgeArtifact, an onnx.ModelProto or a path, got {type(source).__name__}")


def _unique_name(node: Any) -> str:
    return (f"{node.domain}/" + (node.name.replace(".", "/") or node.op_type)).lstrip("/")


def _prepare(model: Any) -> Any:
    """Unique node names, initializer graph inputs stripped, shapes inferred, computed reshape
    targets made constant where shapes allow."""
    import onnx

    g = model.graph
    seen: set[str] = set()
    for i, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{i}"
        base, k = name, 0
        while _unique_name_of(name, node.domain) in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(_unique_name_of(name, node.domain))
    init_names = {t.name for t in g.initializer}
    for inp in [i for i in g.input if i.name in init_names]:
        g.input.remove(inp)
    _outputs_from_nodes(g)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx2torch runs its own (safe) inference too
        return model
    _constant_reshape_targets(model)
    _specialise_reshape_targets(model)
    return model


def _outputs_from_nodes(g: Any) -> None:
    """Give every graph output that is an initializer (a constant output, e.g. ``tf.shape`` of a
    static input, which tf2onnx and onnxoptimizer fold) an ``Identity`` node that produces it.

    onnx2torch looks every output up among node outputs (``KeyError: 'output'``). The initializer
    is renamed (``<name>__mmb_const``, and every node input that read it) so the output keeps its name.
    """
    from onnx import helper

    produced = {o for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    for vi in g.output:
        if vi.name in produced or vi.name not in inits:
            continue
        new = f"{vi.name}__mmb_const"
        inits[vi.name].name = new
        for n in g.node:
            for i, x in enumerate(n.input):
                if x == vi.name:
                    n.input[i] = new
        g.node.append(helper.make_node("Identity", [new], [vi.name], name=f"{vi.name}__mmb_identity"))
        produced.add(vi.name)


def _undot_domains(model: Any) -> dict[str, str]:
    """Rename custom domains with dots (``com.example`` -> ``com_example``) in nodes, subgraphs and opset imports.

    onnx2torch names each torch module ``<domain>/<node name>``, and torch refuses dots in module
    names. Returns ``{new name: original}`` for the converter lookup.
    """
    taken = {o.domain for o in model.opset_import}
    aliases: dict[str, str] = {}
    for o in model.opset_import:
        if "." in o.domain and o.domain != "ai.onnx":
            new = o.domain.replace(".", "_")
            while new in taken:
                new += "_"
            taken.add(new)
            aliases[new] = o.domain
            o.domain = new
    if aliases:
        back = {v: k for k, v in aliases.items()}
        for node, _ in nodes_with_subgraphs(model.graph):
            if node.domain in back:
                node.domain = back[node.domain]
    return aliases


def _dims(vi: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _constant_reshape_targets(model: Any) -> int:
    """Give ``Reshape`` nodes with a computed target a constant one where shapes allow.

    tf2onnx computes many reshape targets at run time (``Shape -> Gather -> Concat``) because
    the batch dim is dynamic. When shape inference (with data propagation) knows every output
    dim, or knows all but the batch dim and that one is the input's, the target becomes a
    constant (``0`` = copy the input dim, ONNX ``allowzero=0``), which ``torch.compile`` traces
    without data-dependent graph breaks. Returns the number of rewritten nodes.
    """
    from onnx import numpy_helper

    g = model.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name for t in g.initializer}
    rewritten = 0
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in inits:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        src, dst = infos.get(node.input[0]), infos.get(node.output[0])
        if src is None or dst is None or not dst.type.tensor_type.HasField("shape"):
            continue
        in_dims, out_dims = _dims(src), _dims(dst)
        target, unknown = [], 0
        for i, d in enumerate(out_dims):
            if isinstance(d, int) and d > 0:
                target.append(d)
            elif isinstance(d, str) and i < len(in_dims) and in_dims[i] == d:
                target.append(0)
            else:
                target.append(-1)
                unknown += 1
        if unknown > 1 or not target:
            continue
        name = f"{node.name}__mmb_target"
        g.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        node.input[1] = name
        rewritten += 1
    return rewritten


# ops whose output shape is a function of their input shapes alone (values never matter)
_SHAPE_FROM_SHAPES = frozenset((
    "Abs", "Acos", "Add", "And", "Asin", "Atan", "AveragePool", "BatchNormalization", "BitShift", "Cast", "CastLike",
    "Ceil", "Celu", "Clip", "Concat", "Conv", "ConvTranspose", "Cos", "Cosh", "DepthToSpace", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "LpNormalization", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not",
    "Or", "PRelu", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Shape", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "Transpose", "Where", "Xor",
    "ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Expand",
    "Tile", "Pad", "Resize", "Split", "ConstantOfShape", "Range", "OneHot", "TopK", "CumSum", "Trilu",
))
# of those, the ones whose output shape also depends on the VALUES of inputs 1.. (axes, target, sizes...)
_SHAPE_FROM_VALUES = frozenset((
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Expand", "Tile", "Pad", "Resize",
    "Split", "OneHot", "TopK",
))


def _target_is_shape_only(g: Any, target: str, graph_inputs: set[str], inits: set[str]) -> bool:
    """Whether the value ``target`` depends on the graph inputs only through their shapes.

    Walks back from ``target`` needing its *value*: a graph input reached while a value is needed
    makes it value-dependent (False); ``Shape`` / ``Size`` switch to needing only the *shape* of
    their input, which for ops in :data:`_SHAPE_FROM_SHAPES` is a function of the input shapes
    (and, for :data:`_SHAPE_FROM_VALUES` and ``ConstantOfShape`` / ``Range``, of the values of the
    parameter inputs). Any other op on a shape path (``NonZero``, ``Loop``, a custom op...) or in a
    subgraph-bearing node gives False: only provably shape-only targets are probed.
    """
    producer = {o: n for n in g.node for o in n.output}
    seen: set[tuple[str, bool]] = set()
    todo = [(target, True)]  # (value name, its value is needed)
    while todo:
        name, need_value = todo.pop()
        if (name, need_value) in seen or not name or name in inits:
            continue
        seen.add((name, need_value))
        node = producer.get(name)
        if node is None:
            if name in graph_inputs:
                if need_value:
                    return False
                continue
            return False  # an outer-scope value: not analysed
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS: Loop, If, Scan
            return False
        if need_value:
            if node.op_type in ("Shape", "Size"):
                todo.append((node.input[0], False))
            else:
                todo.extend((i, True) for i in node.input)
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_FROM_SHAPES:
            return False
        if node.op_type in ("ConstantOfShape", "Range"):
            todo.extend((i, True) for i in node.input)
            continue
        todo.extend((i, False) for i in node.input)
        if node.op_type in _SHAPE_FROM_VALUES:
            todo.extend((i, True) for i in node.input[1:])
    return True


def _unique_name_of(name: str, domain: str) -> str:
    return (f"{domain}/" + name.replace(".", "/")).lstrip("/")


def _specialise_reshape_targets(model: Any) -> int:
    """Constant targets for the computed reshapes shape inference could not pin (batch-only graphs).

    Only when every graph input is static except its first (batch) dim: the output shape of each
    remaining reshape is measured with onnxruntime for batch 2 (two different input values) and
    batch 3. A reshape whose output shape agrees across the runs except in at most one dim (the
    one that scales with the batch, written ``-1``) gets that shape as a constant target (for
    einsum attention: ``[N * heads, -1, d]`` becomes ``[-1, 12, 8]``). Shapes that change with the
    input values are left alone. Returns the number of rewritten nodes.

    Only targets computed from shapes are probed (:func:`_target_is_shape_only`): a target that
    reads the *values* of a graph input (``tf.reshape(x, [n, -1])`` with ``n`` an input) is
    never made constant, whatever the probe (which feeds integers 0 / 1) measured.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name for t in g.initializer}
    todo = [n for n in g.node if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] not in inits
            and not any(a.name == "allowzero" and a.i for a in n.attribute)]
    if not todo:
        return 0
    inputs = [i for i in g.input if i.name not in inits]
    shapes = {i.name: _dims(i) for i in inputs}
    if any(not dims or any(not isinstance(d, int) for d in dims[1:]) for dims in shapes.values()):
        return 0
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    todo = [n for n in todo if n.output[0] in infos and infos[n.output[0]].type.tensor_type.elem_type]
    todo = [n for n in todo if _target_is_shape_only(g, n.input[1], {i.name for i in inputs}, inits)]
    if not todo:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for n in todo:  # probe each reshape's output shape
        probe.graph.output.append(onnx.helper.make_tensor_value_info(
            n.output[0], infos[n.output[0]].type.tensor_type.elem_type, None))
    try:
        from mmbridge.runtime.session import make_session

        sess = make_session(probe)
        rng = np.random.default_rng(0)
        runs = []
        for batch, seed in ((2, 0), (2, 1), (3, 2)):
            feed = {}
            for i in inputs:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                shape = [batch] + [int(d) for d in shapes[i.name][1:]]
                feed[i.name] = (rng.integers(0, 2, size=shape) if np.issubdtype(dtype, np.integer) or dtype == np.bool_
                                else rng.normal(size=shape) * seed).astype(dtype)
            runs.append([tuple(np.shape(o)) for o in sess.run(None, feed)])
    except Exception:  # noqa: BLE001 - a graph ORT cannot probe keeps its computed targets
        return 0
    rewritten = 0
    for k, node in enumerate(todo):
        a, b, c = (runs[0][k], runs[1][k], runs[2][k])
        if a != b or len(a) != len(c):
            continue
        varying = [i for i, (x, y) in enumerate(zip(a, c)) if x != y]
        if len(varying) > 1:
            continue
        target = [-1 if i in varying else d for i, d in enumerate(a)]
        name = f"{node.name}__mmb_target"
        g.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        node.input[1] = name
        rewritten += 1
    return rewritten


# ---------------------------------------------------------------------------------------------
# post-conversion passes
# ---------------------------------------------------------------------------------------------
def _initializer_roles(model: Any, trainable: bool) -> dict[str, str]:
    """ONNX initializer name -> ``"param"`` | ``"buffer"`` (see the module doc)."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    marked = any(VAR_MARK in n or STATE_MARK in n for n in inits)
    producer = {o: n for n in model.graph.node for o in n.output}
    roles = {n: "buffer" for n in inits}
    if marked:
        for n in inits:
            if VAR_MARK in n and inits[n].data_type in float_types:
                roles[n] = "param"
        return roles
    for node in model.graph.node:
        for pos, x in enumerate(node.input):
            if x not in inits or inits[x].data_type not in float_types:
                continue
            t = inits[x]
            if node.op_type in WEIGHT_INPUTS and pos in WEIGHT_INPUTS[node.op_type]:
                if node.op_type == "Gather" or len(t.dims) >= 1:
                    roles[x] = "param"
            elif node.op_type in ("Add", "Sub") and len(t.dims) >= 1:
                other = [y for y in node.input if y != x]
                if other and other[0] in producer and producer[other[0]].op_type in _BIAS_PRODUCERS:
                    roles[x] = "param"
    from mmbridge.convert.ops.loop import loop_weight_initializers  # Keras RNN weights passed into a Loop

    float_inits = {n for n, t in inits.items() if t.data_type in float_types and len(t.dims) >= 1}
    for x in loop_weight_initializers(model.graph, float_inits, WEIGHT_INPUTS):
        roles[x] = "param"
    return roles


def _sanitize(name: str) -> str:
    for mark in (VAR_MARK, STATE_MARK):
        if mark in name:
            name = name[name.index(mark) + len(mark):]
            break
    name = name.split(":")[0]
    return re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "w"


def _call_inputs(node: fx.Node, module: nn.Module) -> list[tuple[Any, str]]:
    """``(fx argument, onnx value name)`` pairs of one converted call (onnx2torch's arg layout)."""
    mapping = getattr(module, "onnx_mapping", None)
    if mapping is None:
        return []
    names = [n for n in mapping.inputs if n]
    flat = list(node.args) + list(node.kwargs.values())
    return list(zip(flat, names))


def _materialise_weights(gm: fx.GraphModule, model: Any, nodes: dict[str, Any], trainable: bool) -> None:
    """One tensor per ONNX initializer in ``gm.weights``: Parameter or buffer by role."""
    from onnx import numpy_helper

    roles = _initializer_roles(model, trainable)
    inits = {t.name: t for t in model.graph.initializer}
    holder = nn.Module()
    targets: dict[str, str] = {}
    sources: dict[str, str] = {}
    used_names: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        for arg, onnx_name in _call_inputs(node, module):
            if not isinstance(arg, fx.Node) or arg.op != "get_attr" or onnx_name not in inits:
                continue
            if onnx_name not in targets:
                base = _sanitize(onnx_name)
                name, k = base, 1
                while name in used_names:
                    k += 1
                    name = f"{base}_{k}"
                used_names.add(name)
                value = torch.from_numpy(np.array(numpy_helper.to_array(inits[onnx_name]), copy=True))
                if roles.get(onnx_name) == "param":
                    holder.register_parameter(name, nn.Parameter(value))
                else:
                    holder.register_buffer(name, value)
                targets[onnx_name] = f"weights.{name}"
                sources[f"weights.{name}"] = onnx_name
            arg.target = targets[onnx_name]
    gm.add_module("weights", holder)
    leftover = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("initializers.")]
    if hasattr(gm, "initializers") and not leftover:  # else: a converter layout this pass does not know; keep them
        delattr(gm, "initializers")
    # modules that absorbed their initializers (Conv, Gemm -> Linear, BatchNorm, LayerNorm)
    for mod_name, module in gm.named_modules():
        onnx_node = nodes.get(mod_name)
        if onnx_node is None:
            continue
        for pname, _ in list(module.named_parameters()) + list(module.named_buffers()):
            src = _absorbed_source(onnx_node, pname.rsplit(".", 1)[-1])  # Conv may be Sequential(Pad, Conv2d)
            if src:
                sources[f"{mod_name}.{pname}"] = src
    gm.mmbridge_sources = sources


def _absorbed_source(node: Any, pname: str) -> str | None:
    pos = {"Conv": {"weight": 1, "bias": 2}, "ConvTranspose": {"weight": 1, "bias": 2}, "Gemm": {"weight": 1, "bias": 2},
           "BatchNormalization": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
           "LayerNormalization": {"weight": 1, "bias": 2}}.get(node.op_type, {}).get(pname)
    if pos is None or pos >= len(node.input):
        return None
    return node.input[pos] or None


def _fuse_linear(gm: fx.GraphModule, nodes: dict[str, Any]) -> None:
    """``MatMul(x, W)`` (+ ``Add(., b)``) with parameter ``W`` ``[in, out]`` -> :class:`Linear`."""
    params = dict(gm.named_parameters())
    getattr_users: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            getattr_users[n.target] = getattr_users.get(n.target, 0) + len(n.users)
    transposed: set[str] = getattr(gm, "mmbridge_transposed", set())

    def param_arg(arg: Any, ndim: int) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target in params:
            if params[arg.target].dim() == ndim and getattr_users.get(arg.target) == 1:
                return arg.target
        return None

    for node in list(gm.graph.nodes):
        onnx_node = nodes.get(node.target) if node.op == "call_module" else None
        if onnx_node is None or onnx_node.op_type != "MatMul" or len(node.args) != 2:
            continue
        w_name = param_arg(node.args[1], 2)
        if w_name is None:
            continue
        w = params[w_name]
        bias_name, add_node = None, None
        if len(node.users) == 1:
            user = next(iter(node.users))
            add_onnx = nodes.get(user.target) if user.op == "call_module" else None
            if add_onnx is not None and add_onnx.op_type == "Add" and len(user.args) == 2:
                other = user.args[1] if user.args[0] is node else user.args[0]
                b = param_arg(other, 1)
                if b is not None and params[b].shape[0] == w.shape[1]:
                    bias_name, add_node = b, user
            elif add_onnx is not None and add_onnx.op_type == "Reshape":
                bias_name, add_node = _bias_after_reshape(gm, nodes, user, params, param_arg, w.shape[1])
        lin = Linear(w.shape[0], w.shape[1], bias=bias_name is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.detach().t())
            if bias_name is not None:
                lin.bias.copy_(params[bias_name].detach().reshape(-1))
        lin.weight.requires_grad_(w.requires_grad)
        if bias_name is not None:
            lin.bias.requires_grad_(params[bias_name].requires_grad)
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, lin)
        sources = gm.mmbridge_sources
        sources[f"{node.target}.weight"] = sources.pop(w_name)
        transposed.add(f"{node.target}.weight")
        w_arg = node.args[1]
        node.args = (node.args[0],)
        if add_node is not None:
            sources[f"{node.target}.bias"] = sources.pop(bias_name)
            kept = node if node in add_node.args else next(a for a in add_node.args if a in node.users)  # or the Reshape
            b_arg = add_node.args[0] if add_node.args[1] is kept else add_node.args[1]
            add_node.replace_all_uses_with(kept)
            gm.graph.erase_node(add_node)
            gm.graph.erase_node(b_arg)
        gm.graph.erase_node(w_arg)
    gm.mmbridge_transposed = transposed


def _bias_after_reshape(gm: fx.GraphModule, nodes: dict[str, Any], reshape: fx.Node, params: dict[str, Any],
                        param_arg: Any, out: int) -> tuple[str | None, fx.Node | None]:
    """``MatMul -> Reshape -> Add(b)`` (Keras ``EinsumDense``, e.g. MultiHeadAttention's query / key /
    value, and ``Dense`` on 3-D inputs as ``Tensordot``): when the Reshape only splits the last dim
    (``out``) into ``b``'s shape, ``b`` is the Linear's bias (``b.reshape(out)``: the same sums, one
    ``addmm`` instead of ``mm`` + ``add``). Returns ``(bias parameter name, Add node)`` or ``(None, None)``."""
    from mmbridge.convert.ops.shape import Reshape

    mod = gm.get_submodule(reshape.target)
    if not isinstance(mod, Reshape) or mod.shape is None or len(reshape.users) != 1 or len(reshape.args) != 1:
        return None, None
    add = next(iter(reshape.users))
    add_onnx = nodes.get(add.target) if add.op == "call_module" else None
    if add_onnx is None or add_onnx.op_type != "Add" or len(add.args) != 2 or add.kwargs:
        return None, None
    other = add.args[1] if add.args[0] is reshape else add.args[0]
    if not isinstance(other, fx.Node) or other.op != "get_attr" or other.target not in params:
        return None, None
    bshape = tuple(params[other.target].shape)
    if not bshape or math.prod(bshape) != out or len(bshape) > len(mod.shape) or tuple(mod.shape[-len(bshape):]) != bshape:
        return None, None
    b = param_arg(other, len(bshape))
    return (b, add) if b is not None else (None, None)


def _fuse_silu(gm: fx.GraphModule) -> int:
    """``Mul(x, Sigmoid(x))`` (Keras ``swish`` / ``silu``, as tf2onnx writes it) -> one ``nn.SiLU``.

    torch's SiLU is one fused kernel forward and backward and saves only ``x`` for the backward;
    the two-op form writes and keeps an extra activation-sized tensor (EfficientNet has 65 of
    them). Same values up to rounding (``x * sigmoid(x)`` is SiLU's definition). Only a Sigmoid
    whose sole user is that Mul is fused. Returns the number of fused pairs.
    """
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    fused = 0
    for sig in list(gm.graph.nodes):
        if sig.op != "call_module" or not isinstance(gm.get_submodule(sig.target), nn.Sigmoid):
            continue
        if len(sig.args) != 1 or sig.kwargs or len(sig.users) != 1:
            continue
        (mul,) = sig.users
        x = sig.args[0]
        if mul.op != "call_module" or mul.kwargs or len(mul.args) != 2 or set(mul.args) != {x, sig}:
            continue
        module = gm.get_submodule(mul.target)
        if not isinstance(module, OnnxBinaryMathOperation) or module.math_op_function is not torch.mul \
                or module.broadcast == 1:
            continue
        parent, _, leaf = mul.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.SiLU())
        mul.args = (x,)
        gm.graph.erase_node(sig)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


class FoldedConstants:
    """``load_state_dict`` pre-hook of a converted module: accepts the constant buffers a fusion
    made unused (the negative-id wrap of an embedding lookup, GELU's 0.5 / sqrt 2, ...), which a
    state_dict saved from a module converted without that fusion (an older mmbridge) still holds.

    Each such key is taken out of the loaded dict when its value equals the constant the graph
    had (same shape, ``torch.equal``); another value is a load error naming the key (the fused
    module could not use it: it computes with the graph's constant). Only constants of at most
    1,024 values are kept for this (a copy each). Picklable (a plain object).
    """

    def __init__(self, constants: dict[str, torch.Tensor]):
        self.constants = dict(constants)

    def __call__(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list,
                 unexpected_keys: list, error_msgs: list) -> None:
        for name, value in self.constants.items():
            key = prefix + name
            if key not in state_dict:
                continue
            got = state_dict.pop(key)
            if not (isinstance(got, torch.Tensor) and got.shape == value.shape
                    and torch.equal(got.to(value.dtype).cpu(), value.cpu())):
                error_msgs.append(f"{key!r} is a constant of the ONNX graph that a fusion folded away (the module "
                                  f"computes with {value.flatten()[:4].tolist()}), but the state_dict holds another "
                                  f"value: convert with the fusions off, or drop the key from the state_dict")


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    holder = getattr(gm, "weights", None)
    if holder is None:
        return
    for name in list(dict(holder.named_parameters(recurse=False))) + list(dict(holder.named_buffers(recurse=False))):
        if f"weights.{name}" not in used:
            delattr(holder, name)
            gm.mmbridge_sources.pop(f"weights.{name}", None)


def parameter_count(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar values in ``module``'s parameters (``requires_grad`` ones by default)."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def frozen_parameters(module: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad=False`` (what DDP would not synchronise)."""
    return [n for n, p in module.named_parameters() if not p.requires_grad]


# modules that live with their converters (importing them loads onnx2torch, so only on first use)
_MOVED = {"BatchNorm1d": "normalization", "BatchNorm2d": "normalization", "BatchNorm3d": "normalization",
          "BatchNorm": "normalization", "Reshape": "shape", "ResizeToSize": "resize", "SamePad": "pad"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"mmbridge.convert.ops.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["to_torch", "check_supported", "Linear", "parameter_count", "frozen_parameters", "WEIGHT_INPUTS", "STATE_INPUTS",
           *_MOVED]
