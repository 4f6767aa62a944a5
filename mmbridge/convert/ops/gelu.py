"""``Gelu-20`` -> ``nn.GELU(approximate="none" | "tanh")`` (ENOT-AutoDL/onnx2torch#251)."""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import register


@register("Gelu", 20)
def gelu(node: OnnxNode, graph: OnnxGraph):
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return nn.GELU(approximate=approximate)
