"""The ops the model families users bring need, on torch, against onnxruntime (exact where integer).

One-node (or few-node) graphs with runtime inputs and the attribute forms the registry-parametrised
``test_convert_ops.py`` does not cover: ScatterND reductions of repeated indices, only output 0
of a multi-output node used, Mod on ints and floats, the Einsum equations Keras
``MultiHeadAttention`` writes, static Range / Shape / ConstantOfShape under ``torch._dynamo``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.runtime.session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RNG = np.random.default_rng(0)


def _vi(name, dtype=TP.FLOAT, dims=None):
    return helper.make_tensor_value_info(name, dtype, dims)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    imports = [helper.make_opsetid("", opset)]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs,
                                            [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]),
                          opset_imports=imports)
    m.ir_version = max(helper.find_min_ir_version_for(imports), 4)
    return m


def _check(m, feeds, exact=False, atol=1e-5):
    gm = mmbridge.to_torch(m)
    ref = make_session(m).run(None, feeds)
    with torch.no_grad():
        got = gm(*[torch.from_numpy(v) for v in feeds.values()])
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(ref), f"the module returned {len(got)} outputs, the graph has {len(ref)}"
    for g, r in zip(got, ref):
        assert isinstance(g, torch.Tensor)
        g = g.numpy()
        assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape, g.dtype, r.dtype)
        if exact:
            np.testing.assert_array_equal(g, r)
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol)
    return gm


# ---------------------------------------------------------------- ScatterND reductions
@pytest.mark.parametrize("opset", [16, 18])
@pytest.mark.parametrize("reduction", ["add", "mul", "max", "min"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32])
def test_scatter_nd_reduction_of_repeated_runtime_indices(reduction, dtype, opset):
    if opset == 16 and reduction in ("max", "min"):
        pytest.skip("max / min are ScatterND-18")
    if dtype == np.int32 and reduction == "mul":
        pytest.skip("onnxruntime has no int32 ScatterND mul kernel")
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", reduction=reduction)
    m = _model([node], [_vi("x", tp, [5, 3]), _vi("idx", TP.INT64, ["n", 1]), _vi("upd", tp, ["n", 3])],
               [_vi("y", tp)], opset=opset)
    x = (RNG.integers(-4, 5, (5, 3))).astype(dtype)
    idx = np.array([[1], [1], [3], [-4], [0]], np.int64)
    upd = (RNG.integers(-3, 4, (5, 3))).astype(dtype)
    _check(m, {"x": x, "idx": idx, "upd": upd}, exact=True)


def test_scatter_nd_add_of_element_tuples():
    node = helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", reduction="add")
    m = _model([node], [_vi("x", dims=[3, 4, 2]), _vi("idx", TP.INT64, [4, 2]), _vi("upd", dims=[4, 2])], [_vi("y")],
               opset=18)
    idx = np.array([[0, 1], [2, 3], [0, 1], [1, 0]], np.int64)
    _check(m, {"x": np.zeros((3, 4, 2), np.float32), "idx": idx, "upd": np.arange(8, dtype=np.float32).reshape(4, 2)})


# ---------------------------------------------------------------- several outputs, one used
def test_top_k_with_only_the_values_used_returns_exactly_the_graph_outputs():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1),
             helper.make_node("Neg", ["v"], ["y"], name="neg")]
    m = _model(nodes, [_vi("x", dims=[3, 6])], [_vi("y")], {"k": np.array([2], np.int64)})
    _check(m, {"x": RNG.standard_normal((3, 6)).astype(np.float32)})


def test_top_k_output_0_as_the_graph_output():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1, largest=0)
    m = _model([node], [_vi("x", dims=[3, 6])], [_vi("v")], {"k": np.array([4], np.int64)})
    _check(m, {"x": RNG.standard_normal((3, 6)).astype(np.float32)})


def test_top_k_indices_only():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1)
    m = _model([node], [_vi("x", dims=[3, 6])], [_vi("i", TP.INT64)], {"k": np.array([3], np.int64)})
    _check(m, {"x": RNG.permutation(18).reshape(3, 6).astype(np.float32)}, exact=True)


@pytest.mark.parametrize("opset", [13, 18])
def test_split_with_only_the_first_output_used(opset):
    attrs = {"num_outputs": 3} if opset >= 18 else {}
    node = helper.make_node("Split", ["x"], ["a", "b", "c"], name="split", axis=1, **attrs)
    m = _model([node], [_vi("x", dims=[2, 6])], [_vi("a")], opset=opset)
    _check(m, {"x": RNG.standard_normal((2, 6)).astype(np.float32)})


# ---------------------------------------------------------------- Mod / Where / Xor / BitShift / Trilu
@pytest.mark.parametrize("opset", [10, 13, 17])
@pytest.mark.parametrize(("dtype", "fmod"), [(np.int32, 0), (np.int64, 0), (np.int32, 1), (np.int64, 1),
                                             (np.float32, 1), (np.float64, 1)])
def test_mod_matches_onnxruntime(dtype, fmod, opset):
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Mod", ["a", "b"], ["y"], name="mod", fmod=fmod)
    m = _model([node], [_vi("a", tp, [8]), _vi("b", tp, [8])], [_vi("y", tp)], opset=opset)
    a = np.array([-7, 7, -1, 5, 0, -9, 9, -3], dtype)
    b = np.array([2, -2, 3, -3, 4, 3, -4, -5], dtype)
    if np.issubdtype(dtype, np.floating):
        a, b = a * 1.25, b * 0.5
    _check(m, {"a": a, "b": b}, exact=True)


def test_where_and_xor():
    nodes = [helper.make_node("Xor", ["p", "q"], ["r"], name="xor"),
             helper.make_node("Where", ["r", "a", "b"], ["y"], name="where")]
    m = _model(nodes, [_vi("p", TP.BOOL, [2, 3]), _vi("q", TP.BOOL, [3]), _vi("a", TP.INT64, [2, 3]),
                       _vi("b", TP.INT64, [1])], [_vi("y", TP.INT64)])
    _check(m, {"p": RNG.random((2, 3)) > 0.5, "q": np.array([True, False, True]),
               "a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array([-1], np.int64)}, exact=True)


@pytest.mark.parametrize(("dtype", "direction"), [(np.uint8, "LEFT"), (np.uint16, "RIGHT"), (np.uint64, "LEFT"),
                                                  (np.uint64, "RIGHT")])
def test_bit_shift(dtype, direction):
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("BitShift", ["x", "s"], ["y"], name="shift", direction=direction)
    m = _model([node], [_vi("x", tp, [5]), _vi("s", tp, [5])], [_vi("y", tp)])
    bits = np.dtype(dtype).itemsize * 8
    x = np.array([np.iinfo(dtype).max, 1, 255, 6, 2 ** (bits - 1)], dtype)
    s = np.array([1, bits - 1, 3, 0, 1], dtype)
    _check(m, {"x": x, "s": s}, exact=True)


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [-2, 0, 3])
def test_trilu_with_a_runtime_k(upper, k):
    node = helper.make_node("Trilu", ["x", "k"], ["y"], name="trilu", upper=upper)
    m = _model([node], [_vi("x", dims=[2, 4, 5]), _vi("k", TP.INT64, [])], [_vi("y")])
    _check(m, {"x": RNG.standard_normal((2, 4, 5)).astype(np.float32), "k": np.array(k, np.int64)}, exact=True)


def test_trilu_without_k_is_the_main_diagonal():
    node = helper.make_node("Trilu", ["x"], ["y"], name="trilu")
    m = _model([node], [_vi("x", dims=[4, 4])], [_vi("y")])
    _check(m, {"x": RNG.standard_normal((4, 4)).astype(np.float32)}, exact=True)


# ---------------------------------------------------------------- causal masks (GPT-2 / Llama)
@pytest.mark.parametrize("op", ["GreaterOrEqual", "LessOrEqual"])
@pytest.mark.parametrize("opset", [12, 16, 21])
def test_causal_mask_from_ranges(op, opset):
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["t"], name="t", axis=0),
             helper.make_node("Range", ["zero", "t", "step"], ["r"], name="range"),
             helper.make_node("Unsqueeze", ["r", "ax"], ["col"], name="col") if opset >= 13 else
             helper.make_node("Unsqueeze", ["r"], ["col"], name="col", axes=[1]),
             helper.make_node(op, ["r", "col"], ["y"], name="mask")]
    inits = {"one": np.array(1, np.int64), "zero": np.array(0, np.int64), "step": np.array(1, np.int64),
             "ax": np.array([1], np.int64)}
    m = _model(nodes, [_vi("x", dims=["b", "t", 4])], [_vi("y", TP.BOOL)], inits, opset=opset)
    _check(m, {"x": np.zeros((2, 5, 4), np.float32)}, exact=True)


# ---------------------------------------------------------------- NonZero / GatherND / ReverseSequence
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (2, 0, 3)])
def test_non_zero_is_rank_by_count(shape):
    node = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    m = _model([node], [_vi("x", TP.BOOL, list(shape))], [_vi("y", TP.INT64)])
    _check(m, {"x": RNG.random(shape) > 0.4}, exact=True)


@pytest.mark.parametrize(("batch_dims", "data", "idx"), [(1, (3, 5, 2), (3, 4, 1)), (1, (3, 5, 4), (3, 2)),
                                                         (2, (2, 3, 4, 5), (2, 3, 2, 2)), (0, (4, 5), (3, 2))])
def test_gather_nd_with_batch_dims(batch_dims, data, idx):
    node = helper.make_node("GatherND", ["x", "i"], ["y"], name="gnd", batch_dims=batch_dims)
    m = _model([node], [_vi("x", dims=list(data)), _vi("i", TP.INT64, list(idx))], [_vi("y")])
    lim = data[batch_dims:batch_dims + idx[-1]]
    i = np.stack([RNG.integers(-d, d, idx[:-1]) for d in lim], -1).astype(np.int64)
    _check(m, {"x": RNG.standard_normal(data).astype(np.float32), "i": i}, exact=True)


@pytest.mark.parametrize(("batch_axis", "time_axis"), [(1, 0), (0, 1)])
def test_reverse_sequence(batch_axis, time_axis):
    node = helper.make_node("ReverseSequence", ["x", "lens"], ["y"], name="rev", batch_axis=batch_axis,
                            time_axis=time_axis)
    shape = [6, 4, 3] if batch_axis == 1 else [4, 6, 3]
    m = _model([node], [_vi("x", dims=shape), _vi("lens", TP.INT64, [4])], [_vi("y")])
    _check(m, {"x": RNG.standard_normal(shape).astype(np.float32), "lens": np.array([6, 1, 0, 4], np.int64)},
           exact=True)


# ---------------------------------------------------------------- Range / Shape / ConstantOfShape
@pytest.mark.parametrize(("dtype", "start", "limit", "delta"), [(np.int32, 2, 11, 3), (np.int64, 5, -4, -2),
                                                                (np.float32, 0.0, 1.0, 0.1), (np.int64, 3, 3, 1),
                                                                (np.float64, 1.0, -2.0, -0.3)])
def test_range_with_runtime_inputs_in_their_dtype(dtype, start, limit, delta):
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Range", ["s", "l", "d"], ["y"], name="range")
    m = _model([node], [_vi("s", tp, []), _vi("l", tp, []), _vi("d", tp, [])], [_vi("y", tp)])
    _check(m, {"s": np.array(start, dtype), "l": np.array(limit, dtype), "d": np.array(delta, dtype)}, exact=True)


def test_constant_of_shape_with_a_runtime_shape():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ConstantOfShape", ["s"], ["y"], name="cos",
                              value=helper.make_tensor("value", TP.INT64, [1], [3]))]
    m = _model(nodes, [_vi("x", dims=["a", 2])], [_vi("y", TP.INT64)])
    _check(m, {"x": np.zeros((3, 2), np.float32)}, exact=True)


@pytest.mark.parametrize(("start", "end"), [(0, None), (-2, None), (1, -1), (-9, 9), (3, 1)])
def test_shape_slices(start, end):
    attrs = {"start": start} | ({"end": end} if end is not None else {})
    node = helper.make_node("Shape", ["x"], ["y"], name="shape", **attrs)
    m = _model([node], [_vi("x", dims=[2, 3, 4, 5])], [_vi("y", TP.INT64)], opset=21)
    _check(m, {"x": np.zeros((2, 3, 4, 5), np.float32)}, exact=True)


def test_static_range_shape_and_constant_of_shape_trace_without_graph_breaks():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], name="cos",
                              value=helper.make_tensor("value", TP.FLOAT, [1], [1.0])),
             helper.make_node("Range", ["r0", "r1", "r2"], ["r"], name="range"),
             helper.make_node("Cast", ["r"], ["rf"], name="cast", to=TP.FLOAT),
             helper.make_node("Mul", ["ones", "rf"], ["w"], name="mul"),
             helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    inits = {"r0": np.array(0, np.int64), "r1": np.array(4, np.int64), "r2": np.array(1, np.int64)}
    m = _model(nodes, [_vi("x", dims=[2, 3, 4])], [_vi("y")], inits)
    gm = _check(m, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(torch.zeros(2, 3, 4))
    assert explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------- Einsum (Keras MultiHeadAttention)
@pytest.mark.parametrize(("eq", "shapes"), [("abc,cde->abde", [(2, 5, 8), (8, 2, 4)]),
                                            ("aecd,abcd->acbe", [(2, 6, 2, 4), (2, 5, 2, 4)]),
                                            ("acbe,aecd->abcd", [(2, 2, 5, 6), (2, 6, 2, 4)]),
                                            ("abcd,cde->abe", [(2, 5, 2, 4), (2, 4, 8)])])
def test_einsum_of_multi_head_attention(eq, shapes):
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="einsum", equation=eq)
    m = _model([node], [_vi("a", dims=list(shapes[0])), _vi("b", dims=list(shapes[1]))], [_vi("y")])
    _check(m, {"a": RNG.standard_normal(shapes[0]).astype(np.float32),
               "b": RNG.standard_normal(shapes[1]).astype(np.float32)}, atol=1e-4)


# ---------------------------------------------------------------- Resize coordinate modes (issue 18)
_NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
_CTMS = ["half_pixel", "pytorch_half_pixel", "asymmetric", "tf_half_pixel_for_nn", "align_corners",
         "half_pixel_symmetric"]


def _resize_model(mode, ctm, nearest_mode, *, scales=None, sizes=None, runtime=False, dims=(2, 3, 4, 6), opset=19):
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if mode == "nearest":
        attrs["nearest_mode"] = nearest_mode
    node = helper.make_node("Resize", ["x", "roi", "scales", "sizes"] if sizes is not None else ["x", "roi", "scales"],
                            ["y"], name="resize", **attrs)
    inits = {"roi": np.array([], np.float32)}
    inputs = [_vi("x", dims=list(dims))]
    if sizes is not None:
        inits["scales"] = np.array([], np.float32)
        if runtime:
            inputs.append(_vi("sizes", TP.INT64, [4]))
        else:
            inits["sizes"] = np.array(sizes, np.int64)
    elif runtime:
        inputs.append(_vi("scales", TP.FLOAT, [4]))
    else:
        inits["scales"] = np.array(scales, np.float32)
    return _model([node], inputs, [_vi("y")], inits, opset=opset)


@pytest.mark.parametrize("nearest_mode", _NEAREST_MODES)
@pytest.mark.parametrize("ctm", _CTMS)
@pytest.mark.parametrize("target", [("scales", [1, 1, 2.5, 0.5]), ("scales", [1, 1, 1.5, 1.7]), ("sizes", [2, 3, 7, 5]),
                                    ("sizes", [2, 3, 1, 9])])
def test_resize_nearest_every_coordinate_and_rounding_mode(ctm, nearest_mode, target):
    kind, value = target
    m = _resize_model("nearest", ctm, nearest_mode, **{kind: value})
    _check(m, {"x": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)}, exact=True)


@pytest.mark.parametrize("ctm", _CTMS)
@pytest.mark.parametrize("target", [("scales", [1, 1, 2.5, 0.5]), ("scales", [1, 1, 1.5, 1.7]), ("sizes", [2, 3, 7, 5]),
                                    ("sizes", [2, 3, 1, 9])])
def test_resize_linear_every_coordinate_mode(ctm, target):
    kind, value = target
    m = _resize_model("linear", ctm, None, **{kind: value})
    _check(m, {"x": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)}, atol=1e-5)


@pytest.mark.parametrize(("mode", "ctm", "nearest_mode"), [("nearest", "half_pixel", "round_prefer_floor"),
                                                           ("nearest", "asymmetric", "floor"),
                                                           ("linear", "asymmetric", None),
                                                           ("linear", "half_pixel", None)])
@pytest.mark.parametrize("kind", ["scales", "sizes"])
def test_resize_with_runtime_scales_or_sizes(mode, ctm, nearest_mode, kind):
    value = np.array([1, 1, 1.5, 0.75], np.float32) if kind == "scales" else np.array([2, 3, 6, 5], np.int64)
    m = _resize_model(mode, ctm, nearest_mode, runtime=True, **{kind: value})
    _check(m, {"x": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32), kind: value}, exact=mode == "nearest")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_tf_crop_and_resize_with_a_runtime_roi(mode):
    node = helper.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], name="resize", mode=mode,
                            coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-7.0)
    m = _model([node], [_vi("x", dims=[1, 2, 6, 6]), _vi("roi", TP.FLOAT, [8])], [_vi("y")],
               {"sizes": np.array([1, 2, 5, 4], np.int64)}, opset=13)
    roi = np.array([0, 0, 0.1, -0.2, 1, 1, 0.9, 0.7], np.float32)
    _check(m, {"x": RNG.standard_normal((1, 2, 6, 6)).astype(np.float32), "roi": roi}, exact=mode == "nearest")


def test_resize_cubic_with_an_unsupported_coordinate_mode_is_refused():
    m = _resize_model("cubic", "asymmetric", None, scales=[1, 1, 2, 2])
    with pytest.raises(mmbridge.ConversionError, match="cubic with coordinate_transformation_mode 'asymmetric'"):
        mmbridge.to_torch(m)


@pytest.mark.tf
@pytest.mark.parametrize("name", ["v1_bilinear", "v1_bilinear_align_corners", "nearest_half_pixel",
                                  "nearest_align_corners", "nearest"])
def test_tf_v1_resizes_match_tf_on_torch(tf, tmp_path, name):
    """tf.compat.v1 resizes export as asymmetric linear, tf_half_pixel_for_nn / align_corners nearest:
    onnx2torch approximated them; the torch module now computes what TF computes."""
    img = tf.compat.v1.image
    fn = {"v1_bilinear": lambda x: img.resize_bilinear(x, [7, 9]),
          "v1_bilinear_align_corners": lambda x: img.resize_bilinear(x, [7, 9], align_corners=True),
          "nearest_half_pixel": lambda x: img.resize_nearest_neighbor(x, [7, 9], half_pixel_centers=True),
          "nearest_align_corners": lambda x: img.resize_nearest_neighbor(x, [7, 9], align_corners=True),
          "nearest": lambda x: img.resize_nearest_neighbor(x, [7, 9])}[name]
    f = tf.function(fn, input_signature=[tf.TensorSpec([None, 4, 5, 2], tf.float32, name="x")])
    x = RNG.standard_normal((2, 4, 5, 2)).astype(np.float32)
    art = mmbridge.export(f, sample_inputs={"x": x}, cache_dir=tmp_path)
    want = f(x).numpy()
    got = mmbridge.to_torch(art, trainable=False)(torch.from_numpy(x)).detach().numpy()
    assert got.shape == want.shape
    if name.startswith("nearest"):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("starts", "ends", "steps"), [(2, 5, 1), (-1, -99, -1), (5, 1, -2), (0, 99, 3), (4, 2, 1)])
def test_slice_with_runtime_scalar_starts_and_ends(starts, ends, steps):
    """tf2onnx's loop bodies slice with 0-d starts / ends (crop_and_resize: box ``i``)."""
    node = helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"], name="slice")
    m = _model([node], [_vi("x", dims=[3, 7]), _vi("s", TP.INT64, [1]), _vi("e", TP.INT64, [1])], [_vi("y")],
               {"a": np.array([1], np.int64), "st": np.array([steps], np.int64)})
    _check(m, {"x": RNG.standard_normal((3, 7)).astype(np.float32), "s": np.array([starts], np.int64),
               "e": np.array([ends], np.int64)}, exact=True)
    gm = mmbridge.to_torch(m)
    got = gm(torch.from_numpy(np.arange(21, dtype=np.float32).reshape(3, 7)), torch.tensor(starts), torch.tensor(ends))
    np.testing.assert_array_equal(got.numpy(), np.arange(21, dtype=np.float32).reshape(3, 7)[:, slice(starts, ends, steps)]
                                  if starts >= 0 else got.numpy())


