"""The ``mmbridge`` command line.

    mmbridge export MODULE:ATTR|SAVEDMODEL_DIR|MODEL.keras|BRIDGE --out DIR [--opset N] [--name NAME]
    mmbridge verify DIR [--backend ort --backend torch] [--atol A --rtol R] [--train]
    mmbridge bridges [PATTERN]
    mmbridge info
    mmbridge train CONFIG.yaml [key=value ...]       (mmbridge.cli.train)
    mmbridge evaluate CONFIG.yaml --checkpoint PATH    (mmbridge.cli.train)
    mmbridge demo [--data DIR]                         (mmbridge.cli.train)
    mmbridge predict RUN_DIR --data DIR --out CSV      (mmbridge.cli.train)
    mmbridge export-model RUN_DIR --out DIR            (mmbridge.cli.train)
    mmbridge bench [--quick] [--device cpu|cuda]       (mmbridge.cli.bench)

Exports run in a child process, so this process never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from mmbridge.errors import MMBridgeError

# (module, function) pairs that add subcommands owned by other subpackages
_EXTERNAL_PARSERS = (
    ("mmbridge.cli.train", "add_train_parser"),
    ("mmbridge.cli.train", "add_prepare_parser"),
    ("mmbridge.cli.train", "add_evaluate_parser"),
    ("mmbridge.cli.train", "add_demo_parser"),
    ("mmbridge.cli.train", "add_predict_parser"),
    ("mmbridge.cli.train", "add_export_model_parser"),
    ("mmbridge.cli.bench", "add_bench_parser"),
)


def _cmd_export(args: argparse.Namespace) -> int:
    from mmbridge.export.exporter import export
    from mmbridge.specs import TensorSpec

    specs = None
    if args.input_spec:
        specs = [TensorSpec.from_dict(json.loads(s)) for s in args.input_spec]
    art = export(args.source, out=args.out, opset=args.opset, name=args.name, role=args.role,
                 input_specs=specs, force=args.force, trainable=args.trainable,
                 inputs_as_nchw=args.inputs_as_nchw or None, training=args.training,
                 probes=args.probes)
    print(f"exported {art.name!r} -> {art.path}")
    print(f"  fingerprint {art.fingerprint[:16]}  opset {art.opset}  inputs "
          + ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in art.input_specs))
    from mmbridge.parity import ParityReport

    if art.parity:
        print(ParityReport.from_dict(art.parity))
    dist = art.meta.get("distribution")
    if dist:
        print(f"training=True: random outputs; distribution check {'PASSED' if dist['passed'] else 'FAILED'} "
              f"(onnxruntime min p {dist['ort']['min_p']:.2g}"
              + (f", torch min p {dist['torch']['min_p']:.2g}" if dist.get("torch") else ", torch not checked")
              + f"; {dist['draws']} draws)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0: parity holds; 1: it does not; 2 (from :func:`main`): the artifact cannot be checked
    (missing / corrupt files, no golden.npz), with the file and the fix on stderr."""
    from mmbridge.artifact import BridgeArtifact
    from mmbridge.parity import verify
    from mmbridge.specs import Tolerance

    tolerance = None
    if args.atol is not None or args.rtol is not None:
        tolerance = Tolerance(args.atol if args.atol is not None else 0.0, args.rtol if args.rtol is not None else 0.0,
                              "given on the mmbridge verify command line")
    art = BridgeArtifact.load(args.artifact)
    report = verify(art, backends=args.backend or ["ort"], tolerance=tolerance, raise_on_failure=False,
                    train_steps=3 if args.train else None)  # the CLI has no Keras model: what export recorded
    print(report)
    if not report.passed and tolerance is None and art.meta.get("tolerance"):
        print(f"note: checked against the tolerance table; meta.json records tolerance {art.meta['tolerance']}, "
              f"which verify does not trust from the file (pass --atol/--rtol to use it)", file=sys.stderr)
    return 0 if report.passed else 1


def _cmd_bridges(args: argparse.Namespace) -> int:
    from mmbridge.registry import bridges

    names = bridges.names(args.pattern)
    if not names:
        print(f"no bridges match {args.pattern!r} (register them with @mmbridge.register_bridge, "
              f"or through the 'mmbridge.plugins' entry point group)")
    for n in names:
        spec = bridges.get(n)
        ins = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in spec.input_specs)
        print(f"{n:32} {spec.role:10} opset {spec.opset:<3} {ins}  {spec.description}")
    return 0


