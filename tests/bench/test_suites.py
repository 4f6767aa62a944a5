"""Tests of the benchmark harness and reports (no timing asserts: these machines are noisy).

* harness: interleaved timing, ratios against the baseline, skipped and failing variants;
* report: JSON round trip, Markdown table, PNG;
* the CLI at ``--size tiny``: every suite runs one tiny case, in a child process (TF, DDP).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbridge.bench import BenchRun, HarnessConfig, Result, Variant, measure_case
from mmbridge.bench import report as bench_report
from mmbridge.bench.suites import SUITES, US_TF_SUFFIX

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {"suite", "case", "variant", "baseline", "status", "note", "timing", "items_per_call", "samples_per_s",
            "ratio", "ratio_p25", "ratio_p75", "peak_rss_mib", "peak_py_mib", "peak_cuda_mib", "params", "extra",
            "median_ms"}
TINY = HarnessConfig(warmup=1, repeats=3, min_rep_s=0.001, max_case_s=5.0)


def _work(n: int):
    def fn():
        return sum(i * i for i in range(n))

    return fn


def _boom():
    raise RuntimeError("variant exploded")


def test_measure_case_rows_ratios_skips_and_errors():
    rows = measure_case(
        "unit", "sum of squares", [
            Variant("small", _work(2000)),
            Variant("big", _work(8000)),
            Variant("missing", None, "backend not installed"),
            Variant("broken", _boom),
        ], baseline="small", items_per_call=4, config=TINY,
    )
    by = {r.variant: r for r in rows}
    assert [r.variant for r in rows] == ["small", "big", "missing", "broken"]
    assert by["small"].ratio == 1.0 and by["small"].status == "ok"
    assert by["big"].status == "ok" and math.isfinite(by["big"].ratio) and by["big"].ratio > 0
    assert by["big"].ratio_p25 <= by["big"].ratio <= by["big"].ratio_p75
    assert len(by["big"].timing.times_ms) == 3 and by["big"].timing.median_ms > 0
    assert by["big"].samples_per_s == pytest.approx(4 / (by["big"].timing.median_ms / 1e3), rel=1e-3)
    assert by["missing"].status == "skipped" and by["missing"].note == "backend not installed"
    assert by["broken"].status == "error" and "RuntimeError: variant exploded" in by["broken"].note
    assert all(r.baseline == "small" for r in rows)


def test_measure_case_without_baseline_gives_no_ratio():
    rows = measure_case("unit", "c", [Variant("base", None, "nope"), Variant("x", _work(100))], baseline="base",
                        config=TINY)
    assert rows[1].status == "ok" and rows[1].ratio is None and "baseline 'base' skipped" in rows[1].note


def test_measure_case_rejects_unknown_baseline():
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the variants"):
        measure_case("unit", "c", [Variant("a", _work(10))], baseline="nope", config=TINY)


def test_report_files_round_trip(tmp_path):
    rows = measure_case("unit", "sum", [Variant("a", _work(500)), Variant("b", _work(1500))], baseline="a", config=TINY)
    run = BenchRun(results=rows, environment={"device": "cpu", "cpu": "test"}, config={"command": "mmbridge bench --x"},
                   started="2026-01-01T00:00:00Z")
    paths = bench_report.write_all(run, tmp_path)
    back = bench_report.load_json(paths["json"])
    assert [r.variant for r in back.results] == ["a", "b"]
    assert back.results[1].ratio == pytest.approx(rows[1].ratio)
    md = paths["markdown"].read_text()
    assert "| case | variant | baseline |" in md and "mmbridge bench --x" in md and "1 (baseline)" in md
    pytest.importorskip("matplotlib")
    assert paths["png"] is not None and paths["png"].stat().st_size > 1000


def test_merge_results_from_another_script():
    run = BenchRun()
    good = Result("ort", "c", "v", "v", ratio=1.0).to_dict()
    n = bench_report.merge_results(run, [good, {"not": "a row"}], source="bench_ort.py")
    assert n == 1 and run.results[0].note.endswith("from bench_ort.py")


def test_add_bench_parser_registers_the_subcommand():
    import argparse

    from mmbridge.cli.bench import add_bench_parser, run_from_args

    parser = argparse.ArgumentParser(prog="mmbridge")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--suites", "preprocess,cache", "--out", "x"])
    assert args.func is run_from_args and args.quick and args.suites == "preprocess,cache" and args.device == "cpu"


def test_unknown_suite_is_refused(tmp_path, capsys):
    from mmbridge.cli.bench import main

    assert main(["--size", "tiny", "--suites", "preprocess,nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite(s) ['nope']" in capsys.readouterr().err


@pytest.mark.tf
@pytest.mark.ddp
@pytest.mark.slow
def test_cli_tiny_runs_every_suite(tmp_path):
    """``python -m mmbridge.cli.bench --size tiny``: every suite, JSON + Markdown + PNG, sane rows."""
    pytest.importorskip("tf2onnx")
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "mmbridge.cli.bench", "--size", "tiny", "--no-external", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema_version"] == 1
    assert {"versions", "cpu", "device", "loadavg_1m", "ru_maxrss_mib"} <= set(doc["environment"])
    assert doc["config"]["size"] == "tiny"
    suites = {r["suite"] for r in doc["results"]}
    assert suites == set(SUITES), suites
    for r in doc["results"]:
        assert ROW_KEYS <= set(r), set(r) ^ ROW_KEYS
        assert r["status"] in ("ok", "skipped", "error"), r
        if r["status"] != "ok":
            assert r["note"], r  # every skip or error says why
            continue
        if "peak_live_mib" in r["extra"]:  # a tensor-memory row (harness.tensor_memory): no timing
            assert r["timing"] is None and r["extra"]["peak_live_mib"] > 0 and r["ratio"] > 0, r
            continue
        assert r["timing"]["median_ms"] > 0
        assert r["samples_per_s"] is None if r["suite"] == "cache" else r["samples_per_s"] > 0
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    # the numbers that need TF must have been measured (TF is installed: the `tf` marker)
    measured = {(r["suite"], r["variant"]) for r in doc["results"] if r["status"] == "ok"}
    assert {("preprocess", "tf"), ("preprocess", "ort_session"), ("encoders", "tf"), ("cache", "export_cache_hit"),
            ("amp", "bf16"), ("ddp", "2_ranks")} <= measured, measured
    # issue 16's input-pipeline case: the same JPEGs through tf.data and through mmbridge's loader + the bridge;
    # the decoders are bit-exact (tests/data/test_images.py), so the outputs differ only by the graph's rounding
    pipeline = {r["variant"]: r for r in doc["results"] if r["case"].startswith("input pipeline")}
    assert {"tf_data", "mmbridge_loader_ort", "mmbridge_loader_torch"} <= {v for v, r in pipeline.items()
                                                                          if r["status"] == "ok"}, pipeline
    for v in ("mmbridge_loader_ort", "mmbridge_loader_torch"):
        assert pipeline[v]["extra"]["max_abs_diff"] < 1e-4, pipeline[v]
        assert pipeline[v]["extra"]["throughput_vs_tf_data"] > 0
    # the Keras-3-on-torch variant: a child loading the same .keras file, without TensorFlow, same parameters
    keras_torch = {r["variant"]: r for r in doc["results"] if r["case"].endswith("Keras on torch")}
    assert {v for v, r in keras_torch.items() if r["status"] == "ok"} == {
        "keras_torch_backend", "torch_converted", "torch_native"}, keras_torch
    assert not any(r["extra"]["tensorflow_loaded"] for r in keras_torch.values())
    assert keras_torch["keras_torch_backend"]["params"]["keras_backend"] == "torch"
    counts = {v: r["note"].split(",")[1] for v, r in keras_torch.items()}  # "train step, N trainable params"
    assert len(set(counts.values())) == 1, counts
    # issue 16's microsecond graph: measured in a TF-free child (the goal rows) and in this TF-loaded process
    us = [r for r in doc["results"] if "norm + clip, b64" in r["case"]]
    child = [r for r in us if not r["case"].endswith(US_TF_SUFFIX)]
    assert {r["variant"] for r in child if r["status"] == "ok"} == {
        "ort_iobinding_floor", "ort_iobinding_bare", "ort_module", "ort_module_no_grad", "torch_converted",
        "torch_converted_unfused", "torch_native"}, child
    assert not any(r["extra"]["tensorflow_loaded"] for r in child)
    assert {r["case"] + US_TF_SUFFIX for r in child} == {r["case"] for r in us if r["case"].endswith(US_TF_SUFFIX)}
    assert [r["extra"]["max_abs_diff_vs_unfused"] for r in child if r["variant"] == "torch_converted"] == [0.0]
    md = (out / "bench.md").read_text()
    for suite in SUITES:
        assert f"## {suite}" in md
    assert (out / "bench.png").stat().st_size > 1000


def test_tensor_memory_counts_live_and_saved_tensors():
    """tensor_memory: peak of live storages created in the call, and what autograd saves (weights excluded)."""
    import torch

    from mmbridge.bench.harness import tensor_memory

    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(1024, 256)  # 1 MiB

    def fwd_no_grad():
        with torch.no_grad():
            a = torch.relu(lin(x))  # 1 MiB out of Linear, relu adds 1 MiB while both live
            del a

    m = tensor_memory(fwd_no_grad, params=list(lin.parameters()))
    assert 1.9 <= m["peak_live_mib"] <= 2.1 and m["saved_for_backward_mib"] == 0

    def fwd_grad():
        lin(x).relu_().sum()

    m = tensor_memory(fwd_grad, params=list(lin.parameters()))
    # saved: x (the Linear's input, 1 MiB; the weight is excluded) and relu_'s result (1 MiB)
    assert 1.9 <= m["saved_for_backward_mib"] <= 2.1
