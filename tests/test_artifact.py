"""Artifact persistence and the cache, without TensorFlow (hand-made ONNX graphs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mmbridge import BridgeArtifact, CacheError
from mmbridge.artifact import cached_or_build, entry_dir
from mmbridge.parity import ParityReport, compare, load_golden, verify


def _double_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _meta():
    return {"role": "preprocess", "opset": 17, "inputs": [{"name": "x", "shape": ["batch", 3], "dtype": "float32",
                                                           "layout": "NC", "value_range": None}],
            "outputs": [{"name": "y", "shape": ["batch", 3], "dtype": "float32"}]}


def _golden():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {"inputs": {"x": x}, "outputs": {"y": 2 * x}}


def test_build_once_then_hit_and_verify_from_golden(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _double_model(), _meta(), _golden()

    art, hit = cached_or_build("double", "f" * 64, build, root=tmp_path)
    assert not hit and calls == [1]
    art2, hit2 = cached_or_build("double", "f" * 64, build, root=tmp_path)
    assert hit2 and calls == [1] and art2.path == art.path
    assert art2.input_specs[0].name == "x" and art2.output_names == ["y"]
    report = verify(art2)
    assert report.passed and report.rows[0].max_abs == 0.0
    assert set(load_golden(art2)["inputs"]) == {"x"}
    # no temporary directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double-ffffffffffffffff", "locks"]


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path):
    art, _ = cached_or_build("double", "e" * 64, lambda: (_double_model(), _meta(), _golden()), root=tmp_path)
    with open(art.onnx_path, "r+b") as f:  # a torn write
        f.truncate(10)
    with pytest.raises(CacheError, match="does not match the sha256"):
        BridgeArtifact.load(art.path)
    art2, hit = cached_or_build("double", "e" * 64, lambda: (_double_model(), _meta(), _golden()), root=tmp_path)
    assert not hit and BridgeArtifact.load(art2.path).model.graph.node[0].op_type == "Mul"


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(CacheError, match="not a complete mmbridge artifact"):
        BridgeArtifact.load(tmp_path)
    assert entry_dir("a/b c", "0123456789abcdef0000", tmp_path).name == "a_b_c-0123456789abcdef"


def test_parity_compare_reports_required_atol_and_fails_on_shape_and_ints():
    ref = {"y": np.array([1.0, 100.0], np.float32)}
    # 1e-2 off at 100 passes (rtol 1e-4 * 100 = 1e-2, + atol 1e-5); 5e-4 off at 1.0 fails
    rows = compare({"y": np.array([1.0, 100.0 + 9e-3], np.float32)}, ref, backend="ort", stage="onnx")
    assert rows[0].passed
    rows = compare({"y": np.array([1.0 + 5e-4, 100.0], np.float32)}, ref, backend="ort", stage="onnx")
    assert not rows[0].passed and rows[0].max_abs == pytest.approx(5e-4, rel=1e-3)
    assert rows[0].required_atol == pytest.approx(5e-4 - 1e-4 * 1.0, rel=1e-3)
    rows = compare({"y": np.ones((3,), np.float32)}, ref, backend="ort", stage="onnx")
    assert not rows[0].passed and "shape [3]" in rows[0].problem
    rows = compare({"i": np.array([1, 2], np.int64)}, {"i": np.array([1, 3], np.int64)}, backend="ort", stage="onnx")
    assert not rows[0].passed and rows[0].tolerance.atol == 0
    rep = ParityReport(rows)
    with pytest.raises(AssertionError, match="does not compute what TensorFlow computes"):
        rep.raise_if_failed()
    assert ParityReport.from_dict(rep.to_dict()).to_dict() == rep.to_dict()


def test_parity_error_states_the_error_against_the_output_scale():
    """A float32 failure of ~1e-6 of the output's scale (NASNetLarge at 32 px: 1.7e-6 of max |y| 25.3, where TF's
    own float32 output is 1.4e-6 off float64) names the scale and points at the rounding diagnosis; a failure of
    5e-4 of the scale does not, and reports stored without ``ref_scale`` still load and raise."""
    ref = np.array([[25.0, -3.0, 1e-3, 0.5]], np.float32)
    got = ref + np.array([[4e-5, 0.0, 3e-5, 0.0]], np.float32)  # 3e-5 at |ref| 1e-3: needs atol ~3e-5 > 1e-5
    rows = compare({"y": got}, {"y": ref}, backend="ort", stage="onnx")
    assert not rows[0].passed and rows[0].ref_scale == pytest.approx(25.0)
    with pytest.raises(AssertionError) as e:
        ParityReport(rows).raise_if_failed("bridge 'deep'")
    msg = str(e.value)
    assert "= 1.6e-06 of the output's max |ref| 25" in msg, msg
    assert "tools/parity_by_layer.py" in msg and "float32 rounding" in msg
    rows = compare({"y": np.array([1.0 + 5e-4], np.float32)}, {"y": np.array([1.0], np.float32)},
                   backend="ort", stage="onnx")
    with pytest.raises(AssertionError) as e:
        ParityReport(rows).raise_if_failed()
    assert "= 0.0005 of the output's max |ref| 1" in str(e.value) and "float32 rounding" not in str(e.value)
    old = ParityReport(rows).to_dict()
    del old["rows"][0]["ref_scale"]  # a report written before the field existed
    with pytest.raises(AssertionError) as e:
        ParityReport.from_dict(old).raise_if_failed()
    assert "of the output's max |ref|" not in str(e.value)


def test_rounding_hint_needs_the_error_small_beside_atol_too_and_integer_outputs_have_no_scale():
    """One huge reference value (a -1e9 attention-mask fill) made a 0.05 error on logits of size 2 read as
    "5e-11 of the output's scale" with the float32-rounding hint (review 5); integer outputs (class ids)
    were given a scale too."""
    ref = np.array([[2.0, -1.0, -1e9, -1e9]], np.float32)
    rows = compare({"y": ref + np.array([[0.05, 0, 0, 0]], np.float32)}, {"y": ref}, backend="ort", stage="onnx")
    with pytest.raises(AssertionError) as e:
        ParityReport(rows).raise_if_failed("bridge 'masked'")
    assert "max_abs=0.05" in str(e.value) and "float32 rounding" not in str(e.value)
    ids = np.array([[3, 9]], np.int64)
    rows = compare({"i": ids + 1}, {"i": ids}, backend="ort", stage="onnx")
    assert not rows[0].passed and rows[0].ref_scale is None
