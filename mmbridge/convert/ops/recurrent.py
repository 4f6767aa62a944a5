"""ONNX ``LSTM`` / ``GRU`` / ``RNN`` (versions 7, 14, 22) -> :class:`OnnxRecurrent`, step by step.

onnx2torch 1.5.15 has none of them; tf2onnx's LSTM rewriter turns a frozen Keras ``LSTM`` into one
native ONNX ``LSTM`` node (``W`` / ``R`` / ``B`` initializers, ``B = [Wb, Rb]`` with ``Rb = 0``).
The ONNX equations (https://onnx.ai/onnx/operators/onnx__LSTM.html, ``onnx__GRU.html``,
``onnx__RNN.html``) run with ``W`` / ``R`` / ``B`` / ``P`` as call inputs (parameters of the outer
module): ``direction`` forward / reverse / bidirectional, ``sequence_lens``, initial states,
peepholes, ``layout``, ``clip``, ``linear_before_reset`` and the activation functions of the spec.
Not supported (``NotImplementedError`` naming the node): LSTM ``input_forget=1`` and unknown
activation names.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

from mmbridge.convert.ops._common import TO_ORT as _TO_ORT
from mmbridge.convert.ops._common import register

# ---------------------------------------------------------------------------------------------
# LSTM / GRU / RNN
# ---------------------------------------------------------------------------------------------
# name -> (fn(x, alpha, beta), default alpha, default beta, number of parameters it consumes)
_ACTIVATIONS: dict[str, tuple[Any, float, float, int]] = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), 0.0, 0.0, 0),
    "tanh": (lambda x, a, b: torch.tanh(x), 0.0, 0.0, 0),
    "relu": (lambda x, a, b: torch.relu(x), 0.0, 0.0, 0),
    "softsign": (lambda x, a, b: F.softsign(x), 0.0, 0.0, 0),
    "softplus": (lambda x, a, b: F.softplus(x), 0.0, 0.0, 0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, 0.0, 1),
    "thresholdedrelu": (lambda x, a, b: x * (x > a).to(x.dtype), 1.0, 0.0, 1),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, 0.0, 1),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5, 2),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0, 2),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0, 2),
}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class OnnxRecurrent(nn.Module, OnnxToTorchModule):
    """ONNX ``LSTM`` / ``GRU`` / ``RNN`` (https://onnx.ai/onnx/operators/onnx__LSTM.html, ``onnx__GRU.html``,
    ``onnx__RNN.html``), computed step by step from the weights given as call inputs.

    Shapes (``layout=0``; ``layout=1`` swaps the first two axes of ``X``, ``Y``, ``Y_h``, ``Y_c``):
    ``X [T, N, I]``, ``W [D, G*H, I]``, ``R [D, G*H, H]``, ``B [D, 2*G*H]`` (``[Wb, Rb]``),
    ``sequence_lens [N]`` (int), ``initial_h`` / ``initial_c [D, N, H]``, ``P [D, 3*H]`` (LSTM
    peepholes, order ``i, o, f``); ``G`` = 4 (LSTM, gate order ``i, o, f, c``), 3 (GRU, ``z, r, h``)
    or 1 (RNN), ``D`` = 2 if bidirectional else 1. Float dtypes; under autocast the matmuls run
    in the autocast dtype.

    Returns ``(Y [T, D, N, H], Y_h [D, N, H], Y_c [D, N, H])`` truncated to the node's outputs
    (LSTM only has ``Y_c``); one tensor if the node has one output. Steps at or beyond a batch
    entry's ``sequence_lens`` give zeros in ``Y`` and leave its state unchanged.
    """

    def __init__(self, kind: str, hidden_size: int, direction: str, activations: list[tuple[str, float, float]],
                 clip: float | None, layout: int, linear_before_reset: bool, n_outputs: int):
        super().__init__()
        self.kind = kind
        self.hidden_size = hidden_size
        self.direction = direction
        self.activations = activations
        self.clip = clip
        self.layout = layout
        self.linear_before_reset = linear_before_reset
        self.n_outputs = n_outputs

    def _act(self, d: int, k: int, x: torch.Tensor) -> torch.Tensor:
        per_dir = len(_DEFAULT_ACTS[self.kind])
        name, a, b = self.activations[d * per_dir + k]
        return _ACTIVATIONS[name][0](x, a, b)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)

    def forward(self, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
                sequence_lens: torch.Tensor | None = None, initial_h: torch.Tensor | None = None,
                initial_c: torch.Tensor | None = None, p: torch.Tensor | None = None):
        if self.layout:
            x = x.transpose(0, 1)
            initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
            initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
        steps, batch = x.shape[0], x.shape[1]
        hs, g = self.hidden_size, _GATES[self.kind]
        ys, last_h, last_c = [], [], []
        for d in range(w.shape[0]):
            reverse = self.direction == "reverse" or d == 1
            xw = torch.matmul(x, w[d].t())  # [T, N, G*H]: all input projections at once
            wb = rb = None
            if b is not None:
                wb, rb = b[d, :g * hs], b[d, g * hs:]
                xw = xw + wb
            h = initial_h[d] if initial_h is not None else x.new_zeros(batch, hs)
            c = initial_c[d] if initial_c is not None else x.new_zeros(batch, hs)
            outs: list[torch.Tensor | None] = [None] * steps
            for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
                if self.kind == "LSTM":
                    gates = xw[t] + torch.matmul(h, r[d].t())
                    if rb is not None:
                        gates = gates + rb
                    gi, go, gf, gc = gates.split(hs, dim=-1)
                    if p is not None:
                        pi, po, pf = p[d].split(hs)
                        gi, gf = gi + pi * c, gf + pf * c
                    i_t, f_t = self._act(d, 0, self._pre(gi)), self._act(d, 0, self._pre(gf))
                    c_new = f_t * c + i_t * self._act(d, 1, self._pre(gc))
                    if p is not None:
                        go = go + po * c_new
                    h_new = self._act(d, 0, self._pre(go)) * self._act(d, 2, c_new)
                elif self.kind == "GRU":
                    xz, xr, xh = xw[t].split(hs, dim=-1)
                    rz, rr, rh = r[d].split(hs, dim=0)
                    bz, br, bh = rb.split(hs) if rb is not None else (None, None, None)
                    hz, hr = torch.matmul(h, rz.t()), torch.matmul(h, rr.t())
                    if rb is not None:
                        hz, hr = hz + bz, hr + br
                    z_t, r_t = self._act(d, 0, self._pre(xz + hz)), self._act(d, 0, self._pre(xr + hr))
                    if self.linear_before_reset:
                        hh = torch.matmul(h, rh.t())
                        hh = r_t * (hh + bh if bh is not None else hh)
                    else:
                        hh = torch.matmul(r_t * h, rh.t())
                        hh = hh + bh if bh is not None else hh
                    h_new = (1 - z_t) * self._act(d, 1, self._pre(xh + hh)) + z_t * h
                    c_new = c
                else:
                    pre = xw[t] + torch.matmul(h, r[d].t())
                    if rb is not None:
                        pre = pre + rb
                    h_new = self._act(d, 0, self._pre(pre))
                    c_new = c
                if sequence_lens is not None:
                    valid = (t < sequence_lens.to(torch.int64)).unsqueeze(-1)
                    h, c = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
                    outs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
                else:
                    h, c = h_new, c_new
                    outs[t] = h_new
            steps_out = [o for o in outs if o is not None]
            dtype = reduce(torch.promote_types, (o.dtype for o in steps_out)) if steps_out else x.dtype
            ys.append(torch.stack([o.to(dtype) for o in steps_out]) if steps_out else x.new_zeros(0, batch, hs))
            last_h.append(h)
            last_c.append(c)
        y = torch.stack(ys, dim=1)  # [T, D, N, H]
        y_h = torch.stack([v.to(y.dtype) for v in last_h])
        y_c = torch.stack([v.to(y.dtype) for v in last_c])
        if self.layout:
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        results = (y, y_h, y_c)[:self.n_outputs]
        return results[0] if len(results) == 1 else results

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden_size={self.hidden_size}, direction={self.direction!r}, layout={self.layout}"


def _recurrent_converter(kind: str):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        where = f"{kind} node {node.name!r}"
        attrs = node.attributes
        if int(attrs.get("input_forget", 0)):
            raise NotImplementedError(f"{where}: input_forget=1 is not supported; {_TO_ORT}")
        direction = attrs.get("direction", "forward")
        n_dir = 2 if direction == "bidirectional" else 1
        names = list(attrs.get("activations", [])) or _DEFAULT_ACTS[kind] * n_dir
        if len(names) == len(_DEFAULT_ACTS[kind]) and n_dir == 2:
            names = names * 2
        alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
        acts = []
        for name in names:
            key = name.lower()
            if key not in _ACTIVATIONS:
                raise NotImplementedError(f"{where}: activation {name!r} is not supported; {_TO_ORT}")
            _, a, b, n_params = _ACTIVATIONS[key]
            if n_params >= 1 and alphas:
                a = float(alphas.pop(0))
            if n_params >= 2 and betas:
                b = float(betas.pop(0))
            acts.append((key, a, b))
        hidden = attrs.get("hidden_size")
        if hidden is None:
            raise NotImplementedError(f"{where}: the hidden_size attribute is required")
        clip = attrs.get("clip")
        module = OnnxRecurrent(kind, int(hidden), direction, acts, float(clip) if clip is not None else None,
                               int(attrs.get("layout", 0)), bool(attrs.get("linear_before_reset", 0)),
                               len(node.output_values))
        return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
            inputs=node.input_values, outputs=node.output_values))

    return convert



for _kind in _GATES:
    register(_kind, 7, 14, 22)(_recurrent_converter(_kind))
