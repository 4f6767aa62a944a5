"""``BatchNormalization`` -> torch BatchNorm whose running variance moves like Keras' (and ONNX's).

With constant scale / bias / mean / var and one output (what a trainable export writes), the
node becomes :class:`BatchNorm1d` / :class:`BatchNorm2d` / :class:`BatchNorm3d` (by the input's
rank; :class:`BatchNorm` when the rank is unknown), subclasses of torch's, so
``isinstance(m, nn.modules.batchnorm._BatchNorm)`` holds: ONNX's ``epsilon``,
``momentum = 1 - onnx_momentum`` (Keras 0.99 -> torch 0.01), the parameters and running
statistics in the initializers' dtype (float64 graphs stay float64), and the running variance
updated with the *population* variance of the batch, as Keras and the ONNX spec do (torch's own
BatchNorm uses the unbiased one, which drifts by ``n / (n - 1)``). A node whose name carries
:data:`~mmbridge.graph.markers.BN_BESSEL` (tf-keras' fused BatchNormalization, which moves its moving
variance towards the unbiased batch variance) keeps torch's own unbiased update
(``population_variance = False``). Other forms (computed statistics) go to onnx2torch's converter.

In a ``trainable=True`` export (marked initializers), a scale of ones / bias of zeros that is *not*
a marked Keras variable is Keras' ``BatchNormalization(scale=False)`` / ``center=False``: it
becomes a buffer (``weight`` / ``bias``), so the torch module gains no trainable gamma / beta the
Keras model does not have.

Shape notation: ``N`` batch, ``C`` channels, ``L`` / ``H, W`` / ``D, H, W`` spatial.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import const, delegate, rank_of, register, result
from mmbridge.graph.markers import BN_BESSEL, STATE_MARK, VAR_MARK, marker_of


class _PopulationVarianceBN:
    """Mixin: training-mode BatchNorm whose running variance uses the population variance.

    Normalisation, gradients and the running-mean update are torch's fused ``F.batch_norm``
    (batch statistics); only the running variance differs: Keras and the ONNX spec move it
    towards the population variance ``var_pop`` (divided by ``n``), torch towards the unbiased
    one (``n / (n - 1)`` larger). After torch's update, ``running_var`` is corrected in O(C):
    ``new = (1 - m) * old + (torch_new - (1 - m) * old) * (n - 1) / n``, which equals
    ``(1 - m) * old + m * var_pop`` (``n`` = elements per channel in the batch).

    ``population_variance = False`` (tf-keras' fused BatchNormalization) keeps torch's update with the
    unbiased variance, which is what that layer does: ``(1 - m) * old + m * var_pop * n / (n - 1)``.
    """

    population_variance: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self._check_input_dim(x)
        if not (self.training and self.track_running_stats and self.population_variance):
            return super().forward(x)  # type: ignore[misc]
        m = self.momentum if self.momentum is not None else 0.1
        n = x.numel() // x.shape[1]
        # torch updates a copy (the buffer itself must not change under autograd's saved inputs)
        torch_var = self.running_var.detach().clone()
        y = nn.functional.batch_norm(x, self.running_mean, torch_var, self.weight, self.bias, True, m, self.eps)
        with torch.no_grad():
            keep = (1.0 - m) * self.running_var
            self.running_var.copy_(keep + (torch_var - keep) * ((n - 1) / n) if n > 1 else torch_var)
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_PopulationVarianceBN, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (input ``[N, C]`` or ``[N, C, L]``) with Keras / ONNX running-variance update."""


class BatchNorm2d(_PopulationVarianceBN, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (input ``[N, C, H, W]``) with Keras / ONNX running-variance update."""


class BatchNorm3d(_PopulationVarianceBN, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (input ``[N, C, D, H, W]``) with Keras / ONNX running-variance update."""


class BatchNorm(_PopulationVarianceBN, nn.modules.batchnorm._BatchNorm):
    """Population-variance BatchNorm for input ``[N, C, *]`` of any rank >= 2 (rank unknown at conversion)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects input [N, C, *], got {x.dim()}D")


_BY_RANK = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}


@register("BatchNormalization", 9, 14, 15)
def batch_normalization(node: OnnxNode, graph: OnnxGraph):
    ins = node.input_values
    values = [const(graph, name) for name in ins[1:5]]
    if len(ins) != 5 or any(v is None for v in values) or len(node.output_values) != 1:
        return delegate(node, graph)  # onnx2torch's functional OnnxBatchNorm
    scale, bias, mean, var = values
    attrs = node.attributes
    cls = _BY_RANK.get(rank_of(graph, ins[0]), BatchNorm)
    bn = cls(scale.shape[0], eps=float(attrs.get("epsilon", 1e-5)), momentum=1.0 - float(attrs.get("momentum", 0.9)),
             dtype=scale.dtype)
    bn.population_variance = BN_BESSEL not in node.name
    with torch.no_grad():
        bn.weight.copy_(scale)
        bn.bias.copy_(bias.to(scale.dtype))
        bn.running_mean.copy_(mean.to(scale.dtype))
        bn.running_var.copy_(var.to(scale.dtype))
    if _has_markers(graph):  # a trainable export: a constant gamma / beta is Keras' scale=False / center=False
        for pname, onnx_name, fill in (("weight", ins[1], 1.0), ("bias", ins[2], 0.0)):
            value = getattr(bn, pname).detach()
            if not marker_of(onnx_name) and bool((value == fill).all()):
                delattr(bn, pname)
                bn.register_buffer(pname, value.clone())  # F.batch_norm still applies it; nothing trains it
    return result(bn, node, (ins[0],))


def _has_markers(graph: OnnxGraph) -> bool:
    """True for the graph of a ``trainable=True`` export (its Keras variables are marked initializers)."""
    cached = getattr(graph, "_mmbridge_has_markers", None)
    if cached is None:
        cached = any(marker_of(name) in (VAR_MARK, STATE_MARK) for name in graph.initializers)
        graph._mmbridge_has_markers = cached
    return cached
