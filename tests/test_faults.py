"""Fault injection (issue 15, hardening): damaged artifacts must give a clear
:class:`~mmbridge.errors.CacheError` naming the file and the fix, never a silent wrong value or
a bare traceback. Everything is made in ``tmp_path``: no TensorFlow.

Artifacts: a cached ``model.onnx`` altered without changing its size, a ``meta.json`` without
required keys or with malformed specs, a ``meta.json`` whose tolerance was loosened to hide wrong
weights, an artifact without (or with an altered) ``golden.npz``. Tiny graphs from ``onnx.helper``.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mmbridge import BridgeArtifact, CacheError, Tolerance
from mmbridge.artifact import cached_or_build
from mmbridge.cli import build_parser, main
from mmbridge.errors import ParityError
from mmbridge.parity import MissingGoldenError, verify
from mmbridge.store import GOLDEN_FILE, META_FILE, MODEL_FILE


# ------------------------------------------------------------------------------------- cache
def _double_model(k: float = 2.0) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [k])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _meta(**extra):
    return {"role": "preprocess", "opset": 17,
            "inputs": [{"name": "x", "shape": ["batch", 3], "dtype": "float32", "layout": "NC", "value_range": None}],
            "outputs": [{"name": "y", "shape": ["batch", 3], "dtype": "float32"}], **extra}


def _golden():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {"inputs": {"x": x}, "outputs": {"y": 2 * x}}


def _artifact(dest: Path, *, k: float = 2.0, golden: bool = True, name: str = "double", **extra) -> BridgeArtifact:
    meta = dict(_meta(**extra), name=name, fingerprint="d" * 64)
    return BridgeArtifact.write(dest, _double_model(k), meta, _golden() if golden else None)


def _alter_weight_in_place(path: Path) -> None:
    """2.0 -> 2.95 inside model.onnx: same size, different bytes (a bit flip on disk, a bad copy)."""
    data = path.read_bytes()
    two = struct.pack("<f", 2.0)
    assert data.count(two) == 1
    path.write_bytes(data.replace(two, struct.pack("<f", 2.95)))


def _rebuild_hint(text: str) -> bool:
    return "force=True" in text and "--force" in text


def test_same_size_corruption_is_caught_on_a_cache_hit_and_rebuilt(tmp_path, caplog):
    build = lambda: (_double_model(), _meta(), _golden())  # noqa: E731
    art, hit = cached_or_build("double", "c" * 64, build, root=tmp_path)
    size = art.onnx_path.stat().st_size
    _alter_weight_in_place(art.onnx_path)
    assert art.onnx_path.stat().st_size == size
    for check in (True, "size"):  # "size" was the hit check: it now checks the content too
        with pytest.raises(CacheError, match=r"model\.onnx does not match the sha256") as info:
            BridgeArtifact.load(art.path, check=check)
        assert _rebuild_hint(str(info.value))
    with caplog.at_level(logging.WARNING, logger="mmbridge.artifact"):
        art2, hit2 = cached_or_build("double", "c" * 64, build, root=tmp_path)
    assert not hit2 and "unusable and will be rebuilt" in caplog.text
    x = np.ones((1, 3), np.float32)
    assert verify(art2).passed and verify(art2, {"x": x}, reference={"y": 2 * x}).rows[0].max_abs == 0.0
    assert cached_or_build("double", "c" * 64, build, root=tmp_path)[1]  # and then a hit again


def test_meta_json_without_required_keys(tmp_path):
    art = _artifact(tmp_path / "a")
    meta = json.loads((art.path / META_FILE).read_text())
    for key in ("inputs", "name"):
        meta.pop(key)
    (art.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"meta\.json lacks the required key\(s\) \['name', 'inputs'\]") as info:
        BridgeArtifact.load(art.path)
    assert _rebuild_hint(str(info.value))
    with pytest.raises(CacheError, match="lacks the required key"):  # the ORT backend's own loader too
        __import__("mmbridge").to_ort(str(art.path))
    assert main(["verify", str(art.path)]) == 2


def test_meta_json_malformed_specs_and_json(tmp_path):
    art = _artifact(tmp_path / "a")
    meta = json.loads((art.path / META_FILE).read_text())
    meta["inputs"] = [{"name": "x"}]  # no shape
    (art.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"meta\.json is malformed: input spec 'x' is malformed \(KeyError"):
        BridgeArtifact.load(art.path, check=False)
    (art.path / META_FILE).write_text("[1, 2]")
    with pytest.raises(CacheError, match="holds a JSON list, not an object"):
        BridgeArtifact.load(art.path)


def test_tampered_tolerance_in_meta_json_does_not_pass_wrong_weights(tmp_path, capsys):
    loose = Tolerance(100.0, 0.0, "tampered").to_dict()
    wrong = _artifact(tmp_path / "w", k=2.95, tolerance=loose)  # wrong weights, meta.json loosened to hide them
    with pytest.raises(ParityError, match=r"(?s)max_abs=4\.75.*records tolerance .*not trusted from the file"):
        verify(wrong)
    report = verify(wrong, raise_on_failure=False)
    assert not report.passed and report.rows[0].tolerance.atol == 1e-5  # the table's ("onnx", "float32")
    assert main(["verify", str(wrong.path)]) == 1
    assert "verify does not trust from the file" in capsys.readouterr().err
    # the caller may state a tolerance in code: a stricter one on a good artifact is used as given
    good = _artifact(tmp_path / "g", tolerance=loose)
    exact = Tolerance(0.0, 0.0, "exact")
    rows = verify(good, tolerance=exact).rows
    assert rows[0].passed and rows[0].tolerance == exact
    assert main(["verify", str(good.path), "--atol", "0", "--rtol", "0"]) == 0


def test_registered_bridge_states_its_tolerance_in_code(tmp_path):
    """A bridge with documented looser numerics keeps them: from its registration, not its meta.json."""
    import mmbridge
    from mmbridge.registry import bridges

    art = _artifact(tmp_path / "a", k=2.0005, name="faults_documented_loose")  # max_abs 2.5e-3 at x = 5
    assert not verify(art, raise_on_failure=False).passed  # the table (1e-5 + 1e-4 |ref|)
    mmbridge.register_bridge("faults_documented_loose", role="preprocess", input_specs=art.input_specs,
                             tolerance=Tolerance(1e-2, 0.0, "documented"))(lambda: None)
    try:
        report = verify(art)
        assert report.passed and report.rows[0].tolerance.reason == "documented"
    finally:
        bridges.unregister("faults_documented_loose")


def test_missing_golden_is_a_clear_error_with_exit_code(tmp_path, capsys):
    art = _artifact(tmp_path / "a", golden=False)
    assert not (art.path / GOLDEN_FILE).exists()
    with pytest.raises(MissingGoldenError, match=r"golden\.npz is missing") as info:
        verify(art)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CacheError)
    assert _rebuild_hint(str(info.value)) and "re-export" in str(info.value)
    assert main(["verify", str(art.path)]) == 2
    err = capsys.readouterr().err
    assert "mmbridge verify: error:" in err and "golden.npz is missing" in err and "--force" in err
    assert "Traceback" not in err


def test_altered_or_broken_golden(tmp_path):
    art = _artifact(tmp_path / "a")
    g = art.path / GOLDEN_FILE
    g.write_bytes(g.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(MissingGoldenError, match=r"golden\.npz does not match the sha256"):
        verify(art)
    meta = json.loads((art.path / META_FILE).read_text())
    meta.pop("golden_sha256")  # an artifact written before the golden digest was recorded
    (art.path / META_FILE).write_text(json.dumps(meta))
    g.write_bytes(b"PK not a zip")
    with pytest.raises(MissingGoldenError, match=r"golden\.npz is unreadable"):
        verify(BridgeArtifact.load(art.path))


def test_corrupt_model_on_cli_verify_and_export_has_force(tmp_path, capsys):
    art = _artifact(tmp_path / "a")
    _alter_weight_in_place(art.path / MODEL_FILE)
    assert main(["verify", str(art.path)]) == 2
    err = capsys.readouterr().err
    assert "does not match the sha256" in err and "--force" in err
    args = build_parser().parse_args(["export", "pkg:fn", "--out", str(tmp_path / "o"), "--force"])
    assert args.force is True
