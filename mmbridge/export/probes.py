"""Probe inputs: edge values per op, fed at the graph inputs and checked on every backend at export.

The parity check at export runs the user's sample (or drawn samples). Ops that are exact on typical
values but wrong on edge values pass it: integer ``FloorDiv`` on negatives, ``OneHot`` with negative
or out-of-range ids, ``ScatterNd`` with repeated indices, ``Slice`` / ``MatrixBandPart`` with a
``-1`` given at run time, ``.5`` ties for rounding ops, bfloat16 casts (issue 18). This module makes
the next such bug a refusal instead of a silent pass:

1. **Table** (:data:`PROBE_RULES`, data-driven; :func:`register_probe_rule` adds one): TF op type
   (or ONNX op type, for graphs given without a TF ``graph_def``) -> which input slot of the op the
   values are for -> probe cases (named lists of edge values), computed from the node (a constant
   ``depth`` / ``shape`` / ``boundaries``) and the dtype of the graph input.
2. **Reach**: for each node of a table op, the graph inputs whose *values* flow into the slot
   (walking producers back; ``Shape`` / ``Size`` / ``Rank`` cut the walk, since there only the
   input's shape matters). Those inputs get the rule's cases; every input also gets generic per-dtype
   cases (zeros; small signed values with ``.5`` ties and ``-0.0``; the ends of its ``value_range``;
   the extremes of an integer dtype when only elementwise ops read the input; ASCII and non-ASCII
   strings). A rule with ``direct_only`` (NaN / inf) applies only when the input reaches the slot
   through pass-through ops (Identity, Cast, Reshape...), so a NaN never reaches a reduction.
3. **Plan**: at most :data:`MAX_PROBES` runs; run ``i`` feeds every input its case ``i`` (cycled),
   at the sample's shape or at a second shape where the spec has dynamic dims (size ``d`` -> ``1``
   for ``d <= 2``, else ``d // 2 + 1``; size 1 -> 3): size-1 and odd sizes, crops larger than the
   input.
4. **Check** (:func:`run_probes`): TensorFlow (the reference) and each backend runner on every
   probe. Where TF raises (e.g. an out-of-range ``gather`` on CPU), TF defines no value: the probe is
   skipped and recorded. Outputs are compared with :func:`mmbridge.parity.compare` (NaN == NaN,
   inf == inf at the same positions; the tolerance table, with at least the table's relative term
   for large values). A mismatch is a :class:`~mmbridge.errors.ProbeError` naming the op type(s) the probe targeted, the input, the probe values, TF's
   and the backend's output, and what to do. A backend that raises where TF gives a value fails
   loudly, not silently: it is recorded (``backend_raised``) and logged as a warning.

Where this comes from: the edge values are those of the silent bugs of issue 18 (found by running
tf2onnx's own ``tests/test_backend.py`` cases through the exporter) and the numeric conventions of
the TF op docs (``tf.math.floordiv``, ``tf.one_hot``, ``tf.scatter_nd``, ``tf.slice``,
``tf.linalg.band_part``, ``tf.round``: half to even).

What probes do not cover: see docs/known-limits.md ("Probe inputs").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmbridge.errors import ProbeError
from mmbridge.parity import ParityReport, compare, tolerance_for
from mmbridge.specs import TensorSpec, Tolerance, is_padding_mask, padding_mask_sample

logger = logging.getLogger("mmbridge.export")

MAX_PROBES = 8
"""At most this many probe runs per export (each runs TF and every backend once)."""

Feeds = Mapping[str, np.ndarray]
Runner = Callable[[Feeds], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a rule's case generator may read about the node it targets.

    Attributes:
        op: the op type (TF, or ONNX when the graph was given without a TF ``graph_def``).
        node: the node name.
        dtype: numpy dtype name of the graph input that will carry the values (``"int32"``,
            ``"float32"``, ``"string"``...); the values are cast to it.
        consts: the node's constant inputs by slot (``numpy`` arrays), e.g. ``OneHot``'s depth.
        attrs: the node's attributes as plain Python values (``Cast``'s ``DstT`` as a dtype name,
            ``Bucketize``'s ``boundaries`` as a list of floats).
    """

    op: str
    node: str
    dtype: str
    consts: Mapping[int, np.ndarray]
    attrs: Mapping[str, Any]

    def const_int(self, slot: int) -> int | None:
        """The constant input at ``slot`` as one int (its first element), or ``None``."""
        v = self.consts.get(slot)
        if v is None or v.size == 0 or v.dtype.kind not in "iu":
            return None
        return int(v.reshape(-1)[0])


Case = tuple[str, list[Any]]
"""``(label, values)``: one probe case; the values are cycled to fill the input's shape."""


