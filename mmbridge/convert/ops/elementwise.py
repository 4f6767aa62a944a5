"""Element-wise ops onnx2torch lacks, each the torch function the ONNX spec describes.

* ``Sinh`` / ``Cosh`` / ``Asinh`` / ``Acosh`` / ``Atanh`` 9, 22 -> ``torch.sinh`` ... (``tf.math.sinh`` ...);
* ``ThresholdedRelu`` 10, 22 -> ``x if x > alpha else 0`` (``alpha`` default 1.0; Keras 2's
  ``ThresholdedReLU`` layer, ``tf.keras.activations.relu(x, threshold=...)`` forms);
* ``Mish`` 18, 22 -> ``x * tanh(softplus(x))`` (``torch.nn.functional.mish``; ``tfa.activations.mish``);
* ``BitwiseAnd`` / ``Or`` / ``Xor`` / ``Not`` 18 -> ``torch.bitwise_*`` (``tf.bitwise``, written at opset 18+);
* ``Hardmax`` 1, 11, 13 -> a one-hot of the first maximum along ``axis`` (13: one axis, default -1;
  1 / 11: the input flattened to 2-D at ``axis``, default 1, as the spec's coerce rule says).

``Shrink`` is left to users: it is the worked example of docs/authoring-guide.md.

Spec: https://onnx.ai/onnx/operators/ (each op's page). Tested against onnxruntime at the first
and last opset of every registered version (``tests/convert/test_ops.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import register, result

_UNARY = {"Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
          "Mish": F.mish, "BitwiseNot": torch.bitwise_not}
_BINARY = {"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor}


class Unary(nn.Module, OnnxToTorchModule):
    """One element-wise torch function (see the module doc): any shape and dtype the function takes."""

    def __init__(self, op_type: str):
        super().__init__()
        self.op_type = op_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UNARY[self.op_type](x)

    def extra_repr(self) -> str:
        return self.op_type


class Binary(nn.Module, OnnxToTorchModule):
    """``torch.bitwise_and / or / xor(a, b)`` with numpy broadcasting; integer or bool tensors."""

    def __init__(self, op_type: str):
        super().__init__()
        self.op_type = op_type

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _BINARY[self.op_type](a, b)

    def extra_repr(self) -> str:
        return self.op_type


class ThresholdedRelu(nn.Module, OnnxToTorchModule):
    """ONNX ``ThresholdedRelu``: ``x`` where ``x > alpha``, else 0 (same shape and dtype)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > self.alpha, x, torch.zeros_like(x))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Hardmax(nn.Module, OnnxToTorchModule):
    """ONNX ``Hardmax``: 1 at the first maximum along the axis, 0 elsewhere; same shape and dtype.

    ``flatten=True`` (versions 1 / 11): the input is viewed as 2-D ``[prod(shape[:axis]),
    prod(shape[axis:])]`` and the maximum taken over the second dim; else over ``axis`` alone.
    """

    def __init__(self, axis: int, flatten: bool):
        super().__init__()
        self.axis, self.flatten = int(axis), bool(flatten)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if x.dim() else 0
        y = x.reshape(x.shape[:axis].numel(), -1) if self.flatten else x
        dim = 1 if self.flatten else axis
        hot = torch.zeros_like(y).scatter_(dim, y.argmax(dim, keepdim=True), 1)
        return hot.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, flatten={self.flatten}"


@register("Sinh", 9, 22)
@register("Cosh", 9, 22)
@register("Asinh", 9, 22)
@register("Acosh", 9, 22)
@register("Atanh", 9, 22)
@register("Mish", 18, 22)
@register("BitwiseNot", 18)
def unary(node: OnnxNode, graph: OnnxGraph):
    return result(Unary(node.operation_type), node)


@register("BitwiseAnd", 18)
@register("BitwiseOr", 18)
@register("BitwiseXor", 18)
def binary(node: OnnxNode, graph: OnnxGraph):
    return result(Binary(node.operation_type), node)


@register("ThresholdedRelu", 10, 22)
def thresholded_relu(node: OnnxNode, graph: OnnxGraph):
    return result(ThresholdedRelu(node.attributes.get("alpha", 1.0)), node)


@register("Hardmax", 1, 11, 13)
def hardmax(node: OnnxNode, graph: OnnxGraph):
    from mmbridge.convert.ops._common import since_version_of

    old = since_version_of(node) < 13
    return result(Hardmax(node.attributes.get("axis", 1 if old else -1), flatten=old), node)