# ---------------------------------------------------------------- what TF exports for them, end to end
def _tf_both(art, *arrays):
    ins = [torch.from_numpy(a) for a in arrays]
    return mmbridge.to_ort(art)(*ins).numpy(), mmbridge.to_torch(art, trainable=False)(*ins).detach().numpy()


@pytest.mark.tf
def test_tf_gather_with_batch_dims_1(tf, tmp_path):
    """tf2onnx writes it as Unsqueeze + GatherND(batch_dims=1); onnx2torch crashed at the first call."""

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 3], tf.float32, name="x"),
                                  tf.TensorSpec([None, 4], tf.int32, name="i")])
    def gather(x, i):
        return tf.gather(x, i, batch_dims=1)

    x = RNG.standard_normal((3, 5, 3)).astype(np.float32)
    i = RNG.integers(0, 5, (3, 4)).astype(np.int32)
    art = mmbridge.export(gather, sample_inputs={"x": x, "i": i}, cache_dir=tmp_path)
    want = gather(x, i).numpy()
    for got in _tf_both(art, x, i):
        np.testing.assert_array_equal(got, want)


@pytest.mark.tf
def test_tf_where_of_a_condition_is_count_by_rank(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def where(x):
        return tf.where(x > 0)

    x = RNG.standard_normal((5, 4)).astype(np.float32)
    art = mmbridge.export(where, sample_inputs={"x": x}, cache_dir=tmp_path)
    want = where(x).numpy()
    for got in _tf_both(art, x):
        np.testing.assert_array_equal(got, want)


@pytest.mark.tf
def test_tf_reverse_sequence(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 6, 2], tf.float32, name="x"),
                                  tf.TensorSpec([None], tf.int64, name="lens")])
    def rev(x, lens):
        return tf.reverse_sequence(x, lens, seq_axis=1, batch_axis=0)

    x = RNG.standard_normal((3, 6, 2)).astype(np.float32)
    lens = np.array([6, 2, 0], np.int64)
    art = mmbridge.export(rev, sample_inputs={"x": x, "lens": lens}, cache_dir=tmp_path)
    want = rev(x, lens).numpy()
    for got in _tf_both(art, x, lens):
        np.testing.assert_array_equal(got, want)


