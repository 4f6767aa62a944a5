"""``mmbridge train | evaluate | demo`` (wired into :mod:`mmbridge.cli` by ``add_*_parser``).

    mmbridge train CONFIG.yaml [key=value ...]            # also under torchrun --nproc-per-node N
    mmbridge evaluate CONFIG.yaml --checkpoint PATH [key=value ...]
    mmbridge demo [--data DIR] [--out DIR] [--epochs N]

Importing this module is cheap (argparse only). The config is validated, with every problem
listed, before TensorFlow, onnxruntime or the data are touched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmbridge.train.config import RunConfig


def run_train(cfg: RunConfig | Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """Train and evaluate a validated config, in the framework it names.

    ``framework: torch`` (the default): :func:`mmbridge.train.run.run_train` (the PyTorch recipe).
    ``framework: keras``: :func:`mmbridge.baselines.keras_run.run_keras` (the TF-only baseline: the
    model is built and trained in Keras; same report files and return shape, no ``.pt``
    checkpoints, plus ``<branch>_encoder.keras`` / ``<branch>_preprocess.keras``).

    Returns:
        ``{"fit": ..., "val": metrics, "test": metrics, "report": path or None}``.

    Raises:
        ConfigError, DataError, CacheError: as raised by the data layer, model build or resume.
    """
    from mmbridge.train.config import as_run_config

    cfg = as_run_config(cfg)
    if cfg.framework == "keras":
        from mmbridge.baselines.keras_run import run_keras

        return run_keras(cfg, name=name)
    from mmbridge.train.run import run_train as run_torch

    return run_torch(cfg, name=name)


def run_evaluate(cfg: RunConfig | Mapping[str, Any], checkpoint: str, *, out: str | None = None,
                 splits_to_eval: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, float]]:
    """:func:`mmbridge.train.run.run_evaluate` (the checkpoint of a torch run, on the given splits)."""
    from mmbridge.train.run import run_evaluate as evaluate

    return evaluate(cfg, checkpoint, out=out, splits_to_eval=splits_to_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmbridge.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_train(cfg)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mmbridge.train.config import load_config

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
    """``python -m mmbridge.cli.train ...``: the same as the ``mmbridge`` command (:func:`mmbridge.cli.main`)."""
    from mmbridge.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
