#!/usr/bin/env python
"""Run only the tiny Transformer rows of the ``encoders`` suite (issue 16, item 5): the converted
Keras Transformer forward (fused and with mmbridge's fusions off) vs its ``nn.TransformerEncoderLayer``
twin, interleaved in one process, plus the tensor-memory rows (``mmbridge/bench/suites.py``,
``_transformer_case``).

    python benchmarks/bench_transformer.py --repeats 15 --out results/transformer

One torch thread (as ``mmbridge bench --quick`` on CPU). Prints one line per row (median ratio
against ``torch_native`` and its IQR, the load average) and writes ``transformer.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="batch of the tiny Transformer (seq 32, dim 64)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--out", default="results/transformer", help="output directory (and the export cache)")
    args = ap.parse_args(argv)

    import torch

    import mmbridge  # noqa: F401  (torch's stack before TensorFlow)
    from mmbridge.bench.harness import HarnessConfig
    from mmbridge.bench.suites import SuiteContext, _transformer_case
    from mmbridge.export._tf import import_tensorflow

    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    cfg = HarnessConfig.quick("cpu")
    cfg.repeats = max(1, args.repeats)
    ctx = SuiteContext(size="quick", device="cpu", config=cfg, cache_dir=out / "cache", threads=1,
                       log=lambda s: print(s, flush=True))
    rows = _transformer_case(ctx, import_tensorflow(), None, args.batch)
    load = os.getloadavg()
    for r in rows:
        iqr = f" (IQR {r.ratio_p25:.3f}-{r.ratio_p75:.3f})" if r.ratio_p25 is not None else ""
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        print(f"{r.case:40s} {r.variant:26s} ratio {ratio}{iqr}  {r.note[:90]}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    tmp = out / "transformer.json.tmp"
    tmp.write_text(json.dumps({"load_average": load, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1,
                              default=str))
    os.replace(tmp, out / "transformer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
