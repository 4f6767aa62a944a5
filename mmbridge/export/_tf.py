"""TensorFlow, imported the one safe way: the only place mmbridge imports TensorFlow.

Everything that touches TensorFlow lives in :mod:`mmbridge.export` (and the Keras-only
baseline, :mod:`mmbridge.baselines`, and the tf.data adapter), and gets TF from
:func:`import_tensorflow`, which loads torch's compiler stack first (see
:mod:`mmbridge._torch_stack` for why the order matters).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from mmbridge._torch_stack import guard_torch_stack, preload_torch_stack, tf_loaded
from mmbridge.runtime.extensions import preload_extensions


def import_tensorflow() -> ModuleType:
    """Import TensorFlow safely and return the ``tensorflow`` module.

    Loads the torch stack first, quiets TF's C++ logging (``TF_CPP_MIN_LOG_LEVEL=2`` unless set),
    and hides GPUs from TF on first import so that export does not reserve GPU memory that the
    training process needs (set ``MMBRIDGE_TF_GPU=1`` to keep them visible).

    Raises:
        ImportOrderError: TF was imported before the torch stack (see module doc).
        ImportError: TensorFlow is not installed; install the ``tf`` extra.
    """
    first = not tf_loaded()
    if first:
        preload_torch_stack()
        # onnxruntime-extensions must bind its own RE2 before TF's copy is loaded, or its regex
        # ops silently return their input (measured; see mmbridge.runtime.extensions)
        preload_extensions()
    else:
        guard_torch_stack("mmbridge's TensorFlow export")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        tf = importlib.import_module("tensorflow")
    except ImportError as exc:
        raise ImportError(
            "TensorFlow is needed to export bridges but is not installed. "
            "Install it with: pip install 'mmbridge[tf]'"
        ) from exc
    if first:
        tf.get_logger().setLevel("ERROR")  # tf2onnx calls TF-1 freezing APIs that log deprecations
    if first and os.environ.get("MMBRIDGE_TF_GPU") != "1":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # devices already initialised by the user's own TF code
            pass
    return tf
