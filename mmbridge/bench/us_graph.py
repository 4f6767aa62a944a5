"""The microsecond-graph cases of issue 16 (``preprocess`` suite), run in a child process without TensorFlow.

The ``preprocess`` suite exports ``clip((x - mu) / sd, -5, 5)`` (``[64, 6]`` float32) with
TensorFlow, then runs this module as ``python -m mmbridge.bench.us_graph`` on the artifact: a
fresh process that never imports TensorFlow, as a training process that reads prepared
artifacts (``mmbridge prepare``) does. There
:func:`mmbridge.bench.suites.numeric_us_rows` times, interleaved in this one process:

* ``ORT module vs bare IO binding``: ``ort_iobinding_floor`` (**baseline**: the pybind
  ``run_with_iobinding`` on OrtValues bound once), ``ort_iobinding_bare`` (the public
  ``InferenceSession`` wrapper), ``ort_module`` (``to_ort()``, a plain call) and
  ``ort_module_no_grad``;
* ``converted vs hand-written torch``: ``torch_converted``, ``torch_converted_unfused`` and
  ``torch_native`` (**baseline**: ``((x - mu) / sd).clamp_(-5, 5)``), all under ``no_grad``.

The same cases are also measured in the bench's own process, where TensorFlow is loaded (case
names ending in :data:`mmbridge.bench.suites.US_TF_SUFFIX`). Rows are written as JSON
(:meth:`Result.to_dict`) to ``--out``; each records ``extra.tensorflow_loaded`` (False here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mmbridge.bench.harness import HarnessConfig

US_REPEATS = 41  # interleaved rounds per case in the child (the suite's quick config has 5; numeric_us_rows 15)
US_REP_S = 0.005  # seconds per repetition (quick: 0.02): ~5-10 blocks of 100 calls


def main(argv: list[str] | None = None) -> int:
    """``python -m mmbridge.bench.us_graph --artifact DIR --data X.npz --out ROWS.json``; exit code 0
    when the rows were written.

    ``--data``: an ``.npz`` with ``x`` (float32 ``[B, F]``), ``mu`` and ``sd`` (float32 ``[F]``, the
    graph's constants, for the hand-written twin).
    """
    p = argparse.ArgumentParser(prog="python -m mmbridge.bench.us_graph", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, help="the exported clip((x - mu) / sd) artifact directory")
    p.add_argument("--data", required=True, help=".npz with x [B, F], mu [F], sd [F]")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch / onnxruntime intra-op threads (0: defaults)")
    p.add_argument("--harness", help="HarnessConfig as JSON (default HarnessConfig.quick())")
    p.add_argument("--out", required=True, help="where the rows are written (JSON list)")
    args = p.parse_args(argv)
    import torch

    import mmbridge
    from mmbridge.bench.suites import SuiteContext, numeric_us_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    config = HarnessConfig(**json.loads(args.harness)) if args.harness else HarnessConfig.quick(args.device)
    # microsecond calls: more, shorter repetitions (at least US_REPEATS of at most US_REP_S each),
    # so that on a loaded machine fewer of them are hit by a preemption (wall clock) and the
    # median of the per-round ratios rests on more pairs; cheap here (~3 s per case)
    config = dataclasses.replace(config, repeats=max(config.repeats, US_REPEATS), min_rep_s=min(config.min_rep_s, US_REP_S))
    data = np.load(args.data)
    with tempfile.TemporaryDirectory() as cache:
        ctx = SuiteContext(size="quick", device=args.device, config=config, cache_dir=Path(cache),
                           log=lambda _line: None, threads=args.threads or None)
        rows = numeric_us_rows(ctx, mmbridge.load_artifact(args.artifact), None, data["x"], data["mu"], data["sd"])
    for r in rows:
        r.extra["tensorflow_loaded"] = "tensorflow" in sys.modules
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows]))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
