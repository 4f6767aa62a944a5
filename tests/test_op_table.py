"""docs/ops.md is generated from docs/tf2onnx_backend.json, and the run's classifier says what it means.

``tools/run_tf2onnx_backend_tests.py`` writes the JSON (it needs a tf2onnx checkout; see its
docstring) and ``tools/gen_op_table.py`` renders docs/ops.md from it. No TensorFlow here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"mmbridge_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return _tool("gen_op_table")


@pytest.fixture(scope="module")
def run():
    return _tool("run_tf2onnx_backend_tests")


def test_ops_md_is_rendered_from_the_run_json(gen):
    doc = json.loads((REPO / "docs" / "tf2onnx_backend.json").read_text(encoding="utf-8"))
    want = gen.render(doc)
    got = (REPO / "docs" / "ops.md").read_text(encoding="utf-8")
    assert got == want, "docs/ops.md is stale: run python tools/gen_op_table.py"
    assert doc["cases"], "the run recorded no case"
    # every op row comes from a recorded case's traced graph
    table = gen.aggregate(doc)
    measured = {op for c in doc["cases"] if any(not s.startswith("n/a") for s in c["status"].values())
                for op in c.get("tf_ops", [])}
    rows = {line.split("`")[1] for line in got.splitlines() if line.startswith("| `")}
    assert rows == set(table) == measured


def test_ops_md_counts_and_blames(gen):
    doc = {"meta": {"tf2onnx_tag": "v1.17.0", "command": "cmd", "versions": {}}, "cases": [
        {"id": "a", "variant": "static", "tf_ops": ["AddV2", "Mul"], "status": {"ort": "exact", "torch": "tolerance"},
         "max_abs": {"ort": 0.0, "torch": 3e-7}, "max_rel": {"torch": 1e-7}, "detail": {"ort": "", "torch": ""}},
        {"id": "b", "variant": "static", "tf_ops": ["AddV2", "SpaceToDepth"],
         "status": {"ort": "exact", "torch": "refused_torch"}, "max_abs": {},
         "detail": {"ort": "", "torch": "convert: ConversionError: no converter for SpaceToDepth"}},
        {"id": "c", "variant": "dynamic", "tf_ops": ["Cumprod"], "status": {"ort": "exact", "torch": "wrong"},
         "max_abs": {}, "detail": {"ort": "", "torch": "3 outputs, TF gives 1"}, "owner": "someone"},
        {"id": "d", "variant": "static", "tf_ops": ["Mul"], "status": {"ort": "n/a", "torch": "n/a"},
         "max_abs": {}, "detail": {}},
    ]}
    table = gen.aggregate(doc)
    assert dict(table["AddV2"]["torch"]) == {"tolerance": 1}  # the refusal of b names SpaceToDepth only
    assert dict(table["SpaceToDepth"]["torch"]) == {"refused": 1}
    assert table["AddV2"]["torch_err"] == pytest.approx(3e-7)
    assert dict(table["Mul"]["ort"]) == {"exact": 1}  # n/a is not counted
    md = gen.render(doc)
    assert "| `Cumprod` | 1 | exact | exact 1 | wrong | **wrong 1** |" in md
    assert "| `AddV2` | 2 | exact | exact 2 | tolerance | tolerance 1 (max abs 3.0e-07, rel 1.0e-07) |" in md
    assert "`Cumprod` **silently wrong** in `c [dynamic, torch] (owner: someone)`" in md


def _cmp(run, want, got, **kw):
    args = dict(rtol=1e-7, atol=1e-5, mtol=None, check_value=True, check_shape=True, check_dtype=True) | kw
    return run.compare(want, got, *args.values())[0]


def test_classifier_exact_tolerance_and_wrong(run):
    a = np.array([1.0, 2.0, np.nan], np.float32)
    assert _cmp(run, [a], [a.copy()]) == "exact"
    assert _cmp(run, [a], [a + np.float32(1e-6)]) == "tolerance"
    assert _cmp(run, [a], [a + np.float32(1e-2)]) == "wrong"
    assert _cmp(run, [a], [np.array([1.0, 2.0, 0.0], np.float32)]) == "wrong"  # NaN lost
    assert _cmp(run, [a], [a, a]) == "wrong"  # one output too many (a whole tuple returned)
    assert _cmp(run, [a], [a.reshape(3, 1)]) == "wrong"
    assert _cmp(run, [a], [a.astype(np.float64)]) == "wrong"
    assert _cmp(run, [a], [a.astype(np.float64)], check_dtype=False) == "exact"
    i = np.array([-4, -4, -1], np.int32)
    assert _cmp(run, [i], [np.array([-3, -3, 0], np.int32)]) == "wrong"  # truncating floordiv
    assert _cmp(run, [i], [i.copy()]) == "exact"
    assert _cmp(run, [np.zeros(100, np.float32)], [np.r_[np.ones(1), np.zeros(99)].astype(np.float32)], mtol=0.02) == "tolerance"


def test_selection_skips_what_it_says(run):
    assert run.skip_reason("test_string_lower")
    assert run.skip_reason("test_randomuniform")
    assert run.skip_reason("test_where_with_cond_only") is None  # 'cond' in a where test is not control flow
    assert run.skip_reason("test_matrix_set_diag_v3") is None
    assert run.skip_reason("test_conv2d_1") is None
