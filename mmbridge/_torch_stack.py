"""Import order between TensorFlow and torch's compiler stack (no TensorFlow import here).

Why: in one process, ``import tensorflow`` followed by an import of torch's compiler stack
(torchvision, torch._dynamo, triton; onnx2torch pulls torchvision) exits with SIGSEGV
(tensorflow/tensorflow#57669). The reverse order works. TF also reserves GPU
memory it never returns. So:

* ``import mmbridge`` never imports TensorFlow;
* :func:`mmbridge.export._tf.import_tensorflow` (the export side) loads torch's stack first, hides
  GPUs from TF, then imports TF;
* :func:`guard_torch_stack` is called before mmbridge imports torchvision / onnx2torch / dynamo:
  if TF is already loaded and the stack is not, it raises :class:`ImportOrderError` with the fix
  instead of letting the process crash;
* exports given a SavedModel path or a ``"module:attribute"`` reference run in a spawned child
  (:mod:`mmbridge.export`), so a training process never loads TF at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from mmbridge.errors import ImportOrderError

# Modules whose import after TensorFlow segfaults (measured: torchvision, torch._dynamo, triton).
TORCH_STACK = ("torch", "torch._dynamo", "triton", "torchvision", "onnx2torch")

_FIX = (
    "Import torch, torchvision and onnx2torch (or simply `import mmbridge` and call "
    "mmbridge.preload_torch_stack()) before `import tensorflow`; or keep TensorFlow out of this "
    "process by exporting from a SavedModel path or a 'module:attribute' reference, which runs the "
    "export in a child process."
)


def tf_loaded() -> bool:
    """True if TensorFlow is imported in this process."""
    return "tensorflow" in sys.modules


def missing_torch_stack() -> list[str]:
    """Modules of :data:`TORCH_STACK` that are installed but not yet imported."""
    missing = []
    for name in TORCH_STACK:
        if name in sys.modules:
            continue
        root = name.split(".")[0]
        if importlib.util.find_spec(root) is not None:
            missing.append(name)
    return missing


def guard_torch_stack(what: str = "this operation") -> None:
    """Raise instead of segfaulting when the torch stack would be imported after TensorFlow.

    Args:
        what: what is about to import the stack, for the message.

    Raises:
        ImportOrderError: TensorFlow is loaded and part of torch's compiler stack is not.
    """
    if tf_loaded():
        missing = missing_torch_stack()
        if missing:
            raise ImportOrderError(
                f"{what} needs {', '.join(missing)}, but TensorFlow was imported first in this process; "
                f"importing them now would crash the process with a segmentation fault "
                f"(tensorflow/tensorflow#57669). {_FIX}"
            )


def preload_torch_stack() -> None:
    """Import torch's compiler stack (torch._dynamo, triton, torchvision, onnx2torch) now.

    Safe to call many times. Call it before TensorFlow is imported.

    Raises:
        ImportOrderError: TensorFlow is already imported and the stack is not.
    """
    guard_torch_stack("mmbridge.preload_torch_stack()")
    for name in TORCH_STACK:
        if name in sys.modules:
            continue
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        importlib.import_module(name)
