"""Benchmark suites: what a bridge costs against TF, plain onnxruntime and native torch.

Every suite is a function ``suite(ctx) -> list[Result]``; each case inside it is timed with
:func:`mmbridge.bench.harness.measure_case` (interleaved variants, ratio against a baseline
measured in the same run). A backend or dependency that is missing (TensorFlow, the ORT module
``BridgeArtifact.to_ort``, the converted module ``BridgeArtifact.to_torch``, torchvision,
``mmbridge.composition``) turns its variants into ``status="skipped"`` rows with the reason;
it never stops the run.

Suites (``SUITES``):

* ``preprocess``: a TF image graph (uint8 NHWC ``[B, H, W, 3]`` -> bilinear resize to ``S x S``
  -> ``(x / 255 - mean) / std`` -> float32 NCHW ``[B, 3, S, S]``) and a numeric normalisation
  (float32 ``[B, F]`` -> ``clip((x - mean) / std, -5, 5)``): TF ``tf.function`` vs ORT
  ``session.run`` (numpy in and out) vs a bare ``run_with_iobinding`` on pre-bound buffers vs
  the ORT module vs the converted torch module vs the same computation written by hand in torch
  (**baseline**).
* ``encoders``: a small Keras CNN (Conv-BN-ReLU x2, global pool, Dense) and Keras MobileNetV2
  (``weights=None``, ``include_top=False``, ``pooling="avg"``; ResNet50 in the full run), forward
  (TF vs ORT variants vs converted vs native torch twin = **baseline**: a hand-written CNN of the
  same shape, torchvision ``mobilenet_v2(weights=None).features`` / ``resnet50``) and training
  step (Keras ``GradientTape`` step vs converted ``to_torch(trainable=True)`` vs twin), SGD on a
  10-class linear head with cross-entropy. Twins have the same architecture, not the same
  weights, so outputs are not compared there.
* ``cache``: cold ``mmbridge.export(..., force=True)`` (**baseline**) vs a cache hit (the same
  ``export`` call again: fingerprint + load) vs ``BridgeArtifact.load``; the issue-2 goal is a
  hit under 1 s for ResNet50 (full run, with MobileNetV2 and EfficientNetB0; MobileNetV2 only
  in ``--quick``).
* ``amp``: ``torch.autocast`` bf16 (and fp16 with ``GradScaler`` on CUDA) vs fp32 (**baseline**)
  for the converted encoder (its native twin when ``to_torch`` is unavailable), forward and
  training step, and for the whole end-to-end hybrid's training step; ``extra.speedup`` = fp32
  time / autocast time.
* ``ddp``: the end-to-end hybrid's training step with 1 rank (**baseline**) vs 2 gloo ranks on
  CPU (N NCCL ranks on CUDA when N > 1 GPUs), DDP around the trainable stage as the Trainer
  does, the per-rank batch fixed (weak scaling), one thread per rank; ``extra.scaling_efficiency``
  = t(1 rank) / t(N ranks) (1.0 is perfect).
* ``e2e``: samples/s of a hybrid training step (``mmbridge.compose``: image branch = TF
  preprocessing graph on ORT + converted Keras CNN, numeric branch = TF normalisation on ORT +
  MLP, concat fusion, 10 classes) vs the same model written natively in torch (**baseline**),
  on synthetic data of the pokedex shapes; ``extra.samples_per_s_vs_native``. A second case:
  one training epoch of a hybrid with a frozen MiniLM-shaped text branch (a small
  ``nn.TransformerEncoder``, frozen) and a trainable numeric branch, with the feature cache
  (``model.enable_feature_cache()``, primed by a first epoch) vs without (**baseline**);
  ``ratio`` = cached / uncached epoch time, ``extra.speedup`` its inverse.

Sizes: ``tiny`` (CI test: seconds per suite), ``quick`` (``mmbridge bench --quick``: minutes on
a 2-core CPU) and ``full``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.bench.harness import HarnessConfig, Result, Timing, Variant, measure_case, skipped_case

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# per size: the parameters every suite reads
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "pre_image": [(2, 32, 24)],            # (batch, input side, output side)
        "pre_numeric": [(16, 8)],              # (batch, features)
        "pre_numeric_us": [(64, 6)],           # (batch, features): the microsecond graph of issue 16
        "transformer": [2],                    # batch of the tiny Transformer (seq 32, dim 64)
        "encoders": [("small_cnn", 2, 16)],    # (model, batch, side)
        "train_encoders": [("small_cnn", 2, 16)],
        "cache": [("small_cnn", 16)],
        "amp": ("small_cnn", 2, 16),
        "ddp": {"batch": 4, "steps": 1},
        "e2e": {"batch": 4},
        "feature_cache": {"batch": 4, "batches": 4, "tokens": 16, "width": 32, "layers": 1},
        "pipeline": {"images": 8, "side": 32, "out": 24, "batch": 4},
        "keras_torch": [("small_cnn", 2, 16, "train")],     # (model, batch, side, mode): Keras 3 on torch
        "startup": None,                                     # quick/full: "build" (fresh processes; not in CI)
    },
    "quick": {
        "pre_image": [(1, 128, 96), (16, 128, 96)],
        "pre_numeric": [(1024, 32)],
        "pre_numeric_us": [(64, 6)],
        "transformer": [16],
        "encoders": [("small_cnn", 16, 32), ("mobilenet_v2", 8, 96)],
        "train_encoders": [("small_cnn", 16, 32), ("mobilenet_v2", 8, 96)],
        "cache": [("mobilenet_v2", 224)],
        "amp": ("mobilenet_v2", 8, 96),
        "ddp": {"batch": 16, "steps": 2},
        "e2e": {"batch": 16},
        "feature_cache": {"batch": 16, "batches": 8, "tokens": 64, "width": 128, "layers": 2},
        "pipeline": {"images": 128, "side": 160, "out": 128, "batch": 16},
        "keras_torch": [("small_cnn", 16, 32, "forward"), ("small_cnn", 16, 32, "train"),
                        ("mobilenet_v2", 8, 96, "forward"), ("mobilenet_v2", 8, 96, "train")],
        "startup": "build",
    },
    "full": {
        "pre_image": [(1, 256, 224), (64, 256, 224)],
        "pre_numeric": [(8192, 64)],
        "pre_numeric_us": [(64, 6)],
        "transformer": [64],
        "encoders": [("small_cnn", 64, 32), ("mobilenet_v2", 32, 224), ("resnet50", 16, 224)],
        "train_encoders": [("small_cnn", 64, 32), ("mobilenet_v2", 16, 224), ("resnet50", 8, 224)],
        "cache": [("mobilenet_v2", 224), ("resnet50", 224), ("efficientnet_b0", 224)],
        "amp": ("mobilenet_v2", 32, 224),
        "ddp": {"batch": 32, "steps": 4},
        "e2e": {"batch": 32},
        "feature_cache": {"batch": 32, "batches": 16, "tokens": 128, "width": 384, "layers": 6},
        "pipeline": {"images": 512, "side": 256, "out": 224, "batch": 64},
        "keras_torch": [("mobilenet_v2", 32, 224, "forward"), ("mobilenet_v2", 16, 224, "train"),
                        ("resnet50", 16, 224, "forward"), ("resnet50", 8, 224, "train")],
        "startup": "build",
    },
}


@dataclasses.dataclass
class SuiteContext:
    """What every suite gets.

    Args:
        size: ``"tiny"``, ``"quick"`` or ``"full"`` (see :data:`SIZES`).
        device: ``"cpu"`` or ``"cuda"``.
        config: harness settings for ordinary cases.
        cache_dir: artifact cache the suites export into (kept between runs: a second run only
            measures, the ``cache`` suite forces its cold exports itself).
        log: progress output (one line per variant).
        threads: intra-op threads for torch, onnxruntime and TF alike (``None``: each
            framework's default, usually all cores). On a shared CPU use 1: with other
            processes busy, a 2-thread OpenMP region waits for a descheduled thread (measured
            here: MobileNetV2 forward 20x slower with 2 threads than with 1 at load 6.7 on 2 cores).
    """

    size: str
    device: str
    config: HarnessConfig
    cache_dir: Path
    log: Callable[[str], None] = print
    threads: int | None = None
    _memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def p(self) -> dict[str, Any]:
        """The parameters of this size (:data:`SIZES`)."""
        return SIZES[self.size]


# ---------------------------------------------------------------------------------------------
# optional pieces, each returning (thing, None) or (None, reason)
# ---------------------------------------------------------------------------------------------
def _tf(ctx: SuiteContext) -> tuple[Any, str | None]:
    if "tf" not in ctx._memo:
        if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
            ctx._memo["tf"] = (None, "TensorFlow / tf2onnx not installed (pip install 'mmbridge[tf]')")
        else:
            try:
                from mmbridge.export._tf import import_tensorflow

                tf = import_tensorflow()
                if ctx.threads:
                    try:
                        tf.config.threading.set_intra_op_parallelism_threads(ctx.threads)
                        tf.config.threading.set_inter_op_parallelism_threads(ctx.threads)
                    except RuntimeError as exc:  # TF's runtime already started in this process
                        ctx.log(f"  note: TF thread counts not set ({exc})")
                ctx._memo["tf"] = (tf, None)
            except Exception as exc:  # noqa: BLE001 - ImportOrderError, broken installs
                ctx._memo["tf"] = (None, f"TensorFlow unavailable: {type(exc).__name__}: {exc}")
    return ctx._memo["tf"]


def _backend_note(kind: str, exc: BaseException) -> str:
    if isinstance(exc, (ImportError, NotImplementedError)):
        return f"{kind} backend unavailable: {type(exc).__name__}: {exc}"
    return f"{kind} backend failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _to_ort(art: Any, device: str, threads: int | None = None) -> tuple[Any, str | None]:
    try:
        if threads:
            return art.to_ort(device=device, intra_op_threads=threads), None
        return art.to_ort(device=device), None
    except Exception as exc:  # noqa: BLE001
        return None, _backend_note("ort", exc)


def _to_torch(art: Any, *, trainable: bool, device: str) -> tuple[Any, str | None]:
    try:
        mod = art.to_torch(trainable=trainable)
        return mod.to(device), None
    except Exception as exc:  # noqa: BLE001
        return None, _backend_note("torch", exc)


def _first(out: Any) -> Any:
    """First output of a module: tensors pass through; tuples/lists/dicts give their first value."""
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _np(x: Any) -> np.ndarray:
    x = _first(x)
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    if hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    return np.asarray(x)


def _ort_variants(art: Any, inputs: dict[str, np.ndarray], ctx: SuiteContext) -> list[Variant]:
    """``ort_session`` (numpy in/out, ``session.run``) and ``ort_iobinding_bare`` (pre-bound buffers)."""
    from mmbridge.runtime.session import bare_runners

    run_session, run_bare, note = bare_runners(art.onnx_path, inputs, cuda=ctx.device.startswith("cuda"),
                                               threads=ctx.threads)
    if note:
        return [Variant("ort_session", None, note), Variant("ort_iobinding_bare", None, note)]
    return [Variant("ort_session", run_session, "numpy in/out (host copies on CUDA)"),
            Variant("ort_iobinding_bare", run_bare, "pre-bound OrtValues: ORT's floor")]


def _diff_notes(rows: list[Result], outputs: dict[str, Any], baseline: str) -> None:
    """Add ``extra.max_abs_diff`` (vs the baseline's output) to each row that produced one."""
    ref = outputs.get(baseline)
    if ref is None:
        return
    for r in rows:
        got = outputs.get(r.variant)
        if got is None or r.variant == baseline or r.status != "ok":
            continue
        try:
            a, b = _np(got), _np(ref)
            if a.shape == b.shape:
                r.extra["max_abs_diff"] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
            else:
                r.extra["shape_mismatch"] = f"{a.shape} vs {b.shape}"
        except Exception:  # noqa: BLE001 - a diff is a courtesy
            pass


def _once(fn: Callable[[], Any] | None) -> Any:
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # noqa: BLE001 - the harness reports the error itself
        return None


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------
def _export(ctx: SuiteContext, obj: Any, **kw: Any) -> tuple[Any, str | None]:
    import mmbridge

    try:
        return mmbridge.export(obj, cache_dir=ctx.cache_dir, **kw), None
    except Exception as exc:  # noqa: BLE001
        return None, f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _resize_tolerance() -> Any:
    from mmbridge.specs import Tolerance

    return Tolerance(2e-4, 1e-4, "bilinear resize: TF and ORT order the interpolation weights differently; "
                                 "up to 4.8e-5 measured on the normalised output (0-255 inputs / 255 / std)")


def _tf_image_fn(tf: Any, side_in: int, side_out: int) -> Any:
    """TF graph: uint8 ``[B, side_in, side_in, 3]`` -> float32 ``[B, 3, side_out, side_out]``."""
    mean_np, std_np = np.array(MEAN, np.float32), np.array(STD, np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, side_in, side_in, 3], tf.uint8, name="image")])
    def image_preprocess(image: Any) -> Any:
        x = tf.cast(image, tf.float32)
        x = tf.image.resize(x, (side_out, side_out), method="bilinear", antialias=False)
        x = (x / 255.0 - mean_np) / std_np
        return tf.transpose(x, (0, 3, 1, 2))

    return image_preprocess


