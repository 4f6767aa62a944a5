"""Packaging and environment facts (mmbridge.info, mmbridge.runtime.session): one onnxruntime
distribution per install, and the CUDA pairing of torch and onnxruntime-gpu named with its fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import mmbridge
from mmbridge import info
from mmbridge.errors import RuntimeBackendError
from mmbridge.runtime import session

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_each_install_gets_exactly_one_onnxruntime_distribution():
    project = PYPROJECT["project"]
    assert not _names(project["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}, \
        "onnxruntime must come from an extra, or `mmbridge[gpu]` installs both (microsoft/onnxruntime#26996)"
    extras = project["optional-dependencies"]
    assert _names(extras["ort"]) & {"onnxruntime", "onnxruntime-gpu"} == {"onnxruntime"}
    assert _names(extras["gpu"]) & {"onnxruntime", "onnxruntime-gpu"} == {"onnxruntime-gpu"}
    for name, reqs in extras.items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= _names(reqs), f"extra {name!r} installs both"


def test_onnxruntime_floor_has_to_dlpack():
    """OrtValue.to_dlpack (outputs of unknown shape) is in inference wheels from 1.21 (#23110)."""
    for extra in ("ort", "gpu"):
        (req,) = [r for r in PYPROJECT["project"]["optional-dependencies"][extra] if r.startswith("onnxruntime")]
        floor = tuple(int(x) for x in req.split(">=")[1].split(".")[:2])
        assert floor >= (1, 21), req


def test_cuda_pairing_names_both_majors_and_the_fix():
    msg = info.cuda_pairing("13.0", "1.23.2", 12)
    assert msg is not None
    assert "CUDA 13.0" in msg and "CUDA 12" in msg and "onnxruntime-gpu 1.23.2" in msg
    assert "onnxruntime-gpu build for CUDA 13" in msg and "whl/cu12" in msg
    assert info.cuda_pairing("12.8", "1.23.2", 12) is None
    assert info.cuda_pairing(None, "1.23.2", 12) is None  # CPU build of torch
    assert info.cuda_pairing("13.0", None, None) is None  # no onnxruntime-gpu


def test_ort_gpu_cuda_major_reads_the_wheel_metadata(monkeypatch):
    reqs = ['nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"', 'nvidia-cudnn-cu12~=9.0; extra == "cudnn"', "numpy"]
    monkeypatch.setattr(info.metadata, "requires", lambda name: reqs if name == "onnxruntime-gpu" else [])
    assert info.ort_gpu_cuda_major() == 12

    def missing(name):
        raise info.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(info.metadata, "requires", missing)
    assert info.ort_gpu_cuda_major() is None


def test_cuda_provider_error_names_the_pairing(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(info, "conflicts", lambda: [])
    monkeypatch.setattr(session, "cuda_pairing_problem",
                        lambda: info.cuda_pairing("13.0", "1.23.2", 12))
    msg = session.cuda_provider_error("device='cuda:0'")
    assert "device='cuda:0'" in msg and "Cause: torch is built for CUDA 13.0" in msg
    assert "never falls back to CPU silently" in msg


def test_missing_onnxruntime_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(RuntimeBackendError, match=r"mmbridge\[ort\].*mmbridge\[gpu\]"):
        session.import_onnxruntime()


def test_info_reports_cuda_builds():
    from mmbridge.cli import environment_report

    rep = environment_report()
    import torch

    assert rep["torch_cuda_build"] == torch.version.cuda
    assert "onnxruntime_gpu_cuda_build" in rep and "conflicts" in rep
    assert mmbridge.versions()["mmbridge"] == mmbridge.__version__
