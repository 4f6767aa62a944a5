"""``RandomUniform`` / ``RandomNormal`` / ``RandomUniformLike`` / ``RandomNormalLike`` -> torch's RNG.

onnx2torch 1.5.15 has no converter for ONNX's random generators. A ``training=True`` export of a
Keras augmentation layer (:mod:`mmbridge.export.augment`) writes them where Keras draws its
random factors, so the converted module draws from **torch's** default generator on the input's
device: ``torch.manual_seed`` / ``torch.random.fork_rng`` make it reproducible, and a DDP job that
seeds each rank differently (``seed + rank``) gets different augmentations per rank, as a
``tf.data`` pipeline sharded by ``tf.distribute`` would.

Registered for version 1 (opsets 1-21): onnxruntime 1.32 has no kernel for the version-22 ops, so
an export at opset 22 or later with random ops does not run there either (it fails at export).

Semantics (ONNX spec, "RandomUniform" and "RandomNormal", version 1): ``low + (high - low) *
U[0, 1)`` and ``mean + scale * N(0, 1)``; ``*Like`` take the shape (and, without ``dtype``, the
dtype) of their input; a fresh draw on every call, in ``train()`` and ``eval()`` alike (the graph
has no inference behaviour to switch to: export with ``training=False`` for that). A node with a
fixed ``seed`` attribute is refused (a per-node seed would make every DDP rank draw the same
numbers); keep such a graph in onnxruntime (``to_ort()``).
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule
from onnx2torch.utils.dtype import onnx_dtype_to_torch_dtype
from torch import nn

from mmbridge.convert.ops._common import TO_ORT, register, result


class RandomDraw(nn.Module, OnnxToTorchModule):
    """A tensor of ``shape`` (or the input's shape) from torch's default generator.

    ``kind="uniform"``: ``a + (b - a) * torch.rand``, values in ``[a, b)``; ``kind="normal"``:
    ``a + b * torch.randn`` (``a`` = mean, ``b`` = scale). ``dtype`` None: the input's dtype.
    Output on the input's device (CPU for the shape-only form). Not differentiable (no input
    gradient: the values do not depend on the input's values).
    """

    def __init__(self, kind: str, a: float, b: float, dtype: torch.dtype | None, shape: tuple[int, ...] | None):
        super().__init__()
        self.kind, self.a, self.b, self.dtype, self.shape = kind, float(a), float(b), dtype, shape

    def forward(self, *like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like[0].shape) if like else self.shape
        dtype = self.dtype or (like[0].dtype if like else torch.float32)
        device = like[0].device if like else None
        if self.kind == "uniform":
            return torch.rand(shape, dtype=dtype, device=device) * (self.b - self.a) + self.a
        return torch.randn(shape, dtype=dtype, device=device) * self.b + self.a


def _convert(node: OnnxNode, kind: str, like: bool) -> RandomDraw:
    attrs = node.attributes
    if attrs.get("seed") is not None:
        raise NotImplementedError(f"{node.operation_type} node {node.name!r}: a fixed 'seed' attribute is not "
                                  f"supported (torch's generator is seeded with torch.manual_seed instead); {TO_ORT}")
    dtype = onnx_dtype_to_torch_dtype(int(attrs["dtype"])) if "dtype" in attrs else None
    if kind == "uniform":
        a, b = attrs.get("low", 0.0), attrs.get("high", 1.0)
    else:
        a, b = attrs.get("mean", 0.0), attrs.get("scale", 1.0)
    shape = None if like else tuple(int(d) for d in attrs["shape"])
    return RandomDraw(kind, a, b, dtype, shape)


@register("RandomUniformLike", 1)
def random_uniform_like(node: OnnxNode, graph: OnnxGraph):
    return result(_convert(node, "uniform", True), node)


@register("RandomNormalLike", 1)
def random_normal_like(node: OnnxNode, graph: OnnxGraph):
    return result(_convert(node, "normal", True), node)


@register("RandomUniform", 1)
def random_uniform(node: OnnxNode, graph: OnnxGraph):
    return result(_convert(node, "uniform", False), node, ())


@register("RandomNormal", 1)
def random_normal(node: OnnxNode, graph: OnnxGraph):
    return result(_convert(node, "normal", False), node, ())
