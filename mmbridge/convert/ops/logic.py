"""Comparisons, bit and mask ops onnx2torch lacks (or lacks at a version).

* ``GreaterOrEqual`` / ``LessOrEqual`` 12 and 16 (onnx2torch has 12 only; GPT-2 / Llama causal
  masks are written at 16+) -> ``torch.ge`` / ``torch.le``, numpy broadcasting, bool output;
* ``BitShift`` 11 (``direction`` LEFT / RIGHT, unsigned ints) -> shifts in a wider signed
  dtype, cast back (torch has no shift for uint16/32/64 on CPU), so bits shifted out are dropped
  as ONNX does;
* ``Trilu`` 14 (``upper``, an optional constant or runtime ``k``) -> ``torch.triu`` / ``torch.tril``
  over the last two dims.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, input_at, register, result

_COMPARE = {"GreaterOrEqual": torch.ge, "LessOrEqual": torch.le}


class Compare(nn.Module, OnnxToTorchModule):
    """``a >= b`` / ``a <= b`` elementwise (broadcast), bool."""

    def __init__(self, op_type: str):
        super().__init__()
        self.op_type = op_type

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _COMPARE[self.op_type](a, b)

    def extra_repr(self) -> str:
        return self.op_type


@register("GreaterOrEqual", 12, 16)
@register("LessOrEqual", 12, 16)
def compare(node: OnnxNode, graph: OnnxGraph):
    return Compare(node.operation_type)


class BitShift(nn.Module, OnnxToTorchModule):
    """ONNX ``BitShift``: ``x << s`` or ``x >> s`` (logical) on unsigned ints, shift counts >= width give 0."""

    _WIDTH = {torch.uint8: 8, torch.uint16: 16, torch.uint32: 32, torch.uint64: 64}

    def __init__(self, left: bool):
        super().__init__()
        self.left = left

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        width = self._WIDTH.get(x.dtype)
        if width is None:
            raise TypeError(f"BitShift: ONNX defines it for unsigned ints, got {x.dtype}")
        if width < 64:
            wide, sw = x.to(torch.int64), s.to(torch.int64)
            mask = (1 << width) - 1
            out = (wide << sw.clamp(max=width)) & mask if self.left else wide >> sw.clamp(max=width)
            return out.to(x.dtype)
        # uint64: shift the int64 view (same bits); a right shift masks off the sign-extended bits
        xi, si = x.view(torch.int64), s.view(torch.int64)
        sc = si.clamp(0, 63)
        if self.left:
            out = xi << sc
        else:
            mask = torch.where(sc > 0, (torch.ones_like(sc) << (64 - sc).clamp(max=63)) - 1, torch.full_like(sc, -1))
            out = (xi >> sc) & mask
        big = (si >= 64) | (si < 0)  # >= 64 as uint64
        return torch.where(big, torch.zeros_like(out), out).view(torch.uint64)

    def extra_repr(self) -> str:
        return "left" if self.left else "right"


@register("BitShift", 11)
def bit_shift(node: OnnxNode, graph: OnnxGraph):
    direction = node.attributes["direction"]
    direction = direction.decode() if isinstance(direction, bytes) else direction
    return BitShift(direction == "LEFT")


class Trilu(nn.Module, OnnxToTorchModule):
    """ONNX ``Trilu`` over the last two dims: keep the upper (``triu``) or lower (``tril``) part from diagonal ``k``.

    ``k`` is a Python int when the graph gives it as a constant (or omits it: 0), else a runtime
    int64 scalar input.
    """

    def __init__(self, upper: bool, k: int | None):
        super().__init__()
        self.upper, self.k = upper, k

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diag = self.k if self.k is not None else int(k.reshape(-1)[0])
        return torch.triu(x, diag) if self.upper else torch.tril(x, diag)

    def extra_repr(self) -> str:
        return f"upper={self.upper}, k={'<runtime>' if self.k is None else self.k}"


@register("Trilu", 14)
def trilu(node: OnnxNode, graph: OnnxGraph):
    upper = bool(node.attributes.get("upper", 1))
    name = input_at(node, 1)
    k = const_ints(graph, name) if name else [0]
    if k is not None:
        return result(Trilu(upper, k[0]), node, (node.input_values[0],))
    return result(Trilu(upper, None), node, node.input_values[:2])
