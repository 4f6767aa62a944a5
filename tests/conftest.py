"""Shared test fixtures.

* The torch compiler stack is loaded before anything imports TensorFlow (see mmbridge._torch_stack).
* Every test session uses a fresh artifact cache (``MMBRIDGE_CACHE``) unless one is set.
* ``tf`` / ``keras`` fixtures import TensorFlow the safe way and skip when it is missing.
* ``pokedex_dir``: the real test data beside the repo (``../shared/data/pokedex``), else skip.
* ``gpu`` tests are skipped without CUDA.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import mmbridge

mmbridge.preload_torch_stack()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if "MMBRIDGE_CACHE" not in os.environ:
    import atexit
    import shutil

    os.environ["MMBRIDGE_CACHE"] = tempfile.mkdtemp(prefix="mmbridge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMBRIDGE_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tf():
    pytest.importorskip("tf2onnx")
    try:
        return mmbridge.export._tf.import_tensorflow()
    except ImportError:
        pytest.skip("TensorFlow is not installed (install mmbridge[tf])")


@pytest.fixture(scope="session")
def keras(tf):
    import keras as _keras

    return _keras


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (test data beside the repo) is not present")
    return SHARED


@pytest.fixture(scope="session")
def pokedex_dir(shared_dir) -> Path:
    d = shared_dir / "data" / "pokedex"
    if not (d / "text.csv").is_file():
        pytest.skip(f"{d} is not present")
    return d
