"""Trainable export: keep BatchNormalization, Dropout and LayerNormalization as real layers.

tf2onnx exports inference graphs: BatchNorm is folded into Conv/MatMul, Dropout disappears and
LayerNorm is decomposed with constant gamma/beta. For a bridge that will be fine-tuned in torch
that is wrong (DESIGN.md, "Trainable export"). :func:`trainable_patches` is active while the TF
function is traced for a ``trainable=True`` export, and :func:`postprocess` runs on the ONNX
model right after tf2onnx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def trainable_patches() -> Iterator[None]:
    """Patches active while tracing a ``trainable=True`` export (none yet)."""
    yield


def postprocess(model: Any) -> list[str]:
    """Rewrite the tf2onnx output of a ``trainable=True`` export in place; returns notes."""
    return []