def _tf_numeric_fn(tf: Any, feats: int, mu: np.ndarray, sd: np.ndarray) -> Any:
    """TF graph: float32 ``[B, feats]`` -> ``clip((x - mu) / sd, -5, 5)``."""

    @tf.function(input_signature=[tf.TensorSpec([None, feats], tf.float32, name="features")])
    def numeric_preprocess(features: Any) -> Any:
        return tf.clip_by_value((features - mu) / sd, -5.0, 5.0)

    return numeric_preprocess


def suite_preprocess(ctx: SuiteContext) -> list[Result]:
    """Preprocessing graphs: image resize + normalise, and numeric normalisation (see module doc)."""
    import torch
    import torch.nn.functional as F

    from mmbridge.specs import TensorSpec

    tf, tf_note = _tf(ctx)
    dev = torch.device(ctx.device)
    rows: list[Result] = []
    variants_all = ["tf", "ort_session", "ort_iobinding_bare", "ort_module", "torch_converted", "torch_native"]
    mean_t = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(STD, device=dev).view(1, 3, 1, 1)

    for batch, side_in, side_out in ctx.p["pre_image"]:
        case = f"image u8 NHWC {side_in}px -> {side_out}px norm NCHW, b{batch}"
        params = {"batch": batch, "input": [batch, side_in, side_in, 3], "output": [batch, 3, side_out, side_out]}
        rng = np.random.default_rng(0)
        x_np = rng.integers(0, 256, size=(batch, side_in, side_in, 3), dtype=np.uint8)
        x_t = torch.from_numpy(x_np).to(dev)

        def native(x_t: Any = x_t, side_out: int = side_out) -> Any:
            x = x_t.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(side_out, side_out), mode="bilinear", align_corners=False, antialias=False)
            return ((x / 255.0 - mean_t) / std_t).contiguous()

        variants: list[Variant] = []
        art = None
        if tf is None:
            variants += [Variant(v, None, tf_note or "") for v in variants_all[:5]]
        else:
            tf_pre = _tf_image_fn(tf, side_in, side_out)
            x_tf = tf.constant(x_np)
            variants.append(Variant("tf", lambda f=tf_pre, x=x_tf: f(x).numpy(), "tf.function, numpy out"))
            art, note = _export(ctx, tf_pre, name=f"bench_pre_image_{side_in}_{side_out}", role="preprocess",
                                input_specs=[TensorSpec("image", ("batch", side_in, side_in, 3), "uint8", "NHWC", (0, 255))],
                                tolerance=_resize_tolerance())
            variants += _bridge_variants(ctx, art, note, {"image": x_np}, x_t)
        variants.append(Variant("torch_native", native, "hand-written: permute, F.interpolate(bilinear), normalise"))
        outputs = {v.name: _once(v.fn) for v in variants if v.name != "ort_iobinding_bare"}
        r = measure_case("preprocess", case, variants, baseline="torch_native", items_per_call=batch,
                         config=ctx.config, params=params, log=ctx.log)
        _diff_notes(r, outputs, "torch_native")
        rows += r

    for batch, feats in ctx.p["pre_numeric"]:
        case = f"numeric [B,{feats}] norm + clip, b{batch}"
        params = {"batch": batch, "features": feats}
        rng = np.random.default_rng(1)
        x_np = rng.normal(3.0, 2.0, size=(batch, feats)).astype(np.float32)
        mu = rng.normal(3.0, 0.1, size=(feats,)).astype(np.float32)
        sd = rng.uniform(1.5, 2.5, size=(feats,)).astype(np.float32)
        x_t = torch.from_numpy(x_np).to(dev)
        mu_t, sd_t = torch.from_numpy(mu).to(dev), torch.from_numpy(sd).to(dev)
        variants = []
        art = None
        if tf is None:
            variants += [Variant(v, None, tf_note or "") for v in variants_all[:5]]
        else:
            tf_num = _tf_numeric_fn(tf, feats, mu, sd)

            x_tf = tf.constant(x_np)
            variants.append(Variant("tf", lambda f=tf_num, x=x_tf: f(x).numpy(), "tf.function, numpy out"))
            art, note = _export(ctx, tf_num, name=f"bench_pre_numeric_{feats}", role="preprocess",
                                input_specs=[TensorSpec("features", ("batch", feats), "float32", "NC")])
            variants += _bridge_variants(ctx, art, note, {"features": x_np}, x_t)
        variants.append(Variant("torch_native", lambda x=x_t, m=mu_t, s=sd_t: ((x - m) / s).clamp_(-5.0, 5.0),
                                "hand-written torch"))
        outputs = {v.name: _once(v.fn) for v in variants if v.name != "ort_iobinding_bare"}
        r = measure_case("preprocess", case, variants, baseline="torch_native", items_per_call=batch,
                         config=ctx.config, params=params, log=ctx.log)
        _diff_notes(r, outputs, "torch_native")
        rows += r
    for batch, feats in ctx.p.get("pre_numeric_us", []):
        rows += _numeric_us_cases(ctx, tf, tf_note, batch, feats)
    if ctx.p.get("pipeline"):
        rows += _pipeline_case(ctx, tf, tf_note, **ctx.p["pipeline"])
    return rows


def _pipeline_jpegs(ctx: SuiteContext, n: int, side: int) -> list[Path]:
    """``n`` deterministic ``side`` x ``side`` 4:2:0 JPEGs (quality 90) under the cache dir, made once."""
    import io

    from PIL import Image

    folder = ctx.cache_dir / f"pipeline_jpegs_{n}_{side}"
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for p in paths:  # smooth colour fields plus noise: compressible like photos, not like flat colour
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] for k in range(3)], -1) * 160
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90, subsampling=2)
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, p)
    return paths


def _pipeline_case(ctx: SuiteContext, tf: Any, tf_note: str | None, *, images: int, side: int, out: int,
                   batch: int) -> list[Result]:
    """Issue 16: one epoch of JPEG files -> decode -> batched preprocessing, mmbridge vs tf.data.

    Same files, same preprocessing graph (:func:`_tf_image_fn`: bilinear resize ``side`` ->
    ``out`` and normalisation, NHWC uint8 -> NCHW float32, applied once per batch), same
    parallelism ``P`` (``ctx.threads``, else the CPU count):

    * ``tf_data`` (**baseline**): ``from_tensor_slices(paths).map(read_file + decode_jpeg,
      num_parallel_calls=P).batch(B).map(graph).prefetch(2)``, a private thread pool of ``P``,
      each batch read out with ``.numpy()``;
    * ``mmbridge_loader_ort``: :func:`mmbridge.data.images.image_loader` (``P`` decoding worker
      processes, persistent, forkserver; libjpeg-turbo with TF's IDCT) feeding the bridged graph
      on the ORT module (``P`` intra-op threads);
    * ``mmbridge_loader_torch``: the same loader feeding ``to_torch()`` of the same artifact.

    One call is one epoch (``images`` images); ``extra.throughput_vs_tf_data`` = tf.data's epoch
    time / this variant's (the goal is >= 1.0). ``extra.max_abs_diff`` compares the epoch's
    outputs with tf.data's (the decoders are bit-exact, so only the graph's rounding remains).
    """
    import torch

    from mmbridge.specs import TensorSpec

    par = ctx.threads or (os.cpu_count() or 1)
    case = f"input pipeline {images} JPEGs {side}px -> {out}px, b{batch}, {par} workers"
    params = {"images": images, "side": side, "out": out, "batch": batch, "parallelism": par}
    names = ["tf_data", "mmbridge_loader_ort", "mmbridge_loader_torch"]
    if tf is None:
        return skipped_case("preprocess", case, names, "tf_data", tf_note or "TensorFlow unavailable", params=params)
    paths = _pipeline_jpegs(ctx, images, side)
    tf_pre = _tf_image_fn(tf, side, out)
    art, note = _export(ctx, tf_pre, name=f"bench_pre_image_{side}_{out}", role="preprocess",
                        input_specs=[TensorSpec("image", ("batch", side, side, 3), "uint8", "NHWC", (0, 255))],
                        tolerance=_resize_tolerance())
    options = tf.data.Options()
    options.threading.private_threadpool_size = par
    options.deterministic = True
    ds = (tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
          .map(lambda f: tf.io.decode_jpeg(tf.io.read_file(f), channels=3), num_parallel_calls=par)
          .batch(batch).map(tf_pre).prefetch(2).with_options(options))

    def tf_epoch() -> Any:
        return [b.numpy() for b in ds]

    variants = [Variant("tf_data", tf_epoch, "tf.data: parallel decode_jpeg (default IDCT), batch, graph, prefetch")]
    if art is None:
        variants += [Variant(n, None, note or "") for n in names[1:]]
    else:
        from mmbridge.data.images import image_loader

        loader = image_loader(paths, batch_size=batch, num_workers=par, multiprocessing_context="forkserver",
                              pin_memory=ctx.device.startswith("cuda"))
        dev = torch.device(ctx.device)
        ort_mod, ort_note = _to_ort(art, ctx.device, ctx.threads)
        tmod, t_note = _to_torch(art, trainable=False, device=ctx.device)

        def loader_epoch(mod: Any) -> Any:
            with torch.no_grad():
                return [mod(b.to(dev, non_blocking=True)) for b in loader]

        for name, mod, why in (("mmbridge_loader_ort", ort_mod, ort_note), ("mmbridge_loader_torch", tmod, t_note)):
            variants.append(Variant(name, None if mod is None else (lambda m=mod: loader_epoch(m)),
                                    why or f"image_loader ({par} worker processes) + bridged graph per batch"))
    outputs = {}
    for v in variants:
        got = _once(v.fn)
        if got is not None:
            outputs[v.name] = np.concatenate([_np(b) for b in got])
    rows = measure_case("preprocess", case, variants, baseline="tf_data", items_per_call=images, config=ctx.config,
                        params=params, log=ctx.log)
    _diff_notes(rows, outputs, "tf_data")
    for r in rows:
        if r.ratio:
            r.extra["throughput_vs_tf_data"] = round(1.0 / r.ratio, 3)
    return rows


