#!/usr/bin/env python
"""Converted Keras encoders (``to_torch``) vs their native torch twins: forward and training step.

    python benchmarks/bench_torch.py --quick --device cpu --out bench_out

For each model, one Keras original is exported with ``trainable=True`` (BatchNorm, Dropout and
LayerNorm kept, every weight trainable) and converted with ``artifact.to_torch()``; its native twin
is the same architecture written in torch (same parameter count is checked and recorded). Cases,
each timed interleaved in one run by :func:`mmbridge.bench.harness.measure_case` (ratios are
paired per-round ratios against the case's baseline, the native twin in fp32):

* ``<model> forward b<B>``: ``eval()``, ``no_grad``; variants ``torch_native`` (baseline),
  ``torch_converted``, ``torch_native_bf16`` and ``torch_converted_bf16`` (``torch.autocast``);
* ``<model> train_step b<B>``: ``train()``, MSE loss, backward, SGD step; variants
  ``torch_native`` (baseline), ``torch_converted``.

Models: ``small_cnn`` (3 Conv-BN-ReLU blocks, 32 px NCHW input via ``inputs_as_nchw``) and
``tiny_transformer`` (Embedding + one post-LN encoder block vs ``nn.TransformerEncoderLayer``) in
``--quick``; the full run adds ``mobilenet_v2`` / ``resnet50`` / ``efficientnet_b0``
(``keras.applications`` with ``weights=None`` vs torchvision with ``weights=None``; their
parameter counts differ slightly and are recorded, not asserted).

Goal (issue 3): converted training step <= 1.10x its twin with BatchNorm and all weights
training. Output: ``<out>/bench_torch.json`` (or the ``--out`` file ending in ``.json``) with
``results`` rows in the schema of :class:`mmbridge.bench.harness.Result`, a ``summary``
(``{case: {variant: ratio}}``), the bf16 speed-ups, the environment and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any


def _keras_small_cnn(keras: Any) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3), name="image")
    h = inp
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h), name="small_cnn")


def _torch_small_cnn() -> Any:
    from torch import nn

    layers: list[Any] = []
    c_in = 3
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [nn.Conv2d(c_in, filters, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(filters, eps=1e-3, momentum=0.01),
                   nn.ReLU()]
        c_in = filters
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


_TX = dict(vocab=1000, seq=32, dim=64, heads=4, ffn=128)


def _keras_tiny_transformer(keras: Any) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input((_TX["seq"],), dtype="int32", name="tokens")
    x = keras.layers.Embedding(_TX["vocab"], _TX["dim"])(inp)
    a = keras.layers.MultiHeadAttention(num_heads=_TX["heads"], key_dim=_TX["dim"] // _TX["heads"])(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x + a)
    f = keras.layers.Dense(_TX["ffn"], activation="gelu")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x + keras.layers.Dense(_TX["dim"])(f))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x), name="tiny_transformer")


def _torch_tiny_transformer() -> Any:
    import torch
    from torch import nn

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(_TX["vocab"], _TX["dim"])
            self.block = nn.TransformerEncoderLayer(_TX["dim"], _TX["heads"], _TX["ffn"], dropout=0.0, activation="gelu",
                                                    batch_first=True, layer_norm_eps=1e-5)
            self.head = nn.Linear(_TX["dim"], 10)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(self.emb(tokens.long())).mean(dim=1))

    return Twin()


ALL_MODELS = ("small_cnn", "tiny_transformer", "mobilenet_v2", "resnet50", "efficientnet_b0")


def build_models(quick: bool, cache_dir: str, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Export + convert each model and build its native twin.

    ``only``: names from :data:`ALL_MODELS` to build (default: the two small ones with ``quick``,
    all of them without).

    Returns:
        ``{name: {"converted", "native", "input" (a callable batch -> tensor), "keras_params",
        "converted_params", "native_params"}}``.
    """
    import mmbridge

    tf = mmbridge.export._tf.import_tensorflow()  # after torch's stack (import order, DESIGN.md)
    import keras
    import torch

    del tf
    specs: dict[str, Any] = {
        "small_cnn": (_keras_small_cnn, _torch_small_cnn, dict(inputs_as_nchw=["image"]),
                      lambda b: torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))),
        "tiny_transformer": (_keras_tiny_transformer, _torch_tiny_transformer,
                             dict(input_specs=[mmbridge.TensorSpec("tokens", ("batch", _TX["seq"]), "int32",
                                                                   value_range=(0, _TX["vocab"] - 1))]),
                             lambda b: torch.randint(0, _TX["vocab"], (b, _TX["seq"]), dtype=torch.int32,
                                                     generator=torch.Generator().manual_seed(0))),
    }
    if not quick or (only and set(only) - set(specs)):
        import torchvision

        for name, kfn, tfn in (("mobilenet_v2", "MobileNetV2", "mobilenet_v2"), ("resnet50", "ResNet50", "resnet50"),
                               ("efficientnet_b0", "EfficientNetB0", "efficientnet_b0")):
            specs[name] = (
                (lambda k, kfn=kfn: getattr(k.applications, kfn)(weights=None, input_shape=(224, 224, 3))),
                (lambda tfn=tfn: getattr(torchvision.models, tfn)(weights=None)),
                dict(inputs_as_nchw=["image"],
                     input_specs=[mmbridge.TensorSpec("image", ("batch", 224, 224, 3), "float32", layout="NHWC")]),
                lambda b: torch.rand(b, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
            )
    if only:
        specs = {k: v for k, v in specs.items() if k in only}
    out = {}
    for name, (kbuild, tbuild, kw, make_input) in specs.items():
        t0 = time.perf_counter()
        kmodel = kbuild(keras)
        nchw = kw.get("inputs_as_nchw")
        art = mmbridge.export(kmodel, name=f"bench_{name}", trainable=True, cache_dir=cache_dir,
                              inputs_as_nchw=nchw, input_specs=kw.get("input_specs"))
        converted = art.to_torch()
        native = tbuild()
        out[name] = {
            "converted": converted, "native": native, "input": make_input,
            "keras_params": int(sum(int(w.numpy().size) for w in kmodel.trainable_weights)),
            "converted_params": int(sum(p.numel() for p in converted.parameters() if p.requires_grad)),
            "native_params": int(sum(p.numel() for p in native.parameters())),
            "export_s": round(time.perf_counter() - t0, 2),
        }
        print(f"[bench_torch] {name}: exported and converted in {out[name]['export_s']} s; params keras "
              f"{out[name]['keras_params']} converted {out[name]['converted_params']} native {out[name]['native_params']}",
              flush=True)
    return out


def bench_model(name: str, m: dict[str, Any], batch: int, device: str, config: Any) -> list[Any]:
    """Forward and training-step cases of one model; returns harness ``Result`` rows."""
    import torch

    from mmbridge.bench.harness import Variant, measure_case

    x = m["input"](batch).to(device)
    converted, native = m["converted"].to(device), m["native"].to(device)
    params = {"model": name, "batch": batch, "device": device, "keras_params": m["keras_params"],
              "converted_params": m["converted_params"], "native_params": m["native_params"]}
    amp_dtype = torch.bfloat16

    def fwd(mod: Any, amp: bool) -> Any:
        def run() -> Any:
            with torch.no_grad(), torch.autocast(device, dtype=amp_dtype, enabled=amp):
                return mod(x)
        return run

    converted.eval()
    native.eval()
    rows = measure_case("torch_backend", f"{name} forward b{batch}", [
        Variant("torch_native", fwd(native, False)), Variant("torch_converted", fwd(converted, False)),
        Variant("torch_native_bf16", fwd(native, True)), Variant("torch_converted_bf16", fwd(converted, True)),
    ], baseline="torch_native", items_per_call=batch, config=config, params=params, log=print)

    def step(mod: Any) -> Any:
        opt = torch.optim.SGD(mod.parameters(), lr=1e-3)
        was_training = mod.training
        with torch.no_grad():  # in eval mode: BatchNorm statistics stay as they are
            target = torch.zeros_like(mod.eval()(x))  # 10 logits for the small models, 1000 for the ImageNet ones
        mod.train(was_training)

        def run() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = (mod(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            return loss
        return run

    converted.train()
    native.train()
    rows += measure_case("torch_backend", f"{name} train_step b{batch}", [
        Variant("torch_native", step(native)), Variant("torch_converted", step(converted)),
    ], baseline="torch_native", items_per_call=batch, config=config, params=params, log=print)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models, few repetitions (< 2.5 min on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_out", help="output directory, or a .json file path")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 quick, 32 full)")
    p.add_argument("--cache-dir", default=None, help="artifact cache (default: a temporary directory)")
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None,
                   help="models to run (default: small_cnn tiny_transformer with --quick, all without)")
    args = p.parse_args(argv)

    from mmbridge.bench.harness import HarnessConfig, environment, script_output

    out_file = script_output("bench_torch", args.device, args.out)
    if out_file is None:
        return 2
    t0 = time.perf_counter()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="mmbridge-bench-torch-")
    config = (HarnessConfig(warmup=1, repeats=5, min_rep_s=0.03, max_case_s=10.0, device=args.device) if args.quick
              else HarnessConfig(repeats=11, device=args.device))
    config.memory = False
    batch = args.batch or (16 if args.quick else 32)
    models = build_models(args.quick, cache, args.models)
    rows = []
    for name, m in models.items():
        print(f"[bench_torch] {name} b{batch} on {args.device}", flush=True)
        rows += bench_model(name, m, batch, args.device, config)
    summary: dict[str, dict[str, float | None]] = {}
    medians: dict[str, dict[str, float | None]] = {}
    for r in rows:
        summary.setdefault(r.case, {})[r.variant] = round(r.ratio, 4) if r.ratio is not None else None
        medians.setdefault(r.case, {})[r.variant] = r.median_ms
    bf16 = {}
    for case, med in medians.items():
        if "torch_converted_bf16" in med and med.get("torch_converted") and med.get("torch_converted_bf16"):
            bf16[case] = {"converted": round(med["torch_converted"] / med["torch_converted_bf16"], 3),
                          "native": round(med["torch_native"] / med["torch_native_bf16"], 3)
                          if med.get("torch_native") and med.get("torch_native_bf16") else None}
    doc = {
        "schema_version": 1,
        "script": "benchmarks/bench_torch.py",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": args.device,
        "quick": args.quick,
        "baseline": "torch_native",
        "goal": "torch_converted train_step ratio <= 1.10 with BatchNorm and all weights training (issue 3)",
        "summary": summary,
        "bf16_speedup": bf16,
        "models": {n: {k: v for k, v in m.items() if k.endswith(("params", "_s"))} for n, m in models.items()},
        "environment": environment(args.device),
        "config": config.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": [r.to_dict() for r in rows],
    }
    out_file.write_text(json.dumps(doc, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    print(f"[bench_torch] wrote {out_file} in {doc['wall_s']} s")
    for case, ratios in summary.items():
        print(f"  {case}: " + ", ".join(f"{v}={r}" for v, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
