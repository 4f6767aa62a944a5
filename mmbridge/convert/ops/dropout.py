"""``Dropout`` -> ``nn.Dropout(p)`` with the ratio of the graph, switched by ``train()`` / ``eval()``.

Like Keras ``training=True`` / ``False``, the module's mode decides (ONNX's ``training_mode``
input is not read). A ratio that is computed at run time keeps onnx2torch's ``OnnxDropoutDynamic``
(``F.dropout`` with that ratio). The optional ``mask`` output is not supported when something
reads it.

A Dropout node whose name ends with ``__mmb_noise_per_sample`` (a Keras ``Dropout`` with
``noise_shape=(None, 1, ..., 1)``, e.g. EfficientNet's stochastic depth; written by
:mod:`mmbridge.export.trainable`) becomes :class:`PerSampleDropout`: one keep / drop decision per
sample, as Keras draws it.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, const, delegate, input_at, rank_of, register, result

#: The suffix :mod:`mmbridge.export.trainable` (``NOISE_MARK``) gives a per-sample Dropout's node name.
NOISE_MARK = "__mmb_noise_per_sample"


class PerSampleDropout(nn.Dropout):
    """Dropout with Keras ``noise_shape=(None, 1, ..., 1)``: in ``train()`` each sample of the batch is
    kept (scaled by ``1 / (1 - p)``) or zeroed as a whole; the identity in ``eval()`` or at ``p == 0``.

    Input / output ``[N, *]`` (any layout: the mask is ``[N, 1, ..., 1]``). ``noise_shape`` is the
    Keras value (``None`` for the batch axis; None when the rank is unknown), kept for the training-contract audit.
    """

    def __init__(self, p: float, rank: int | None = None):
        super().__init__(p=p)
        self.noise_shape = (None,) + (1,) * (rank - 1) if rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


def _mask_is_read(node: OnnxNode, graph: OnnxGraph) -> bool:
    if len(node.output_values) < 2 or not node.output_values[1]:
        return False
    mask = node.output_values[1]
    return mask in graph.output_values or any(mask in n.input_values for n in graph.nodes.values())


@register("Dropout", 12, 13, 22)
def dropout(node: OnnxNode, graph: OnnxGraph):
    if node.attributes.get("seed") is not None:
        raise NotImplementedError(f"Dropout node {node.name!r}: a fixed 'seed' is not supported; {TO_ORT}")
    if _mask_is_read(node, graph):
        raise NotImplementedError(f"Dropout node {node.name!r}: its 'mask' output is used, which the torch "
                                  f"Dropout does not produce; {TO_ORT}")
    ratio_name = input_at(node, 1)
    ratio = const(graph, ratio_name)
    if ratio_name and ratio is None:
        return delegate(node, graph, 12)  # computed ratio: F.dropout(x, ratio) at run time
    p = 0.5 if ratio is None else float(ratio.reshape(-1)[0])
    if node.name.endswith(NOISE_MARK):
        return result(PerSampleDropout(p, rank_of(graph, node.input_values[0])), node, (node.input_values[0],))
    return result(nn.Dropout(p=p), node, (node.input_values[0],))
