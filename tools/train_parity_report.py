"""Print the train-parity report of a keras.applications model that a trainable export refuses.

A diagnostic, not an export path: it disables ``TrainParityReport.raise_if_failed`` in this process
only, exports ``keras.applications.ARCH(weights=None, include_top=False, pooling="avg",
input_shape=(SIZE, SIZE, 3))`` with ``trainable=True`` into a scratch cache, and prints the
variables with the worst ``max_abs / tolerance`` (and every variable whose path starts with
``--prefix``) from ``art.meta["train_parity"]``, plus the initial max |value| of those variables.

Usage (repository root)::

    PYTHONPATH=. python tools/train_parity_report.py DenseNet169 32 --prefix conv1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

import mmbridge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", help="a keras.applications constructor, e.g. DenseNet169")
    ap.add_argument("size", type=int, help="square input size in px")
    ap.add_argument("--prefix", default=None, help="also print every variable whose path starts with this")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    mmbridge.preload_torch_stack()
    from mmbridge.export import contract

    contract.TrainParityReport.raise_if_failed = lambda self, what: None  # diagnostic: report, do not refuse
    mmbridge.export._tf.import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    m = getattr(keras.applications, args.arch)(weights=None, include_top=False, pooling="avg",
                                               input_shape=(args.size, args.size, 3))
    init = {v.path: float(np.abs(np.asarray(v)).max()) for v in m.weights}
    with tempfile.TemporaryDirectory() as tmp:
        art = mmbridge.export(m, trainable=True, cache_dir=tmp, name=f"{args.arch}_{args.size}")
        tp = art.meta["train_parity"]
    print(f"{args.arch} {args.size} px: batch {tp['batch']}, passed {tp['passed']}, worst ratio {tp['worst_ratio']:.3g}: "
          f"{tp['first_failure']}")
    rows = sorted(tp["rows"], key=lambda r: -r["max_abs"] / max(r["tolerance"], 1e-30))[: args.top]
    rows += [r for r in tp["rows"] if args.prefix and r["path"].startswith(args.prefix) and r not in rows]
    for r in rows:
        print(json.dumps({**r, "initial_max_abs": init.get(r["path"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
