"""``Dropout`` -> ``nn.Dropout(p)`` with the ratio of the graph, switched by ``train()`` / ``eval()``.

Like Keras ``training=True`` / ``False``, the module's mode decides (ONNX's ``training_mode``
input is not read). A ratio that is computed at run time keeps onnx2torch's ``OnnxDropoutDynamic``
(``F.dropout`` with that ratio). The optional ``mask`` output is not supported when something
reads it.
"""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, const, delegate, input_at, register, result


def _mask_is_read(node: OnnxNode, graph: OnnxGraph) -> bool:
    if len(node.output_values) < 2 or not node.output_values[1]:
        return False
    mask = node.output_values[1]
    return mask in graph.output_values or any(mask in n.input_values for n in graph.nodes.values())


@register("Dropout", 12, 13, 22)
def dropout(node: OnnxNode, graph: OnnxGraph):
    if node.attributes.get("seed") is not None:
        raise NotImplementedError(f"Dropout node {node.name!r}: a fixed 'seed' is not supported; {TO_ORT}")
    if _mask_is_read(node, graph):
        raise NotImplementedError(f"Dropout node {node.name!r}: its 'mask' output is used, which the torch "
                                  f"Dropout does not produce; {TO_ORT}")
    ratio_name = input_at(node, 1)
    ratio = const(graph, ratio_name)
    if ratio_name and ratio is None:
        return delegate(node, graph, 12)  # computed ratio: F.dropout(x, ratio) at run time
    p = 0.5 if ratio is None else float(ratio.reshape(-1)[0])
    return result(nn.Dropout(p=p), node, (node.input_values[0],))
