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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, const, delegate, register, result
from mmbridge.convert.ops.pad import SamePad


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