@dataclasses.dataclass(frozen=True)
class ProbeRule:
    """One row of the probe table.

    Args:
        ops: op types the rule applies to (TF types such as ``"FloorDiv"``; ONNX types such as
            ``"Div"`` apply when :func:`run_probes` inspects the ONNX graph).
        slot: the op input the values are for (0-based).
        cases: ``RuleContext -> [(label, values), ...]``; ``[]`` when the rule does not apply to
            this node or dtype.
        why: the bug class the rule looks for (reported in meta and in refusals).
        direct_only: apply only when the input reaches the slot through pass-through ops
            (:data:`PASS_THROUGH`); for values such as NaN that other ops would turn into
            backend-defined results.
        avoid_zero: the slot is an integer divisor: the generic cases of an input that reaches it
            carry no 0 (TF refuses an integer division by zero, so such a probe would only be skipped).
    """

    ops: tuple[str, ...]
    slot: int
    cases: Callable[[RuleContext], list[Case]]
    why: str
    direct_only: bool = False
    avoid_zero: bool = False


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _ints(values: list[int]) -> Callable[[RuleContext], list[Case]]:
    def cases(ctx: RuleContext) -> list[Case]:
        return [(f"{ctx.op} edge integers", _fit(values, ctx.dtype))] if _is_int(ctx.dtype) else []

    return cases


def _fit(values: list[Any], dtype: str) -> list[Any]:
    """``values`` that the integer ``dtype`` can hold (unsigned: the non-negative ones)."""
    if not _is_int(dtype):
        return values
    info = np.iinfo(np.dtype(dtype))
    return [v for v in values if info.min <= v <= info.max] or [0]


_DIVIDENDS = [-7, 7, -1, 5, 0, -9, 9, -3, -8, 8, 1, -6]
_DIVISORS = [2, -2, 3, -3, 4, 3, -4, -5, 1, -1, 5, 7]  # never 0: an integer division by 0 may kill the process
_TIES = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, -0.0, 3.5, -3.5, 0.49999997, 1.0]


def _one_hot_ids(ctx: RuleContext) -> list[Case]:
    if not _is_int(ctx.dtype):
        return []
    d = ctx.const_int(1) or 4
    return [("OneHot ids outside [0, depth)", _fit([-1, 0, d - 1, d, d + 3, -d, -d - 1, 1], ctx.dtype))]


def _gather_indices(ctx: RuleContext) -> list[Case]:
    if not _is_int(ctx.dtype):
        return []
    params = ctx.consts.get(0)
    axis = ctx.const_int(2) or 0
    n = int(params.shape[axis]) if params is not None and params.ndim > axis else None
    if n is None:
        return [("gather indices incl. negative", _fit([0, 1, -1, 2, 0], ctx.dtype))]
    return [("gather indices at the ends", _fit([0, n - 1, 1, n - 2, 0], ctx.dtype)),
            ("gather indices negative / out of range", _fit([-1, n, -n, 0], ctx.dtype))]


def _scatter_indices(ctx: RuleContext) -> list[Case]:
    if not _is_int(ctx.dtype):
        return []
    n = ctx.const_int(2) or 2
    return [("ScatterNd repeated indices", _fit([0, 0, n - 1, n - 1, 0, 1 % n], ctx.dtype))]


def _slice_begin(ctx: RuleContext) -> list[Case]:
    return [("Slice begin >= 2", _fit([2, 1, 0, 3], ctx.dtype))] if _is_int(ctx.dtype) else []


def _minus_one(label: str, rest: list[int]) -> Callable[[RuleContext], list[Case]]:
    def cases(ctx: RuleContext) -> list[Case]:
        return [(label, _fit([-1, *rest], ctx.dtype))] if _is_int(ctx.dtype) and not ctx.dtype.startswith("u") else []

    return cases


def _ties(ctx: RuleContext) -> list[Case]:
    return [(f"{ctx.op} .5 ties", _TIES)] if _is_float(ctx.dtype) else []


def _cast_values(ctx: RuleContext) -> list[Case]:
    if not _is_float(ctx.dtype):
        return []
    dst = str(ctx.attrs.get("DstT") or ctx.attrs.get("to") or "")
    if dst in ("bfloat16", "float16"):
        # 1 + 2^-8 is a bf16 tie (rounds to even: 1.0), 1 + 2^-10 is exact in f16 but not bf16,
        # 7e4 overflows f16 but not bf16, 3e-6 is subnormal in f16
        return [(f"Cast to {dst}: values that tell bfloat16 from float16",
                 [1.00390625, 1.0009765625, 70000.0, -70000.0, 3e-6, 0.1, -2.5, 1.0])]
    if dst.startswith(("int", "uint", "bool")):
        return [(f"Cast to {dst}: .5 ties and fractions", [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.999, -0.999])]
    return []


def _bucketize_values(ctx: RuleContext) -> list[Case]:
    b = [float(x) for x in (ctx.attrs.get("boundaries") or [])]
    if not b or not (_is_float(ctx.dtype) or _is_int(ctx.dtype)):
        return []
    mids = [(x + y) / 2 for x, y in zip(b, b[1:])]
    vals = [*b, *mids, b[0] - 1.0, b[-1] + 1.0]
    if _is_int(ctx.dtype):
        vals = sorted({int(np.floor(v)) for v in vals} | {int(np.ceil(v)) for v in vals})
    return [("Bucketize values on the boundaries", vals)]


def _nonfinite(ctx: RuleContext) -> list[Case]:
    return [("NaN / inf in a selected branch", [float("nan"), float("inf"), -float("inf"), 1.0, 0.0, -1.0])] \
        if _is_float(ctx.dtype) else []


def _bincount_ids(ctx: RuleContext) -> list[Case]:
    if not _is_int(ctx.dtype):
        return []
    n = ctx.const_int(1) or 4
    return [("bincount ids repeated and at the ends", _fit([0, 0, n - 1, n - 1, 1 % n, 0], ctx.dtype)),
            ("bincount ids outside [0, size)", _fit([-1, n, 0, n + 2], ctx.dtype))]


