"""``ScatterND`` with every ``reduction`` (``none`` / ``add`` / ``mul`` 16+, ``max`` / ``min`` 18+).

``reduction="none"`` goes to onnx2torch's converter. The reductions (TF ``scatter_nd`` of
repeated indices is exported as ``reduction="add"``) become :class:`ScatterNDReduce`: the first
``k = indices.shape[-1]`` dims of ``data`` are flattened to one, the index tuples to linear
indices (negative ones count from the end), and ``index_add`` / ``index_reduce`` folds every
update into the copy of ``data``, the data value included, as ONNX's sequential loop does.
"""

from __future__ import annotations

import math

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import delegate, register

_INDEX_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


class ScatterNDReduce(nn.Module, OnnxToTorchModule):
    """ONNX ``ScatterND`` with ``reduction`` in add / mul / max / min; ``data`` any shape, ``indices [..., k]`` int."""

    def __init__(self, reduction: str):
        super().__init__()
        if reduction not in ("add", *_INDEX_REDUCE):
            raise ValueError(f"ScatterND reduction {reduction!r}")
        self.reduction = reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        lead = tuple(data.shape[:k])
        idx = indices.to(torch.int64).reshape(-1, k)
        sizes = torch.tensor(lead, dtype=torch.int64, device=data.device)
        idx = torch.where(idx < 0, idx + sizes, idx)
        strides = torch.tensor([math.prod(lead[j + 1:]) for j in range(k)], dtype=torch.int64, device=data.device)
        lin = (idx * strides).sum(-1)
        flat = data.reshape((math.prod(lead), -1)).clone()
        upd = updates.reshape((lin.shape[0], flat.shape[1])).to(data.dtype)
        if self.reduction == "add":
            out = flat.index_add(0, lin, upd)
        else:
            out = flat.index_reduce(0, lin, upd, _INDEX_REDUCE[self.reduction], include_self=True)
        return out.reshape(data.shape)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


@register("ScatterND", 16, 18)
def scatter_nd(node: OnnxNode, graph: OnnxGraph):
    reduction = node.attributes.get("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction == "none":
        return delegate(node, graph, 16)
    return ScatterNDReduce(reduction)


_ELEMENTS_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


class ScatterElements(nn.Module, OnnxToTorchModule):
    """ONNX ``ScatterElements`` (https://onnx.ai/onnx/operators/onnx__ScatterElements.html):
    ``data`` any shape, ``indices`` / ``updates`` the same shape as each other (int32 / int64
    indices, negative ones count from the end of ``axis``) -> a copy of ``data`` with
    ``out[..., indices[i], ...] = updates[i]`` along ``axis`` (``torch.scatter``), or folded in with
    ``reduction`` add (``scatter_add``) / mul / max / min (``scatter_reduce``, the data value
    included, as the spec's loop). With ``reduction="none"`` and repeated indices the spec leaves
    the winner undefined (as torch does)."""

    def __init__(self, axis: int, reduction: str):
        super().__init__()
        if reduction not in ("none", "add", *_ELEMENTS_REDUCE):
            raise ValueError(f"ScatterElements reduction {reduction!r}")
        self.axis, self.reduction = int(axis), reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        axis = self.axis % data.dim()
        idx = indices.to(torch.int64)
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        updates = updates.to(data.dtype)
        if self.reduction == "none":
            return data.scatter(axis, idx, updates)
        if self.reduction == "add":
            return data.scatter_add(axis, idx, updates)
        return data.scatter_reduce(axis, idx, updates, _ELEMENTS_REDUCE[self.reduction], include_self=True)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, reduction={self.reduction!r}"


@register("ScatterElements", 11, 13, 16, 18)
def scatter_elements(node: OnnxNode, graph: OnnxGraph):
    reduction = node.attributes.get("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    return ScatterElements(node.attributes.get("axis", 0), reduction)
