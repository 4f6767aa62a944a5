"""Fault injection (issue 15, hardening): damaged artifacts must give a clear
:class:`~mmbridge.errors.CacheError` naming the file and
the fix, never a silent wrong value or a bare traceback. Everything is made in ``tmp_path``:
no TensorFlow.

Artifacts: a cached ``model.onnx`` altered without changing its size, a ``meta.json`` without
required keys or with malformed specs. Tiny graphs from ``onnx.helper``.
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

from mmbridge import BridgeArtifact, CacheError
from mmbridge.artifact import cached_or_build
from mmbridge.cli import build_parser, main
from mmbridge.parity import verify
from mmbridge.store import META_FILE, MODEL_FILE


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


def test_corrupt_model_on_cli_verify_and_export_has_force(tmp_path, capsys):
    art = _artifact(tmp_path / "a")
    _alter_weight_in_place(art.path / MODEL_FILE)
    assert main(["verify", str(art.path)]) == 2
    err = capsys.readouterr().err
    assert "does not match the sha256" in err and "--force" in err
    args = build_parser().parse_args(["export", "pkg:fn", "--out", str(tmp_path / "o"), "--force"])
    assert args.force is True
