"""``Cast`` (9 / 13 / 19 / 21): every ONNX numeric and bool type torch has, ``bfloat16`` included.

onnx2torch's table has no ``BFLOAT16`` (TF's ``tf.cast(x, tf.bfloat16)``, exported as a real
bfloat16 cast since mmbridge stopped tf2onnx from writing float16 for it). Float -> integer casts
truncate toward zero in both ONNX and torch. ``saturate`` (19+) concerns the float8 types only,
which torch lacks here: a cast to float8 / string / complex is refused, naming the node.
"""

from __future__ import annotations

import torch
from onnx import TensorProto
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, register, result

_TORCH = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.UINT8: torch.uint8, TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


class Cast(nn.Module, OnnxToTorchModule):
    """``x.to(dtype)``: any shape; float -> int truncates toward zero (as ONNX)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


@register("Cast", 9, 13, 19, 21)
def cast(node: OnnxNode, graph: OnnxGraph):
    to = int(node.attributes["to"])
    if to not in _TORCH:
        name = TensorProto.DataType.Name(to) if to in TensorProto.DataType.values() else str(to)
        raise NotImplementedError(f"Cast node {node.name!r}: to {name} has no torch dtype here; {TO_ORT}")
    return result(Cast(_TORCH[to]), node, (node.input_values[0],))
