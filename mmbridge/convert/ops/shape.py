"""``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Expand``, ``Tile``, ``ConstantOfShape``, ``Range``, ``Shape``:
constant arguments become Python ints.

tf2onnx passes shapes and axes as tensors (initializers, or targets that
:func:`mmbridge.convert.core.to_torch` makes constant where shape inference pins them). onnx2torch
reads them at run time (``torch.Size(tensor)``, ``.tolist()``), which ``torch.compile`` cannot
trace without a graph break. When the argument is constant it is folded into the module here,
so CNN and transformer bridges compile with ``fullgraph=True``; otherwise the argument stays a
call input, read at run time -- unless it is shape arithmetic over ``Shape`` (a dynamic batch or
sequence length: ``Shape -> Gather -> Concat``), which :mod:`._symbolic` folds into expressions
over ``x.shape[i]`` of the tensors the module then takes as extra call inputs; dynamo traces
those as symbolic ints (``Reshape``, ``Expand``, ``Tile``, ``ConstantOfShape``, integer
``Range``, GPT-2's float ``Range(0, float(T), 1)``; ``Slice`` in :mod:`.slice`).

``ConstantOfShape`` of a ``Shape`` whose input dims shape inference knows is folded too.
``Shape`` (``start`` / ``end`` slices, 15+) builds its output from ``x.shape``, which dynamo
sees as Python ints on a static spec. ``Range`` with constant inputs is computed once, here, as
onnxruntime computes it (``ceil((limit - start) / delta)`` elements, each the previous plus
``delta`` in the inputs' dtype) and kept as a buffer; with runtime inputs it is computed at run
time in the inputs' dtype (onnx2torch returned int64 / float32 whatever the inputs).

Negative axes follow ONNX: ``Squeeze`` counts from the input's rank, ``Unsqueeze`` from the
output's.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const, const_ints, delegate, input_at, register, result, static_dims
from mmbridge.convert.ops._symbolic import Expr, ShapeExpr, evaluate, shape_expr


class Reshape(nn.Module, OnnxToTorchModule):
    """ONNX ``Reshape``: ``0`` copies the input dim (``allowzero=0``; with ``allowzero=1`` it is a
    zero-size dim), ``-1`` is inferred.

    With a constant target (``shape`` of ints given at construction) the dims are Python ints, so
    ``torch.compile`` traces it without a graph break (onnx2torch's ``OnnxReshape`` builds a
    ``torch.Size`` from a tensor, which dynamo rejects). A target computed from ``Shape``
    (``shape`` of :data:`~._symbolic.Expr`, see :mod:`._symbolic`) is evaluated from
    ``sources[k].shape[i]``, the tensors passed after ``x``: symbolic ints under dynamo, no
    break. Otherwise (``shape=None``) the target tensor (int64 ``[rank]``) is read at run time.
    A ``0`` that comes from a dim at run time (an empty tensor) is taken literally.
    """

    def __init__(self, shape: tuple[Expr, ...] | list[Expr] | None = None, allowzero: bool = False):
        super().__init__()
        self.shape = tuple(d if isinstance(d, tuple) else int(d) for d in shape) if shape is not None else None
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        dims = evaluate(self.shape, args) if self.shape is not None else [int(d) for d in args[0].tolist()]
        if self.allowzero:
            return x.reshape(dims)
        return x.reshape([x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)])

    def extra_repr(self) -> str:
        return f"shape={self.shape}" if self.shape is not None else "shape=<runtime>"


class Squeeze(nn.Module, OnnxToTorchModule):
    """ONNX ``Squeeze`` with fixed ``axes`` (None: every dim of size 1)."""

    def __init__(self, axes: list[int] | None):
        super().__init__()
        self.axes = list(axes) if axes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axes is None:
            return torch.squeeze(x)
        for a in sorted({a % x.dim() for a in self.axes}, reverse=True):  # one dim at a time: the same result,
            x = torch.squeeze(x, a)  # and torch.onnx.export (TorchScript) can trace it (its squeeze takes one dim)
        return x

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


class Unsqueeze(nn.Module, OnnxToTorchModule):
    """ONNX ``Unsqueeze`` with fixed ``axes`` (negative ones count from the output rank)."""

    def __init__(self, axes: list[int]):
        super().__init__()
        self.axes = list(axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_rank = x.dim() + len(self.axes)
        for a in sorted(a % out_rank for a in self.axes):
            x = torch.unsqueeze(x, a)
        return x

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


class Expand(nn.Module, OnnxToTorchModule):
    """ONNX ``Expand``: bidirectional broadcast of ``x`` with ``shape``.

    ``shape`` is fixed at construction: Python ints, or expressions over the dims of the tensors
    passed after ``x`` (:mod:`._symbolic`: a shape tf2onnx computes from ``Shape``, such as TF's
    ``zeros([batch, units])``), which dynamo traces as symbolic ints. Returns a broadcast view
    (``Tensor.expand``), no copy.
    """

    def __init__(self, shape: list[Expr] | tuple[Expr, ...]):
        super().__init__()
        self.shape = tuple(d if isinstance(d, tuple) else int(d) for d in shape)

    def forward(self, x: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        dims = tuple(evaluate(self.shape, sources))
        return x.expand(torch.broadcast_shapes(tuple(x.shape), dims))

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Tile(nn.Module, OnnxToTorchModule):
    """ONNX ``Tile`` with ``repeats`` (one per input dim) fixed at construction: ints, or expressions over the
    dims of the tensors passed after ``x`` (:mod:`._symbolic`)."""

    def __init__(self, repeats: list[Expr] | tuple[Expr, ...]):
        super().__init__()
        self.repeats = tuple(r if isinstance(r, tuple) else int(r) for r in repeats)

    def forward(self, x: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        return x.repeat(evaluate(self.repeats, sources))

    def extra_repr(self) -> str:
        return f"repeats={self.repeats}"


def shape_arg(graph: OnnxGraph, name: str) -> ShapeExpr | None:
    """The int argument ``name`` as a :class:`~._symbolic.ShapeExpr` (constant, or shape arithmetic), or None."""
    if not name:
        return None
    value = const_ints(graph, name)
    if value is not None:
        return ShapeExpr(value, False, [])
    return shape_expr(graph, name)


@register("Reshape", 5, 13, 14, 19, 21, 23, 24, 25)
def reshape(node: OnnxNode, graph: OnnxGraph):
    allowzero = bool(node.attributes.get("allowzero", 0))
    target = shape_arg(graph, input_at(node, 1))
    if target is not None and not target.scalar:
        return result(Reshape(target.elems, allowzero), node, (node.input_values[0], *target.sources))
    return result(Reshape(allowzero=allowzero), node, node.input_values[:2])


@register("Squeeze", 1, 11)
def squeeze_attribute_axes(node: OnnxNode, graph: OnnxGraph):
    return result(Squeeze(node.attributes.get("axes")), node, (node.input_values[0],))


@register("Squeeze", 13, 21, 23, 24, 25)
def squeeze(node: OnnxNode, graph: OnnxGraph):
    name = input_at(node, 1)
    axes = const_ints(graph, name)
    if name and axes is None:
        return delegate(node, graph, 13)  # computed axes: onnx2torch's OnnxSqueezeDynamicAxes
    return result(Squeeze(axes), node, (node.input_values[0],))


@register("Unsqueeze", 1, 11)
def unsqueeze_attribute_axes(node: OnnxNode, graph: OnnxGraph):
    return result(Unsqueeze(list(node.attributes["axes"])), node, (node.input_values[0],))


@register("Unsqueeze", 13, 21, 23, 24, 25)
def unsqueeze(node: OnnxNode, graph: OnnxGraph):
    axes = const_ints(graph, input_at(node, 1))
    if axes is None:
        return delegate(node, graph, 13)  # computed axes: onnx2torch's OnnxUnsqueezeDynamicAxes
    return result(Unsqueeze(axes), node, (node.input_values[0],))


@register("Expand", 8, 13)
def expand(node: OnnxNode, graph: OnnxGraph):
    shape = shape_arg(graph, input_at(node, 1))
    if shape is None or shape.scalar:
        return delegate(node, graph, 13)  # computed shape: onnx2torch's OnnxExpand
    return result(Expand(shape.elems), node, (node.input_values[0], *shape.sources))


@register("Tile", 6, 13)
def tile(node: OnnxNode, graph: OnnxGraph):
    repeats = shape_arg(graph, input_at(node, 1))
    if repeats is None or repeats.scalar:
        return delegate(node, graph, 13)  # computed repeats: onnx2torch's OnnxTile
    return result(Tile(repeats.elems), node, (node.input_values[0], *repeats.sources))


class ConstantOfShape(nn.Module, OnnxToTorchModule):
    """ONNX ``ConstantOfShape``: a tensor of ``shape`` filled with ``value`` (default float32 0).

    With ``shape`` given at construction the dims are Python ints or expressions over the dims
    of the call inputs (:mod:`._symbolic`); otherwise (None) the int64 ``shape`` tensor is read
    at run time.
    """

    def __init__(self, value: torch.Tensor, shape: list[Expr] | None = None):
        super().__init__()
        self.fill = value.reshape(-1)[0].item()
        self.dtype = value.dtype
        self.shape = tuple(d if isinstance(d, tuple) else int(d) for d in shape) if shape is not None else None
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        dims = evaluate(self.shape, args) if self.shape is not None else [int(d) for d in args[0].tolist()]
        return torch.full(dims, self.fill, dtype=self.dtype, device=self._device.device)

    def extra_repr(self) -> str:
        return f"shape={self.shape if self.shape is not None else '<runtime>'}, value={self.fill}, dtype={self.dtype}"


def static_shape_value(graph: OnnxGraph, name: str) -> list[int] | None:
    """The value of ``name`` as Python ints when it is constant, or the ``Shape`` (slice) of a value whose dims
    shape inference knows; None otherwise."""
    value = const_ints(graph, name)
    if value is not None or not name:
        return value
    try:
        producer, _ = graph.value_as_node_output(name)
    except KeyError:
        return None
    if producer.operation_type != "Shape":
        return None
    dims = static_dims(graph, producer.input_values[0])
    if dims is None:
        return None
    a = producer.attributes
    end = a.get("end")
    dims = dims[int(a.get("start", 0)):None if end is None else int(end)]
    return None if any(d is None for d in dims) else [int(d) for d in dims]


@register("ConstantOfShape", 9, 20, 21, 23, 24, 25)
def constant_of_shape(node: OnnxNode, graph: OnnxGraph):
    value = node.attributes.get("value")
    value = value.to_torch() if value is not None else torch.zeros(1, dtype=torch.float32)
    shape = static_shape_value(graph, input_at(node, 0))
    if shape is not None:
        return result(ConstantOfShape(value, shape), node, ())
    sym = shape_expr(graph, input_at(node, 0))
    if sym is not None and not sym.scalar:
        return result(ConstantOfShape(value, list(sym.elems)), node, tuple(sym.sources))
    return result(ConstantOfShape(value), node, node.input_values[:1])


def range_values(start, limit, delta) -> np.ndarray:
    """ONNX ``Range`` as onnxruntime computes it: ``max(ceil((limit - start) / delta), 0)`` values, accumulated."""
    start, limit, delta = (np.asarray(v) for v in (start, limit, delta))
    dtype = start.dtype
    if np.issubdtype(dtype, np.integer):
        n = max(int(-(-(int(limit) - int(start)) // int(delta))), 0)
    else:
        n = max(int(np.ceil((float(limit) - float(start)) / float(delta))), 0)
    out = np.empty(n, dtype)
    value = start.astype(dtype)
    for i in range(n):
        out[i] = value
        value = (value + delta).astype(dtype)
    return out


class ConstRange(nn.Module, OnnxToTorchModule):
    """ONNX ``Range`` of constant inputs: its values, computed at conversion, as a buffer."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(values)), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.values

    def extra_repr(self) -> str:
        return f"n={self.values.numel()}, dtype={self.values.dtype}"


