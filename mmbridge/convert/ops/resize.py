"""``Resize`` with constant ``scales`` or ``sizes`` -> :class:`ResizeToSize` (static output size, Python ints).

* **Output size.** onnxruntime (and TF) compute ``floor(float32(in) * float32(scale))``;
  ``F.interpolate`` with ``scale_factor`` computes in double and gets ``floor(12.9999997) = 12``
  for a 9 -> 13 resize (onnx/onnx#4919). With static spatial input dims the size is
  computed here, once; with dynamic ones, at run time by the same float32 rule.
* **Coordinates.** Given ``scales``, ONNX maps an output pixel back with ``1 / scale``
  (``x_in = (x_out + 0.5) / scale - 0.5`` for ``half_pixel``), not with ``in / out``; the two
  differ when ``in * scale`` is not whole (5 * 1.5 -> 7). The module then passes both the size
  and the scales to torch's upsample kernels, which use ``1 / scale`` as ORT does.
* Modes torch's kernels compute exactly: ``nearest`` with ``asymmetric`` + ``floor`` (1-3
  spatial dims), ``linear`` (1-3) with ``half_pixel`` / ``align_corners`` (and
  ``pytorch_half_pixel`` while no output dim is 1), ``cubic`` (2) with those modes and ONNX's
  default ``cubic_coeff_a=-0.75``, ``exclude_outside=0``.
* Every other ``nearest`` / ``linear`` form -- ``asymmetric`` linear (TF v1
  ``resize_bilinear``, ``half_pixel_centers=False``), ``tf_half_pixel_for_nn``, ``align_corners``
  / ``half_pixel`` nearest with any ``nearest_mode``, ``half_pixel_symmetric``,
  ``tf_crop_and_resize`` (runtime ``roi``, ``extrapolation_value``), computed scales / sizes --
  is :class:`ResizeGather`: the source coordinates are computed per spatial axis in float32 with
  onnxruntime's formulas, rounded by ``nearest_mode`` (or split into two neighbours and a
  weight for ``linear``), and gathered with ``index_select``. Nothing is approximated: a form
  neither covers (``cubic`` with another coordinate mode or coefficient) raises naming it.
  Opset 18 / 19 attributes are supported at their defaults only (``antialias=0``,
  ``keep_aspect_ratio_policy=stretch``); otherwise the converter raises naming the attribute.
  ``axes`` with constant scales / sizes is widened to the full-rank form at conversion (scale 1 /
  the static input size on the other dims); with computed ones, or ``tf_crop_and_resize``, it is
  refused at conversion naming the node.

Shape notation: ``N`` batch, ``C`` channels, ``*spatial`` 1-3 spatial axes.
"""

from __future__ import annotations

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
    input_at,
    rank_of,
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


def _attr(node: OnnxNode, name: str, default):
    value = node.attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def source_coords(out_len: int, in_len: int, scale: torch.Tensor, ctm: str, roi: tuple | None = None) -> torch.Tensor:
    """float32 ``[out_len]``: the input coordinate of each output index along one axis, as onnxruntime maps it.

    ``scale`` is a float32 scalar tensor (the ONNX scale, or ``out / in`` when the graph gave
    sizes); ``roi`` ``(start, end)`` float32 tensors for ``tf_crop_and_resize``.
    """
    f32 = torch.float32
    x = torch.arange(out_len, dtype=f32, device=scale.device)
    half = torch.tensor(0.5, dtype=f32, device=scale.device)
    if ctm == "half_pixel":
        return (x + half) / scale - half
    if ctm == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else torch.zeros_like(x)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if ctm == "align_corners":
        if out_len == 1:
            return torch.zeros_like(x)
        return x * (torch.tensor(in_len - 1, dtype=f32) / torch.tensor(out_len - 1, dtype=f32))
    if ctm == "half_pixel_symmetric":
        adjustment = torch.tensor(out_len, dtype=f32) / (scale * torch.tensor(in_len, dtype=f32))
        center = torch.tensor(in_len, dtype=f32) / 2
        offset = center * (1 - adjustment)
        return offset + (x + half) / scale - half
    if ctm == "tf_crop_and_resize":
        start, end = roi
        span = torch.tensor(in_len - 1, dtype=f32)
        if out_len == 1:
            return (start + end) * span / 2 + torch.zeros_like(x)
        return start * span + x * (end - start) * span / torch.tensor(out_len - 1, dtype=f32)
    raise NotImplementedError(f"coordinate_transformation_mode {ctm!r}")


