"""Cases 10-16 of ../shared/cases (public bug reports) through mmbridge's torch backend.

Each test swaps the case's RAW STACK call for mmbridge and asserts the case's expected value (or
its named error). Onnxruntime is the reference for hand-built graphs, TF/Keras for exports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert import core as tb
from mmbridge.runtime.session import make_session


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9 if opset >= 19 else 8
    return m


def _ort(m, feed):
    return make_session(m).run(None, feed)


def _run(module, *arrays):
    with torch.no_grad():
        out = module(*[torch.from_numpy(a) for a in arrays])
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in out]


def _mlp_onnx():
    rng = np.random.RandomState(0)
    W = numpy_helper.from_array(rng.randn(8, 4).astype(np.float32), "W")
    B = numpy_helper.from_array(rng.randn(4).astype(np.float32), "B")
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "B"], ["y"], name="add")],
                  [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 8])], [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
                  [W, B])


# ---------------------------------------------------------------------------------------------
# case 10: Resize 7x9 -> 5x13 given as float scales
# ---------------------------------------------------------------------------------------------
@pytest.mark.tf
@pytest.mark.case("10")
def test_resize_keeps_tf_output_shape_and_values(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 7, 9, 3], tf.float32, name="img")])
    def preprocess(img):
        return tf.image.resize(img, [5, 13], method="bilinear")

    art = mmbridge.export(preprocess, name="case10_resize", cache_dir=tmp_path)
    x = np.random.RandomState(0).rand(2, 7, 9, 3).astype(np.float32)
    ref = preprocess(tf.constant(x)).numpy()
    got = _run(art.to_torch(), x)[0]
    assert got.shape == ref.shape == (2, 5, 13, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # and with another batch size (the static size does not depend on N)
    x5 = np.random.RandomState(1).rand(5, 7, 9, 3).astype(np.float32)
    np.testing.assert_allclose(_run(art.to_torch(), x5)[0], preprocess(tf.constant(x5)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.case("10")
def test_resize_float_scale_rounding_matches_ort_on_raw_graph():
    scales = numpy_helper.from_array(np.array([1, 1, 5 / 7, 13 / 9], np.float32), "scales")
    roi = numpy_helper.from_array(np.array([], np.float32), "roi")
    m = _model([helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="rs", mode="linear")],
               [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 7, 9])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
               [roi, scales])
    x = np.random.RandomState(0).rand(2, 3, 7, 9).astype(np.float32)
    ref = _ort(m, {"x": x})[0]
    got = _run(tb.to_torch(m), x)[0]
    assert got.shape == ref.shape == (2, 3, 5, 13)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# case 11: Gelu-20, Split-18
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.case("11")
def test_gelu20(approximate):
    m = _model([helper.make_node("Gelu", ["x"], ["y"], name="gelu", approximate=approximate)],
               [helper.make_tensor_value_info("x", TP.FLOAT, [2, 5])], [helper.make_tensor_value_info("y", TP.FLOAT, None)], opset=20)
    x = np.random.RandomState(0).randn(2, 5).astype(np.float32) * 3
    t = tb.to_torch(m)
    assert any(isinstance(mod, torch.nn.GELU) and mod.approximate == approximate for mod in t.modules())
    np.testing.assert_allclose(_run(t, x)[0], _ort(m, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim,num_outputs,split", [(4, 2, None), (5, 3, None), (6, None, [1, 2, 3])])
@pytest.mark.case("11")
def test_split18(dim, num_outputs, split):
    outs = [f"o{i}" for i in range(num_outputs or len(split))]
    inits, inputs = [], ["x"]
    if split is not None:
        inits = [numpy_helper.from_array(np.array(split, np.int64), "split")]
        inputs.append("split")
    kw = {"num_outputs": num_outputs} if num_outputs else {}
    m = _model([helper.make_node("Split", inputs, outs, name="sp", axis=1, **kw)],
               [helper.make_tensor_value_info("x", TP.FLOAT, [2, dim])],
               [helper.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], inits, opset=18)
    x = np.random.RandomState(0).randn(2, dim).astype(np.float32)
    got, ref = _run(tb.to_torch(m), x), _ort(m, {"x": x})
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_opset18_reduce_and_resize_convert():
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    sizes = numpy_helper.from_array(np.array([2, 3, 4, 6], np.int64), "sizes")
    nodes = [helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], name="rs", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="mean", keepdims=0),
             helper.make_node("ReduceMax", ["r", "axes"], ["mx"], name="max", keepdims=1),
             helper.make_node("GlobalMaxPool", ["r"], ["g"], name="gmp")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, [2, 3, 2, 3])],
               [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("m", "mx", "g")], [axes, sizes], opset=18)
    x = np.random.RandomState(0).randn(2, 3, 2, 3).astype(np.float32)
    for g, r in zip(_run(tb.to_torch(m), x), _ort(m, {"x": x})):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside onnx2torch's ScatterND
@pytest.mark.parametrize("opset", [17, 18])
def test_same_upper_conv_maxpool_pad_reduce_scatternd_dynamic_hw(opset):
    """tf2onnx's ``auto_pad=SAME_UPPER`` (dynamic H/W), Pad / ReduceMean / ScatterND at opset 17 and 18."""
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([[0], [2]], np.int64), "idx"),
             numpy_helper.from_array(rng.randn(2, 4).astype(np.float32), "upd")]
    reduce = helper.make_node("ReduceMean", ["p", "axes"] if opset >= 18 else ["p"], ["r"], name="rm", keepdims=0,
                              **({} if opset >= 18 else {"axes": [2, 3]}))
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["mp"], name="pool", auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Pad", ["mp", "pads"], ["p"], name="pad", mode="constant"), reduce,
             helper.make_node("ScatterND", ["r", "idx", "upd"], ["y"], name="scatter")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, "H", "W"])],
               [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits, opset=opset)
    t = tb.to_torch(m)
    for shape in ((4, 3, 7, 9), (3, 3, 10, 6)):  # odd and even sizes: the extra pixel goes at the end
        x = rng.rand(*shape).astype(np.float32) - 0.5
        got, ref = _run(t, x)[0], _ort(m, {"x": x})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                                "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce18_every_op_matches_ort(op, keepdims):
    axes = numpy_helper.from_array(np.array([0, -1], np.int64), "axes")
    m = _model([helper.make_node(op, ["x", "axes"], ["y"], name="r", keepdims=keepdims)],
               [helper.make_tensor_value_info("x", TP.FLOAT, [3, 4, 5])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
               [axes], opset=18)
    x = np.random.RandomState(0).rand(3, 4, 5).astype(np.float32) + 0.5  # positive: ReduceLogSum is defined
    got, ref = _run(tb.to_torch(m), x)[0], _ort(m, {"x": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# case 12: OneHot (Keras CategoryEncoding) and the Loop of a Keras 3 GRU (more in test_recurrent.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.case("12")
def test_onehot_matches_ort(axis):
    depth = numpy_helper.from_array(np.array(5, np.int64), "depth")
    values = numpy_helper.from_array(np.array([-1.0, 2.5], np.float32), "values")
    m = _model([helper.make_node("OneHot", ["idx", "depth", "values"], ["y"], name="oh", axis=axis)],
               [helper.make_tensor_value_info("idx", TP.INT64, [2, 3])], [helper.make_tensor_value_info("y", TP.FLOAT, None)],
               [depth, values], opset=11)
    idx = np.array([[0, 4, -1], [2, -5, 7]], np.int64)  # negative wraps, 7 is out of range -> all "off"
    got, ref = _run(tb.to_torch(m), idx)[0], _ort(m, {"idx": idx})[0]
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.tf
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside onnx2torch's Slice
@pytest.mark.case("12")
def test_keras_category_encoding_and_gru(keras, tmp_path):
    i2 = keras.Input((1,), dtype="int32")
    ohe = keras.Model(i2, keras.layers.CategoryEncoding(num_tokens=5, output_mode="one_hot")(i2))
    x = np.array([[1], [3], [0], [4]], np.int32)
    art = mmbridge.export(ohe, name="case12_ohe", cache_dir=tmp_path, sample_inputs={"input": x[:2]})
    assert "OneHot" in [n.op_type for n in art.model.graph.node]
    np.testing.assert_array_equal(_run(art.to_torch(), x)[0], np.asarray(ohe(x)))

    keras.utils.set_random_seed(0)
    i1 = keras.Input((6, 4))
    gru = keras.Model(i1, keras.layers.GRU(3)(i1))
    art = mmbridge.export(gru, name="case12_gru", cache_dir=tmp_path)
    assert "Loop" in [n.op_type for n in art.model.graph.node]  # tf2onnx's form of the Keras 3 GRU
    tm = art.to_torch()  # raised ConversionError (no Loop converter) before
    assert tb.parameter_count(tm) == 0  # an inference export of a Keras model converts frozen by default
    assert tb.parameter_count(tm, trainable_only=False) == 81 == int(sum(np.prod(w.shape) for w in gru.trainable_weights))
    for batch in (2, 5):
        xs = np.random.RandomState(batch).randn(batch, 6, 4).astype(np.float32)
        got = _run(tm, xs)[0]
        np.testing.assert_allclose(got, np.asarray(gru(xs)), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, _ort(art.model, {"input": xs})[0], rtol=0, atol=1e-5)


@pytest.mark.case("12")
def test_unsupported_loop_forms_raise_conversion_error():
    """A Loop carrying an ONNX sequence, and a Loop body with an op that has no converter: ORT runs
    both; ``to_torch`` refuses with the node's name and points to ``to_ort()``."""
    seq_t = helper.make_tensor_sequence_value_info("s", TP.FLOAT, [2])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["x", "x"], ["y"])], "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c_in", TP.BOOL, []),
         helper.make_tensor_sequence_value_info("s_in", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("c_out", TP.BOOL, []), helper.make_tensor_sequence_value_info("s_in", TP.FLOAT, [2]),
         helper.make_tensor_value_info("y", TP.FLOAT, [2])])
    trips = numpy_helper.from_array(np.array(3, np.int64), "M")
    m = _model([helper.make_node("Loop", ["M", "", "s"], ["s_out", "ys"], name="seq_loop", body=body)],
               [helper.make_tensor_value_info("x", TP.FLOAT, [2]), seq_t], [helper.make_tensor_value_info("ys", TP.FLOAT, None)],
               [trips])
    x = np.array([1.0, 2.0], np.float32)
    assert _ort(m, {"x": x, "s": [x]})[0].shape == (3, 2)
    with pytest.raises(mmbridge.ConversionError) as err:
        tb.to_torch(m)
    msg = str(err.value)
    assert "Loop node 'seq_loop'" in msg and "sequence_type" in msg and "to_ort()" in msg

    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Det", ["x"], ["d"], name="det")], "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("c_in", TP.BOOL, [])],
        [helper.make_tensor_value_info("c_out", TP.BOOL, []), helper.make_tensor_value_info("d", TP.FLOAT, [])])
    m = _model([helper.make_node("Loop", ["M", ""], ["ds"], name="det_loop", body=body)],
               [helper.make_tensor_value_info("x", TP.FLOAT, [2, 2])], [helper.make_tensor_value_info("ds", TP.FLOAT, None)],
               [trips])
    assert _ort(m, {"x": np.eye(2, dtype=np.float32)})[0].shape == (3,)
    with pytest.raises(mmbridge.ConversionError) as err:
        tb.to_torch(m)
    msg = str(err.value)
    assert "Det (domain ai.onnx, opset 17)" in msg and "'det' (in the body of Loop 'det_loop')" in msg and "to_ort()" in msg


