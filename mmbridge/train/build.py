"""A validated config (:mod:`.config`) -> datasets and a :class:`~mmbridge.HybridModel`.

Heavy imports (onnxruntime, onnx2torch, transformers, the data layer) happen here, only after
the config has been validated. Each branch component is built by its registered type
(:data:`mmbridge.composition.config.components`; the built-in ones are in
:mod:`mmbridge.train.components`). Exports (``type: export``) run in a child process through
:func:`mmbridge.export` with a ``"module:attr"`` reference, so TensorFlow never enters the
training process; under DDP rank 0 exports first and the other ranks then hit the cache.
"""

from __future__ import annotations

import os
import sys
import time
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


def progress_line(text: str, *, enabled: bool = True) -> None:
    """One progress line ``mmbridge: <text>`` on stderr (flushed), on rank 0 only, if ``enabled``.

    Printed whether or not stderr is a terminal: a line per step (no bar, no carriage returns),
    so SLURM / Kubeflow logs keep them; ``mmbridge train --quiet`` turns them off.
    """
    from mmbridge.train.distributed import read_env

    if enabled and read_env()["rank"] == 0:
        print(f"mmbridge: {text}", file=sys.stderr, flush=True)


def _describe(comp: ComponentConfig) -> str:
    ref = getattr(comp, "ref", None) or getattr(comp, "path", None)
    backend = getattr(comp, "backend", None)
    return comp.type + (f" {ref}" if ref else "") + (f" -> {backend}" if backend else "")


def _build_step(comp: ComponentConfig, where: str, progress: bool, **kw: Any) -> nn.Module:
    """:func:`build_component` with its progress line (what, export cache hit / miss, seconds)."""
    t0 = time.perf_counter()
    module = build_component(comp, where, **kw)
    total = time.perf_counter() - t0
    detail = ""
    if comp.type == "export" and "mmbridge.export.exporter" in sys.modules:
        last = sys.modules["mmbridge.export.exporter"].last_export()
        if last:
            detail = f"{last['outcome']} in {last['seconds']:.1f} s, bridged in {max(0.0, total - last['seconds']):.1f} s; "
    progress_line(f"build {where} ({_describe(comp)}): {detail}{total:.1f} s", enabled=progress)
    return module


def build_model(cfg: RunConfig | Mapping[str, Any], train_ds: Any, num_classes: int | None = None, *,
                progress: bool = False) -> nn.Module:
    """The :class:`~mmbridge.HybridModel` of ``cfg.model`` for ``train_ds``.

    ``out_dim`` of branches is inferred from a 2-sample batch of ``train_ds`` when not set.
    The model is seeded with ``training.seed`` so every rank (and a resumed run) builds the same
    initial weights.

    Args:
        progress: print one line per step on stderr, rank 0 only (:func:`progress_line`): each
            preprocess / encoder (its type, reference or path, backend; for an export the cache
            outcome, e.g. ``cache hit (reference, no TensorFlow) in 0.3 s, bridged in 1.2 s``) and
            the composition, with seconds. ``mmbridge train`` / ``demo`` turn it on unless ``--quiet``.
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
            pre = _build_step(b.preprocess, f"{where}.preprocess", progress, train_ds=train_ds, trainable=False,
                              role="preprocess", ort_provider_options=ort_opts)
        enc = _build_step(b.encoder, f"{where}.encoder", progress, train_ds=train_ds, trainable=b.trainable,
                          ort_provider_options=ort_opts)
        branches[name] = Branch(enc, preprocess=pre, input_keys=b.input_keys, mask_key=b.mask_key,
                                out_dim=b.out_dim, trainable=b.trainable, projection=b.projection)
    example = default_collate([train_ds[i] for i in range(min(2, len(train_ds)))])
    t0 = time.perf_counter()
    model = compose(branches, fusion=m.fusion, task=m.task,
                    num_classes=num_classes or getattr(train_ds, "num_classes", None),
                    fusion_dim=m.fusion_dim, modality_dropout=m.modality_dropout, example_batch=example,
                    task_kwargs=dict(m.task_kwargs), **dict(m.fusion_kwargs))
    progress_line(f"build compose ({len(branches)} branch{'es' if len(branches) != 1 else ''}, {m.fusion} fusion, "
                  f"{m.task}): {time.perf_counter() - t0:.1f} s", enabled=progress)
    return model


def trainer_kwargs(cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~mmbridge.Trainer` from ``cfg.training`` / ``cfg.output`` / ``cfg.model.task``."""
    cfg = as_run_config(cfg)
    return {**cfg.training.trainer_kwargs(), "out_dir": cfg.output.dir, "tensorboard": cfg.output.tensorboard,
            "loggers": list(cfg.output.active_loggers), "logger_options": dict(cfg.output.logger_options),
            "task": cfg.model.task}


