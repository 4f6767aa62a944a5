"""The GPU check: one command for the GPU machine as it is (python3, torch with CUDA, onnx, CPU
onnxruntime; no TensorFlow, no onnx2torch, mmbridge not installed), prepared here beforehand.

    # here (CPU, TensorFlow installed): export the artifacts and fetch the onnx2torch wheel
    .venv/bin/python benchmarks/gpu_check.py prepare                 # -> .gpu_bundle/ (a few MiB)
    # on the GPU machine, from the repository root (carry .gpu_bundle):
    python3 benchmarks/gpu_check.py run --out "$OUT"                  # -> gpu_check.json, gpu_check.md
    # the CPU dry run of the same code path (what CI runs, tiny sizes, seconds):
    .venv/bin/python benchmarks/gpu_check.py run --dry-run --out /tmp/gpu_check

What ``run`` measures (each row also records its error instead of stopping the run):

* ``env``: torch / CUDA / GPU, onnxruntime's providers, ``mmbridge info``'s conflicts and the
  torch-vs-onnxruntime-gpu CUDA pairing;
* ``pytest_gpu``: ``pytest -m gpu tests`` (GPU runs only);
* ``encoder_fwd`` / ``encoder_train``: the converted Keras CNN (trainable export, BatchNorm kept)
  vs its native torch twin with the same parameter count, ms per batch (median) and the ratio;
* ``amp``: the converted encoder's training step under bf16 autocast and fp16 + GradScaler vs fp32;
* ``compile``: ``torch._dynamo.explain`` graph breaks of the converted encoder, and compiled vs
  eager forward;
* ``hybrid_step``: frozen TF preprocessing on onnxruntime's CPU provider (IO binding), then the
  converted encoder and a linear head training on the device;
* ``syncs_per_step``: host synchronisations in one training step of the converted encoder and of a
  ``HybridModel``, counted with ``torch.cuda.set_sync_debug_mode("warn")`` (GPU runs only);
* ``peak_memory``: ``torch.cuda.max_memory_allocated`` of the converted vs native training step, MiB;
* ``ddp``: one DDP training step in a 1-process group (NCCL on GPU, gloo on CPU), replicas equal.

Nothing here imports TensorFlow; ``run`` puts the repository and the bundled onnx2torch wheel on
``sys.path`` (a pure-Python wheel imports from its zip), so it needs no install step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / ".gpu_bundle"
SIZES = {"full": {"side": 96, "batch": 32, "repeat": 20}, "dry": {"side": 16, "batch": 4, "repeat": 2}}


# ---------------------------------------------------------------------------------------------
# prepare (here, with TensorFlow)
# ---------------------------------------------------------------------------------------------
def prepare(bundle: Path, sides: tuple[int, ...] = (16, 96)) -> dict[str, Any]:
    """Export the check's artifacts (CPU, TensorFlow) into ``bundle`` and download the onnx2torch wheel.

    Writes ``bundle/artifacts/<name>/`` (mmbridge artifacts: ``cnn_<side>`` trainable Keras CNN
    float32 NHWC ``[N, side, side, 3]`` -> ``[N, 32]``, ``preprocess`` uint8 NHWC -> float32 NHWC
    ``x / 127.5 - 1``), ``bundle/wheels/onnx2torch-*.whl`` and ``bundle/manifest.json``.

    Raises:
        mmbridge.ExportError / ParityError: an export failed.
        subprocess.CalledProcessError: pip could not download the wheel.
    """
    import shutil

    sys.path.insert(0, str(REPO))
    import mmbridge
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()

    bundle.mkdir(parents=True, exist_ok=True)
    arts = bundle / "artifacts"
    manifest: dict[str, Any] = {"artifacts": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from mmbridge.baselines.bench_models import keras_model

    for side in sides:
        model = keras_model("small_cnn", side, seed=0)  # the benchmarks' small CNN (BatchNorm, Dense 32)
        art = mmbridge.export(model, name=f"cnn_{side}", trainable=True, inputs_as_nchw=["image"],
                              out=arts / f"cnn_{side}")
        manifest["artifacts"][f"cnn_{side}"] = {"params": int(sum(w.numpy().size for w in model.trainable_weights)),
                                                "path": str(art.path.relative_to(bundle))}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")])
    def preprocess(image):
        return tf.cast(image, tf.float32) / 127.5 - 1.0

    art = mmbridge.export(preprocess, name="preprocess", role="preprocess", out=arts / "preprocess")
    manifest["artifacts"]["preprocess"] = {"path": str(art.path.relative_to(bundle))}
    wheels = bundle / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    from importlib import metadata

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    f"onnx2torch=={metadata.version('onnx2torch')}"], check=True)
    manifest["wheels"] = sorted(p.name for p in wheels.glob("*.whl"))
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# ---------------------------------------------------------------------------------------------
# run (there, no TensorFlow)
# ---------------------------------------------------------------------------------------------
def _median_ms(fn: Any, repeat: int, sync: Any) -> float:
    fn()
    sync()  # warm-up (allocator, cuDNN algorithm choice)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def _native_twin(torch: Any) -> Any:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=1e-3, momentum=0.01), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32, eps=1e-3, momentum=0.01),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32))


def _train_step(torch: Any, module: Any, head: Any, x: Any, y: Any, *, autocast: Any = None,
                scaler: Any = None) -> Any:
    params = [p for p in list(module.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with autocast() if autocast else contextlib.nullcontext():
            out = module(x)
            logits = head(out[0] if isinstance(out, (tuple, list)) else out)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    return step


def run(bundle: Path, out: Path, *, dry_run: bool = False, device: str | None = None,
        budget_s: float = 480.0) -> dict[str, Any]:
    """Run every check and write ``out/gpu_check.json`` and ``out/gpu_check.md``; return the results.

    Args:
        bundle: what :func:`prepare` wrote (artifacts, the onnx2torch wheel).
        out: output folder (created).
        dry_run: tiny sizes, two repeats, the CPU unless ``device`` says otherwise (CI).
        device: ``"cuda"`` or ``"cpu"``; default ``"cpu"`` for a dry run, else ``"cuda"``.
        budget_s: checks that would start after this many seconds are recorded as skipped.
    """
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        sys.path.insert(0, str(wheel))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("MMBRIDGE_CACHE", tempfile.mkdtemp(prefix="mmbridge-gpu-check-"))
    t_start = time.perf_counter()
    import torch

    import mmbridge

    dev = torch.device(device or ("cpu" if dry_run else "cuda"))
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check run: torch sees no CUDA GPU; use --dry-run (or --device cpu) here")
    size = SIZES["dry" if dry_run else "full"]
    side, batch, repeat = size["side"], size["batch"], size["repeat"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results: dict[str, Any] = {"device": str(dev), "dry_run": dry_run, "sizes": size}

    def check(name: str, fn: Any) -> None:
        if time.perf_counter() - t_start > budget_s:
            results[name] = {"skipped": f"budget of {budget_s:.0f} s spent"}
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the other checks still run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if isinstance(results[name], dict):
            results[name]["seconds"] = round(time.perf_counter() - t0, 2)

    def env() -> dict[str, Any]:
        from mmbridge.info import conflicts, cuda_pairing, dist_version, ort_gpu_cuda_major
        from mmbridge.runtime.session import available_providers

        return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name(0) if cuda else None, "onnxruntime": dist_version("onnxruntime"),
                "onnxruntime_gpu": dist_version("onnxruntime-gpu"), "providers": available_providers(),
                "conflicts": conflicts(), "onnx2torch": [p for p in sys.path if "onnx2torch" in p][:1],
                "pairing": cuda_pairing(torch.version.cuda, dist_version("onnxruntime-gpu"), ort_gpu_cuda_major())}

    check("env", env)
    if cuda:
        def pytest_gpu() -> dict[str, Any]:
            paths = os.pathsep.join([str(REPO)] + [p for p in sys.path if p.endswith(".whl")])
            proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                                   "tests"], cwd=REPO, capture_output=True, text=True, timeout=240,
                                  env=dict(os.environ, PYTHONPATH=paths))
            return {"exit_code": proc.returncode, "tail": proc.stdout[-1500:]}

        check("pytest_gpu", pytest_gpu)

    arts = bundle / "artifacts"
    art_name = f"cnn_{side}" if f"cnn_{side}" in manifest["artifacts"] else sorted(
        k for k in manifest["artifacts"] if k.startswith("cnn_"))[0]
    side = int(art_name.split("_")[1])
    art = mmbridge.load_artifact(arts / art_name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, side, side, generator=g).mul(2).sub(1).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)

    def fresh() -> tuple[Any, Any, Any]:
        conv = art.to_torch(trainable=True).to(dev).train()
        nat = _native_twin(torch).to(dev).train()
        head = torch.nn.Linear(32, 10).to(dev)
        return conv, nat, head

    def encoder_fwd() -> dict[str, Any]:
        conv, nat, _ = fresh()
        conv.eval()
        nat.eval()
        with torch.no_grad():
            c = _median_ms(lambda: conv(x), repeat, sync)
            n = _median_ms(lambda: nat(x), repeat, sync)
        return {"converted_ms": c, "native_ms": n, "ratio": round(c / n, 3),
                "params_converted": sum(p.numel() for p in conv.parameters()),
                "params_native": sum(p.numel() for p in nat.parameters()),
                "params_keras": manifest["artifacts"][art_name].get("params")}

    def encoder_train() -> dict[str, Any]:
        conv, nat, head = fresh()
        c = _median_ms(_train_step(torch, conv, head, x, y), repeat, sync)
        n = _median_ms(_train_step(torch, nat, torch.nn.Linear(32, 10).to(dev), x, y), repeat, sync)
        return {"converted_ms": c, "native_ms": n, "ratio": round(c / n, 3)}

    def amp() -> dict[str, Any]:
        conv, _, head = fresh()
        row = {"fp32_ms": _median_ms(_train_step(torch, conv, head, x, y), repeat, sync)}
        bf16 = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
        row["bf16_ms"] = _median_ms(_train_step(torch, conv, head, x, y, autocast=bf16), repeat, sync)
        if cuda:
            fp16 = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
            scaler = torch.amp.GradScaler("cuda")
            row["fp16_gradscaler_ms"] = _median_ms(_train_step(torch, conv, head, x, y, autocast=fp16, scaler=scaler),
                                                   repeat, sync)
            row["fp16_speedup"] = round(row["fp32_ms"] / row["fp16_gradscaler_ms"], 3)
        row["bf16_speedup"] = round(row["fp32_ms"] / row["bf16_ms"], 3)
        return row

    def compile_check() -> dict[str, Any]:
        import torch._dynamo as dynamo

        conv, _, _ = fresh()
        conv.eval()
        dynamo.reset()
        explain = dynamo.explain(conv)(x)
        compiled = torch.compile(conv)
        with torch.no_grad():
            t_compile = time.perf_counter()
            compiled(x)
            sync()
            t_compile = round(time.perf_counter() - t_compile, 2)
            eager = _median_ms(lambda: conv(x), repeat, sync)
            comp = _median_ms(lambda: compiled(x), repeat, sync)
        return {"graph_breaks": explain.graph_break_count, "graphs": explain.graph_count, "compile_s": t_compile,
                "eager_ms": eager, "compiled_ms": comp, "speedup": round(eager / comp, 3)}

    def hybrid_step() -> dict[str, Any]:
        pre = mmbridge.load_artifact(arts / "preprocess").to_ort(device="cpu")
        conv, _, head = fresh()
        images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, generator=g)
        if cuda:
            images = images.pin_memory()
        opt = torch.optim.SGD([p for m in (conv, head) for p in m.parameters()], lr=0.01)

        def full_step() -> Any:
            feats = pre(images)  # CPU provider, IO binding, float32 NHWC
            xx = feats.permute(0, 3, 1, 2).contiguous().to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(head(conv(xx)), y)
            loss.backward()
            opt.step()
            return loss

        return {"step_ms": _median_ms(full_step, repeat, sync),
                "ort_cpu_preprocess_ms": _median_ms(lambda: pre(images), repeat, lambda: None),
                "provider": "CPUExecutionProvider"}

    def syncs_per_step() -> dict[str, Any]:
        if not cuda:
            return {"note": "host syncs are counted on CUDA only (torch.cuda.set_sync_debug_mode)"}
        conv, _, head = fresh()
        step = _train_step(torch, conv, head, x, y)
        step()
        sync()
        counts = {}
        for name, fn in (("converted_encoder", step), ("hybrid_model", _hybrid_model_step(torch, mmbridge, dev, batch))):
            fn()
            sync()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[name] = sum("synchroniz" in str(w.message).lower() for w in caught)
        return counts

    def peak_memory() -> dict[str, Any]:
        if not cuda:
            return {"note": "torch.cuda.max_memory_allocated needs CUDA"}
        row = {}
        for name in ("converted", "native"):
            conv, nat, head = fresh()
            mod = conv if name == "converted" else nat
            step = _train_step(torch, mod, head, x, y)
            step()
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync()
            row[f"{name}_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
            del conv, nat, head, step, mod
            torch.cuda.empty_cache()
        row["ratio"] = round(row["converted_MiB"] / max(row["native_MiB"], 1e-9), 3)
        return row

    def ddp() -> dict[str, Any]:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        backend = "nccl" if cuda else "gloo"
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
            try:
                conv, _, head = fresh()
                model = DDP(torch.nn.Sequential(conv, head), device_ids=[dev.index or 0] if cuda else None)
                before = [p.detach().clone() for p in model.parameters()]
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sync()
                moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, model.parameters()))
                return {"backend": backend, "loss": round(loss.detach().item(), 5), "parameters_updated": moved,
                        "parameters": len(before)}
            finally:
                dist.destroy_process_group()

    for name, fn in (("encoder_fwd", encoder_fwd), ("encoder_train", encoder_train), ("amp", amp),
                     ("compile", compile_check), ("hybrid_step", hybrid_step), ("syncs_per_step", syncs_per_step),
                     ("peak_memory", peak_memory), ("ddp", ddp)):
        check(name, fn)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# mmbridge GPU check ({'dry run, ' if dry_run else ''}{results['device']})", "",
             f"sizes: batch {batch}, {side} px, median of {repeat}; total {results['total_seconds']} s", "",
             "| check | result |", "|---|---|"]
    for k, v in results.items():
        if isinstance(v, dict) and k != "sizes":
            lines.append(f"| {k} | " + ", ".join(f"{a}={b}" for a, b in v.items() if a != "tail").replace("|", "/")
                         + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return results


def _hybrid_model_step(torch: Any, mmbridge: Any, dev: Any, batch: int) -> Any:
    """One training step of a small ``HybridModel`` (two native branches, attention fusion)."""
    model = mmbridge.compose({"a": torch.nn.Linear(8, 16), "b": torch.nn.Linear(6, 16)}, fusion="attention",
                             num_classes=5, fusion_dim=16).to(dev).train()
    data = {"a": torch.randn(batch, 8, device=dev), "b": torch.randn(batch, 6, device=dev)}
    y = torch.randint(0, 5, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        out = model(data)
        logits = out["logits"] if isinstance(out, dict) else out
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv: list[str] | None = None) -> int:
    """``gpu_check.py prepare | run`` (see the module doc)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="export the artifacts and fetch the onnx2torch wheel (needs TensorFlow)")
    pp.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    pr = sub.add_parser("run", help="run the checks (no TensorFlow)")
    pr.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    pr.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    pr.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    pr.add_argument("--device", default=None, help="cuda (default) or cpu (default with --dry-run)")
    pr.add_argument("--budget-s", type=float, default=480.0, help="skip checks that would start later (s)")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.bundle), indent=2))
        return 0
    res = run(args.bundle, args.out, dry_run=args.dry_run, device=args.device, budget_s=args.budget_s)
    print((args.out / "gpu_check.md").read_text())
    return 1 if any(isinstance(v, dict) and "error" in v for v in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
