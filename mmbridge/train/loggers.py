"""Experiment loggers behind one interface: TensorBoard, Weights & Biases, MLflow.

A run's ``output.loggers`` names them (``[tensorboard]`` by default; ``[tensorboard, wandb,
mlflow]`` all three) and ``output.logger_options`` passes each its settings::

    output:
      loggers: [tensorboard, wandb, mlflow]
      logger_options:
        wandb: {project: pokedex, mode: offline}           # wandb.init(...) keywords
        mlflow: {tracking_uri: file:runs/mlruns, experiment: pokedex}

The :class:`~mmbridge.Trainer` builds them on rank 0 only (other ranks log nothing) and calls,
per epoch, :meth:`Logger.log_scalars` with the epoch record (``train/loss``, ``lr``,
``val/top1`` ...; step = the epoch, 1-based) and every ``log_every`` optimiser steps with
``train/loss_step`` (step = the optimiser step); :func:`mmbridge.train.run.run_train` adds the
test metrics, :meth:`Logger.log_hparams` (the run's hyper-parameters with the final val / test
metrics) and :meth:`Logger.log_artifact` for the report and the PNGs.

``wandb`` and ``mlflow`` are optional extras (``pip install "mmbridge[wandb]"`` /
``"mmbridge[mlflow]"``); naming one that is not installed is a
:class:`~mmbridge.errors.ConfigError` with that pip command, raised by config validation
(:func:`check_loggers`), before any data is read or model built. Both work offline: W&B with
``mode: offline`` (the run is written under ``output.dir/wandb/``; ``wandb sync`` uploads it later),
MLflow with a ``file:`` tracking URI (default ``file:<output.dir>/mlruns``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mmbridge.errors import ConfigError

__all__ = ["LOGGERS", "Logger", "TensorBoardLogger", "WandbLogger", "MLflowLogger", "check_loggers",
           "make_loggers", "summary_writer"]


@runtime_checkable
class Logger(Protocol):
    """What the Trainer and the recipe call on an experiment logger (rank 0 only).

    Methods:
        log_scalars(step, scalars): ``scalars`` is ``{name: float}`` (names like ``train/loss``,
            ``val/top1``: fractions in [0, 1] for accuracies, losses in nats); ``step`` an int
            (the epoch for epoch records, the optimiser step for ``train/loss_step``).
        log_hparams(hparams, metrics): the run's hyper-parameters (``{name: int | float | str |
            bool}``) with its final metrics (``{name: float}``), once at the end of a run.
        log_artifact(path): a file the run wrote (report, PNG); loggers without artifact storage
            ignore it.
        close(): flush and finish; called once.
    """

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def close(self) -> None: ...


def summary_writer(log_dir: str | os.PathLike):
    """A TensorBoard ``SummaryWriter`` that does not import TensorFlow.

    TensorBoard imports TensorFlow when it is installed (``tensorboard.compat.tf``) unless the
    marker module ``tensorboard.compat.notf`` exists, in which case it uses its own stub (its
    "no_tensorflow" build). The training process should not load TF (DESIGN.md, "TF
    isolation"), so unless TF is already loaded the marker is installed first.
    """
    import sys
    import types

    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def _scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``scalars`` as floats (bools and strings are not scalars)."""
    return {k: float(v) for k, v in scalars.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class TensorBoardLogger:
    """TensorBoard event files under ``log_dir`` (``torch.utils.tensorboard``, no TensorFlow).

    :meth:`log_hparams` writes ``add_hparams`` into ``log_dir/hparams`` (the HPARAMS tab);
    :meth:`log_artifact` does nothing (TensorBoard stores no files).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.writer = summary_writer(self.log_dir)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in _scalars(scalars).items():
            self.writer.add_scalar(k, v, int(step))

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.writer.add_hparams(dict(hparams), _scalars(metrics), run_name="hparams")

    def log_artifact(self, path: str | os.PathLike) -> None:
        return None

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (``wandb.init(dir=out_dir, **options)``).

    Args:
        out_dir: the run folder; W&B writes ``out_dir/wandb/`` (offline runs stay there).
        options: ``wandb.init`` keywords from ``output.logger_options.wandb`` (``project``,
            ``entity``, ``name``, ``mode``: ``online`` | ``offline`` | ``disabled``, ``tags``, ...).
        config: the run's config (YAML form), stored as the W&B run config.

    ``log_scalars`` is ``run.log(scalars, step=step)``: W&B needs a step that never decreases, so
    steps go on one axis per key family: per-epoch records are logged with ``epoch`` as a value
    and no explicit step (W&B's own counter), ``train/loss_step`` and the test metrics with
    ``optimizer_step``.
    ``log_hparams`` updates ``run.config`` and ``run.summary``; ``log_artifact`` is ``run.save``
    (copied into the run's files, ``policy="now"``). :meth:`close` is ``run.finish()``; W&B's service
    process writes the offline run file, which is complete once that process exits
    (``wandb.teardown()``, or at interpreter exit).
    """

    name = "wandb"

    def __init__(self, out_dir: str | os.PathLike, options: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None):
        import wandb

        self.out_dir = Path(out_dir)
        kw = {"dir": str(self.out_dir), "config": dict(config or {}), **dict(options or {})}
        kw.setdefault("name", self.out_dir.name)
        self.run = wandb.init(**kw)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = _scalars(scalars)
        if any(k == "train/loss_step" or k.startswith("test/") for k in values):  # step = optimiser step
            values["optimizer_step"] = int(step)
        else:
            values["epoch"] = int(step)
        self.run.log(values)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.run.config.update({"hparams": dict(hparams)}, allow_val_change=True)
        self.run.summary.update(_scalars(metrics))

    def log_artifact(self, path: str | os.PathLike) -> None:
        p = Path(path).resolve()
        self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """An MLflow run (``mlflow.start_run``) in a tracking store.

    Args:
        out_dir: the run folder; the default tracking URI is ``file:<out_dir>/mlruns`` (offline).
        options: from ``output.logger_options.mlflow``: ``tracking_uri`` (``file:DIR``, ``http://...``),
            ``experiment`` (name; default ``mmbridge``), ``run_name`` (default: the folder name), ``tags``.
        config: not logged as such (MLflow params are flat strings); the hyper-parameters come
            through :meth:`log_hparams`.

    ``log_scalars`` is ``mlflow.log_metrics(scalars, step=step)`` (names with ``/`` are valid MLflow
    keys); ``log_hparams`` is ``log_params(hparams)`` plus the final metrics; ``log_artifact`` is
    ``log_artifact(path)``. The client (``mlflow.tracking.MlflowClient``) is used with the run id,
    so no global active run leaks into the caller.
    """

    name = "mlflow"

    def __init__(self, out_dir: str | os.PathLike, options: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None):
        import mlflow

        opts = dict(options or {})
        self.out_dir = Path(out_dir)
        uri = opts.get("tracking_uri") or (self.out_dir.resolve() / "mlruns").as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        exp_name = opts.get("experiment") or "mmbridge"
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
        tags = {str(k): str(v) for k, v in dict(opts.get("tags") or {}).items()}
        tags.setdefault("mlflow.runName", str(opts.get("run_name") or self.out_dir.name))
        self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        self.tracking_uri = uri

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in _scalars(scalars).items():
            self.client.log_metric(self.run_id, k, v, step=int(step))

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for k, v in hparams.items():
            self.client.log_param(self.run_id, k, v)
        for k, v in _scalars(metrics).items():
            self.client.log_metric(self.run_id, k, v)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


#: logger name -> (class, importable module it needs, the pip command that installs it, option keys;
#: None: any ``wandb.init`` keyword)
LOGGERS: dict[str, tuple[type, str | None, str | None, tuple[str, ...] | None]] = {
    "tensorboard": (TensorBoardLogger, "tensorboard", 'pip install tensorboard', ()),
    "wandb": (WandbLogger, "wandb", 'pip install "mmbridge[wandb]"', None),
    "mlflow": (MLflowLogger, "mlflow", 'pip install "mmbridge[mlflow]"',
               ("tracking_uri", "experiment", "run_name", "tags")),
}


def _installed(module: str) -> bool:
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_loggers(names: Any, options: Any, where: str, problems: list[str]) -> None:
    """Append every problem of ``output.loggers`` / ``output.logger_options`` to ``problems``.

    Checks: a list of known names (each once), option mappings only for listed loggers with the
    keys that logger takes, and that each named logger's package is importable (the message gives
    the ``pip install`` command). Imports nothing heavy (``importlib.util.find_spec`` only).
    """
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        problems.append(f"{where}.loggers: must be a list of logger names from {sorted(LOGGERS)}, got {names!r}")
        return
    for n in names:
        if n not in LOGGERS:
            problems.append(f"{where}.loggers: unknown logger {n!r}; choose from {sorted(LOGGERS)}")
        elif not _installed(LOGGERS[n][1]):
            problems.append(f"{where}.loggers: {n!r} needs the {LOGGERS[n][1]!r} package, which is not installed: "
                            f"{LOGGERS[n][2]} (or remove {n!r} from {where}.loggers)")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        problems.append(f"{where}.loggers: {dup} listed more than once")
    if not isinstance(options, Mapping):
        problems.append(f"{where}.logger_options: must be a mapping of logger name -> options, got {options!r}")
        return
    for n, opts in options.items():
        if n not in names:
            problems.append(f"{where}.logger_options.{n}: options for a logger not in {where}.loggers ({list(names)})")
            continue
        if not isinstance(opts, Mapping):
            problems.append(f"{where}.logger_options.{n}: must be a mapping, got {opts!r}")
            continue
        keys = LOGGERS[n][3] if n in LOGGERS else ()
        if keys is not None:
            bad = sorted(set(opts) - set(keys))
            if bad:
                problems.append(f"{where}.logger_options.{n}: unknown key(s) {bad}; {n} takes {list(keys) or 'none'}")


def make_loggers(names: Sequence[str | Logger], out_dir: str | os.PathLike,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 config: Mapping[str, Any] | None = None) -> list[Logger]:
    """The loggers named (instances pass through), writing under ``out_dir``.

    ``tensorboard`` writes ``out_dir/tensorboard``; ``wandb`` / ``mlflow`` get their entry of
    ``options`` and ``config`` (the run's config, YAML form). Call on rank 0 only.

    Raises:
        ConfigError: an unknown name or a missing package (see :func:`check_loggers`).
    """
    problems: list[str] = []
    plain_names = [n for n in names if isinstance(n, str)]
    check_loggers(plain_names, {k: v for k, v in dict(options or {}).items() if k in plain_names},
                  "output", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    out: list[Logger] = []
    for n in names:
        if not isinstance(n, str):
            out.append(n)
        elif n == "tensorboard":
            out.append(TensorBoardLogger(Path(out_dir) / "tensorboard"))
        else:
            out.append(LOGGERS[n][0](out_dir, dict(options or {}).get(n), config))
    return out