def _crop_boxes(ctx: RuleContext) -> list[Case]:
    return [("CropAndResize boxes on half pixels", [0.0, 0.25, 0.5, 1.0, 0.125, 0.75, 0.5, 0.5])] \
        if _is_float(ctx.dtype) else []


_INT_DIV = ("FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod", "Div", "Mod", "RealDiv")

#: The probe table. Order matters only for the order of cases on an input.
PROBE_RULES: list[ProbeRule] = [
    ProbeRule(_INT_DIV, 0, _ints(_DIVIDENDS), "integer division / modulo must round toward -inf (TF floordiv)"),
    ProbeRule(_INT_DIV, 1, _ints(_DIVISORS), "negative divisors (the result takes the divisor's sign)",
              avoid_zero=True),
    ProbeRule(("OneHot",), 0, _one_hot_ids, "TF gives an all-off row for ids outside [0, depth); ONNX wraps -1"),
    ProbeRule(("GatherV2", "Gather", "ResourceGather", "GatherNd"), 1, _gather_indices,
              "indices at the ends of the axis (TF CPU raises on negative / out-of-range ones: skipped)"),
    ProbeRule(("ScatterNd", "ScatterND"), 0, _scatter_indices, "TF adds the updates of repeated indices"),
    ProbeRule(("Slice",), 1, _slice_begin, "runtime begin >= 2 (with size -1 it overflowed int32)"),
    ProbeRule(("Slice",), 2, _minus_one("Slice size -1 at run time", [-1, 1, 2]), "runtime size -1 means 'to the end'"),
    ProbeRule(("StridedSlice",), 1, _minus_one("StridedSlice negative begin", [-2, 0, 1]), "negative begin"),
    ProbeRule(("StridedSlice",), 2, _minus_one("StridedSlice negative end", [-2, 0, 2]), "negative end"),
    ProbeRule(("MatrixBandPart",), 1, _minus_one("band_part bound -1 at run time", [0, 1, 2]),
              "a runtime -1 bound keeps the whole triangle"),
    ProbeRule(("MatrixBandPart",), 2, _minus_one("band_part bound -1 at run time", [0, 1, 2]),
              "a runtime -1 bound keeps the whole triangle"),
    ProbeRule(("Round", "Rint", "Floor", "Ceil"), 0, _ties, "TF rounds half to even; floor/ceil at ties and -0.0"),
    ProbeRule(("Cast",), 0, _cast_values, "float -> int truncates; bfloat16 is not float16"),
    ProbeRule(("Bucketize",), 0, _bucketize_values, "a value on a boundary goes to the bucket above it (TF)"),
    ProbeRule(("SelectV2", "Select", "Where"), 1, _nonfinite,
              "the unselected branch's NaN / inf must not leak (cond * t + !cond * e does)", direct_only=True),
    ProbeRule(("SelectV2", "Select", "Where"), 2, _nonfinite,
              "the unselected branch's NaN / inf must not leak (cond * t + !cond * e does)", direct_only=True),
    ProbeRule(("Bincount", "DenseBincount", "RaggedBincount"), 0, _bincount_ids,
              "repeated ids add up; ids outside [0, size) are dropped or refused"),
    ProbeRule(("RaggedBincount",), 1, _bincount_ids, "repeated ids add up; ids outside [0, size) are dropped"),
    ProbeRule(("CropAndResize",), 1, _crop_boxes, "nearest rounds .5 ties up in TF"),
]


def register_probe_rule(rule: ProbeRule) -> ProbeRule:
    """Add a row to :data:`PROBE_RULES` (e.g. for an op a new handler or rewrite covers); returns it.

    Raises:
        TypeError: ``rule`` is not a :class:`ProbeRule`.
    """
    if not isinstance(rule, ProbeRule):
        raise TypeError(f"register_probe_rule: expected a ProbeRule, got {type(rule).__name__}")
    PROBE_RULES.append(rule)
    return rule


#: Ops through which a value reaches the next op unchanged (for ``direct_only`` rules).
PASS_THROUGH = frozenset({"Identity", "IdentityN", "Cast", "Reshape", "ExpandDims", "Squeeze", "Unsqueeze",
                          "Transpose", "ConcatV2", "Concat", "Pack", "StopGradient", "Flatten", "Tile", "Expand",
                          "BroadcastTo", "PlaceholderWithDefault", "EnsureShape"})
#: Ops whose output depends only on the shape of their input: the value walk stops there.
SHAPE_OF = frozenset({"Shape", "ShapeN", "Size", "Rank"})
#: Elementwise ops that are safe to feed the extremes of an integer dtype (no allocation sized by
#: the value, no division by the value).
EXTREME_SAFE = frozenset({"Identity", "Cast", "Add", "AddV2", "Sub", "Mul", "Neg", "Abs", "Maximum", "Minimum",
                          "Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "Sign", "Square",
                          "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Reshape", "ExpandDims", "Squeeze", "Unsqueeze",
                          "Transpose", "ConcatV2", "Concat", "Pack", "SelectV2", "Select", "Where", "Max", "Min",
                          "ClipByValue", "Clip", "Bucketize", "LookupTableFindV2", "StringToHashBucketFast",
                          "AsString", "Shape", "Size", "Rank", "Sum", "ReduceSum", "Prod", "ArgMax", "ArgMin",
                          "LogicalAnd", "LogicalOr", "LogicalNot", "And", "Or", "Not", "StopGradient"})


