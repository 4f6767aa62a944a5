"""A finished run folder as a predictor: :func:`load_run` -> :class:`Run`.

    run = mmbridge.load_run("runs/demo")          # config.yaml + best.pt (or last.pt) of mmbridge train
    run.model                                      # the HybridModel, eval mode, best.pt's weights
    run.predict("new_rows/")                       # DataFrame (list of dicts without pandas): id, label, p(...)
    run.evaluate("labelled_rows/")                 # {"data/loss", "data/top1", ...} as mmbridge evaluate computes them
    run.export_onnx("model.onnx")                  # one ONNX graph, raw inputs -> logits (mmbridge.train.deploy)

The preprocessing state comes from the run, never from the new rows: the checkpoint's ``extra``
holds the config and the train split's ``metadata()`` (label map, fitted tokenizer, numeric
statistics, image size, token length), so rows to predict on need no label column
(``MultimodalDataset.from_folder(..., labels="optional")``) and are tokenised / imputed exactly
as the train split was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from mmbridge.errors import ConfigError
from mmbridge.train.config import RunConfig, as_run_config

CHECKPOINTS = ("best.pt", "last.pt")


class Run:
    """A trained run loaded for inference (build it with :func:`load_run`).

    Attributes:
        dir: the run folder; checkpoint: the ``.pt`` file the weights came from.
        config: the :class:`~mmbridge.train.config.RunConfig` it was trained with.
        metadata: the train split's ``metadata()`` saved in the checkpoint (label names, tokenizer,
            numeric statistics, image size, max length, modalities).
        label_names: class names by output index (classification), else ``[]``.
        task: ``"classification"`` or ``"regression"``.
        model: the :class:`~mmbridge.HybridModel` in eval mode with the checkpoint's weights.
        device: where the model runs.
    """

    def __init__(self, run_dir: Path, checkpoint: Path, config: RunConfig, metadata: dict[str, Any],
                 model: torch.nn.Module, device: torch.device, task: str):
        self.dir = run_dir
        self.checkpoint = checkpoint
        self.config = config
        self.metadata = metadata
        self.model = model
        self.device = device
        self.task = task
        self.label_names: list[str] = list(metadata.get("label_names") or []) if task == "classification" else []

    def __repr__(self) -> str:
        return (f"Run({str(self.dir)!r}, checkpoint={self.checkpoint.name}, task={self.task}, "
                f"classes={len(self.label_names)}, modalities={self.metadata.get('modalities')})")

    # ------------------------------------------------------------------------------------ data
    def dataset(self, data: str | os.PathLike | Dataset, *, labels: str = "optional", on_error: str = "raise") -> Dataset:
        """Rows of ``data`` (a folder in the layout of :mod:`mmbridge.data.folder`, or a dataset)
        preprocessed with the run's tokenizer, label map and numeric statistics.

        Every id of the folder is used (``splits.csv`` is ignored); ``labels="optional"`` lets the
        label columns be absent or empty (label -1).
        """
        if isinstance(data, Dataset):
            return data
        from mmbridge.data import MultimodalDataset, tokenizer_from_dict

        meta = self.metadata
        tok = meta.get("tokenizer")
        return MultimodalDataset.from_folder(
            Path(data), split=None, modalities=tuple(meta["modalities"]), image_size=int(meta["image_size"]),
            tokenizer=tokenizer_from_dict(tok) if tok else None, max_length=int(meta["max_length"]),
            on_error=on_error, label_map=meta.get("label_map") or None, stats=meta.get("stats"), labels=labels)

    def _autocast(self):
        precision = self.config.training.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if dtype is None or (dtype is torch.float16 and self.device.type != "cuda"):
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------ predict
    @torch.no_grad()
    def logits(self, data: str | os.PathLike | Dataset, *, batch_size: int | None = None,
               amp: bool = True) -> tuple[list[int], torch.Tensor]:
        """``(ids, float32 outputs [N, C])`` of the model on every row of ``data``.

        ``amp=True`` runs under the run's ``training.precision`` autocast, as ``mmbridge evaluate``
        does (so top-1 agrees with it); ``amp=False`` runs in float32.
        """
        ds = self.dataset(data)
        loader = DataLoader(ds, batch_size=batch_size or self.config.training.batch_size, shuffle=False)
        ids, outs = [], []
        self.model.eval()
        for batch in loader:
            ids += [int(i) for i in batch["id"]]
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "label"}
            if amp:
                with self._autocast():
                    out = self.model(batch)
            else:
                out = self.model(batch)
            outs.append(out.float().cpu())
        return ids, torch.cat(outs) if outs else torch.zeros(0)

    def predict(self, data: str | os.PathLike | Dataset, *, batch_size: int | None = None, amp: bool = True,
                as_frame: bool | None = None) -> Any:
        """Predictions for every row of ``data`` (labels not needed).

        Returns:
            classification: rows ``{"id", "label" (predicted class name), "p_<class>"...}`` (softmax
            probabilities); regression: ``{"id", "prediction"}`` (or ``prediction_<k>`` for K > 1
            outputs). A ``pandas.DataFrame`` when pandas is installed (``as_frame=None``), else a
            list of dicts.
        """
        ids, out = self.logits(data, batch_size=batch_size, amp=amp)
        rows: list[dict[str, Any]] = []
        if self.task == "classification":
            probs = torch.softmax(out, dim=-1)
            top = probs.argmax(dim=-1)
            for i, k, p in zip(ids, top.tolist(), probs.tolist(), strict=True):
                row: dict[str, Any] = {"id": i, "label": self.label_names[k] if k < len(self.label_names) else k}
                row.update({f"p_{name}": float(v) for name, v in zip(self.label_names, p, strict=False)})
                rows.append(row)
        else:
            out2 = out.reshape(len(ids), -1)
            for i, v in zip(ids, out2.tolist(), strict=True):
                rows.append({"id": i, "prediction": v[0]} if len(v) == 1
                            else {"id": i, **{f"prediction_{k}": x for k, x in enumerate(v)}})
        if as_frame is False:
            return rows
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise
            return rows
        return pd.DataFrame(rows)

    def evaluate(self, data: str | os.PathLike | Dataset | None = None, *, prefix: str = "data",
                 splits: Sequence[str] = ("val", "test")) -> dict[str, Any]:
        """Loss and metrics with the code ``mmbridge evaluate`` uses (:meth:`Trainer.evaluate`).

        Args:
            data: a labelled folder / dataset (keys ``{prefix}/loss``, ``{prefix}/top1``, ...); None:
                the run's own data (``config.data``), split by split: ``{split: metrics}``.
        """
        from mmbridge.train.trainer import Trainer

        if data is None:
            from mmbridge.train.build import build_data

            sets = build_data(self.config.data)
            todo = {s: sets[s] for s in splits}
        else:
            todo = {prefix: self.dataset(data, labels="required")}
        first = next(iter(todo.values()))
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmbridge-eval-") as tmp:
            trainer = Trainer.from_config(self.model, first, None, self.config.training, self.config.output,
                                          task=self.task, tensorboard=False, loggers=[], out_dir=tmp,
                                          num_classes=len(self.label_names) or None)
            try:
                res = {name: trainer.evaluate(ds, name) for name, ds in todo.items()}
            finally:
                trainer.close()
            self.model.eval()
        return res[prefix] if data is not None else res

    def example_batch(self, n: int = 2) -> dict[str, torch.Tensor]:
        """``n`` zero rows with the shapes and dtypes of the model's inputs (no label)."""
        return example_batch(self.metadata, n)

    def export_onnx(self, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """One ONNX graph from raw inputs to outputs (see :func:`mmbridge.train.deploy.export_onnx`)."""
        from mmbridge.train.deploy import export_onnx

        return export_onnx(self, path, **kwargs)


def write_predictions(rows: Any, path: str | os.PathLike) -> Path:
    """Write :meth:`Run.predict`'s result (DataFrame or list of dicts) as CSV; returns the path."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(rows, "to_csv"):
        rows.to_csv(path, index=False)
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        w.writeheader()
        w.writerows(rows)
    return path


def _find_checkpoint(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None:
        p = Path(checkpoint)
        return p if p.is_absolute() or p.exists() else run_dir / p
    for name in CHECKPOINTS:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ConfigError(f"{run_dir} holds no {' / '.join(CHECKPOINTS)}; pass the output.dir of a finished "
                      f"`mmbridge train` run (framework: torch)")


def load_run(run_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None) -> Run:
    """Load a run folder written by ``mmbridge train`` for inference.

    Args:
        run_dir: the run's ``output.dir`` (``config.yaml``, ``best.pt`` / ``last.pt``).
        checkpoint: default ``best.pt``, else ``last.pt``.
        device: where to run the model.
        overrides: dotted config overrides (e.g. ``{"data.root": "..."}`` for :meth:`Run.evaluate`).

    Raises:
        ConfigError: no checkpoint, a checkpoint without the config / data metadata (written by
            another tool), or weights that do not fit the model the config builds.
        CacheError: the checkpoint cannot be loaded with ``weights_only=True``.
    """
    from mmbridge.train import checkpoint as ckpt_io
    from mmbridge.train.build import build_model
    from mmbridge.train.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    ckpt_path = _find_checkpoint(run_dir, checkpoint)
    state = ckpt_io.load(ckpt_path)
    extra = state.get("extra") or {}
    meta = extra.get("data") or {}
    if not meta or "modalities" not in meta:
        raise ConfigError(f"checkpoint {ckpt_path} holds no data metadata (extra.data: label map, tokenizer, "
                          f"numeric stats); it was not written by `mmbridge train`, so its preprocessing is unknown")
    if extra.get("config") is not None:
        cfg = load_config(None, [f"{k}={v}" for k, v in (overrides or {}).items()], data=extra["config"])
    elif (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml", [f"{k}={v}" for k, v in (overrides or {}).items()])
    else:
        raise ConfigError(f"{ckpt_path} holds no config and {run_dir / 'config.yaml'} does not exist")
    cfg = as_run_config(cfg)
    task = str(state.get("task") or cfg.model.task)
    stand_in = _MetadataDataset(meta)
    num_classes = state.get("num_classes") or (len(meta.get("label_names") or []) or None)
    model = build_model(cfg, stand_in, num_classes=num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        detail = str(exc).replace("\n", " ")[:600]
        raise ConfigError(f"checkpoint {ckpt_path} does not fit the model its config builds ({detail})") from None
    dev = torch.device(device)
    model.to(dev).eval()
    return Run(run_dir, ckpt_path, cfg, dict(meta), model, dev, task)


class _MetadataDataset(Dataset):
    """What :func:`~mmbridge.train.build.build_model` reads of a train split, from its saved
    ``metadata()``: vocabulary size, feature count, statistics, class count and two zero items
    of the right shapes and dtypes (for width inference)."""

    def __init__(self, meta: Mapping[str, Any]):
        self.meta = meta
        self.modalities = tuple(meta["modalities"])
        self.vocab_size = meta.get("vocab_size")
        self.num_features = int(meta.get("num_features") or 0)
        self.numeric_columns = list(meta.get("numeric_columns") or [])
        self.stats = meta.get("stats")
        self.label_names = list(meta.get("label_names") or [])
        self.label_map = dict(meta.get("label_map") or {})
        self.num_classes = len(self.label_names) or None
        self.image_size = int(meta.get("image_size") or 1)
        self.max_length = int(meta.get("max_length") or 1)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"id": torch.tensor(index, dtype=torch.int64)}
        if "image" in self.modalities:
            item["image"] = torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8)
        if "text" in self.modalities:
            item["text"] = torch.ones(self.max_length, dtype=torch.int64)
            item["text_mask"] = torch.ones(self.max_length, dtype=torch.int64)
        if "numeric" in self.modalities:
            item["numeric"] = torch.zeros(self.num_features, dtype=torch.float32)
        item["label"] = torch.tensor(0, dtype=torch.int64)
        return item


def example_batch(meta: Mapping[str, Any], n: int = 2) -> dict[str, torch.Tensor]:
    """``n`` zero rows with the shapes and dtypes of the run's inputs (no label)."""
    ds = _MetadataDataset(meta)
    batch = default_collate([ds[i % 2] for i in range(n)])
    batch.pop("label")
    return batch
