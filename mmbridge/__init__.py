"""mmbridge: TensorFlow preprocessing graphs and Keras encoders inside PyTorch training, via ONNX.

``import mmbridge`` never imports TensorFlow; it loads torch's compiler stack (torchvision,
torch._dynamo, triton) unless TF is already loaded, so that TF imported *after* mmbridge is safe
(see :mod:`mmbridge._torch_stack`). The public names below are loaded on first use.

Typical use::

    import mmbridge
    art = mmbridge.export(keras_model, name="image_encoder")   # TF -> ONNX, parity-checked, cached
    enc = art.to_torch()                                          # trainable nn.Module
    pre = mmbridge.load_artifact(path).to_ort()                   # frozen ORT module, IO binding
    model = mmbridge.compose({...}, fusion="concat", num_classes=18)
"""

from __future__ import annotations

import importlib
from typing import Any

from mmbridge._version import __version__  # noqa: E402, F401  (re-exported)

# public name -> "module:attribute" (relative to the package)
_LAZY = {
    # core
    "Registry": "._registry:Registry",
    "TensorSpec": ".specs:TensorSpec",
    "BridgeSpec": ".specs:BridgeSpec",
    "Tolerance": ".specs:Tolerance",
    "bridges": ".registry:bridges",
    "register_bridge": ".registry:register_bridge",
    "get_bridge": ".registry:get_bridge",
    "export": ".export",
    "BridgeArtifact": ".artifact:BridgeArtifact",
    "load_artifact": ".artifact:BridgeArtifact.load",
    "cache_root": ".store:cache_root",
    "verify": ".parity:verify",
    "ParityReport": ".parity:ParityReport",
    "preload_torch_stack": "._torch_stack:preload_torch_stack",
    "versions": ".info:versions",
    # backends
    "convert": ".convert",
    "to_torch": ".convert.core:to_torch",
    "op_converters": ".convert.ops:op_converters",
    "to_ort": ".runtime.module:to_ort",
    "ORTModule": ".runtime.module:ORTModule",
    # composition and training
    "compose": ".composition.model:compose",
    "HybridModel": ".composition.model:HybridModel",
    "Branch": ".composition.model:Branch",
    "fusion_heads": ".composition.heads:fusion_heads",
    "task_heads": ".composition.heads:task_heads",
    "Trainer": ".train.trainer:Trainer",
    "load_run": ".train.predict:load_run",
}

from mmbridge.errors import (  # noqa: E402, F401  (errors are tiny and always needed; re-exported)
    CacheError,
    ConfigError,
    ConversionError,
    DataError,
    ExportError,
    ImportOrderError,
    MMBridgeError,
    ParityError,
    ProbeError,
    RegistryError,
    RuntimeBackendError,
    SpecError,
    UnsupportedOpsError,
    WeightMappingError,
)

__all__ = sorted(
    [*_LAZY, "__version__", "CacheError", "ConfigError", "ConversionError", "DataError", "ExportError",
     "ImportOrderError", "MMBridgeError", "ParityError", "ProbeError", "RegistryError", "RuntimeBackendError", "SpecError",
     "UnsupportedOpsError", "WeightMappingError"]
)


def _preload_at_import() -> None:
    """Load torch's compiler stack now, unless TensorFlow is already loaded.

    Importing TF and then torchvision / torch._dynamo / triton segfaults the process
    (tensorflow/tensorflow#57669). Loading the stack when mmbridge is imported makes the natural order
    (``import mmbridge`` first, then keras / tensorflow) safe; if TF came first, nothing is
    imported here and the operations that need the stack raise :class:`ImportOrderError` with
    the fix. Costs ~2.5 s on a 2-core CPU; ``MMBRIDGE_NO_PRELOAD=1`` skips it.
    """
    import os
    import sys

    if "tensorflow" not in sys.modules and os.environ.get("MMBRIDGE_NO_PRELOAD") != "1":
        from mmbridge._torch_stack import preload_torch_stack

        preload_torch_stack()


_preload_at_import()


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        from importlib.util import find_spec

        if not name.startswith("__") and find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # submodules, e.g. mmbridge._torch_stack
        raise AttributeError(f"module 'mmbridge' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name, __name__)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return __all__