def prepare_artifacts(cfg: RunConfig | Mapping[str, Any], out_dir: str | os.PathLike, *,
                      progress: bool = True) -> dict[str, Any]:
    """Export every ``type: export`` component of ``cfg`` once into ``out_dir``, for jobs without TensorFlow.

    The step a cluster job runs **before** training (one process, on a machine with TensorFlow):
    each exported component is written to ``out_dir/<branch>.<preprocess|encoder>/`` (a complete
    :class:`~mmbridge.BridgeArtifact` directory) and replaced by ``{type: artifact, path: <that
    directory, absolute>, backend: <its backend>}`` in ``out_dir/train.yaml``, the config the
    training processes then run (``mmbridge train out_dir/train.yaml``): they load the artifacts
    by path and never import TensorFlow. The exports use the same arguments as a ``type: export``
    build (:func:`mmbridge.train.components.export_kwargs`), so they land in (and are cache hits of)
    the same ``MMBRIDGE_CACHE`` entries. Files are written atomically; re-running it is cheap
    (cache hits) and rewrites the same ``train.yaml``.

    Args:
        cfg: a validated config (or its YAML form).
        out_dir: a directory on storage every training node can read.
        progress: one line per export on stderr (see :func:`progress_line`).

    Returns:
        ``{"config": path of train.yaml, "artifacts": {"<branch>.<part>": directory}}``.

    Raises:
        ConfigError: ``cfg`` has ``framework: keras`` (its run does not read artifacts).
        ExportError, ParityError: as :func:`mmbridge.export` raises them.
    """
    from mmbridge.export.exporter import export, last_export
    from mmbridge.train.checkpoint import write_text_atomic
    from mmbridge.train.components import export_kwargs
    from mmbridge.train.config import dump, load_config

    cfg = as_run_config(cfg)
    if cfg.framework != "torch":
        raise ConfigError(f"mmbridge prepare: framework: {cfg.framework} configs train in Keras and read no artifacts; "
                          f"prepare a framework: torch config")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = cfg.to_dict()
    done: dict[str, str] = {}
    for name, b in cfg.model.branches.items():
        for part in ("preprocess", "encoder"):
            comp = getattr(b, part)
            if comp is None or comp.type != "export":
                continue
            role = part
            trainable = b.trainable if part == "encoder" else False
            target = out / f"{name}.{part}"
            art = export(comp.ref, out=target, **export_kwargs(comp, trainable=trainable, role=role))
            last = last_export()
            progress_line(f"prepare model.branches.{name}.{part} ({comp.ref}): {last.get('outcome', 'exported')} in "
                          f"{last.get('seconds', 0.0):.1f} s -> {art.path}", enabled=progress)
            raw["model"]["branches"][name][part] = {"type": "artifact", "path": str(art.path), "backend": comp.backend}
            done[f"{name}.{part}"] = str(art.path)
    prepared = load_config(None, data=raw)  # validated: every artifact directory exists
    path = out / "train.yaml"
    header = (f"# written by `mmbridge prepare` from a config with {len(done)} export(s); train with\n"
              f"#   mmbridge train {path} [key=value ...]   (no TensorFlow needed)\n")
    write_text_atomic(path, header + dump(prepared))
    return {"config": str(path), "artifacts": done}
