"""The neutral ONNX layer: graph helpers, marker names and ONNX -> ONNX passes.

Imports ``onnx`` and numpy only: no TensorFlow, no torch, no onnxruntime. The export side
(:mod:`mmbridge.export`), the torch converter (:mod:`mmbridge.convert`) and the onnxruntime
backend (:mod:`mmbridge.runtime`) all read graphs through these helpers, so that "the dims of
a value" or "every subgraph of a node" means one thing everywhere.
"""

from mmbridge.graph.markers import (
    BN_MARK,
    DROPOUT_MARK,
    LN_MARK,
    STATE_MARK,
    VAR_MARK,
    decode_float,
    encode_float,
    marker_of,
)
from mmbridge.graph.walk import (
    all_nodes,
    const_value,
    dims,
    free_values,
    iter_graphs,
    nodes_with_subgraphs,
    static_dims,
    subgraphs,
    value_shape,
)

__all__ = [
    "BN_MARK", "DROPOUT_MARK", "LN_MARK", "STATE_MARK", "VAR_MARK", "decode_float", "encode_float", "marker_of",
    "all_nodes", "const_value", "dims", "free_values", "iter_graphs", "nodes_with_subgraphs", "static_dims",
    "subgraphs", "value_shape",
]
