"""Index ops: ``NonZero`` (ONNX's ``[rank, n]`` layout), ``GatherND`` with ``batch_dims``, ``ReverseSequence``.

* ``NonZero`` 9 / 13: onnx2torch returns ``torch.nonzero`` (``[n, rank]``); ONNX (and
  ``tf.where(cond)`` through tf2onnx's ``Transpose``) expects ``[rank, n]``, int64, row-major order.
* ``GatherND`` 11 / 12 / 13 with any ``batch_dims``: ``tf.gather(x, i, batch_dims=1)`` is
  exported as ``Unsqueeze(i, -1)`` + ``GatherND(batch_dims=1)``, which onnx2torch refuses at
  its first call. Negative indices count from the end of their dim, as ORT does.
* ``ReverseSequence`` 10 (Keras ``Bidirectional(LSTM)`` with masking): reverses the first
  ``sequence_lens[b]`` steps along ``time_axis`` of every batch entry ``b``, the rest is kept.
"""

from __future__ import annotations

import math

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import register


class NonZero(nn.Module, OnnxToTorchModule):
    """ONNX ``NonZero``: the indices of the non-zero elements, ``[rank, n]`` int64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x).transpose(0, 1).contiguous()


@register("NonZero", 9, 13)
def non_zero(node: OnnxNode, graph: OnnxGraph):
    return NonZero()


class GatherND(nn.Module, OnnxToTorchModule):
    """ONNX ``GatherND``: ``data [*B, *D]``, ``indices [*B, *I, m]`` -> ``[*B, *I, *D[m:]]`` (``len(B) = batch_dims``)."""

    def __init__(self, batch_dims: int = 0):
        super().__init__()
        self.batch_dims = int(batch_dims)

    def forward(self, data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b = self.batch_dims
        m = indices.shape[-1]
        batch = tuple(data.shape[:b])
        nb = math.prod(batch)
        flat = data.reshape((nb,) + tuple(data.shape[b:]))
        idx = indices.to(torch.int64).reshape((nb,) + tuple(indices.shape[b:]))
        mid = tuple(idx.shape[1:-1])
        bidx = torch.arange(nb, device=data.device).reshape((nb,) + (1,) * len(mid)).expand((nb,) + mid)
        picked = flat[(bidx,) + tuple(idx[..., j] for j in range(m))]
        return picked.reshape(batch + mid + tuple(data.shape[b + m:]))

    def extra_repr(self) -> str:
        return f"batch_dims={self.batch_dims}"


@register("GatherND", 11, 12, 13)
def gather_nd(node: OnnxNode, graph: OnnxGraph):
    return GatherND(int(node.attributes.get("batch_dims", 0)))


class ReverseSequence(nn.Module, OnnxToTorchModule):
    """ONNX ``ReverseSequence``: per batch entry ``b``, steps ``0 .. lens[b] - 1`` along ``time_axis`` reversed."""

    def __init__(self, batch_axis: int = 1, time_axis: int = 0):
        super().__init__()
        self.batch_axis, self.time_axis = int(batch_axis), int(time_axis)

    def forward(self, x: torch.Tensor, sequence_lens: torch.Tensor) -> torch.Tensor:
        moved = x.movedim((self.batch_axis, self.time_axis), (0, 1))  # [B, T, ...]
        steps = moved.shape[1]
        t = torch.arange(steps, device=x.device).unsqueeze(0)
        lens = sequence_lens.to(torch.int64).unsqueeze(1)
        src = torch.where(t < lens, lens - 1 - t, t)  # [B, T]
        src = src.reshape(src.shape + (1,) * (moved.dim() - 2)).expand(moved.shape)
        return torch.gather(moved, 1, src).movedim((0, 1), (self.batch_axis, self.time_axis))

    def extra_repr(self) -> str:
        return f"batch_axis={self.batch_axis}, time_axis={self.time_axis}"


@register("ReverseSequence", 10)
def reverse_sequence(node: OnnxNode, graph: OnnxGraph):
    return ReverseSequence(node.attributes.get("batch_axis", 1), node.attributes.get("time_axis", 0))


class Compress(nn.Module, OnnxToTorchModule):
    """ONNX ``Compress`` (https://onnx.ai/onnx/operators/onnx__Compress.html): the slices of ``x``
    along ``axis`` where the 1-D bool ``condition`` is true (``condition`` may be shorter than
    the axis: the rest is dropped); ``axis`` None: the elements of ``x`` flattened. The output
    length is data dependent (one ``nonzero``: a graph break under ``torch.compile``)."""

    def __init__(self, axis: int | None):
        super().__init__()
        self.axis = None if axis is None else int(axis)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        keep = torch.nonzero(condition.reshape(-1)).reshape(-1)
        if self.axis is None:
            return x.reshape(-1).index_select(0, keep)
        return x.index_select(self.axis % x.dim(), keep)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


@register("Compress", 9, 11)
def compress(node: OnnxNode, graph: OnnxGraph):
    return Compress(node.attributes.get("axis"))
