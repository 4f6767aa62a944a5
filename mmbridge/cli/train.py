"""``mmbridge train | prepare | evaluate | demo`` (wired into :mod:`mmbridge.cli` by ``add_*_parser``).

    mmbridge train CONFIG.yaml [--resume [CKPT]] [--quiet] [key=value ...]   # also under torchrun --nproc-per-node N
    mmbridge prepare CONFIG.yaml --out DIR [key=value ...]         # TF exports once -> DIR/train.yaml
    mmbridge evaluate CONFIG.yaml --checkpoint PATH [key=value ...]  # overrides before or after the options
    mmbridge demo [--data DIR] [--out DIR] [--epochs N] [--quiet]  # N >= 1
    mmbridge predict RUN_DIR --data DIR [--out predictions.csv]
    mmbridge export-model RUN_DIR --out DIR [--data DIR] [--atol A]

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


def run_train(cfg: RunConfig | Mapping[str, Any], *, name: str | None = None,
              allow_config_change: bool = False, quiet: bool = False) -> dict[str, Any]:
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

    return run_torch(cfg, name=name, allow_config_change=allow_config_change, quiet=quiet)


def run_evaluate(cfg: RunConfig | Mapping[str, Any], checkpoint: str, *, out: str | None = None,
                 splits_to_eval: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, float]]:
    """:func:`mmbridge.train.run.run_evaluate` (the checkpoint of a torch run, on the given splits)."""
    from mmbridge.train.run import run_evaluate as evaluate

    return evaluate(cfg, checkpoint, out=out, splits_to_eval=splits_to_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmbridge.train.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"training.resume={args.resume}")
    explicit = args.resume is not None or any(o.split("=", 1)[0].strip() == "training.resume" for o in overrides)
    cfg = load_config(args.config, overrides)
    run_train(cfg, allow_config_change=explicit, quiet=args.quiet)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from mmbridge.train.build import prepare_artifacts
    from mmbridge.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    res = prepare_artifacts(cfg, args.out, progress=not args.quiet)
    print(f"prepared {len(res['artifacts'])} artifact(s) in {args.out}; train with: mmbridge train {res['config']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mmbridge.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_evaluate(cfg, args.checkpoint, out=args.out, splits_to_eval=tuple(args.split or ("val", "test")))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmbridge.demo import run_demo

    run_demo(data=args.data, out=args.out, epochs=args.epochs, quiet=args.quiet)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from mmbridge.train.predict import load_run, write_predictions

    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device)
    rows = run.predict(args.data, batch_size=args.batch_size, amp=not args.fp32)
    path = write_predictions(rows, args.out)
    print(f"predicted {len(rows)} rows with {run.checkpoint} -> {path}")
    return 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mmbridge.train.predict import load_run

    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    info = run.export_onnx(Path(args.out) / "model.onnx", data=args.data, atol=args.atol, check=not args.no_check)
    print(json.dumps({k: info[k] for k in ("path", "size_mib", "inputs", "parity", "latency_ms_per_batch",
                                           "latency_batch") if k in info}, indent=2))
    print(f"deployment description: {Path(args.out) / 'deploy.json'}")
    return 0


_QUIET_HELP = ("no progress lines on stderr while the data is read and the model built (by default rank 0 prints one "
               "line per step: export cache hit / miss and seconds; also when stderr is not a terminal)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (the number of epochs to train), got {value}")
    return value


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge train CONFIG.yaml [key=value ...]`` on ``subparsers``."""
    p = subparsers.add_parser("train", help="train a model from a YAML config (works under torchrun)",
                              description="Train from a YAML config; dotted overrides like training.epochs=3 "
                                          "are applied before validation.")
    p.add_argument("config", help="YAML config (see examples/pokedex/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, value parsed as YAML")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume the run in output.dir (from last.pt, or from CKPT) even if its config.yaml differs "
                        "from this config; without it a different config there is refused with the differences")
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    p.set_defaults(func=_cmd_train)
    return p


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge prepare CONFIG.yaml --out DIR [key=value ...]`` on ``subparsers``."""
    p = subparsers.add_parser(
        "prepare", help="export a config's TF parts once into DIR and write DIR/train.yaml (for jobs without TF)",
        description="Exports every `type: export` component (TensorFlow runs here, in a child process) into "
                    "DIR/<branch>.<part>/ and writes DIR/train.yaml, the same config with those components "
                    "as {type: artifact, path: ...}: training processes run `mmbridge train DIR/train.yaml` "
                    "and never import TensorFlow (examples/slurm, examples/kubeflow).")
    p.add_argument("config", help="YAML config (see examples/pokedex/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, value parsed as YAML")
    p.add_argument("--out", required=True, help="directory on storage every training node reads")
    p.add_argument("--quiet", action="store_true", help="no progress line per export on stderr")
    p.set_defaults(func=_cmd_prepare)
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
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs, >= 1 (default: 8 on the sample, 15 on --data); 0 is refused")
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    p.set_defaults(func=_cmd_demo)
    return p


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge predict RUN_DIR --data DIR --out predictions.csv`` on ``subparsers``."""
    p = subparsers.add_parser("predict", help="predict with a trained run on a folder of rows (labels not needed)",
                              description="Loads RUN_DIR (config + best.pt, with the run's tokenizer, label map "
                                          "and numeric statistics) and writes one row per id: the predicted label "
                                          "and the per-class probabilities (or the regression value).")
    p.add_argument("run_dir", help="output.dir of a finished `mmbridge train` run")
    p.add_argument("--data", required=True, help="folder in the dataset layout (label columns optional)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--checkpoint", default=None, help="default: best.pt, else last.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--fp32", action="store_true", help="run in float32 instead of the run's training precision")
    p.set_defaults(func=_cmd_predict)
    return p


def add_export_model_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mmbridge export-model RUN_DIR --out DIR`` on ``subparsers``."""
    p = subparsers.add_parser("export-model", help="one ONNX graph of a trained run (raw inputs -> logits), parity-checked",
                              description="Writes DIR/model.onnx (onnxruntime-bridged parts merged, torch parts "
                                          "exported) and DIR/deploy.json (inputs, label names, parity, size, latency).")
    p.add_argument("run_dir", help="output.dir of a finished `mmbridge train` run")
    p.add_argument("--out", required=True, help="directory for model.onnx and deploy.json")
    p.add_argument("--data", default=None, help="held-out rows for the parity check (default: the run's test split)")
    p.add_argument("--checkpoint", default=None, help="default: best.pt, else last.pt")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max abs logit difference accepted (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check and timing")
    p.set_defaults(func=_cmd_export_model)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mmbridge.cli.train ...``: the same as the ``mmbridge`` command (:func:`mmbridge.cli.main`)."""
    from mmbridge.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
