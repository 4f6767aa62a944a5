"""``Conv`` with ``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` -> ``nn.Sequential(SamePad, ConvNd)``.

tf2onnx writes ``auto_pad=SAME_UPPER`` for Keras ``padding="same"`` when H / W are dynamic;
onnx2torch converts only explicit pads. The node is converted by onnx2torch as ``VALID`` and
runs behind a :class:`~mmbridge.convert.ops.pad.SamePad` computed from the input size.

A ``Conv`` whose weight is computed at run time (not an initializer) -> :class:`RuntimeConv`,
``torch.nn.functional.conv{1,2,3}d`` on the weight the graph computes: tf2onnx writes
``tf.image.extract_patches`` as a Conv with an ``EyeLike`` kernel, and a TF conv whose filter is
an input stays one; onnx2torch reads the weight from the initializers and failed with a raw
``KeyError``. A ``ConvTranspose`` with such a weight (``tf.nn.conv2d_transpose`` with a filter
fed as input) is refused naming the node; with a constant weight it is onnx2torch's. Every other
Conv is onnx2torch's (``Conv-22`` too: it only added types).

:class:`PadConv` / :func:`pad_conv`: a zero ``Pad`` followed by a ``Conv`` (TF's asymmetric
"same" padding: tf2onnx writes ``Conv`` with ``pads=[0, 0, 1, 1]``, which onnx2torch runs as
``Sequential(OnnxPadStatic, Conv2d)``; a separate Keras ``ZeroPadding2D`` Pad node is left alone),
computing the same values with less memory: autograd saves the unpadded input and re-pads it in backward, and a
no-grad forward on CPU pads and convolves half of the batch at a time. Put in place by
:func:`mmbridge.convert.fusions.fuse_pad_conv`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn
from torch.autograd import forward_ad

from mmbridge.convert.ops._common import TO_ORT, const, delegate, register, result
from mmbridge.convert.ops.pad import Pad, SamePad


def same_pad_or_none(node: OnnxNode, kernel: list[int] | None, value: float) -> SamePad | None:
    """The :class:`SamePad` a ``SAME_*`` node needs (None for other ``auto_pad`` values)."""
    mode = node.attributes.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("SAME_UPPER", "SAME_LOWER") or not kernel:
        return None
    rank = len(kernel)
    return SamePad(kernel, list(node.attributes.get("strides", [1] * rank)),
                   list(node.attributes.get("dilations", [1] * rank)), mode == "SAME_UPPER", value)


def with_same_pad(node: OnnxNode, graph: OnnxGraph, kernel: list[int] | None, value: float, since_version: int):
    """onnx2torch's converter for ``since_version``; for ``SAME_*`` with ``auto_pad=VALID`` behind a SamePad."""
    pad = same_pad_or_none(node, kernel, value)
    if pad is None:
        return delegate(node, graph, since_version)
    converted = delegate(node, graph, since_version, auto_pad="VALID")
    return result(nn.Sequential(pad, converted.torch_module), node, converted.onnx_mapping.inputs)


class RuntimeConv(nn.Module):
    """ONNX ``Conv`` (https://onnx.ai/onnx/operators/onnx__Conv.html) with the weight as an input.

    ``x`` ``[N, C, *spatial]`` (NCHW-style, 1-3 spatial dims), ``w`` ``[M, C / group, *kernel]``,
    optional ``b`` ``[M]``; ``pads`` ``[b1, b2, ..., e1, e2, ...]`` (asymmetric pads are applied
    with ``F.pad`` first), ``auto_pad`` ``SAME_*`` from the input and kernel size at run time
    (ONNX rule: the odd pixel at the end for ``SAME_UPPER``), ``VALID`` / ``NOTSET``.
    """

    _CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def __init__(self, strides: list[int] | None, dilations: list[int] | None, pads: list[int] | None,
                 group: int, auto_pad: str):
        super().__init__()
        self.strides, self.dilations, self.pads = strides, dilations, pads
        self.group, self.auto_pad = int(group), auto_pad

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rank = x.dim() - 2
        strides = self.strides or [1] * rank
        dilations = self.dilations or [1] * rank
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            x = SamePad(list(w.shape[2:]), strides, dilations, self.auto_pad == "SAME_UPPER", 0.0)(x)
        elif self.auto_pad in ("NOTSET", "") and self.pads and any(self.pads):
            begin, end = self.pads[:rank], self.pads[rank:]
            x = F.pad(x, [p for i in reversed(range(rank)) for p in (begin[i], end[i])])
        return self._CONV[rank](x, w, b, stride=strides, dilation=dilations, groups=self.group)

    def extra_repr(self) -> str:
        return f"strides={self.strides}, dilations={self.dilations}, pads={self.pads}, group={self.group}, auto_pad={self.auto_pad}"


