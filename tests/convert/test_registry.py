"""``mmbridge.op_converters``: keys, duplicates, the onnx2torch hook, user converters, dynamic arguments.

ONNX runtime is the reference for every forward value.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert.registry import ConverterKey, OpConverterRegistry, consult_op_converters, current_opsets
from mmbridge.runtime.session import make_session

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "authoring-guide.md"


def _model(nodes, inputs, outputs, inits=(), opset=17):
    imports = [helper.make_opsetid("", opset)]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=imports)
    m.ir_version = max(helper.find_min_ir_version_for(imports), 4)
    return m


def _vi(name, dtype=TP.FLOAT, dims=None):
    return helper.make_tensor_value_info(name, dtype, dims)


def _run(module, *arrays):
    with torch.no_grad():
        out = module(*[torch.from_numpy(a) for a in arrays])
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
def test_duplicate_raises_and_override_replaces():
    reg = OpConverterRegistry("op converter", "reg.names()")

    @reg.register("Relu", since_version=14)
    def first(node, graph):
        return torch.nn.ReLU()

    assert first.__name__ == "first"  # the decorator returns what it wraps
    with pytest.raises(mmbridge.RegistryError, match=r"Relu-14 is already registered .*first.*override=True"):
        reg.register("Relu", since_version=14)(lambda node, graph: None)

    def second(node, graph):
        return torch.nn.ReLU()

    assert reg.register("Relu", second, since_version=14, override=True) is second
    assert reg[("", "Relu", 14)] is second and reg.find("Relu", 17) is second
    assert list(reg) == [ConverterKey("", "Relu", 14)] and ("Relu", 14) in reg
    assert reg.find("Relu", 13) is None  # opset 13 resolves to Relu-13, which has no entry
    with pytest.raises(mmbridge.RegistryError, match=r"Registered since_versions of 'Relu': \[14\]"):
        reg.get("Relu", 13)
    assert reg.unregister("Relu", 14) is second and len(reg) == 0


def test_the_public_registry_raises_on_a_builtin_duplicate():
    with pytest.raises(mmbridge.RegistryError, match="Gelu-20 is already registered"):
        mmbridge.op_converters.register("Gelu", since_version=20)(lambda node, graph: torch.nn.GELU())
    assert mmbridge.op_converters.find("Gelu", 22).__module__ == "mmbridge.convert.ops.gelu"


def test_keys_are_validated_against_onnx_schemas():
    reg = OpConverterRegistry()
    with pytest.raises(mmbridge.RegistryError, match=r"19 is not one of its ONNX schema versions \[20\]"):
        reg.register("Gelu", since_version=19)
    with pytest.raises(mmbridge.RegistryError, match="Did you mean 'Shrink'"):
        reg.register("Shrnk", since_version=9)
    with pytest.raises(mmbridge.RegistryError, match="positive int"):
        reg.register("Relu", since_version=0)
    with pytest.raises(mmbridge.RegistryError, match="ONNX op name"):
        reg.register("my op", since_version=1, domain="com.example")
    # a custom domain: any version; a model's opset picks the newest registration <= it
    reg.register("MyOp", lambda n, g: torch.nn.Identity(), since_version=2, domain="com.example")
    assert reg.find("MyOp", 3, "com.example") is not None and reg.find("MyOp", 1, "com.example") is None
    assert reg.names() == ["com.example:MyOp-2"]


def test_every_builtin_key_is_an_onnx_since_version():
    from onnx import defs

    for key in mmbridge.op_converters:
        assert defs.get_schema(key.op_type, max_inclusive_version=key.since_version,
                               domain=key.domain).since_version == key.since_version, key


# ---------------------------------------------------------------------------------------------
# the hook
# ---------------------------------------------------------------------------------------------
def _gelu_model():
    return _model([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], [_vi("x", dims=[2, 3])], [_vi("y")], opset=20)


def test_hook_is_scoped_to_to_torch_and_onnx2torch_registry_is_untouched():
    import onnx2torch
    import onnx2torch.converter as o2t
    from onnx2torch.node_converters import get_converter as shipped
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    mmbridge.to_torch(_gelu_model())
    assert o2t.get_converter is shipped  # restored after the conversion
    assert OperationDescription("", "Gelu", 20) not in _CONVERTER_REGISTRY  # nothing written into onnx2torch
    with pytest.raises(NotImplementedError):  # onnx2torch on its own is as shipped
        onnx2torch.convert(_gelu_model())
    with consult_op_converters({"": 20}):
        assert current_opsets() == {"": 20}
        assert isinstance(onnx2torch.convert(_gelu_model()).gelu, torch.nn.GELU)
        with consult_op_converters({"": 20}):  # re-entrant (Loop bodies)
            pass
        assert o2t.get_converter is not shipped
        seen = []
        t = threading.Thread(target=lambda: seen.append(_try_convert(onnx2torch)))
        t.start()
        t.join()
        assert seen == ["NotImplementedError"]  # another context sees onnx2torch unchanged
    assert o2t.get_converter is shipped
    with pytest.raises(RuntimeError, match="only defined while mmbridge converts"):
        current_opsets()


def _try_convert(onnx2torch):
    try:
        onnx2torch.convert(_gelu_model())
        return "converted"
    except NotImplementedError:
        return "NotImplementedError"


def test_a_converter_that_refuses_a_node_names_it():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    m = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="aa_resize", mode="linear", antialias=1)],
               [_vi("x", dims=[1, 1, 2, 2])], [_vi("y")], [scales], opset=18)
    with pytest.raises(mmbridge.ConversionError, match=r"Resize node 'aa_resize': attribute antialias=1 is not supported"):
        mmbridge.to_torch(m)
    # onnx2torch's own converters do not name the node; the hook adds it
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "b", "m", "v")]
    m = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn_train",
                                 training_mode=1)], [_vi("x", dims=[3, 2])], [_vi("y"), _vi("rm"), _vi("rv")], inits)
    with pytest.raises(mmbridge.ConversionError, match=r"BatchNormalization node 'bn_train': BatchNorm operation with mean"):
        mmbridge.to_torch(m)


# ---------------------------------------------------------------------------------------------
# the authoring guide's example, run as written
# ---------------------------------------------------------------------------------------------
def _guide_blocks() -> dict[str, str]:
    """``{file name: code}`` for the python blocks of 'Adding an ONNX op converter' headed ``# <path>``."""
    text = GUIDE.read_text()
    section = text[text.index("## 3. Adding an ONNX op converter"):]
    section = section[:section.index("\n## 4.")]
    blocks = {}
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        first = code.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            blocks[first[2:].strip()] = code
    return blocks


