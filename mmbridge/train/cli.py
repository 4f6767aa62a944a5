"""``mmbridge train | evaluate | demo`` (wired into :mod:`mmbridge.cli` by ``add_*_parser``).

    mmbridge train CONFIG.yaml [key=value ...]            # also under torchrun --nproc-per-node N
    mmbridge evaluate CONFIG.yaml --checkpoint PATH [key=value ...]
    mmbridge demo [--data DIR] [--out DIR] [--epochs N]

Importing this module is cheap (argparse only). The config is validated, with every problem
listed, before TensorFlow, onnxruntime or the data are touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def run_train(cfg: Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """Train and evaluate a validated config (see :func:`mmbridge.train.config.load_config`).

    Writes into ``output.dir``: ``config.yaml``, ``last.pt``, ``best.pt``, ``tensorboard/``,
    ``report.json`` and ``report.md`` (val and test metrics, training time).

    A config with ``framework: keras`` is handed to :func:`mmbridge.train.keras_run.run_keras`
    (the model is built and trained in Keras; same report files and return shape, no ``.pt``
    checkpoints, plus ``<branch>_encoder.keras`` / ``<branch>_preprocess.keras``).

    Returns:
        ``{"fit": Trainer.fit(...) result, "val": metrics, "test": metrics, "report": path or None}``
        (the same on every rank; ``report`` is set on rank 0).

    Raises:
        ConfigError, DataError, CacheError: as raised by the data layer, model build or resume.
    """
    if cfg.get("framework", "torch") == "keras":
        from .keras_run import run_keras

        return run_keras(cfg, name=name)
    from . import distributed
    from .build import build_data, build_model, data_root, trainer_kwargs
    from .config import dump
    from .metrics import write_report
    from .trainer import Trainer

    env = distributed.setup(cfg["training"]["device"])
    root, builtin = data_root(cfg)
    t_data = time.perf_counter()
    splits = build_data(cfg)
    t_data = time.perf_counter() - t_data
    train = splits["train"]
    t_model = time.perf_counter()
    model = build_model(cfg, train)
    t_model = time.perf_counter() - t_model
    out_dir = Path(cfg["output"]["dir"])
    name = name or cfg["output"].get("name") or out_dir.name
    if env.is_main:
        print(f"data: {'the built-in sample ' if builtin else ''}{root} "
              f"({len(train)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
              f"{getattr(train, 'num_classes', '?')} classes; read in {t_data:.1f} s)", flush=True)
        print(f"model (built in {t_model:.1f} s; {env.world_size} process{'es' if env.world_size > 1 else ''}, "
              f"{env.device}, {cfg['training']['precision']}):\n{model.describe()}", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        from .checkpoint import write_text_atomic

        write_text_atomic(out_dir / "config.yaml", dump(cfg))
    meta = train.metadata() if hasattr(train, "metadata") else {}
    trainer = Trainer(model, train, splits["val"], extra_state={"config": dict(cfg), "data": meta},
                      **trainer_kwargs(cfg))
    t = cfg["training"]
    try:
        fit = trainer.fit(resume=t["resume"], stop_after_epochs=t["stop_after_epochs"],
                          restore_best=t["restore_best"])
        val = trainer.evaluate(splits["val"], "val")
        test = trainer.evaluate(splits["test"], "test")
        report = None
        if env.is_main:
            row = {**test, **val, "epochs": len(fit["history"]), "best_epoch": fit["best_epoch"],
                   "train_time_s": round(fit["train_time_s"], 1), "world_size": env.world_size,
                   "precision": t["precision"]}
            notes = [f"data: {root}{' (built-in sample)' if builtin else ''}",
                     f"weights: {'best.pt (' + str(fit['monitor']) + ')' if t['restore_best'] else 'last epoch'}"]
            report = str(write_report({name: row}, out_dir, title=f"mmbridge: {name}", notes=notes)[1])
            print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
            print(f"report: {report}", flush=True)
    finally:
        trainer.close()
    return {"fit": fit, "val": val, "test": test, "report": report}


def run_evaluate(cfg: Mapping[str, Any], checkpoint: str, *, out: str | None = None,
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
    from mmbridge.errors import ConfigError

    if cfg.get("framework", "torch") == "keras":
        raise ConfigError(f"mmbridge evaluate: framework: keras runs write no torch checkpoint to evaluate; "
                          f"`mmbridge train` already evaluated the restored best weights on val and test: read "
                          f"{Path(cfg['output']['dir']) / 'report.json'} (or report.md)")

    from . import checkpoint as ckpt_io
    from . import distributed
    from .build import build_data, build_model, data_root, trainer_kwargs
    from .metrics import write_report
    from .trainer import Trainer

    env = distributed.setup(cfg["training"]["device"])
    root, builtin = data_root(cfg)
    splits = build_data(cfg)
    model = build_model(cfg, splits["train"])
    state = ckpt_io.load(checkpoint)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
        detail = str(exc).replace("\n", " ")[:600]
        raise ConfigError(f"checkpoint {checkpoint} does not fit the model of this config ({detail}); use the "
                          f"config the checkpoint was trained with (saved as config.yaml beside it)") from None
    kw = trainer_kwargs(cfg)
    kw.update(tensorboard=False, out_dir=out or kw["out_dir"])
    trainer = Trainer(model, splits["train"], None, **kw)
    try:
        res = {s: trainer.evaluate(splits[s], s) for s in splits_to_eval}
    finally:
        trainer.close()
    if env.is_main:
        row = {k: v for r in res.values() for k, v in r.items()}
        name = Path(checkpoint).parent.name or "checkpoint"
        _, md = write_report({name: row}, out or cfg["output"]["dir"], title=f"mmbridge evaluate: {checkpoint}",
                             name="eval_report", notes=[f"data: {root}{' (built-in sample)' if builtin else ''}",
                                                        f"checkpoint: {checkpoint}"])
        print(json.dumps(res, indent=2))
        print(f"report: {md}")
    return res


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    run_train(cfg)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    run_evaluate(cfg, args.checkpoint, out=args.out, splits_to_eval=tuple(args.split or ("val", "test")))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmbridge.demo import run_demo

    run_demo(data=args.data, out=args.out, epochs=args.epochs)
    return 0


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge train CONFIG.yaml [key=value ...]`` on ``subparsers``."""
    p = subparsers.add_parser("train", help="train a model from a YAML config (works under torchrun)",
                              description="Train from a YAML config; dotted overrides like training.epochs=3 "
                                          "are applied before validation.")
    p.add_argument("config", help="YAML config (see examples/pokedex/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, value parsed as YAML")
    p.set_defaults(func=_cmd_train)
    return p


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge evaluate CONFIG.yaml --checkpoint PATH`` on ``subparsers``."""
    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint on the val / test splits (JSON + Markdown)")
    p.add_argument("config", help="the YAML config the checkpoint was trained with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, value parsed as YAML")
    p.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by mmbridge train")
    p.add_argument("--split", action="append", choices=("train", "val", "test"), help="splits (default: val, test)")
    p.add_argument("--out", default=None, help="directory for eval_report.{json,md} (default: output.dir)")
    p.set_defaults(func=_cmd_evaluate)
    return p


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge demo [--data DIR] [--out DIR] [--epochs N]`` on ``subparsers``."""
    p = subparsers.add_parser(
        "demo", help="the whole pipeline end to end: export -> bridge -> compose -> AMP training -> report",
        description="Exports a Keras image encoder and a TF preprocessing function (in a child process), "
                    "bridges them (onnxruntime / torch), composes them with native text and numeric "
                    "branches, trains with bf16 autocast and writes an evaluation report. Without --data "
                    "it uses the small synthetic sample built into the package.")
    p.add_argument("--data", default=None, help="dataset folder (images/ + text.csv + numeric.csv [+ splits.csv]); "
                                                "default: the built-in sample")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 8 on the sample, 15 on --data)")
    p.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mmbridge.train.cli ...``: the same as the ``mmbridge`` command (:func:`mmbridge.cli.main`)."""
    from mmbridge.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
