"""Shape arithmetic folded at conversion: int64 values computed from ONNX ``Shape`` as expressions over dims.

tf2onnx writes every shape that depends on a dynamic dim (the batch, a sequence length) as a
chain of int64 tensor ops: ``Shape -> Gather / Slice -> Concat -> Expand`` (TF's
``zeros([batch, units])``, ``broadcast_to``, ``reshape([batch, -1, heads, d])``). onnx2torch
runs the chain on tensors and then builds a ``torch.Size`` from the result, which
``torch.compile`` cannot trace ("torch.Size() takes an iterable of int (item 0 is FakeTensor)")
and which forces a graph break (``.tolist()``) where it does not fail.

:func:`shape_expr` walks such a chain backwards from a shape argument at conversion time and,
when every step is one it knows, returns a :class:`ShapeExpr`: one expression per element, over
Python ints and ``x.shape[i]`` of the tensors it names (its ``sources``). The consumer's module
takes those tensors as extra call inputs and evaluates the expression in Python
(:func:`evaluate`), so under dynamo the dims are symbolic ints (``SymInt``) and the whole
chain traces into the graph without a break; in eager mode they are plain ints. Dims that shape
inference pins are folded to ints here, so a chain over static dims becomes a constant.

Steps understood (everything else leaves the argument a runtime tensor, as before): ``Shape``
(``start`` / ``end``), constants (int initializers / ``Constant`` of at most :data:`MAX_ELEMENTS`
elements, rank 0 or 1), ``Identity``, ``Cast`` to an integer type, ``Gather`` / ``Slice`` with
constant indices on a 1-D value, ``Concat``, ``Unsqueeze`` of a scalar, ``Squeeze`` of one
element, ``Reshape`` to rank 0 / 1, element-wise ``Add`` / ``Sub`` / ``Mul`` / ``Div`` /
``Max`` / ``Min`` (scalar broadcasting), ``ReduceProd`` / ``ReduceSum`` over the one axis.

Numerics: the values are integers, computed exactly. ONNX integer ``Div`` truncates toward zero;
on ints known here it does so exactly, on dims (``>= 0``) ``//`` is the same; a ``Div`` whose
operand is negative and not known at conversion is not folded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from onnx2torch.onnx_graph import OnnxGraph

from mmbridge.convert.ops._common import const, input_at, static_dims

MAX_ELEMENTS = 64
"""Integer constants with more elements than this are not shape arithmetic (not folded)."""

MAX_DEPTH = 64
"""How many producers back :func:`shape_expr` follows a chain before giving up."""

Expr = int | tuple
"""An int; ``("dim", k, axis)``: ``sources[k].shape[axis]``; ``(op, a, b)`` with op in :data:`_BINARY`."""

_BINARY = ("add", "sub", "mul", "div", "max", "min")
_ONNX_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "max", "Min": "min"}
_INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # onnx.TensorProto UINT8 INT8 UINT16 INT16 INT32 INT64 UINT32 UINT64


class ShapeExpr:
    """An int64 ONNX value (rank 0 or 1) as expressions over ``sources[k].shape[i]`` and ints.

    Attributes:
        elems: one :data:`Expr` per element (flattened).
        scalar: True for a rank-0 value, False for rank 1.
        sources: ONNX value names whose shapes the expressions read, indexed by ``k``.
    """

    def __init__(self, elems: Sequence[Expr], scalar: bool, sources: list[str]):
        self.elems, self.scalar, self.sources = tuple(elems), scalar, sources

    @property
    def is_constant(self) -> bool:
        """True when every element is a Python int (no dim is read at run time)."""
        return all(isinstance(e, int) for e in self.elems)

    def ints(self) -> list[int]:
        """The elements as Python ints (only when :attr:`is_constant`)."""
        return [int(e) for e in self.elems]


def evaluate(elems: Sequence[Expr], tensors: Sequence[torch.Tensor]) -> list[Any]:
    """Evaluate expressions from :class:`ShapeExpr` against the source tensors (ints, or SymInts under dynamo)."""
    return [_eval(e, tensors) for e in elems]


def _eval(e: Expr, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(e, int):
        return e
    tag = e[0]
    if tag == "dim":
        return tensors[e[1]].shape[e[2]]
    return _apply(tag, _eval(e[1], tensors), _eval(e[2], tensors))


def _apply(op: str, a: Any, b: Any) -> Any:
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        if isinstance(a, int) and isinstance(b, int):
            q = abs(a) // abs(b)  # ONNX integer Div truncates toward zero
            return q if (a >= 0) == (b >= 0) else -q
        return a // b  # operands are dims (>= 0) or positive ints: floor == trunc
    if op in ("max", "min"):
        if isinstance(a, int) and isinstance(b, int):
            return max(a, b) if op == "max" else min(a, b)
        return torch.sym_max(a, b) if op == "max" else torch.sym_min(a, b)
    raise ValueError(f"unknown shape op {op!r}")


def _binary(op: str, a: Expr, b: Expr) -> Expr | None:
    if isinstance(a, int) and isinstance(b, int):
        if op == "div" and b == 0:
            return None
        return _apply(op, a, b)
    if op == "div" and not (isinstance(b, int) and b > 0 and _nonneg(a)):
        return None  # floor and truncation differ for a negative operand
    return (op, a, b)


def _nonneg(e: Expr) -> bool:
    """True when ``e`` is known to be >= 0 (dims, and sums / products / quotients / max / min of such)."""
    if isinstance(e, int):
        return e >= 0
    if e[0] == "dim":
        return True
    return e[0] in ("add", "mul", "div", "max", "min") and _nonneg(e[1]) and _nonneg(e[2])


def shape_expr(graph: OnnxGraph, name: str, sources: list[str] | None = None) -> ShapeExpr | None:
    """``name`` (an int ONNX value of rank 0 / 1) as a :class:`ShapeExpr`, or None when it is not shape arithmetic.

    Args:
        graph: the onnx2torch graph being converted (shape inference has run: ``value_info``).
        name: the value, e.g. the ``shape`` input of an ``Expand``.
        sources: a list to append source names to (shared between several arguments of one
            node so they index one list); a new one when None.
    """
    if not name:
        return None
    sources = [] if sources is None else sources
    own: list[str] = []
    got = _walk(graph, name, own, 0)
    if got is None:
        return None
    elems, scalar = got
    used: set[int] = set()
    for e in elems:
        _used(e, used)
    remap = {k: _source(sources, own[k]) for k in sorted(used)}  # sources whose dims were folded away are dropped
    return ShapeExpr([_remap(e, remap) for e in elems], scalar, sources)


def _used(e: Expr, out: set[int]) -> None:
    if isinstance(e, tuple):
        if e[0] == "dim":
            out.add(e[1])
        else:
            _used(e[1], out)
            _used(e[2], out)


def _remap(e: Expr, remap: dict[int, int]) -> Expr:
    if isinstance(e, int):
        return e
    if e[0] == "dim":
        return ("dim", remap[e[1]], e[2])
    return (e[0], _remap(e[1], remap), _remap(e[2], remap))


def _source(sources: list[str], name: str) -> int:
    if name not in sources:
        sources.append(name)
    return sources.index(name)


def _dims_of(graph: OnnxGraph, name: str) -> list[int | None] | None:
    if name in graph.initializers:
        return [int(d) for d in graph.initializers[name].proto.dims]
    return static_dims(graph, name)


def _broadcast(x: tuple[list[Expr], bool], y: tuple[list[Expr], bool]):
    """Element lists of two operands broadcast to one length (a scalar or a 1-element vector repeats)."""
    (xe, xs), (ye, ys) = x, y
    if len(xe) != len(ye):
        if len(xe) == 1:
            xe = xe * len(ye)
        elif len(ye) == 1:
            ye = ye * len(xe)
        else:
            return None
    return (xe, xs), (ye, ys)


def _walk(graph: OnnxGraph, name: str, sources: list[str], depth: int) -> tuple[list[Expr], bool] | None:
    if depth > MAX_DEPTH:
        return None
    value = const(graph, name)
    if value is not None:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        if value.dim() > 1 or value.numel() > MAX_ELEMENTS:
            return None
        return [int(v) for v in value.reshape(-1).tolist()], value.dim() == 0
    try:
        node, _ = graph.value_as_node_output(name)
    except KeyError:
        return None
    op, a = node.operation_type, node.attributes
    if node.domain not in ("", "ai.onnx"):
        return None

    def arg(k: int):
        return _walk(graph, input_at(node, k), sources, depth + 1)

    if op == "Shape":
        x = node.input_values[0]
        dims = _dims_of(graph, x)
        if dims is None:
            return None
        rank = len(dims)
        start, end = int(a.get("start", 0)), a.get("end")
        end = rank if end is None else int(end)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        start, end = min(max(start, 0), rank), min(max(end, 0), rank)
        out: list[Expr] = []
        for i in range(start, end):
            out.append(dims[i] if dims[i] is not None else ("dim", _source(sources, x), i))
        return out, False
    if op == "Identity":
        return arg(0)
    if op == "Cast":
        return arg(0) if int(a.get("to", 0)) in _INT_TYPES else None
    if op == "Gather":
        data, idx = arg(0), const(graph, input_at(node, 1))
        if data is None or idx is None or data[1] or int(a.get("axis", 0)) not in (0, -1) or idx.dim() > 1:
            return None
        elems, n = data[0], len(data[0])
        picked = []
        for i in idx.reshape(-1).tolist():
            i = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= i < n:
                return None
            picked.append(elems[i])
        return picked, idx.dim() == 0
    if op == "Slice":
        data = arg(0)
        args = [const(graph, input_at(node, k)) for k in range(1, 5)]
        if data is None or data[1] or args[0] is None or args[1] is None:
            return None
        if any(v is not None and v.numel() != 1 for v in args):
            return None
        if args[2] is not None and int(args[2].reshape(-1)[0]) not in (0, -1):
            return None
        step = 1 if args[3] is None else int(args[3].reshape(-1)[0])
        if step == 0:
            return None
        s, e = int(args[0].reshape(-1)[0]), int(args[1].reshape(-1)[0])
        n = len(data[0])
        s, e = max(min(s, n), -n - 1), max(min(e, n), -n - 1)  # ONNX clamps the int64 extremes; python slices the rest alike
        return list(data[0][s:e:step]), False
    if op == "Concat":
        if int(a.get("axis", 0)) not in (0, -1):
            return None
        out = []
        for k in range(len(node.input_values)):
            part = arg(k)
            if part is None or part[1]:
                return None
            out.extend(part[0])
        return out, False
    if op == "Unsqueeze":
        data = arg(0)
        axes = a.get("axes")
        axes = list(axes) if axes is not None else (None if len(node.input_values) < 2 else const(graph, input_at(node, 1)))
        if data is None or not data[1] or axes is None or [int(v) for v in (axes.reshape(-1).tolist()
                                                                          if isinstance(axes, torch.Tensor) else axes)] not in ([0], [-1]):
            return None
        return data[0], False
    if op == "Squeeze":
        data = arg(0)
        if data is None or data[1] or len(data[0]) != 1:
            return None
        return data[0], True
    if op == "Reshape":
        data, target = arg(0), const(graph, input_at(node, 1))
        if data is None or target is None or target.numel() > 1:
            return None
        if target.numel() == 0:
            return (data[0], True) if len(data[0]) == 1 else None
        return (data[0], False) if int(target.reshape(-1)[0]) in (-1, len(data[0])) else None
    if op in _ONNX_BINARY:
        x, y = arg(0), arg(1)
        if x is None or y is None:
            return None
        b = _broadcast(x, y)
        if b is None:
            return None
        (xe, xs), (ye, ys) = b
        out = []
        for p, q in zip(xe, ye):
            r = _binary(_ONNX_BINARY[op], p, q)
            if r is None:
                return None
            out.append(r)
        return out, xs and ys
    if op == "Equal":  # only where the answer is known here: ints, or a dim (>= 0) against a negative int
        x, y = arg(0), arg(1)
        if x is None or y is None:
            return None
        (xe, xs), (ye, ys) = _broadcast(x, y) or ((None, None), (None, None))
        if xe is None:
            return None
        out = []
        for p, q in zip(xe, ye):
            if isinstance(p, int) and isinstance(q, int):
                out.append(int(p == q))
            elif (isinstance(q, int) and q < 0 and _nonneg(p)) or (isinstance(p, int) and p < 0 and _nonneg(q)):
                out.append(0)
            else:
                return None
        return out, xs and ys
    if op == "Where":  # TF's slice size -1 ("to the end"): the condition is known here
        c, x, y = arg(0), arg(1), arg(2)
        if c is None or x is None or y is None or not all(isinstance(v, int) for v in c[0]):
            return None
        n = max(len(c[0]), len(x[0]), len(y[0]))
        parts = []
        for v in (c, x, y):
            if len(v[0]) not in (1, n):
                return None
            parts.append(v[0] * n if len(v[0]) == 1 else v[0])
        return [p if cond else q for cond, p, q in zip(*parts)], c[1] and x[1] and y[1]
    if op in ("ReduceProd", "ReduceSum"):
        data = arg(0)
        if data is None or data[1]:
            return None
        axes = a.get("axes")
        if axes is None and len(node.input_values) > 1:
            axes = const(graph, input_at(node, 1))
            if axes is None:
                return None
            axes = axes.reshape(-1).tolist()
        if axes is not None and [int(v) for v in axes] not in ([], [0], [-1]):
            return None
        if axes is not None and len(axes) == 0 and int(a.get("noop_with_empty_axes", 0)):
            return data
        total: Expr = 1 if op == "ReduceProd" else 0
        for e in data[0]:
            total = _binary("mul" if op == "ReduceProd" else "add", total, e)
        keep = bool(a.get("keepdims", 1))
        return [total], not keep
    return None
