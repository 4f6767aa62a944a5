"""Extensions of tf2onnx for TF ops that it leaves unconverted or converts wrongly.

These are the ops that Keras preprocessing layers, ``tf.image`` and ``tf.strings`` lower to. Each
handler emits an *exact* ONNX form of the TF kernel, or refuses the node at export with the
reason and what to do; nothing is exported as "something close".

===========================  ===================================================================
TF op                        ONNX form (exact: integer/string outputs identical to TF)
===========================  ===================================================================
``Bucketize``                ``N - ReduceSum(Cast(Less(x[..., None], boundaries)))`` (int32):
                             TF's ``std::upper_bound``; NaN -> ``N`` as in TF
``LookupTableFindV2``        string keys: ``ai.onnx.ml.LabelEncoder``; integer keys: ``Equal`` +
                             ``ArgMax`` + ``Gather`` + ``Where`` (pure ONNX, runs in torch too);
                             integer -> string: ``LabelEncoder``
``LookupTableSizeV2``        a constant
``RaggedBincount``           ``ScatterElements(reduction="add")`` (multi_hot / count / tf_idf)
``SelectV2``                 ``Where`` (tf2onnx's ``c*t + (1-c)*e`` breaks on NaN/Inf and strings)
``StaticRegexReplace`` /     ``ai.onnx.contrib.StringRegexReplace`` (RE2 in both, same rewrite
``RegexReplace``             syntax; ``replace_global`` kept)
``StringLower`` /            ASCII case mapping as 26 ``StringRegexReplace`` nodes (``"A"->"a"``...):
``StringUpper``              TF's default ``encoding=""`` maps ASCII only; no locale involved
                             (ONNX ``StringNormalizer`` needs the ``en_US.UTF-8`` locale and
                             onnxruntime-extensions' ``StringLower`` also maps non-ASCII letters);
                             ``encoding="utf-8"``: refused
``StringSplitV2``            ``ai.onnx.contrib.StringSplit``; whitespace split (``sep=""``) first
                             maps ``\\t\\n\\v\\f\\r`` to spaces (absl ``ascii_isspace``) and skips
                             empty tokens; a one-byte ``sep`` keeps empty tokens and ``"" -> [""]``
``StringJoin``               ``ai.onnx.contrib.StringConcat`` chain (with the separator)
``ReduceJoin``               ``ai.onnx.contrib.StringJoin``
``Equal`` / ``NotEqual``     on strings: ``ai.onnx.contrib.StringEqual`` (tf2onnx would ``Cast``
                             the strings to int32); numeric: tf2onnx's own handler
``AsString``                 integers: ONNX ``Cast`` to string; floats, bools, formatting: refused
``StringToHashBucketFast``   of ``AsString(int)`` (Keras ``Hashing`` on integers): FarmHash
                             Fingerprint64 of the decimal string rebuilt from standard ONNX ops
                             (exact); of other strings: refused (onnxruntime-extensions' op of
                             that name gives other bucket ids; no ONNX op reads string bytes)
``FloorMod``                 integers: ``Mod(fmod=0)`` (tf2onnx's form is wrong for negatives)
``OneHot``                   negative indices -> ``depth`` first: all-off rows as in TF (ONNX
                             would count them from the end)
``ScatterNd``                ``ScatterND(zeros, idx, upd, reduction="add")``: repeated indices add up
``Slice``                    runtime ``size = -1``: ``ends = INT64_MAX`` (tf2onnx overflowed int32)
``MatrixBandPart``           ``Where`` over an ``i - j`` / ``j - i`` band mask, any rank, runtime bounds
``FloorDiv``                 integers: ``Div(x - Mod(x, y, fmod=0), y)`` (tf2onnx truncates toward 0);
                             floats: ``Floor(Div)`` (tf2onnx skips the Floor for bfloat16)
``AdjustSaturation``         tf2onnx's sorted-channel form, channels put back with the inverse
                             permutation (tf2onnx re-applied the sort permutation), ``s * scale`` clamped at 0
``CropAndResize``            tf2onnx's ``Loop`` of ``Resize(tf_crop_and_resize)``; ``nearest``:
                             ``nearest_mode="round_prefer_ceil"`` (TF's ``roundf``: .5 ties up)
``StringToHashBucketStrong`` refused (keyed SipHash; ``Hashing(salt=...)``)
``ScaleAndTranslate``        refused (``antialias=True``, lanczos3/5, gaussian, mitchellcubic)
``ResizeBicubic``            refused (TF's 1024-entry kernel table: 0.15 off on 0-255 pixels)
``ResizeArea``               refused (tf2onnx's form is off by up to 175 on 0-255 pixels)
===========================  ===================================================================

Refusals: tf2onnx logs and swallows exceptions raised in handlers and leaves the TF node in the
graph, so each refusal is recorded by node name and raised as :class:`UnsupportedOpsError` (naming
the TF op, node, layer and what to do) by an ONNX rewrite registered for that op type with
:func:`mmbridge.export.rewrites.register_onnx_rewrite`, which ``repair_and_check_ops`` runs.

String graphs need onnxruntime-extensions (domain ``ai.onnx.contrib``), which
:func:`mmbridge.runtime.session.make_session` registers automatically; they run on the ORT
backend only and end in integer ids at the torch boundary (torch has no string tensors).

Lookup tables: the frozen graph keeps only a resource placeholder; the table contents are read
from the live TF table (``LookupTableExportV2``) through the concrete function's captures, see
:func:`table_contents`.

Extension point used by :mod:`mmbridge.export.exporter`: :func:`tf2onnx_handlers` returns tf2onnx
``custom_op_handlers``; handlers add the ``ai.onnx.contrib`` opset import only when they emit a
node of that domain, so graphs without strings never need onnxruntime-extensions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmbridge.errors import UnsupportedOpsError
from mmbridge.runtime.extensions import CONTRIB_DOMAIN, preload_extensions

ML_DOMAIN = "ai.onnx.ml"
# absl::ascii_isspace, used by TF's whitespace split (StringSplitV2 with sep="")
_ASCII_SPACE_BUT_BLANK = "\t\n\x0b\x0c\r"

Tables = Mapping[str, tuple[np.ndarray, np.ndarray]]
"""Resource placeholder name in the frozen graph -> ``(keys, values)`` of the TF lookup table."""


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def tf2onnx_handlers(tables: Tables | None = None) -> tuple[dict[str, Any], list[Any]]:
    """``(custom_op_handlers, extra_opset)`` for ``tf2onnx.convert.from_graph_def``.

    Args:
        tables: lookup-table contents by resource placeholder name (see :func:`table_contents`).
            ``None``: the ``LookupTableFindV2`` handler finds the concrete function being
            exported on the call stack (the ``fn`` local of :mod:`mmbridge.export.exporter`'s build
            step) and reads the tables from it.

    Returns:
        ``custom_op_handlers`` maps a TF op type to ``(handler, [None, tables])`` (tf2onnx's
        compat API reads ``args[0]`` as an ONNX op rename, hence ``None``) where
        ``handler(ctx, node, name, [tables])`` rewrites the node in tf2onnx's graph;
        ``extra_opset`` is empty (handlers add ``ai.onnx.contrib`` themselves when they use it).
    """
    args = [tables]
    handlers = {
        "Bucketize": _bucketize,
        "LookupTableFindV2": _lookup_find,
        "LookupTableSizeV2": _lookup_size,
        "StringToHashBucketFast": _hash_fast,
        "StringToHashBucketStrong": _hash_strong,
        "StringToHashBucket": _hash_legacy,
        "StaticRegexReplace": _regex_replace,
        "RegexReplace": _regex_replace,
        "StringLower": _lower_upper,
        "StringUpper": _lower_upper,
        "StringSplitV2": _split_v2,
        "StringJoin": _string_join,
        "ReduceJoin": _reduce_join,
        "Equal": _equal,
        "NotEqual": _equal,
        "AsString": _as_string,
        "RaggedBincount": _ragged_bincount,
        "SelectV2": _select_v2,
        "FloorMod": _floor_mod,
        "FloorDiv": _floor_div,
        "OneHot": _one_hot,
        "ScatterNd": _scatter_nd,
        "Slice": _slice,
        "MatrixBandPart": _band_part,
        "ScaleAndTranslate": _scale_and_translate,
        "ResizeArea": _resize_area,
        "ResizeBicubic": _resize_bicubic,
        "AdjustSaturation": _adjust_saturation,
        "CropAndResize": _crop_and_resize,
    }
    # tf2onnx's compat API: args[0] would be taken as an ONNX op name, so lead with None
    return {op: (_guarded(fn), [None, *args]) for op, fn in handlers.items()}, []


def table_contents(concrete_function: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every lookup table a concrete function captures.

    Args:
        concrete_function: the ``tf.types.experimental.ConcreteFunction`` that was frozen.

    Returns:
        ``{placeholder op name: (keys, values)}``: the name of the resource placeholder in the
        frozen graph (the capture's internal tensor) and the table's exported keys and values
        (numpy; strings as ``bytes`` objects), in the table's own order.

    Tables that cannot be exported (not a hash table) are left out; the lookup handler then
    refuses the node naming it.
    """
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    graph = concrete_function.graph
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for external, internal in graph.captures:
        if external.dtype != tf.resource:
            continue
        name = internal.op.name
        finds = [op for op in graph.get_operations()
                 if op.type in ("LookupTableFindV2", "LookupTableSizeV2") and op.inputs[0].op.name == name]
        sig = next((op for op in finds if op.type == "LookupTableFindV2"), None)
        if sig is None:
            continue
        try:
            with _eager(tf):  # tf2onnx converts inside a tf.Graph context; the tables live in eager
                k, v = tf.raw_ops.LookupTableExportV2(table_handle=external, Tkeys=sig.get_attr("Tin"),
                                                     Tvalues=sig.get_attr("Tout"))
        except Exception:  # noqa: BLE001 - not exportable: the handler refuses with the node name
            continue
        out[name] = (k.numpy(), v.numpy())
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _eager(tf: Any) -> Any:
    """Context manager that runs TF eagerly even inside a ``tf.Graph().as_default()`` block.

    tf2onnx converts inside such a block, where ``tf.init_scope()`` stays in graph mode; TF's
    ``context.eager_mode()`` is the only switch (TF is already imported by ``tf``'s caller).
    """
    import importlib

    del tf
    return importlib.import_module("tensorflow.python.eager.context").eager_mode()


