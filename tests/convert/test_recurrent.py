"""Keras 3 GRU / LSTM / SimpleRNN -> ONNX ``Loop`` / ``LSTM`` -> torch (issue 3, case 12).

tf2onnx turns a Keras 3 ``GRU`` / ``SimpleRNN`` (and a ``trainable=True`` ``LSTM``) into an ONNX
``Loop`` and a frozen ``LSTM`` into a native ONNX ``LSTM``; :mod:`mmbridge.convert.ops.loop` and :mod:`mmbridge.convert.ops.recurrent` convert
both. References: Keras for exports, onnxruntime for every graph (exports and hand-made ones).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert import core as tb
from mmbridge.runtime.session import make_session

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # onnx2torch's Slice

ATOL = 1e-5


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, dtype=TP.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def _torch(module, *arrays):
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.asarray(a)) for a in arrays])
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


def _ort(model, feed):
    return make_session(model).run(None, feed)


def _assert_close(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Keras exports
# ---------------------------------------------------------------------------------------------
_KERAS_CACHE: dict = {}


def _keras_bridge(keras, tmp_path_factory, kind, trainable):
    """A model with two ``kind`` layers on one ``[N, T, 4]`` input (``T`` dynamic):
    ``return_sequences=True`` (``[N, T, 3]``) and ``False`` (``[N, 3]``); exported once per session."""
    key = (kind, trainable)
    if key not in _KERAS_CACHE:
        keras.utils.set_random_seed(0)
        inp = keras.Input((None, 4))
        layer = getattr(keras.layers, kind)
        seq = layer(3, return_sequences=True, bias_initializer="random_normal", name="seq")(inp)
        last = layer(3, bias_initializer="random_normal", name="last")(inp)
        model = keras.Model(inp, [seq, last])
        art = mmbridge.export(model, name=f"rnn_{kind}_{trainable}", cache_dir=tmp_path_factory.mktemp("rnn"),
                              trainable=trainable)
        _KERAS_CACHE[key] = (model, art)
    return _KERAS_CACHE[key]


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "SimpleRNN"])
def test_keras_rnn_matches_keras_and_ort(keras, tmp_path_factory, kind):
    model, art = _keras_bridge(keras, tmp_path_factory, kind, False)
    ops = {n.op_type for n in art.model.graph.node}
    assert ("LSTM" if kind == "LSTM" else "Loop") in ops  # tf2onnx's LSTM rewriter emits the native op
    tm = art.to_torch()
    sess = make_session(art.model)
    for batch, steps in ((2, 6), (5, 6), (3, 9)):  # the exported batch and length are not baked in
        x = np.random.RandomState(batch * steps).randn(batch, steps, 4).astype(np.float32)
        got = _torch(tm, x)
        _assert_close(got, [np.asarray(v) for v in model(x)])
        _assert_close(got, sess.run(None, {sess.get_inputs()[0].name: x}))
    n_keras = sum(w.numpy().size for w in model.trainable_weights)
    # an inference export of a Keras model converts frozen by default (the training contract)
    assert tb.parameter_count(tm) == 0
    # the native ONNX LSTM has B = [Wb, Rb] with Rb = 0 (tf2onnx): 4 * units more per layer
    assert tb.parameter_count(tm, trainable_only=False) == n_keras + (2 * 4 * 3 if kind == "LSTM" else 0)


@pytest.mark.tf
def test_keras_rnn_trainable_export_parameters_and_grads(keras, tmp_path_factory):
    model, art = _keras_bridge(keras, tmp_path_factory, "GRU", True)
    tm = art.to_torch()
    n_keras = sum(w.numpy().size for w in model.trainable_weights)
    assert sum(p.numel() for p in tm.parameters()) == n_keras == 2 * (4 * 9 + 3 * 9 + 2 * 9)
    sources = [tm.mmbridge_sources[n] for n, _ in tm.named_parameters()]  # the Keras variables, by path
    assert sorted(s.rsplit("mmb_var__", 1)[1].split(":")[0] for s in sources) == sorted(
        w.path.replace("/", "__") for w in model.trainable_weights)
    x = np.random.RandomState(0).randn(3, 7, 4).astype(np.float32)
    _assert_close(_torch(tm, x), [np.asarray(v) for v in model(x)])
    tm.train()
    seq, last = tm(torch.from_numpy(x))
    (seq.pow(2).sum() + last.pow(2).sum()).backward()
    for name, p in tm.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    tm.eval()


@pytest.mark.tf
def test_keras_gru_bf16_autocast_and_modes(keras, tmp_path_factory):
    _, art = _keras_bridge(keras, tmp_path_factory, "GRU", False)
    tm = art.to_torch()
    x = torch.from_numpy(np.random.RandomState(1).randn(4, 6, 4).astype(np.float32))
    with torch.no_grad():
        ref = tm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tm(x)
    for a, b in zip(low, ref):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert float((a.float() - b).abs().max()) < 5e-2
    assert tm.train().training and all(m.training for m in tm.modules())
    assert not tm.eval().training


# ---------------------------------------------------------------------------------------------
# hand-made Loops: data-dependent condition, outer-scope reads, zero iterations, nesting
# ---------------------------------------------------------------------------------------------
def _while_loop_model():
    """``h <- tanh(h @ W) + x`` while ``s < limit`` (no trip count; ``x``, ``W``, ``limit`` read from the outer scope)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hw"]), helper.make_node("Tanh", ["hw"], ["t"]),
         helper.make_node("Add", ["t", "x"], ["h_out"]), helper.make_node("Add", ["s_in", "one"], ["s_out"]),
         helper.make_node("Less", ["s_out", "limit"], ["c_out"]),
         helper.make_node("Cast", ["i"], ["i_f"], to=TP.FLOAT), helper.make_node("Mul", ["h_out", "i_f"], ["scan"])],
        "body", [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", TP.FLOAT, ["N", 3]), _vi("s_in", TP.FLOAT, [])],
        [_vi("c_out", TP.BOOL, []), _vi("h_out", TP.FLOAT, ["N", 3]), _vi("s_out", TP.FLOAT, []), _vi("scan", TP.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    loop = helper.make_node("Loop", ["", "c0", "x", "s0"], ["h_last", "s_last", "hs"], name="while_loop", body=body)
    inits = [numpy_helper.from_array(np.random.RandomState(0).randn(3, 3).astype(np.float32) * 0.5, "W"),
             numpy_helper.from_array(np.array(True), "c0"), numpy_helper.from_array(np.array(0.0, np.float32), "s0")]
    return _model([loop], [_vi("x", TP.FLOAT, ["N", 3]), _vi("limit", TP.FLOAT, [])],
                  [_vi("h_last", TP.FLOAT, None), _vi("s_last", TP.FLOAT, None), _vi("hs", TP.FLOAT, None)], inits)


@pytest.mark.parametrize("limit", [3.5, 0.0, 7.0])
def test_while_loop_with_data_dependent_condition_matches_ort(limit):
    m = _while_loop_model()
    x = np.random.RandomState(1).randn(2, 3).astype(np.float32)
    lim = np.array(limit, np.float32)
    tm = tb.to_torch(m)
    got, ref = _torch(tm, x, lim), _ort(m, {"x": x, "limit": lim})
    _assert_close(got, ref)
    assert got[2].shape[0] == max(1, int(np.ceil(limit)))  # the first iteration always runs (cond0 = True)
    assert [n for n, _ in tm.named_parameters()] == ["weights.W"]  # the outer-scope weight stays one Parameter


def test_loop_zero_iterations_and_scan_shape_match_ort():
    body = helper.make_graph(
        [helper.make_node("Add", ["h_in", "x"], ["h_out"]), helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Neg", ["h_out"], ["scan"])],
        "body", [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", TP.FLOAT, [2, 3])],
        [_vi("c_out", TP.BOOL, []), _vi("h_out", TP.FLOAT, [2, 3]), _vi("scan", TP.FLOAT, [2, 3])])
    loop = helper.make_node("Loop", ["M", "", "x"], ["h_last", "hs"], name="for_loop", body=body)
    m = _model([loop], [_vi("M", TP.INT64, []), _vi("x", TP.FLOAT, [2, 3])],
               [_vi("h_last", TP.FLOAT, None), _vi("hs", TP.FLOAT, None)])
    tm = tb.to_torch(m)
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    for trips in (0, 1, 4):
        M = np.array(trips, np.int64)
        _assert_close(_torch(tm, M, x), _ort(m, {"M": M, "x": x}))


def test_nested_loop_reads_outer_outer_weight():
    inner = helper.make_graph(
        [helper.make_node("MatMul", ["a_in", "W"], ["aw"]), helper.make_node("Add", ["aw", "x"], ["a_sum"]),
         helper.make_node("Tanh", ["a_sum"], ["a_out"]), helper.make_node("Identity", ["c_in2"], ["c_out2"])],
        "inner", [_vi("j", TP.INT64, []), _vi("c_in2", TP.BOOL, []), _vi("a_in", TP.FLOAT, ["N", 3])],
        [_vi("c_out2", TP.BOOL, []), _vi("a_out", TP.FLOAT, ["N", 3])])
    outer_body = helper.make_graph(
        [helper.make_node("Loop", ["three", "", "h_in"], ["h_out"], name="inner_loop", body=inner),
         helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("ReduceSumSquare", ["h_out"], ["energy"], keepdims=0)],
        "outer", [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", TP.FLOAT, ["N", 3])],
        [_vi("c_out", TP.BOOL, []), _vi("h_out", TP.FLOAT, ["N", 3]), _vi("energy", TP.FLOAT, [])],
        [numpy_helper.from_array(np.array(3, np.int64), "three")])
    loop = helper.make_node("Loop", ["two", "", "x"], ["h_last", "energies"], name="outer_loop", body=outer_body)
    inits = [numpy_helper.from_array(np.random.RandomState(0).randn(3, 3).astype(np.float32) * 0.5, "W"),
             numpy_helper.from_array(np.array(2, np.int64), "two")]
    m = _model([loop], [_vi("x", TP.FLOAT, ["N", 3])], [_vi("h_last", TP.FLOAT, None), _vi("energies", TP.FLOAT, None)], inits)
    tm = tb.to_torch(m)
    x = np.random.RandomState(1).randn(4, 3).astype(np.float32)
    _assert_close(_torch(tm, x), _ort(m, {"x": x}))
    assert [n for n, _ in tm.named_parameters()] == ["weights.W"]
    tm(torch.from_numpy(x))[0].sum().backward()
    assert float(tm.weights.W.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# native ONNX LSTM / GRU / RNN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,direction,extra", [
    ("LSTM", "forward", {}),
    ("LSTM", "bidirectional", {"peepholes": True, "lens": True}),
    ("LSTM", "reverse", {"clip": 0.5, "layout": 1}),
    ("GRU", "forward", {"linear_before_reset": 1}),
    ("GRU", "bidirectional", {"linear_before_reset": 0, "lens": True}),
    ("GRU", "reverse", {"activations": ["HardSigmoid", "Relu"], "activation_alpha": [0.3], "activation_beta": [0.4]}),
    ("RNN", "bidirectional", {"lens": True}),
    ("RNN", "forward", {"activations": ["Relu"], "layout": 1}),
])
def test_onnx_recurrent_op_matches_ort(kind, direction, extra):
    rng = np.random.RandomState(0)
    steps, batch, feat, hidden = 5, 3, 4, 6
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    dirs = 2 if direction == "bidirectional" else 1
    layout = extra.get("layout", 0)
    inits = [numpy_helper.from_array((rng.randn(dirs, gates * hidden, feat) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.randn(dirs, gates * hidden, hidden) * 0.5).astype(np.float32), "R"),
             numpy_helper.from_array((rng.randn(dirs, 2 * gates * hidden) * 0.5).astype(np.float32), "B")]
    names = ["x", "W", "R", "B", "lens" if extra.get("lens") else "", "h0"]
    state_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    inputs = [_vi("x", TP.FLOAT, ["a", "b", feat]), _vi("h0", TP.FLOAT, ["c", "d", hidden])]
    feed = {"x": rng.randn(*([batch, steps, feat] if layout else [steps, batch, feat])).astype(np.float32),
            "h0": rng.randn(*state_shape).astype(np.float32)}
    if extra.get("lens"):
        inputs.append(_vi("lens", TP.INT32, [batch]))
        feed["lens"] = np.array([5, 2, 4], np.int32)
    outputs = ["Y", "Y_h"]
    if kind == "LSTM":
        names.append("c0")
        inputs.append(_vi("c0", TP.FLOAT, ["c", "d", hidden]))
        feed["c0"] = rng.randn(*state_shape).astype(np.float32)
        outputs.append("Y_c")
        if extra.get("peepholes"):
            names.append("P")
            inits.append(numpy_helper.from_array((rng.randn(dirs, 3 * hidden) * 0.5).astype(np.float32), "P"))
    attrs = {k: v for k, v in extra.items() if k in ("clip", "linear_before_reset", "activations", "activation_alpha",
                                                     "activation_beta")}

    def build(lay):
        node = helper.make_node(kind, names, outputs, name="rnn", hidden_size=hidden, direction=direction, layout=lay, **attrs)
        return _model([node], inputs, [_vi(o, TP.FLOAT, None) for o in outputs], inits)

    m = build(layout)
    tm = tb.to_torch(m)
    order = [i.name for i in m.graph.input]
    got = _torch(tm, *[feed[n] for n in order])
    if layout:  # onnxruntime runs only layout=0: feed it time-major and transpose its outputs back
        swapped = {k: (np.ascontiguousarray(v.swapaxes(0, 1)) if k in ("x", "h0", "c0") else v) for k, v in feed.items()}
        ref = _ort(build(0), swapped)
        ref = [ref[0].transpose(2, 0, 1, 3)] + [r.swapaxes(0, 1) for r in ref[1:]]
    else:
        ref = _ort(m, feed)
    _assert_close(got, ref)
    assert sorted(n for n, _ in tm.named_parameters()) == sorted(f"weights.{t.name}" for t in inits)


def test_loop_body_is_converted_at_the_outer_models_opset():
    """``ReduceMean`` takes its axes as an input from opset 18 on: the body must not be read as opset 16 (Loop-16)."""
    body = helper.make_graph(
        [helper.make_node("ReduceMean", ["h_in", "axes"], ["m"], keepdims=1), helper.make_node("Sub", ["h_in", "m"], ["h_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", TP.INT64, []), _vi("c_in", TP.BOOL, []), _vi("h_in", TP.FLOAT, ["N", 3])],
        [_vi("c_out", TP.BOOL, []), _vi("h_out", TP.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    m = _model([helper.make_node("Loop", ["two", "", "x"], ["y"], name="centre", body=body)], [_vi("x", TP.FLOAT, ["N", 3])],
               [_vi("y", TP.FLOAT, None)], [numpy_helper.from_array(np.array(2, np.int64), "two")], opset=18)
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    _assert_close(_torch(tb.to_torch(m), x), _ort(m, {"x": x}))