def _round(coord: torch.Tensor, nearest_mode: str) -> torch.Tensor:
    if nearest_mode == "floor":
        return torch.floor(coord)
    if nearest_mode == "ceil":
        return torch.ceil(coord)
    away = torch.sign(coord) * torch.floor(coord.abs() + 0.5)  # std::round: half away from zero
    if nearest_mode == "round_prefer_ceil":
        return away
    if nearest_mode == "round_prefer_floor":  # ORT: x == trunc(x) + 0.5 -> floor, else round
        return torch.where(coord == torch.trunc(coord) + 0.5, torch.floor(coord), away)
    raise NotImplementedError(f"nearest_mode {nearest_mode!r}")


class ResizeGather(nn.Module, OnnxToTorchModule):
    """ONNX ``Resize`` (``nearest`` / ``linear``) of ``[N, C, *spatial]``, any coordinate mode, by per-axis gathers.

    Args:
        mode: ``"nearest"`` or ``"linear"``.
        ctm: the ONNX ``coordinate_transformation_mode``.
        nearest_mode: the ONNX ``nearest_mode`` (nearest only).
        size: spatial output size when known at conversion (None: from runtime ``scales`` /
            ``sizes`` or the input dims).
        scales: spatial ONNX scales when the graph gave constant scales.
        extrapolation_value: the value of outputs whose source lies outside the input
            (``tf_crop_and_resize`` only).

    Call with ``x`` and, when they are not constant, the ``roi`` / ``scales`` / ``sizes``
    tensors (ONNX's full-rank forms; ``roi`` is ``[starts..., ends...]``).
    """

    def __init__(self, mode: str, ctm: str, nearest_mode: str, size: tuple[int, ...] | None,
                 scales: tuple[float, ...] | None, extrapolation_value: float = 0.0,
                 roi: tuple[float, ...] | None = None):
        super().__init__()
        self.mode, self.ctm, self.nearest_mode = mode, ctm, nearest_mode
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.scales = tuple(float(s) for s in scales) if scales is not None else None
        self.extrapolation_value = float(extrapolation_value)
        self.roi = tuple(float(r) for r in roi) if roi is not None else None

    def forward(self, x: torch.Tensor, roi: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        n = len(spatial)
        if self.scales is not None:
            sc = [torch.tensor(s, dtype=torch.float32) for s in self.scales]
        elif scales is not None and scales.numel():
            sc = [s.to(torch.float32).cpu() for s in scales.reshape(-1)[2:]]
        else:
            sc = None
        size = self.size
        if size is None:
            if sizes is not None and sizes.numel():
                size = tuple(int(v) for v in sizes.reshape(-1)[2:].tolist())
            else:
                size = tuple(int(torch.floor(torch.tensor(float(d), dtype=torch.float32) * s)) for d, s in zip(spatial, sc))
        if sc is None:  # sizes given: ORT's scale is out / in in float32
            sc = [torch.tensor(o, dtype=torch.float32) / torch.tensor(i, dtype=torch.float32) for o, i in zip(size, spatial)]
        roi_values = self.roi
        if self.ctm == "tf_crop_and_resize" and roi_values is None:
            roi_values = tuple(float(v) for v in roi.reshape(-1).tolist())
        for axis in range(n):
            r = None
            if self.ctm == "tf_crop_and_resize":
                rank = n + 2
                r = (torch.tensor(roi_values[axis + 2], dtype=torch.float32),
                     torch.tensor(roi_values[rank + axis + 2], dtype=torch.float32))
            x = self._resize_axis(x, axis + 2, size[axis], sc[axis], r)
        return x

    def _resize_axis(self, x: torch.Tensor, dim: int, out_len: int, scale: torch.Tensor, roi) -> torch.Tensor:
        in_len = x.shape[dim]
        coord = source_coords(out_len, in_len, scale, self.ctm, roi)
        outside = (coord < 0) | (coord > in_len - 1) if roi is not None else None
        if self.mode == "nearest":
            rounding = self.nearest_mode
            if rounding == "simple":  # Resize-10 (onnxruntime): ceil when downscaling, floor otherwise
                rounding = "ceil" if float(scale) < 1 else "floor"
            idx = _round(coord, rounding).clamp(0, in_len - 1).to(torch.int64).to(x.device)
            out = x.index_select(dim, idx)
        else:
            if not x.is_floating_point():
                raise TypeError(f"Resize linear of {x.dtype} is not supported on torch (onnxruntime's integer "
                                f"rounding is not reproduced); {TO_ORT}")
            c = coord.clamp(0, in_len - 1)
            i0 = torch.floor(c).to(torch.int64)
            i1 = (i0 + 1).clamp(max=in_len - 1)
            w = (c - i0.to(torch.float32)).to(x.dtype).to(x.device)
            shape = [1] * x.dim()
            shape[dim] = out_len
            w = w.reshape(shape)
            out = x.index_select(dim, i0.to(x.device)) * (1 - w) + x.index_select(dim, i1.to(x.device)) * w
        if outside is not None:  # tf_crop_and_resize: sources outside the input are extrapolation_value
            shape = [1] * x.dim()
            shape[dim] = out_len
            out = torch.where(outside.to(x.device).reshape(shape), torch.full_like(out, self.extrapolation_value), out)
        return out

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, ctm={self.ctm!r}, nearest_mode={self.nearest_mode!r}, size={self.size}, "
                f"scales={self.scales}")


