"""``ScatterND-18`` -> onnx2torch's ``ScatterND-16`` converter while ``reduction`` is ``none``."""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from mmbridge.convert.ops._common import check_defaults, delegate, register


@register("ScatterND", 18)
def scatter_nd(node: OnnxNode, graph: OnnxGraph):
    check_defaults(node, {"reduction": "none"})
    return delegate(node, graph, 16)
