"""``Split-18`` with ``num_outputs`` or a ``split`` input -> ``torch.split``."""

from __future__ import annotations

import math

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, input_at, register, result
from mmbridge.convert.ops.multi_output import keep_only_used_output


class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """ONNX ``Split-18``: ``x`` split along ``axis`` into fixed ``sizes`` or ``num_outputs`` chunks.

    With ``num_outputs = k`` every chunk has ``ceil(dim / k)`` elements except the last, which
    has what is left, possibly none (:func:`num_outputs_sizes`). Input any dtype, any shape;
    returns a tuple of ``k`` tensors.
    """

    def __init__(self, axis: int, sizes: list[int] | None, num_outputs: int | None):
        super().__init__()
        self.axis = axis
        self.sizes = sizes
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.sizes is not None:
            return tuple(torch.split(x, self.sizes, dim=self.axis))
        if split is not None:
            return tuple(torch.split(x, [int(s) for s in split.tolist()], dim=self.axis))
        return tuple(torch.split(x, num_outputs_sizes(x.shape[self.axis], self.num_outputs), dim=self.axis))


def num_outputs_sizes(dim: int, num_outputs: int) -> list[int]:
    """Chunk sizes of ``Split-18(num_outputs=k)``: ``k - 1`` chunks of ``ceil(dim / k)``, the rest in the last.

    As onnxruntime computes them: the last chunk may be empty (2 split in 3 -> ``[1, 1, 0]``;
    ``torch.split`` with chunk size 1 would give two outputs).

    Raises:
        ValueError: the last chunk would have a negative size (5 split in 4), which ORT refuses too.
    """
    chunk = math.ceil(dim / num_outputs)
    last = dim - chunk * (num_outputs - 1)
    if last < 0:
        raise ValueError(f"Split-18: num_outputs={num_outputs} does not fit a dim of size {dim} "
                         f"(chunks of {chunk} leave {last} for the last output)")
    return [chunk] * (num_outputs - 1) + [last]


@register("Split", 18)
def split(node: OnnxNode, graph: OnnxGraph):
    axis = int(node.attributes.get("axis", 0))
    num_outputs = node.attributes.get("num_outputs")
    split_name = input_at(node, 1)
    sizes = const_ints(graph, split_name)
    if sizes is None and not split_name and num_outputs is None:
        num_outputs = len(node.output_values)
    module = OnnxSplit18(axis, sizes, int(num_outputs) if num_outputs is not None else None)
    inputs = (node.input_values[0],) if sizes is not None or not split_name else node.input_values[:2]
    return keep_only_used_output(node, graph, result(module, node, inputs))