# ---------------------------------------------------------------------------------------------
# case 13: Keras Dense weights as buffers
# ---------------------------------------------------------------------------------------------
@pytest.mark.tf
@pytest.mark.parametrize("trainable_export", [True, False])
@pytest.mark.case("13")
def test_dense_weights_are_parameters(keras, tmp_path, trainable_export):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = keras.layers.Dense(8, activation="relu", bias_initializer="random_normal")(inp)
    model = keras.Model(inp, keras.layers.Dense(4, bias_initializer="random_normal")(h))
    art = mmbridge.export(model, name=f"case13_{trainable_export}", cache_dir=tmp_path, trainable=trainable_export)
    tm = art.to_torch()
    assert tb.parameter_count(tm, trainable_only=False) == 172 == int(sum(np.prod(w.shape) for w in model.trainable_weights))
    assert sum(b.numel() for b in tm.buffers()) == 0
    if not trainable_export:  # the training contract: an inference export of a Keras model converts frozen
        assert tb.parameter_count(tm) == 0
        with pytest.raises(mmbridge.ConversionError, match="re-export with trainable=True"):
            art.to_torch(trainable=True)
        return
    assert tb.parameter_count(tm) == 172
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)  # raised "empty parameter list" before
    before = [p.detach().clone() for p in tm.parameters()]
    x = torch.rand(5, 16, generator=torch.Generator().manual_seed(0))
    tm(x).pow(2).sum().backward()
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, tm.parameters()))


