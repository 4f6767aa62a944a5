"""``Resize`` with constant ``scales`` or ``sizes`` -> :class:`ResizeToSize` (static output size, Python ints).

* **Output size.** onnxruntime (and TF) compute ``floor(float32(in) * float32(scale))``;
  ``F.interpolate`` with ``scale_factor`` computes in double and gets ``floor(12.9999997) = 12``
  for a 9 -> 13 resize (case 10, onnx/onnx#4919). With static spatial input dims the size is
  computed here, once; with dynamic ones, at run time by the same float32 rule.
* **Coordinates.** Given ``scales``, ONNX maps an output pixel back with ``1 / scale``
  (``x_in = (x_out + 0.5) / scale - 0.5`` for ``half_pixel``), not with ``in / out``; the two
  differ when ``in * scale`` is not whole (5 * 1.5 -> 7). The module then passes both the size
  and the scales to torch's upsample kernels, which use ``1 / scale`` as ORT does.
* Modes: ``nearest`` (1-3 spatial dims; torch's nearest is ONNX ``asymmetric`` + ``floor``),
  ``linear`` (1-3), ``cubic`` (2); ``align_corners`` from ``coordinate_transformation_mode``.
  Other coordinate modes warn as onnx2torch does (results may differ); ``tf_crop_and_resize``
  and computed scales / sizes go to onnx2torch's ``OnnxResize``. Opset 18 / 19 attributes are
  supported at their defaults only (``antialias=0``, ``keep_aspect_ratio_policy=stretch``, no
  ``axes``); otherwise the converter raises naming the attribute.

Shape notation: ``N`` batch, ``C`` channels, ``*spatial`` 1-3 spatial axes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import (
    TO_ORT,
    check_defaults,
    const,
    delegate,
    input_at,
    register,
    result,
    since_version_of,
    static_dims,
)

_TORCH_MODE = {("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest",
               ("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}


def output_size(in_dims: tuple[int, ...] | list[int], scales: tuple[float, ...]) -> tuple[int, ...]:
    """``floor(float32(in) * float32(scale))`` per spatial dim, as onnxruntime and TF compute it."""
    return tuple(int(np.floor(np.float32(d) * np.float32(s))) for d, s in zip(in_dims, scales))


class ResizeToSize(nn.Module, OnnxToTorchModule):
    """ONNX ``Resize`` with a known spatial output ``size`` (or known ``scales``), input ``[N, C, *spatial]`` float.

    Args:
        size: spatial output size; None: computed from the input's spatial dims and ``scales``.
        mode: torch's mode (``"nearest"``, ``"bilinear"``...).
        align_corners: as in ``F.interpolate`` (None for nearest).
        scales: the ONNX spatial scales, when the graph gave scales (used for the coordinate
            mapping, ``1 / scale``); None when it gave sizes.
    """

    def __init__(self, size: tuple[int, ...] | None, mode: str, align_corners: bool | None,
                 scales: tuple[float, ...] | None = None):
        super().__init__()
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.mode = mode
        self.align_corners = align_corners
        self.scales = tuple(float(s) for s in scales) if scales is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.size
        if size is None:
            spatial = tuple(x.shape[2:])
            if all(isinstance(d, int) for d in spatial):
                size = output_size(spatial, self.scales)
            else:  # symbolic dims (torch.compile dynamic=True): double arithmetic
                size = tuple(int(d * s) for d, s in zip(spatial, self.scales))
        if self.scales is None or self.align_corners:
            return nn.functional.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)
        aten = torch.ops.aten
        s = list(self.scales)
        if self.mode == "nearest":
            op = {1: aten.upsample_nearest1d.default, 2: aten.upsample_nearest2d.default,
                  3: aten.upsample_nearest3d.default}[len(size)]
            return op(x, list(size), *s)
        op = {"linear": aten.upsample_linear1d.default, "bilinear": aten.upsample_bilinear2d.default,
              "trilinear": aten.upsample_trilinear3d.default, "bicubic": aten.upsample_bicubic2d.default}[self.mode]
        return op(x, list(size), bool(self.align_corners), *s)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}, align_corners={self.align_corners}, scales={self.scales}"


def _warn_inexact(node: OnnxNode, mode: str, ctm: str) -> None:
    a = node.attributes
    if mode == "nearest":
        nearest = a.get("nearest_mode", "round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if nearest != "floor" or ctm != "asymmetric":
            warnings.warn(f"Resize node {node.name!r}: torch's nearest is ONNX asymmetric + floor; with "
                          f"{ctm} + {nearest} the results may differ", stacklevel=2)
    elif ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        warnings.warn(f"Resize node {node.name!r}: coordinate_transformation_mode {ctm!r} is not torch's; "
                      "the results may differ", stacklevel=2)
    if float(a.get("cubic_coeff_a", -0.75)) != -0.75 or int(a.get("exclude_outside", 0)) or \
            float(a.get("extrapolation_value", 0.0)) != 0.0:
        warnings.warn(f"Resize node {node.name!r}: cubic_coeff_a / exclude_outside / extrapolation_value other "
                      "than the defaults are ignored", stacklevel=2)


@register("Resize", 11, 13, 18, 19)
def resize(node: OnnxNode, graph: OnnxGraph):
    if since_version_of(node) >= 18:
        check_defaults(node, {"antialias": 0, "keep_aspect_ratio_policy": "stretch"})
        if node.attributes.get("axes") is not None:
            raise NotImplementedError(f"Resize node {node.name!r}: the 'axes' attribute is not supported; {TO_ORT}")
    attrs = node.attributes
    mode = attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    x = node.input_values[0]
    scales, sizes = const(graph, input_at(node, 2)), const(graph, input_at(node, 3))
    dims = static_dims(graph, x)
    if ctm == "tf_crop_and_resize":
        return delegate(node, graph, 13)
    if sizes is not None and sizes.numel():
        full = [int(s) for s in sizes.tolist()]
        if dims is not None and any(d is not None and d != s for d, s in zip(dims[:2], full[:2])):
            raise NotImplementedError(f"Resize node {node.name!r}: resizing the batch or channel dim is not "
                                      f"supported; {TO_ORT}")
        size, spatial_scales = tuple(full[2:]), None
    elif scales is not None and scales.numel():
        full_scales = [float(s) for s in scales.tolist()]
        if full_scales[:2] != [1.0, 1.0]:
            raise NotImplementedError(f"Resize node {node.name!r}: scaling the batch or channel dim is not "
                                      f"supported; {TO_ORT}")
        spatial_scales = tuple(full_scales[2:])
        known = dims is not None and len(dims) == len(full_scales) and all(d is not None for d in dims[2:])
        size = output_size(dims[2:], spatial_scales) if known else None
    else:
        return delegate(node, graph, 13)  # computed scales / sizes: onnx2torch's OnnxResize
    n_spatial = len(size) if size is not None else len(spatial_scales)
    torch_mode = _TORCH_MODE.get((mode, n_spatial))
    if torch_mode is None:
        raise NotImplementedError(f"Resize node {node.name!r}: mode {mode!r} with {n_spatial} spatial dims is not "
                                  f"supported; {TO_ORT}")
    _warn_inexact(node, mode, ctm)
    align = None if mode == "nearest" else ctm == "align_corners"
    return result(ResizeToSize(size, torch_mode, align, spatial_scales), node, (x,))