@register("Conv", 1, 11, 22)
def conv(node: OnnxNode, graph: OnnxGraph):
    kernel = node.attributes.get("kernel_shape")
    w = node.input_values[1] if len(node.input_values) > 1 else ""
    if w and const(graph, w) is None:
        a = node.attributes
        mode = a.get("auto_pad", "NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        module = RuntimeConv(list(a["strides"]) if "strides" in a else None,
                             list(a["dilations"]) if "dilations" in a else None,
                             list(a["pads"]) if "pads" in a else None, a.get("group", 1), mode)
        return result(module, node)
    if kernel is None and w in graph.initializers:
        kernel = list(graph.initializers[w].proto.dims[2:])
    return with_same_pad(node, graph, list(kernel) if kernel is not None else None, 0.0, 11)


@register("ConvTranspose", 1, 11, 22)
def conv_transpose(node: OnnxNode, graph: OnnxGraph):
    w = node.input_values[1] if len(node.input_values) > 1 else ""
    if w and const(graph, w) is None:
        raise NotImplementedError(f"ConvTranspose node {node.name!r}: its weight {w!r} is computed at run time (a TF "
                                  f"conv-transpose filter fed as an input), and onnx2torch's ConvTranspose needs a "
                                  f"constant weight; make the filter a constant, or {TO_ORT}")
    return delegate(node, graph, 11)


# ---------------------------------------------------------------------------------------------
# zero Pad + Conv with less memory (issue 16, item 5)
# ---------------------------------------------------------------------------------------------
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
NO_GRAD_CHUNKS = 2  # a no-grad forward on CPU pads and convolves its batch in up to 2 parts (>= 2 samples each)
NO_GRAD_CHUNK_MIN_BYTES = 256 * 1024  # ... when the padded copy is at least this large (else one call)


def _padded_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int],
                 stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``F.convNd(F.pad(x, pads), weight, bias, stride, 0, dilation, groups)``: the unfused graph's ops."""
    return _CONV_FN[weight.dim() - 2](F.pad(x, pads), weight, bias, stride, 0, dilation, groups)


