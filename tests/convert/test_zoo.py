"""The foundation zoo through the *trainable* export at opset 18 and the torch backend (issue 3).

``keras.applications`` MobileNetV2 (alpha 0.35), EfficientNetB0, a mini ConvNeXt (ConvNeXtTiny's
constructor with fewer, narrower blocks; ConvNeXtTiny itself and ResNet50 with ``MMBRIDGE_ZOO=1``) with
``weights=None``, ``include_top=False``, ``pooling="avg"``, exported with ``trainable=True`` at
opset 18 (test_export.py covers the inference export at the default opset 17). Each converted
module must have exactly Keras's trainable-parameter count and every BatchNormalization as a
real BN layer, match Keras at another batch size than the exported one, run under bf16
autocast, trace under ``torch.compile`` without graph breaks, and take a DDP step on 2 gloo
processes. Spatial size 32 (64 for ConvNeXtTiny): the graphs are the same as at 224, only the
parity run is cheaper.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.convert import core as tb
from mmbridge.parity import TOLERANCES

pytestmark = [pytest.mark.tf, pytest.mark.slow]

ZOO = {"ResNet50": 32, "MobileNetV2": 32, "EfficientNetB0": 32, "ConvNeXtMini": 32, "ConvNeXtTiny": 64}
if not os.environ.get("MMBRIDGE_ZOO"):
    # ResNet50 (~4 min of export, contract and DDP here) and ConvNeXtTiny (~3 min with its row in
    # test_exporter.py; 8.0 GB peak, measured before the export memory cut) run with MMBRIDGE_ZOO=1
    # only, to keep CI well under 30 minutes.
    # ResNet50's layers are MobileNetV2's and EfficientNetB0's (Conv, BatchNorm, ReLU, Add);
    # ConvNeXtMini is ConvNeXtTiny's own constructor with fewer, narrower blocks (every layer type).
    del ZOO["ResNet50"], ZOO["ConvNeXtTiny"]
BN_COUNTS = {"ResNet50": 53, "MobileNetV2": 52, "EfficientNetB0": 49, "ConvNeXtMini": 0, "ConvNeXtTiny": 0}
PIXEL_INPUTS = ("EfficientNetB0", "ConvNeXtMini", "ConvNeXtTiny")  # rescale 0-255 pixels inside the model


def build_application(keras, arch: str, size: int):
    """``keras.applications.ARCH(weights=None, include_top=False, pooling="avg")`` at ``size`` px;
    ``"ConvNeXtMini"``: ``keras.applications.convnext.ConvNeXt`` (the function ConvNeXtTiny calls,
    Keras 3's own code) with depths [1, 1, 2, 1] and widths [16, 32, 48, 64] in place of [3, 3, 9, 3]
    and [96, 192, 384, 768]: the same layers (4x4/4 stem Conv + channels-last LayerNormalization,
    depthwise 7x7 Conv, Dense x4 + exact GELU, Dense, LayerScale, residual Add, 2x2/2 downsampling),
    114 k parameters instead of 28 M."""
    kw = {"weights": None, "include_top": False, "pooling": "avg", "input_shape": (size, size, 3)}
    if arch == "ConvNeXtMini":
        from keras.src.applications.convnext import ConvNeXt

        return ConvNeXt(depths=[1, 1, 2, 1], projection_dims=[16, 32, 48, 64], name="convnext_mini", **kw)
    if arch == "MobileNetV2":
        kw["alpha"] = 0.35
    return getattr(keras.applications, arch)(**kw)


def _inputs(arch: str, size: int, batch: int, seed: int) -> np.ndarray:
    """EfficientNet and ConvNeXt rescale 0-255 pixels inside the model; the others take [-1, 1]."""
    high, low = (255.0, 0.0) if arch in PIXEL_INPUTS else (1.0, -1.0)
    return np.random.default_rng(seed).uniform(low, high, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def zoo(keras, tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo18")
    built: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in built:
            keras.utils.set_random_seed(0)
            model = build_application(keras, arch, ZOO[arch])
            art = mmbridge.export(model, name=f"{arch}_train18", trainable=True, opset=18, cache_dir=cache)
            built[arch] = (model, art)
        return built[arch]

    return get


@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_opset18_trainable_counts_parity_batch_and_bf16(zoo, keras, arch):
    model, art = zoo(arch)
    assert art.meta["opset"] == 18
    tm = art.to_torch()
    assert tm.training is False
    n_keras = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    assert tb.parameter_count(tm) == n_keras
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == BN_COUNTS[arch]
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tm.modules()) == BN_COUNTS[arch]
    x = _inputs(arch, ZOO[arch], batch=3, seed=1)  # the golden pair was exported at batch 2
    ref = np.asarray(model(x, training=False))
    with torch.no_grad():
        got = tm(torch.from_numpy(x)).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = tm(torch.from_numpy(x)).float().numpy()
    assert got.shape == ref.shape == (3, model.output_shape[-1])
    scale = float(np.abs(ref).max())  # randomly initialised nets: outputs as small as 1e-6
    tol = TOLERANCES[("torch", "float32")]
    assert float(np.abs(got - ref).max()) <= tol.atol * scale + tol.rtol * scale * 10
    bf16 = TOLERANCES[("autocast", "bfloat16")]
    assert float(np.abs(got_bf16 - ref).max()) <= (bf16.atol + bf16.rtol) * scale
    assert np.isfinite(got_bf16).all()


@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_opset18_export_proves_the_training_contract(zoo, arch):
    """The export itself ran the weight audit and 3 SGD steps of train parity (issue 12)."""
    model, art = zoo(arch)
    audit, tp = art.meta["audit"], art.meta["train_parity"]
    assert audit["passed"] and audit["torch_trainable_values"] == audit["keras_trainable_values"]
    assert audit["counts"]["batch_norms"] == BN_COUNTS[arch]
    assert tp["passed"] and tp["steps"] == 3 and tp["batch"] >= 4, tp.get("first_failure")
    floats = [w for w in model.weights if w.dtype.startswith("float")]  # not Normalization's int count
    assert len(tp["rows"]) == len(audit["matched"]) == len(floats) - len(audit["constants"])
    assert all("normalization" in c for c in audit["constants"])  # EfficientNet's adapted mean / variance only
    assert tp["worst_ratio"] < 1.0
    assert max(r["moved"] for r in tp["rows"]) > 1e-4  # the steps really trained
    if arch == "EfficientNetB0":  # stochastic depth: Dropout(noise_shape=(None, 1, 1, 1)) kept, per sample
        from mmbridge.convert.ops.dropout import PerSampleDropout

        shaped = [ly for ly in art.meta["keras_inventory"]["layers"] if ly["kind"] == "dropout" and ly["noise_shape"]]
        assert shaped and sum(isinstance(m, PerSampleDropout) for m in art.to_torch().modules()) == len(shaped)
    print(f"{arch}: export {art.meta['export_seconds']:.1f} s, of which contract {art.meta['contract_seconds']:.1f} s; "
          f"({art.meta['contract_breakdown']}); worst train-parity ratio {tp['worst_ratio']:.3f}")


@pytest.mark.parametrize("arch", list(ZOO))
def test_zoo_opset18_traces_without_graph_breaks(zoo, arch):
    import torch._dynamo as dynamo

    _, art = zoo(arch)
    tm = art.to_torch()
    x = torch.from_numpy(_inputs(arch, ZOO[arch], batch=2, seed=2))
    dynamo.reset()
    explanation = dynamo.explain(tm)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    if arch == "EfficientNetB0":  # the one the issue found failing under torch.compile
        compiled = torch.compile(tm, backend="eager", fullgraph=True, dynamic=True)
        with torch.no_grad():
            for batch in (2, 5):
                xb = torch.from_numpy(_inputs(arch, ZOO[arch], batch=batch, seed=batch))
                torch.testing.assert_close(compiled(xb), tm(xb))


_DDP_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from mmbridge.artifact import BridgeArtifact
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for path, size, low, high in json.loads(sys.argv[1]):
        enc = BridgeArtifact.load(path).to_torch().train()
        ddp = torch.nn.parallel.DistributedDataParallel(enc)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x = torch.from_numpy(np.random.default_rng(rank).uniform(low, high, (2, size, size, 3)).astype(np.float32))
        ddp(x).pow(2).mean().backward()
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in enc.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        moved = float(max((p.grad.abs().max() for p in enc.parameters() if p.grad is not None), default=0.0))
        result[path] = {"rank_diff": float((gathered[0] - gathered[1]).abs().max()), "max_grad": moved,
                        "n_params": int(flat.numel())}
    if rank == 0:
        json.dump(result, open(sys.argv[2], "w"))
    dist.barrier()  # tear down together: gloo can abort a rank that exits while its peer still works
    dist.destroy_process_group()
""")


@pytest.mark.ddp
def test_zoo_opset18_two_process_gloo_ddp_step(zoo, tmp_path):
    jobs = []
    for arch, size in ZOO.items():
        _, art = zoo(arch)
        low, high = (0.0, 255.0) if arch in PIXEL_INPUTS else (-1.0, 1.0)
        jobs.append([str(art.path), size, low, high])
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(tmp_path / "worker.py"), json.dumps(jobs), str(tmp_path / "out.json")]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("2-process gloo DDP step on the zoo did not finish within 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    for arch, (path, *_) in zip(ZOO, jobs):
        r = res[path]
        assert r["rank_diff"] == 0.0, (arch, r)  # DDP kept both replicas identical after the step
        assert r["max_grad"] > 0.0, (arch, r)  # and gradients reached the converted weights
        assert r["n_params"] == tb.parameter_count(zoo(arch)[1].to_torch()), arch
