"""The pictures of a run: its learning curves and its test confusion matrix (PNG, matplotlib).

:func:`write_run_plots` is called by :func:`mmbridge.train.run.run_train` on rank 0 and writes
``learning_curve.png`` (per epoch: train and validation loss; the monitored validation metric) and,
for classification, ``confusion_matrix.png`` (test split, rows = true class, columns = predicted,
each row normalised to 1, counts printed) into the run folder. Without matplotlib (the ``bench``
extra) nothing is drawn and the reason is returned.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


@torch.no_grad()
def predictions(model: torch.nn.Module, dataset: Any, *, batch_size: int = 64,
                device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(true labels, predicted classes)`` (int64 ``[N]`` each) of a classification model on ``dataset``.

    The model is called on dict batches without the ``"label"`` key and must return logits
    ``[B, C]`` (or a dict with ``"logits"``); ``autocast_dtype`` runs it under ``torch.autocast``.
    """
    model.eval()
    dev = torch.device(device)
    true, pred = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        true.append(batch["label"].numpy())
        inputs = {k: v.to(dev) for k, v in batch.items() if k != "label"}
        if autocast_dtype is not None:
            with torch.autocast(dev.type, dtype=autocast_dtype):
                out = model(inputs)
        else:
            out = model(inputs)
        logits = out["logits"] if isinstance(out, Mapping) else out
        pred.append(logits.float().argmax(-1).cpu().numpy())
    return (np.concatenate(true) if true else np.zeros(0, np.int64)), (np.concatenate(pred) if pred else np.zeros(0, np.int64))


def write_run_plots(out_dir: str | os.PathLike, history: Sequence[Mapping[str, Any]], *, monitor: str | None,
                    confusion: tuple[np.ndarray, np.ndarray] | None = None,
                    class_names: Sequence[str] | None = None) -> dict[str, str]:
    """Write ``learning_curve.png`` and (given ``confusion``) ``confusion_matrix.png`` into ``out_dir``.

    Args:
        out_dir: the run folder.
        history: the Trainer's per-epoch records (``"epoch"``, ``"train/loss"``, ``"val/loss"``, ...).
        monitor: the monitored validation metric (drawn on its own axis), or None.
        confusion: ``(true, predicted)`` class indices of the test split, or None (regression).
        class_names: one name per class index.

    Returns:
        ``{"learning_curve": path, "confusion_matrix": path}`` for what was written, or
        ``{"skipped": reason}`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        return {"skipped": f"matplotlib is not installed ({exc}); pip install 'mmbridge[bench]' for the run's PNGs"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(history)]
    fig, ax = plt.subplots(1, 2 if monitor else 1, figsize=(10 if monitor else 5.5, 3.8), squeeze=False)
    for key, style in (("train/loss", "-o"), ("val/loss", "-s")):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            ax[0][0].plot(epochs, [np.nan if y is None else y for y in ys], style, label=key, markersize=3)
    for a in ax[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax[0][0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[0][0].legend()
    ax[0][0].grid(alpha=0.3)
    if monitor:
        ys = [r.get(monitor) for r in history]
        ax[0][1].plot(epochs, [np.nan if y is None else y for y in ys], "-o", color="tab:green", markersize=3)
        ax[0][1].set(xlabel="epoch", ylabel=monitor, title=f"{monitor} (monitored)")
        ax[0][1].grid(alpha=0.3)
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written["learning_curve"] = str(path)
    if confusion is not None and len(confusion[0]):
        true, pred = (np.asarray(a, np.int64) for a in confusion)
        n = int(max(true.max(), pred.max()) + 1)
        if class_names is not None:
            n = max(n, len(class_names))
        counts = np.zeros((n, n), np.int64)
        np.add.at(counts, (true, pred), 1)
        rows = counts.sum(1, keepdims=True)
        frac = np.divide(counts, np.maximum(rows, 1))
        names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        size = min(max(4.0, 0.45 * n + 2), 14)
        fig, ax2 = plt.subplots(figsize=(size, size))
        im = ax2.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax2.set_xticks(range(n), names[:n], rotation=90, fontsize=7)
        ax2.set_yticks(range(n), names[:n], fontsize=7)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax2.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                             color="white" if frac[i, j] > 0.5 else "black")
        acc = float((true == pred).mean())
        ax2.set(xlabel="predicted", ylabel="true", title=f"test confusion matrix (top-1 {acc:.1%}, {len(true)} rows)")
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = out / "confusion_matrix.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written["confusion_matrix"] = str(path)
    return written
