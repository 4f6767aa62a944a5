"""``Pad`` with constant pads (and value) -> :class:`Pad` (Python ints); :class:`SamePad` for ``auto_pad=SAME_*``.

ONNX pads are ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` (``axes``, opset 18+, says
which dims they are for); ``F.pad`` wants ``[last_begin, last_end, ..., first_begin, first_end]``.
Modes: ``constant``, ``reflect``, ``edge`` (torch ``replicate``), ``wrap`` (opset 19+, torch
``circular``); negative pads crop. A value input is ignored for the modes other than
``constant``, as ONNX says (``F.pad`` raised on it). Pads computed at run time keep onnx2torch's ``OnnxPadDynamic``.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import (
    TO_ORT,
    const,
    const_ints,
    delegate,
    input_at,
    rank_of,
    register,
    result,
)

_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class Pad(nn.Module, OnnxToTorchModule):
    """``F.pad(x, pads, mode, value)`` with ``pads`` in torch order (last dim first), as Python ints."""

    def __init__(self, pads: list[int], mode: str = "constant", value: float = 0.0):
        super().__init__()
        self.pads = [int(p) for p in pads]
        self.mode = mode
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return nn.functional.pad(x, self.pads, mode="constant", value=self.value)
        # torch's reflect / replicate / circular pad the last k <= 3 dims of a (k+1)- or (k+2)-D
        # tensor; ONNX pads any dims: fold the unpadded leading dims into one (or add one) first
        # (a 2-D reflect pad of both dims crashed with "Padding size 4 is not supported for 2D input").
        k = len(self.pads) // 2
        if x.dim() == k + 1:
            return nn.functional.pad(x, self.pads, mode=self.mode)
        lead = x.shape[: x.dim() - k]
        y = nn.functional.pad(x.reshape((-1,) + tuple(x.shape[x.dim() - k:])), self.pads, mode=self.mode)
        return y.reshape(tuple(lead) + tuple(y.shape[1:]))

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}" + (f", value={self.value}" if self.mode == "constant" else "")


class PadComputed(nn.Module, OnnxToTorchModule):
    """``Pad`` of ``x`` (any rank) with ``pads`` computed at run time (int64 ``[2 * rank]``, ONNX order), for
    ``reflect`` / ``edge`` with a (meaningless) value input, which onnx2torch's module passes on to ``F.pad``
    (``RuntimeError: Padding mode "reflect" doesn't take in value argument``)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, torch_pads([int(p) for p in pads.tolist()], x.dim()), mode=self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class SamePad(nn.Module):
    """ONNX ``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` computed from the input size at run time.

    Pads ``[N, C, *spatial]`` so that a following VALID Conv / MaxPool with ``kernel``,
    ``strides``, ``dilations`` outputs ``ceil(in / stride)`` per spatial axis (ONNX rule: the odd
    pixel goes at the end for ``SAME_UPPER``, at the start for ``SAME_LOWER``). ``value`` is the
    pad value (0 for Conv, ``-inf`` for MaxPool). Works for any H / W (dynamic specs).
    """

    def __init__(self, kernel: list[int], strides: list[int], dilations: list[int], upper: bool, value: float = 0.0):
        super().__init__()
        self.kernel, self.strides, self.dilations = list(kernel), list(strides), list(dilations)
        self.upper = upper
        self.value = value

    def pads_for(self, x: torch.Tensor) -> list[Any]:
        """The ``F.pad`` pads (last spatial axis first, 2 per spatial axis) for input ``x``."""
        pads: list[Any] = []
        for i in reversed(range(len(self.kernel))):  # F.pad: last axis first
            size = x.shape[2 + i]
            s, k, d = self.strides[i], self.kernel[i], self.dilations[i]
            out = (size + s - 1) // s
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            pads += [small, total - small] if self.upper else [total - small, small]
        return pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pads_for(x), value=self.value)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, strides={self.strides}, {'SAME_UPPER' if self.upper else 'SAME_LOWER'}"


def torch_pads(onnx_pads: list[int], rank: int | None = None, axes: list[int] | None = None) -> list[int]:
    """ONNX ``pads`` (for ``axes``, default all dims) -> ``F.pad`` order, trailing all-zero dims dropped.

    Raises:
        NotImplementedError: ``axes`` given but the input rank is unknown.
    """
    half = len(onnx_pads) // 2
    begins, ends = onnx_pads[:half], onnx_pads[half:]
    if axes is not None:
        if rank is None:
            raise NotImplementedError("Pad with an 'axes' input needs the input's rank, which shape inference did not give")
        full_b, full_e = [0] * rank, [0] * rank
        for a, b, e in zip(axes, begins, ends):
            full_b[a % rank], full_e[a % rank] = b, e
        begins, ends = full_b, full_e
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    while len(out) > 2 and out[-1] == 0 and out[-2] == 0:  # leading dims (N, C) unpadded: reflect/replicate need it
        out = out[:-2]
    return out


@register("Pad", 11, 13, 18, 19, 21, 23, 24, 25)
def pad(node: OnnxNode, graph: OnnxGraph):
    mode_name = node.attributes.get("mode", "constant")
    mode_name = mode_name.decode() if isinstance(mode_name, bytes) else mode_name
    if mode_name not in _MODES:
        raise NotImplementedError(f"Pad node {node.name!r}: mode {mode_name!r} is not supported; {TO_ORT}")
    pads = const_ints(graph, input_at(node, 1))
    value_name, axes_name = input_at(node, 2), input_at(node, 3)
    if mode_name != "constant":  # ONNX ignores the value for reflect / edge / wrap; F.pad refuses one
        value_name = ""
    value = const(graph, value_name)
    axes = const_ints(graph, axes_name)
    if pads is None or (value_name and value is None) or (axes_name and axes is None):
        if axes_name:
            raise NotImplementedError(f"Pad node {node.name!r}: computed pads / axes with an 'axes' input are not "
                                      f"supported; {TO_ORT}")
        if mode_name == "wrap":
            raise NotImplementedError(f"Pad node {node.name!r}: mode 'wrap' with computed pads is not supported; {TO_ORT}")
        if mode_name != "constant" and input_at(node, 2):  # onnx2torch would pass the value on to F.pad
            return result(PadComputed(_MODES[mode_name]), node, (node.input_values[0], input_at(node, 1)))
        return delegate(node, graph, 13)  # computed pads: onnx2torch's OnnxPadDynamic
    tpads = torch_pads(pads, rank_of(graph, node.input_values[0]), axes)
    if mode_name != "constant" and len(tpads) > 6:
        raise NotImplementedError(f"Pad node {node.name!r}: mode {mode_name!r} over {len(tpads) // 2} dims; torch pads "
                                  f"at most the last 3 dims in this mode; {TO_ORT}")
    module = Pad(tpads, _MODES[mode_name],
                 float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0)
    return result(module, node, (node.input_values[0],))