def test_authoring_guide_converter_and_its_test_run_as_written(tmp_path, monkeypatch):
    blocks = _guide_blocks()
    assert set(blocks) == {"my_project/shrink_converter.py", "tests/test_shrink_converter.py"}, sorted(blocks)
    for path, code in blocks.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code)
    (tmp_path / "my_project" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ("", "Shrink", 9) not in mmbridge.op_converters
    try:
        namespace: dict = {"__name__": "test_shrink_converter"}
        exec(compile(blocks["tests/test_shrink_converter.py"], "test_shrink_converter.py", "exec"), namespace)
        assert ("", "Shrink", 9) in mmbridge.op_converters  # registered by importing the one file
        tests = [f for name, f in namespace.items() if name.startswith("test_")]
        assert tests
        for test in tests:
            test()
    finally:
        if ("", "Shrink", 9) in mmbridge.op_converters:
            mmbridge.op_converters.unregister("Shrink", 9)
        sys.modules.pop("my_project.shrink_converter", None)
        sys.modules.pop("my_project", None)


# ---------------------------------------------------------------------------------------------
# arguments computed at run time keep working (and still equal ORT)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 18])
def test_computed_arguments_match_ort(opset):
    f = TP.FLOAT
    nodes = [helper.make_node("Shape", ["ref"], ["ref_shape"], name="shape"),
             helper.make_node("Reshape", ["x", "ref_shape"], ["r"], name="reshape"),               # [2, 12] -> [4, 6]
             helper.make_node("Expand", ["r", "ref_shape"], ["e"], name="expand"),
             helper.make_node("Tile", ["e", "reps"], ["t"], name="tile"),
             helper.make_node("Unsqueeze", ["t", "axes"], ["u"], name="unsqueeze"),
             helper.make_node("Squeeze", ["u", "axes"], ["s"], name="squeeze"),
             helper.make_node("Pad", ["s", "pads"], ["y"], name="pad", mode="constant")]
    m = _model(nodes, [_vi("x", dims=[2, 12]), _vi("ref", dims=[4, 6]), _vi("reps", TP.INT64, [2]),
                       _vi("axes", TP.INT64, [1]), _vi("pads", TP.INT64, [4])], [_vi("y", f)], opset=opset)
    feeds = {"x": np.random.RandomState(0).randn(2, 12).astype(np.float32), "ref": np.zeros((4, 6), np.float32),
             "reps": np.array([1, 2], np.int64), "axes": np.array([1], np.int64), "pads": np.array([0, 1, 2, 0], np.int64)}
    ref = make_session(m).run(None, feeds)[0]
    got = _run(mmbridge.to_torch(m), *feeds.values())[0]
    assert got.shape == ref.shape == (6, 13)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_pad18_constant_axes_and_wrap_mode_match_ort():
    inits = [numpy_helper.from_array(np.array([1, 2, 0, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "axes")]
    for mode in ("constant", "reflect", "edge", "wrap"):
        opset = 19 if mode == "wrap" else 18
        m = _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad", mode=mode)],
                   [_vi("x", dims=[2, 3, 4])], [_vi("y")], inits, opset=opset)
        x = np.random.RandomState(1).randn(2, 3, 4).astype(np.float32)
        ref = make_session(m).run(None, {"x": x})[0]
        got = _run(mmbridge.to_torch(m), x)[0]
        assert got.shape == ref.shape, mode
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=mode)


def test_negative_squeeze_and_unsqueeze_axes_follow_onnx():
    """Squeeze counts negative axes from the input rank, Unsqueeze from the output rank."""
    axes = numpy_helper.from_array(np.array([-1, -3], np.int64), "axes")
    for op, shape_in in (("Squeeze", [3, 1, 2, 1]), ("Unsqueeze", [3, 2])):
        m = _model([helper.make_node(op, ["x", "axes"], ["y"], name="op")], [_vi("x", dims=shape_in)], [_vi("y")], [axes])
        x = np.random.RandomState(2).randn(*shape_in).astype(np.float32)
        ref = make_session(m).run(None, {"x": x})[0]
        got = _run(mmbridge.to_torch(m), x)[0]
        assert got.shape == ref.shape, op


def test_static_expand_and_tile_trace_without_graph_breaks():
    """Constant Expand / Tile arguments are Python ints: torch.compile(fullgraph=True) traces them (issue 13)."""
    inits = [numpy_helper.from_array(np.array([2, 1, 3], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 2, 1], np.int64), "reps")]
    m = _model([helper.make_node("Expand", ["x", "shape"], ["e"], name="expand"),
                helper.make_node("Tile", ["e", "reps"], ["y"], name="tile")], [_vi("x", dims=["N", 1, 1])], [_vi("y")], inits)
    gm = mmbridge.to_torch(m)
    x = torch.randn(2, 1, 1)
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), gm(x))
    np.testing.assert_allclose(gm(x).numpy(), make_session(m).run(None, {"x": x.numpy()})[0], rtol=1e-6)


def test_user_converter_for_a_custom_domain_is_used_by_to_torch():
    @mmbridge.op_converters.register("TimesThree", since_version=1, domain="com.example")
    def times_three(node, graph):
        return _TimesThree()

    try:
        g = helper.make_graph([helper.make_node("TimesThree", ["x"], ["y"], name="t3", domain="com.example")], "g",
                              [_vi("x", dims=[2])], [_vi("y", dims=[2])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
        m.ir_version = 8
        out = mmbridge.to_torch(m)(torch.tensor([1.0, 2.0]))
        assert out.tolist() == [3.0, 6.0]
    finally:
        mmbridge.op_converters.unregister("TimesThree", 1, domain="com.example")


class _TimesThree(torch.nn.Module):
    def forward(self, x):
        return x * 3