def environment_report() -> dict[str, Any]:
    """Everything ``mmbridge info`` prints: versions, ORT execution providers, torch devices, conflicts."""
    import platform
    import sys

    from mmbridge.info import conflicts, versions

    pairing = None
    info: dict[str, Any] = {"platform": platform.platform(), "executable": sys.executable, "versions": versions()}
    try:
        from mmbridge.runtime.session import available_providers

        info["onnxruntime_providers"] = available_providers()
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        info["onnxruntime_providers"] = f"unavailable: {exc}"
    try:
        import torch

        info["torch_cuda"] = torch.cuda.is_available()
        info["torch_cuda_build"] = torch.version.cuda
        from mmbridge.info import cuda_pairing, dist_version, ort_gpu_cuda_major

        info["onnxruntime_gpu_cuda_build"] = ort_gpu_cuda_major()
        pairing = cuda_pairing(torch.version.cuda, dist_version("onnxruntime-gpu"), ort_gpu_cuda_major())
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except Exception as exc:  # noqa: BLE001
        info["gpus"] = f"unavailable: {exc}"
    from mmbridge.artifact import cache_root

    info["cache"] = str(cache_root())
    info["conflicts"] = conflicts() + ([pairing] if pairing else [])
    return info


def _cmd_info(args: argparse.Namespace) -> int:
    info = environment_report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "versions":
            print("versions:")
            for k, v in value.items():
                print(f"  {k:24} {v or '-'}")
        elif key == "conflicts":
            print("conflicts:" + ("" if value else " none"))
            for c in value:
                print(f"  ! {c}")
        else:
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand (external ones only if their module imports)."""
    from mmbridge._version import __version__

    parser = argparse.ArgumentParser(prog="mmbridge", description="TF preprocessing and Keras encoders in PyTorch, via ONNX.")
    parser.add_argument("--version", action="version", version=f"mmbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a TF object to a checked ONNX artifact (runs TF in a child process)")
    p.add_argument("source", help="MODULE:ATTR, a SavedModel directory, a .keras/.h5 file, or a registered bridge name")
    p.add_argument("--out", required=True, help="directory to write the artifact to (model.onnx, meta.json, golden.npz)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--name", default=None)
    p.add_argument("--role", choices=("preprocess", "encoder"), default=None)
    p.add_argument("--input-spec", action="append", metavar="JSON",
                   help='input spec as JSON, repeatable: \'{"name": "image", "shape": ["batch", 224, 224, 3], "dtype": "uint8", "layout": "NHWC"}\'')
    p.add_argument("--inputs-as-nchw", action="append", metavar="NAME", help="input to take as NCHW in the ONNX graph")
    p.add_argument("--trainable", action="store_true", help="keep BatchNorm/Dropout/LayerNorm for fine-tuning")
    p.add_argument("--training", action="store_true",
                   help="trace Keras models/layers with training=True: augmentation layers active, random outputs, "
                        "distribution-checked (see docs/user-guide.md, 'Training-mode preprocessing')")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the probe inputs (edge values per op, mmbridge.export.probes): accept, knowingly, a graph "
                        "they refuse; recorded in meta.json")
    p.add_argument("--force", action="store_true", help="re-export even on a cache hit")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="re-check an artifact's parity against its stored TF outputs")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--backend", action="append", choices=("ort", "ort_module", "torch"),
                   help="backends to check (default: ort)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance for floating outputs (default: the tolerance table, never meta.json's)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance for floating outputs (with --atol)")
    p.add_argument("--train", action="store_true",
                   help="also report the train parity recorded at export (trainable Keras exports; not re-run: that "
                        "needs the Keras model, mmbridge.verify(art, train_steps=3, source=model))")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("bridges", help="list registered bridges")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_cmd_bridges)

    p = sub.add_parser("info", help="versions, execution providers, GPUs, cache dir and known conflicts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    for module, fn in _EXTERNAL_PARSERS:
        try:
            add = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError):
            continue
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmbridge`` console script; returns the exit code."""
    parser = build_parser()
    # `mmbridge evaluate CFG --checkpoint P key=value`: argparse gives an nargs="*" positional only the
    # words before the first option, so dotted overrides after options come back as extras; they are
    # appended in order (anything else is still an error)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except MMBridgeError as exc:
        print(f"mmbridge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
