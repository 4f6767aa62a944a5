"""Registry and spec behaviour (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge import Registry, RegistryError, SpecError, TensorSpec


def test_registry_register_get_duplicate_override():
    reg = Registry("thing", "reg.names()")

    @reg.register("alpha")
    def alpha():
        return 1

    assert reg.get("alpha") is alpha and alpha() == 1  # decorator returns what it wraps
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", lambda: 2)
    reg.register("alpha", lambda: 3, override=True)
    assert reg.get("alpha")() == 3
    assert reg.names() == ["alpha"] and "alpha" in reg and len(reg) == 1


def test_registry_unknown_name_suggests_close_matches_and_listing_call():
    reg = Registry("fusion head", "mmbridge.fusion_heads.names()")
    reg.register("concat", object())
    reg.register("gated", object())
    with pytest.raises(RegistryError) as ei:
        reg.get("conact")
    msg = str(ei.value)
    assert "'concat'" in msg and "mmbridge.fusion_heads.names()" in msg and "unknown fusion head 'conact'" in msg
    assert isinstance(ei.value, KeyError)


def test_register_bridge_and_listing():
    @mmbridge.register_bridge("test_identity_bridge", role="preprocess",
                              input_specs=[TensorSpec("x", ("batch", 4), "float32", "NC")], override=True)
    def build():
        """Identity, for tests."""

    spec = mmbridge.get_bridge("test_identity_bridge")
    assert spec.role == "preprocess" and spec.input_specs[0].shape == ("batch", 4)
    assert spec.description == "Identity, for tests."
    assert "test_identity_bridge" in mmbridge.bridges.names("test_*")
    with pytest.raises(RegistryError, match="already registered"):
        mmbridge.register_bridge("test_identity_bridge", input_specs=[])(build)
    mmbridge.bridges.unregister("test_identity_bridge")


def test_tensor_spec_validation_and_check():
    with pytest.raises(SpecError, match="layout NHWC has 4 axes"):
        TensorSpec("img", ("batch", 8, 8), "uint8", "NHWC")
    with pytest.raises(SpecError, match="dtype"):
        TensorSpec("x", (2,), "complex64")
    spec = TensorSpec("img", ("batch", 8, 8, 3), "uint8", "NHWC", (0, 255))
    a = spec.sample(batch=3, seed=1)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8 and a.max() <= 255
    spec.check(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(SpecError, match=r"input 'img': axis 2 must be 8"):
        spec.check(np.zeros((2, 8, 9, 3), np.uint8))
    with pytest.raises(SpecError, match="dtype float32 does not match the spec's uint8"):
        spec.check(torch.zeros(2, 8, 8, 3))
    bindings: dict[str, int] = {}
    TensorSpec("a", ("batch", 2)).check(np.zeros((5, 2), np.float32), bindings)
    with pytest.raises(SpecError, match="symbolic dim 'batch' is 4 here but 5"):
        TensorSpec("b", ("batch", 2)).check(np.zeros((4, 2), np.float32), bindings)
    assert TensorSpec.from_dict(spec.to_dict()) == spec


def test_import_mmbridge_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, mmbridge; mmbridge.TensorSpec; mmbridge.cache_root(); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
