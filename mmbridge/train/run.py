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


def run_train(cfg: RunConfig | Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """Train and evaluate a validated config (see :func:`mmbridge.train.config.load_config`).

    Writes into ``output.dir``: ``config.yaml``, ``last.pt``, ``best.pt``, ``tensorboard/``,
    ``report.json`` and ``report.md`` (val and test metrics, training time).

    ``framework: keras`` configs are the Keras baseline's (:mod:`mmbridge.baselines.keras_run`;
    :func:`mmbridge.cli.train.run_train` dispatches); this recipe refuses them.

    Returns:
        ``{"fit": Trainer.fit(...) result, "val": metrics, "test": metrics, "report": path or None}``
        (the same on every rank; ``report`` is set on rank 0).

    Raises:
        ConfigError: a ``framework: keras`` config (see above).
        ConfigError, DataError, CacheError: as raised by the data layer, model build or resume.
    """
    cfg = as_run_config(cfg)
    if cfg.framework == "keras":
        raise ConfigError("mmbridge.train.run.run_train trains torch models; a framework: keras config is the "
                          "Keras baseline: run it with mmbridge.cli.train.run_train (or `mmbridge train`)")
    from mmbridge.train import distributed
    from mmbridge.train.build import build_data, build_model, data_root
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
    t_model = time.perf_counter()
    model = build_model(cfg, train)
    t_model = time.perf_counter() - t_model
    out_dir = Path(cfg.output.dir)
    name = name or cfg.output.name or out_dir.name
    if env.is_main:
        print(f"data: {'the built-in sample ' if builtin else ''}{root} "
              f"({len(train)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
              f"{getattr(train, 'num_classes', '?')} classes; read in {t_data:.1f} s)", flush=True)
        print(f"model (built in {t_model:.1f} s; {env.world_size} process{'es' if env.world_size > 1 else ''}, "
              f"{env.device}, {t.precision}):\n{model.describe()}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        from mmbridge.train.checkpoint import write_text_atomic

        write_text_atomic(out_dir / "config.yaml", dump(cfg))
    meta = train.metadata() if hasattr(train, "metadata") else {}
    trainer = Trainer.from_config(model, train, splits["val"], cfg.training, cfg.output, task=cfg.model.task,
                                  extra_state={"config": cfg.to_dict(), "data": meta})
    try:
        fit = trainer.fit(resume=t.resume, stop_after_epochs=t.stop_after_epochs, restore_best=t.restore_best)
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
            print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
            print(f"report: {report}", flush=True)
    finally:
        trainer.close()
    return {"fit": fit, "val": val, "test": test, "report": report}


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
                                  tensorboard=False, out_dir=out or cfg.output.dir)
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