class _PadConvFn(torch.autograd.Function):
    """Zero pad + convolution whose backward re-pads the saved unpadded input.

    Forward: the same kernels as ``F.pad`` + ``F.convNd`` (bit-equal). Backward: aten's
    ``convolution_backward`` (what autograd's ``ConvolutionBackward0`` calls) on the re-padded
    input, and the input gradient cropped by a negative ``F.pad`` (what ``F.pad``'s backward does); the
    padded copy lives only during the forward and during this backward, not in between.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int],
                stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (pads, stride, dilation, groups, None if bias is None else list(bias.shape))
        return _padded_conv(x, weight, bias, pads, stride, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        pads, stride, dilation, groups, bias_sizes = ctx.conf
        zeros = [0] * (weight.dim() - 2)
        need = ctx.needs_input_grad
        padded = F.pad(x, pads)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            grad, padded, weight, bias_sizes, list(stride), zeros, list(dilation), False, zeros, groups,
            [need[0], need[1], bias_sizes is not None and need[2]])
        del padded
        if need[0]:  # F.pad's own backward (constant_pad_nd_backward): a cropping pad, same layout
            gi = F.pad(gi, [-p for p in pads])
        return (gi if need[0] else None, gw if need[1] else None,
                gb if bias_sizes is not None and need[2] else None, None, None, None, None)


def _under_transform(*tensors: torch.Tensor | None) -> bool:
    """True under a functorch transform (``torch.func.grad`` / ``vmap`` / ``jvp``...) or when an
    operand is a forward-AD dual tensor: :class:`_PadConvFn` (an old-style autograd.Function, no
    ``setup_context`` / vmap rule / ``jvp``) raises there, so :func:`pad_conv` runs the unfused ops."""
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tensor can carry a tangent
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _padded_bytes(x: torch.Tensor, pads: list[int]) -> int:
    n = x.element_size()
    for i, size in enumerate(x.shape):
        j = x.dim() - 1 - i  # F.pad pair of this dim
        n *= size + (pads[2 * j] + pads[2 * j + 1] if 2 * j + 1 < len(pads) else 0)
    return n


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What autocast does to a convolution operand: floating tensors other than float64 -> ``dtype``."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def pad_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: Any,
             stride: Any, dilation: Any, groups: int) -> torch.Tensor:
    """``F.convNd(F.pad(x, pads), weight, bias, stride, padding=0, dilation, groups)``, with less memory.

    Args:
        x: ``[N, C, *spatial]`` (NCHW-style, 1-3 spatial dims, any memory format), float.
        weight: ``[M, C / groups, *kernel]``; bias: ``[M]`` or None.
        pads: zero pads in ``F.pad`` order (last spatial axis first, ``[begin, end]`` per axis,
            at most ``2 * spatial`` ints, all >= 0).
        stride, dilation: one int per spatial axis; groups: int.

    Returns:
        ``[N, M, *out]``: the values of the unfused ``F.pad`` + ``F.convNd`` (the same kernels on
        the same operands: bit-equal), gradients the same as autograd's through them.

    Under a functorch transform (``torch.func.grad``, ``vmap``, ``jvp``, ``functional_call`` inside
    them) or with a forward-AD dual operand it runs the unfused ``F.pad`` + ``F.convNd`` (same
    values, the unfused memory): :class:`_PadConvFn` has no vmap / jvp rule.

    Memory, where it differs from the unfused ops:

    * when a gradient is recorded: :class:`_PadConvFn` saves ``x``, not its padded copy (the
      padded copy is rebuilt in backward); under autocast the operands are cast first, as
      autocast does for a convolution, and the cast input is what is saved;
    * no-grad forward on CPU (not under ``torch.compile``), batch ``N >= 4``: the batch is padded
      and convolved in ``min(NO_GRAD_CHUNKS, N // 2)`` equal parts into one output, so the padded
      copy held at once is about half of the input's (each part costs one more convolution call:
      oneDNN's fixed cost per call, ~0.1-0.3 ms here, is why it is 2 parts and not more, and why
      a padded copy under ``NO_GRAD_CHUNK_MIN_BYTES`` (256 KiB) is not split; set
      ``NO_GRAD_CHUNKS = 1`` to turn it off). Parts of at least 2 samples,
      and never for a 1x1 stride-1 kernel, because torch picks the CPU convolution backend from the
      batch size only there (``ConvParams::use_mkldnn``: a batch of 1 with a small kernel, or a
      1x1 kernel below 16 samples on one thread, runs torch's own kernel instead of oneDNN's);
      with the same backend a sample's result does not depend on the rest of the batch (tested
      bit-equal, float32 / bfloat16 / float64). On other devices the no-grad forward is the
      unfused ops (convolution algorithms there may be chosen per batch size; not verified).
    """
    pads = [int(p) for p in pads]
    stride, dilation = [int(s) for s in stride], [int(d) for d in dilation]
    if _under_transform(x, weight, bias):
        return _padded_conv(x, weight, bias, pads, stride, dilation, groups)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        dev = x.device.type
        if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
            with torch.autocast(dev, enabled=False):
                return _PadConvFn.apply(x, weight, bias, pads, stride, dilation, groups)
        return _PadConvFn.apply(x, weight, bias, pads, stride, dilation, groups)
    n = x.shape[0]
    parts = min(NO_GRAD_CHUNKS, n // 2)  # every part >= 2 samples
    pointwise = all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride) and all(d == 1 for d in dilation)
    if x.device.type != "cpu" or parts < 2 or pointwise or torch.compiler.is_compiling() \
            or _padded_bytes(x, pads) < NO_GRAD_CHUNK_MIN_BYTES:
        return _padded_conv(x, weight, bias, pads, stride, dilation, groups)
    bounds = [n * i // parts for i in range(parts + 1)]
    first = _padded_conv(x[:bounds[1]], weight, bias, pads, stride, dilation, groups)
    fmt = torch.contiguous_format
    if not first.is_contiguous():
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(first.dim(), torch.contiguous_format)
    out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=fmt)
    out[:bounds[1]].copy_(first)
    del first
    for i, j in zip(bounds[1:-1], bounds[2:]):
        out[i:j].copy_(_padded_conv(x[i:j], weight, bias, pads, stride, dilation, groups))
    return out


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _hooked(mod: nn.Module) -> bool:
    """A module with forward / backward (pre-)hooks of its own (``_forward_hooks`` also holds the
    with-kwargs and always-called ones)."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks)