# node name -> why it was refused. tf2onnx logs and swallows handler exceptions and leaves the TF
# node in the graph; the ONNX rewrite registered below for that op type then raises this message
# from mmbridge.export.exporter.repair_and_check_ops.
_REFUSED: dict[str, str] = {}


def _refuse(node: Any, layer_hint: str, why: str, what_to_do: str) -> None:
    origin = node.name.rsplit("/", 1)[0]
    msg = (f"cannot export TF op {node.type} (node {node.name!r}, from {origin!r}; {layer_hint}): {why}. "
           f"What to do: {what_to_do}")
    _REFUSED[node.name] = msg
    raise UnsupportedOpsError(
        msg, [{"op_type": node.type, "domain": "tf", "node": node.name, "origin": origin, "advice": what_to_do}])


def _refusal_rewrite(graph: Any, node: Any, new_name: Any) -> list[Any]:
    """ONNX rewrite for a TF op a handler refused (or failed on): raise with the recorded reason."""
    origin = node.name.rsplit("/", 1)[0]
    msg = _REFUSED.pop(node.name, None) or (
        f"cannot export TF op {node.op_type} (node {node.name!r}, from {origin!r}): it has no exact ONNX form here. "
        f"What to do: compute it outside the graph")
    raise UnsupportedOpsError(msg, [{"op_type": node.op_type, "domain": "tf", "node": node.name, "origin": origin,
                                     "advice": msg.split("What to do: ", 1)[-1]}])