class Range(nn.Module, OnnxToTorchModule):
    """ONNX ``Range`` of runtime scalars, in their dtype (read with ``.item()``: a graph break under dynamo)."""

    def forward(self, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        values = range_values(start.cpu().numpy(), limit.cpu().numpy(), delta.cpu().numpy())
        return torch.from_numpy(values).to(start.device)


class SymRange(nn.Module, OnnxToTorchModule):
    """ONNX ``Range`` of integer scalars computed from ``Shape`` (:mod:`._symbolic`): ``torch.arange`` over
    symbolic ints (the same ``max(ceil((limit - start) / delta), 0)`` values ORT gives for integers), in
    ``dtype``; the call inputs are the tensors whose dims the expressions read."""

    def __init__(self, start: Expr, limit: Expr, delta: Expr, dtype: torch.dtype):
        super().__init__()
        self.args, self.dtype = (start, limit, delta), dtype
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def forward(self, *sources: torch.Tensor) -> torch.Tensor:
        start, limit, delta = evaluate(self.args, sources)
        return torch.arange(start, limit, delta, dtype=self.dtype, device=self._device.device)

    def extra_repr(self) -> str:
        return f"start={self.args[0]}, limit={self.args[1]}, delta={self.args[2]}, dtype={self.dtype}"


_INT_DTYPES = {6: torch.int32, 7: torch.int64, 5: torch.int16, 3: torch.int8}  # onnx.TensorProto elem types


@register("Range", 11)
def range_(node: OnnxNode, graph: OnnxGraph):

    values = [const(graph, name) for name in node.input_values[:3]]
    if all(v is not None for v in values):
        return result(ConstRange(range_values(*(v.numpy() for v in values))), node, ())
    vi = graph.value_info.get(node.output_values[0])
    dtype = _INT_DTYPES.get(vi.type.tensor_type.elem_type) if vi is not None else None
    if dtype is not None:
        sources: list[str] = []
        args = [shape_expr(graph, name, sources) for name in node.input_values[:3]]
        if all(a is not None and len(a.elems) == 1 for a in args):
            return result(SymRange(*(a.elems[0] for a in args), dtype), node, tuple(sources))
    elif vi is not None and vi.type.tensor_type.elem_type == 1:  # float32: GPT-2's tf.range(0.0, float(T), 1.0)
        sym = _float_range_of_dims(graph, node)
        if sym is not None:
            return sym
    return Range()


def _float_range_of_dims(graph: OnnxGraph, node: OnnxNode):
    """A float32 ``Range`` whose start / delta are integer-valued constants and whose limit is ``Cast(to=FLOAT)``
    of shape arithmetic: ``torch.arange`` over ints, in float32. Exact (every value is an integer below 2**24, which
    float32 holds exactly, so ORT's accumulation and torch's ``start + i * delta`` agree); None otherwise."""
    start, delta = const(graph, node.input_values[0]), const(graph, node.input_values[2])
    if start is None or delta is None or start.numel() != 1 or delta.numel() != 1:
        return None
    s, d = float(start.reshape(-1)[0]), float(delta.reshape(-1)[0])
    if not (s.is_integer() and d.is_integer() and d != 0 and abs(s) < 2**24 and abs(d) < 2**24):
        return None
    try:
        cast, _ = graph.value_as_node_output(node.input_values[1])
    except KeyError:
        return None
    if cast.operation_type != "Cast" or int(cast.attributes.get("to", 0)) != 1:
        return None
    limit = shape_expr(graph, cast.input_values[0])
    if limit is None or len(limit.elems) != 1:
        return None
    return result(SymRange(int(s), limit.elems[0], int(d), torch.float32), node, tuple(limit.sources))


class Shape(nn.Module, OnnxToTorchModule):
    """ONNX ``Shape``: ``x.shape[start:end]`` as int64 (``start`` / ``end`` count from the rank when negative, clamped)."""

    def __init__(self, start: int = 0, end: int | None = None):
        super().__init__()
        self.start, self.end = int(start), None if end is None else int(end)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(tuple(x.shape)[self.start:self.end], dtype=torch.int64, device=x.device)

    def extra_repr(self) -> str:
        return f"start={self.start}, end={self.end}"


@register("Shape", 1, 13, 15, 19, 21, 23, 24, 25)
def shape_(node: OnnxNode, graph: OnnxGraph):
    return Shape(node.attributes.get("start", 0), node.attributes.get("end"))


class Size(nn.Module, OnnxToTorchModule):
    """ONNX ``Size``: the number of elements of ``x``, an int64 scalar (onnx2torch has no converter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Size", 1, 13, 19, 21, 23, 24, 25)
def size_(node: OnnxNode, graph: OnnxGraph):
    return Size()
