"""Serve a model written by ``mmbridge export-model`` with plain onnxruntime (no mmbridge, no torch).

    mmbridge export-model runs/demo --out deploy/demo        # model.onnx, deploy.json, sample_inputs.npz
    python examples/serve_onnx.py deploy/demo                # runs the sample rows, checks the logits
    python examples/serve_onnx.py deploy/demo --inputs my_rows.npz --bench 32

Needs only ``numpy`` and ``onnxruntime``. The graph takes the raw tensors the mmbridge data layer
produces (``deploy.json`` lists them: ``image`` uint8 [B, H, W, 3], ``text`` / ``text_mask`` int64
[B, T], ``numeric`` float32 [B, F]) and returns ``logits`` float32 [B, C]; the tokenizer
vocabulary and the numeric imputation statistics are in ``deploy.json`` for a client to apply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort  # noqa: TID251 - a standalone client: no mmbridge here


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="the --out folder of mmbridge export-model")
    ap.add_argument("--inputs", default=None, help=".npz with one array per graph input (default: sample_inputs.npz)")
    ap.add_argument("--bench", type=int, default=0, metavar="B", help="also time batches of B rows (ms/batch)")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    folder = Path(args.model_dir)
    info = json.loads((folder / "deploy.json").read_text())
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    data = np.load(args.inputs or folder / "sample_inputs.npz")
    feeds = {i.name: data[i.name] for i in sess.get_inputs()}
    logits = sess.run(["logits"], feeds)[0]
    names = info.get("label_names") or []
    ids = data["id"] if "id" in data else np.arange(len(logits))
    for i, row in zip(ids, logits):
        p = np.exp(row - row.max())
        p /= p.sum()
        k = int(row.argmax())
        print(f"id {int(i):6d}  {names[k] if k < len(names) else k:12}  p={p[k]:.3f}")
    rc = 0
    if "expected_logits" in data:
        diff = float(np.abs(logits - data["expected_logits"]).max())
        ok = diff <= args.atol
        print(f"max abs diff vs the torch model: {diff:.3g} ({'ok' if ok else 'FAIL'}, atol {args.atol})")
        rc = 0 if ok else 1
    if args.bench:
        reps = -(-args.bench // len(logits))
        big = {k: np.concatenate([v] * reps)[: args.bench] for k, v in feeds.items()}
        sess.run(["logits"], big)
        t0 = time.perf_counter()
        n = 50
        for _ in range(n):
            sess.run(["logits"], big)
        print(f"latency: {(time.perf_counter() - t0) / n * 1000:.2f} ms per batch of {args.bench} "
              f"(CPUExecutionProvider); graph {(folder / 'model.onnx').stat().st_size / 2**20:.3f} MiB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