def _global_hooks() -> bool:
    """``nn.modules.module.register_module_forward_hook`` & co. are set (they fire on every module call)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


class PadConv(nn.Sequential):
    """``Sequential(pad, conv)`` (a zero :class:`~mmbridge.convert.ops.pad.Pad` or
    :class:`~mmbridge.convert.ops.pad.SamePad`, then ``nn.Conv{1,2,3}d`` with ``padding=0``)
    computed by :func:`pad_conv`: the same values, less memory (see there). Keeps the children
    ``0`` / ``1`` of the Sequential it replaces, so ``state_dict`` keys and ``named_modules`` do not
    change.

    The fused path is taken only while, checked at every call, child ``1`` is exactly an
    ``nn.Conv1d/2d/3d`` (not a subclass: LoRA / QAT / parametrized wrappers) with zero padding,
    child ``0`` exactly a zero ``Pad`` / ``SamePad``, and neither child nor any global module hook
    (``nn.modules.module.register_module_forward_hook`` & co.) has a hook (prune / ``spectral_norm``
    pre-hooks, Grad-CAM forward hooks). Otherwise ``conv(pad(x))``: the children are called as the
    ``nn.Sequential`` did, hooks and replaced modules included.

    Raises:
        ValueError: ``pad`` is not a zero pad of the spatial axes, or ``conv`` has its own padding.
    """

    def __init__(self, pad: nn.Module, conv: nn.Module):
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str) or any(conv.padding):
            raise ValueError(f"PadConv: conv must be an nn.ConvNd with padding=0 and padding_mode='zeros', got {conv}")
        rank = conv.weight.dim() - 2
        ok = (isinstance(pad, SamePad) and pad.value == 0.0 and len(pad.kernel) == rank) or (
            isinstance(pad, Pad) and pad.mode == "constant" and pad.value == 0.0 and len(pad.pads) <= 2 * rank
            and min(pad.pads, default=0) >= 0)
        if not ok:
            raise ValueError(f"PadConv: pad must be a zero Pad of at most {rank} spatial axes (pads >= 0) or a "
                             f"zero SamePad, got {pad}")
        super().__init__(pad, conv)

    def _fusable(self, pad: nn.Module, conv: nn.Module) -> bool:
        if type(conv) not in _PLAIN_CONVS or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
                or any(conv.padding):
            return False
        if type(pad) is SamePad:
            if pad.value != 0.0:
                return False
        elif type(pad) is not Pad or pad.mode != "constant" or pad.value != 0.0:
            return False
        return not (_hooked(pad) or _hooked(conv) or _global_hooks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad, conv = self._modules["0"], self._modules["1"]
        if not self._fusable(pad, conv):
            return conv(pad(x))
        pads = pad.pads_for(x) if isinstance(pad, SamePad) else pad.pads
        return pad_conv(x, conv.weight, conv.bias, pads, conv.stride, conv.dilation, conv.groups)
