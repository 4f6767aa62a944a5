"""Every converter in ``mmbridge.op_converters`` against onnxruntime, parametrised from the registry.

Each registered key ``(domain, op_type, since_version)`` is run on a one-node graph at the first
and the last opset that resolve to that ``since_version`` (clamped to what onnxruntime runs:
7 .. ``MAX_OPSET``). A converter registered without a case in ``CASES`` fails
``test_every_registered_op_has_a_case``: a new converter comes with its test. Cases that feed a
constant argument also check that the converter folded it (the static module, Python ints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert.ops import indexing, logic, multi_output, normalization, pad, pooling, resize, shape
from mmbridge.convert.ops import slice as slice_
from mmbridge.convert.ops.random_ops import RandomDraw
from mmbridge.convert.registry import ConverterKey, schema_versions
from mmbridge.runtime.session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MIN_OPSET, MAX_OPSET = 7, 25  # onnxruntime runs ai.onnx from 7; 25: the newest version registered here
RNG = np.random.RandomState(0)


def _vi(name, dtype=TP.FLOAT, dims=None):
    return helper.make_tensor_value_info(name, dtype, dims)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


@dataclass
class Case:
    """A one-node graph for one op: ``build(opset) -> (nodes, inputs, outputs, initializers)``, plus feeds."""

    build: Callable[[int], tuple[list, list, list, list]]
    feeds: dict[str, np.ndarray]
    expect: Callable[[torch.nn.Module], bool] | None = None  # a check on the converted module
    atol: float = 1e-5
    extra: dict = field(default_factory=dict)


def _one(op, ins, outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), name=op.lower(), **attrs)


def _has(cls, pred=lambda m: True):
    return lambda gm: any(isinstance(m, cls) and pred(m) for m in gm.modules())


def _x(*shape_, positive=False):
    x = RNG.rand(*shape_).astype(np.float32)
    return x + 0.5 if positive else (x - 0.5) * 4


def _bn(opset):
    c = 3
    inits = [_init("s", RNG.rand(c).astype(np.float32) + 0.5), _init("b", RNG.randn(c).astype(np.float32)),
             _init("m", RNG.randn(c).astype(np.float32)), _init("v", RNG.rand(c).astype(np.float32) + 0.1)]
    return [_one("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3, momentum=0.99)], \
        [_vi("x", dims=["N", c, 4, 4])], [_vi("y")], inits


def _conv(opset):
    return [_one("Conv", ["x", "W"], auto_pad="SAME_UPPER", strides=[2, 2])], [_vi("x", dims=["N", 2, "H", "W"])], \
        [_vi("y")], [_init("W", RNG.randn(3, 2, 3, 3).astype(np.float32))]


def _conv_transpose(opset):  # a constant weight: onnx2torch's own converter (a runtime one is refused)
    return [_one("ConvTranspose", ["x", "W"], strides=[2, 2], pads=[1, 1, 1, 1])], [_vi("x", dims=["N", 2, 4, 5])], \
        [_vi("y")], [_init("W", RNG.randn(2, 3, 3, 3).astype(np.float32))]


def _cumsum(opset):  # default attributes: ONNX sums forward (onnx2torch defaulted to reverse)
    return [_one("CumSum", ["x", "axis"])], [_vi("x", dims=[3, 4])], [_vi("y")], [_init("axis", np.array(-1, np.int32))]


def _dropout(opset):
    return [_one("Dropout", ["x", "ratio"])], [_vi("x", dims=["N", 6])], [_vi("y")], [_init("ratio", np.float32(0.3))]


def _expand(opset):
    return [_one("Expand", ["x", "shape"])], [_vi("x", dims=[3, 1])], [_vi("y")], [_init("shape", np.array([2, 3, 4], np.int64))]


def _recurrent(kind):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]

    def build(opset):
        h, i = 5, 4
        inits = [_init("W", RNG.randn(1, gates * h, i).astype(np.float32) * 0.5),
                 _init("R", RNG.randn(1, gates * h, h).astype(np.float32) * 0.5),
                 _init("B", RNG.randn(1, 2 * gates * h).astype(np.float32) * 0.5)]
        return [_one(kind, ["x", "W", "R", "B"], ["y", "y_h"], hidden_size=h)], [_vi("x", dims=[3, 2, i])], \
            [_vi("y"), _vi("y_h")], inits

    return build


def _gelu(opset):
    return [_one("Gelu", ["x"], approximate="tanh")], [_vi("x", dims=[2, 5])], [_vi("y")], []


def _global_max_pool(opset):
    return [_one("GlobalMaxPool", ["x"])], [_vi("x", dims=["N", 3, 4, 5])], [_vi("y")], []


def _loop(opset):
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "x"], ["v_out"], name="acc"),
         helper.make_node("Mul", ["v_out", "two"], ["scan"], name="twice")], "body",
        [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("v_in", dims=[2, 3])],
        [_vi("c_in", TP.BOOL, []), _vi("v_out", dims=[2, 3]), _vi("scan", dims=[2, 3])],
        [_init("two", np.float32(2.0))])
    inits = [_init("M", np.array(3, np.int64)), _init("cond", np.array(True)), _init("v0", np.zeros((2, 3), np.float32))]
    return [_one("Loop", ["M", "cond", "v0"], ["v", "scans"], body=body)], [_vi("x", dims=[2, 3])], \
        [_vi("v"), _vi("scans")], inits


def _average_pool(opset):
    return [_one("AveragePool", ["x"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2])], \
        [_vi("x", dims=["N", 2, "H", "W"])], [_vi("y")], []


def _max_pool(opset):
    return [_one("MaxPool", ["x"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2])], \
        [_vi("x", dims=["N", 2, "H", "W"])], [_vi("y")], []


def _one_hot(opset):
    return [_one("OneHot", ["idx", "depth", "values"], axis=-1)], [_vi("idx", TP.INT64, [2, 3])], [_vi("y")], \
        [_init("depth", np.array(5, np.int64)), _init("values", np.array([-1.0, 2.5], np.float32))]


def _pad(opset):
    inits = [_init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), _init("value", np.float32(1.5))]
    return [_one("Pad", ["x", "pads", "value"], mode="constant")], [_vi("x", dims=["N", 2, 3, 4])], [_vi("y")], inits


def _reduce(op):
    def build(opset):
        return [_one(op, ["x", "axes"], keepdims=0)], [_vi("x", dims=[3, 4, 5])], [_vi("y")], \
            [_init("axes", np.array([0, -1], np.int64))]

    return build


def _reshape(opset):
    return [_one("Reshape", ["x", "shape"])], [_vi("x", dims=[2, 3, 4])], [_vi("y")], \
        [_init("shape", np.array([0, -1, 2], np.int64))]


def _resize(opset):
    # 5 * 1.5 = 7.5 and 7 * 0.6 = 4.2 are not whole: ORT maps coordinates with 1 / scale, not in / out
    if opset < 11:  # Resize-10: (X, scales), asymmetric
        return [_one("Resize", ["x", "scales"], mode="linear")], [_vi("x", dims=["N", 2, 5, 7])], [_vi("y")], \
            [_init("scales", np.array([1, 1, 1.5, 0.6], np.float32))]
    return [_one("Resize", ["x", "roi", "scales"], mode="linear")], [_vi("x", dims=["N", 2, 5, 7])], [_vi("y")], \
        [_init("roi", np.array([], np.float32)), _init("scales", np.array([1, 1, 1.5, 0.6], np.float32))]


def _scatter_nd(opset):
    return [_one("ScatterND", ["x", "idx", "upd"])], [_vi("x", dims=[4, 3])], [_vi("y")], \
        [_init("idx", np.array([[0], [2]], np.int64)), _init("upd", RNG.randn(2, 3).astype(np.float32))]


def _split(opset):
    outs = [_vi("a"), _vi("b"), _vi("c")]
    if opset < 13:
        return [_one("Split", ["x"], ["a", "b", "c"], axis=1, split=[2, 2, 3])], [_vi("x", dims=[2, 7])], outs, []
    if opset < 18:
        return [_one("Split", ["x", "split"], ["a", "b", "c"], axis=1)], [_vi("x", dims=[2, 7])], outs, \
            [_init("split", np.array([2, 2, 3], np.int64))]
    return [_one("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)], [_vi("x", dims=[2, 7])], outs, []


def _top_k(opset):  # values and indices both graph outputs, in the node's order
    outs = [_vi("v"), _vi("i", TP.INT64)]
    if opset < 10:
        return [_one("TopK", ["x"], ["v", "i"], axis=1, k=3)], [_vi("x", dims=[2, 7])], outs, []
    return [_one("TopK", ["x", "k"], ["v", "i"], axis=1)], [_vi("x", dims=[2, 7])], outs, [_init("k", np.array([3], np.int64))]


def _compare(op):
    def build(opset):
        return [_one(op, ["a", "b"])], [_vi("a", TP.INT64, [2, 3]), _vi("b", TP.INT64, [3])], [_vi("y", TP.BOOL)], []

    return build


def _bit_shift(opset):
    return [_one("BitShift", ["x", "s"], direction="RIGHT")], [_vi("x", TP.UINT32, [4]), _vi("s", TP.UINT32, [4])], \
        [_vi("y", TP.UINT32)], []


def _trilu(opset):
    return [_one("Trilu", ["x", "k"], upper=0)], [_vi("x", dims=[2, 4, 5])], [_vi("y")], [_init("k", np.array(1, np.int64))]


def _non_zero(opset):
    return [_one("NonZero", ["x"])], [_vi("x", dims=[3, 4])], [_vi("y", TP.INT64)], []


def _gather_nd(opset):  # tf.gather(x, i, batch_dims=1): GatherND(batch_dims=1) of i[..., None]
    if opset < 12:
        return [_one("GatherND", ["x", "i"])], [_vi("x", dims=[4, 5, 3]), _vi("i", TP.INT64, [4, 2, 1])], [_vi("y")], []
    return [_one("GatherND", ["x", "i"], batch_dims=1)], [_vi("x", dims=[4, 5, 3]), _vi("i", TP.INT64, [4, 2, 1])], \
        [_vi("y")], []


def _gather_nd_feeds():
    return {"x": _x(4, 5, 3), "i": np.array([[[3], [0]], [[-1], [2]], [[1], [1]], [[3], [-4]]], np.int64)}


def _reverse_sequence(opset):
    return [_one("ReverseSequence", ["x", "lens"], batch_axis=0, time_axis=1)], \
        [_vi("x", dims=[3, 5, 2]), _vi("lens", TP.INT64, [3])], [_vi("y")], []


def _constant_of_shape(opset):
    value = helper.make_tensor("value", TP.INT32, [1], [7])
    return [_one("ConstantOfShape", ["shape"], value=value)], [], [_vi("y", TP.INT32)], \
        [_init("shape", np.array([2, 3], np.int64))]


def _range(opset):  # constant inputs: folded (0.1 accumulated in float32, as ORT does)
    return [_one("Range", ["start", "limit", "delta"])], [], [_vi("y")], \
        [_init("start", np.float32(-1.0)), _init("limit", np.float32(1.05)), _init("delta", np.float32(0.1))]


def _shape(opset):
    attrs = {"start": 1, "end": -1} if opset >= 15 else {}
    return [_one("Shape", ["x"], **attrs)], [_vi("x", dims=[2, 3, 4, 5])], [_vi("y", TP.INT64)], []


def _size(opset):
    return [_one("Size", ["x"])], [_vi("x", dims=[2, 3, 4])], [_vi("y", TP.INT64)], []


def _slice(opset):  # a negative step, an end past the dim, a negative start
    if opset < 10:
        return [_one("Slice", ["x"], starts=[-3, 1], ends=[99, -1], axes=[1, 0])], [_vi("x", dims=[4, 6])], [_vi("y")], []
    inits = [_init("starts", np.array([-3, 4], np.int64)), _init("ends", np.array([99, 0], np.int64)),
             _init("axes", np.array([1, 0], np.int64)), _init("steps", np.array([1, -2], np.int64))]
    return [_one("Slice", ["x", "starts", "ends", "axes", "steps"])], [_vi("x", dims=[4, 6])], [_vi("y")], inits


def _squeeze(opset):
    if opset < 13:
        return [_one("Squeeze", ["x"], axes=[0, -2])], [_vi("x", dims=[1, 3, 1, 2])], [_vi("y")], []
    return [_one("Squeeze", ["x", "axes"])], [_vi("x", dims=[1, 3, 1, 2])], [_vi("y")], [_init("axes", np.array([0, -2], np.int64))]


def _tile(opset):
    return [_one("Tile", ["x", "repeats"])], [_vi("x", dims=[2, 3])], [_vi("y")], [_init("repeats", np.array([2, 1], np.int64))]


def _unsqueeze(opset):
    if opset < 13:
        return [_one("Unsqueeze", ["x"], axes=[0, -1])], [_vi("x", dims=[3, 2])], [_vi("y")], []
    return [_one("Unsqueeze", ["x", "axes"])], [_vi("x", dims=[3, 2])], [_vi("y")], [_init("axes", np.array([0, -1], np.int64))]


def _cast(opset):  # float32 -> bfloat16 (onnx2torch's table lacks it; TF's tf.cast(x, tf.bfloat16)) -> float32
    low = TP.BFLOAT16 if opset >= 13 else TP.FLOAT16  # Cast-9 has no bfloat16
    return [_one("Cast", ["x"], ["h"], to=low), helper.make_node("Cast", ["h"], ["y"], name="back", to=TP.FLOAT)], \
        [_vi("x", dims=[2, 5])], [_vi("y")], []


def _random(op):  # a degenerate range (low == high; scale 1e-30, below one ulp of 1.5: ORT aborts on scale 0): a constant both backends give exactly
    attrs = {"low": 2.5, "high": 2.5} if "Uniform" in op else {"mean": 1.5, "scale": 1e-30}

    def build(opset):
        if op.endswith("Like"):
            return [_one(op, ["x"], **attrs)], [_vi("x", dims=[2, 3])], [_vi("y")], []
        return [_one(op, [], shape=[2, 3], **attrs)], [], [_vi("y")], []

    return build


def _unary(op, **attrs):  # one-input element-wise ops (mmbridge.convert.ops.elementwise)
    def build(opset):
        dtype = TP.INT32 if op == "BitwiseNot" else TP.FLOAT
        return [_one(op, ["x"], **attrs)], [_vi("x", dtype, ["N", 5])], [_vi("y", dtype)], []
    return build


def _bitwise(op):
    def build(opset):
        return [_one(op, ["a", "b"])], [_vi("a", TP.INT32, [2, 5]), _vi("b", TP.INT32, [1, 5])], [_vi("y", TP.INT32)], []
    return build


def _ints(*shape_):
    return RNG.randint(-100, 100, shape_).astype(np.int32)


def _hardmax(opset):  # ties: the first maximum wins (row 0 has two 1.0s)
    return [_one("Hardmax", ["x"], axis=1 if opset >= 13 else 1)], [_vi("x", dims=[2, 3, 4])], [_vi("y")], []


def _depth_to_space(opset):
    attrs = {"mode": "DCR"} if opset >= 11 else {}
    return [_one("DepthToSpace", ["x"], blocksize=2, **attrs)], [_vi("x", dims=["N", 8, 3, 2])], [_vi("y")], []


def _space_to_depth(opset):
    return [_one("SpaceToDepth", ["x"], blocksize=2)], [_vi("x", dims=["N", 2, 4, 6])], [_vi("y")], []


def _scatter_elements(opset):  # repeated index 1 in column 0: only with a reduction (16+)
    attrs = {"reduction": "add"} if opset >= 16 else {}
    idx = np.array([[1, 0, 2], [1, 2, -1]] if opset >= 16 else [[1, 0, 2], [0, 2, -2]], np.int64)
    return [_one("ScatterElements", ["x", "idx", "upd"], axis=0, **attrs)], [_vi("x", dims=[3, 3])], [_vi("y")], \
        [_init("idx", idx), _init("upd", RNG.randn(2, 3).astype(np.float32))]


def _compress(opset):
    return [_one("Compress", ["x", "c"], axis=1)], [_vi("x", dims=[2, 5]), _vi("c", TP.BOOL, [4])], [_vi("y")], []


CASES_MORE = {
    "Sinh": Case(_unary("Sinh"), {"x": _x(2, 5)}),
    "Cosh": Case(_unary("Cosh"), {"x": _x(2, 5)}),
    "Asinh": Case(_unary("Asinh"), {"x": _x(2, 5)}),
    "Acosh": Case(_unary("Acosh"), {"x": _x(2, 5, positive=True) * 3 + 1}),
    "Atanh": Case(_unary("Atanh"), {"x": _x(2, 5) / 2.5}),
    "Mish": Case(_unary("Mish"), {"x": _x(2, 5)}),
    "ThresholdedRelu": Case(_unary("ThresholdedRelu", alpha=0.5), {"x": _x(2, 5)}),
    "BitwiseNot": Case(_unary("BitwiseNot"), {"x": _ints(2, 5)}),
    "BitwiseAnd": Case(_bitwise("BitwiseAnd"), {"a": _ints(2, 5), "b": _ints(1, 5)}),
    "BitwiseOr": Case(_bitwise("BitwiseOr"), {"a": _ints(2, 5), "b": _ints(1, 5)}),
    "BitwiseXor": Case(_bitwise("BitwiseXor"), {"a": _ints(2, 5), "b": _ints(1, 5)}),
    "Hardmax": Case(_hardmax, {"x": np.concatenate([np.ones((1, 3, 4), np.float32), _x(1, 3, 4)])}),
    "DepthToSpace": Case(_depth_to_space, {"x": _x(2, 8, 3, 2)}),
    "SpaceToDepth": Case(_space_to_depth, {"x": _x(2, 2, 4, 6)}),
    "ScatterElements": Case(_scatter_elements, {"x": _x(3, 3)}),
    "Compress": Case(_compress, {"x": _x(2, 5), "c": np.array([True, False, True, True])}),
}


CASES: dict[str, Case] = {
    "Cast": Case(_cast, {"x": np.array([[1.00390625, 3.14159, 1e-3, -2.5, 65504.0]] * 2, np.float32)}),
    "AveragePool": Case(_average_pool, {"x": _x(2, 2, 7, 9)}, _has(pooling.PaddedAveragePool)),
    "BatchNormalization": Case(_bn, {"x": _x(2, 3, 4, 4)}, _has(normalization.BatchNorm2d)),
    "Conv": Case(_conv, {"x": _x(2, 2, 7, 9)}, _has(pad.SamePad)),
    "ConvTranspose": Case(_conv_transpose, {"x": _x(2, 2, 4, 5)}),
    "CumSum": Case(_cumsum, {"x": _x(3, 4)}),
    "Dropout": Case(_dropout, {"x": _x(4, 6)}, _has(torch.nn.Dropout, lambda m: m.p == pytest.approx(0.3))),
    "Expand": Case(_expand, {"x": _x(3, 1)}, _has(shape.Expand)),
    "GRU": Case(_recurrent("GRU"), {"x": _x(3, 2, 4)}),
    "Gelu": Case(_gelu, {"x": _x(2, 5)}, _has(torch.nn.GELU, lambda m: m.approximate == "tanh")),
    "GlobalMaxPool": Case(_global_max_pool, {"x": _x(2, 3, 4, 5)}, _has(pooling.OnnxGlobalMaxPool)),
    "LSTM": Case(_recurrent("LSTM"), {"x": _x(3, 2, 4)}),
    "Loop": Case(_loop, {"x": _x(2, 3)}),
    "MaxPool": Case(_max_pool, {"x": _x(2, 2, 7, 9)}, _has(pad.SamePad, lambda m: m.value == float("-inf"))),
    "OneHot": Case(_one_hot, {"idx": np.array([[0, 4, -1], [2, -5, 7]], np.int64)}),
    "Pad": Case(_pad, {"x": _x(2, 2, 3, 4)}, _has(pad.Pad, lambda m: m.value == 1.5)),
    "RNN": Case(_recurrent("RNN"), {"x": _x(3, 2, 4)}),
    "Reshape": Case(_reshape, {"x": _x(2, 3, 4)}, _has(shape.Reshape, lambda m: m.shape == (0, -1, 2))),
    "Resize": Case(_resize, {"x": _x(2, 2, 5, 7)},
                   lambda gm: _has(resize.ResizeToSize, lambda m: m.size == (7, 4) and m.scales is not None)(gm)
                   or _has(resize.ResizeGather, lambda m: m.size == (7, 4) and m.ctm == "asymmetric")(gm)),
    "ScatterND": Case(_scatter_nd, {"x": _x(4, 3)}),
    "Split": Case(_split, {"x": _x(2, 7)}),
    "Squeeze": Case(_squeeze, {"x": _x(1, 3, 1, 2)}, _has(shape.Squeeze)),
    "Tile": Case(_tile, {"x": _x(2, 3)}, _has(shape.Tile, lambda m: m.repeats == (2, 1))),
    "Unsqueeze": Case(_unsqueeze, {"x": _x(3, 2)}, _has(shape.Unsqueeze)),
    "GreaterOrEqual": Case(_compare("GreaterOrEqual"), {"a": np.array([[1, 5, -3], [2, 2, 9]], np.int64),
                                                         "b": np.array([1, 6, -4], np.int64)}),
    "LessOrEqual": Case(_compare("LessOrEqual"), {"a": np.array([[1, 5, -3], [2, 2, 9]], np.int64),
                                                   "b": np.array([1, 6, -4], np.int64)}),
    "BitShift": Case(_bit_shift, {"x": np.array([4294967295, 16, 1, 7], np.uint32), "s": np.array([1, 2, 31, 0], np.uint32)}),
    "Trilu": Case(_trilu, {"x": _x(2, 4, 5)}, _has(logic.Trilu, lambda m: m.k == 1)),
    "NonZero": Case(_non_zero, {"x": (RNG.rand(3, 4) > 0.5).astype(np.float32)}, _has(indexing.NonZero)),
    "GatherND": Case(_gather_nd, _gather_nd_feeds(), _has(indexing.GatherND)),
    "ReverseSequence": Case(_reverse_sequence, {"x": _x(3, 5, 2), "lens": np.array([5, 1, 3], np.int64)}),
    "ConstantOfShape": Case(_constant_of_shape, {}, _has(shape.ConstantOfShape, lambda m: m.shape == (2, 3))),
    "Range": Case(_range, {}, _has(shape.ConstRange)),
    "TopK": Case(_top_k, {"x": RNG.permutation(14).reshape(2, 7).astype(np.float32)},
                 _has(multi_output.TopK, lambda m: m.k == 3)),
    "Slice": Case(_slice, {"x": _x(4, 6)}, _has(slice_.Slice, lambda m: not m.runtime)),
    "Size": Case(_size, {"x": _x(2, 3, 4)}, _has(shape.Size)),
    "Shape": Case(_shape, {"x": _x(2, 3, 4, 5)}, _has(shape.Shape)),
}
CASES.update(CASES_MORE)
for _op in ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"):  # tests/export/test_augment.py
    CASES[_op] = Case(_random(_op), {"x": _x(2, 3)} if _op.endswith("Like") else {},
                      _has(RandomDraw))
for _op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
            "ReduceSumSquare", "ReduceLogSum"):
    CASES[_op] = Case(_reduce(_op), {"x": _x(3, 4, 5, positive=True)})


def opsets_for(key: ConverterKey) -> list[int]:
    """The first and the last opset (within MIN_OPSET .. MAX_OPSET) that resolve to ``key.since_version``."""
    later = [v for v in schema_versions(key.op_type, key.domain) if v > key.since_version]
    last = min(later[0] - 1 if later else MAX_OPSET, MAX_OPSET)
    first = max(key.since_version, MIN_OPSET)
    return sorted({first, last}) if first <= last else []


def _params():
    out = []
    for key in mmbridge.op_converters:
        for opset in opsets_for(key) or [None]:
            marks = [pytest.mark.skip(reason=f"no opset in {MIN_OPSET}..{MAX_OPSET} resolves to {key}")] if opset is None else []
            out.append(pytest.param(key, opset, id=f"{key.op_type}-{key.since_version}@{opset}", marks=marks))
    return out


def _model(case: Case, opset: int) -> onnx.ModelProto:
    nodes, inputs, outputs, inits = case.build(opset)
    imports = [helper.make_opsetid("", opset)]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=imports)
    m.ir_version = max(helper.find_min_ir_version_for(imports), 4)  # IR 4: initializers need not be graph inputs
    return m


def test_every_registered_op_has_a_case():
    missing = sorted({k.op_type for k in mmbridge.op_converters} - set(CASES))
    assert not missing, f"Converter author: add a one-node case to CASES in {__file__} for {missing}"


@pytest.mark.parametrize("key,opset", _params())
def test_registered_converter_matches_onnxruntime(key, opset):
    case = CASES[key.op_type]
    m = _model(case, opset)
    gm = mmbridge.to_torch(m)
    if case.expect is not None:
        assert case.expect(gm), f"{key} at opset {opset}: the converted module is not the expected static form:\n{gm}"
    ref = make_session(m).run(None, case.feeds)
    with torch.no_grad():
        got = gm(*[torch.from_numpy(v) for v in case.feeds.values()])
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert tuple(g.shape) == r.shape, f"{key} at opset {opset}: shape {tuple(g.shape)} != ORT {r.shape}"
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-5, atol=case.atol, err_msg=f"{key} at opset {opset}")
