"""A validated config (:mod:`.config`) -> datasets and a :class:`~mmbridge.HybridModel`.

Heavy imports (onnxruntime, onnx2torch, transformers, the data layer) happen here, only after
the config has been validated. Each branch component is built by its registered type
(:data:`mmbridge.composition.config.components`; the built-in ones are in
:mod:`mmbridge.train.components`). Exports (``type: export``) run in a child process through
:func:`mmbridge.export` with a ``"module:attr"`` reference, so TensorFlow never enters the
training process; under DDP rank 0 exports first and the other ranks then hit the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from mmbridge.composition.config import BuildContext, ComponentConfig, component_from_dict, components
from mmbridge.errors import ConfigError
from mmbridge.train.config import DataConfig, RunConfig, as_run_config


def data_root(data: DataConfig | RunConfig | Mapping[str, Any]) -> tuple[Path, bool]:
    """``(root, is_builtin_sample)`` for ``data.root`` (null -> the built-in sample)."""
    from mmbridge.data import sample_dir

    if not isinstance(data, DataConfig):
        data = as_run_config(data).data
    return (Path(data.root), False) if data.root is not None else (sample_dir(), True)


def build_data(data: DataConfig | RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``mmbridge.data.load_splits`` with the config's ``data`` section.

    Args:
        data: the ``data`` section, or a whole config.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`~mmbridge.data.MultimodalDataset`.

    Raises:
        DataError: the data checks failed (ids listed; see :mod:`mmbridge.data`).
    """
    from mmbridge.data import load_splits

    if not isinstance(data, DataConfig):
        data = as_run_config(data).data
    root, _ = data_root(data)
    return load_splits(root, modalities=tuple(data.modalities), image_size=data.image_size,
                       tokenizer=data.tokenizer, max_length=data.max_length, on_error=data.on_error)


def build_component(comp: ComponentConfig | Mapping[str, Any], where: str, *, train_ds: Any = None,
                    ort_provider_options: Mapping[str, str] | None = None,
                    trainable: bool = True, role: str = "encoder") -> nn.Module:
    """One encoder / preprocess module from its config, by its registered type's builder.

    Args:
        comp: the component's config (or its YAML mapping, validated here).
        where: its config path, for messages.
        train_ds: the train split (vocabulary size, feature count, statistics).
        trainable: the branch's ``trainable``.
        role: ``"encoder"`` or ``"preprocess"``.

    Raises:
        ConfigError: an invalid component mapping; an import reference that does not resolve, a
            dataset attribute that the component needs (``vocab_size``, ``num_features``) missing.
    """
    if not isinstance(comp, ComponentConfig):
        problems: list[str] = []
        parsed = component_from_dict(comp, where=where, role=role, problems=problems, required=True)
        if problems or parsed is None:
            raise ConfigError("; ".join(problems) or f"{where}: missing")
        comp = parsed
    ctx = BuildContext(where=where, role=role, trainable=trainable, train_ds=train_ds,
                       ort_provider_options=dict(ort_provider_options or {}))
    return components.get(comp.type).build(comp, ctx)


def build_model(cfg: RunConfig | Mapping[str, Any], train_ds: Any, num_classes: int | None = None) -> nn.Module:
    """The :class:`~mmbridge.HybridModel` of ``cfg.model`` for ``train_ds``.

    ``out_dim`` of branches is inferred from a 2-sample batch of ``train_ds`` when not set.
    The model is seeded with ``training.seed`` so every rank (and a resumed run) builds the same
    initial weights.
    """
    from mmbridge.composition import Branch, compose

    cfg = as_run_config(cfg)
    m = cfg.model
    torch.manual_seed(cfg.training.seed)
    from mmbridge.train.distributed import numerics

    ort_opts = numerics(cfg.training.deterministic).ort_cuda_provider_options  # ORT rounds like torch
    branches = {}
    for name, b in m.branches.items():
        where = f"model.branches.{name}"
        pre = None
        if b.preprocess is not None:
            pre = build_component(b.preprocess, f"{where}.preprocess", train_ds=train_ds, trainable=False,
                                  role="preprocess", ort_provider_options=ort_opts)
        enc = build_component(b.encoder, f"{where}.encoder", train_ds=train_ds, trainable=b.trainable,
                              ort_provider_options=ort_opts)
        branches[name] = Branch(enc, preprocess=pre, input_keys=b.input_keys, mask_key=b.mask_key,
                                out_dim=b.out_dim, trainable=b.trainable, projection=b.projection)
    example = default_collate([train_ds[i] for i in range(min(2, len(train_ds)))])
    return compose(branches, fusion=m.fusion, task=m.task,
                   num_classes=num_classes or getattr(train_ds, "num_classes", None),
                   fusion_dim=m.fusion_dim, modality_dropout=m.modality_dropout, example_batch=example,
                   task_kwargs=dict(m.task_kwargs), **dict(m.fusion_kwargs))


def trainer_kwargs(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~mmbridge.Trainer` from ``cfg.training`` / ``cfg.output`` / ``cfg.model.task``."""
    cfg = as_run_config(cfg)
    return {**cfg.training.trainer_kwargs(), "out_dir": cfg.output.dir, "tensorboard": cfg.output.tensorboard,
            "loggers": list(cfg.output.active_loggers), "logger_options": dict(cfg.output.logger_options),
            "task": cfg.model.task}
