"""``Slice`` 1 / 10 / 11 / 13: constant starts / ends / axes / steps as Python ints; scalar (0-d) ones accepted.

tf2onnx writes ``Slice`` with 0-d ``starts`` / ``ends`` inside loop bodies (``crop_and_resize``
slices box ``i`` with the loop counter); onnxruntime runs it, onnx2torch's ``OnnxSlice`` failed
with ``len() of a 0-d tensor``. ONNX's clamping: a negative start / end counts from the dim,
then for a positive step both clamp to ``[0, dim]``; for a negative step the start clamps to
``[0, dim - 1]`` and the end to ``[-1, dim - 1]`` (``-1``: through index 0), gathered with
``index_select`` since torch slices have positive steps only.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn

from mmbridge.convert.ops._common import const_ints, input_at, register, result
from mmbridge.convert.ops._symbolic import Expr, evaluate, shape_expr


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


class Slice(nn.Module, OnnxToTorchModule):
    """ONNX ``Slice`` of ``x`` (any dtype, any rank); arguments given at construction are fixed, the others
    are read from the call inputs ``(starts, ends, axes, steps)`` at run time.

    ``starts`` / ``ends`` given at construction may hold expressions over the dims of the tensors
    passed after the runtime arguments (:mod:`._symbolic`: ``ends = Shape(x)[1]``, the sequence
    length), which dynamo traces as symbolic ints instead of reading a tensor with ``.tolist()``.
    """

    def __init__(self, starts: list[Expr] | None, ends: list[Expr] | None, axes: list[int] | None,
                 steps: list[int] | None, runtime: tuple[str, ...] = ()):
        super().__init__()
        self.starts, self.ends, self.axes, self.steps = starts, ends, axes, steps
        self.runtime = tuple(runtime)  # which of starts / ends / axes / steps come as call inputs, in order

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.runtime, args))
        sources = args[len(self.runtime):]
        starts = _ints(given["starts"]) if "starts" in given else _eval(self.starts, sources)
        ends = _ints(given["ends"]) if "ends" in given else _eval(self.ends, sources)
        axes = _ints(given["axes"]) if "axes" in given else self.axes
        steps = _ints(given["steps"]) if "steps" in given else self.steps
        if axes is None:
            axes = list(range(len(starts)))
        if steps is None:
            steps = [1] * len(starts)
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = a % x.dim()
            d = x.shape[a]
            s = s + d if s < 0 else s
            e = e + d if e < 0 else e
            if st > 0:
                s, e = min(max(s, 0), d), min(max(e, 0), d)
                x = x[(slice(None),) * a + (slice(s, max(e, s), st),)]
            elif st < 0:
                s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
                idx = torch.arange(s, e, st, device=x.device) if s > e else torch.zeros(0, dtype=torch.int64, device=x.device)
                x = x.index_select(a, idx)
            else:
                raise ValueError("Slice: a step of 0")
        return x

    def extra_repr(self) -> str:
        return f"starts={self.starts}, ends={self.ends}, axes={self.axes}, steps={self.steps}, runtime={self.runtime}"


def _eval(values: list[Expr] | None, sources: tuple[torch.Tensor, ...]) -> list | None:
    return values if values is None or not sources else evaluate(values, sources)


@register("Slice", 1)
def slice_attributes(node: OnnxNode, graph: OnnxGraph):
    a = node.attributes
    return result(Slice(list(a["starts"]), list(a["ends"]), list(a["axes"]) if "axes" in a else None, None),
                  node, (node.input_values[0],))


@register("Slice", 10, 11, 13)
def slice_(node: OnnxNode, graph: OnnxGraph):
    names = dict(zip(("starts", "ends", "axes", "steps"), (input_at(node, k) for k in range(1, 5))))
    fixed: dict[str, list[Expr] | None] = {}
    runtime, inputs, sources = [], [node.input_values[0]], []
    for key, name in names.items():
        value = const_ints(graph, name) if name else None
        if name and value is None and key in ("starts", "ends"):  # computed from Shape: symbolic ints
            sym = shape_expr(graph, name, sources)
            if sym is not None:
                value = list(sym.elems)
        if name and value is None:
            runtime.append(key)
            inputs.append(name)
        fixed[key] = value
    return result(Slice(fixed["starts"], fixed["ends"], fixed["axes"], fixed["steps"], tuple(runtime)), node,
                  (*inputs, *sources))
