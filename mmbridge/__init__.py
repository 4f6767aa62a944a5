"""mmbridge: TensorFlow preprocessing graphs and Keras encoders inside PyTorch training, via ONNX.

``import mmbridge`` never imports TensorFlow; it loads torch's compiler stack (torchvision,
torch._dynamo, triton) unless TF is already loaded, so that TF imported *after* mmbridge is safe
(see :mod:`mmbridge._tf`). The public names below are loaded on first use.

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

__version__ = "0.1.0"

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
    "export": ".exporter:export",
    "BridgeArtifact": ".artifact:BridgeArtifact",
    "load_artifact": ".artifact:BridgeArtifact.load",
    "cache_root": ".artifact:cache_root",
    "verify": ".parity:verify",
    "ParityReport": ".parity:ParityReport",
    "preload_torch_stack": "._tf:preload_torch_stack",
    "versions": ".info:versions",
    # backends
    "convert": ".backends.torch_backend:to_torch",
    "to_torch": ".backends.torch_backend:to_torch",
    "to_ort": ".backends.ort_backend:to_ort",
    "ORTModule": ".backends.ort_backend:ORTModule",
    # composition and training
    "compose": ".composition:compose",
    "HybridModel": ".composition:HybridModel",
    "Branch": ".composition:Branch",
    "fusion_heads": ".heads:fusion_heads",
    "task_heads": ".heads:task_heads",
    "Trainer": ".train.trainer:Trainer",
}

from .errors import (  # noqa: E402, F401  (errors are tiny and always needed; re-exported)
    CacheError,
    ConfigError,
    ConversionError,
    DataError,
    ExportError,
    ImportOrderError,
    MMBridgeError,
    ParityError,
    RegistryError,
    RuntimeBackendError,
    SpecError,
    UnsupportedOpsError,
    WeightMappingError,
)

__all__ = sorted(
    [*_LAZY, "__version__", "CacheError", "ConfigError", "ConversionError", "DataError", "ExportError",
     "ImportOrderError", "MMBridgeError", "ParityError", "RegistryError", "RuntimeBackendError", "SpecError",
     "UnsupportedOpsError", "WeightMappingError"]
)


def _preload_at_import() -> None:
    """Load torch's compiler stack now, unless TensorFlow is already loaded.

    Importing TF and then torchvision / torch._dynamo / triton segfaults the process
    (../shared/cases/01). Loading the stack when mmbridge is imported makes the natural order
    (``import mmbridge`` first, then keras / tensorflow) safe; if TF came first, nothing is
    imported here and the operations that need the stack raise :class:`ImportOrderError` with
    the fix. Costs ~2.5 s on a 2-core CPU; ``MMBRIDGE_NO_PRELOAD=1`` skips it.
    """
    import os
    import sys

    if "tensorflow" not in sys.modules and os.environ.get("MMBRIDGE_NO_PRELOAD") != "1":
        from ._tf import preload_torch_stack

        preload_torch_stack()


_preload_at_import()


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        from importlib.util import find_spec

        if not name.startswith("__") and find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # submodules, e.g. mmbridge._tf
        raise AttributeError(f"module 'mmbridge' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name, __name__)
    for part in attr.split("."):
        obj = getattr(obj, part)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return __all__
