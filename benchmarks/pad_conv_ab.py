#!/usr/bin/env python
"""A/B of ``fuse_pad_conv`` (issue 16, item 5) on a converted Keras encoder, in one process.

    python benchmarks/pad_conv_ab.py --out /tmp/pad_conv_ab        # ~2 min on 2 shared cores
    python benchmarks/pad_conv_ab.py --out /tmp/pad_conv_ab --model mobilenet_v2 --batch 8 --side 96 --no-train

Exports ``mmbridge.baselines.bench_models.keras_model(model, side)`` (default the small CNN) (trainable, NCHW input,
cached under ``--out``) and times, in interleaved rounds (``mmbridge.bench.harness.measure_case``,
1 torch thread, ratios = median of paired per-round ratios, IQR in brackets):

* ``forward`` (eval, no_grad): the fused module with its no-grad batch split
  (``conv.NO_GRAD_CHUNKS = 2``) vs the same module without it (``NO_GRAD_CHUNKS = 1``);
* ``train``: forward + cross-entropy + backward + SGD with ``fuse_pad_conv`` vs the same artifact
  converted without it (baseline).
"""

from __future__ import annotations

import argparse
import os

import mmbridge  # first: torch's stack before TensorFlow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="cache directory for the export")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", default="small_cnn", help="small_cnn | mobilenet_v2 | resnet50")
    ap.add_argument("--no-train", action="store_true", help="time only the no-grad forward")
    a = ap.parse_args()

    import torch

    from mmbridge.baselines.bench_models import keras_model
    from mmbridge.bench.harness import HarnessConfig, Variant, measure_case
    from mmbridge.bench.suites import FEATURES, _no_pad_conv_to_torch, _to_torch, _torch_train_step
    from mmbridge.convert.ops import conv
    from mmbridge.specs import TensorSpec

    torch.set_num_threads(1)
    art = mmbridge.export(keras_model(a.model, a.side), cache_dir=os.path.abspath(a.out),
                          name=f"pad_conv_ab_{a.model}_{a.side}", trainable=True, inputs_as_nchw=["image"],
                          input_specs=[TensorSpec("image", ("batch", a.side, a.side, 3), "float32", "NHWC")])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.side, a.side, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    cfg = HarnessConfig(warmup=2, repeats=a.repeats, min_rep_s=0.1, max_case_s=90, memory=False)

    fused, _ = _to_torch(art, trainable=True, device="cpu")
    fused.eval()

    def forward(parts: int):
        def run():
            conv.NO_GRAD_CHUNKS = parts
            with torch.no_grad():
                return fused(x)
        return run

    cases = [("forward no_grad", [Variant("split", forward(2), ""), Variant("no_split", forward(1), "")], "no_split")]
    steps = []
    for name, fn in () if a.no_train else (("fuse_pad_conv", _to_torch), ("no_fuse_pad_conv", _no_pad_conv_to_torch)):
        m, _ = fn(art, trainable=True, device="cpu")
        m.train()
        steps.append(Variant(name, _torch_train_step(m, torch.nn.Linear(FEATURES[a.model], 10), x, y), ""))
    if steps:
        cases.append(("train step", steps, "no_fuse_pad_conv"))
    print(f"load average {os.getloadavg()[0]:.2f}; {a.model} b{a.batch} {a.side}px; pad_conv fusions "
          f"{fused.mmbridge_fusions.get('pad_conv')}")
    for case, variants, base in cases:
        for r in measure_case("pad_conv_ab", case, variants, baseline=base, items_per_call=a.batch, config=cfg):
            print(f"{case:16s} {r.variant:17s} median {r.timing.median_ms:8.3f} ms  ratio {r.ratio:.3f} "
                  f"(IQR {r.ratio_p25:.3f}-{r.ratio_p75:.3f})")
    conv.NO_GRAD_CHUNKS = 2


if __name__ == "__main__":
    main()
