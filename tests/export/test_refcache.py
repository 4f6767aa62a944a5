"""A cache hit of a "module:attribute" reference starts no TensorFlow and no child process
(mmbridge.export.refcache), and any change to a source file the builder loaded re-exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.tf

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import mmbridge
    t = time.perf_counter()
    art = mmbridge.export("user_scale:build")
    import torch
    y = mmbridge.to_ort(art)(torch.ones(1, 2)).tolist()
    print(json.dumps({"s": time.perf_counter() - t, "tf": "tensorflow" in sys.modules, "path": str(art.path), "y": y}))
""")

BUILDER = textwrap.dedent("""
    def build():
        from mmbridge.export._tf import import_tensorflow
        tf = import_tensorflow()

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def scale(x):
            return x * {k}

        return scale
""")


def _run(tmp_path):
    env = dict(os.environ, MMBRIDGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reference_cache_hit_without_tensorflow_and_invalidation(tmp_path):
    (tmp_path / "user_scale.py").write_text(BUILDER.format(k="2.0"))
    first = _run(tmp_path)
    assert first["y"] == [[2.0, 2.0]]
    second = _run(tmp_path)
    assert second["path"] == first["path"] and not second["tf"] and second["y"] == [[2.0, 2.0]]
    records = list((tmp_path / "cache" / "refs").glob("*.json"))
    assert len(records) == 1
    files = json.loads(records[0].read_text())["files"]
    assert str((tmp_path / "user_scale.py").resolve()) in files
    (tmp_path / "user_scale.py").write_text(BUILDER.format(k="3.0"))  # the builder changed
    third = _run(tmp_path)
    assert third["y"] == [[3.0, 3.0]] and third["path"] != first["path"]
