"""How much a keras.applications model's own TF output moves with TF's CPU kernels: oneDNN on vs off.

A diagnostic for a refused forward parity: run ``keras.applications.ARCH(weights=None,
include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))`` (``keras.utils.set_random_seed(0)``)
on the default sample input of its spec (``TensorSpec.sample``, batch 2) twice in child processes,
with ``TF_ENABLE_ONEDNN_OPTS=1`` and ``=0`` (TensorFlow's oneDNN kernels vs its Eigen ones), and
print both outputs' max |value| and their largest difference, absolute and relative to the scale.
When TF's own output changes by about as much as onnxruntime's differs from it, the model instance
is numerically ill-conditioned at float32 (a random deep net whose activations blow up) and no
converted graph can match it more closely than TF matches itself.

Usage (repository root)::

    PYTHONPATH=. python tools/forward_sensitivity.py EfficientNetV2L 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import sys, numpy as np, mmbridge
mmbridge.export._tf.import_tensorflow()
import keras
from mmbridge.specs import TensorSpec
keras.utils.set_random_seed(0)
arch, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = getattr(keras.applications, arch)(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
x = TensorSpec("input", ("batch", size, size, 3)).sample(2, 0)
np.save(out, np.asarray(m(x, training=False)))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", help="a keras.applications constructor, e.g. EfficientNetV2L")
    ap.add_argument("size", type=int, help="square input size in px")
    args = ap.parse_args(argv)
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for onednn in ("1", "0"):
            path = str(Path(tmp) / f"onednn{onednn}.npy")
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2")
            subprocess.run([sys.executable, "-c", CHILD, args.arch, str(args.size), path], env=env, check=True)
            outs[onednn] = np.load(path).astype(np.float64)
    on, off = outs["1"], outs["0"]
    diff = float(np.abs(on - off).max())
    scale = float(np.abs(on).max())
    print(f"{args.arch} {args.size} px: max |output| oneDNN on {scale:.6g}, off {float(np.abs(off).max()):.6g}; "
          f"max |on - off| {diff:.6g} ({diff / scale if scale else float('nan'):.3g} of the scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