# ---------------------------------------------------------------------------------------------
# the graph: TF graph_def or ONNX, as nodes with value inputs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]  # tensor names ("" for an omitted optional input)
    outputs: list[str]
    attrs: dict[str, Any]


@dataclasses.dataclass
class _Graph:
    kind: str  # "tf" or "onnx"
    nodes: list[_Node]
    consts: dict[str, np.ndarray]
    inputs: dict[str, str]  # tensor name -> spec name

    def producer(self) -> dict[str, _Node]:
        return {t: n for n in self.nodes for t in n.outputs}


def _tf_dtype_name(enum: int) -> str:
    from tensorflow.python.framework import dtypes

    try:
        return dtypes.as_dtype(enum).name
    except TypeError:  # pragma: no cover - an enum TF does not know
        return str(enum)


def _from_graph_def(graph_def: Any, inputs: Mapping[str, str]) -> _Graph:
    from tensorflow.python.framework import tensor_util

    nodes, consts = [], {}
    for nd in graph_def.node:
        ins = [(i if ":" in i else f"{i}:0") for i in nd.input if not i.startswith("^")]
        attrs: dict[str, Any] = {}
        for k, a in nd.attr.items():
            which = a.WhichOneof("value")
            if which == "type":
                attrs[k] = _tf_dtype_name(a.type)
            elif which == "list":
                attrs[k] = list(a.list.f) or list(a.list.i)
            elif which in ("i", "f", "b"):
                attrs[k] = getattr(a, which)
            elif which == "s":
                attrs[k] = a.s.decode(errors="replace")
        if nd.op == "Const":
            try:
                consts[f"{nd.name}:0"] = tensor_util.MakeNdarray(nd.attr["value"].tensor)
            except Exception:  # noqa: BLE001 - a constant we cannot read is simply not used by the rules
                pass
        # a TF node's outputs are "name:k"; the rules only need the ones other nodes read
        nodes.append(_Node(nd.name, nd.op, ins, [], attrs))
    used = {i for n in nodes for i in n.inputs}
    by_name = {n.name: n for n in nodes}
    for t in used:
        base = t.rsplit(":", 1)[0]
        if base in by_name:
            by_name[base].outputs.append(t)
    names = {(k if ":" in k else f"{k}:0"): v for k, v in inputs.items()}
    return _Graph("tf", nodes, consts, names)


def _from_onnx(model: Any, inputs: Sequence[str]) -> _Graph:
    from onnx import helper, numpy_helper

    g = model.graph
    consts = {}
    for init in g.initializer:
        try:
            consts[init.name] = numpy_helper.to_array(init)
        except Exception:  # noqa: BLE001 - unreadable initializers are not used by the rules
            pass
    nodes = []
    for nd in g.node:
        attrs = {}
        for a in nd.attribute:
            v = helper.get_attribute_value(a)
            attrs[a.name] = v.decode(errors="replace") if isinstance(v, bytes) else v
        if "to" in attrs and isinstance(attrs["to"], int):
            try:
                attrs["to"] = helper.tensor_dtype_to_np_dtype(attrs["to"]).name
            except Exception:  # noqa: BLE001 - bfloat16 and other dtypes numpy lacks
                from onnx import TensorProto

                attrs["to"] = {TensorProto.BFLOAT16: "bfloat16"}.get(attrs["to"], str(attrs["to"]))
        if nd.op_type == "Constant" and nd.attribute:
            try:
                consts[nd.output[0]] = numpy_helper.to_array(helper.get_attribute_value(nd.attribute[0]))
            except Exception:  # noqa: BLE001 - non-tensor constants are not used by the rules
                pass
        nodes.append(_Node(nd.name, nd.op_type, list(nd.input), list(nd.output), attrs))
    return _Graph("onnx", nodes, consts, {n: n for n in inputs})


def _reach(graph: _Graph) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """``(reach, direct)``: per tensor, the graph inputs whose values flow into it (through any op
    but the shape-of ops) and those that flow in through :data:`PASS_THROUGH` ops only."""
    prod = graph.producer()
    reach: dict[str, frozenset[str]] = {}
    direct: dict[str, frozenset[str]] = {}
    for t, name in graph.inputs.items():
        reach[t] = direct[t] = frozenset({name})
    empty: frozenset[str] = frozenset()

    def visit(root: str) -> None:
        stack = [root]
        while stack:
            t = stack[-1]
            if t in reach:
                stack.pop()
                continue
            node = prod.get(t)
            if node is None or node.op in SHAPE_OF or node.op in ("Const", "Constant"):
                reach[t] = direct[t] = empty
                stack.pop()
                continue
            todo = [i for i in node.inputs if i and i not in reach]
            if todo:
                stack.extend(todo)
                continue
            r = frozenset().union(*[reach[i] for i in node.inputs if i]) if node.inputs else empty
            d = (frozenset().union(*[direct[i] for i in node.inputs if i]) if node.inputs else empty) \
                if node.op in PASS_THROUGH else empty
            for out in node.outputs or [t]:
                reach[out], direct[out] = r, d
            reach[t], direct[t] = r, d
            stack.pop()

    for node in graph.nodes:
        for i in node.inputs:
            if i and i not in reach:
                visit(i)
    return reach, direct


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _InputCase:
    label: str
    values: Any  # a list (cycled) or a callable shape -> array
    targets: tuple[str, ...] = ()  # "OpType 'node'" the case is for ("" for generic cases)