def _unfused_to_torch(art: Any, *, trainable: bool, device: str) -> tuple[Any, str | None]:
    """``to_torch`` with mmbridge's post-conversion fusions switched off (the before of the fusion rows)."""
    from mmbridge.convert import fusions

    orig = fusions.run_all
    fusions.run_all = lambda gm: {}
    try:
        return _to_torch(art, trainable=trainable, device=device)
    finally:
        fusions.run_all = orig


def _no_embedding_fusion_to_torch(art: Any, *, trainable: bool, device: str) -> tuple[Any, str | None]:
    """``to_torch`` without :func:`mmbridge.convert.fusions.fuse_embedding_lookup` (every other fusion on)."""
    from mmbridge.convert import fusions

    orig = fusions.fuse_embedding_lookup
    fusions.fuse_embedding_lookup = lambda gm: 0
    try:
        return _to_torch(art, trainable=trainable, device=device)
    finally:
        fusions.fuse_embedding_lookup = orig


_US_BLOCK = 100  # calls per timed call in _numeric_us_cases


def _us_block(fn: Callable[[], Any], k: int = _US_BLOCK) -> Callable[[], Any]:
    """``fn`` called ``k`` times per call (returns the last result): one timed unit of ~1 ms."""
    def block() -> Any:
        out = None
        for _ in range(k):
            out = fn()
        return out

    return block

def _no_pad_conv_to_torch(art: Any, *, trainable: bool, device: str) -> tuple[Any, str | None]:
    """``to_torch`` without :func:`mmbridge.convert.fusions.fuse_pad_conv` (the before of the
    zero-Pad + Conv rows: the padded copy saved for backward, held whole in a no-grad forward)."""
    from mmbridge.convert import fusions

    orig = fusions.fuse_pad_conv
    fusions.fuse_pad_conv = lambda gm: 0
    try:
        return _to_torch(art, trainable=trainable, device=device)
    finally:
        fusions.fuse_pad_conv = orig


def _pad_conv_count(mod: Any) -> int:
    return int(getattr(mod, "mmbridge_fusions", {}).get("pad_conv", 0))


def _numeric_us_cases(ctx: SuiteContext, tf: Any, tf_note: str | None, batch: int, feats: int) -> list[Result]:
    """Issue 16 goals on a microsecond graph (``clip((x - mu) / sd, -5, 5)``, ``[64, 6]``).

    The graph is exported here (TensorFlow), then measured twice by :func:`numeric_us_rows`:
    in a child process that never imports TensorFlow (``python -m mmbridge.bench.us_graph``;
    the goal rows, under the plain case names: a training process reads prepared artifacts
    without TF, ``mmbridge prepare``), and in this process, where TensorFlow is loaded (case
    names ending in ``[TensorFlow in the process]``): with TF in the process every call on
    this graph measured 1.5-3x slower here, and the Python-heavy ones more (docs/benchmarks.md).
    """
    from mmbridge.specs import TensorSpec

    rng = np.random.default_rng(1)
    x_np = rng.normal(3.0, 2.0, size=(batch, feats)).astype(np.float32)
    mu = rng.normal(3.0, 0.1, size=(feats,)).astype(np.float32)
    sd = rng.uniform(1.5, 2.5, size=(feats,)).astype(np.float32)
    art, note = (None, tf_note) if tf is None else _export(
        ctx, _tf_numeric_fn(tf, feats, mu, sd), name=f"bench_pre_numeric_{feats}_us", role="preprocess",
        input_specs=[TensorSpec("features", ("batch", feats), "float32", "NC")])
    if art is None:
        return numeric_us_rows(ctx, None, note, x_np, mu, sd)
    ctx.log(f"  numeric [B,{feats}] b{batch}: child process (no TensorFlow)")
    child = us_graph_child_rows(ctx, art, x_np, mu, sd)
    here = numeric_us_rows(ctx, art, note, x_np, mu, sd, suffix=US_TF_SUFFIX)
    for r in here:
        r.extra["tensorflow_loaded"] = "tensorflow" in sys.modules
    return child + here


US_TF_SUFFIX = " [TensorFlow in the process]"
"""Case-name suffix of the microsecond-graph rows measured in the bench's own process (TF loaded)."""

US_CASES = ("ORT module vs bare IO binding", "converted vs hand-written torch")
US_ORT_VARIANTS = ("ort_iobinding_floor", "ort_iobinding_bare", "ort_module", "ort_module_no_grad")
US_TORCH_VARIANTS = ("torch_converted", "torch_converted_unfused", "torch_native")


def us_graph_child_rows(ctx: SuiteContext, art: Any, x_np: np.ndarray, mu: np.ndarray, sd: np.ndarray, *,
                        timeout_s: float = 600.0) -> list[Result]:
    """:func:`numeric_us_rows` of ``art`` in a child process without TensorFlow
    (``python -m mmbridge.bench.us_graph``; see that module); ``status="skipped"`` rows saying why
    when the child fails."""
    batch, feats = x_np.shape
    names = [f"numeric [B,{feats}] norm + clip, b{batch}: {c}" for c in US_CASES]
    with tempfile.TemporaryDirectory() as tmpdir:
        data, out = Path(tmpdir) / "data.npz", Path(tmpdir) / "rows.json"
        np.savez(data, x=x_np, mu=mu, sd=sd)
        cmd = [sys.executable, "-m", "mmbridge.bench.us_graph", "--artifact", str(art.path), "--data", str(data),
               "--device", ctx.device, "--threads", str(ctx.threads or 0), "--harness", json.dumps(ctx.config.to_dict()),
               "--out", str(out)]
        why = ""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            if proc.returncode != 0 or not out.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                why = f"microsecond-graph child failed (exit {proc.returncode}): {tail[0][:300]}"
        except subprocess.TimeoutExpired:
            why = f"microsecond-graph child killed after {timeout_s:.0f} s"
        if why:
            return (skipped_case("preprocess", names[0], US_ORT_VARIANTS, "ort_iobinding_floor", why)
                    + skipped_case("preprocess", names[1], US_TORCH_VARIANTS, "torch_native", why))
        return [Result.from_dict(d) for d in json.loads(out.read_text())]


def numeric_us_rows(ctx: SuiteContext, art: Any, note: str | None, x_np: np.ndarray, mu: np.ndarray, sd: np.ndarray,
                    *, suffix: str = "") -> list[Result]:
    """The two microsecond-graph cases of issue 16 on an exported ``clip((x - mu) / sd, -5, 5)``.

    * ``ORT module vs bare IO binding``: ``to_ort()`` module vs a bare ``run_with_iobinding`` on
      pre-bound OrtValues (goal <= 1.5x). The baseline ``ort_iobinding_floor`` is the pybind call
      (``sess._sess.run_with_iobinding``), the honest floor; ``ort_iobinding_bare`` the same
      through the public ``InferenceSession`` wrapper; ``ort_module`` is a plain call (no ``no_grad``
      wrapper: nothing requires grad), ``ort_module_no_grad`` the same inside ``torch.no_grad()``.
    * ``converted vs hand-written torch``: ``to_torch`` (fused, and with the fusions off) vs the
      hand-written torch expression (goal <= 2x); all inside ``torch.no_grad()``.

    Each timed call is a block of ``_US_BLOCK`` calls (``items_per_call`` counts them), so that
    the harness calibrates the calls per repetition on ~1 ms instead of one microsecond call (a
    single call descheduled on a loaded machine made it pick 3 calls per repetition), and at
    least 15 interleaved rounds are run (cheap here) instead of the suite's 5.

    Args:
        ctx: the suite context (device, threads, harness settings, log).
        art: the exported graph (``None``: both cases are skipped rows with ``note``).
        x_np: float32 ``[B, F]`` features; ``mu``, ``sd``: float32 ``[F]``, the graph's constants.
        suffix: appended to both case names.
    """
    import torch

    dev = torch.device(ctx.device)
    batch, feats = x_np.shape
    x_t = torch.from_numpy(x_np).to(dev)
    mu_t, sd_t = torch.from_numpy(mu).to(dev), torch.from_numpy(sd).to(dev)
    params = {"batch": batch, "features": feats, "calls_per_timed_call": _US_BLOCK}
    cfg = dataclasses.replace(ctx.config, repeats=max(ctx.config.repeats, 15))
    case_ort = f"numeric [B,{feats}] norm + clip, b{batch}: {US_CASES[0]}{suffix}"
    case_t = f"numeric [B,{feats}] norm + clip, b{batch}: {US_CASES[1]}{suffix}"
    rows: list[Result] = []
    if art is None:
        rows += skipped_case("preprocess", case_ort, ["ort_iobinding_floor", "ort_iobinding_bare", "ort_module",
                                                      "ort_module_no_grad"],
                             "ort_iobinding_floor", note or "export failed")
        vt: list[Variant] = [Variant("torch_converted", None, note or ""), Variant("torch_converted_unfused", None, note or "")]
    else:
        vo = [v for v in _ort_variants(art, {"features": x_np}, ctx) if v.name == "ort_iobinding_bare"]
        floor = getattr(vo[0].fn, "floor", None) if vo and vo[0].fn is not None else None
        if vo and vo[0].fn is not None:
            vo[0] = Variant(vo[0].name, _us_block(vo[0].fn), vo[0].note)
        vo.insert(0, Variant("ort_iobinding_floor", None if floor is None else _us_block(floor), "the same pre-bound run as the pybind call (no public "
                             "wrapper frame): the floor" if floor is not None else (vo[0].note if vo else "no bare runner")))
        ort_mod, onote = _to_ort(art, ctx.device, ctx.threads)
        if ort_mod is None:
            vo += [Variant("ort_module", None, onote or ""), Variant("ort_module_no_grad", None, onote or "")]
        else:
            def ort_plain(m: Any = ort_mod) -> Any:
                return m(x_t)

            def ort_ng(m: Any = ort_mod) -> Any:
                with torch.no_grad():
                    return m(x_t)

            vo += [Variant("ort_module", _us_block(ort_plain), "to_ort(), plain call (outputs do not require grad); goal <= 1.5x"),
                   Variant("ort_module_no_grad", _us_block(ort_ng), "the same inside torch.no_grad()")]
        rows += measure_case("preprocess", case_ort, vo, baseline="ort_iobinding_floor", items_per_call=batch * _US_BLOCK,
                             config=cfg, params=params, log=ctx.log)
        vt = []
        for name, conv, what in (("torch_converted", _to_torch, "to_torch(trainable=False), fused; goal <= 2x"),
                                 ("torch_converted_unfused", _unfused_to_torch, "the same with the fusions off")):
            mod, tnote = conv(art, trainable=False, device=ctx.device)
            if mod is None:
                vt.append(Variant(name, None, tnote or ""))
                continue

            mod.eval()

            def run(m: Any = mod) -> Any:
                with torch.no_grad():
                    return m(x_t)

            vt.append(Variant(name, _us_block(run), what))

    def native(x: Any = x_t, m: Any = mu_t, s_: Any = sd_t) -> Any:
        with torch.no_grad():
            return ((x - m) / s_).clamp_(-5.0, 5.0)

    vt.append(Variant("torch_native", _us_block(native), "hand-written torch"))
    outputs = {v.name: _once(v.fn) for v in vt}
    r = measure_case("preprocess", case_t, vt, baseline="torch_native", items_per_call=batch * _US_BLOCK,
                     config=cfg, params=params, log=ctx.log)
    _diff_notes(r, outputs, "torch_converted_unfused")  # fused vs unfused: 0 = the same values
    for row in r:
        if "max_abs_diff" in row.extra:
            row.extra["max_abs_diff_vs_unfused"] = row.extra.pop("max_abs_diff")
    return rows + r


