"""Keras 3 on its torch backend (``KERAS_BACKEND=torch``): a ``.keras`` file as a ``torch.nn.Module``.

The Keras-on-torch variant of the encoder benchmarks (:mod:`mmbridge.bench.keras_torch`) loads the
same ``.keras`` file a bridge was exported from and runs it without ONNX. The backend is fixed
per process before Keras is imported, so this is called only in a child process started with
``KERAS_BACKEND=torch``; on that backend Keras does not load TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def load_on_torch_backend(path: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """Load ``path`` (a ``.keras`` file) with Keras on its torch backend.

    Args:
        path: the ``.keras`` file.

    Returns:
        ``(module, info)``: ``module(x)`` takes float32 NHWC ``[B, H, W, C]`` (as Keras does) and
        calls the model with ``training=module.training``, so ``.train()`` / ``.eval()`` switch
        Dropout and BatchNorm as in torch; its parameters are the Keras variables.
        ``info`` = ``{"keras_backend", "keras"}`` (backend name and Keras version).

    Raises:
        RuntimeError: the process was not started with ``KERAS_BACKEND=torch``.
    """
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise RuntimeError("load_on_torch_backend needs KERAS_BACKEND=torch set before the process imports Keras "
                           "(mmbridge.bench.suites.keras_torch_rows starts such a child)")
    import keras  # after torch (imported above): on the torch backend Keras does not load TensorFlow

    model = keras.models.load_model(path, compile=False)

    class KerasCall(torch.nn.Module):  # Keras takes NHWC and a `training` flag; torch code passes one tensor
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x, training=self.training)

    return KerasCall(), {"keras_backend": keras.backend.backend(), "keras": keras.__version__}