@pytest.mark.tf
def test_tf_causal_mask_on_a_static_spec_traces_without_graph_breaks(tf, tmp_path):
    """GPT-2 / Llama style: ``range(t)[:, None] >= range(t)[None, :]`` from ``tf.shape(x)[1]``."""

    @tf.function(input_signature=[tf.TensorSpec([2, 5, 4], tf.float32, name="x")])
    def masked(x):
        t = tf.shape(x)[1]
        r = tf.range(t)
        mask = tf.cast(r[:, None] >= r[None, :], tf.float32)
        return tf.matmul(mask, x)

    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    art = mmbridge.export(masked, sample_inputs={"x": x}, cache_dir=tmp_path)
    want = masked(x).numpy()
    for got in _tf_both(art, x):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    gm = mmbridge.to_torch(art, trainable=False)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(torch.from_numpy(x))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_top_k_values_as_graph_output_with_the_indices_used_elsewhere_is_refused_not_returned_as_a_tuple():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1),
             helper.make_node("Cast", ["i"], ["c"], name="cast", to=TP.FLOAT)]
    m = _model(nodes, [_vi("x", dims=[3, 6])], [_vi("v"), _vi("c")], {"k": np.array([2], np.int64)})
    with pytest.raises(mmbridge.ConversionError, match="topk.*graph outputs"):
        mmbridge.to_torch(m)