def _bridge_variants(ctx: SuiteContext, art: Any, export_note: str | None, feeds: dict[str, np.ndarray],
                     x_t: Any) -> list[Variant]:
    """ORT session, bare IO binding, ORT module and converted torch (forward, no grad) for one artifact."""
    import torch

    names = ["ort_session", "ort_iobinding_bare", "ort_module", "torch_converted"]
    if art is None:
        return [Variant(n, None, export_note or "export failed") for n in names]
    out = _ort_variants(art, feeds, ctx)
    ort_mod, note = _to_ort(art, ctx.device, ctx.threads)
    if ort_mod is None:
        out.append(Variant("ort_module", None, note or ""))
    else:
        def run_ort_mod(m: Any = ort_mod) -> Any:
            with torch.no_grad():
                return m(x_t)

        out.append(Variant("ort_module", run_ort_mod, "to_ort(): torch in/out, IO binding"))
    tmod, note = _to_torch(art, trainable=False, device=ctx.device)
    if tmod is None:
        out.append(Variant("torch_converted", None, note or ""))
    else:
        tmod.eval()

        def run_tmod(m: Any = tmod) -> Any:
            with torch.no_grad():
                return m(x_t)

        out.append(Variant("torch_converted", run_tmod, "to_torch(trainable=False), eval, no_grad"))
    return out


# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------
# pooled feature width of each benchmark encoder (its Keras twin: mmbridge.baselines.bench_models)
FEATURES = {"small_cnn": 32, "mobilenet_v2": 1280, "resnet50": 2048, "efficientnet_b0": 1280}


def _native_twin(kind: str) -> tuple[Any, str | None]:
    """The same architecture written natively in torch (NCHW in, ``[B, FEATURES[kind]]`` out)."""
    import torch
    from torch import nn

    if kind == "small_cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=1e-3, momentum=0.01), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32, eps=1e-3, momentum=0.01), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32),
        ), None
    try:
        import torchvision
    except ImportError as exc:
        return None, f"torchvision unavailable: {exc}"
    if kind == "mobilenet_v2":
        m = torchvision.models.mobilenet_v2(weights=None)
        return nn.Sequential(m.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()), None
    if kind == "resnet50":
        m = torchvision.models.resnet50(weights=None)
        m.fc = nn.Identity()
        return m, None
    return torch.nn.Identity(), f"no twin for {kind}"


def _encoder_artifacts(ctx: SuiteContext, tf: Any, kind: str, side: int, trainable: bool) -> tuple[Any, Any, str | None]:
    """(keras model, artifact or None, note) for ``kind`` at ``side`` px; memoised per run."""
    from mmbridge.specs import TensorSpec

    key = f"enc:{kind}:{side}:{trainable}"
    if key not in ctx._memo:
        mkey = f"keras:{kind}:{side}"
        if mkey not in ctx._memo:
            from mmbridge.baselines.bench_models import keras_model

            ctx._memo[mkey] = keras_model(kind, side)
        model = ctx._memo[mkey]
        art, note = _export(ctx, model, name=f"bench_{kind}_{side}{'_trainable' if trainable else ''}",
                            input_specs=[TensorSpec("image", ("batch", side, side, 3), "float32", "NHWC")],
                            inputs_as_nchw=["image"], trainable=trainable)
        ctx._memo[key] = (model, art, note)
    return ctx._memo[key]


def _no_pad_conv_variant(ctx: SuiteContext, art: Any, x_t: Any) -> list[Variant]:
    """``torch_converted_no_pad_conv`` (forward, no grad), only where ``fuse_pad_conv`` rewrote a conv."""
    import torch

    if art is None:
        return []
    mod, _ = _no_pad_conv_to_torch(art, trainable=False, device=ctx.device)
    fused, _ = _to_torch(art, trainable=False, device=ctx.device)
    n = _pad_conv_count(fused)
    if mod is None or not n:
        return []
    mod.eval()

    def run(m: Any = mod) -> Any:
        with torch.no_grad():
            return m(x_t)

    return [Variant("torch_converted_no_pad_conv", run, f"the same without fuse_pad_conv ({n} convs), eval, no_grad")]


def suite_encoders(ctx: SuiteContext) -> list[Result]:
    """Encoders forward and training step: TF vs ORT vs converted vs native twin (see module doc)."""
    import torch

    tf, tf_note = _tf(ctx)
    dev = torch.device(ctx.device)
    rows: list[Result] = []
    for kind, batch, side in ctx.p["encoders"]:
        case = f"{kind} forward b{batch} {side}px"
        params = {"model": kind, "batch": batch, "side": side, "mode": "forward"}
        rng = np.random.default_rng(0)
        x_nhwc = rng.uniform(-1, 1, size=(batch, side, side, 3)).astype(np.float32)
        x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
        x_t = torch.from_numpy(x_nchw).to(dev)
        variants: list[Variant] = []
        if tf is None:
            variants += [Variant(v, None, tf_note or "") for v in
                         ("tf", "ort_session", "ort_iobinding_bare", "ort_module", "torch_converted")]
        else:
            model, art, note = _encoder_artifacts(ctx, tf, kind, side, trainable=False)
            fwd = tf.function(lambda x, m=model: m(x, training=False))
            x_tf = tf.constant(x_nhwc)
            variants.append(Variant("tf", lambda f=fwd, x=x_tf: f(x).numpy(), "tf.function(model), numpy out"))
            variants += _bridge_variants(ctx, art, note, {"image": x_nchw}, x_t)
            variants += _no_pad_conv_variant(ctx, art, x_t)
        twin, twin_note = _native_twin(kind)
        if twin is None:
            variants.append(Variant("torch_native", None, twin_note or ""))
        else:
            twin = twin.to(dev).eval()

            def run_twin(m: Any = twin, x: Any = x_t) -> Any:
                with torch.no_grad():
                    return m(x)

            variants.append(Variant("torch_native", run_twin, "native twin (own random weights), eval, no_grad"))
        outputs = {v.name: _once(v.fn) for v in variants if v.name in ("tf", "ort_session", "ort_module", "torch_converted")}
        r = measure_case("encoders", case, variants, baseline="torch_native", items_per_call=batch,
                         config=ctx.config, params=params, log=ctx.log)
        _diff_notes(r, outputs, "tf")  # bridged outputs vs TF (the twin has other weights)
        for row in r:
            if "max_abs_diff" in row.extra:
                row.extra["max_abs_diff_vs_tf"] = row.extra.pop("max_abs_diff")
        rows += r

    for kind, batch, side in ctx.p["train_encoders"]:
        rows += _train_case(ctx, tf, tf_note, kind, batch, side)
    for batch in ctx.p.get("transformer", []):
        rows += _transformer_case(ctx, tf, tf_note, batch)
    for kind, batch, side, mode in ctx.p.get("keras_torch", []):
        rows += _keras_torch_case(ctx, tf, tf_note, kind, batch, side, mode)
    return rows


KERAS_TORCH_VARIANTS = ("keras_torch_backend", "torch_converted", "torch_native")
"""The rows of :mod:`mmbridge.bench.keras_torch`'s child (baseline ``torch_native``)."""