def _guarded(fn: Any) -> Any:
    """Record any handler failure for :func:`_refusal_rewrite` (tf2onnx only logs it)."""
    import functools

    @functools.wraps(fn)
    def wrapper(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
        try:
            fn(ctx, node, name, args)
        except UnsupportedOpsError:
            raise
        except Exception as exc:
            _REFUSED[name] = (f"cannot export TF op {node.type} (node {name!r}): mmbridge's converter failed: "
                              f"{type(exc).__name__}: {exc}. What to do: report this with the layer config")
            raise

    return wrapper


def _use_domain(ctx: Any, domain: str) -> None:
    """Add an opset import for ``domain`` (version 1) to the model tf2onnx is building."""
    from onnx import helper

    if domain == ML_DOMAIN:  # tf2onnx always imports ai.onnx.ml
        return
    if domain == CONTRIB_DOMAIN and not preload_extensions():
        raise RuntimeError(
            "onnxruntime-extensions is missing, or was loaded after TensorFlow in this process and its regex "
            "engine (RE2) now resolves to TensorFlow's copy, so string ops would silently return wrong text. "
            "Install onnxruntime-extensions, and import mmbridge.export.handlers (or export in a child process: pass a "
            "'module:attribute' reference) before anything loads onnxruntime_extensions")
    extra = list(ctx.extra_opset or [])
    if not any(o.domain == domain for o in extra):
        extra.append(helper.make_opsetid(domain, 1))
        ctx._extra_opset = extra  # tf2onnx reads it when it builds the ModelProto


_SHAPE_KEEPING = ("Identity", "Mul", "AddV2", "Add", "Sub", "RealDiv", "Div", "Cast", "Maximum", "Minimum",
                  "SelectV2", "Select")


class _Emit:
    """Small builder over tf2onnx's graph: unique names, consts, nodes."""

    def __init__(self, ctx: Any, base: str):
        from tf2onnx import utils

        self.ctx, self.base, self._utils = ctx, base, utils

    def name(self, hint: str) -> str:
        return self._utils.make_name(f"{self.base}/{hint}")

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        return self.ctx.make_const(self.name(hint), np.asarray(value)).output[0]

    def node(self, op: str, inputs: list[str], *, attr: dict | None = None, domain: str = "", dtype: int | None = None,
             shape: Any = None, outputs: list[str] | None = None, output_count: int = 1) -> Any:
        if domain:
            _use_domain(self.ctx, domain)
        n = self.ctx.make_node(op, inputs, attr=attr or {}, domain=domain, name=self.name(op), outputs=outputs,
                               output_count=output_count,
                               dtypes=[dtype] * (len(outputs) if outputs else output_count) if dtype is not None else None,
                               shapes=[shape] * (len(outputs) if outputs else output_count) if shape is not None else None)
        if shape is not None:
            # TF recorded no shape after the unconverted op either; a graph output without a shape
            # fails onnx.checker. Identity keeps the shape; elementwise ops keep the rank.
            todo = [(o, list(shape)) for o in n.output]
            while todo:
                out, shp = todo.pop()
                for c in self.ctx.find_output_consumers(out):
                    known = self.ctx.get_shape(c.output[0])
                    # tf2onnx inferred broadcasting ops (SelectV2 ...) from the unknown shape: too low a rank
                    if c.type in _SHAPE_KEEPING and (known is None or len(known) < len(shp)):
                        s2 = shp if c.type == "Identity" else [-1] * len(shp)
                    elif c.type in ("OneHot", "DenseBincount") and known is None and c.input[0] == out:
                        size = _const_value(self.ctx, c.input[1])
                        size = int(np.asarray(size).reshape(-1)[0]) if size is not None else -1
                        s2 = (shp + [size]) if c.type == "OneHot" else ([shp[0], size] if len(shp) == 2 else [size])
                    else:
                        continue
                    self.ctx.set_shape(c.output[0], s2)
                    todo.append((c.output[0], s2))
        return n

    def reduce(self, kind: str, x: str) -> str:
        """``Reduce{Max,Sum}(x, axes=[-1], keepdims=0)`` in the form the graph's opset wants."""
        from tf2onnx.graph_builder import GraphBuilder

        make = getattr(GraphBuilder(self.ctx), f"make_reduce_{kind}")
        return make({"data": x, "axes": [-1], "keepdims": 0}, name=self.name(f"Reduce{kind}"))

    def out(self, op: str, inputs: list[str], **kw: Any) -> str:
        return self.node(op, inputs, **kw).output[0]


def _take_over(ctx: Any, node: Any, like: int | None = 0) -> tuple[list[str], list[str], list[int], list[Any]]:
    """Remove ``node``; return its inputs, outputs, output dtypes and shapes for the replacement.

    ``like``: for elementwise ops, the input whose shape the first output has when TF did not
    record one (a graph output without a shape fails ``onnx.checker``).
    """
    ins, outs = list(node.input), list(node.output)
    dtypes = [ctx.get_dtype(o) for o in outs]
    shapes = [ctx.get_shape(o) for o in outs]
    if like is not None and shapes and shapes[0] is None:
        shapes[0] = ctx.get_shape(ins[like])
    ctx.remove_node(node.name)
    return ins, outs, dtypes, shapes


def _const_value(ctx: Any, name: str) -> Any:
    node = ctx.get_node_by_output(name)
    while node is not None and node.type == "Identity":
        node = node.inputs[0]
    if node is None or not node.is_const():
        return None
    return node.get_tensor_value(as_list=False)


def _as_str(v: Any) -> str:
    v = np.asarray(v).reshape(-1)[0] if np.asarray(v).size == 1 else v
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------------------------
# numeric / categorical
# ---------------------------------------------------------------------------------------------
def _bucketize(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``Bucketize``: ``out[i] = upper_bound(boundaries, x[i]) - boundaries.begin()``.

    Emitted as ``N - sum_j (x < b_j)`` (int32, like TF), exact: for NaN every comparison is
    false and TF's ``upper_bound`` also returns ``N``. Integer inputs are compared as float32,
    as C++ does when it compares an ``int`` with the ``float`` boundaries.
    """
    from onnx import TensorProto

    boundaries = [float(b) for b in (node.get_attr_value("boundaries") or [])]
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    x = ins[0]
    in_dtype = ctx.get_dtype(x)
    if not boundaries:
        zeros = e.out("Mul", [e.out("Cast", [x], attr={"to": TensorProto.INT32}), e.const(np.int32(0))])
        e.node("Identity", [zeros], outputs=outs, dtype=TensorProto.INT32, shape=shapes[0])
        return
    if in_dtype == TensorProto.DOUBLE:
        b = np.asarray(np.float32(boundaries), np.float64)
    else:
        b = np.asarray(boundaries, np.float32)
        if in_dtype != TensorProto.FLOAT:
            x = e.out("Cast", [x], attr={"to": TensorProto.FLOAT})
    xu = e.out("Unsqueeze", [x, e.const(np.array([-1], np.int64), "axes")])
    less = e.out("Cast", [e.out("Less", [xu, e.const(b, "boundaries")])], attr={"to": TensorProto.INT32})
    n_less = e.reduce("sum", less)
    e.node("Sub", [e.const(np.int32(len(b)), "n"), n_less], outputs=outs, dtype=TensorProto.INT32, shape=shapes[0])


def _ragged_bincount(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``RaggedBincount`` (TextVectorization / StringLookup ``multi_hot`` / ``count`` / ``tf_idf``).

    ``out[r, v] = sum of weights (or 1) of the values v < size in row r`` (``binary_output``: 0/1),
    as ``ScatterElements(reduction="add")`` into a flat ``[rows * size]`` buffer (opset >= 16);
    row ids from the splits by a scatter of row starts and ``CumSum``. Values >= size are dropped,
    as in TF. Exact: counts are summed as float32/int64 integers below 2**24.
    """
    from onnx import TensorProto, helper

    if ctx.opset < 16:
        _refuse(node, "multi_hot / count / tf_idf outputs", f"needs ScatterElements(reduction='add') (opset >= 16), "
                f"the export uses opset {ctx.opset}", "export with opset=17")
    binary = bool(node.get_attr_value("binary_output", False))
    weights_const = _const_value(ctx, node.input[3])
    if weights_const is None or np.asarray(weights_const).size != 0:
        _refuse(node, "bincount with weights", "only unweighted RaggedBincount is supported",
                "apply the weights after the layer")
    out_dtype = ctx.get_dtype(node.output[0])
    np_out = helper.tensor_dtype_to_np_dtype(out_dtype)
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    e = _Emit(ctx, name)
    splits, values, size = ins[0], ins[1], ins[2]
    i64 = TensorProto.INT64
    splits = e.out("Cast", [splits], attr={"to": i64})
    values = e.out("Cast", [values], attr={"to": i64})
    size = e.out("Reshape", [e.out("Cast", [size], attr={"to": i64}), e.const(np.array([], np.int64), "scalar")])
    zero, one = e.const(np.array([0], np.int64), "zero"), e.const(np.array([1], np.int64), "one")
    n_vals = e.out("Shape", [values])                                      # [N]
    n_splits = e.out("Shape", [splits])                                    # [B + 1]
    n_rows = e.out("Sub", [n_splits, one])                                 # [B]
    inner = e.out("Slice", [splits, one, e.const(np.array([-1], np.int64), "m1"), zero])  # row starts 1..B-1
    marks = e.out("ConstantOfShape", [e.out("Add", [n_vals, one])],
                  attr={"value": helper.make_tensor("v", i64, [1], [0])})   # [N + 1]
    ones_inner = e.out("Expand", [e.const(np.array(1, np.int64), "one_s"), e.out("Shape", [inner])])
    marks = e.out("ScatterElements", [marks, inner, ones_inner], attr={"axis": 0, "reduction": "add"})
    row = e.out("CumSum", [e.out("Slice", [marks, zero, n_vals, zero]), e.const(np.array(0, np.int64), "axis0")])
    valid = e.out("And", [e.out("Less", [values, size]),
                          e.out("GreaterOrEqual", [values, e.const(np.array(0, np.int64), "zero_s")])])
    flat = e.out("Add", [e.out("Mul", [row, size]), values])
    flat = e.out("Where", [valid, flat, e.const(np.array(0, np.int64), "zero_s2")])
    upd = e.out("Cast", [valid], attr={"to": out_dtype})
    total = e.out("Mul", [n_rows, e.out("Reshape", [size, one])])
    buf = e.out("ConstantOfShape", [total], attr={"value": helper.make_tensor("z", out_dtype, [1], [np_out.type(0)])})
    acc = e.out("ScatterElements", [buf, flat, upd], attr={"axis": 0, "reduction": "add"})
    if binary:
        acc = e.out("Cast", [e.out("Greater", [acc, e.const(np.array(0, np_out), "zero_t")])], attr={"to": out_dtype})
    e.node("Reshape", [acc, e.out("Concat", [n_rows, e.out("Reshape", [size, one])], attr={"axis": 0})],
           outputs=outs, dtype=out_dtype, shape=shapes[0] if shapes and shapes[0] is not None else [-1, -1])


def _floor_mod(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``FloorMod``: integers -> ONNX ``Mod(fmod=0)`` (result has the divisor's sign, as TF);
    tf2onnx's ``x - (x / y) * y`` truncates toward zero and is wrong for negative integers
    (``-7 floormod 4`` = 1 in TF, -3 there; IntegerLookup's OOV buckets). Floats: tf2onnx's form."""
    from onnx import TensorProto
    from tf2onnx.onnx_opset import math as tf2onnx_math

    dtype = ctx.get_dtype(node.input[0])
    if dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        tf2onnx_math.FloorMod.version_7(ctx, node)
        return
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    _Emit(ctx, name).node("Mod", ins[:2], attr={"fmod": 0}, outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _floor_div(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``FloorDiv`` (``//``; Keras ``CenterCrop`` offsets): rounds toward negative infinity.

    tf2onnx writes integer ``FloorDiv`` as ONNX ``Div``, which truncates toward zero
    (``-7 // 2`` = -4 in TF, -3 there), and leaves bfloat16 without the ``Floor``. Here:
    integers ``Div(x - Mod(x, y, fmod=0), y)`` (an exact division: ``x - floormod(x, y)`` is a
    multiple of ``y``), floats of every width ``Floor(Div(x, y))``."""
    from onnx import TensorProto

    dtype = ctx.get_dtype(node.input[0])
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    if dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        q = e.out("Div", ins[:2], dtype=dtypes[0])
        e.node("Floor", [q], outputs=outs, dtype=dtypes[0], shape=shapes[0])
        return
    r = e.out("Mod", ins[:2], attr={"fmod": 0}, dtype=dtypes[0])
    d = e.out("Sub", [ins[0], r], dtype=dtypes[0])
    e.node("Div", [d, ins[1]], outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _one_hot(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``OneHot``: an index outside ``[0, depth)`` gives an all-``off`` row, also a negative one.

    ONNX ``OneHot`` counts negative indices from the end (``-1`` -> the last class), so tf2onnx's
    direct mapping turned TF's all-off row for ``-1`` into a one at ``depth - 1``. Negative
    indices are mapped to ``depth`` first (outside the range, so all-off in ONNX too), then
    tf2onnx's own handler runs.
    """
    from onnx import TensorProto
    from tf2onnx.onnx_opset import tensor as tf2onnx_tensor

    ids, depth = node.input[0], node.input[1]
    id_type = ctx.get_dtype(ids)
    if ctx.get_dtype(node.input[2]) == TensorProto.FLOAT and id_type in (TensorProto.INT32, TensorProto.INT64):
        e = _Emit(ctx, name)
        zero = e.const(np.array(0, dtype=np.int64 if id_type == TensorProto.INT64 else np.int32), "zero")
        neg = e.out("Less", [ids, zero], dtype=TensorProto.BOOL, shape=ctx.get_shape(ids))
        d = e.out("Cast", [depth], attr={"to": id_type}, dtype=id_type, shape=[])
        safe = e.out("Where", [neg, d, ids], dtype=id_type, shape=ctx.get_shape(ids))
        ctx.replace_input(node, ids, safe, 0)
    if ctx.opset >= 9:
        tf2onnx_tensor.OneHot.any_version_after9(ctx.opset, ctx, node)
    else:
        tf2onnx_tensor.OneHot.version_1(ctx, node)


def _scatter_nd(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``ScatterNd`` adds the updates of repeated indices; ONNX ``ScatterND`` keeps one of them
    unless ``reduction="add"`` (opset >= 16), which is emitted here on a zero tensor (exact).
    Below opset 16 the node is refused (re-export at opset >= 16)."""
    from onnx import TensorProto, helper

    if ctx.opset < 16:
        _refuse(node, "tf.scatter_nd", f"opset {ctx.opset} has no ScatterND reduction, and TF adds the updates of "
                "repeated indices", "export at opset 16 or later (the default is 17)")
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    idx = e.out("Cast", [ins[0]], attr={"to": TensorProto.INT64}, dtype=TensorProto.INT64)
    shape = e.out("Cast", [ins[2]], attr={"to": TensorProto.INT64}, dtype=TensorProto.INT64)
    zeros = e.out("ConstantOfShape", [shape], attr={"value": helper.make_tensor("value", dtypes[0], [1], [0])},
                  dtype=dtypes[0])
    e.node("ScatterND", [zeros, idx, ins[1]], attr={"reduction": "add"}, outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _slice(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``Slice(x, begin, size)`` with ``size = -1`` meaning "to the end", also when ``size`` is only
    known at run time: ``ends = Where(size == -1, INT64_MAX, begin + size)`` in int64. tf2onnx adds
    INT32_MAX to a runtime -1 and then ``begin``, which overflows for ``begin >= 2`` (empty output)."""
    from onnx import TensorProto
    from tf2onnx.onnx_opset import tensor as tf2onnx_tensor

    if all(ctx.get_node_by_output(x) is not None and ctx.get_node_by_output(x).is_const() for x in node.input[1:3]):
        tf2onnx_tensor.Slice.version_1(ctx, node)  # constant begin / size: tf2onnx's constant ends are right
        return
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    begin = e.out("Cast", [ins[1]], attr={"to": TensorProto.INT64}, dtype=TensorProto.INT64)
    size = e.out("Cast", [ins[2]], attr={"to": TensorProto.INT64}, dtype=TensorProto.INT64)
    to_end = e.out("Equal", [size, e.const(np.array(-1, np.int64), "minus_one")], dtype=TensorProto.BOOL)
    stop = e.out("Add", [begin, size], dtype=TensorProto.INT64)
    ends = e.out("Where", [to_end, e.const(np.array(np.iinfo(np.int64).max, np.int64), "int64_max"), stop],
                 dtype=TensorProto.INT64)
    e.node("Slice", [ins[0], begin, ends], outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _band_part(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``MatrixBandPart(x, num_lower, num_upper)`` for any rank >= 2 and bounds known only at run
    time: keeps ``x[..., i, j]`` where ``(num_lower < 0 or i - j <= num_lower) and (num_upper < 0 or
    j - i <= num_upper)``, else 0 (``Where``; exact). tf2onnx supports only rank 2 and treated a
    runtime -1 as a band of width -1 (all zeros)."""
    from onnx import TensorProto

    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    i64 = TensorProto.INT64
    shape = e.out("Shape", [ins[0]], dtype=i64)
    rows = e.out("Gather", [shape, e.const(np.array(-2, np.int64), "rows_axis")], dtype=i64)
    cols = e.out("Gather", [shape, e.const(np.array(-1, np.int64), "cols_axis")], dtype=i64)
    zero, one = e.const(np.array(0, np.int64), "zero"), e.const(np.array(1, np.int64), "one")
    i = e.out("Unsqueeze", [e.out("Range", [zero, rows, one], dtype=i64), e.const(np.array([1], np.int64), "ax1")],
              dtype=i64)
    j = e.out("Unsqueeze", [e.out("Range", [zero, cols, one], dtype=i64), e.const(np.array([0], np.int64), "ax0")],
              dtype=i64)
    below = e.out("Sub", [i, j], dtype=i64)  # [rows, cols]: i - j
    above = e.out("Sub", [j, i], dtype=i64)
    keep = None
    for bound, dist in ((ins[1], below), (ins[2], above)):
        b = e.out("Cast", [bound], attr={"to": i64}, dtype=i64)
        ok = e.out("Or", [e.out("Less", [b, zero], dtype=TensorProto.BOOL),
                          e.out("Not", [e.out("Less", [b, dist], dtype=TensorProto.BOOL)], dtype=TensorProto.BOOL)],
                   dtype=TensorProto.BOOL)  # dist <= b as not(b < dist): Less converts everywhere
        keep = ok if keep is None else e.out("And", [keep, ok], dtype=TensorProto.BOOL)
    zeros = e.out("Sub", [ins[0], ins[0]], dtype=dtypes[0]) if dtypes[0] != TensorProto.BOOL else e.out(
        "Xor", [ins[0], ins[0]], dtype=dtypes[0])
    e.node("Where", [keep, ins[0], zeros], outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _select_v2(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``SelectV2`` -> ONNX ``Where`` (same numpy broadcasting; exact also for NaN/Inf and strings,
    unlike tf2onnx's ``cond * t + (not cond) * e`` form). Output shape: the broadcast of the inputs'."""
    shapes_in = [ctx.get_shape(i) for i in node.input[:3]]
    dtype = ctx.get_dtype(node.output[0])
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    shape = None
    if all(sh is not None for sh in shapes_in):
        rank = max(len(sh) for sh in shapes_in)
        padded = [[1] * (rank - len(sh)) + list(sh) for sh in shapes_in]
        shape = []
        for dims in zip(*padded):
            known = {d for d in dims if d != 1}
            shape.append(1 if not known else (known.pop() if len(known) == 1 and -1 not in known else -1))
    _Emit(ctx, name).node("Where", ins[:3], outputs=outs, dtype=dtype, shape=shape)


def _find_tables_on_stack(placeholder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    frame = inspect.currentframe()
    try:
        while frame is not None:
            fn = frame.f_locals.get("fn")
            if fn is not None and hasattr(fn, "get_concrete_function") and "specs" in frame.f_locals:
                try:
                    tables = table_contents(fn.get_concrete_function())
                except Exception:  # noqa: BLE001 - another frame may hold the right function
                    tables = {}
                if placeholder in tables:
                    return tables
            frame = frame.f_back
    finally:
        del frame
    return {}


def _table_for(node: Any, args: list[Any]) -> tuple[Any, np.ndarray, np.ndarray]:
    table_node = node.inputs[0]
    while table_node.type == "Identity":
        table_node = table_node.inputs[0]
    tables = args[0] if args and args[0] is not None else _find_tables_on_stack(table_node.name)
    if table_node.name not in tables:
        _refuse(node, "a StringLookup / IntegerLookup / TextVectorization vocabulary",
                f"the contents of lookup table {table_node.name!r} could not be read from the TF function "
                f"(only StaticHashTable-style tables that support LookupTableExportV2 can be exported)",
                "export the Keras layer or a tf.function that captures a tf.lookup.StaticHashTable, or map ids "
                "outside the graph")
    keys, values = tables[table_node.name]
    return table_node, np.asarray(keys), np.asarray(values)


def _lookup_find(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``LookupTableFindV2`` on a hash table whose contents are known at export.

    * string -> integer: ``ai.onnx.ml.LabelEncoder`` (keys_strings, values_int64s, default).
    * integer -> integer: ``Where(any(x == keys), values[argmax(x == keys)], default)``; memory
      ``O(elements x vocabulary)``; pure ONNX (runs in torch too).
    * integer -> string: ``ai.onnx.ml.LabelEncoder`` (keys_int64s, values_strings, default).
    """
    from onnx import TensorProto

    args = list(args or [])
    table_node, keys, values = _table_for(node, args)
    default = _const_value(ctx, node.input[2])
    if default is None:
        _refuse(node, "a lookup layer", "the default (OOV) value of the lookup is not a constant",
                "use a constant default value")
    default = np.asarray(default)
    in_dtype, out_dtype = ctx.get_dtype(node.input[1]), ctx.get_dtype(node.output[0])
    ints = (TensorProto.INT64, TensorProto.INT32)
    if not ((in_dtype == TensorProto.STRING and out_dtype in ints) or (in_dtype in ints and out_dtype in ints)
            or (in_dtype in ints and out_dtype == TensorProto.STRING)):
        _refuse(node, "a lookup layer", f"lookup tables from ONNX type {in_dtype} to {out_dtype} are not supported "
                "(supported: string->int, int->int, int->string)", "map the values outside the graph")
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=1)
    e = _Emit(ctx, name)
    x = ins[1]
    if in_dtype == TensorProto.STRING and out_dtype in ints:
        k = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in keys.reshape(-1)]
        out = e.out("LabelEncoder", [x], domain=ML_DOMAIN, attr={
            "keys_strings": k, "values_int64s": [int(v) for v in values.reshape(-1)],
            "default_int64": int(default.reshape(-1)[0])}, dtype=TensorProto.INT64)
        if out_dtype == TensorProto.INT64:
            e.node("Identity", [out], outputs=outs, dtype=out_dtype, shape=shapes[0])
        else:
            e.node("Cast", [out], attr={"to": out_dtype}, outputs=outs, dtype=out_dtype, shape=shapes[0])
    elif in_dtype in ints and out_dtype == TensorProto.STRING:
        x64 = x if in_dtype == TensorProto.INT64 else e.out("Cast", [x], attr={"to": TensorProto.INT64})
        e.node("LabelEncoder", [x64], domain=ML_DOMAIN, attr={
            "keys_int64s": [int(v) for v in keys.reshape(-1)],
            "values_strings": [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in values.reshape(-1)],
            "default_string": _as_str(default)}, outputs=outs, dtype=TensorProto.STRING, shape=shapes[0])
    elif in_dtype in ints and out_dtype in ints:
        np_in = np.int64 if in_dtype == TensorProto.INT64 else np.int32
        np_out = np.int64 if out_dtype == TensorProto.INT64 else np.int32
        dflt = e.const(np.asarray(default.reshape(-1)[0], np_out), "default")
        if keys.size == 0:
            shape = e.out("Shape", [x])
            e.node("Expand", [dflt, shape], outputs=outs, dtype=out_dtype, shape=shapes[0])
        else:
            xu = e.out("Unsqueeze", [x, e.const(np.array([-1], np.int64), "axes")])
            eq = e.out("Cast", [e.out("Equal", [xu, e.const(keys.astype(np_in), "keys")])],
                       attr={"to": TensorProto.INT32})
            idx = e.out("ArgMax", [eq], attr={"axis": -1, "keepdims": 0})
            hit = e.out("Cast", [e.reduce("max", eq)], attr={"to": TensorProto.BOOL})
            val = e.out("Gather", [e.const(values.astype(np_out), "values"), idx])
            e.node("Where", [hit, val, dflt], outputs=outs, dtype=out_dtype, shape=shapes[0])
    if not ctx.find_output_consumers(table_node.output[0]):
        ctx.remove_node(table_node.name)


def _lookup_size(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``LookupTableSizeV2``: the number of keys, as an int64 constant."""
    table_node, keys, _ = _table_for(node, list(args or []))
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    e = _Emit(ctx, name)
    e.node("Identity", [e.const(np.int64(keys.size), "size")], outputs=outs, dtype=dtypes[0], shape=[])
    if not ctx.find_output_consumers(table_node.output[0]):
        ctx.remove_node(table_node.name)


def _hash_fast(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``StringToHashBucketFast``: ``Fingerprint64(s) % num_buckets`` (FarmHash Fingerprint64).

    * Input produced by ``AsString`` of an integer (Keras ``Hashing`` / ``IntegerLookup`` OOV
      buckets on integers): exact, in standard ONNX (:func:`_farmhash64_of_int64`).
    * Any other string input: refused. onnxruntime-extensions' op of the same name computes
      another hash (measured: different bucket ids on 7 of 7 test strings, e.g. ``""`` -> 6 vs
      TF's 7 for 8 buckets), and no ONNX op reads the bytes of a string.
    """
    from onnx import TensorProto

    buckets = int(node.get_attr_value("num_buckets"))
    src = ctx.get_node_by_output(node.input[0])
    ints = (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
            TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32)
    if not (src is not None and src.type == "Cast" and src.get_attr_value("to") == TensorProto.STRING
            and ctx.get_dtype(src.input[0]) in ints):
        _refuse(node, "keras.layers.Hashing / StringLookup(num_oov_indices>1) / tf.strings.to_hash_bucket_fast "
                "on strings", "TF hashes with FarmHash Fingerprint64 and no ONNX op reads the bytes of a string "
                "(onnxruntime-extensions' StringToHashBucketFast gives different bucket ids)",
                "hash outside the graph and feed bucket ids, hash integer ids instead (exported exactly), or use a "
                "StringLookup vocabulary with num_oov_indices<=1")
    if not 0 < buckets < 2**62:
        _refuse(node, "keras.layers.Hashing", f"num_buckets={buckets} is out of the supported range (1 .. 2**62-1)",
                "use fewer bins")
    x = src.input[0]
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)

    def op(op_type: str, inputs: list[str], **attrs: Any) -> str:
        return e.out(op_type, inputs, attr=attrs)

    if ctx.get_dtype(x) != TensorProto.INT64:
        x = op("Cast", [x], to=TensorProto.INT64)
    h = _farmhash64_of_int64(op, e.const, x)
    e.node("Identity", [_unsigned_mod(op, e.const, h, buckets)], outputs=outs, dtype=TensorProto.INT64,
           shape=shapes[0])


# farmhash constants
_K0 = 0xC3A5C85C97CB3127
_K1 = 0xB492B66FBE98F273
_K2 = 0x9AE16A3B2F90404F


def _s64(u: int) -> int:
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= (1 << 63) else u


def _farmhash64_of_int64(op: Any, const: Any, x: str) -> str:
    """FarmHash ``Fingerprint64`` (farmhashna ``Hash64``) of the decimal string of int64 ``x``, in ONNX.

    This is what TF computes for ``StringToHashBucketFast(AsString(x))`` (Keras ``Hashing`` on
    integers) before the modulo. Opset 17 has no bitwise ops, so: the decimal digits come from
    ``Div`` / ``Mod`` (``"-"`` for negatives, as TF's ``AsString``), bytes are gathered per
    string length, 64-bit wrapping ``Mul`` / ``Add`` run in int64, logical shifts use uint64
    ``BitShift``, and XOR goes through 64 bit planes recomposed from two exact 32-bit sums
    (onnxruntime's int64 ``ReduceSum`` is only exact below 2**53). Strings of 1-3, 4-7, 8-16 and
    17-20 bytes follow farmhash's ``HashLen0to16`` / ``HashLen17to32`` branches, selected with
    ``Where``. Verified identical to TF on 4081 values (all digit-count boundaries, INT64_MIN/MAX).

    Args:
        op: ``op(op_type, inputs, **attrs) -> output name``.
        const: ``const(np.ndarray) -> name``.
        x: int64 tensor name, any shape.

    Returns:
        int64 tensor (the uint64 hash's bit pattern), shape of ``x``.
    """
    i64 = lambda v: const(np.array(v, np.int64))  # noqa: E731
    U64, I64 = 13, 7

    def cast(a, to):
        return op("Cast", [a], to=to)

    def shr(a, k):  # logical right shift of int64 bit pattern by const k (scalar or array)
        return cast(op("BitShift", [cast(a, U64), const(np.asarray(k, np.uint64))], direction="RIGHT"), I64)

    def shl(a, k):
        return cast(op("BitShift", [cast(a, U64), const(np.asarray(k, np.uint64))], direction="LEFT"), I64)

    # ORT's int64 ReduceSum is not exact beyond 2**53: recompose 64-bit values from two 32-bit halves.
    shifts = (63 - np.arange(64, dtype=np.uint64)).reshape(2, 32)   # bit 32*h + i at [h, i]
    pow2_32 = np.array([1 << i for i in range(32)], np.int64)
    one_axis = const(np.array([-1], np.int64))
    two32 = i64(1 << 32)

    def bits(a):  # [..., 2, 32] int64 0/1
        au = op("Unsqueeze", [cast(a, U64), const(np.array([-1, -2], np.int64))])
        b = op("BitShift", [op("BitShift", [au, const(shifts)], direction="LEFT"), const(np.array(63, np.uint64))],
               direction="RIGHT")
        return cast(b, I64)

    def from_bits(xb):
        parts = op("ReduceSum", [op("Mul", [xb, const(pow2_32)]), one_axis], keepdims=0)   # [..., 2] exact
        lo = op("Gather", [parts, i64(0)], axis=-1)
        hi = op("Gather", [parts, i64(1)], axis=-1)
        return op("Add", [op("Mul", [hi, two32]), lo])

    def xor(a, b):
        ab, bb = bits(a), bits(b)
        xb = op("Sub", [op("Add", [ab, bb]), op("Mul", [op("Mul", [ab, bb]), i64(2)])])
        return from_bits(xb)

    def rot(a, r):
        return a if r == 0 else op("Add", [shr(a, r), shl(a, 64 - r)])  # disjoint bits: | == +

    def shift_mix(v):
        return xor(v, shr(v, 47))

    def hash_len16(u, v, mul):
        a = op("Mul", [xor(u, v), mul])
        a = xor(a, shr(a, 47))
        b = op("Mul", [xor(v, a), mul])
        b = xor(b, shr(b, 47))
        return op("Mul", [b, mul])

    # ---- decimal string of x, as bytes [..., 20] --------------------------------------------
    neg = op("Less", [x, i64(0)])
    w = op("Where", [neg, x, op("Neg", [x])])  # <= 0, no overflow
    p10 = np.array([10 ** k for k in range(19)], np.int64)
    wu = op("Unsqueeze", [w, one_axis])
    digits = op("Neg", [op("Mod", [op("Div", [wu, const(p10)]), i64(10)], fmod=1)])  # [..., 19] digit of 10^k
    ndig = op("Add", [op("ReduceSum", [cast(op("LessOrEqual", [wu, const(-p10[1:])]), I64), one_axis], keepdims=0), i64(1)])
    negi = cast(neg, I64)
    length = op("Add", [ndig, negi])
    pos = const(np.arange(20, dtype=np.int64))
    d = op("Sub", [pos, op("Unsqueeze", [negi, one_axis])])                       # digit position from the left
    e = op("Sub", [op("Sub", [op("Unsqueeze", [ndig, one_axis]), i64(1)]), d])     # its exponent
    e_cl = op("Clip", [e, i64(0), i64(18)])
    dig_at = op("GatherElements", [digits, e_cl], axis=-1)
    chars = op("Where", [op("Less", [pos, op("Unsqueeze", [negi, one_axis])]), i64(45), op("Add", [dig_at, i64(48)])])
    chars = op("Where", [op("Less", [e, i64(0)]), i64(0), chars])  # past the end: 0 (never read)

    def fetch4(offset, n=4):  # little-endian n <= 4 bytes at per-element offset (sum < 2**32: exact)
        idx = op("Add", [op("Unsqueeze", [offset, one_axis]), const(np.arange(n, dtype=np.int64))])
        idx = op("Clip", [idx, i64(0), i64(19)])
        b = op("GatherElements", [chars, idx], axis=-1)
        return op("ReduceSum", [op("Mul", [b, const(np.array([256 ** j for j in range(n)], np.int64))]), one_axis],
                  keepdims=0)

    def fetch(offset, n):
        if n <= 4:
            return fetch4(offset, n)
        return op("Add", [op("Mul", [fetch4(op("Add", [offset, i64(4)])), two32]), fetch4(offset)])

    k0, k1, k2 = i64(_s64(_K0)), i64(_s64(_K1)), i64(_s64(_K2))
    mul = op("Add", [k2, op("Mul", [length, i64(2)])])
    zero = op("Mul", [length, i64(0)])
    # len 8..16
    a8 = op("Add", [fetch(zero, 8), k2])
    b8 = fetch(op("Sub", [length, i64(8)]), 8)
    c8 = op("Add", [op("Mul", [rot(b8, 37), mul]), a8])
    d8 = op("Mul", [op("Add", [rot(a8, 25), b8]), mul])
    h8 = hash_len16(c8, d8, mul)
    # len 4..7
    a4 = fetch(zero, 4)
    h4 = hash_len16(op("Add", [length, shl(a4, 3)]), fetch(op("Sub", [length, i64(4)]), 4), mul)
    # len 1..3
    c0 = fetch(zero, 1)
    c1 = fetch(shr(length, 1), 1)
    c2 = fetch(op("Sub", [length, i64(1)]), 1)
    y = op("Add", [c0, op("Mul", [c1, i64(256)])])
    z = op("Add", [length, op("Mul", [c2, i64(4)])])
    y32 = op("Mod", [y, i64(1 << 32)], fmod=1)
    z32 = op("Mod", [z, i64(1 << 32)], fmod=1)
    h1 = op("Mul", [shift_mix(xor(op("Mul", [y32, k2]), op("Mul", [z32, k0]))), k2])
    # len 17..20
    a17 = op("Mul", [fetch(zero, 8), k1])
    b17 = fetch(op("Add", [zero, i64(8)]), 8)
    c17 = op("Mul", [fetch(op("Sub", [length, i64(8)]), 8), mul])
    d17 = op("Mul", [fetch(op("Sub", [length, i64(16)]), 8), k2])
    h17 = hash_len16(op("Add", [op("Add", [rot(op("Add", [a17, b17]), 43), rot(c17, 30)]), d17]),
                     op("Add", [op("Add", [a17, rot(op("Add", [b17, k2]), 18)]), c17]), mul)
    h = op("Where", [op("Less", [length, i64(4)]), h1, h4])
    h = op("Where", [op("GreaterOrEqual", [length, i64(8)]), h8, h])
    h = op("Where", [op("GreaterOrEqual", [length, i64(17)]), h17, h])
    return h


def _unsigned_mod(op: Any, const: Any, h: str, n: int) -> str:
    """``uint64(h) % n`` as int64, for the int64 bit pattern ``h`` of a uint64 and ``0 < n < 2**62``:
    ``((h >>> 1) % n * 2 + (h & 1)) % n`` with non-negative int64 operands only."""
    i64 = lambda v: const(np.array(v, np.int64))  # noqa: E731
    half = op("Cast", [op("BitShift", [op("Cast", [h], to=13), const(np.array(1, np.uint64))], direction="RIGHT")], to=7)
    low = op("Sub", [h, op("Mul", [half, i64(2)])])
    r = op("Mod", [half, i64(n)], fmod=1)
    return op("Mod", [op("Add", [op("Mul", [r, i64(2)]), low]), i64(n)], fmod=1)


def _hash_strong(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    _refuse(node, "keras.layers.Hashing(salt=...) / tf.strings.to_hash_bucket_strong",
            "it hashes with keyed SipHash-2-4, which neither ONNX nor onnxruntime-extensions computes",
            "use Hashing without salt (FarmHash Fingerprint64, exported exactly), or hash outside the graph")


def _hash_legacy(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    _refuse(node, "tf.strings.to_hash_bucket (deprecated)",
            "it uses TF's legacy Hash64, which no ONNX runtime op reproduces",
            "use tf.strings.to_hash_bucket_fast (FarmHash Fingerprint64, exported exactly)")


def _as_string(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``AsString`` on integers: ONNX ``Cast`` to string (decimal digits, '-' sign, as TF)."""
    from onnx import TensorProto

    in_dtype = ctx.get_dtype(node.input[0])
    fmt = {a: node.get_attr_value(a) for a in ("precision", "scientific", "shortest", "width", "fill")}
    non_default = {k: v for k, v in fmt.items() if v not in (None, -1, False, 0, b"", "")}
    if in_dtype not in (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                        TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64):
        _refuse(node, "tf.strings.as_string / Hashing on non-integer input",
                f"only integers format identically in ONNX Cast-to-string and TF AsString (got ONNX type {in_dtype})",
                "cast to an integer type first, or format the numbers outside the graph")
    if non_default:
        _refuse(node, "tf.strings.as_string", f"formatting attributes {non_default} have no ONNX equivalent",
                "use as_string with default formatting")
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    _Emit(ctx, name).node("Cast", [ins[0]], attr={"to": TensorProto.STRING}, outputs=outs,
                          dtype=TensorProto.STRING, shape=shapes[0])


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _scale_and_translate(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``ScaleAndTranslate`` (``tf.image.resize`` with ``antialias=True``, lanczos3/5, gaussian,
    mitchellcubic): refused, ONNX ``Resize`` has no scale-dependent (anti-aliasing) kernels of these kinds."""
    kernel = node.get_attr_str("kernel_type") if node.get_attr_value("kernel_type") else "?"
    aa = bool(node.get_attr_value("antialias", True))
    _refuse(node, f"tf.image.resize / keras.layers.Resizing (kernel {kernel!r}, antialias={aa})",
            f"it resamples with a {kernel} kernel widened by the scale (ScaleAndTranslate); ONNX Resize only has "
            f"nearest / linear / cubic kernels of fixed support",
            "use method='bilinear' or 'nearest' without antialias (exported within 1e-3 on 0-255 pixels), or resize "
            "outside the graph (in the data loader)")


def _resize_area(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``ResizeArea``: refused (tf2onnx's ONNX ``Resize`` form differs by up to 175 on 0-255 pixels)."""
    _refuse(node, "tf.image.resize(method='area') / keras.layers.Resizing(interpolation='area')",
            "TF averages the exact pixel-area overlap; tf2onnx's ONNX Resize form computes something else "
            "(measured max |diff| 175 on 0-255 pixels)",
            "use method='bilinear' or 'nearest', or resize outside the graph")


def _resize_bicubic(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``ResizeBicubic``: refused (tf2onnx's cubic ``Resize`` differs by 0.15 on 0-255 pixels when
    enlarging, and onnxruntime refuses it when shrinking an NCHW image)."""
    _refuse(node, "tf.image.resize(method='bicubic') / keras.layers.Resizing(interpolation='bicubic')",
            "tf2onnx's ONNX Resize(mode='cubic') does not reproduce TF's bicubic kernel (measured max |diff| 0.15 "
            "on 0-255 pixels when enlarging; onnxruntime rejects it when shrinking)",
            "use method='bilinear' or 'nearest', or resize outside the graph")


def _tf2onnx_version(cls: Any, opset: int) -> Any:
    """tf2onnx's ``version_N`` classmethod of a handler class for the graph's opset (the highest N <= opset)."""
    versions = sorted(int(m[len("version_"):]) for m in dir(cls) if m.startswith("version_"))
    return getattr(cls, f"version_{max(v for v in versions if v <= opset)}")


def _adjust_saturation(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``AdjustSaturation`` (``tf.image.adjust_saturation``, ``images [..., 3]`` RGB, float).

    TF (``adjust_saturation_op.cc``) converts each pixel to HSV, sets
    ``s' = clamp(s * scale, 0, 1)`` and converts back; hue and value stay. Without the HSV round
    trip: with the channels sorted ``max >= mid >= min`` (``TopK``), ``v = max`` is kept,
    ``delta' = s' * v = clamp(delta * scale, 0, max(v, 0))`` (``s = 0`` when ``v <= 0``, as in TF),
    ``min' = v - delta'`` and ``mid' = min' + (mid - min) * delta' / delta`` (keeps the hue).

    tf2onnx builds the same sorted form but puts the channels back with
    ``GatherElements(new, topk_indices)``, which applies the sorting permutation a second time
    instead of inverting it (0.13 off on [0, 1] pixels); here it gathers with the inverse
    permutation (``TopK(indices, largest=0)``'s indices: an argsort), which runs on torch too. Its ``delta * scale`` was also unclamped
    below 0 (negative ``scale``). Matches TF to float32 rounding (the HSV round trip is not bit
    exact in TF either).
    """
    images, factor = node.input[0], node.input[1]
    dtype = ctx.get_dtype(images)
    from onnx import helper

    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    ordered, indices = e.node("TopK", [images, e.const(np.array([3], np.int64), "three")], attr={"axis": -1},
                              output_count=2).output
    split_attr = {"axis": -1, "num_outputs": 3} if ctx.opset >= 18 else {"axis": -1}  # Split-18 wants num_outputs
    max_c, mid_c, min_c = e.node("Split", [ordered], attr=split_attr, output_count=3).output
    zero = e.const(np.array(0, np_dtype), "zero")
    delta = e.out("Sub", [max_c, min_c])
    scaled = e.out("Max", [e.out("Mul", [delta, factor]), zero])
    new_delta = e.out("Min", [scaled, e.out("Max", [max_c, zero])])
    new_min = e.out("Sub", [max_c, new_delta])
    delta_nz = e.out("Add", [delta, e.out("Cast", [e.out("Equal", [delta, zero])], attr={"to": dtype})])
    new_mid = e.out("Add", [new_min, e.out("Mul", [e.out("Sub", [mid_c, min_c]),
                                                    e.out("Div", [new_delta, delta_nz])])])
    new_ordered = e.out("Concat", [max_c, new_mid, new_min], attr={"axis": -1})
    # the inverse permutation: argsort of the sort indices (ascending TopK; the indices are distinct)
    inverse = e.node("TopK", [indices, e.const(np.array([3], np.int64), "three")],
                     attr={"axis": -1, "largest": 0, "sorted": 1}, output_count=2).output[1]
    e.node("GatherElements", [new_ordered, inverse], attr={"axis": -1}, outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _crop_and_resize(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``CropAndResize``: tf2onnx's form (a ``Loop`` of ``Resize(tf_crop_and_resize)`` per box),
    with ``nearest_mode="round_prefer_ceil"`` for ``method="nearest"``.

    TF's kernel (``crop_and_resize_op.cc``) picks ``roundf(in_x)``: half away from zero, and only
    sources in ``[0, size - 1]`` are sampled (others get ``extrapolation_value``), so a .5 tie
    rounds up. ONNX ``Resize``'s default ``round_prefer_floor`` rounded it down (a box of
    ``[0, 0, .5, .5]`` on a 4x4 image, crop 3x3, took pixel 1 instead of 2).
    """
    from tf2onnx.onnx_opset import nn as tf2onnx_nn

    nearest = node.get_attr_value("method", b"bilinear") in (b"nearest", "nearest")
    _tf2onnx_version(tf2onnx_nn.CropAndResize, ctx.opset)(ctx, node)
    if not nearest:
        return
    loop = ctx.get_node_by_name(name)
    patched = 0
    for body in (loop.get_body_graphs() or {}).values() if loop is not None else ():
        for n in body.get_nodes():
            if n.type == "Resize" and n.get_attr_value("mode") in (b"nearest", "nearest"):
                n.set_attr("nearest_mode", "round_prefer_ceil")
                patched += 1
    if patched != 1:
        raise RuntimeError(f"expected one nearest Resize in tf2onnx's CropAndResize loop, found {patched}")


# ---------------------------------------------------------------------------------------------
# strings (onnxruntime-extensions)
# ---------------------------------------------------------------------------------------------
def _regex_replace(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``StaticRegexReplace`` / ``RegexReplace`` -> ``ai.onnx.contrib.StringRegexReplace``.

    Both use RE2 with the same rewrite syntax (``\\1`` back-references); ``replace_global``
    becomes ``global_replace``.
    """
    from onnx import TensorProto

    e = _Emit(ctx, name)
    if node.type == "StaticRegexReplace":
        pattern, rewrite = node.get_attr_str("pattern"), node.get_attr_str("rewrite")
        glob = node.get_attr_value("replace_global", 1)
        ins, outs, dtypes, shapes = _take_over(ctx, node)
        p, r = e.const(np.array([pattern], object), "pattern"), e.const(np.array([rewrite], object), "rewrite")
    else:
        glob = node.get_attr_value("replace_global", 1)
        ins, outs, dtypes, shapes = _take_over(ctx, node)
        p = e.out("Reshape", [ins[1], e.const(np.array([1], np.int64), "shape")])
        r = e.out("Reshape", [ins[2], e.const(np.array([1], np.int64), "shape")])
    e.node("StringRegexReplace", [ins[0], p, r], attr={"global_replace": int(bool(glob))}, domain=CONTRIB_DOMAIN,
           outputs=outs, dtype=TensorProto.STRING, shape=shapes[0])


def _ascii_case(e: _Emit, x: str, upper: bool, outs: list[str] | None, shape: Any) -> str:
    from onnx import TensorProto

    src, dst = ("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ") if upper else \
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
    for i, (a, b) in enumerate(zip(src, dst)):
        last = i == len(src) - 1
        x = e.out("StringRegexReplace", [x, e.const(np.array([a], object), "pattern"),
                                         e.const(np.array([b], object), "rewrite")],
                  attr={"global_replace": 1}, domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING, shape=shape,
                  outputs=outs if last else None)
    return x


def _lower_upper(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``StringLower`` / ``StringUpper`` with ``encoding=""``: ASCII letters only, locale-free."""
    encoding = node.get_attr_str("encoding") if node.get_attr_value("encoding") else ""
    if encoding:
        _refuse(node, f"tf.strings.{node.type[6:].lower()}(encoding={encoding!r})",
                "Unicode case mapping (ICU in TF) has no exact ONNX / onnxruntime-extensions equivalent",
                "use the default encoding='' (ASCII case mapping, what Keras TextVectorization uses), or "
                "case-fold outside the graph")
    upper = node.type == "StringUpper"
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    _ascii_case(_Emit(ctx, name), ins[0], upper, outs, shapes[0])


def _split_v2(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``StringSplitV2`` -> ``ai.onnx.contrib.StringSplit`` (indices, values, dense shape).

    ``sep=""`` (whitespace): ``\\t\\n\\v\\f\\r`` are first replaced by spaces, then split on
    ``" "`` skipping empty tokens (TF skips runs of ASCII whitespace). A non-empty single-byte
    ``sep`` keeps empty tokens, as TF does. ``maxsplit`` other than -1 and multi-byte separators
    are refused.
    """
    from onnx import TensorProto

    maxsplit = node.get_attr_value("maxsplit", -1)
    sep = _const_value(ctx, node.input[1])
    if sep is None:
        _refuse(node, "tf.strings.split", "the separator is not a constant", "use a constant sep")
    sep = _as_str(sep)
    if maxsplit not in (-1, None):
        _refuse(node, "tf.strings.split(maxsplit=...)", f"maxsplit={maxsplit} has no onnxruntime-extensions equivalent",
                "split without maxsplit")
    if len(sep.encode("utf-8")) > 1:
        _refuse(node, "tf.strings.split(sep=...)", f"multi-byte separator {sep!r} is not supported "
                "(onnxruntime-extensions splits on any one of its characters)", "use a single-byte separator")
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    e = _Emit(ctx, name)
    x = ins[0]
    if sep == "":
        x = e.out("StringRegexReplace", [x, e.const(np.array([f"[{_ASCII_SPACE_BUT_BLANK}]"], object), "pattern"),
                                         e.const(np.array([" "], object), "rewrite")],
                  attr={"global_replace": 1}, domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING)
        sep, skip = " ", True
        n = e.node("StringSplit", [x, e.const(np.array([sep], object), "sep"),
                                   e.const(np.array([skip]), "skip_empty")], domain=CONTRIB_DOMAIN, outputs=outs)
    else:
        # TF splits "" into [""] (python's str.split); onnxruntime-extensions gives []. Prefix every
        # string with a sentinel byte (never the separator), split, then drop the sentinel from the
        # first token of each row only.
        sentinel = "\x01" if sep != "\x01" else "\x02"
        prefixed = e.out("StringConcat", [e.out("Expand", [e.const(np.array(sentinel, object), "sentinel"),
                                                           e.out("Shape", [x])]), x],
                         domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING)
        split = e.node("StringSplit", [prefixed, e.const(np.array([sep], object), "sep"),
                                       e.const(np.array([False]), "skip_empty")], domain=CONTRIB_DOMAIN,
                       outputs=[outs[0], e.name("values") + ":0", outs[2]])
        raw_values = split.output[1]
        stripped = e.out("StringRegexReplace", [raw_values, e.const(np.array(["^" + sentinel], object), "pattern"),
                                                e.const(np.array([""], object), "rewrite")],
                         attr={"global_replace": 0}, domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING)
        col = e.out("Squeeze", [e.out("Slice", [outs[0], e.const(np.array([1], np.int64), "s"),
                                                e.const(np.array([2], np.int64), "e"),
                                                e.const(np.array([1], np.int64), "a")]),
                                e.const(np.array([1], np.int64), "ax")])
        first = e.out("Equal", [col, e.const(np.array(0, np.int64), "zero")])
        n = e.node("Where", [first, stripped, raw_values], outputs=[outs[1]])
        ctx.set_dtype(raw_values, TensorProto.STRING)
    for o, dt in zip(outs, (TensorProto.INT64, TensorProto.STRING, TensorProto.INT64)):
        ctx.set_dtype(o, dt)
    ctx.set_shape(outs[0], [-1, 2])
    ctx.set_shape(outs[1], [-1])
    ctx.set_shape(outs[2], [2])
    del n


def _string_join(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``StringJoin`` (elementwise concatenation with a separator) -> ``StringConcat`` chain."""
    from onnx import TensorProto

    sep = node.get_attr_str("separator") if node.get_attr_value("separator") else ""
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    if len(ins) == 1:
        e.node("Identity", ins, outputs=outs, dtype=TensorProto.STRING, shape=shapes[0])
        return
    acc = ins[0]
    sep_full = None
    if sep:  # StringConcat needs equal shapes: broadcast the separator to the first input's shape
        sep_full = e.out("Expand", [e.const(np.array(sep, object), "sep"), e.out("Shape", [ins[0]])])
    for i, x in enumerate(ins[1:]):
        if sep_full is not None:
            acc = e.out("StringConcat", [acc, sep_full], domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING)
        last = i == len(ins) - 2
        acc = e.out("StringConcat", [acc, x], domain=CONTRIB_DOMAIN, dtype=TensorProto.STRING,
                    outputs=outs if last else None, shape=shapes[0] if last else None)


def _reduce_join(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``ReduceJoin`` over one constant axis, ``keep_dims=False`` -> ``ai.onnx.contrib.StringJoin``."""
    from onnx import TensorProto

    sep = node.get_attr_str("separator") if node.get_attr_value("separator") else ""
    keep = node.get_attr_value("keep_dims", 0)
    axes = _const_value(ctx, node.input[1])
    if axes is None or np.asarray(axes).size != 1 or keep:
        _refuse(node, "tf.strings.reduce_join", "only one constant axis with keepdims=False is supported",
                "reduce over one axis at a time")
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    e = _Emit(ctx, name)
    e.node("StringJoin", [ins[0], e.const(np.array([sep], object), "sep"),
                          e.const(np.asarray(axes, np.int64).reshape(1), "axis")],
           domain=CONTRIB_DOMAIN, outputs=outs, dtype=TensorProto.STRING, shape=shapes[0])


def _equal(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """TF ``Equal`` / ``NotEqual``: strings -> ``ai.onnx.contrib.StringEqual``; else tf2onnx's own."""
    from onnx import TensorProto
    from tf2onnx.onnx_opset import logical

    if ctx.get_dtype(node.input[0]) != TensorProto.STRING:
        versions = sorted(int(m[len("version_"):]) for m in dir(logical.Equal) if m.startswith("version_"))
        best = max(v for v in versions if v <= ctx.opset)
        getattr(logical.Equal, f"version_{best}")(ctx, node)
        return
    negate = node.type == "NotEqual"
    ins, outs, dtypes, shapes = _take_over(ctx, node)
    e = _Emit(ctx, name)
    if negate:
        eq = e.out("StringEqual", ins[:2], domain=CONTRIB_DOMAIN, dtype=TensorProto.BOOL)
        e.node("Not", [eq], outputs=outs, dtype=TensorProto.BOOL, shape=shapes[0])
    else:
        e.node("StringEqual", ins[:2], domain=CONTRIB_DOMAIN, outputs=outs, dtype=TensorProto.BOOL, shape=shapes[0])


_HANDLED_OPS = ("Bucketize", "LookupTableFindV2", "LookupTableSizeV2", "StringToHashBucketFast",
                "StringToHashBucketStrong", "StringToHashBucket", "StaticRegexReplace", "RegexReplace",
                "StringLower", "StringUpper", "StringSplitV2", "StringJoin", "ReduceJoin", "AsString",
                "ScaleAndTranslate", "ResizeArea", "ResizeBicubic", "RaggedBincount", "SelectV2", "FloorMod",
                "FloorDiv", "OneHot", "ScatterNd", "Slice", "MatrixBandPart", "AdjustSaturation", "CropAndResize")


def _register_refusals() -> None:
    from mmbridge.export.rewrites import ONNX_REWRITES, register_onnx_rewrite

    for op in _HANDLED_OPS:
        if ONNX_REWRITES.get(op) is not _refusal_rewrite:
            register_onnx_rewrite(op, _refusal_rewrite, override=True)


_register_refusals()
preload_extensions()

__all__ = ["tf2onnx_handlers", "table_contents", "preload_extensions", "CONTRIB_DOMAIN"]
