"""``CumSum`` -> ``torch.cumsum`` with ONNX's defaults (``exclusive=0``, ``reverse=0``).

onnx2torch 1.5.15 reads a missing ``reverse`` attribute as 1, so every default CumSum (what
tf2onnx writes for ``tf.cumsum``) sums from the end (issue 18). Here: the ONNX defaults, the
input's dtype kept (``torch.cumsum`` would promote int32 to int64), a constant ``axis`` as a
Python int (no ``.item()`` graph break), a computed one read at run time.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, input_at, register, result


class OnnxCumSum(nn.Module, OnnxToTorchModule):
    """ONNX ``CumSum`` along ``axis`` (fixed, or the int scalar ``axis`` input); any shape, numeric dtype.

    ``exclusive``: the sum of the elements before (the first is 0); ``reverse``: summed from the end.
    """

    def __init__(self, axis: int | None, exclusive: bool, reverse: bool):
        super().__init__()
        self.axis = axis
        self.exclusive = exclusive
        self.reverse = reverse

    def forward(self, x: torch.Tensor, axis: torch.Tensor | None = None) -> torch.Tensor:
        dim = self.axis if self.axis is not None else int(axis.reshape(-1)[0])
        if self.reverse:
            x = x.flip(dim)
        y = torch.cumsum(x, dim=dim, dtype=x.dtype)
        if self.exclusive:
            y = torch.cat([torch.zeros_like(x.narrow(dim, 0, min(1, x.shape[dim]))),
                           y.narrow(dim, 0, max(x.shape[dim] - 1, 0))], dim=dim)
        return y.flip(dim) if self.reverse else y

    def extra_repr(self) -> str:
        return f"axis={self.axis}, exclusive={self.exclusive}, reverse={self.reverse}"


@register("CumSum", 11, 14)
def cumsum(node: OnnxNode, graph: OnnxGraph):
    name = input_at(node, 1)
    axis = const_ints(graph, name)
    module = OnnxCumSum(axis[0] if axis else None, bool(node.attributes.get("exclusive", 0)),
                        bool(node.attributes.get("reverse", 0)))
    return result(module, node, (node.input_values[0],) if axis else node.input_values[:2])
