"""``MaxPool`` with ``auto_pad=SAME_*`` (behind a SamePad of ``-inf``), ``GlobalMaxPool``, and
``AveragePool`` with asymmetric or ``SAME_*`` padding.

Shape notation: ``N`` batch, ``C`` channels, ``*spatial`` the spatial axes.

``AveragePool``: onnx2torch converts only symmetric explicit pads; TF's ``padding="SAME"`` average
pooling is exported by tf2onnx as ``auto_pad=SAME_UPPER`` when H / W are dynamic and as
asymmetric explicit ``pads`` when an odd pad total is needed at static shapes (e.g. ``pool_size=2,
strides=1``), and both were refused ("SAME_UPPER auto_pad is not implemented", "non symmetrical
padding"). :class:`PaddedAveragePool` computes them exactly as the spec says: with
``count_include_pad=0`` (TF's semantics, the ONNX default) each window's sum of real elements is
divided by the number of real elements in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import delegate, register, result, since_version_of
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


def _pads_of(size: int, k: int, s: int, upper: bool) -> tuple[int, int]:
    """(begin, end) of ONNX ``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` on one axis (output ``ceil(size / s)``)."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


class PaddedAveragePool(nn.Module):
    """ONNX ``AveragePool`` (https://onnx.ai/onnx/operators/onnx__AveragePool.html) with padding
    torch's ``avg_pool`` cannot express: asymmetric ``pads`` or ``auto_pad=SAME_UPPER`` /
    ``SAME_LOWER`` (computed from the input size at run time, so any H / W works).

    ``x`` ``[N, C, *spatial]`` (1-3 spatial axes, channels first as ONNX) -> ``[N, C, *out]``,
    ``out = ceil(in / stride)`` for ``SAME_*`` and ``floor((in + begin + end - k) / stride) + 1``
    for explicit pads. The input is zero-padded and each window summed (``divisor_override=1``);
    ``count_include_pad=1`` divides by the kernel area, ``0`` (the default, and TF's semantics) by
    the number of real (unpadded) elements in the window, counted the same way on a ones tensor.
    Floating dtypes only (as ONNX).
    """

    def __init__(self, kernel: list[int], strides: list[int], pads: list[int] | None, same: str | None,
                 count_include_pad: bool):
        super().__init__()
        self.kernel, self.strides, self.pads = list(kernel), list(strides), None if pads is None else list(pads)
        self.same, self.count_include_pad = same, bool(count_include_pad)

    def _torch_pads(self, spatial: list[int]) -> list[int]:
        rank = len(self.kernel)
        if self.same is not None:
            pairs = [_pads_of(spatial[i], self.kernel[i], self.strides[i], self.same == "SAME_UPPER") for i in range(rank)]
        else:
            pads = self.pads or [0] * (2 * rank)
            pairs = [(pads[i], pads[rank + i]) for i in range(rank)]
        return [p for i in reversed(range(rank)) for p in pairs[i]]  # F.pad: last axis first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = len(self.kernel)
        kernel, strides = self.kernel, self.strides
        squeeze = rank == 1  # avg_pool1d has no divisor_override: pool [N, C, 1, L]
        if squeeze:
            x, kernel, strides = x.unsqueeze(2), [1, *kernel], [1, *strides]
        pads = self._torch_pads(list(x.shape[2:]))
        pool = F.avg_pool3d if len(kernel) == 3 else F.avg_pool2d
        padded = F.pad(x, pads)
        if self.count_include_pad:
            y = pool(padded, kernel, strides)
        else:
            sums = pool(padded, kernel, strides, divisor_override=1)
            ones = x.new_ones((1, 1, *x.shape[2:]))
            counts = pool(F.pad(ones, pads), kernel, strides, divisor_override=1)
            y = sums / counts
        return y.squeeze(2) if squeeze else y

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, strides={self.strides}, pads={self.same or self.pads}, "
                f"count_include_pad={self.count_include_pad}")


@register("AveragePool", 7, 10, 11, 19, 22)
def average_pool(node: OnnxNode, graph: OnnxGraph):
    a = node.attributes
    kernel = list(a["kernel_shape"])
    rank = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = list(a.get("pads", [0] * 2 * rank))
    if any(d != 1 for d in a.get("dilations", [1] * rank)):
        raise NotImplementedError(f"AveragePool node {node.name!r}: dilations {list(a['dilations'])} (torch's avg_pool "
                                  "has no dilation); run the bridge with to_ort()")
    symmetric = mode in ("NOTSET", "") and pads[:rank] == pads[rank:]
    if symmetric or mode == "VALID":
        return delegate(node, graph, 11)  # onnx2torch's (versions 19 / 22 only added dilations / types)
    if a.get("ceil_mode", 0):
        raise NotImplementedError(f"AveragePool node {node.name!r}: ceil_mode=1 with asymmetric or {mode} padding; "
                                  "run the bridge with to_ort()")
    if rank not in (1, 2, 3):
        raise NotImplementedError(f"AveragePool node {node.name!r}: {rank} spatial axes (torch pools 1-3)")
    same = mode if mode in ("SAME_UPPER", "SAME_LOWER") else None
    module = PaddedAveragePool(kernel, list(a.get("strides", [1] * rank)), None if same else pads, same,
                               bool(a.get("count_include_pad", 0)))
    return result(module, node)
