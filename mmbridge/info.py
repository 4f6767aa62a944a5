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


def ort_gpu_cuda_major() -> int | None:
    """The CUDA major version the installed ``onnxruntime-gpu`` wheel was built for, from its metadata.

    Read from the ``nvidia-*-cuNN`` requirements of its ``[cuda]`` / ``[cudnn]`` extras (PyPI's
    onnxruntime-gpu wheels declare them); ``None`` when onnxruntime-gpu is not installed or its
    metadata names no CUDA major. Imports nothing.
    """
    import re

    try:
        requires = metadata.requires("onnxruntime-gpu") or []
    except metadata.PackageNotFoundError:
        return None
    majors = {int(m.group(1)) for r in requires if (m := re.search(r"nvidia-[a-z0-9-]+-cu(\d+)", r))}
    return max(majors) if len(majors) == 1 else None


def cuda_pairing(torch_cuda: str | None, ort_gpu: str | None, ort_cuda_major: int | None) -> str | None:
    """Why torch's and onnxruntime-gpu's CUDA builds cannot share a process, with the fix; ``None`` if they can.

    Args:
        torch_cuda: ``torch.version.cuda`` (e.g. ``"13.0"``; ``None`` for a CPU build of torch).
        ort_gpu: the installed ``onnxruntime-gpu`` version, or ``None``.
        ort_cuda_major: the CUDA major ``onnxruntime-gpu`` was built for (:func:`ort_gpu_cuda_major`).

    A CUDA 12 build of onnxruntime-gpu beside torch built for CUDA 13 cannot load its CUDA
    execution provider (the CUDA runtime and cuBLAS / cuDNN sonames differ), yet
    ``get_available_providers()`` still lists it and sessions fall back to CPU.
    """
    if not torch_cuda or not ort_gpu or ort_cuda_major is None:
        return None
    try:
        torch_major = int(str(torch_cuda).split(".")[0])
    except ValueError:
        return None
    if torch_major == ort_cuda_major:
        return None
    return (f"torch is built for CUDA {torch_cuda} but onnxruntime-gpu {ort_gpu} for CUDA {ort_cuda_major}: "
            f"its CUDA execution provider cannot load beside torch's CUDA {torch_major} libraries. Fix: install an "
            f"onnxruntime-gpu build for CUDA {torch_major} (https://onnxruntime.ai/docs/install/ lists the "
            f"packages per CUDA major), or a torch build for CUDA {ort_cuda_major} "
            f"(pip install torch --index-url https://download.pytorch.org/whl/cu{ort_cuda_major}X)")
