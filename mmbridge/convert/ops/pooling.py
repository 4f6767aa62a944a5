"""``MaxPool`` with ``auto_pad=SAME_*`` (behind a SamePad of ``-inf``), ``GlobalMaxPool``.

Shape notation: ``N`` batch, ``C`` channels, ``*spatial`` the spatial axes.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import register, result, since_version_of
from mmbridge.convert.ops.conv import with_same_pad


class OnnxGlobalMaxPool(nn.Module, OnnxToTorchModule):
    """ONNX ``GlobalMaxPool``: ``[N, C, *spatial]`` -> ``[N, C, 1, ...]`` (max over spatial axes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


@register("MaxPool", 8, 10, 11, 12, 22)
def max_pool(node: OnnxNode, graph: OnnxGraph):
    version = min(since_version_of(node), 12)  # MaxPool-22 only added types
    return with_same_pad(node, graph, list(node.attributes["kernel_shape"]), float("-inf"), version)


@register("GlobalMaxPool", 1, 22)
def global_max_pool(node: OnnxNode, graph: OnnxGraph):
    return result(OnnxGlobalMaxPool(), node)