def _generic_cases(spec: TensorSpec, extremes_ok: bool, avoid_zero: bool = False) -> list[_InputCase]:
    cases = _generic(spec, extremes_ok)
    if avoid_zero and _is_int(spec.dtype):
        cases = [c if callable(c.values) else _InputCase(c.label + " (no 0: an integer divisor)",
                                                         [v if v != 0 else 1 for v in c.values], c.targets)
                 for c in cases if c.label != "zeros"]
    return cases


def _generic(spec: TensorSpec, extremes_ok: bool) -> list[_InputCase]:
    dt = spec.dtype
    out: list[_InputCase] = []
    if is_padding_mask(spec):
        return [_InputCase("padding mask (1s then 0s)", lambda shape: padding_mask_sample(
            dataclasses.replace(spec, shape=tuple(shape)), shape[0], 7)), _InputCase("all ones", [1])]
    lo, hi = spec.value_range if spec.value_range else (None, None)
    if dt == "string":
        return [_InputCase("ASCII strings: empty, case, punctuation, spaces",
                           ["", "a", "Hello, World!", "  two  words ", "[UNK]", "0", "-1", "ABC def"]),
                _InputCase("non-ASCII strings", ["é", "Straße", "日本語", "naïve café", "", "ÉCOLE"])]
    if dt == "bool":
        return [_InputCase("bools", [True, False, False, True])]
    if _is_float(dt):
        if lo is not None:
            mid = (lo + hi) / 2
            out.append(_InputCase("value_range ends and .5 ties", [lo, hi, mid, lo + (hi - lo) / 4, hi, lo]))
        out.append(_InputCase("small signed values, .5 ties, -0.0", [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 1.0, -1.0,
                                                                    2.0, 0.25, -0.75, 3.5]))
        out.append(_InputCase("zeros", [0.0]))
        return out
    if _is_int(dt):
        if lo is not None:
            ilo, ihi = int(lo), int(hi)
            out.append(_InputCase("value_range ends", _fit([ilo, ihi, ilo + 1, max(ihi - 1, ilo), ilo, ihi], dt)))
        out.append(_InputCase("zeros", [0]))
        out.append(_InputCase("small signed integers", _fit([0, 1, -1, 2, -2, 3, 7, -7, 100, -100], dt)))
        if extremes_ok:
            info = np.iinfo(np.dtype(dt))
            # -max, not min: min // -1 overflows and may kill the process
            out.append(_InputCase(f"{dt} extremes", [int(info.max), int(-info.max) if info.min < 0 else 0,
                                                     int(info.max) - 1, 0, 1]))
        return out
    return [_InputCase("zeros", [0])]


