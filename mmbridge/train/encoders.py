"""Small native PyTorch encoders for the three pokedex modalities (used by configs and the demo).

Each has an ``out_dim`` attribute, so :func:`mmbridge.compose` needs no dry run.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.composition import masked_mean


class ConvEncoder(nn.Module):
    """A small CNN: image ``[N, H, W, 3]`` (NHWC, uint8 in [0, 255] or float) -> ``[N, out_dim]``.

    uint8 input is scaled to [0, 1]; float input (e.g. the output of a bridged TF preprocessing
    graph) is used as is. NHWC is detected by a last axis of size 3; NCHW input is accepted too.

    Args:
        width: channels of the first conv; doubled at each of ``depth`` stages. Default 32.
        depth: number of conv stages (each halves H and W). Default 3.
    """

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        if image.shape[-1] == 3 and image.shape[1] != 3:
            image = image.permute(0, 3, 1, 2)
        return self.features(image.contiguous()).mean((2, 3))


class TextEncoder(nn.Module):
    """Token ids ``[N, T]`` int64 + mask ``[N, T]`` (1 = token) -> ``[N, out_dim]``.

    Args:
        vocab_size: number of token ids (``dataset.tokenizer.vocab_size``).
        dim: embedding width and output width. Default 64.
        kind: ``"bag"`` (masked mean of embeddings, like ``nn.EmbeddingBag(mode="mean")``) or
            ``"gru"`` (a bidirectional GRU, masked mean of its states). Default ``"bag"``.
    """

    def __init__(self, vocab_size: int, dim: int = 64, kind: str = "bag"):
        super().__init__()
        if kind not in ("bag", "gru"):
            raise ValueError(f"TextEncoder(kind={kind!r}): use 'bag' or 'gru'")
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim // 2, batch_first=True, bidirectional=True) if kind == "gru" else None
        self.out_dim = dim

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(text)
        if self.gru is not None:
            x, _ = self.gru(x)
        return masked_mean(x, text_mask)


class MLPEncoder(nn.Module):
    """Numeric features ``[N, F]`` float32 -> ``[N, out_dim]``; NaN (missing values) become 0.

    Args:
        in_features: F (``dataset.num_features``).
        hidden: hidden and output width. Default 64.
        mean, std: optional per-feature statistics (length F) to standardise with.
    """

    def __init__(self, in_features: int, hidden: int = 64, mean: list[float] | None = None,
                 std: list[float] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * in_features))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * in_features).clamp_min(1e-6))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, numeric: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num((numeric.float() - self.mean) / self.std, nan=0.0)
        return self.net(x)
