"""``SpaceToDepth`` and ``DepthToSpace`` (both ``mode`` s): onnx2torch has no SpaceToDepth and only
the ``CRD`` DepthToSpace; TF's ``tf.nn.space_to_depth`` / ``depth_to_space`` are exported by tf2onnx
as ``SpaceToDepth`` / ``DepthToSpace(mode="DCR")`` (also inside ``space_to_batch_nd`` /
``batch_to_space_nd``).

Layout NCHW ``[N, C, H, W]`` (tf2onnx transposes around them), ``b`` = ``blocksize``. As the spec
(https://onnx.ai/onnx/operators/onnx__DepthToSpace.html) writes them:

* ``DepthToSpace`` DCR: reshape ``[N, b, b, C/b², H, W]``, permute ``(0, 3, 4, 1, 5, 2)``,
  reshape ``[N, C/b², H·b, W·b]``; CRD: reshape ``[N, C/b², b, b, H, W]``, permute
  ``(0, 1, 4, 2, 5, 3)`` (``torch.nn.functional.pixel_shuffle``);
* ``SpaceToDepth``: reshape ``[N, C, H/b, b, W/b, b]``, permute ``(0, 3, 5, 1, 2, 4)``, reshape
  ``[N, C·b², H/b, W/b]`` (the inverse of DCR).
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import register, result


class DepthToSpace(nn.Module, OnnxToTorchModule):
    """ONNX ``DepthToSpace``: ``[N, C, H, W]`` -> ``[N, C / b², H · b, W · b]`` (``mode`` DCR or CRD)."""

    def __init__(self, blocksize: int, mode: str):
        super().__init__()
        if mode not in ("DCR", "CRD"):
            raise NotImplementedError(f"DepthToSpace mode {mode!r} (the spec has DCR and CRD)")
        self.blocksize, self.mode = int(blocksize), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.blocksize
        if self.mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    def extra_repr(self) -> str:
        return f"blocksize={self.blocksize}, mode={self.mode}"


class SpaceToDepth(nn.Module, OnnxToTorchModule):
    """ONNX ``SpaceToDepth``: ``[N, C, H, W]`` -> ``[N, C · b², H / b, W / b]`` (H, W divisible by ``b``)."""

    def __init__(self, blocksize: int):
        super().__init__()
        self.blocksize = int(blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.blocksize
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    def extra_repr(self) -> str:
        return f"blocksize={self.blocksize}"


def _mode(node: OnnxNode) -> str:
    mode = node.attributes.get("mode", "DCR")
    return mode.decode() if isinstance(mode, bytes) else mode


@register("DepthToSpace", 1, 11, 13)
def depth_to_space(node: OnnxNode, graph: OnnxGraph):
    return result(DepthToSpace(node.attributes["blocksize"], _mode(node)), node)


@register("SpaceToDepth", 1, 13)
def space_to_depth(node: OnnxNode, graph: OnnxGraph):
    return result(SpaceToDepth(node.attributes["blocksize"]), node)
