"""``OneHot-9`` / ``OneHot-11`` -> ``F.one_hot`` with ONNX's ``values`` / ``axis`` / negative-index rules.

Keras ``CategoryEncoding(output_mode="one_hot")`` (ENOT-AutoDL/onnx2torch#233).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const, register


class OnnxOneHot(nn.Module, OnnxToTorchModule):
    """ONNX ``OneHot``: ``indices`` (any int/float dtype, any shape) -> one-hot along ``axis``.

    ``values = [off, on]`` gives the output dtype and the two values; negative indices count from
    ``depth`` (opset 11); indices outside ``[-depth, depth)`` give an all-``off`` row (ONNX rule).
    Output shape: ``indices.shape`` with ``depth`` inserted at ``axis``.
    """

    def __init__(self, axis: int, depth: int | None):
        super().__init__()
        self.axis = axis
        self.depth = depth

    def forward(self, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = self.depth if self.depth is not None else int(depth.reshape(-1)[0].item())
        idx = indices.to(torch.int64)
        idx = torch.where(idx < 0, idx + d, idx)
        valid = (idx >= 0) & (idx < d)
        hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), d) * valid.unsqueeze(-1).to(torch.int64)
        out = torch.where(hot.bool(), values[1], values[0])
        axis = self.axis if self.axis >= 0 else out.dim() + self.axis
        if axis != out.dim() - 1:
            out = out.movedim(-1, axis)
        return out


@register("OneHot", 9, 11)
def one_hot(node: OnnxNode, graph: OnnxGraph):
    depth = const(graph, node.input_values[1])
    return OnnxOneHot(int(node.attributes.get("axis", -1)), int(depth.reshape(-1)[0]) if depth is not None else None)
