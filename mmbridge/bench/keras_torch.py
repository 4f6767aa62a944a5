"""The Keras-3-on-torch variant of the encoder benchmarks (issue 16), run in a child process.

Keras 3 can run a ``.keras`` model on its torch backend (``KERAS_BACKEND=torch``): the layers
become ``torch.nn.Module``\\s and the variables torch Parameters, with no ONNX in between. It is
the obvious alternative to a bridge, so the ``encoders`` suite measures it beside the converted
module and the native twin. The backend is chosen once per process, before Keras is imported,
so this runs in a child (``python -m mmbridge.bench.keras_torch``) that loads **the same
``.keras`` file** the artifact was exported from, and times, interleaved in that one process
(:func:`mmbridge.bench.harness.measure_case`):

* ``keras_torch_backend``: the Keras model on the torch backend (input NHWC, as Keras takes it);
* ``torch_converted``: ``load_artifact(path).to_torch()`` of the bridge (input NCHW);
* ``torch_native`` (**baseline**): the hand-written twin of :mod:`mmbridge.bench.suites`.

``--mode forward`` is a no-grad forward; ``--mode train`` is forward + cross-entropy on a
10-class linear head + backward + SGD (lr 0.01) over the encoder's and the head's parameters,
the step of :func:`mmbridge.bench.suites._torch_train_step`. Rows are written as JSON
(:meth:`Result.to_dict`) to ``--out``. The child never imports TensorFlow (checked and recorded
in each row's ``extra.tensorflow_loaded``).

This module is the one place outside the export stage and the baselines that imports Keras
(``tests/test_layout.py``): always on the torch backend, in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.bench.harness import HarnessConfig, Result, Variant, measure_case, skipped_case

VARIANTS = ("keras_torch_backend", "torch_converted", "torch_native")


def _rows(args: argparse.Namespace) -> list[Result]:
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise RuntimeError("mmbridge.bench.keras_torch must run with KERAS_BACKEND=torch (keras_torch_rows sets it)")
    import torch

    import mmbridge
    from mmbridge.bench.suites import FEATURES, _native_twin, _torch_train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    import keras  # after torch and mmbridge; on the torch backend Keras does not load TensorFlow

    model = keras.models.load_model(args.keras, compile=False)
    rng = np.random.default_rng(0)
    x_nhwc = rng.uniform(-1, 1, size=(args.batch, args.side, args.side, 3)).astype(np.float32)
    x_k = torch.from_numpy(x_nhwc)
    x_t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(rng.integers(0, 10, size=(args.batch,)).astype(np.int64))
    train = args.mode == "train"
    feat = FEATURES[args.kind]
    conv = mmbridge.load_artifact(args.artifact).to_torch(trainable=train) if args.artifact else None
    twin, twin_note = _native_twin(args.kind)

    class KerasCall(torch.nn.Module):  # Keras takes NHWC and a `training` flag; the step helper passes one tensor
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x, training=self.training)

    mods = {"keras_torch_backend": (KerasCall(), x_k), "torch_converted": (conv, x_t), "torch_native": (twin, x_t)}
    variants = []
    for name, (mod, x) in mods.items():
        if mod is None:
            variants.append(Variant(name, None, twin_note if name == "torch_native" else "no artifact given"))
            continue
        if train:
            mod.train()
            step = _torch_train_step(mod, torch.nn.Linear(feat, 10), x, y)
            variants.append(Variant(name, step, f"train step, {step.n_params:,} trainable params"))
        else:
            mod.eval()

            def fwd(m: Any = mod, x: Any = x) -> Any:
                with torch.no_grad():
                    return m(x)

            variants.append(Variant(name, fwd, "no-grad forward"))
    config = HarnessConfig(**json.loads(args.harness)) if args.harness else HarnessConfig.quick()
    case = f"{args.kind} {'train step' if train else 'forward'} b{args.batch} {args.side}px: Keras on torch"
    params = {"model": args.kind, "batch": args.batch, "side": args.side, "mode": args.mode,
              "keras_backend": keras.backend.backend(), "keras": keras.__version__}
    rows = measure_case("encoders", case, variants, baseline="torch_native", items_per_call=args.batch,
                        config=config, params=params)
    for r in rows:
        r.extra["tensorflow_loaded"] = "tensorflow" in sys.modules
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m mmbridge.bench.keras_torch --keras F.keras [--artifact DIR] --kind K --batch B
    --side S --mode forward|train --out ROWS.json``; exit code 0 when the rows were written."""
    p = argparse.ArgumentParser(prog="python -m mmbridge.bench.keras_torch", description=__doc__.splitlines()[0])
    p.add_argument("--keras", required=True, help=".keras file (the bridge's source)")
    p.add_argument("--artifact", help="the bridge exported from it (for torch_converted)")
    p.add_argument("--kind", required=True, help="encoder kind of mmbridge.bench.suites.FEATURES")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--side", type=int, required=True, help="image side in px")
    p.add_argument("--mode", choices=("forward", "train"), default="forward")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--harness", help="HarnessConfig as JSON (default HarnessConfig.quick())")
    p.add_argument("--out", required=True, help="where the rows are written (JSON list)")
    args = p.parse_args(argv)
    rows = _rows(args)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows]))
    os.replace(tmp, out)
    return 0


