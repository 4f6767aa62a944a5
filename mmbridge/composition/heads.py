"""Fusion heads and task heads, each from a :class:`~mmbridge._registry.Registry`.

Notation used for tensor shapes:
    - N: batch size
    - M: number of modalities (branches), in the order the model was composed
    - D: fusion width (``fusion_dim``)
    - C: number of classes (classification) or outputs (regression)

A **fusion head** is an ``nn.Module`` built as ``cls(num_modalities=M, dim=D, **kwargs)`` with
an ``out_dim`` attribute and ``forward(tokens, present) -> fused``:

* ``tokens``: float ``[N, M, D]``, one projected embedding per modality; rows of absent
  modalities are already zero;
* ``present``: bool ``[N, M]``, False where a modality is missing or was dropped (modality
  dropout); every row has at least one True;
* ``fused``: float ``[N, out_dim]``.

A **task head** is built as ``cls(in_dim, num_classes=..., **kwargs)`` and maps ``[N, in_dim]``
to ``[N, C]``.

Register your own with ``@fusion_heads.register("name")`` / ``@task_heads.register("name")``;
``mmbridge.fusion_heads.names()`` lists them.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbridge._registry import Registry
from mmbridge.errors import ConfigError

fusion_heads: Registry[type[nn.Module]] = Registry("fusion head", "mmbridge.fusion_heads.names()")
task_heads: Registry[type[nn.Module]] = Registry("task head", "mmbridge.task_heads.names()")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


@fusion_heads.register("concat")
class ConcatFusion(nn.Module):
    """Late fusion: concatenate the modality tokens and the presence mask, then an MLP.

    Args:
        num_modalities: M.
        dim: D, the width of each token; also the hidden and output width.
        dropout: dropout inside the MLP. Default is 0.1.

    Shapes: ``tokens [N, M, D]`` float, ``present [N, M]`` bool -> ``[N, D]`` float.
    The presence mask is part of the input so the MLP can tell "missing" from "zero".
    """

    def __init__(self, num_modalities: int, dim: int, *, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.norm = nn.LayerNorm(dim)
        self.mlp = _mlp(num_modalities * dim + num_modalities, dim, dim, dropout)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens) * present.unsqueeze(-1).to(tokens.dtype)
        x = torch.cat([tokens.flatten(1), present.to(tokens.dtype)], dim=1)
        return self.mlp(x)


@fusion_heads.register("gated")
class GatedFusion(nn.Module):
    """Gated fusion: a sigmoid gate per modality and channel, then a masked mean and an MLP.

    The gates ``g = sigmoid(W [t_1 .. t_M])`` (``[N, M, D]``) are computed from all tokens, so
    one modality can turn another down; the fused vector is
    ``sum_m present_m * g_m * t_m / max(1, sum_m present_m)``.

    Args:
        num_modalities: M.
        dim: D; also the output width.
        dropout: dropout inside the output MLP. Default is 0.1.

    Shapes: ``tokens [N, M, D]`` float, ``present [N, M]`` bool -> ``[N, D]`` float.
    """

    def __init__(self, num_modalities: int, dim: int, *, dropout: float = 0.1):
        super().__init__()
        self.out_dim = dim
        self.num_modalities = num_modalities
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(num_modalities * dim, num_modalities * dim)
        self.mlp = _mlp(dim, dim, dim, dropout)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mask = present.unsqueeze(-1).to(tokens.dtype)
        tokens = self.norm(tokens) * mask
        gates = torch.sigmoid(self.gate(tokens.flatten(1))).view_as(tokens)
        fused = (gates * tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(fused)

    def gates(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The gate values ``[N, M, D]`` in ``(0, 1)`` for inspection (same inputs as forward)."""
        tokens = self.norm(tokens) * present.unsqueeze(-1).to(tokens.dtype)
        return torch.sigmoid(self.gate(tokens.flatten(1))).view_as(tokens)


@fusion_heads.register("attention")
class AttentionFusion(nn.Module):
    """Attention fusion: a small transformer encoder over ``[CLS] + modality tokens``.

    Each modality token gets a learned modality embedding; absent modalities are masked out of
    attention (``src_key_padding_mask``); the output is the final ``[CLS]`` token.

    Args:
        num_modalities: M.
        dim: D (model width of the transformer); also the output width.
        num_layers: transformer layers. Default is 2.
        num_heads: attention heads; must divide ``dim``. Default is 4.
        dropout: transformer dropout. Default is 0.1.

    Shapes: ``tokens [N, M, D]`` float, ``present [N, M]`` bool -> ``[N, D]`` float.

    Raises:
        ConfigError: ``dim`` is not divisible by ``num_heads``.
    """

    def __init__(self, num_modalities: int, dim: int, *, num_layers: int = 2, num_heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(
                f"attention fusion: fusion_dim={dim} is not divisible by num_heads={num_heads}; "
                f"pick a fusion_dim that is a multiple of num_heads"
            )
        self.out_dim = dim
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(1, num_modalities, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        x = torch.cat([self.cls.expand(n, -1, -1).to(tokens.dtype), tokens + self.modality_embed.to(tokens.dtype)], 1)
        pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=present.device), ~present], dim=1)
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.norm(x[:, 0])


@task_heads.register("classification")
class ClassificationHead(nn.Module):
    """``Linear(in_dim, num_classes)``: fused ``[N, in_dim]`` float -> logits ``[N, C]``.

    Args:
        in_dim: width of the fused vector.
        num_classes: C (>= 2).
        dropout: dropout before the linear layer. Default is 0.0.

    Raises:
        ConfigError: ``num_classes`` is missing or < 2.
    """

    def __init__(self, in_dim: int, num_classes: int | None = None, *, dropout: float = 0.0):
        super().__init__()
        if num_classes is None or int(num_classes) < 2:
            raise ConfigError(
                f"classification head: num_classes must be an int >= 2, got {num_classes!r}; pass "
                f"num_classes=dataset.num_classes to compose()"
            )
        self.num_classes = int(num_classes)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


@task_heads.register("regression")
class RegressionHead(nn.Module):
    """``Linear(in_dim, num_outputs)``: fused ``[N, in_dim]`` -> predictions ``[N, num_outputs]``.

    Args:
        in_dim: width of the fused vector.
        num_classes: read as the number of regression outputs when given (so that
            ``compose(..., num_classes=k)`` works for both tasks). Default 1.
        dropout: dropout before the linear layer. Default is 0.0.
    """

    def __init__(self, in_dim: int, num_classes: int | None = None, *, dropout: float = 0.0):
        super().__init__()
        self.num_outputs = int(num_classes or 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, self.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))
