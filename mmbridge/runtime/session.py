"""Creating onnxruntime sessions the same way everywhere in mmbridge."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mmbridge.runtime.extensions import EXTENSIONS_DOMAINS, preload_extensions, uses_extensions  # noqa: F401


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
    ort = import_onnxruntime()
    if any((p if isinstance(p, str) else p[0]) == "CUDAExecutionProvider" for p in providers):
        preload_cuda_libraries()
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

        preload_extensions()  # before the library is first registered (RE2 symbol binding)

        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model, sess_options=so, providers=list(providers))


def available_providers() -> list[str]:
    """onnxruntime's available execution providers (``onnxruntime.get_available_providers()``)."""
    return list(import_onnxruntime().get_available_providers())


def import_onnxruntime() -> Any:
    """Import and return the ``onnxruntime`` module.

    Raises:
        RuntimeBackendError: no onnxruntime distribution is installed; says which extra to install.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        from mmbridge.errors import RuntimeBackendError

        raise RuntimeBackendError(
            "onnxruntime is not installed; mmbridge needs it to check exports and to run frozen bridges. Install "
            "exactly one of: pip install 'mmbridge[ort]' (CPU) or pip install 'mmbridge[gpu]' (onnxruntime-gpu, "
            "CUDA machines; never both)") from exc
    return ort


_CUDA_PRELOADED = False


def preload_cuda_libraries() -> bool:
    """Load the CUDA / cuDNN libraries onnxruntime-gpu needs, once, before its first CUDA session.

    Uses ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21), which loads them from the
    ``nvidia-*`` wheels or torch's own copies (torch imported first, as ``import mmbridge`` does).
    Returns False where onnxruntime has no ``preload_dlls`` or it failed (the CUDA provider then
    loads its libraries itself, and :func:`cuda_provider_error` explains a failure).
    """
    global _CUDA_PRELOADED
    if _CUDA_PRELOADED:
        return True
    ort = import_onnxruntime()
    if not hasattr(ort, "preload_dlls"):
        return False
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - a failed preload is reported when the CUDA provider is checked
        return False
    _CUDA_PRELOADED = True
    return True


def bare_runners(model: Any, inputs: dict[str, Any], *, cuda: bool = False, threads: int | None = None
                 ) -> tuple[Any, Any, str | None]:
    """Plain-onnxruntime baselines for the benchmarks: ``session.run`` and pre-bound IO binding.

    Args:
        model: path to a ``.onnx`` file (or anything :func:`make_session` takes).
        inputs: ``{input name: numpy array}`` (copied once to contiguous arrays).
        cuda: use the CUDA execution provider (device 0) and bind on the GPU.
        threads: intra-op threads (``None``: ORT's default); inter-op 1 when given.

    Returns:
        ``(run_session, run_bare, note)``: ``run_session()`` runs ``session.run`` with numpy in
        and out; ``run_bare()`` runs the public ``InferenceSession.run_with_iobinding`` on
        OrtValues bound once (no per-call allocation or binding); ``run_bare.floor()`` the same
        run as the pybind call itself (``sess._sess.run_with_iobinding(binding._iobinding,
        run_options)``, without the public wrapper's Python frame: ORT's floor from Python);
        both ``None`` and ``note`` saying why when CUDA was asked for and onnxruntime has no CUDA
        execution provider.
    """
    import numpy as np
    import onnxruntime as ort

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, None, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu only; see `mmbridge info`)"
    sess = make_session(str(model) if isinstance(model, os.PathLike) else model, providers=providers,
                        intra_op_threads=threads, inter_op_threads=1 if threads else None)
    feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}

    def run_session() -> Any:
        return sess.run(None, feeds)

    dev, dev_id = ("cuda", 0) if cuda else ("cpu", 0)
    binding = sess.io_binding()
    keep = []
    for k, v in feeds.items():
        ov = ort.OrtValue.ortvalue_from_numpy(v, dev, dev_id)
        keep.append(ov)
        binding.bind_ortvalue_input(k, ov)
    outs = sess.run(None, feeds)  # shapes of the outputs, to pre-allocate them
    for o, val in zip(sess.get_outputs(), outs):
        ov = ort.OrtValue.ortvalue_from_numpy(np.empty_like(val), dev, dev_id)
        keep.append(ov)
        binding.bind_ortvalue_output(o.name, ov)

    def run_bare() -> Any:
        sess.run_with_iobinding(binding)
        return keep

    c_sess, c_binding = getattr(sess, "_sess", None), getattr(binding, "_iobinding", None)
    if c_sess is not None and c_binding is not None:
        run_options = ort.RunOptions()
        c_run = c_sess.run_with_iobinding

        def run_floor() -> Any:
            c_run(c_binding, run_options)
            return keep
    else:  # pragma: no cover - other onnxruntime builds
        run_floor = run_bare

    run_bare.keep = keep  # type: ignore[attr-defined]
    run_bare.floor = run_floor  # type: ignore[attr-defined]
    return run_session, run_bare, None


def _file_uses_extensions(path: str) -> bool:
    import onnx

    return uses_extensions(onnx.load(path, load_external_data=False))


def cuda_pairing_problem() -> str | None:
    """:func:`mmbridge.info.cuda_pairing` for the installed torch and onnxruntime-gpu (None if they pair)."""
    import torch

    from mmbridge import info

    return info.cuda_pairing(torch.version.cuda, info.dist_version("onnxruntime-gpu"), info.ort_gpu_cuda_major())


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
    and ``onnxruntime-gpu`` are installed (microsoft/onnxruntime#26996, #23833), says
    that this conflict is the likely cause (via :func:`mmbridge.info.conflicts`).
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    from mmbridge import info  # metadata only

    found = {n: info.dist_version(n) for n in ("onnxruntime", "onnxruntime-gpu")}
    installed = ", ".join(f"{n}=={v}" for n, v in found.items() if v) or "no onnxruntime distribution"
    conflicts = [c for c in info.conflicts() if "onnxruntime" in c]
    pairing = cuda_pairing_problem()
    if conflicts:
        cause = "Cause: " + conflicts[0]
    elif pairing:
        cause = "Cause: " + pairing
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
