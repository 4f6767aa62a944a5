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
