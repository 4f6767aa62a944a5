"""The PyTorch training recipe of a validated config: build, train, evaluate, report.

:func:`run_train` and :func:`run_evaluate` are what ``mmbridge train`` / ``mmbridge evaluate``
run for ``framework: torch`` configs (:mod:`mmbridge.cli.train` parses the command line and hands
``framework: keras`` configs to :mod:`mmbridge.baselines.keras_run` instead).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbridge.errors import ConfigError
from mmbridge.train.config import RunConfig, as_run_config


def run_train(cfg: RunConfig | Mapping[str, Any], *, name: str | None = None,
              allow_config_change: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate a validated config (see :func:`mmbridge.train.config.load_config`).

    Writes into ``output.dir``: ``config.yaml``, ``last.pt``, ``best.pt``, ``tensorboard/``,
    ``report.json`` and ``report.md`` (val and test metrics, training time).

    An ``output.dir`` that already holds a run is guarded before anything is written there
    (:func:`check_output_dir`): a different config is refused with the differences unless
    ``allow_config_change`` (``mmbridge train --resume``) or ``training.resume`` names a
    checkpoint path; a ``last.pt`` that will be resumed must fit the model (keys and shapes).

    Unless ``quiet``, rank 0 prints one line per step of reading the data and building the model
    to stderr (:func:`mmbridge.train.build.progress_line`: what, export cache hit / miss, seconds).

    ``framework: keras`` configs are the Keras baseline's (:mod:`mmbridge.baselines.keras_run`;
    :func:`mmbridge.cli.train.run_train` dispatches); this recipe refuses them.

    Returns:
        ``{"fit": Trainer.fit(...) result, "val": metrics, "test": metrics, "report": path or None}``
        (the same on every rank; ``report`` is set on rank 0).

    Raises:
        ConfigError: a ``framework: keras`` config (see above); ``output.dir`` holds a run with
            another config (the message lists each key with its old and new value) or a
            checkpoint to resume whose weights do not fit this model.
        ConfigError, DataError, CacheError: as raised by the data layer, model build or resume.
    """
    cfg = as_run_config(cfg)
    if cfg.framework == "keras":
        raise ConfigError("mmbridge.train.run.run_train trains torch models; a framework: keras config is the "
                          "Keras baseline: run it with mmbridge.cli.train.run_train (or `mmbridge train`)")
    from mmbridge.train import distributed
    from mmbridge.train.build import build_data, build_model, data_root, progress_line
    from mmbridge.train.config import dump
    from mmbridge.train.metrics import write_report
    from mmbridge.train.trainer import Trainer

    t = cfg.training
    env = distributed.setup(t.device)
    root, builtin = data_root(cfg.data)
    t_data = time.perf_counter()
    splits = build_data(cfg.data)
    t_data = time.perf_counter() - t_data
    train = splits["train"]
    progress_line(f"read data {root} ({', '.join(f'{len(v)} {k}' for k, v in splits.items())}): {t_data:.1f} s",
                  enabled=not quiet)
    t_model = time.perf_counter()
    model = build_model(cfg, train, progress=not quiet)
    t_model = time.perf_counter() - t_model
    out_dir = Path(cfg.output.dir)
    name = name or cfg.output.name or out_dir.name
    resume_from = check_output_dir(cfg, model, allow_config_change=allow_config_change)
    meta = train.metadata() if hasattr(train, "metadata") else {}
    trainer = Trainer.from_config(model, train, splits["val"], cfg.training, cfg.output, task=cfg.model.task,
                                  extra_state={"config": cfg.to_dict(), "data": meta}, logger_config=cfg.to_dict())
    if resume_from is not None:
        # loaded here, not in fit(), so that a checkpoint the trainer refuses (e.g. mid-epoch under another
        # epoch layout) is refused before config.yaml is written
        try:
            trainer.load_checkpoint(resume_from)
        except BaseException:
            trainer.close()
            raise
        if env.is_main:
            print(f"resumed from {resume_from}: epoch {trainer.epoch + 1}/{trainer.epochs}, micro-step "
                  f"{trainer.step_in_epoch}, optimiser step {trainer.global_step}"
                  + (" (training already finished)" if trainer.epoch >= trainer.epochs else ""), flush=True)
    if env.is_main:
        print(f"data: {'the built-in sample ' if builtin else ''}{root} "
              f"({len(train)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
              f"{getattr(train, 'num_classes', '?')} classes; read in {t_data:.1f} s)", flush=True)
        print(f"model (built in {t_model:.1f} s; {env.world_size} process{'es' if env.world_size > 1 else ''}, "
              f"{env.device}, {t.precision}):\n{model.describe()}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        from mmbridge.train.checkpoint import write_text_atomic

        saved = out_dir / "config.yaml"
        if saved.is_file() and saved.read_text() != dump(cfg):  # an explicit resume with a changed config
            write_text_atomic(out_dir / "config.previous.yaml", saved.read_text())
        write_text_atomic(saved, dump(cfg))
    try:
        fit = trainer.fit(resume=None, stop_after_epochs=t.stop_after_epochs, restore_best=t.restore_best)
        val = trainer.evaluate(splits["val"], "val")
        test = trainer.evaluate(splits["test"], "test")
        report = None
        if env.is_main:
            row = {**test, **val, "epochs": len(fit["history"]), "best_epoch": fit["best_epoch"],
                   "train_time_s": round(fit["train_time_s"], 1), "world_size": env.world_size,
                   "precision": t.precision}
            notes = [f"data: {root}{' (built-in sample)' if builtin else ''}",
                     f"weights: {'best.pt (' + str(fit['monitor']) + ')' if t.restore_best else 'last epoch'}"]
            report = str(write_report({name: row}, out_dir, title=f"mmbridge: {name}", notes=notes)[1])
            _run_outputs(cfg, trainer, model, splits["test"], fit, {**test, **val}, out_dir, env.device)
            print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
            print(f"report: {report}", flush=True)
    finally:
        trainer.close()
    return {"fit": fit, "val": val, "test": test, "report": report}


def _run_outputs(cfg: Any, trainer: Any, model: Any, test_ds: Any, fit: Mapping[str, Any], metrics: Mapping[str, float],
                 out_dir: Path, device: Any) -> None:
    """What people look at after a run: the learning-curve and confusion-matrix PNGs
    (:mod:`mmbridge.train.plots`), and, through the trainer's loggers (:mod:`mmbridge.train.loggers`),
    the test metrics (step = the last optimiser step), the run's hyper-parameters with the final test /
    val metrics (TensorBoard's HPARAMS tab, W&B config + summary, MLflow params) and the report and
    PNG files as artifacts."""
    import torch

    from mmbridge.train.plots import predictions, write_run_plots

    t = cfg.training
    confusion = None
    if cfg.model.task == "classification":
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        if amp is torch.float16 and torch.device(device).type != "cuda":
            amp = None
        confusion = predictions(model, test_ds, batch_size=t.batch_size, device=device, autocast_dtype=amp)
    written = write_run_plots(out_dir, fit["history"], monitor=fit.get("monitor"), confusion=confusion,
                              class_names=getattr(test_ds, "label_names", None))
    if "skipped" in written:
        print(f"plots: {written['skipped']}", flush=True)
    else:
        print("plots: " + ", ".join(written.values()), flush=True)
    step = int(getattr(trainer, "global_step", 0))
    hparams = {"lr": t.lr, "batch_size": t.batch_size, "epochs": t.epochs, "precision": t.precision,
               "weight_decay": t.weight_decay, "seed": t.seed, "fusion": cfg.model.fusion,
               "fusion_dim": cfg.model.fusion_dim, "branches": ",".join(cfg.model.branches)}
    files = [out_dir / "report.md", out_dir / "report.json", *(Path(p) for k, p in written.items() if k != "skipped")]
    for lg in getattr(trainer, "loggers", []):
        lg.log_scalars(step, {k: v for k, v in metrics.items() if k.startswith("test/")})
        lg.log_hparams(hparams, {k: float(v) for k, v in metrics.items()})
        for f in files:
            if f.is_file():
                lg.log_artifact(f)


#: config keys that may differ between runs into one folder: they change how a run is driven,
#: not what its checkpoints hold
VOLATILE_KEYS = ("output.dir", "training.resume", "training.stop_after_epochs", "training.progress", "training.log_every",
                 "output.tensorboard", "output.loggers", "output.logger_options")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                ignore: tuple[str, ...] = VOLATILE_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` where two configs (YAML form) differ.

    Keys absent on one side show ``"<unset>"``; ``ignore`` (default :data:`VOLATILE_KEYS`) are skipped,
    with every key under them (``output.logger_options.wandb.project``).
    """
    a, b = _flatten(old), _flatten(new)
    missing = "<unset>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys())
            if k not in ignore and not any(k.startswith(i + ".") for i in ignore)
            and a.get(k, missing) != b.get(k, missing)}


def check_output_dir(cfg: RunConfig, model: Any, *, allow_config_change: bool = False) -> str | None:
    """Guard a run's ``output.dir`` before anything is written into it.

    * ``config.yaml`` there and a different config now: :class:`ConfigError` listing every key
      with its old and new value, unless ``allow_config_change`` (``mmbridge train --resume``) or
      ``training.resume`` names a checkpoint path (an explicit resume).
    * the checkpoint this run will resume (``training.resume: auto`` and ``last.pt`` there, or
      the path given) is loaded and its state-dict keys and shapes are checked against
      ``model``: :class:`ConfigError` naming the missing / unexpected / mis-shaped keys.

    Returns:
        the checkpoint that will be resumed, or None.
    """
    from mmbridge.train import checkpoint as ckpt_io
    from mmbridge.train.config import dump

    out_dir = Path(cfg.output.dir)
    resume = cfg.training.resume
    explicit = allow_config_change or resume not in (None, "auto")
    saved = out_dir / "config.yaml"
    if saved.is_file() and not explicit:
        import yaml

        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{saved} is not readable YAML ({exc}); it is the config of the run in {out_dir}: "
                              f"pass a new output.dir, or --resume to take this config as the run's") from None
        diff = config_diff(old, yaml.safe_load(dump(cfg)))
        if diff:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ConfigError(
                f"{out_dir} already holds a run trained with another config ({saved}); {len(diff)} key(s) "
                f"differ (old -> new):\n{lines}\nPass a new output.dir (output.dir=...), or resume that run "
                f"with this config explicitly (`mmbridge train CONFIG --resume` or training.resume=<checkpoint>); "
                f"nothing was written")
    ckpt = None
    if resume == "auto":
        ckpt = out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    elif resume is not None:
        ckpt = Path(resume)
    if ckpt is None:
        return None
    state = ckpt_io.load(ckpt)
    theirs = {k: tuple(v.shape) for k, v in state["model"].items() if hasattr(v, "shape")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    shapes = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of this model missing from it: {missing[:8]}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) this model lacks: {unexpected[:8]}")
        if shapes:
            parts.append("shape mismatches: " + ", ".join(f"{k} {theirs[k]} in it vs {ours[k]} here"
                                                          for k in shapes[:8]))
        raise ConfigError(f"cannot resume from {ckpt}: it holds another model's weights ({'; '.join(parts)}). "
                          f"Pass a new output.dir, or training.resume=null to start over there; nothing was written")
    return str(ckpt)


def run_evaluate(cfg: RunConfig | Mapping[str, Any], checkpoint: str, *, out: str | None = None,
                 splits_to_eval: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, float]]:
    """Evaluate ``checkpoint`` (weights of the model of ``cfg``) on the given splits.

    Writes ``eval_report.json`` / ``eval_report.md`` into ``out`` (default ``output.dir``).

    Returns:
        ``{split: metrics}``.

    Raises:
        CacheError: the checkpoint cannot be loaded with ``weights_only=True``.
        ConfigError: its weights do not fit the config's model (names the mismatching keys); or the
            config has ``framework: keras`` (those runs write no torch checkpoint; ``mmbridge train``
            already evaluated them into ``output.dir/report.json``).
    """
    cfg = as_run_config(cfg)
    if cfg.framework == "keras":
        raise ConfigError(f"mmbridge evaluate: framework: keras runs write no torch checkpoint to evaluate; "
                          f"`mmbridge train` already evaluated the restored best weights on val and test: read "
                          f"{Path(cfg.output.dir) / 'report.json'} (or report.md)")

    from mmbridge.train import checkpoint as ckpt_io
    from mmbridge.train import distributed
    from mmbridge.train.build import build_data, build_model, data_root
    from mmbridge.train.metrics import write_report
    from mmbridge.train.trainer import Trainer

    env = distributed.setup(cfg.training.device)
    root, builtin = data_root(cfg.data)
    splits = build_data(cfg.data)
    model = build_model(cfg, splits["train"])
    state = ckpt_io.load(checkpoint)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
        detail = str(exc).replace("\n", " ")[:600]
        raise ConfigError(f"checkpoint {checkpoint} does not fit the model of this config ({detail}); use the "
                          f"config the checkpoint was trained with (saved as config.yaml beside it)") from None
    trainer = Trainer.from_config(model, splits["train"], None, cfg.training, cfg.output, task=cfg.model.task,
                                  tensorboard=False, loggers=[], out_dir=out or cfg.output.dir)
    try:
        res = {s: trainer.evaluate(splits[s], s) for s in splits_to_eval}
    finally:
        trainer.close()
    if env.is_main:
        row = {k: v for r in res.values() for k, v in r.items()}
        name = Path(checkpoint).parent.name or "checkpoint"
        _, md = write_report({name: row}, out or cfg.output.dir, title=f"mmbridge evaluate: {checkpoint}",
                             name="eval_report", notes=[f"data: {root}{' (built-in sample)' if builtin else ''}",
                                                        f"checkpoint: {checkpoint}"])
        print(json.dumps(res, indent=2))
        print(f"report: {md}")
    return res
