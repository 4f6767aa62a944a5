#!/usr/bin/env python
"""What the export-time shape and backend checks cost (mmbridge/export/backends.py).

    python benchmarks/bench_export_checks.py                       # small_cnn, mobilenet_v2, resnet50
    python benchmarks/bench_export_checks.py --models small_cnn --size 64

Exports each model once into a fresh cache (``mmbridge.baselines.bench_models.keras_model``: random weights,
seed 0, a dynamic batch; ``trainable=False``) and prints, from the artifact's ``meta.json``:
``export_seconds`` (the whole export) and ``backend_check_seconds`` (the part this check adds: the
torch conversion, the torch run at the sample shape, and ORT + TF + torch at the extra shapes),
with the shapes checked. Before the check existed an export did none of that part, so the added
time is ``backend_check_seconds`` and the relative cost its share of ``export_seconds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def build(name: str, size: int):
    from mmbridge.baselines.bench_models import keras_model

    return keras_model(name, size, seed=0)  # the benchmarks' encoders: weights=None, pooled features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "mobilenet_v2", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    import mmbridge

    mmbridge.preload_torch_stack()
    from mmbridge.export._tf import import_tensorflow

    import_tensorflow()
    rows = []
    for name in args.models:
        model = build(name, args.size)
        with tempfile.TemporaryDirectory(prefix="mmbridge-bench-checks-") as cache:
            art = mmbridge.export(model, name=name, cache_dir=cache)
            meta = art.meta
        row = {"model": name, "export_seconds": meta["export_seconds"],
               "backend_check_seconds": meta["backend_check_seconds"],
               "share": round(meta["backend_check_seconds"] / meta["export_seconds"], 3),
               "breakdown": meta.get("backend_check_breakdown"),
               "shapes": [c["shapes"] for c in meta["parity_shapes"]["checked"]],
               "torch": meta["backends"]["torch"], "ort_max_abs": meta["backends"]["ort"]["max_abs"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| model | export s | shape + backend checks s | share |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['export_seconds']:.1f} | {r['backend_check_seconds']:.1f} | {r['share']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
