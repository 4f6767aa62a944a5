"""Creating onnxruntime sessions the same way everywhere in mmbridge."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# Custom-op domains that onnxruntime-extensions provides (string ops); registered on demand.
EXTENSIONS_DOMAINS = ("ai.onnx.contrib",)


def uses_extensions(model: Any) -> bool:
    """True if an ``onnx.ModelProto`` imports an onnxruntime-extensions custom-op domain."""
    return any(op.domain in EXTENSIONS_DOMAINS for op in getattr(model, "opset_import", ()))


def make_session(
    model: Any,
    *,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    graph_optimization_level: str = "ORT_ENABLE_ALL",
    options: dict[str, Any] | None = None,
    extensions: bool | None = None,
    config_entries: dict[str, str] | None = None,
) -> Any:
    """Create an ``onnxruntime.InferenceSession``.

    Args:
        model: ``onnx.ModelProto``, serialised bytes, or a path to a ``.onnx`` file.
        providers: execution providers in priority order (names or ``(name, options)`` pairs).
        intra_op_threads: threads inside one op (``SessionOptions.intra_op_num_threads``);
            ``None`` lets ORT decide (all cores).
        inter_op_threads: threads across ops.
        graph_optimization_level: a ``onnxruntime.GraphOptimizationLevel`` member name.
        options: extra ``SessionOptions`` attributes to set (``{"enable_mem_pattern": False}``).
        extensions: register onnxruntime-extensions' custom ops; ``None`` detects it from the
            model (a ``ModelProto`` or a path; serialised bytes are not inspected).
        config_entries: ``SessionOptions.add_session_config_entry`` pairs, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` (stop ORT's worker threads spinning
            after each run, which leaves the cores to torch between calls).

    Raises:
        onnxruntime's own errors (``InvalidGraph``, ``Fail``...) when the graph cannot load.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization_level)
    so.log_severity_level = int(os.environ.get("MMBRIDGE_ORT_LOG_LEVEL", "3"))
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        so.inter_op_num_threads = int(inter_op_threads)
    for key, value in (options or {}).items():
        setattr(so, key, value)
    for key, value in (config_entries or {}).items():
        so.add_session_config_entry(str(key), str(value))
    proto = None
    if hasattr(model, "SerializeToString"):
        proto = model
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    if extensions is None:
        extensions = (proto is not None and uses_extensions(proto)) or (
            isinstance(model, str) and _file_uses_extensions(model))
    if extensions:
        from onnxruntime_extensions import get_library_path

        from mmbridge.tf_ops import preload_extensions

        preload_extensions()  # before the library is first registered (RE2 symbol binding)

        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model, sess_options=so, providers=list(providers))


def _file_uses_extensions(path: str) -> bool:
    import onnx

    return uses_extensions(onnx.load(path, load_external_data=False))


def default_intra_op_threads() -> int:
    """Intra-op threads for one process so that the ranks on one host do not oversubscribe it.

    ``os.cpu_count() // LOCAL_WORLD_SIZE`` (``LOCAL_WORLD_SIZE`` is set by torchrun; 1 when
    unset or invalid), at least 1. With 4 ranks on a 32-core host each ORT session gets 8
    threads instead of 32 (ORT's default is one thread per core, per session).
    """
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_world = 1
    return max(1, (os.cpu_count() or 1) // local_world)


def cuda_provider_error(requested: str) -> str | None:
    """Why the CUDA execution provider cannot be used here, with the fix; ``None`` if it can.

    Args:
        requested: what asked for CUDA, for the message (e.g. ``"device='cuda:0'"``).

    The message names the installed onnxruntime distributions and, when both ``onnxruntime``
    and ``onnxruntime-gpu`` are installed (microsoft/onnxruntime#26996, #23833; case 22), says
    that this conflict is the likely cause (via :func:`mmbridge.info.conflicts`).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    from mmbridge import info

    found = {n: info.dist_version(n) for n in ("onnxruntime", "onnxruntime-gpu")}
    installed = ", ".join(f"{n}=={v}" for n, v in found.items() if v) or "no onnxruntime distribution"
    conflicts = [c for c in info.conflicts() if "onnxruntime" in c]
    if conflicts:
        cause = "Cause: " + conflicts[0]
    elif found.get("onnxruntime-gpu"):
        cause = ("Cause: onnxruntime-gpu is installed but its CUDA provider is not available (CUDA / cuDNN "
                 "libraries missing or of the wrong version). Fix: install the CUDA and cuDNN versions that "
                 f"onnxruntime-gpu {found['onnxruntime-gpu']} was built for, or `pip install onnxruntime-gpu[cuda,cudnn]`")
    else:
        cause = ("Cause: the CPU-only onnxruntime wheel is installed. Fix: pip uninstall -y onnxruntime && "
                 "pip install onnxruntime-gpu")
    return (
        f"CUDA was requested ({requested}) but onnxruntime {ort.__version__} offers only {available} "
        f"(installed: {installed}). {cause}. mmbridge never falls back to CPU silently; to run this branch "
        f"on CPU, move its inputs (or the module, with .to('cpu')) to the CPU."
    )