# ---------------------------------------------------------------------------------------------
# case 14: BN folded, Dropout removed
# ---------------------------------------------------------------------------------------------
@pytest.mark.tf
@pytest.mark.case("14")
def test_trainable_export_keeps_bn_dropout_and_every_weight(keras, tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    n_keras = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    assert n_keras == 138
    art = mmbridge.export(model, name="case14", cache_dir=tmp_path, trainable=True)
    tm = art.to_torch()
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tm.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in tm.modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in tm.modules())
    assert tb.parameter_count(tm) == n_keras
    x = np.random.RandomState(0).rand(3, 8, 8, 3).astype(np.float32)
    np.testing.assert_allclose(_run(tm, x)[0], np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-5)
    # the default (frozen) export folds BN: the metadata says it is not a trainable export
    frozen = mmbridge.export(model, name="case14_frozen", cache_dir=tmp_path)
    assert "BatchNormalization" not in [n.op_type for n in frozen.model.graph.node]
    assert frozen.meta["trainable"] is False


# ---------------------------------------------------------------------------------------------
# case 15: module starts in train mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.case("15")
def test_convert_then_run_equals_ort():
    c = 3
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.rand(c).astype(np.float32) + 0.5, "scale"),
             numpy_helper.from_array(rng.randn(c).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.randn(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.rand(c).astype(np.float32) + 0.1, "var")]
    m = _model([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn",
                                 epsilon=1e-3, momentum=0.99)],
               [helper.make_tensor_value_info("x", TP.FLOAT, ["N", c, 4, 4])],
               [helper.make_tensor_value_info("y", TP.FLOAT, ["N", c, 4, 4])], inits, opset=15)
    x = rng.rand(2, c, 4, 4).astype(np.float32)
    tm = tb.to_torch(m)
    assert tm.training is False
    bn = next(mm for mm in tm.modules() if isinstance(mm, torch.nn.modules.batchnorm._BatchNorm))
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    assert float(np.abs(_run(tm, x)[0] - _ort(m, {"x": x})[0]).max()) < 1e-5
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# case 16: DDP
# ---------------------------------------------------------------------------------------------
_DDP_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch, torch.distributed as dist
    from mmbridge.convert.core import to_torch
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    enc = to_torch(sys.argv[1])
    enc.train()
    ddp = torch.nn.parallel.DistributedDataParallel(enc)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.from_numpy(np.random.RandomState(rank).randn(4, 8).astype(np.float32))
    ddp(x).pow(2).mean().backward()
    opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in enc.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        # reference: one step with the gradient averaged over both ranks' batches
        ref = to_torch(sys.argv[1]).train()
        for r in range(world):
            xr = torch.from_numpy(np.random.RandomState(r).randn(4, 8).astype(np.float32))
            (ref(xr).pow(2).mean() / world).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
        want = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        json.dump({"n_params": int(flat.numel()), "rank_diff": float((gathered[0] - gathered[1]).abs().max()),
                   "ref_diff": float((flat - want).abs().max())}, open(sys.argv[2], "w"))
    dist.barrier()  # tear down together: gloo can abort a rank that exits while its peer still works
    dist.destroy_process_group()
""")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.case("16")
def test_two_process_gloo_ddp_step(tmp_path):
    onnx.save(_mlp_onnx(), str(tmp_path / "enc.onnx"))
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(tmp_path / "worker.py"), str(tmp_path / "enc.onnx"), str(tmp_path / "out.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        pytest.fail("2-process gloo DDP step did not finish within 180 s")
    assert proc.returncode == 0, stderr[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["n_params"] == 8 * 4 + 4
    assert res["rank_diff"] == 0.0  # DDP kept the replicas identical
    assert res["ref_diff"] < 1e-6  # and applied the all-reduced (averaged) gradient


@pytest.mark.case("16")
def test_frozen_encoder_is_flagged():
    frozen = tb.to_torch(_mlp_onnx(), trainable=False)
    assert sorted(tb.frozen_parameters(frozen)) == ["mm.bias", "mm.weight"]
    assert tb.parameter_count(frozen) == 0
    assert tb.parameter_count(frozen, trainable_only=False) == 36
    # DDP refuses a module with nothing to train: the composer must keep it outside DDP
    assert not any(p.requires_grad for p in frozen.parameters())