def keras_torch_rows(*, keras_model: Any, keras_path: Path, artifact: Any, kind: str, batch: int, side: int,
                     mode: str, config: HarnessConfig, threads: int | None, timeout_s: float = 600.0) -> list[Result]:
    """Save ``keras_model`` to ``keras_path`` (once) and time it on Keras's torch backend in a child.

    Args:
        keras_model: the Keras 3 model the artifact was exported from (saved with ``model.save``;
            a file already at ``keras_path`` is reused).
        keras_path: where the ``.keras`` file lives (under the bench cache dir).
        artifact: the ``BridgeArtifact`` exported from the model, or ``None``.
        kind, batch, side, mode: the case (``mode`` is ``"forward"`` or ``"train"``).
        config: the parent's harness settings (the child uses the same).
        threads: torch intra-op threads in the child (``None``: torch's default).
        timeout_s: the child's time limit, in s.

    Returns:
        The child's rows (see the module doc), or ``status="skipped"`` rows saying why it could not run.
    """
    case = f"{kind} {'train step' if mode == 'train' else 'forward'} b{batch} {side}px: Keras on torch"
    try:
        if not keras_path.is_file():
            keras_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = keras_path.with_name(keras_path.stem + ".tmp.keras")
            keras_model.save(tmp)
            os.replace(tmp, keras_path)
    except Exception as exc:  # noqa: BLE001 - a model Keras cannot save: the variant is skipped, with the reason
        return skipped_case("encoders", case, VARIANTS, "torch_native", f"model.save failed: {type(exc).__name__}: {exc}")
    with tempfile.TemporaryDirectory() as tmpdir:
        out = Path(tmpdir) / "rows.json"
        cmd = [sys.executable, "-m", "mmbridge.bench.keras_torch", "--keras", str(keras_path), "--kind", kind,
               "--batch", str(batch), "--side", str(side), "--mode", mode, "--out", str(out),
               "--harness", json.dumps(config.to_dict()), "--threads", str(threads or 0)]
        if artifact is not None:
            cmd += ["--artifact", str(artifact.path)]
        env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return skipped_case("encoders", case, VARIANTS, "torch_native", f"child killed after {timeout_s:.0f} s")
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return skipped_case("encoders", case, VARIANTS, "torch_native",
                                f"Keras torch-backend child failed (exit {proc.returncode}): {tail[0][:300]}")
        return [Result.from_dict(d) for d in json.loads(out.read_text())]


if __name__ == "__main__":
    raise SystemExit(main())
