"""``Conv`` with ``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` -> ``nn.Sequential(SamePad, ConvNd)``.

tf2onnx writes ``auto_pad=SAME_UPPER`` for Keras ``padding="same"`` when H / W are dynamic;
onnx2torch converts only explicit pads. The node is converted by onnx2torch as ``VALID`` and
runs behind a :class:`~mmbridge.convert.ops.pad.SamePad` computed from the input size. Every
other Conv is onnx2torch's (``Conv-22`` too: it only added types).
"""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import delegate, register, result
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


@register("Conv", 1, 11, 22)
def conv(node: OnnxNode, graph: OnnxGraph):
    kernel = node.attributes.get("kernel_shape")
    w = node.input_values[1] if len(node.input_values) > 1 else ""
    if kernel is None and w in graph.initializers:
        kernel = list(graph.initializers[w].proto.dims[2:])
    return with_same_pad(node, graph, list(kernel) if kernel is not None else None, 0.0, 11)
