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

The parent side is :func:`mmbridge.bench.suites.keras_torch_rows`; Keras itself is loaded by
:func:`mmbridge.baselines.keras_torch.load_on_torch_backend` (Keras stays in the baselines,
``tests/test_layout.py``): always on the torch backend, in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.bench.harness import HarnessConfig, Result, Variant, measure_case


def _rows(args: argparse.Namespace) -> list[Result]:
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise RuntimeError("mmbridge.bench.keras_torch must run with KERAS_BACKEND=torch (keras_torch_rows sets it)")
    import torch

    import mmbridge
    from mmbridge.bench.suites import FEATURES, _native_twin, _torch_train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmbridge.baselines.keras_torch import load_on_torch_backend

    keras_module, keras_info = load_on_torch_backend(args.keras)
    rng = np.random.default_rng(0)
    x_nhwc = rng.uniform(-1, 1, size=(args.batch, args.side, args.side, 3)).astype(np.float32)
    x_k = torch.from_numpy(x_nhwc)
    x_t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(rng.integers(0, 10, size=(args.batch,)).astype(np.int64))
    train = args.mode == "train"
    feat = FEATURES[args.kind]
    conv = mmbridge.load_artifact(args.artifact).to_torch(trainable=train) if args.artifact else None
    twin, twin_note = _native_twin(args.kind)

    mods = {"keras_torch_backend": (keras_module, x_k), "torch_converted": (conv, x_t), "torch_native": (twin, x_t)}
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
              **keras_info}
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


if __name__ == "__main__":
    raise SystemExit(main())
