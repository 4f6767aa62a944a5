"""A validated config (:mod:`.config`) -> datasets and a :class:`~mmbridge.HybridModel`.

Heavy imports (onnxruntime, onnx2torch, transformers, the data layer) happen here, only after
the config has been validated. Exports (``type: export``) run in a child process through
:func:`mmbridge.export` with a ``"module:attr"`` reference, so TensorFlow never enters the
training process; under DDP rank 0 exports first and the other ranks then hit the cache.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from mmbridge.errors import ConfigError
from mmbridge.train import distributed


def data_root(cfg: Mapping[str, Any]) -> tuple[Path, bool]:
    """``(root, is_builtin_sample)`` for ``cfg["data"]["root"]`` (null -> the built-in sample)."""
    from mmbridge.data import sample_dir

    root = cfg["data"]["root"]
    return (Path(root), False) if root is not None else (sample_dir(), True)


def build_data(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``mmbridge.data.load_splits`` with the config's ``data`` section.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`~mmbridge.data.MultimodalDataset`.

    Raises:
        DataError: the data checks failed (ids listed; see :mod:`mmbridge.data`).
    """
    from mmbridge.data import load_splits

    d = cfg["data"]
    root, _ = data_root(cfg)
    return load_splits(root, modalities=tuple(d["modalities"]), image_size=d["image_size"],
                       tokenizer=d["tokenizer"], max_length=d["max_length"], on_error=d["on_error"])


def _import(ref: str, where: str) -> Any:
    module, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {ref!r} ({exc}); give an importable 'module:attribute'") from exc
    return obj


def _artifact(comp: Mapping[str, Any], where: str, role: str):
    from mmbridge.artifact import BridgeArtifact

    if comp["type"] == "artifact":
        return BridgeArtifact.load(comp["path"])
    from mmbridge.export.exporter import export

    # rank 0 exports (in a child process); it broadcasts the artifact path, or its error, and the
    # other ranks load that path: no rank but 0 starts TensorFlow, and none waits on a failed export
    path, error = None, None
    if distributed.read_env()["rank"] == 0:
        try:
            path = str(export(comp["ref"], name=comp.get("name"), role=role,
                              trainable=bool(comp.get("trainable_export"))).path)
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            error = f"{type(exc).__name__}: {exc}"
    path, error = distributed.broadcast_object((path, error))
    if error is not None:
        raise ConfigError(f"{where}: exporting {comp['ref']!r} failed on rank 0: {error}")
    return BridgeArtifact.load(path, check="size")


def build_component(comp: Mapping[str, Any], where: str, *, train_ds: Any = None, trainable: bool = True,
                    role: str = "encoder") -> nn.Module:
    """One encoder / preprocess module from its config mapping (see :mod:`.config` for types).

    Raises:
        ConfigError: an import reference that does not resolve, a dataset attribute that the
            component needs (``vocab_size``, ``num_features``) missing.
    """
    from mmbridge.train import encoders

    kind = comp["type"]
    if kind == "conv":
        return encoders.ConvEncoder(comp["width"], comp["depth"])
    if kind == "text":
        vocab = getattr(train_ds, "vocab_size", None)
        if vocab is None:
            raise ConfigError(f"{where}: a 'text' encoder needs the text modality in data.modalities")
        return encoders.TextEncoder(vocab, comp["dim"], comp["kind"])
    if kind == "mlp":
        nf = getattr(train_ds, "num_features", None)
        if not nf:
            raise ConfigError(f"{where}: an 'mlp' encoder needs the numeric modality in data.modalities")
        stats = getattr(train_ds, "stats", None) if comp["standardize"] else None
        return encoders.MLPEncoder(nf, comp["hidden"], mean=stats["mean"] if stats else None,
                                   std=stats["std"] if stats else None)
    if kind == "hf":
        from transformers import AutoModel

        path = comp["path"]
        if path == "minilm":
            from mmbridge.data import minilm_path

            path = str(minilm_path())
        return AutoModel.from_pretrained(path, local_files_only=True)
    if kind in ("artifact", "export"):
        art = _artifact(comp, where, role)
        if comp["backend"] == "ort":
            return art.to_ort()
        return art.to_torch(trainable=trainable)
    if kind == "import":
        return _import(comp["target"], where)(**comp["kwargs"])
    raise ConfigError(f"{where}: unknown type {kind!r}")


def build_model(cfg: Mapping[str, Any], train_ds: Any, num_classes: int | None = None) -> nn.Module:
    """The :class:`~mmbridge.HybridModel` of ``cfg["model"]`` for ``train_ds``.

    ``out_dim`` of branches is inferred from a 2-sample batch of ``train_ds`` when not set.
    The model is seeded with ``training.seed`` so every rank (and a resumed run) builds the same
    initial weights.
    """
    from mmbridge.composition import Branch, compose

    m = cfg["model"]
    torch.manual_seed(cfg["training"]["seed"])
    branches = {}
    for name, b in m["branches"].items():
        where = f"model.branches.{name}"
        pre = None
        if b["preprocess"] is not None:
            pre = build_component(b["preprocess"], f"{where}.preprocess", train_ds=train_ds, trainable=False,
                                  role="preprocess")
        enc = build_component(b["encoder"], f"{where}.encoder", train_ds=train_ds, trainable=b["trainable"])
        branches[name] = Branch(enc, preprocess=pre, input_keys=b["input_keys"], out_dim=b["out_dim"],
                                trainable=b["trainable"], projection=b["projection"])
    example = default_collate([train_ds[i] for i in range(min(2, len(train_ds)))])
    return compose(branches, fusion=m["fusion"], task=m["task"],
                   num_classes=num_classes or getattr(train_ds, "num_classes", None),
                   fusion_dim=m["fusion_dim"], modality_dropout=m["modality_dropout"], example_batch=example,
                   task_kwargs=m["task_kwargs"], **m["fusion_kwargs"])


def trainer_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~mmbridge.Trainer` from ``cfg["training"]`` / ``cfg["output"]``."""
    t = cfg["training"]
    keys = ("epochs", "batch_size", "lr", "weight_decay", "precision", "grad_accum", "grad_clip", "scheduler",
            "seed", "num_workers", "monitor", "mode", "patience", "checkpoint_every_steps", "keep_checkpoints",
            "deterministic",
            "max_steps_per_epoch",
            "log_every", "progress", "device")
    kw = {k: t[k] for k in keys}
    kw["out_dir"] = cfg["output"]["dir"]
    kw["tensorboard"] = cfg["output"]["tensorboard"]
    kw["task"] = cfg["model"]["task"]
    return kw
