"""``Reduce*-18`` (axes moved from an attribute to an optional input) -> torch reductions.

``ReduceMean / Max / Min / Prod / L1 / L2 / LogSumExp / SumSquare / LogSum`` at opset 18
(onnx2torch 1.5.15 stops at 13). ``ReduceSum`` had the change at 13 and is onnx2torch's.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, input_at, register, result

_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": None,  # product over several axes is done one axis at a time below
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
}


# With no axes and noop_with_empty_axes=1 nothing is reduced, but the elementwise part of the
# reduction still applies (ONNX reference implementation and onnxruntime; issue 18):
# ReduceL1 / ReduceL2 -> |x|, ReduceSumSquare -> x * x, ReduceLogSum -> log(x); the others -> x.
_NOOP = {
    "ReduceL1": torch.abs,
    "ReduceL2": torch.abs,
    "ReduceSumSquare": lambda x: x * x,
    "ReduceLogSum": torch.log,
}


class OnnxReduce18(nn.Module, OnnxToTorchModule):
    """ONNX ``Reduce*-18`` (axes given as a constant input, or absent = all axes).

    ``x`` any float dtype, any shape; ``keepdims`` as in ONNX; with no (or empty) axes and
    ``noop_with_empty_axes=1`` no axis is reduced and only the elementwise part applies
    (``|x|`` for L1 / L2, ``x * x`` for SumSquare, ``log(x)`` for LogSum, ``x`` otherwise).
    """

    def __init__(self, op_type: str, axes: list[int] | None, keepdims: bool, noop: bool):
        super().__init__()
        self.op_type = op_type
        self.axes = axes
        self.keepdims = keepdims
        self.noop = noop

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = self.axes
        if dims is None and axes is not None and axes.numel():
            dims = [int(a) for a in axes.tolist()]
        if not dims:
            if self.noop:
                return _NOOP.get(self.op_type, lambda t: t)(x)
            dims = list(range(x.dim()))
        dims = sorted(d % x.dim() for d in dims)
        if self.op_type == "ReduceProd":
            out = x
            for d in reversed(dims):
                out = torch.prod(out, dim=d, keepdim=self.keepdims)
            return out
        return _REDUCE[self.op_type](x, tuple(dims), self.keepdims)


def reduce18(node: OnnxNode, graph: OnnxGraph):
    axes_name = input_at(node, 1)
    axes = const_ints(graph, axes_name)
    module = OnnxReduce18(node.operation_type, axes, bool(node.attributes.get("keepdims", 1)),
                          bool(node.attributes.get("noop_with_empty_axes", 0)))
    inputs = (node.input_values[0],) if axes is not None or not axes_name else node.input_values[:2]
    return result(module, node, inputs)


for _op in _REDUCE:
    register(_op, 18)(reduce18)
