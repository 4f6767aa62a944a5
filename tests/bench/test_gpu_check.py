"""benchmarks/gpu_check.py: the GPU check's CPU dry run (the same code path at tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.tf
@pytest.mark.slow
def test_prepare_then_dry_run_writes_two_files_with_every_check(gpu_check, tf, tmp_path):
    bundle = tmp_path / "bundle"
    manifest = gpu_check.prepare(bundle, sides=(16,))
    assert manifest["wheels"] and manifest["wheels"][0].startswith("onnx2torch-")
    size_mib = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    assert size_mib < 64, f"the bundle must fit the GPU machine's 64 MiB carry limit, is {size_mib:.1f} MiB"
    out = tmp_path / "out"
    res = gpu_check.run(bundle, out, dry_run=True)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # <= 8 files come back
    assert json.loads((out / "gpu_check.json").read_text())["device"] == "cpu"
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    fwd = res["encoder_fwd"]
    assert fwd["params_converted"] == fwd["params_native"] == fwd["params_keras"] == 6192
    assert res["compile"]["graph_breaks"] == 0
    assert res["ddp"]["backend"] == "gloo" and res["ddp"]["parameters_updated"] == res["ddp"]["parameters"]
    assert res["hybrid_step"]["provider"] == "CPUExecutionProvider" and res["hybrid_step"]["step_ms"] > 0
    assert "| encoder_train |" in (out / "gpu_check.md").read_text()
