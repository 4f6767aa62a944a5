"""Shape arithmetic from ONNX ``Shape`` folded at conversion (:mod:`mmbridge.convert.ops._symbolic`).

The chains tf2onnx writes for a dynamic batch / sequence length (``Shape -> Gather -> Unsqueeze
-> Concat`` into ``Expand`` / ``ConstantOfShape`` / ``Reshape`` / ``Tile`` / ``Slice`` / ``Range``)
must give the values onnxruntime gives at every size, and trace under ``torch.compile`` with
dynamic shapes without a graph break. Before the folding, dynamo raised "torch.Size() takes an
iterable of int (item 0 is FakeTensor)" on onnx2torch's ``Expand`` and broke on ``.tolist()``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert.ops import shape
from mmbridge.convert.ops import slice as slice_
from mmbridge.runtime.session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _graph() -> onnx.ModelProto:
    """x float32 [N, T, 4] (N, T dynamic) -> six outputs whose shapes come from Shape(x)."""
    rng = np.random.default_rng(0)
    inits = [_i64("zero", [0]), _i64("one", [1]), _i64("three", [3]), _i64("four", 4), _i64("i0", 0),
             _i64("i1", [1]), _i64("i01", [0, 1]), _i64("s0", [0]), _i64("e_max", [2**62]), _i64("m1", [-1]),
             numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.normal(size=(1, 3)).astype(np.float32), "row"),
             numpy_helper.from_array(np.asarray(0, np.int64), "r0"), numpy_helper.from_array(np.asarray(1, np.int64), "r1")]
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["s"]),
        n("Gather", ["s", "i0"], ["batch"], axis=0),                       # scalar N
        n("Unsqueeze", ["batch", "zero"], ["batch1"]),
        n("Concat", ["batch1", "three"], ["zshape"], axis=0),              # [N, 3]: TF zeros([batch, 3])
        n("ConstantOfShape", ["zshape"], ["zeros"], value=helper.make_tensor("v", TP.FLOAT, [1], [0.5])),
        n("Expand", ["row", "zshape"], ["expanded"]),
        n("Gather", ["s", "i1"], ["t1"], axis=0),                          # [T]
        n("Mul", ["t1", "four"], ["t4"]),
        n("Concat", ["batch1", "t4"], ["flat"], axis=0),                   # [N, T * 4]
        n("Reshape", ["x", "flat"], ["reshaped"]),
        # TF's slice(table, [0, 0], [T, -1]): ends = Where(size == -1, int64 max, begin + size)
        n("Equal", ["t1", "m1"], ["is_all"]),
        n("Add", ["s0", "t1"], ["end_t"]),
        n("Where", ["is_all", "e_max", "end_t"], ["ends"]),
        n("Slice", ["table", "s0", "ends", "zero"], ["pos"]),             # [T, 4]
        n("Gather", ["s", "i01"], ["nt"], axis=0),
        n("Concat", ["nt", "four_1d"], ["ntc"], axis=0),                   # [N, T, 4]
        n("Expand", ["pos", "ntc"], ["pos_b"]),
        n("Concat", ["batch1", "one"], ["reps"], axis=0),
        n("Tile", ["row", "reps"], ["tiled"]),                             # [N, 3]
        n("Squeeze", ["t1", "zero"], ["t0"]),
        n("Range", ["r0", "t0", "r1"], ["positions"]),                    # int64 [T]
        n("Cast", ["t0"], ["t0f"], to=TP.FLOAT),                           # GPT-2: tf.range(0.0, float(T), 1.0)
        n("Range", ["f0", "t0f", "f1"], ["positions_f"]),
    ]
    inits += [numpy_helper.from_array(np.asarray(0.0, np.float32), "f0"), numpy_helper.from_array(np.asarray(1.0, np.float32), "f1")]
    inits.append(_i64("four_1d", [4]))
    outs = [helper.make_tensor_value_info(name, dtype, None) for name, dtype in
            (("zeros", TP.FLOAT), ("expanded", TP.FLOAT), ("reshaped", TP.FLOAT), ("pos_b", TP.FLOAT),
             ("tiled", TP.FLOAT), ("positions", TP.INT64), ("positions_f", TP.FLOAT))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", "T", 4])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    return m


def _ort(m, x):
    return make_session(m).run(None, {"x": x})


def test_shape_chains_fold_into_symbolic_dims_and_compile():
    import torch._dynamo as dynamo

    m = _graph()
    tm = mmbridge.to_torch(m)
    kinds = [type(mod).__name__ for mod in tm.modules()]
    assert "OnnxExpand" not in kinds and "OnnxTile" not in kinds  # onnx2torch's torch.Size(tensor) modules
    exprs = [mod for mod in tm.modules() if isinstance(mod, (shape.Expand, shape.Reshape, shape.ConstantOfShape,
                                                                shape.Tile, shape.SymRange, slice_.Slice))]
    assert len(exprs) == 8 and all(not isinstance(mod, shape.Reshape) or mod.shape is not None for mod in exprs)

    sizes = [(2, 5), (3, 7), (1, 16)]
    for b, t in sizes:  # eager: exact against onnxruntime at every size
        x = np.random.default_rng(b).normal(size=(b, t, 4)).astype(np.float32)
        got = tm(torch.from_numpy(x))
        for g, want in zip(got, _ort(m, x)):
            assert tuple(g.shape) == want.shape and g.dtype == torch.from_numpy(want).dtype
            np.testing.assert_array_equal(g.numpy(), want)

    dynamo.reset()
    assert dynamo.explain(tm)(torch.zeros(2, 5, 4)).graph_break_count == 0
    dynamo.reset()
    compiled = torch.compile(tm, backend="aot_eager", dynamic=True)
    for b, t in sizes:
        x = torch.from_numpy(np.random.default_rng(b).normal(size=(b, t, 4)).astype(np.float32))
        for g, want in zip(compiled(x), tm(x)):
            assert g.shape == want.shape
            torch.testing.assert_close(g, want, rtol=0, atol=0)
    dynamo.reset()


def test_shape_arithmetic_it_cannot_prove_stays_a_runtime_tensor():
    """A Div by a dim (floor vs truncation unknown) is not folded: the Reshape reads its target at run time."""
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["s"]), n("Gather", ["s", "i1"], ["t1"], axis=0),
             n("Sub", ["zero", "t1"], ["neg"]), n("Div", ["neg", "two"], ["half"]),       # -T / 2: truncates in ONNX
             n("Mul", ["half", "m1"], ["pos"]), n("Concat", ["m1", "pos"], ["target"], axis=0),
             n("Reshape", ["x", "target"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", "T"])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)],
                          [_i64("i1", [1]), _i64("zero", [0]), _i64("two", [2]), _i64("m1", [-1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    tm = mmbridge.to_torch(m)
    (r,) = [mod for mod in tm.modules() if isinstance(mod, shape.Reshape)]
    assert r.shape is None
    x = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(tm(torch.from_numpy(x)).numpy(), _ort(m, x)[0])