def keras_torch_rows(*, keras_model: Any, keras_path: Path, artifact: Any, kind: str, batch: int, side: int,
                     mode: str, config: HarnessConfig, threads: int | None, timeout_s: float = 600.0) -> list[Result]:
    """Save ``keras_model`` to ``keras_path`` (once) and time it on Keras's torch backend in a child
    process (``python -m mmbridge.bench.keras_torch``, ``KERAS_BACKEND=torch``; see that module).

    Args:
        keras_model: the Keras 3 model the artifact was exported from (saved with ``model.save``
            to ``keras_path``, replacing what is there).
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
    try:  # saved on every call: the file must hold this run's weights, the ones the artifact was exported from
        keras_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = keras_path.with_name(keras_path.stem + ".tmp.keras")
        keras_model.save(tmp)
        os.replace(tmp, keras_path)
    except Exception as exc:  # noqa: BLE001 - a model Keras cannot save: the variant is skipped, with the reason
        return skipped_case("encoders", case, KERAS_TORCH_VARIANTS, "torch_native", f"model.save failed: {type(exc).__name__}: {exc}")
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
            return skipped_case("encoders", case, KERAS_TORCH_VARIANTS, "torch_native", f"child killed after {timeout_s:.0f} s")
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return skipped_case("encoders", case, KERAS_TORCH_VARIANTS, "torch_native",
                                f"Keras torch-backend child failed (exit {proc.returncode}): {tail[0][:300]}")
        return [Result.from_dict(d) for d in json.loads(out.read_text())]


def _keras_torch_case(ctx: SuiteContext, tf: Any, tf_note: str | None, kind: str, batch: int, side: int,
                      mode: str) -> list[Result]:
    """Keras 3 on its torch backend vs the converted bridge vs the native twin, one child process
    loading the same ``.keras`` file (:mod:`mmbridge.bench.keras_torch`)."""
    case = f"{kind} {'train step' if mode == 'train' else 'forward'} b{batch} {side}px: Keras on torch"
    if tf is None:
        return skipped_case("encoders", case, KERAS_TORCH_VARIANTS, "torch_native", tf_note or "TensorFlow unavailable")
    if ctx.device != "cpu":
        return skipped_case("encoders", case, KERAS_TORCH_VARIANTS, "torch_native", "the Keras torch-backend child runs on CPU only")
    model, art, _note = _encoder_artifacts(ctx, tf, kind, side, trainable=mode == "train")
    ctx.log(f"  {case}: child process (KERAS_BACKEND=torch)")
    return keras_torch_rows(keras_model=model, keras_path=ctx.cache_dir / "keras_torch" / f"{kind}_{side}.keras",
                            artifact=art, kind=kind, batch=batch, side=side, mode=mode, config=ctx.config,
                            threads=ctx.threads)


_TX = {"vocab": 1000, "seq": 32, "dim": 64, "heads": 4, "ffn": 128}  # as benchmarks/bench_torch.py


def _keras_tiny_transformer(tf: Any) -> Any:
    """Embedding + one post-LN encoder block (Keras MultiHeadAttention, exact GELU) + mean + Dense(10)."""
    keras = tf.keras
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


def _transformer_case(ctx: SuiteContext, tf: Any, tf_note: str | None, batch: int) -> list[Result]:
    """Issue 16: converted tiny Transformer forward vs its native twin (goal <= 1.10x), fused and
    with the fusions off, in one run; plus the tensor memory of forward and train step."""
    import torch

    from mmbridge.specs import TensorSpec

    dev = torch.device(ctx.device)
    case = f"tiny_transformer forward b{batch} seq{_TX['seq']}"
    params = {"model": "tiny_transformer", "batch": batch, **_TX, "mode": "forward"}
    x_t = torch.randint(0, _TX["vocab"], (batch, _TX["seq"]), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(0)).to(dev)
    twin = _torch_tiny_transformer().to(dev).eval()
    variants: list[Variant] = []
    mods: dict[str, Any] = {}
    if tf is None:
        art, note = None, tf_note
    else:
        art, note = _export(ctx, _keras_tiny_transformer(tf), name="bench_tiny_transformer", trainable=True,
                            input_specs=[TensorSpec("tokens", ("batch", _TX["seq"]), "int32",
                                                    value_range=(0, _TX["vocab"] - 1))])
    for name, conv, what in (("torch_converted", _to_torch, "to_torch(trainable=True), fused, eval, no_grad; goal <= 1.10x"),
                             ("torch_converted_no_embedding_fusion", _no_embedding_fusion_to_torch,
                              "the same without fusions.fuse_embedding_lookup (onnx2torch's Gather + Keras's negative-id wrap)"),
                             ("torch_converted_unfused", _unfused_to_torch, "the same with the fusions off")):
        mod, tnote = (None, note) if art is None else conv(art, trainable=True, device=ctx.device)
        if mod is None:
            variants.append(Variant(name, None, tnote or "export failed"))
            continue
        mods[name] = mod.eval()

        def run(m: Any = mod) -> Any:
            with torch.no_grad():
                return m(x_t)

        extra = f"; fusions {getattr(mod, 'mmbridge_fusions', {})}" if name == "torch_converted" else ""
        variants.append(Variant(name, run, what + extra))

    def run_twin(m: Any = twin) -> Any:
        with torch.no_grad():
            return m(x_t)

    variants.append(Variant("torch_native", run_twin, "nn.TransformerEncoderLayer twin (own weights), eval, no_grad"))
    rows = measure_case("encoders", case, variants, baseline="torch_native", items_per_call=batch,
                        config=ctx.config, params=params, log=ctx.log)
    if mods:
        # the twin's eval no-grad forward is one fused kernel whose tensors tensor_memory cannot see;
        # torch_native_op_by_op is the same twin with that fast path off (memory rows only)
        rows += _memory_rows(ctx, "tiny_transformer", {**mods, "torch_native": twin,
                                                       "torch_native_op_by_op": _NoMHAFastPath(twin)}, x_t, batch)
    return rows


def _NoMHAFastPath(module: Any) -> Any:  # noqa: N802  (a class factory: torch is imported lazily)
    """``module`` called with ``torch.backends.mha`` fast path off (``nn.TransformerEncoderLayer``
    then runs op by op, each tensor visible to :func:`mmbridge.bench.harness.tensor_memory`)."""
    import torch
    from torch import nn

    class NoFastPath(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return self.inner(*args)
            finally:
                torch.backends.mha.set_fastpath_enabled(before)

    return NoFastPath(module)


def _memory_rows(ctx: SuiteContext, kind: str, models: dict[str, Any], x: Any, batch: int) -> list[Result]:
    """Tensor memory (:func:`mmbridge.bench.harness.tensor_memory`) of a no-grad forward and of a
    train step (forward, mean-square loss, backward) per model, as rows whose ``ratio`` is the
    peak-live ratio against ``torch_native`` (memory, not time: measured once, deterministic)."""
    import torch

    from mmbridge.bench.harness import tensor_memory

    rows: list[Result] = []
    for mode in ("no-grad forward", "train step"):
        case = f"{kind} {mode} memory b{batch}"
        got: dict[str, dict[str, float]] = {}
        for name, m in models.items():
            def call(m: Any = m, mode: str = mode) -> None:
                if mode == "train step":
                    m.train()
                    _first(m(x)).float().pow(2).mean().backward()
                else:
                    m.eval()
                    with torch.no_grad():
                        m(x)

            call()  # warm-up (lazy state)
            m.zero_grad(set_to_none=True)
            got[name] = tensor_memory(call, params=list(m.parameters()))
            m.zero_grad(set_to_none=True)
            m.eval()
        base = got.get("torch_native", {}).get("peak_live_mib") or None
        for name, mem in got.items():
            ratio = round(mem["peak_live_mib"] / base, 3) if base else None
            note = (f"tensor memory: peak live {mem['peak_live_mib']:.3g} MiB"
                    f"{f' ({ratio:.2f}x native)' if ratio is not None else ''}, saved for backward "
                    f"{mem['saved_for_backward_mib']:.3g} MiB; goal <= 1.2x")
            rows.append(Result("encoders", case, name, "torch_native", note=note,
                               items_per_call=batch, ratio=ratio, peak_py_mib=None,
                               params={"model": kind, "batch": batch, "mode": mode}, extra=dict(mem)))
    return rows


def _torch_train_step(module: Any, head: Any, x: Any, y: Any, *, autocast: Any = None, scaler: Any = None) -> Callable[[], Any]:
    """A closure doing forward, cross-entropy, backward and an SGD step (lr 0.01) on ``module`` + ``head``."""
    import torch

    params = [p for p in list(module.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    ctx_fn = autocast or contextlib.nullcontext

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with ctx_fn():
            logits = head(_first(module(x)))
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    step.n_params = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def _train_case(ctx: SuiteContext, tf: Any, tf_note: str | None, kind: str, batch: int, side: int) -> list[Result]:
    import torch

    dev = torch.device(ctx.device)
    case = f"{kind} train step b{batch} {side}px"
    params = {"model": kind, "batch": batch, "side": side, "mode": "train", "optimizer": "SGD lr 0.01", "classes": 10}
    rng = np.random.default_rng(0)
    x_nhwc = rng.uniform(-1, 1, size=(batch, side, side, 3)).astype(np.float32)
    y_np = rng.integers(0, 10, size=(batch,)).astype(np.int64)
    x_t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dev)
    y_t = torch.from_numpy(y_np).to(dev)
    feat = FEATURES[kind]
    variants: list[Variant] = []
    art = tmod = before = None
    if tf is None:
        variants += [Variant("tf", None, tf_note or ""), Variant("torch_converted", None, tf_note or "")]
    else:
        model, art, note = _encoder_artifacts(ctx, tf, kind, side, trainable=True)
        # a separate Keras copy so that training it does not change what other cases measure
        from mmbridge.baselines.bench_models import keras_train_step

        tf_step = keras_train_step(kind, side, feat, classes=10, lr=0.01, seed=1)

        x_tf, y_tf = tf.constant(x_nhwc), tf.constant(y_np)
        variants.append(Variant("tf", lambda: tf_step(x_tf, y_tf).numpy(), "Keras GradientTape + SGD in tf.function"))
        if art is None:
            variants.append(Variant("torch_converted", None, note or ""))
        else:
            tmod, tnote = _to_torch(art, trainable=True, device=ctx.device)
            if tmod is None:
                variants.append(Variant("torch_converted", None, tnote or ""))
            else:
                tmod.train()
                step = _torch_train_step(tmod, torch.nn.Linear(feat, 10).to(dev), x_t, y_t)
                variants.append(Variant("torch_converted", step, f"to_torch(trainable=True), {step.n_params:,} trainable params"))
                if _pad_conv_count(tmod):
                    before, _ = _no_pad_conv_to_torch(art, trainable=True, device=ctx.device)
                    if before is not None:
                        before.train()
                        bstep = _torch_train_step(before, torch.nn.Linear(feat, 10).to(dev), x_t, y_t)
                        variants.append(Variant("torch_converted_no_pad_conv", bstep,
                                                f"the same without fuse_pad_conv ({_pad_conv_count(tmod)} convs)"))
    twin, twin_note = _native_twin(kind)
    if twin is None:
        variants.append(Variant("torch_native", None, twin_note or ""))
    else:
        twin = twin.to(dev).train()
        step = _torch_train_step(twin, torch.nn.Linear(feat, 10).to(dev), x_t, y_t)
        variants.append(Variant("torch_native", step, f"native twin, {step.n_params:,} trainable params"))
    rows = measure_case("encoders", case, variants, baseline="torch_native", items_per_call=batch,
                        config=ctx.config, params=params, log=ctx.log)
    if tf is not None and art is not None and twin is not None and tmod is not None:
        mems = {"torch_converted": tmod, "torch_native": twin}
        if before is not None:
            mems["torch_converted_no_pad_conv"] = before
        rows += _memory_rows(ctx, kind, mems, x_t, batch)
    return rows


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def suite_cache(ctx: SuiteContext) -> list[Result]:
    """Cold export vs cache-hit ``export`` vs ``BridgeArtifact.load`` per model (see module doc)."""
    import mmbridge
    from mmbridge.specs import TensorSpec

    tf, tf_note = _tf(ctx)
    rows: list[Result] = []
    cfg = dataclasses.replace(ctx.config, warmup=1, repeats=min(ctx.config.repeats, 3 if ctx.size == "full" else 2), min_repeats=2,
                              min_rep_s=0.0, max_case_s=max(ctx.config.max_case_s, 120.0), memory=False)
    names = ["export_cold", "export_cache_hit", "artifact_load"]
    for kind, side in ctx.p["cache"]:
        case = f"{kind} {side}px export"
        params = {"model": kind, "side": side}
        if tf is None:
            rows += skipped_case("cache", case, names, "export_cold", tf_note or "", params)
            continue
        try:
            from mmbridge.baselines.bench_models import keras_model

            model = keras_model(kind, side)
        except Exception as exc:  # noqa: BLE001 - one model must not stop the suite
            rows += skipped_case("cache", case, names, "export_cold", f"cannot build {kind}: {type(exc).__name__}: {exc}",
                                 params)
            continue
        specs = [TensorSpec("image", ("batch", side, side, 3), "float32", "NHWC")]
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=ctx.cache_dir))
        kw = dict(input_specs=specs, name=f"bench_cache_{kind}_{side}", cache_dir=cache, inputs_as_nchw=["image"])
        state: dict[str, Any] = {}

        def cold(model: Any = model, kw: dict = kw, state: dict = state) -> Any:
            art = mmbridge.export(model, force=True, **kw)
            state["path"] = art.path  # the warm-up of this variant runs first and creates the entry
            return art

        variants = [
            Variant("export_cold", cold, "export(force=True): trace, tf2onnx, checks, optimiser passes, parity, write"),
            Variant("export_cache_hit", lambda model=model, kw=kw: mmbridge.export(model, **kw),
                    "export() again: fingerprint (weights + config) + load"),
            Variant("artifact_load", lambda state=state: mmbridge.load_artifact(state["path"]),
                    "BridgeArtifact.load(path) with sha256 check"),
        ]
        r = measure_case("cache", case, variants, baseline="export_cold", items_per_call=0, config=cfg, params=params,
                         log=ctx.log)
        for row in r:
            if row.variant == "export_cache_hit" and row.timing is not None:
                row.extra["goal_hit_under_1s"] = bool(row.timing.median_ms < 1000.0)
            if row.variant != "export_cold" and row.ratio:
                row.extra["speedup"] = round(1.0 / row.ratio, 1)
        rows += r
    if ctx.p.get("startup"):
        rows += _startup_case(ctx, build=ctx.p["startup"] == "build")
    return rows


_STARTUP_BUILD = """
import json, sys, time
t0 = time.perf_counter()
from mmbridge.demo import demo_config
from mmbridge.train.build import build_data, build_model
from mmbridge.train.config import validate
cfg = validate(demo_config(None, sys.argv[1], 1, 32))
data = build_data(cfg)
model = build_model(cfg, data["train"])
print(json.dumps({"seconds": time.perf_counter() - t0, "tensorflow_loaded": "tensorflow" in sys.modules,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def _startup_case(ctx: SuiteContext, *, build: bool) -> list[Result]:
    """Issue 16, start-up: fresh Python processes, in s of wall time per process.

    * ``python_import_torch`` (**baseline**): ``python -c "import torch"``, the floor of any torch job;
    * ``import_mmbridge``: ``python -c "import mmbridge"`` (torch's stack, never TensorFlow);
    * ``build_demo_model_warm_cache`` (with ``build``): the demo's data and hybrid model from its
      config (two ``module:attr`` export references, ORT + converted bridges, compose) on the warm
      artifact cache under the bench cache dir; its first (warm-up) call fills the cache.
      ``extra.tensorflow_loaded`` says whether that process imported TensorFlow (it must not: a
      cache hit is found from the reference cache, :mod:`mmbridge.export.refcache`).
    """
    case = "start-up: fresh process" + (" + demo model on a warm cache" if build else "")
    env = dict(os.environ, MMBRIDGE_CACHE=str(ctx.cache_dir / "startup_cache"), TF_CPP_MIN_LOG_LEVEL="3")
    seen: dict[str, Any] = {}

    def proc(code: str, *args: str, key: str | None = None) -> Callable[[], Any]:
        def run() -> Any:
            out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                                 timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"exit {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}")
            if key:
                seen[key] = json.loads(out.stdout.strip().splitlines()[-1])
            return None
        return run

    variants = [Variant("python_import_torch", proc("import torch"), "python -c 'import torch'"),
                Variant("import_mmbridge", proc("import mmbridge"), "python -c 'import mmbridge'")]
    if build:
        run_dir = tempfile.mkdtemp(prefix="startup-run-", dir=ctx.cache_dir)
        variants.append(Variant("build_demo_model_warm_cache", proc(_STARTUP_BUILD, run_dir, key="build"),
                                "demo config -> data + HybridModel (2 bridges) on a warm cache"))
    cfg = dataclasses.replace(ctx.config, warmup=1, repeats=min(ctx.config.repeats, 3), min_repeats=2, min_rep_s=0.0,
                              max_case_s=max(ctx.config.max_case_s, 120.0), memory=False)
    rows = measure_case("cache", case, variants, baseline="python_import_torch", items_per_call=0, config=cfg,
                        params={"build": build}, log=ctx.log)
    for r in rows:
        if r.variant == "build_demo_model_warm_cache" and "build" in seen:
            r.extra.update(tensorflow_loaded=seen["build"]["tensorflow_loaded"],
                           parameters=seen["build"]["parameters"])
    return rows


# ---------------------------------------------------------------------------------------------
# amp
# ---------------------------------------------------------------------------------------------
def suite_amp(ctx: SuiteContext) -> list[Result]:
    """``torch.autocast`` speed-up of the converted encoder (else its native twin), forward and train."""
    import torch

    kind, batch, side = ctx.p["amp"]
    dev = torch.device(ctx.device)
    dev_type = "cuda" if ctx.device.startswith("cuda") else "cpu"
    tf, tf_note = _tf(ctx)
    module, which, why = None, "", ""
    if tf is not None:
        _, art, note = _encoder_artifacts(ctx, tf, kind, side, trainable=True)
        if art is not None:
            module, note = _to_torch(art, trainable=True, device=ctx.device)
        if module is not None:
            which = "converted"
        else:
            why = note or ""
    else:
        why = tf_note or ""
    if module is None:
        module, note = _native_twin(kind)
        if module is None:
            return skipped_case("amp", f"{kind} autocast", ["fp32", "bf16"], "fp32", note or "")
        module = module.to(dev)
        which = "native twin"
        why = f"converted module unavailable ({why}); measuring the native twin"
    rng = np.random.default_rng(0)
    x_t = torch.from_numpy(rng.uniform(-1, 1, size=(batch, 3, side, side)).astype(np.float32)).to(dev)
    y_t = torch.from_numpy(rng.integers(0, 10, size=(batch,)).astype(np.int64)).to(dev)
    dtypes = [("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if dev_type == "cuda" else [])
    rows: list[Result] = []
    for mode in ("forward", "train"):
        case = f"{kind} {which} {mode} b{batch} {side}px"
        params = {"model": kind, "module": which, "batch": batch, "side": side, "mode": mode}
        variants: list[Variant] = []
        head = torch.nn.Linear(FEATURES[kind], 10).to(dev)
        for name, dt in [("fp32", None), *dtypes]:
            ac = None if dt is None else (lambda dt=dt: torch.autocast(dev_type, dtype=dt))
            if mode == "forward":
                def fwd(ac: Any = ac) -> Any:
                    module.eval()
                    with torch.no_grad(), (ac() if ac else contextlib.nullcontext()):
                        return module(x_t)

                variants.append(Variant(name, fwd, "" if dt is None else f"torch.autocast({dev_type!r}, {name})"))
            else:
                scaler = torch.amp.GradScaler(dev_type) if name == "fp16" else None
                step = _torch_train_step(module, head, x_t, y_t, autocast=ac, scaler=scaler)

                def train(step: Any = step) -> Any:
                    module.train()
                    return step()

                variants.append(Variant(name, train, ("GradScaler" if scaler else "") if dt else ""))
        r = measure_case("amp", case, variants, baseline="fp32", items_per_call=batch, config=ctx.config,
                         params=params, log=ctx.log)
        for row in r:
            if row.variant != "fp32" and row.ratio:
                row.extra["speedup"] = round(1.0 / row.ratio, 3)
            if why and row.variant == "fp32":
                row.note = (row.note + "; " if row.note else "") + why
        rows += r
    rows += _amp_hybrid(ctx, dtypes, dev_type)
    if dev_type == "cpu":
        from mmbridge.bench.harness import _cpu_flags

        flags = _cpu_flags()
        if not {"avx512_bf16", "amx_bf16"} & set(flags):
            for row in rows:
                if row.variant == "bf16":
                    row.note = (row.note + "; " if row.note else "") + "this CPU has no native bf16 (no avx512_bf16/AMX): expect < 1x"
    return rows


def _amp_hybrid(ctx: SuiteContext, dtypes: list[tuple[str, Any]], dev_type: str) -> list[Result]:
    """fp32 vs autocast training step of the whole end-to-end hybrid (bridged, else native)."""
    import torch

    batch = ctx.p["e2e"]["batch"]
    dev = torch.device(ctx.device)
    setup, model, note = _hybrid_models(ctx)
    which = "bridged"
    if model is None:
        model, which = build_hybrid("native", side=setup["side"], mu=setup["mu"], sd=setup["sd"]), "native"
        note = f"bridged hybrid unavailable ({note}); measuring the native one"
    model = model.to(dev)
    data, y = hybrid_batch(batch, setup["side"], dev)
    case = f"hybrid {which} train b{batch}"
    variants = []
    for name, dt in [("fp32", None), *dtypes]:
        ac = None if dt is None else (lambda dt=dt: torch.autocast(dev_type, dtype=dt))
        scaler = torch.amp.GradScaler(dev_type) if name == "fp16" else None
        variants.append(Variant(name, _hybrid_step(model, data, y, autocast=ac, scaler=scaler),
                                note if name == "fp32" else ("GradScaler" if scaler else "")))
    rows = measure_case("amp", case, variants, baseline="fp32", items_per_call=batch, config=ctx.config,
                        params={"model": f"hybrid ({which})", "batch": batch, "mode": "train"}, log=ctx.log)
    for row in rows:
        if row.variant != "fp32" and row.ratio:
            row.extra["speedup"] = round(1.0 / row.ratio, 3)
    return rows


# ---------------------------------------------------------------------------------------------
# ddp
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, backend: str, spec: dict[str, Any], result_path: str) -> None:
    """One rank of the DDP case (spawned; module-level so that ``spawn`` can import it).

    Builds the end-to-end hybrid (:func:`build_hybrid`; ``spec["kind"]`` bridged from artifact
    paths, so no TensorFlow here, or native) twice: a plain copy and one whose trainable stage is
    wrapped in DDP, as :class:`mmbridge.Trainer` does (frozen ORT preprocessing outside DDP).
    Rounds alternate two timed parts: (1) rank 0 alone steps the plain copy while the other
    ranks wait on a barrier; (2) every rank steps the DDP model (gradient all-reduce), the
    per-rank batch unchanged. Rank 0 writes per-step times (ms) to ``result_path``.
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cuda = backend == "nccl"
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mu, sd = np.asarray(spec["mu"], np.float32), np.asarray(spec["sd"], np.float32)
        kw = dict(side=spec["side"], mu=mu, sd=sd, artifacts=spec["artifacts"], threads=1)
        single = build_hybrid(spec["kind"], **kw).to(dev).train()
        model = build_hybrid(spec["kind"], **kw).to(dev).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model.trainable_module(), device_ids=[rank] if cuda else None)
        data, y = hybrid_batch(spec["batch"], spec["side"], dev, seed=rank)
        opts = {"single": torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.01),
                "ddp": torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)}

        def step(k: str) -> None:
            opts[k].zero_grad(set_to_none=True)
            logits = single(data) if k == "single" else ddp(model.frozen_stage(data))
            torch.nn.functional.cross_entropy(_first(logits), y).backward()
            opts[k].step()

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(dev)

        times: dict[str, list[float]] = {"single": [], "ddp": []}
        steps = spec["steps"]
        for r in range(spec["warmup"] + spec["repeats"]):
            order = ("single", "ddp") if r % 2 == 0 else ("ddp", "single")
            for k in order:
                dist.barrier()
                t0 = time.perf_counter()
                if k == "ddp" or rank == 0:
                    for _ in range(steps):
                        step(k)
                sync()
                dt = (time.perf_counter() - t0) / steps * 1e3
                if r >= spec["warmup"]:
                    times[k].append(dt)
        dist.barrier()
        if rank == 0:
            Path(result_path).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def suite_ddp(ctx: SuiteContext) -> list[Result]:
    """1 rank vs N ranks, the end-to-end hybrid's training step (weak scaling); gloo on CPU, NCCL on >1 GPUs."""
    import torch

    setup, bridged, note = _hybrid_models(ctx)
    kind = "bridged" if bridged is not None else "native"
    spec = dict(ctx.p["ddp"], warmup=max(1, ctx.config.warmup), repeats=ctx.config.repeats, kind=kind,
                side=setup["side"], mu=setup["mu"].tolist(), sd=setup["sd"].tolist(),
                artifacts=setup["artifacts"] if kind == "bridged" else None)
    configs = [("gloo", 2)]
    if ctx.device.startswith("cuda"):
        n = torch.cuda.device_count()
        configs.append(("nccl", n if n > 1 else 0))
    rows: list[Result] = []
    for backend, world in configs:
        case = f"hybrid ({kind}) train step, b{spec['batch']}/rank, {backend}"
        names = ["1_rank", f"{world}_ranks" if world else "N_ranks"]
        params = {"backend": backend, "world_size": world, "per_rank_batch": spec["batch"], "threads_per_rank": 1,
                  "steps_per_rep": spec["steps"], "model": f"hybrid ({kind})"}
        if world < 2:
            rows += skipped_case("ddp", case, names, "1_rank", f"needs >= 2 GPUs, found {torch.cuda.device_count()}", params)
            continue
        if not torch.distributed.is_available() or (backend == "nccl" and not torch.distributed.is_nccl_available()):
            rows += skipped_case("ddp", case, names, "1_rank", f"torch.distributed {backend} unavailable", params)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = os.path.join(tmp, "ddp.json")
            try:
                torch.multiprocessing.spawn(_ddp_worker, args=(world, _free_port(), backend, spec, res), nprocs=world, join=True)
                times = json.loads(Path(res).read_text())
            except Exception as exc:  # noqa: BLE001
                rows += skipped_case("ddp", case, names, "1_rank", f"DDP run failed: {type(exc).__name__}: {exc}", params)
                continue
        t1, tn = Timing.from_times(times["single"], spec["steps"]), Timing.from_times(times["ddp"], spec["steps"])
        r1 = Result("ddp", case, names[0], names[0], timing=t1, items_per_call=spec["batch"], params=params,
                    samples_per_s=round(spec["batch"] / (t1.median_ms / 1e3), 3), ratio=1.0,
                    note="rank 0 alone (other ranks wait on a barrier)" + ("" if kind == "bridged" else f"; bridged unavailable: {note}"))
        paired = [a / b for a, b in zip(tn.times_ms, t1.times_ms)]
        rn = Result("ddp", case, names[1], names[0], timing=tn, items_per_call=spec["batch"] * world, params=params,
                    samples_per_s=round(spec["batch"] * world / (tn.median_ms / 1e3), 3),
                    ratio=float(np.median(paired)),
                    ratio_p25=float(np.percentile(paired, 25)), ratio_p75=float(np.percentile(paired, 75)),
                    note=f"DDP over {world} ranks around the trainable stage, same per-rank batch")
        rn.extra["scaling_efficiency"] = round(1.0 / rn.ratio, 3)
        rn.extra["speedup_samples_per_s"] = round(rn.samples_per_s / r1.samples_per_s, 3)
        for row in (r1, rn):
            ctx.log(f"  {case} / {row.variant}: {row.timing.median_ms:.3f} ms, ratio {row.ratio:.3f}")
        rows += [r1, rn]
    return rows


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def suite_e2e(ctx: SuiteContext) -> list[Result]:
    """Hybrid training step (``mmbridge.compose``) vs the same model native in torch, in samples/s."""
    case = "hybrid image+numeric train step"
    names = ["hybrid_bridged", "native_torch"]
    if importlib.util.find_spec("mmbridge.composition") is None:
        return skipped_case("e2e", case, names, "native_torch", "mmbridge.composition is not available yet")
    try:
        rows = _e2e(ctx, case)
    except Exception as exc:  # noqa: BLE001 - an API still in flux must not stop the run
        rows = skipped_case("e2e", case, names, "native_torch", f"could not build the hybrid: {type(exc).__name__}: {exc}")
    fc_case = "hybrid epoch, frozen text branch: feature cache"
    try:
        rows += _e2e_feature_cache(ctx, fc_case)
    except Exception as exc:  # noqa: BLE001 - an API still in flux must not stop the run
        rows += skipped_case("e2e", fc_case, ["cached", "uncached"], "uncached",
                             f"could not build the hybrid: {type(exc).__name__}: {exc}")
    return rows


def _e2e_feature_cache(ctx: SuiteContext, case: str) -> list[Result]:
    """One epoch (``batches`` SGD steps) of a frozen-text + trainable-numeric hybrid, cached vs not.

    The text branch is an embedding + ``nn.TransformerEncoder`` (MiniLM-shaped at ``full``: width
    384, 6 layers), frozen; the numeric branch an MLP that trains. Both variants start from the
    same weights; the cached one is primed by one untimed epoch (every later epoch hits).
    """
    import torch
    from torch import nn

    import mmbridge
    from mmbridge.composition import Branch

    p = ctx.p["feature_cache"]
    batch, batches, tokens, width, layers = p["batch"], p["batches"], p["tokens"], p["width"], p["layers"]
    dev = torch.device(ctx.device)
    vocab = 1000

    class Text(nn.Module):
        out_dim = width

        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, width)
            layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.1, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.enc(self.emb(ids), src_key_padding_mask=mask == 0)

    def build() -> Any:
        torch.manual_seed(0)
        return mmbridge.compose(
            {"text": Branch(Text(), input_keys=("text", "text_mask"), mask_key="text_mask", trainable=False),
             "numeric": Branch(nn.Sequential(nn.Linear(HYBRID_FEATURES, 64), nn.ReLU(), nn.Linear(64, 32)), out_dim=32)},
            fusion="concat", num_classes=HYBRID_CLASSES, fusion_dim=64).to(dev)

    g = torch.Generator().manual_seed(0)
    data = []
    for b in range(batches):
        mask = torch.ones(batch, tokens, dtype=torch.int64)
        mask[:, tokens // 2 + b % (tokens // 2):] = 0
        data.append({"id": torch.arange(b * batch, (b + 1) * batch), "text": torch.randint(1, vocab, (batch, tokens), generator=g) * mask,
                     "text_mask": mask, "numeric": torch.randn(batch, HYBRID_FEATURES, generator=g),
                     "label": torch.randint(0, HYBRID_CLASSES, (batch,), generator=g)})
    data = [{k: v.to(dev) for k, v in d.items()} for d in data]

    def epoch_fn(model: Any) -> Callable[[], Any]:
        model.train()
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01)

        def epoch() -> Any:
            for d in data:
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(d).float(), d["label"])
                loss.backward()
                opt.step()
            return loss

        return epoch

    uncached, cached = build(), build()
    cache = cached.enable_feature_cache()
    cached_epoch = epoch_fn(cached)
    cached_epoch()  # epoch 1 fills the cache; the timed epochs are epoch 2, 3, ...
    params = {"batch": batch, "batches": batches, "tokens": tokens, "width": width, "layers": layers,
              "feature_cache_on": "model device" if cache.device is None else str(cache.device)}
    variants = [Variant("cached", cached_epoch, "frozen text features served by row id"),
                Variant("uncached", epoch_fn(uncached), "frozen text branch recomputed every epoch")]
    rows = measure_case("e2e", case, variants, baseline="uncached", items_per_call=batch * batches,
                        config=ctx.config, params=params, log=ctx.log)
    for r in rows:
        if r.variant == "cached" and r.ratio:
            r.extra["speedup"] = round(1.0 / r.ratio, 3)
            r.extra["cache_hits"] = cache.stats["hits"]
            r.extra["cache_misses"] = cache.stats["misses"]
    return rows


def _torch_image_preprocess(side_out: int) -> Any:
    """The hand-written torch twin of the image preprocessing graph, as an ``nn.Module``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TorchImagePreprocess(nn.Module):
        """uint8 NHWC ``[N, H, W, 3]`` -> float32 NCHW ``[N, 3, side_out, side_out]``, ImageNet mean/std."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, x: Any) -> Any:
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(side_out, side_out), mode="bilinear",
                              align_corners=False, antialias=False)
            return ((x / 255.0 - self.mean) / self.std).contiguous()

    return TorchImagePreprocess()


