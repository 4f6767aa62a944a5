"""``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Expand``, ``Tile``: constant arguments become Python ints.

tf2onnx passes shapes and axes as tensors (initializers, or targets that
:func:`mmbridge.convert.core.to_torch` makes constant where shape inference pins them). onnx2torch
reads them at run time (``torch.Size(tensor)``, ``.tolist()``), which ``torch.compile`` cannot
trace without a graph break. When the argument is constant it is folded into the module here,
so CNN and transformer bridges compile with ``fullgraph=True``; otherwise the argument stays a
call input, read at run time.

Negative axes follow ONNX: ``Squeeze`` counts from the input's rank, ``Unsqueeze`` from the
output's.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, delegate, input_at, register, result


class Reshape(nn.Module, OnnxToTorchModule):
    """ONNX ``Reshape``: ``0`` copies the input dim (``allowzero=0``; with ``allowzero=1`` it is a
    zero-size dim), ``-1`` is inferred.

    With a constant target (``shape`` given at construction) the dims are Python ints, so
    ``torch.compile`` traces it without a graph break (onnx2torch's ``OnnxReshape`` builds a
    ``torch.Size`` from a tensor, which dynamo rejects). Otherwise the target tensor (int64
    ``[rank]``) is read at run time.
    """

    def __init__(self, shape: tuple[int, ...] | list[int] | None = None, allowzero: bool = False):
        super().__init__()
        self.shape = tuple(int(d) for d in shape) if shape is not None else None
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        dims = self.shape if self.shape is not None else [int(d) for d in shape.tolist()]
        if self.allowzero:
            return x.reshape(dims)
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(dims)])

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
    """ONNX ``Expand`` with a constant ``shape``: bidirectional broadcast of ``x`` with ``shape``.

    Returns a broadcast view (``Tensor.expand``), no copy.
    """

    def __init__(self, shape: list[int]):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(tuple(x.shape), self.shape))

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Tile(nn.Module, OnnxToTorchModule):
    """ONNX ``Tile`` with constant ``repeats`` (one per input dim)."""

    def __init__(self, repeats: list[int]):
        super().__init__()
        self.repeats = tuple(int(r) for r in repeats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.repeats)

    def extra_repr(self) -> str:
        return f"repeats={self.repeats}"


@register("Reshape", 5, 13, 14, 19, 21, 23, 24, 25)
def reshape(node: OnnxNode, graph: OnnxGraph):
    allowzero = bool(node.attributes.get("allowzero", 0))
    target = const_ints(graph, input_at(node, 1))
    if target is not None:
        return result(Reshape(target, allowzero), node, (node.input_values[0],))
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
    shape = const_ints(graph, input_at(node, 1))
    if shape is None:
        return delegate(node, graph, 13)  # computed shape: onnx2torch's OnnxExpand
    return result(Expand(shape), node, (node.input_values[0],))


@register("Tile", 6, 13)
def tile(node: OnnxNode, graph: OnnxGraph):
    repeats = const_ints(graph, input_at(node, 1))
    if repeats is None:
        return delegate(node, graph, 13)  # computed repeats: onnx2torch's OnnxTile
    return result(Tile(repeats), node, (node.input_values[0],))
