"""Issue 18: converter results that differed from onnxruntime. Each test failed before its fix.

Only the public API is used (``mmbridge.to_torch``), so each test also runs against older trees.
onnxruntime is the reference; the ONNX reference implementation agrees with it on every case here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.runtime.session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(nodes, inputs, outputs, inits=(), opset=18):
    imports = [helper.make_opsetid("", opset)]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=imports)
    m.ir_version = helper.find_min_ir_version_for(imports)
    return m


def _vi(name, dtype=TP.FLOAT, dims=None):
    return helper.make_tensor_value_info(name, dtype, dims)


def _check(m, feeds, atol=1e-5):
    ref = make_session(m).run(None, feeds)
    with torch.no_grad():
        got = mmbridge.to_torch(m)(*[torch.from_numpy(v) for v in feeds.values()])
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert [tuple(g.shape) for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        assert g.dtype == torch.from_numpy(r).dtype
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dims", [[2, 2, 5, 7], ["N", 2, "H", "W"]])
def test_resize_constant_scales_not_whole_maps_coordinates_with_one_over_scale(dims):
    """5 * 1.5 = 7.5 -> 7 and 7 * 0.6 = 4.2 -> 4: ORT samples at (x + 0.5) / scale - 0.5, not at in / out."""
    scales = numpy_helper.from_array(np.array([1, 1, 1.5, 0.6], np.float32), "scales")
    m = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="rs", mode="linear")],
               [_vi("x", dims=dims)], [_vi("y")], [scales], opset=13)
    _check(m, {"x": np.random.RandomState(0).rand(2, 2, 5, 7).astype(np.float32)})


def test_batchnorm_float64_runs_in_float64():
    rng = np.random.RandomState(1)
    inits = [numpy_helper.from_array(a.astype(np.float64), n) for a, n in
             ((rng.rand(3) + 0.5, "s"), (rng.randn(3), "b"), (rng.randn(3), "m"), (rng.rand(3) + 0.1, "v"))]
    m = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")],
               [_vi("x", TP.DOUBLE, ["N", 3, 4, 4])], [_vi("y", TP.DOUBLE)], inits, opset=15)
    _check(m, {"x": rng.rand(2, 3, 4, 4)}, atol=1e-10)


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
                                "ReduceMean", "ReduceMax", "ReduceProd"])
def test_reduce18_noop_with_empty_axes_keeps_the_elementwise_part(op):
    """No axes + noop_with_empty_axes=1: nothing is reduced, but L1 / L2 give |x|, SumSquare x², LogSum log x."""
    m = _model([helper.make_node(op, ["x"], ["y"], name="r", noop_with_empty_axes=1)], [_vi("x", dims=[3, 4])], [_vi("y")])
    x = np.random.RandomState(2).rand(3, 4).astype(np.float32) * 3 - (0.0 if op == "ReduceLogSum" else 1.0)
    _check(m, {"x": x})


@pytest.mark.parametrize("dim,k", [(2, 3), (7, 3), (4, 4)])
def test_split18_num_outputs_on_an_uneven_dim(dim, k):
    """2 split in 3 is [1, 1, 0] (the last chunk takes what is left, here nothing)."""
    outs = [f"o{i}" for i in range(k)]
    m = _model([helper.make_node("Split", ["x"], outs, name="sp", axis=1, num_outputs=k)], [_vi("x", dims=[2, dim])],
               [_vi(o) for o in outs])
    _check(m, {"x": np.random.RandomState(3).rand(2, dim).astype(np.float32)})


@pytest.mark.parametrize("attrs", [{}, {"reverse": 1}, {"exclusive": 1}, {"exclusive": 1, "reverse": 1}])
@pytest.mark.parametrize("axis_dtype,axis", [(np.int64, 1), (np.int32, -1), (np.int64, 0)])
def test_cumsum_defaults_to_forward_like_onnx(attrs, axis_dtype, axis):
    """ONNX's ``reverse`` defaults to 0; onnx2torch read a missing one as 1."""
    m = _model([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs", **attrs)], [_vi("x", TP.INT32, [3, 4])],
               [_vi("y", TP.INT32)], [numpy_helper.from_array(np.array(axis, axis_dtype), "axis")], opset=14)
    _check(m, {"x": np.arange(12, dtype=np.int32).reshape(3, 4) % 5})


@pytest.mark.parametrize("opset", [11, 13, 18, 19, 21])
@pytest.mark.parametrize("mode", ["reflect", "edge"])
@pytest.mark.parametrize("value_kind", ["constant", "input"])
@pytest.mark.parametrize("pads_kind", ["constant", "input"])
def test_pad_reflect_edge_ignores_a_value_input(opset, mode, value_kind, pads_kind):
    """ONNX ignores the value of reflect / edge Pad; F.pad raised 'doesn't take in value argument'
    when the value came at run time (onnx2torch's dynamic Pad passed it on)."""
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
    inits, ins, feeds = [], [_vi("x", dims=[1, 2, 3, 4])], {"x": x}
    if pads_kind == "constant":
        inits.append(numpy_helper.from_array(pads, "p"))
    else:
        ins.append(_vi("p", TP.INT64, [8]))
        feeds["p"] = pads
    if value_kind == "constant":
        inits.append(numpy_helper.from_array(np.array(5.0, np.float32), "v"))
    else:
        ins.append(_vi("v", dims=[]))
        feeds["v"] = np.array(5.0, np.float32)
    m = _model([helper.make_node("Pad", ["x", "p", "v"], ["y"], name="pad", mode=mode)], ins, [_vi("y")], inits,
               opset=opset)
    _check(m, feeds, atol=0)


@pytest.mark.parametrize("opset", [18, 19, 21])
@pytest.mark.parametrize(("kind", "values", "axes"), [
    ("scales", [2.0, 1.5], [2, 3]), ("scales", [1.5, 0.6], [-1, -2]), ("scales", [1.7], [3]),
    ("sizes", [6, 5], [2, 3]), ("sizes", [7], [-1]), ("sizes", [4, 2], [3, 2]),
])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize18_axes_with_constant_scales_or_sizes(opset, kind, values, axes, mode):
    """Resize-18 ``axes`` was refused (by the torch converter); constant scales / sizes for the listed
    axes now widen to the full-rank form, matching onnxruntime."""
    arr = np.array(values, np.float32 if kind == "scales" else np.int64)
    inputs = ["x", "", "s"] if kind == "scales" else ["x", "", "", "s"]
    m = _model([helper.make_node("Resize", inputs, ["y"], name="rs", mode=mode, axes=axes)],
               [_vi("x", dims=[1, 2, 3, 4])], [_vi("y")], [numpy_helper.from_array(arr, "s")], opset=opset)
    _check(m, {"x": np.random.RandomState(0).rand(1, 2, 3, 4).astype(np.float32)})


def test_resize18_axes_with_computed_sizes_is_refused_at_conversion():
    m = _model([helper.make_node("Resize", ["x", "", "", "s"], ["y"], name="rs", axes=[2, 3])],
               [_vi("x", dims=[1, 2, 3, 4]), _vi("s", TP.INT64, [2])], [_vi("y")])
    with pytest.raises(mmbridge.errors.ConversionError, match=r"Resize node 'rs': the 'axes' attribute .* computed at run time"):
        mmbridge.to_torch(m)


def test_reshape_target_read_from_input_values_is_not_frozen_from_a_probe():
    """``Reshape(x, [-1, k[0] + 2])`` with ``k`` a graph input: the ORT probe (integers 0 / 1) saw
    the same ``k[0]`` in every run and froze the target; ``k[0] = 4`` then reshaped to the wrong shape."""
    i64 = TP.INT64
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"), numpy_helper.from_array(np.array([0], np.int64), "ax")]
    nodes = [helper.make_node("Gather", ["k", "zero"], ["k0"], name="g"),
             helper.make_node("Unsqueeze", ["k0", "ax"], ["k0v"], name="u"),
             helper.make_node("Add", ["k0v", "two"], ["w"], name="add"),
             helper.make_node("Concat", ["m1", "w"], ["target"], name="cat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="rs")]
    m = _model(nodes, [_vi("x", dims=["N", 12]), _vi("k", i64, ["N"])], [_vi("y")], inits, opset=17)
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    for k in ([0, 1], [1, 0], [4, 0], [10, 3]):
        _check(m, {"x": x, "k": np.array(k, np.int64)}, atol=0)