def _torch_numeric_preprocess(mu: np.ndarray, sd: np.ndarray) -> Any:
    import torch
    from torch import nn

    class TorchNumericPreprocess(nn.Module):
        """float32 ``[N, F]`` -> ``clip((x - mu) / sd, -5, 5)``."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mu", torch.from_numpy(mu))
            self.register_buffer("sd", torch.from_numpy(sd))

        def forward(self, x: Any) -> Any:
            return ((x - self.mu) / self.sd).clamp(-5.0, 5.0)

    return TorchNumericPreprocess()


HYBRID_FEATURES = 16
HYBRID_CLASSES = 10


def build_hybrid(kind: str, *, side: int, mu: np.ndarray, sd: np.ndarray, artifacts: dict[str, str] | None = None,
                 threads: int | None = None, seed: int = 0) -> Any:
    """The end-to-end model, without TensorFlow: ``mmbridge.compose`` of two branches.

    * ``image``: uint8 NHWC ``[B, 2*side, 2*side, 3]`` -> resize to ``side`` + ImageNet
      normalisation -> small CNN (``[B, 32]``);
    * ``numeric``: float32 ``[B, 16]`` -> ``clip((x - mu) / sd, -5, 5)`` -> MLP (``[B, 32]``);
    * concat fusion (width 64) -> 10-class head.

    Args:
        kind: ``"native"`` (hand-written torch preprocessing, native twin CNN) or ``"bridged"``
            (``artifacts["image_pre"]`` / ``["numeric_pre"]`` as ``to_ort()`` modules,
            ``artifacts["encoder"]`` (a ``trainable=True`` export) as ``to_torch(trainable=True)``).
        artifacts: artifact directories, for ``"bridged"``.
        threads: ORT intra-op threads of the ``to_ort()`` modules.
        seed: ``torch.manual_seed`` before the fusion and task heads are built.

    Raises:
        ValueError: ``"bridged"`` without the three artifact paths.
    """
    import torch
    from torch import nn

    import mmbridge
    from mmbridge.composition import Branch

    def mlp() -> Any:
        return nn.Sequential(nn.Linear(HYBRID_FEATURES, 64), nn.ReLU(), nn.Linear(64, 32))

    torch.manual_seed(seed)
    if kind == "native":
        image = Branch(_native_twin("small_cnn")[0], preprocess=_torch_image_preprocess(side), out_dim=FEATURES["small_cnn"])
        numeric = Branch(mlp(), preprocess=_torch_numeric_preprocess(mu, sd), out_dim=32)
    elif kind == "bridged":
        if not artifacts or not all(k in artifacts for k in ("image_pre", "numeric_pre", "encoder")):
            raise ValueError(f"build_hybrid('bridged') needs artifacts image_pre, numeric_pre, encoder; got {artifacts}")
        kw = {"intra_op_threads": threads} if threads else {}
        pre = mmbridge.load_artifact(artifacts["image_pre"]).to_ort(**kw)
        num = mmbridge.load_artifact(artifacts["numeric_pre"]).to_ort(**kw)
        enc = mmbridge.load_artifact(artifacts["encoder"]).to_torch(trainable=True)
        image = Branch(enc, preprocess=pre, out_dim=FEATURES["small_cnn"])
        numeric = Branch(mlp(), preprocess=num, out_dim=32)
    else:
        raise ValueError(f"build_hybrid(kind={kind!r}): use 'native' or 'bridged'")
    torch.manual_seed(seed + 1)
    return mmbridge.compose({"image": image, "numeric": numeric}, fusion="concat", num_classes=HYBRID_CLASSES,
                            fusion_dim=64)


def hybrid_batch(batch: int, side: int, device: Any, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """A synthetic batch for :func:`build_hybrid`: ``({"image": uint8 [B,2s,2s,3], "numeric": f32 [B,16]}, int64 [B])``."""
    import torch

    rng = np.random.default_rng(seed)
    data = {
        "image": torch.from_numpy(rng.integers(0, 256, size=(batch, 2 * side, 2 * side, 3), dtype=np.uint8)).to(device),
        "numeric": torch.from_numpy(rng.normal(size=(batch, HYBRID_FEATURES)).astype(np.float32)).to(device),
    }
    y = torch.from_numpy(rng.integers(0, HYBRID_CLASSES, size=(batch,)).astype(np.int64)).to(device)
    return data, y


def _hybrid_setup(ctx: SuiteContext) -> dict[str, Any]:
    """Export the hybrid's TF parts once per run (memoised): side, mu, sd, artifact paths or the reason not."""
    if "hybrid" in ctx._memo:
        return ctx._memo["hybrid"]
    from mmbridge.specs import TensorSpec

    side = ctx.p["encoders"][0][2]
    rng = np.random.default_rng(0)
    mu = rng.normal(0.0, 0.1, size=(HYBRID_FEATURES,)).astype(np.float32)
    sd = rng.uniform(0.5, 1.5, size=(HYBRID_FEATURES,)).astype(np.float32)
    setup: dict[str, Any] = {"side": side, "mu": mu, "sd": sd, "artifacts": None, "note": ""}
    tf, tf_note = _tf(ctx)
    if tf is None:
        setup["note"] = tf_note or ""
    else:
        side_in = 2 * side
        pre_art, n1 = _export(ctx, _tf_image_fn(tf, side_in, side), name=f"bench_pre_image_{side_in}_{side}",
                              role="preprocess", tolerance=_resize_tolerance(),
                              input_specs=[TensorSpec("image", ("batch", side_in, side_in, 3), "uint8", "NHWC", (0, 255))])
        num_art, n2 = _export(ctx, _tf_numeric_fn(tf, HYBRID_FEATURES, mu, sd), name=f"bench_pre_numeric_{HYBRID_FEATURES}_e2e",
                              role="preprocess",
                              input_specs=[TensorSpec("features", ("batch", HYBRID_FEATURES), "float32", "NC")])
        _, enc_art, n3 = _encoder_artifacts(ctx, tf, "small_cnn", side, trainable=True)
        if pre_art is None or num_art is None or enc_art is None:
            setup["note"] = n1 or n2 or n3 or "export failed"
        else:
            setup["artifacts"] = {"image_pre": str(pre_art.path), "numeric_pre": str(num_art.path),
                                  "encoder": str(enc_art.path)}
    ctx._memo["hybrid"] = setup
    return setup


