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

A fusion head may define ``config_problems(dim, kwargs) -> list[str]`` (a classmethod): the
config validation calls it, so a combination the head refuses is reported before anything is
built (e.g. attention fusion's ``fusion_dim`` divisible by ``num_heads``).

A **task head** is a :class:`TaskHead`, built as ``cls(in_dim, num_classes=..., **kwargs)``; it
maps ``[N, in_dim]`` to ``[N, C]`` and owns its training contract: the loss, the metrics
(torchmetrics), the validation metric to monitor and whether higher or lower is better. The
:class:`~mmbridge.Trainer` asks the head for these instead of switching on the task's name.

Register your own with ``@fusion_heads.register("name")`` / ``@task_heads.register("name")``;
``mmbridge.fusion_heads.names()`` lists them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmbridge._registry import Registry
from mmbridge.errors import ConfigError

fusion_heads: Registry[type[nn.Module]] = Registry("fusion head", "mmbridge.fusion_heads.names()")
task_heads: Registry[type[TaskHead]] = Registry("task head", "mmbridge.task_heads.names()")


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

    @classmethod
    def config_problems(cls, dim: int, kwargs: Mapping[str, Any]) -> list[str]:
        """What the config validation reports for ``fusion_dim=dim``, ``fusion_kwargs=kwargs``."""
        heads = kwargs.get("num_heads", inspect.signature(cls).parameters["num_heads"].default)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1 and dim % heads:
            return [f"fusion_dim: {dim} is not divisible by fusion_kwargs.num_heads={heads} (attention fusion); "
                    f"use a multiple of {heads}"]
        return []

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        x = torch.cat([self.cls.expand(n, -1, -1).to(tokens.dtype), tokens + self.modality_embed.to(tokens.dtype)], 1)
        pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=present.device), ~present], dim=1)
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.norm(x[:, 0])


class TaskHead(nn.Module):
    """Base of task heads: the module, plus the contract the Trainer relies on.

    The contract is made of classmethods and class attributes, so it can be asked of the head
    class too (``task_heads.get("regression").loss(...)``), e.g. by a trainer of a model that is
    not a :class:`~mmbridge.HybridModel`.

    Attributes:
        monitor: the validation metric early stopping and ``best.pt`` follow by default.
        metric_modes: metric name (the part after ``val/``) -> ``"min"`` or ``"max"``; names not
            listed are ``"max"``.
    """

    monitor: ClassVar[str] = "val/loss"
    metric_modes: ClassVar[Mapping[str, str]] = {"loss": "min"}

    @classmethod
    def loss(cls, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss (a scalar) of float outputs ``out [N, C]`` against the batch's ``label``."""
        raise NotImplementedError(f"{cls.__name__}.loss")

    @classmethod
    def metric_target(cls, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The batch's ``label`` in the form the metrics take (default: unchanged)."""
        return target

    @classmethod
    def make_metrics(cls, num_classes: int | None) -> Any:
        """A ``torchmetrics.MetricCollection`` updated with ``(out, metric_target(label, out))``."""
        raise NotImplementedError(f"{cls.__name__}.make_metrics")

    @classmethod
    def metric_mode(cls, monitor: str) -> str:
        """``"min"`` or ``"max"``: which way ``monitor`` (``"val/top1"``) improves."""
        return cls.metric_modes.get(monitor.rsplit("/", 1)[-1], "max")


@task_heads.register("classification")
class ClassificationHead(TaskHead):
    """``Linear(in_dim, num_classes)``: fused ``[N, in_dim]`` float -> logits ``[N, C]``.

    Args:
        in_dim: width of the fused vector.
        num_classes: C (>= 2).
        dropout: dropout before the linear layer. Default is 0.0.

    Contract: cross-entropy on int64 labels ``[N]``; metrics ``top1`` (micro accuracy),
    ``top5`` (when C >= 5) and ``macro_f1`` (fractions in [0, 1]); monitors ``val/top1`` (max).

    Raises:
        ConfigError: ``num_classes`` is missing or < 2.
    """

    monitor: ClassVar[str] = "val/top1"
    metric_modes: ClassVar[Mapping[str, str]] = {"loss": "min", "top1": "max", "top5": "max", "macro_f1": "max"}

    @classmethod
    def loss(cls, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target)

    @classmethod
    def make_metrics(cls, num_classes: int | None) -> Any:
        import torchmetrics
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        m: dict[str, torchmetrics.Metric] = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes >= 5:
            m["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        return torchmetrics.MetricCollection(m)

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
class RegressionHead(TaskHead):
    """``Linear(in_dim, num_outputs)``: fused ``[N, in_dim]`` -> predictions ``[N, num_outputs]``.

    Args:
        in_dim: width of the fused vector.
        num_classes: read as the number of regression outputs when given (so that
            ``compose(..., num_classes=k)`` works for both tasks). Default 1.
        dropout: dropout before the linear layer. Default is 0.0.

    Contract: mean squared error on float targets reshaped to ``[N, num_outputs]``; metrics
    ``mse`` and ``mae``; monitors ``val/loss`` (min).
    """

    monitor: ClassVar[str] = "val/loss"
    metric_modes: ClassVar[Mapping[str, str]] = {"loss": "min", "mse": "min", "mae": "min"}

    @classmethod
    def loss(cls, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, target.float().reshape(out.shape))

    @classmethod
    def metric_target(cls, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return target.float().reshape(out.shape)

    @classmethod
    def make_metrics(cls, num_classes: int | None) -> Any:
        import torchmetrics

        return torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError(),
                                              "mae": torchmetrics.MeanAbsoluteError()})

    def __init__(self, in_dim: int, num_classes: int | None = None, *, dropout: float = 0.0):
        super().__init__()
        self.num_outputs = int(num_classes or 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, self.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))