def _torch_kernel_exact(mode: str, ctm: str, nearest_mode: str, size: tuple[int, ...] | None) -> bool:
    """Whether torch's upsample kernel computes this (mode, coordinate mode, nearest mode) as ORT does."""
    if mode == "nearest":
        return ctm == "asymmetric" and nearest_mode == "floor"
    if ctm == "pytorch_half_pixel":  # torch maps an output dim of 1 like half_pixel, ORT to 0
        return size is not None and all(s > 1 for s in size)
    return ctm in ("half_pixel", "align_corners")


def _full_rank(node: OnnxNode, graph: OnnxGraph, axes: list[int], scales: torch.Tensor | None,
               sizes: torch.Tensor | None, dims: tuple | None, ctm: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Resize-18 ``axes``: the constant ``scales`` / ``sizes`` given for ``axes`` as ONNX's full-rank form
    (scale 1 / the input's own size on the other dims).

    Raises:
        NotImplementedError: the scales / sizes are computed at run time, the input rank (or, for
            ``sizes``, an unlisted spatial dim) is unknown at conversion, or the mode is
            ``tf_crop_and_resize`` (its ``roi`` is then per axis too).
    """
    rank = len(dims) if dims is not None else rank_of(graph, node.input_values[0])
    given = sizes if sizes is not None and sizes.numel() else scales if scales is not None and scales.numel() else None
    why = None
    if ctm == "tf_crop_and_resize":
        why = "with coordinate_transformation_mode 'tf_crop_and_resize'"
    elif given is None:
        why = "with scales / sizes computed at run time"
    elif rank is None:
        why = "on an input of unknown rank"
    if why is None:
        ax = [int(a) % rank for a in axes]
        if given is sizes:
            full = [dims[i] if dims is not None else None for i in range(rank)]
            for a, v in zip(ax, sizes.tolist()):
                full[a] = int(v)
            if any(d is None for d in full[2:]):
                why = "with sizes for some spatial dims only, on an input whose other spatial dims are not static"
            else:
                return scales, torch.tensor([d if d is not None else -1 for d in full], dtype=torch.int64)
        else:
            full_s = [1.0] * rank
            for a, v in zip(ax, scales.tolist()):
                full_s[a] = float(v)
            return torch.tensor(full_s, dtype=torch.float32), sizes
    raise NotImplementedError(f"Resize node {node.name!r}: the 'axes' attribute (opset 18+) {why} is not supported; "
                              f"give scales / sizes for every dim, or {TO_ORT}")


@register("Resize", 11, 13, 18, 19)
def resize(node: OnnxNode, graph: OnnxGraph):
    axes = node.attributes.get("axes") if since_version_of(node) >= 18 else None
    if since_version_of(node) >= 18:
        check_defaults(node, {"antialias": 0, "keep_aspect_ratio_policy": "stretch"})
    mode = _attr(node, "mode", "nearest")
    ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = _attr(node, "nearest_mode", "round_prefer_floor")
    x = node.input_values[0]
    roi_name, scales_name, sizes_name = input_at(node, 1), input_at(node, 2), input_at(node, 3)
    scales, sizes = const(graph, scales_name), const(graph, sizes_name)
    dims = static_dims(graph, x)
    if axes is not None:
        scales, sizes = _full_rank(node, graph, list(axes), scales, sizes, dims, ctm)
    if mode == "cubic":
        if float(node.attributes.get("cubic_coeff_a", -0.75)) != -0.75 or int(node.attributes.get("exclude_outside", 0)):
            raise NotImplementedError(f"Resize node {node.name!r}: cubic with cubic_coeff_a / exclude_outside other "
                                      f"than -0.75 / 0 is not supported (torch's bicubic is fixed); {TO_ORT}")
    elif mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize node {node.name!r}: mode {mode!r} is not supported; {TO_ORT}")
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
        size = spatial_scales = None  # computed scales / sizes: read at run time
    computed = size is None and spatial_scales is None
    if mode == "cubic":
        if computed or ctm == "tf_crop_and_resize" or not _torch_kernel_exact("linear", ctm, "", size):
            raise NotImplementedError(f"Resize node {node.name!r}: cubic with coordinate_transformation_mode {ctm!r}"
                                      f"{' and computed scales / sizes' if computed else ''} is not supported; {TO_ORT}")
        n_spatial = len(size) if size is not None else len(spatial_scales)
        if n_spatial != 2:
            raise NotImplementedError(f"Resize node {node.name!r}: cubic with {n_spatial} spatial dims is not "
                                      f"supported; {TO_ORT}")
        return result(ResizeToSize(size, "bicubic", ctm == "align_corners", spatial_scales), node, (x,))
    if not computed and ctm != "tf_crop_and_resize" and _torch_kernel_exact(mode, ctm, nearest_mode, size):
        n_spatial = len(size) if size is not None else len(spatial_scales)
        torch_mode = _TORCH_MODE.get((mode, n_spatial))
        if torch_mode is None:
            raise NotImplementedError(f"Resize node {node.name!r}: mode {mode!r} with {n_spatial} spatial dims is "
                                      f"not supported; {TO_ORT}")
        align = None if mode == "nearest" else ctm == "align_corners"
        return result(ResizeToSize(size, torch_mode, align, spatial_scales), node, (x,))
    roi = None
    roi_in = ""
    if ctm == "tf_crop_and_resize":
        roi_const = const(graph, roi_name)
        if roi_const is not None:
            roi = tuple(float(v) for v in roi_const.reshape(-1).tolist())
        else:
            roi_in = roi_name
    inputs = [x, roi_in, scales_name if computed else "", sizes_name if computed else ""]
    while inputs[-1] == "":
        inputs.pop()
    module = ResizeGather(mode, ctm, nearest_mode, size, spatial_scales,
                          float(node.attributes.get("extrapolation_value", 0.0)), roi)
    return result(module, node, tuple(inputs))


@register("Resize", 10)
def resize10(node: OnnxNode, graph: OnnxGraph):
    """``Resize-10``: ``(X, scales)``, ``asymmetric`` coordinates; nearest rounds as onnxruntime's "simple" mode.

    onnx2torch converted ``linear`` with torch's half-pixel kernel (wrong by up to 2 on unit
    inputs); here both modes go to :class:`ResizeGather` (constant or runtime scales).
    """
    mode = _attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize node {node.name!r}: mode {mode!r} is not supported; {TO_ORT}")
    x, scales_name = node.input_values[0], input_at(node, 1)
    scales = const(graph, scales_name)
    if scales is None:
        return result(ResizeGather(mode, "asymmetric", "simple", None, None), node, (x, "", scales_name))
    full = [float(v) for v in scales.tolist()]
    if full[:2] != [1.0, 1.0]:
        raise NotImplementedError(f"Resize node {node.name!r}: scaling the batch or channel dim is not supported; {TO_ORT}")
    dims = static_dims(graph, x)
    known = dims is not None and len(dims) == len(full) and all(d is not None for d in dims[2:])
    size = output_size(dims[2:], tuple(full[2:])) if known else None
    return result(ResizeGather(mode, "asymmetric", "simple", size, tuple(full[2:])), node, (x,))