def _alt_size(d: int) -> int:
    return 3 if d <= 1 else (1 if d <= 2 else d // 2 + 1)


def _shapes(specs: Sequence[TensorSpec], samples: Feeds, room: int) -> list[dict[str, tuple[int, ...]]]:
    """The base shape (the sample's, with its first dynamic size grown so that ``room`` values fit
    where the sample holds fewer; sizes equal in the sample stay equal) and the second shape
    (:func:`_alt_size` of each dynamic size), when the specs have dynamic dims."""
    base = sample = {s.name: tuple(np.shape(samples[s.name])) for s in specs}
    grow: dict[int, int] = {}
    for s in specs:
        shape = base[s.name]
        dyn = [i for i, d in enumerate(shape) if i < len(s.shape) and not isinstance(s.shape[i], int)]
        size = int(np.prod(shape)) if shape else 1
        if dyn and 0 < size < room and shape[dyn[0]] not in grow:
            d = shape[dyn[0]]
            grow[d] = -(-room * d // size)  # ceil: the other dims stay
    if grow:
        base = {s.name: tuple(grow.get(d, d) if (i < len(s.shape) and not isinstance(s.shape[i], int)) else d
                              for i, d in enumerate(base[s.name])) for s in specs}
    alt = {}
    for s in specs:
        shape = sample[s.name]
        alt[s.name] = tuple(_alt_size(d) if (i < len(s.shape) and not isinstance(s.shape[i], int)) else d
                            for i, d in enumerate(shape))
    return [base] if alt == base or alt == sample and not grow else [base, alt]


def _cycle(vals: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``vals`` repeated (row-major) to fill ``shape``; a scalar takes the first value."""
    if not shape:
        return np.array(vals.reshape(-1)[0], dtype=vals.dtype)
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype=vals.dtype)
    return np.resize(vals, shape)


def _fill(case: _InputCase, spec: TensorSpec, shape: tuple[int, ...], sample: np.ndarray) -> np.ndarray:
    """The probe array of one input: the case's values at ``shape``, of the sample's dtype."""
    if callable(case.values):
        arr = np.asarray(case.values(shape))
        return arr.astype(sample.dtype) if arr.dtype != sample.dtype else arr
    if spec.dtype == "string":
        as_bytes = sample.dtype.kind == "S" or (sample.size and isinstance(sample.reshape(-1)[0], bytes))
        vals = np.array([v.encode() if as_bytes else v for v in case.values], dtype=object)
        arr = _cycle(vals, shape)
        return arr.astype(sample.dtype) if sample.dtype.kind in "SU" else arr
    dtype = sample.dtype
    vals = np.asarray(case.values, dtype=np.float64 if dtype.kind == "f" or dtype.name == "bfloat16" else None)
    with np.errstate(invalid="ignore", over="ignore"):
        return _cycle(vals, shape).astype(dtype, order="C")  # not ascontiguousarray: it makes a scalar 1-D


@dataclasses.dataclass
class ProbePlan:
    """What :func:`plan_probes` decided: the targeted ops and the probe feeds.

    Attributes:
        targets: one entry per (node, slot, input) a rule applies to: ``{"op", "node", "slot",
            "input", "rule", "direct"}``.
        probes: per probe run ``{"feeds": {input: array (TF layout)}, "cases": {input: label},
            "targets": [op type + node...], "shape": {input: shape}}``.
    """

    targets: list[dict[str, Any]]
    probes: list[dict[str, Any]]


def plan_probes(specs: Sequence[TensorSpec], samples: Feeds, *, graph_def: Any = None,
                input_tensors: Mapping[str, str] | None = None, model: Any = None,
                max_probes: int = MAX_PROBES) -> ProbePlan:
    """Derive the probe feeds of a graph from the probe table (:data:`PROBE_RULES`).

    Args:
        specs: the graph inputs (TF layout: NHWC images).
        samples: the export's sample inputs by spec name (their shapes and dtypes are the probes'
            base shape and dtype).
        graph_def: the frozen TF ``GraphDef`` (preferred: TF op types); with ``input_tensors``
            mapping its placeholder tensor names (``"x:0"``) to spec names.
        input_tensors: see ``graph_def``.
        model: the ``onnx.ModelProto``, inspected (ONNX op types) when no ``graph_def`` is given.
        max_probes: at most this many probe runs.

    Returns:
        A :class:`ProbePlan`.

    Raises:
        ValueError: neither ``graph_def`` nor ``model`` given.
    """
    if graph_def is not None:
        graph = _from_graph_def(graph_def, input_tensors or {f"{s.name}:0": s.name for s in specs})
    elif model is not None:
        graph = _from_onnx(model, [s.name for s in specs])
    else:
        raise ValueError("plan_probes: give graph_def= (the frozen TF graph) or model= (the ONNX model)")
    by_name = {s.name: s for s in specs}
    reach, direct = _reach(graph)
    targeted: dict[str, list[_InputCase]] = {s.name: [] for s in specs}
    targets: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()  # (input, op, case label): one case per op type and input
    no_zero: set[str] = set()
    for node in graph.nodes:
        rules = [r for r in PROBE_RULES if node.op in r.ops]
        for rule in rules:
            if rule.slot >= len(node.inputs) or not node.inputs[rule.slot]:
                continue
            t = node.inputs[rule.slot]
            names = direct.get(t, frozenset()) if rule.direct_only else reach.get(t, frozenset())
            if not names:
                continue
            consts = {i: graph.consts[x] for i, x in enumerate(node.inputs) if x in graph.consts}
            for name in sorted(names):
                spec = by_name[name]
                ctx = RuleContext(node.op, node.name, spec.dtype, consts, node.attrs)
                cases = rule.cases(ctx)
                if not cases:
                    continue
                if rule.avoid_zero:
                    no_zero.add(name)
                targets.append({"op": node.op, "node": node.name, "slot": rule.slot, "input": name,
                                "rule": rule.why, "direct": name in direct.get(t, frozenset())})
                for label, values in cases:
                    key = (name, node.op, label)
                    if key in seen:
                        continue
                    seen.add(key)
                    targeted[name].append(_InputCase(label, list(values), (f"{node.op} {node.name!r}",)))
    # which ops read each input's values (for the integer extremes)
    cone: dict[str, set[str]] = {s.name: set() for s in specs}
    for node in graph.nodes:
        for i in node.inputs:
            for name in reach.get(i, ()):
                cone[name].add(node.op)
    per_input: dict[str, list[_InputCase]] = {}
    for s in specs:
        generic = _generic_cases(s, extremes_ok=bool(cone[s.name]) and cone[s.name] <= EXTREME_SAFE,
                                 avoid_zero=s.name in no_zero)
        per_input[s.name] = targeted[s.name] + generic
    room = max((len(c.values) for cs in per_input.values() for c in cs if not callable(c.values)), default=1)
    shapes = _shapes(specs, samples, room)
    n_cases = max(len(c) for c in per_input.values())
    pairs = [(c, c % len(shapes)) for c in range(n_cases)]
    if len(shapes) > 1:
        pairs += [(c, (c + 1) % len(shapes)) for c in range(n_cases)]
    pairs = pairs[:max_probes]
    probes = []
    for c, si in pairs:
        feeds, labels, tg = {}, {}, []
        for s in specs:
            cases = per_input[s.name]
            case = cases[c % len(cases)]
            feeds[s.name] = _fill(case, s, shapes[si][s.name], np.asarray(samples[s.name]))
            labels[s.name] = case.label
            tg += [f"{t} via input {s.name!r}" for t in case.targets]
        probes.append({"feeds": feeds, "cases": labels, "targets": tg,
                       "shape": {k: list(v) for k, v in shapes[si].items()}})
    return ProbePlan(targets, probes)


# ---------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------
def _items(flat: np.ndarray) -> list[Any]:
    """Plain Python values for messages: floats to 7 significant digits, bytes decoded."""
    out = []
    for x in flat.tolist():
        if isinstance(x, bytes):
            x = x.decode(errors="replace")
        elif isinstance(x, float) and np.isfinite(x):
            x = float(f"{x:.7g}")
        out.append(x)
    return out


def _short(a: Any, n: int = 8) -> str:
    """``[v0, v1, ...] (+k more; shape [..] dtype)``: a short form of an array for messages."""
    a = np.asarray(a)
    items = _items(a.reshape(-1)[:n])
    more = f" +{a.size - n} more" if a.size > n else ""
    return f"{items}{more} (shape {list(a.shape)}, {a.dtype.name})"


def _diff_at(got: Any, ref: Any, n: int = 6) -> str:
    """The first ``n`` differing elements: ``TF [..] vs backend [..] at flat positions [..]``."""
    g, r = np.asarray(got), np.asarray(ref)
    if g.shape != r.shape:
        return f"TF gives {_short(r)}, the backend {_short(g)}"
    try:
        if r.dtype.kind in "fc":
            gf, rf = g.astype(np.float64), r.astype(np.float64)
            with np.errstate(invalid="ignore"):
                bad = ~((gf == rf) | (np.isnan(gf) & np.isnan(rf)) | (np.abs(gf - rf) <= 1e-5 + 1e-4 * np.abs(rf)))
        else:
            bad = np.asarray(g != r)
    except (TypeError, ValueError):
        bad = np.ones(r.shape, bool)
    idx = np.flatnonzero(bad.reshape(-1))[:n]
    if not idx.size:
        return f"TF gives {_short(r)}, the backend {_short(g)}"

    def pick(a: np.ndarray) -> list[Any]:
        return _items(a.reshape(-1)[idx])

    return f"at flat positions {idx.tolist()}: TF gives {pick(r)}, the backend {pick(g)} (shape {list(r.shape)})"


def _stage(backend: str) -> str:
    return "onnx" if backend.startswith("ort") else "torch"


def _probe_tolerance(tol: Tolerance | None, backend: str) -> Tolerance | None:
    """The caller's tolerance with at least the table's relative term (probe values can be large)."""
    if tol is None:
        return None
    rtol = tolerance_for(_stage(backend), "float32").rtol
    if tol.rtol >= rtol:
        return tol
    return Tolerance(tol.atol, rtol, f"{tol.reason} (probes: relative term {rtol:g} of the table added)")


def run_probes(model: Any, specs: Sequence[TensorSpec], reference: Runner, runners: Mapping[str, Runner], *,
               samples: Feeds, name: str = "bridge", graph_def: Any = None,
               input_tensors: Mapping[str, str] | None = None, nchw: Sequence[str] = (),
               tolerance: Tolerance | None = None, max_probes: int = MAX_PROBES,
               raise_on_failure: bool = True, refuse_backend_errors: bool = False,
               out_keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Feed the probe inputs (:func:`plan_probes`) to TF and to every backend; refuse on a mismatch.

    Args:
        model: the exported ``onnx.ModelProto`` (inspected when no ``graph_def`` is given).
        specs: the graph inputs in TF layout (NHWC).
        reference: TensorFlow: ``{input: array (TF layout)} -> {output: array}``, or, with
            ``out_keys``, the exporter's traced function (``src.fn``: one positional tensor per
            spec; its flattened outputs are named ``out_keys``). An exception means TF defines no
            value there: the probe is skipped.
        runners: backend name -> ``{input: array (ONNX layout)} -> {output: array}``; ``"ort..."``
            names are compared at the table's ``"onnx"`` stage, others at ``"torch"``.
        samples: the export's sample inputs (base shapes and dtypes of the probes).
        name: the artifact name, for messages.
        graph_def, input_tensors: the frozen TF graph and its placeholder tensor -> spec name map.
        nchw: inputs the ONNX graph takes as NCHW (transposed from NHWC for the runners).
        tolerance: the export's tolerance for floating outputs (``None``: the table), given at
            least the table's relative term.
        max_probes: at most this many probe runs.
        out_keys: the output names of a TF ``reference`` called positionally (see ``reference``).
        raise_on_failure: raise :class:`ProbeError` on a mismatch (else only record it).
        refuse_backend_errors: a backend that raises where TF gives a value is a failure too;
            by default it is recorded (``"status": "backend_raised"``) and logged as a warning: it
            fails loudly at run time, it does not give a wrong value.

    Returns:
        The record for ``meta.json``: ``{"passed", "runs", "targets": [op types probed], "probes":
        [{"cases", "shape", "targets", "status": "passed" | "skipped" | "failed", "reason"?}],
        "skipped", "failures", "seconds"}``.

    Raises:
        ProbeError: a backend's output differs from TF's on a probe (beyond the tolerance; NaN == NaN
            and inf == inf), or (``refuse_backend_errors``) a backend raises where TF gives a value. The message names the op
            type(s) the probe targeted, the input(s), the probe values, TF's and the backend's
            output, and what to do.
    """
    t0 = time.perf_counter()
    if out_keys is not None:
        reference = _positional_tf(reference, specs, out_keys)
    plan = plan_probes(specs, samples, graph_def=graph_def, input_tensors=input_tensors, model=model,
                       max_probes=max_probes)
    records, failures, reports = [], [], []
    for i, probe in enumerate(plan.probes):
        feeds = probe["feeds"]
        rec = {"index": i, "cases": probe["cases"], "shape": probe["shape"], "targets": probe["targets"]}
        records.append(rec)
        try:
            ref = {k: np.asarray(v) for k, v in reference(feeds).items()}
        except Exception as exc:  # noqa: BLE001 - TF raising (InvalidArgumentError...) means: no value defined
            rec.update(status="skipped", reason=f"TensorFlow raised {type(exc).__name__}: {_first_line(exc)}")
            continue
        onnx_feeds = {k: (np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2))) if k in nchw else v)
                      for k, v in feeds.items()}
        problems, raised = [], []
        for backend, run in runners.items():
            try:
                got = run(onnx_feeds)
            except Exception as exc:  # noqa: BLE001 - any backend error on an input TF accepts is recorded
                (problems if refuse_backend_errors else raised).append(
                    f"{backend} raised {type(exc).__name__}: {_first_line(exc)} where TensorFlow gives "
                    f"{', '.join(f'{k}={_short(v, 6)}' for k, v in ref.items())}")
                continue
            with np.errstate(invalid="ignore"):  # inf - inf in compare's difference: positions are compared apart
                rows = compare(got, ref, backend=backend, stage=_stage(backend),
                               tolerance=_probe_tolerance(tolerance, backend))
            bad = [r for r in rows if not r.passed]
            if bad:
                reports += bad
                for r in bad:
                    what = r.problem or f"max_abs {r.max_abs:.3g}, needs atol {r.required_atol:.3g} at rtol {r.tolerance.rtol:g}"
                    problems.append(f"{backend} output {r.output!r} ({what}) {_diff_at(got.get(r.output), ref[r.output])}")
        if problems:
            rec.update(status="failed", reason="; ".join(problems + raised))
            failures.append((rec, feeds))
        elif raised:
            rec.update(status="backend_raised", reason="; ".join(raised),
                       inputs={k: _short(v) for k, v in feeds.items()})
            logger.warning("export %s: probe %d: a backend raises on an input TensorFlow accepts (a loud failure at "
                           "run time, not a wrong value; recorded in meta.json 'probes'): %s; inputs: %s", name, i,
                           rec["reason"], rec["inputs"])
        else:
            rec["status"] = "passed"
    record = {
        "passed": not failures,
        "runs": len(records),
        "targets": sorted({f"{t['op']} (input {t['input']!r})" for t in plan.targets}),
        "probes": records,
        "skipped": sum(r["status"] == "skipped" for r in records),
        "failed": len(failures),
        "backend_raised": sum(r["status"] == "backend_raised" for r in records),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if failures and raise_on_failure:
        raise ProbeError(_message(name, failures, len(records)), ParityReport(reports), record)
    return record


def _positional_tf(fn: Any, specs: Sequence[TensorSpec], out_keys: Sequence[str]) -> Runner:
    """``feeds -> outputs`` around a TF function of one positional tensor per spec."""
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    keys = list(out_keys)

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        out = fn(*[tf.constant(feeds[s.name]) for s in specs])
        return dict(zip(keys, [np.asarray(t) for t in tf.nest.flatten(out)]))

    return run


def _first_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong (TF's ``Graph execution error:`` puts it last)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("[[", "File ", "Detected at node", "Graph execution error"))
            and "defined at" not in ln and not ln.startswith(("self.", "return ", "result ="))]
    line = keep[-1] if keep else (lines[0] if lines else "")
    return line.split("\t [[")[0].split(" [[")[0][:300]


def _message(name: str, failures: list[tuple[dict[str, Any], Feeds]], n: int) -> str:
    lines = [f"exported bridge {name!r} does not compute what TensorFlow computes on {len(failures)} of {n} probe "
             f"input(s) (edge values for the ops in the graph; the sample inputs passed):"]
    for rec, feeds in failures[:3]:
        targets = ", ".join(rec["targets"]) or "no op-specific rule (generic edge values of each input's dtype)"
        ins = "; ".join(f"{k} = {_short(v)} ({rec['cases'][k]})" for k, v in feeds.items())
        lines.append(f"  - probe {rec['index']}: targets {targets}\n      inputs: {ins}\n      {rec['reason']}")
    lines.append("What to do: the exported graph is wrong on these inputs (a converter bug: report it with the output "
                 "of `mmbridge info` and this message), or keep such inputs away from the bridge; to accept it "
                 "knowingly, export with probes=False (recorded in the artifact's meta.json).")
    return "\n".join(lines)


__all__ = ["PROBE_RULES", "ProbeRule", "RuleContext", "ProbeError", "ProbePlan", "register_probe_rule", "plan_probes",
           "run_probes", "MAX_PROBES", "PASS_THROUGH", "SHAPE_OF", "EXTREME_SAFE"]