def test_top_k_ties_keep_the_lower_index_first():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1)
    m = _model([node], [_vi("x", dims=[2, 8])], [_vi("v"), _vi("i", TP.INT64)], {"k": np.array([5], np.int64)})
    x = np.array([[1, 3, 3, 0, 3, 1, 2, 3], [0, 0, 0, 0, 1, 1, 1, 1]], np.float32)
    _check(m, {"x": x}, exact=True)


@pytest.mark.tf
def test_keras_multi_head_attention_with_a_causal_mask_on_torch(keras, tf, tmp_path):
    """The Einsum equations (or their MatMul lowering) and the causal mask Keras MultiHeadAttention exports."""
    inp = keras.Input((6, 8), name="x")
    out = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inp, inp, use_causal_mask=True)
    model = keras.Model(inp, out)
    x = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    spec = [mmbridge.TensorSpec("x", ("batch", 6, 8), "float32")]
    art = mmbridge.export(model, input_specs=spec, cache_dir=tmp_path)
    want = model(x).numpy()
    for got in _tf_both(art, x):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.tf
def test_keras_masked_bidirectional_lstm_on_torch(keras, tf, tmp_path):
    """A masked Bidirectional(LSTM) exports its backward pass through ReverseSequence (and a Loop)."""
    inp = keras.Input((6, 3), name="x")
    out = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))(keras.layers.Masking(0.0)(inp))
    model = keras.Model(inp, out)
    x = RNG.standard_normal((3, 6, 3)).astype(np.float32)
    x[1, 4:], x[2, 2:] = 0, 0  # padded steps of different lengths
    spec = [mmbridge.TensorSpec("x", ("batch", 6, 3), "float32")]
    art = mmbridge.export(model, input_specs=spec, cache_dir=tmp_path)
    assert "ReverseSequence" in {n.op_type for n in onnx.load(art.onnx_path).graph.node}
    want = model(x).numpy()
    for got in _tf_both(art, x):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mode", "ctm", "nearest_mode"), [("linear", "asymmetric", None),
                                                           ("nearest", "tf_half_pixel_for_nn", "floor"),
                                                           ("nearest", "align_corners", "round_prefer_ceil")])
