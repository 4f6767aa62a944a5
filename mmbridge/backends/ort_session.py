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
    proto = None
    if hasattr(model, "SerializeToString"):
        proto = model
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
    if proto is not None and uses_extensions(proto) or (isinstance(model, str) and _file_uses_extensions(model)):
        from onnxruntime_extensions import get_library_path

        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model, sess_options=so, providers=list(providers))


def _file_uses_extensions(path: str) -> bool:
    import onnx

    return uses_extensions(onnx.load(path, load_external_data=False))
