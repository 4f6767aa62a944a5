"""Environment facts read from package metadata: library versions and known conflicts.

Imports nothing heavy (no torch, no onnxruntime, no TensorFlow); ``mmbridge info`` adds the
execution providers and GPUs (:func:`mmbridge.cli.environment_report`).
"""

from __future__ import annotations

import platform
from importlib import metadata

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
    from mmbridge._version import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mmbridge": __version__}
    out.update({n: dist_version(n) for n in names})
    return out


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
