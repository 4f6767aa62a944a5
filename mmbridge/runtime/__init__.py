"""The onnxruntime stage: ONNX -> a frozen ``nn.Module`` around an ``InferenceSession``.

* :mod:`.module` -- :class:`ORTModule` / :func:`to_ort`: IO binding, zero-copy outputs, provider
  and device chosen from the input tensors and the DDP local rank;
* :mod:`.session` -- creating sessions the same way everywhere (threads, providers, extensions);
* :mod:`.extensions` -- onnxruntime-extensions (string custom ops) loaded safely.

The only package besides :mod:`mmbridge.export` and :mod:`mmbridge.parity` that imports
onnxruntime (lint enforces it).
"""

from mmbridge.runtime.module import ORTModule, to_ort
from mmbridge.runtime.session import default_intra_op_threads, make_session

__all__ = ["ORTModule", "to_ort", "make_session", "default_intra_op_threads"]
