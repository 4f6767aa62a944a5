"""Environment facts: library versions, execution providers, GPUs, known conflicts (``mmbridge info``)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

# distributions whose versions determine an export (part of every artifact fingerprint)
EXPORT_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxoptimizer")
RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx2torch",
                         "onnxruntime-extensions", "transformers", "numpy", "protobuf")


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, or None; reads metadata only (imports nothing)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(names: tuple[str, ...] = EXPORT_DISTRIBUTIONS + RUNTIME_DISTRIBUTIONS) -> dict[str, str | None]:
    """``{distribution: version or None}`` plus ``python`` and ``mmbridge``, without importing them."""
    from . import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mmbridge": __version__}
    out.update({n: dist_version(n) for n in names})
    return out


# mmbridge's own modules that shape an exported graph: their bytes are part of every fingerprint,
# so a cached artifact is never reused after the export code changed.
_EXPORT_CODE = ("exporter.py", "trainable.py", "tf_ops.py")
_export_code_hash: str | None = None


def export_code_hash() -> str:
    """sha256 (first 16 hex digits) of mmbridge's export modules (:data:`_EXPORT_CODE`)."""
    global _export_code_hash
    if _export_code_hash is None:
        import hashlib
        from pathlib import Path

        h = hashlib.sha256()
        for name in _EXPORT_CODE:
            path = Path(__file__).with_name(name)
            h.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
        _export_code_hash = h.hexdigest()[:16]
    return _export_code_hash


def export_versions() -> dict[str, str]:
    """Versions that determine an exported graph (only the installed ones), and the export code hash."""
    from . import __version__

    v = {n: dist_version(n) for n in EXPORT_DISTRIBUTIONS}
    return {"mmbridge": __version__, "mmbridge_export_code": export_code_hash(), **{k: x for k, x in v.items() if x}}


def conflicts() -> list[str]:
    """Known-bad combinations of installed packages, each as a sentence with the fix.

    * ``onnxruntime`` and ``onnxruntime-gpu`` both installed: they share the ``onnxruntime``
      module, and whichever was installed last wins, so the CUDA execution provider can vanish
      and sessions fall back to CPU (microsoft/onnxruntime#26996).
    * ``tensorflow`` and ``tensorflow-cpu`` both installed: same module, two builds.
    """
    found = []
    if dist_version("onnxruntime") and dist_version("onnxruntime-gpu"):
        found.append(
            "both onnxruntime and onnxruntime-gpu are installed; the CUDA execution provider may silently "
            "disappear. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    if dist_version("tensorflow") and dist_version("tensorflow-cpu"):
        found.append(
            "both tensorflow and tensorflow-cpu are installed; keep one: pip uninstall -y tensorflow-cpu"
        )
    return found


def report() -> dict[str, Any]:
    """Everything ``mmbridge info`` prints: versions, ORT providers, torch devices, conflicts."""
    info: dict[str, Any] = {"platform": platform.platform(), "executable": sys.executable, "versions": versions()}
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        info["onnxruntime_providers"] = f"unavailable: {exc}"
    try:
        import torch

        info["torch_cuda"] = torch.cuda.is_available()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except Exception as exc:  # noqa: BLE001
        info["gpus"] = f"unavailable: {exc}"
    from .artifact import cache_root

    info["cache"] = str(cache_root())
    info["conflicts"] = conflicts()
    return info
