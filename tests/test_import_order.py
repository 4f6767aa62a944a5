"""Failure cases from ../shared/cases that the core owns: 01 (import order), 02 (Keras 3
Sequential, see test_export.py), 24 (dependency set). Each asserts the right value or the
clear error the case names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmbridge


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.tf
@pytest.mark.case("01")
def test_tf_imported_first_gives_import_order_error_not_segfault():
    """`import tensorflow` then torchvision segfaults (rc -11); mmbridge must raise instead."""
    r = _run(
        "import tensorflow\n"
        "import mmbridge\n"
        "try:\n"
        "    mmbridge.preload_torch_stack()\n"
        "except mmbridge.ImportOrderError as e:\n"
        "    print('ImportOrderError:', e)\n"
    )
    assert r.returncode == 0, f"rc={r.returncode} (-11 is the segfault) stderr={r.stderr[-1500:]}"
    assert "ImportOrderError:" in r.stdout and "torchvision" in r.stdout and "before `import tensorflow`" in r.stdout


@pytest.mark.tf
@pytest.mark.case("01")
def test_in_process_export_loads_torch_stack_first():
    r = _run(
        "import sys, mmbridge\n"
        "tf = mmbridge.export._tf.import_tensorflow()\n"
        "assert 'torchvision' in sys.modules and 'torch._dynamo' in sys.modules\n"
        "import onnx2torch, torchvision\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]


@pytest.mark.tf
@pytest.mark.case("01")
def test_export_of_reference_keeps_tensorflow_out_of_this_process(tmp_path):
    (tmp_path / "mmb_case01.py").write_text(
        "def build():\n"
        "    from mmbridge.export._tf import import_tensorflow\n"
        "    tf = import_tensorflow()\n"
        "    return tf.function(lambda x: x * 2.0 + 1.0, input_signature=[tf.TensorSpec([None, 3], tf.float32, name='x')])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys, mmbridge; a = mmbridge.export('mmb_case01:build', cache_dir=%r); "
         "import torchvision; print('tensorflow' in sys.modules, a.parity['passed'])" % str(tmp_path / "c")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False True"


@pytest.mark.case("24")
def test_dependency_set_resolves_and_versions_are_reported():
    v = mmbridge.versions()
    for name in ("onnx", "onnxruntime", "torch", "protobuf", "numpy"):
        assert v[name], f"{name} version not found"
    if v.get("tf2onnx"):
        # tf2onnx >= 1.17 needs protobuf >= 3.20 (not ~=3.20): the joint import works
        r = _run("import torch, torchvision, onnx2torch, onnx, onnxruntime, tf2onnx, tensorflow; print('ok')")
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-1500:]
    assert mmbridge.info.conflicts() == [] or all("installed" in c for c in mmbridge.info.conflicts())