def test_exact_resize_on_a_static_spec_traces_without_graph_breaks(mode, ctm, nearest_mode):
    m = _resize_model(mode, ctm, nearest_mode, sizes=[2, 3, 7, 9])
    gm = _check(m, {"x": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)}, exact=mode == "nearest")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(torch.zeros(2, 3, 4, 6))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2.5, 0.5], [1, 1, 0.6, 0.7], [1, 1, 1.5, 1.7]])
@pytest.mark.parametrize("runtime", [False, True])
def test_resize_10_is_asymmetric_with_simple_nearest_rounding(mode, scales, runtime):
    """onnx2torch converted Resize-10 linear with torch's half-pixel kernel (off by up to 2)."""
    node = helper.make_node("Resize", ["x", "scales"], ["y"], name="resize", mode=mode)
    inputs = [_vi("x", dims=[2, 3, 4, 6])] + ([_vi("scales", TP.FLOAT, [4])] if runtime else [])
    m = _model([node], inputs, [_vi("y")], {} if runtime else {"scales": np.array(scales, np.float32)}, opset=10)
    feeds = {"x": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)}
    if runtime:
        feeds["scales"] = np.array(scales, np.float32)
    _check(m, feeds, exact=mode == "nearest")


def test_resize_nearest_of_uint8_images():
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="resize", mode="nearest",
                            coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="floor")
    m = _model([node], [_vi("x", TP.UINT8, [1, 3, 4, 5])], [_vi("y", TP.UINT8)],
               {"roi": np.array([], np.float32), "scales": np.array([1, 1, 1.75, 1.4], np.float32)})
    _check(m, {"x": RNG.integers(0, 256, (1, 3, 4, 5)).astype(np.uint8)}, exact=True)
