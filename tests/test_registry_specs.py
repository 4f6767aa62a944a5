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


# -- export options and source adapters (no TensorFlow) --------------------------------------
def test_export_options_round_trip_hash_and_every_bad_field_listed():
    from mmbridge.export.options import ExportOptions

    opts = ExportOptions.from_arguments(input_specs=[TensorSpec("image", ("batch", 8, 8, 3), "uint8", "NHWC", (0, 255))],
                                        opset=18, tolerance=mmbridge.Tolerance(1e-3, 0, "test"),
                                        inputs_as_nchw=["image"], trainable=True)
    d = opts.to_dict()
    assert d["input_specs"][0]["name"] == "image" and d["inputs_as_nchw"] == ["image"] and d["opset"] == 18
    back = ExportOptions.from_dict(d)
    assert back == opts and hash(back) == hash(opts) and back.stable_hash() == opts.stable_hash()
    assert opts.replace(name="other").fingerprint_bytes() == opts.fingerprint_bytes()  # the name is not hashed
    assert opts.replace(optimize=False).stable_hash() != opts.stable_hash()
    assert ExportOptions.from_arguments() == ExportOptions() and ExportOptions().opset == 17
    with pytest.raises(SpecError) as ei:
        ExportOptions.from_dict({"opset": "17", "role": "decoder", "verify": "yes", "nchw": ["x"],
                                 "input_specs": [{"name": "x"}], "tolerance": {"atol": -1.0}})
    msg = str(ei.value)
    assert msg.startswith("6 invalid export options")
    for field in ("opset='17'", "role='decoder'", "verify='yes'", "nchw: not an export option",
                  "input_specs[0]", "tolerance="):
        assert field in msg, (field, msg)
    with pytest.raises(SpecError, match="role='x': must be 'preprocess' or 'encoder'"):
        mmbridge.export(lambda x: x, role="x", input_specs=[TensorSpec("x", (1,))])


def test_export_options_take_a_bridges_defaults_where_the_call_left_them():
    from mmbridge.export.options import ExportOptions
    from mmbridge.specs import BridgeSpec

    spec = BridgeSpec("b", "preprocess", "pkg:build", (TensorSpec("x", ("batch", 2)),), opset=18,
                      export_kwargs={"inputs_as_nchw": None, "trainable": True, "optimize": False})
    o = ExportOptions.from_arguments(bridge=spec)
    assert (o.name, o.role, o.opset, o.trainable, o.optimize, o.verify) == ("b", "preprocess", 18, True, False, True)
    assert o.input_specs == spec.input_specs
    o = ExportOptions.from_arguments(bridge=spec, name="mine", opset=17, role="encoder")
    assert (o.name, o.opset, o.role) == ("mine", 17, "encoder")
    bad = BridgeSpec("b", "encoder", "pkg:build", (), export_kwargs={"batch_size": 2})
    with pytest.raises(SpecError, match=r"export options \['batch_size'\] are not export\(\) arguments"):
        ExportOptions.from_arguments(bridge=bad)


def test_sources_are_located_without_tensorflow(tmp_path):
    """Strings and paths are told apart by the adapters' predicates, in a process without TF."""
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "enc.keras").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    code = f'''
import sys, mmbridge
from mmbridge.export.sources import SOURCES
root = {str(tmp_path)!r}
out = {{}}
for src in [root + "/enc.keras", root + "/sm", "pkg.mod:build"]:
    loc = SOURCES.locate(src)
    out[src.rsplit("/", 1)[-1]] = (loc.adapter.kind, loc.isolate, loc.name, loc.path is not None)
for bad in [root + "/missing.keras", root + "/notes.txt", root, 42]:
    try:
        SOURCES.locate(bad)
    except mmbridge.SpecError as e:
        out[str(bad).rsplit("/", 1)[-1]] = str(e)
try:
    SOURCES.locate("no_such_bridge_xyz")
except mmbridge.RegistryError as e:
    out["bridge"] = str(e)
out["tf"] = "tensorflow" in sys.modules or "keras" in sys.modules
print(repr(out))
'''
    import ast
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert out["enc.keras"] == ("keras_file", True, "enc", True)
    assert out["sm"] == ("saved_model", True, "sm", True)
    assert out["pkg.mod:build"] == ("reference", True, None, False)
    assert "no such file" in out["missing.keras"] and "must be a Keras model" in out["notes.txt"]
    assert "has no saved_model.pb" in out[tmp_path.name] and "cannot export a int" in out["42"]
    assert "unknown bridge 'no_such_bridge_xyz'" in out["bridge"]
    assert out["tf"] is False


def test_source_adapters_registry_order_duplicates_and_tf_keras_absent():
    from mmbridge.export.sources import SOURCES, SourceAdapter, SourceAdapters

    assert SOURCES.kinds() == ["keras_file", "saved_model", "reference", "bridge", "keras", "tf_keras",
                               "tf_function", "python_function"]
    assert SOURCES.match(lambda x: x).kind == "python_function"
    import sys

    if "tf_keras" not in sys.modules:  # not installed (or not imported): nothing can be a tf-keras model
        assert not SOURCES.get("tf_keras").matches(object())
    reg = SourceAdapters()

    @reg.register
    class Anything(SourceAdapter):
        kind = "anything"

        def matches(self, obj):
            return True

    @reg.register(before="anything")
    class Ints(SourceAdapter):
        kind = "ints"

        def matches(self, obj):
            return isinstance(obj, int)

    assert Ints.kind == "ints" and reg.kinds() == ["ints", "anything"]  # the decorator returns the class
    assert reg.match(3).kind == "ints" and reg.match("s").kind == "anything"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(Anything)
    with pytest.raises(RegistryError, match="lower_snake_case"):
        reg.register(type("Bad", (SourceAdapter,), {"kind": "Bad Kind"}))
    with pytest.raises(RegistryError, match="unknown source kind 'nope'"):
        reg.get("nope")