def _hybrid_models(ctx: SuiteContext) -> tuple[dict[str, Any], Any, str]:
    """(setup, bridged model or None, note) on ``ctx.device``."""
    setup = _hybrid_setup(ctx)
    if setup["artifacts"] is None:
        return setup, None, setup["note"]
    try:
        model = build_hybrid("bridged", side=setup["side"], mu=setup["mu"], sd=setup["sd"],
                             artifacts=setup["artifacts"], threads=ctx.threads)
        return setup, model, "ORT preprocessing (to_ort) + converted Keras CNN (to_torch, trainable)"
    except Exception as exc:  # noqa: BLE001 - a backend still in flux
        return setup, None, _backend_note("torch/ort", exc)


def _hybrid_step(model: Any, data: dict[str, Any], y: Any, *, autocast: Any = None, scaler: Any = None) -> Callable[[], Any]:
    """A closure: one SGD step (lr 0.01, cross-entropy) of a hybrid model on ``data``."""
    import torch

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ctx_fn = autocast or contextlib.nullcontext

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with ctx_fn():
            loss = torch.nn.functional.cross_entropy(_first(model(data)).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    return step


def _e2e(ctx: SuiteContext, case: str) -> list[Result]:
    """``hybrid_bridged`` vs ``native_torch`` (**baseline**) training step, see :func:`build_hybrid`.

    Both built with ``mmbridge.compose`` (same fusion and task heads); synthetic data of the
    pokedex shapes (uint8 images, 16 numeric features, 10 classes).
    """
    import torch

    batch = ctx.p["e2e"]["batch"]
    dev = torch.device(ctx.device)
    setup, bridged, note = _hybrid_models(ctx)
    side = setup["side"]
    params = {"batch": batch, "image_input": [batch, 2 * side, 2 * side, 3], "encoder_side": side,
              "features": HYBRID_FEATURES, "fusion": "concat", "classes": HYBRID_CLASSES}
    data, y = hybrid_batch(batch, side, dev)
    native = build_hybrid("native", side=side, mu=setup["mu"], sd=setup["sd"]).to(dev)
    variants = [
        Variant("hybrid_bridged", _hybrid_step(bridged.to(dev), data, y) if bridged is not None else None, note),
        Variant("native_torch", _hybrid_step(native, data, y), "hand-written torch preprocessing + native twin CNN"),
    ]
    rows = measure_case("e2e", case, variants, baseline="native_torch", items_per_call=batch, config=ctx.config,
                        params=params, log=ctx.log)
    for r in rows:
        if r.variant != "native_torch" and r.ratio:
            r.extra["samples_per_s_vs_native"] = round(1.0 / r.ratio, 3)
    return rows


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------
SUITES: dict[str, Callable[[SuiteContext], list[Result]]] = {
    "preprocess": suite_preprocess,
    "encoders": suite_encoders,
    "cache": suite_cache,
    "amp": suite_amp,
    "ddp": suite_ddp,
    "e2e": suite_e2e,
}


def run_suites(names: Sequence[str], ctx: SuiteContext) -> tuple[list[Result], list[str]]:
    """Run the named suites in order; a suite that raises becomes one ``error`` row and a note.

    Returns:
        ``(rows, notes)``.

    Raises:
        ValueError: an unknown suite name (lists the known ones).
    """
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; known: {sorted(SUITES)}")
    rows: list[Result] = []
    notes: list[str] = []
    for name in names:
        t0 = time.perf_counter()
        ctx.log(f"[{name}]")
        try:
            rows += SUITES[name](ctx)
        except Exception as exc:  # noqa: BLE001
            msg = f"suite {name!r} failed: {type(exc).__name__}: {exc}"
            rows.append(Result(name, "(suite)", "-", "-", status="error", note=msg))
            notes.append(msg)
        ctx.log(f"[{name}] {time.perf_counter() - t0:.1f} s")
    return rows, notes


EXTERNAL_SCRIPTS = ("bench_ort.py", "bench_torch.py")


def run_external(bench_dir: Path, out_dir: Path, *, device: str, quick: bool, timeout_s: float,
                 threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the backend owners' scripts (``benchmarks/bench_ort.py``, ``bench_torch.py``) if present.

    Each runs as ``python SCRIPT [--quick] --device DEVICE --out OUT/<stem>.json`` in a child
    process (its own TF/ORT state, a timeout of ``timeout_s`` s). ``OUT/<stem>.json`` may be a
    file or a directory of JSON files; a ``results`` list of rows in the :class:`Result` schema
    is merged into the report by the caller. With ``threads``, the child gets
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``TF_NUM_INTRAOP_THREADS`` set to it.

    Returns:
        ``{script: {"status": "ok" | "missing" | "failed" | "timeout", "note": str, "json": [...]}}``.
    """
    out: dict[str, Any] = {}
    for script in EXTERNAL_SCRIPTS:
        path = bench_dir / script
        if not path.is_file():
            out[script] = {"status": "missing", "note": f"{path} does not exist (yet)"}
            continue
        target = (out_dir / f"{path.stem}.json").resolve()  # the child runs in the repository root
        cmd = [sys.executable, str(path), *(["--quick"] if quick else []), "--device", device, "--out", str(target)]
        log(f"[external] {' '.join(cmd)}")
        t0 = time.perf_counter()
        try:
            env = dict(os.environ)
            if threads:
                env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")})
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=bench_dir.parent, env=env)
        except subprocess.TimeoutExpired:
            out[script] = {"status": "timeout", "note": f"killed after {timeout_s:.0f} s", "command": cmd}
            continue
        entry: dict[str, Any] = {"command": cmd, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        files = sorted(target.glob("*.json")) if target.is_dir() else ([target] if target.is_file() else [])
        docs = []
        for f in files:
            try:
                docs.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        entry["json"] = docs
        if proc.returncode != 0 or not docs:
            entry["status"] = "failed"
            entry["note"] = (f"exit code {proc.returncode}; " if proc.returncode else "wrote no JSON; ") + \
                (proc.stderr or proc.stdout)[-500:].strip().replace("\n", " | ")
        else:
            entry["status"] = "ok"
            entry["note"] = f"{len(docs)} JSON file(s) in {entry['seconds']} s"
        out[script] = entry
    return out


__all__ = ["SUITES", "SIZES", "SuiteContext", "run_suites", "run_external", "suite_preprocess", "suite_encoders",
           "suite_cache", "suite_amp", "suite_ddp", "suite_e2e"]
