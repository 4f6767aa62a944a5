"""``Dropout`` -> ``nn.Dropout(p)`` with the ratio of the graph, switched by ``train()`` / ``eval()``.

Like Keras ``training=True`` / ``False``, the module's mode decides (ONNX's ``training_mode``
input is not read). A ratio that is computed at run time keeps onnx2torch's ``OnnxDropoutDynamic``
(``F.dropout`` with that ratio). The optional ``mask`` output is not supported when something
reads it.

A Dropout node whose name ends with ``__mmb_noise_per_sample`` (a Keras ``Dropout`` with
``noise_shape=(None, 1, ..., 1)``, e.g. EfficientNet's stochastic depth; written by
:mod:`mmbridge.export.trainable`) becomes :class:`PerSampleDropout`: one keep / drop decision per
sample, as Keras draws it.

A Dropout node whose name ends with ``__mmb_noise_per_channel_a<axis>`` (a Keras
``SpatialDropout1D/2D/3D``; :data:`~mmbridge.graph.markers.CHANNEL_MARK`) becomes
:class:`ChannelDropout`: one keep / drop decision per (sample, channel), the channel at ``<axis>``
of the graph's layout at that node (the export reads it off the marker's shape, so NHWC graphs and
``inputs_as_nchw`` ones both name the right axis).
"""

from __future__ import annotations

import re

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, const, delegate, input_at, rank_of, register, result
from mmbridge.graph.markers import CHANNEL_MARK

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


class ChannelDropout(nn.Dropout):
    """Dropout with one mask value per (sample, channel), as Keras ``SpatialDropout1D/2D/3D`` draws it
    (Tompson et al., 2015, "Efficient Object Localization Using Convolutional Networks"): in ``train()``
    each feature map ``x[n, ..., c, ...]`` is kept as a whole (scaled by ``1 / (1 - p)``) or zeroed; the
    identity in ``eval()`` or at ``p == 0``.

    Args:
        p: the drop probability (Keras ``rate``).
        channel_axis: the channel axis of the input in this graph's layout (``-1`` / ``rank - 1`` for
            NHWC / NLC / NDHWC, ``1`` for NCHW); the batch is axis 0.

    Input / output ``[N, *]`` of rank >= 2, any float dtype; the mask is ``[N, 1, .., C, .., 1]``.
    ``noise_shape`` (``(None, 1, .., "C", .., 1)`` once the rank is known from a call, else None) is
    what the training-contract audit reads.
    """

    def __init__(self, p: float, channel_axis: int, rank: int | None = None):
        super().__init__(p=p)
        if channel_axis == 0:
            raise ValueError("ChannelDropout: channel_axis 0 is the batch axis; pass the channel axis (>= 1, or < 0)")
        self.channel_axis = channel_axis
        self.noise_shape: tuple | None = None
        if rank:
            ax = channel_axis % rank
            self.noise_shape = tuple(None if i == 0 else ("C" if i == ax else 1) for i in range(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training or self.p == 0.0:
            return x
        ax = self.channel_axis % x.dim()
        shape = [x.shape[0]] + [x.shape[i] if i == ax else 1 for i in range(1, x.dim())]
        keep = 1.0 - self.p
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


_CHANNEL_AXIS = re.compile(re.escape(CHANNEL_MARK) + r"_a(\d+)$")


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
    channel = _CHANNEL_AXIS.search(node.name)
    if channel:
        return result(ChannelDropout(p, int(channel.group(1)), rank_of(graph, node.input_values[0])), node,
                      (node.input_values[0],))
    if node.name.endswith(NOISE_MARK):
        return result(PerSampleDropout(p, rank_of(graph, node.input_values[0])), node, (node.input_values[0],))
    return result(nn.Dropout(p=p), node, (node.input_values[0],))
