"""onnxruntime-extensions (string custom ops, domain ``ai.onnx.contrib``): loading it safely.

No TensorFlow here; :mod:`mmbridge.export._tf` calls :func:`preload_extensions` before it
imports TensorFlow, and :func:`mmbridge.runtime.session.make_session` before it registers the
library with a session.
"""

from __future__ import annotations

import numpy as np

CONTRIB_DOMAIN = "ai.onnx.contrib"
#: Custom-op domains that onnxruntime-extensions provides (string ops); registered on demand.
EXTENSIONS_DOMAINS = (CONTRIB_DOMAIN,)


def uses_extensions(model) -> bool:
    """True if an ``onnx.ModelProto`` imports an onnxruntime-extensions custom-op domain."""
    return any(op.domain in EXTENSIONS_DOMAINS for op in getattr(model, "opset_import", ()))


def preload_extensions() -> bool:
    """Load onnxruntime-extensions' library so that its RE2 binds to its own symbols.

    Measured on this stack: when TensorFlow is imported first, the extensions library loaded
    afterwards resolves RE2 to TensorFlow's copy, and ``StringRegexReplace`` silently returns
    its input unchanged. Loading the library once with ``RTLD_DEEPBIND`` (before anything else
    loads it) avoids that; later ``dlopen`` calls by onnxruntime reuse this handle.

    Returns:
        True if the library is (now) loaded with deep binding or was loaded before TensorFlow;
        False if it was already loaded after TensorFlow (string regex ops are then unreliable in
        this process) or is not installed.
    """
    import ctypes
    import glob
    import importlib.util
    import os
    import sys

    global _EXT_STATE
    if _EXT_STATE is not None:
        return _EXT_STATE
    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or not spec.submodule_search_locations:
        _EXT_STATE = False
        return False
    if "onnxruntime_extensions._extensions_pydll" in sys.modules:
        _EXT_STATE = "tensorflow" not in sys.modules or _re2_works()
        return _EXT_STATE
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_extensions_pydll*.so"))
    if libs and hasattr(os, "RTLD_DEEPBIND"):
        ctypes.CDLL(libs[0], mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    _EXT_STATE = _re2_works()
    return _EXT_STATE


_EXT_STATE: bool | None = None


def _re2_works() -> bool:
    """Run ``StringRegexReplace("ABA", "A", "a")`` in onnxruntime; True if it gives ``"aBa"``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("StringRegexReplace", ["x", "p", "r"], ["y"], domain=CONTRIB_DOMAIN, global_replace=1)
    graph = helper.make_graph(
        [node], "re2_check", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
        initializer=[numpy_helper.from_array(np.array(["A"], object), "p"),
                     numpy_helper.from_array(np.array(["a"], object), "r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    try:
        from onnxruntime_extensions import get_library_path

        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.array(["ABA"], object)})[0]
    except Exception:  # noqa: BLE001 - extensions missing or broken
        return False
    return str(out[0]) == "aBa"
