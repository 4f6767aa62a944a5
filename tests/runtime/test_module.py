"""Tests of the onnxruntime backend (``mmbridge.to_ort`` / ``ORTModule``), issue 4.

Small graphs are built with ``onnx.helper`` (fast); one TF parity test exports a Keras CNN and a
preprocessing ``tf.function``; one 2-process gloo DDP test; CUDA tests are marked ``gpu``.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import tempfile

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.errors import RuntimeBackendError, SpecError
from mmbridge.runtime import module as ort_backend
from mmbridge.runtime import session as ort_session

LOGGER = "mmbridge.runtime.module"


def _model(nodes, inputs, outputs, inits=(), name="g", opset=17):
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def mul2_model():
    """y[N, C] = 2 * x[N, C] (float32)."""
    return _model([helper.make_node("Mul", ["x", "two"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, ["N", "C"])],
                  [helper.make_tensor_value_info("y", TP.FLOAT, ["N", "C"])],
                  [numpy_helper.from_array(np.array(2, np.float32), "two")], name="mul2")


def two_io_model():
    """a[B, 4] f32, b[B, 4] f32 -> s = a + b [B, 4], r = ReduceSum(a * b, axis 1) [B]."""
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["a", "b"], ["p"]),
             helper.make_node("ReduceSum", ["p", "axes"], ["r"], keepdims=0)]
    return _model(nodes, [helper.make_tensor_value_info("a", TP.FLOAT, ["B", 4]),
                          helper.make_tensor_value_info("b", TP.FLOAT, ["B", 4])],
                  [helper.make_tensor_value_info("s", TP.FLOAT, ["B", 4]),
                   helper.make_tensor_value_info("r", TP.FLOAT, ["B"])],
                  [numpy_helper.from_array(np.array([1], np.int64), "axes")], name="two_io")


def nonzero_model():
    """idx = NonZero(x[N]) -> int64 [1, M]: a data-dependent output shape."""
    return _model([helper.make_node("NonZero", ["x"], ["idx"])], [helper.make_tensor_value_info("x", TP.FLOAT, ["N"])],
                  [helper.make_tensor_value_info("idx", TP.INT64, [1, "M"])], name="nonzero")


def u8_model():
    """uint8 NHWC image [B, 4, 4, 3] -> float32 NCHW [B, 3, 4, 4] / 255 (a preprocessing graph)."""
    nodes = [helper.make_node("Cast", ["img"], ["f"], to=TP.FLOAT), helper.make_node("Div", ["f", "k"], ["d"]),
             helper.make_node("Transpose", ["d"], ["out"], perm=[0, 3, 1, 2])]
    return _model(nodes, [helper.make_tensor_value_info("img", TP.UINT8, ["B", 4, 4, 3])],
                  [helper.make_tensor_value_info("out", TP.FLOAT, None)],
                  [numpy_helper.from_array(np.array(255, np.float32), "k")], name="u8prep")


# -- calling convention ------------------------------------------------------------------------
def test_positional_keyword_and_multi_output_tuple():
    m = mmbridge.to_ort(two_io_model())
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    s, r = m(a, b)
    torch.testing.assert_close(s, a + b, rtol=0, atol=0)
    torch.testing.assert_close(r, (a * b).sum(1), rtol=1e-6, atol=1e-6)
    assert m.output_names == ["s", "r"] and s.shape == (3, 4) and r.shape == (3,)
    s2, r2 = m(b=b, a=a)
    assert torch.equal(s2, s) and torch.equal(r2, r)
    s3, _ = m(a, b=b)
    assert torch.equal(s3, s)
    with pytest.raises(SpecError, match=r"missing inputs \['b'\]"):
        m(a)
    with pytest.raises(SpecError, match="unexpected input 'c'"):
        m(a, b, c=a)
    with pytest.raises(SpecError, match="takes 2 inputs"):
        m(a, b, a)
    with pytest.raises(SpecError, match="'a' given both"):
        m(a, b, a=a)
    with pytest.raises(SpecError, match="input 'a' is a ndarray"):
        m(a.numpy(), b)


def test_single_output_is_tensor_and_uint8_preprocessing():
    m = mmbridge.to_ort(u8_model())
    img = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    out = m(img)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, img.permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-7)


def test_shape_checked_against_spec_names_the_input():
    m = mmbridge.to_ort(two_io_model())
    with pytest.raises(SpecError, match=r"input 'b': axis 1 must be 4"):
        m(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(SpecError, match=r"input 'a': expected rank 2"):
        m(torch.randn(2, 4, 1), torch.randn(2, 4))
    with pytest.raises(SpecError, match=r"input 'b': symbolic dim 'B' is 3 here but 2"):
        m(torch.randn(2, 4), torch.randn(3, 4))


def test_device_checks_on_cpu_only_machine():
    m = mmbridge.to_ort(two_io_model())
    with pytest.raises(RuntimeBackendError, match="input 'b' is on meta but input 'a' is on cpu; put all inputs on one"):
        m(torch.ones(2, 4), torch.ones(2, 4, device="meta"))
    with pytest.raises(RuntimeBackendError, match="inputs on meta are not supported"):
        m(torch.ones(2, 4, device="meta"), torch.ones(2, 4, device="meta"))
    assert m._runners == {}


# -- outputs: pre-allocated vs DLPack, memory sharing, no aliasing -----------------------------
def test_preallocated_output_is_what_ort_wrote():
    m = mmbridge.to_ort(mul2_model())
    assert m._out_plan == [[(0, 0), (0, 1)]]  # both output dims resolved from x's dims by name
    x = torch.arange(6.0).reshape(2, 3)
    y = m(x)
    runner = m._runner_for(torch.device("cpu"))
    ort_value = runner.binding.get_outputs()[0]
    assert y.data_ptr() == ort_value.data_ptr()  # ORT wrote into the returned tensor's memory
    assert y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)


def test_tf2onnx_style_unrelated_dim_names_still_resolve():
    """tf2onnx names the input batch 'unk__24' and the output's 'unk__25'; inference links them."""
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, ["unk__24", 3])],
               [helper.make_tensor_value_info("y", TP.FLOAT, ["unk__25", 3])])
    mod = mmbridge.to_ort(m)
    assert mod._out_plan == [[(0, 0), 3]]
    x = torch.randn(5, 3)
    torch.testing.assert_close(mod(x), x.relu(), rtol=0, atol=0)


def test_consecutive_calls_do_not_alias_and_batch_changes():
    """Case 20's kind: batch 2 -> 4 -> 2; earlier results are never overwritten."""
    m = mmbridge.to_ort(mul2_model())
    x2, x4 = torch.ones(2, 3), torch.full((4, 3), 3.0)
    y2 = m(x2)
    y4 = m(x4)
    y2b = m(torch.full((2, 3), 5.0))
    assert y2.shape == (2, 3) and y4.shape == (4, 3)
    assert torch.equal(y2, torch.full((2, 3), 2.0)) and torch.equal(y4, torch.full((4, 3), 6.0))
    assert torch.equal(y2b, torch.full((2, 3), 10.0))


def test_empty_batch_and_empty_dynamic_output(caplog):
    m = mmbridge.to_ort(mul2_model())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y = m(torch.ones(0, 3))
    assert y.shape == (0, 3) and y.dtype == torch.float32
    n = mmbridge.to_ort(nonzero_model())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert n(torch.zeros(4)).shape == (1, 0)
        assert n(torch.zeros(4)).shape == (1, 0)
        assert n(torch.ones(4)).tolist() == [[0, 1, 2, 3]]
    assert caplog.records == []  # empty outputs are ORT-allocated up front, not retried


def test_dynamic_output_via_dlpack_zero_copy_and_learned_data_dependent_shape(caplog):
    m = mmbridge.to_ort(nonzero_model())
    assert m._out_plan == [None]  # M is not a function of the input shape
    x1 = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0])
    y1 = m(x1)
    runner = m._runner_for(torch.device("cpu"))
    assert y1.data_ptr() == runner.binding.get_outputs()[0].data_ptr()  # DLPack: ORT's own buffer
    assert y1.dtype == torch.int64 and y1.tolist() == [[1, 3, 4]]
    # same input shape, different count: the learned shape [1, 3] is wrong; ORT's shape check
    # catches it, the call is re-run with an ORT-allocated output, and that is logged once.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y2 = m(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))
        y3 = m(torch.tensor([0.0, 0.0, 0.0, 0.0, 7.0]))
    assert y2.tolist() == [[0, 1, 3, 4]] and y3.tolist() == [[4]]
    assert y1.tolist() == [[1, 3, 4]]  # first result untouched
    assert 0 in m._data_dependent
    msgs = [r.getMessage() for r in caplog.records if "data-dependent" in r.getMessage()]
    assert len(msgs) == 1 and "'idx'" in msgs[0]


def test_ort_runtime_error_is_named():
    # Reshape to a fixed 4 elements: feeding 6 elements fails inside ORT
    m = _model([helper.make_node("Reshape", ["x", "shp"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, ["N"])],
               [helper.make_tensor_value_info("y", TP.FLOAT, [2, 2])],
               [numpy_helper.from_array(np.array([2, 2], np.int64), "shp")], name="resh")
    mod = mmbridge.to_ort(m)
    torch.testing.assert_close(mod(torch.arange(4.0)), torch.arange(4.0).reshape(2, 2))
    with pytest.raises(RuntimeBackendError, match=r"onnxruntime failed running bridge 'resh'.*'x': \(\(6,\)"):
        mod(torch.arange(6.0))


# -- frozen ----------------------------------------------------------------------------------
def test_frozen_no_params_no_grad_train_allowed():
    m = mmbridge.to_ort(mul2_model())
    assert list(m.parameters()) == [] and list(m.buffers()) == [] and len(m.state_dict()) == 0
    m.load_state_dict({})
    x = torch.randn(2, 3, requires_grad=True)
    with torch.enable_grad():
        y = m(x)
    # issue 15: an input that requires grad gets outputs whose backward names the bridge (was: no grad_fn)
    with pytest.raises(RuntimeBackendError, match=r"bridge 'mul2' runs in onnxruntime and is frozen"):
        y.sum().backward()
    with torch.no_grad():
        assert not m(x).requires_grad and m(x).grad_fn is None
    torch.testing.assert_close(y, 2 * x.detach(), rtol=0, atol=0)
    assert m.train() is m and m.training  # HybridModel.train() must work
    assert m.eval() is m and not m.training
    assert m.requires_grad_(False) is m
    assert m.trainable is False
    with pytest.raises(RuntimeBackendError, match=r"cannot be trained \(requires_grad_\(True\)\).*to_torch"):
        m.requires_grad_(True)
    with pytest.raises(RuntimeBackendError, match=r"trainable=True.*to_torch"):
        m.trainable = True
    # composes: a parent module with a trainable head gets gradients only for the head
    head = torch.nn.Linear(3, 1)
    loss = head(m(torch.randn(4, 3))).sum()
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.shape == (1, 3)


def test_inside_compose_as_frozen_preprocess_and_frozen_encoder():
    composition = pytest.importorskip("mmbridge.composition")
    pre = mmbridge.to_ort(u8_model())  # uint8 NHWC [B, 4, 4, 3] -> float NCHW [B, 3, 4, 4]
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6))
    feats = mmbridge.to_ort(two_io_model())  # frozen ORT encoder with two inputs, two outputs
    model = composition.compose(
        {"image": composition.Branch(enc, preprocess=pre, out_dim=6),
         "tab": composition.Branch(feats, input_keys=("a", "b"), out_dim=4, trainable=False)},
        fusion="concat", num_classes=3, fusion_dim=8)
    model.train()
    assert pre.training is False and feats.training is False  # the frozen parts stay in eval
    batch = {"image": torch.randint(0, 256, (5, 4, 4, 3), dtype=torch.uint8),
             "a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    out = model(batch)
    logits = out["logits"] if isinstance(out, dict) else out
    assert logits.shape == (5, 3)
    logits.sum().backward()
    assert enc[1].weight.grad is not None and enc[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pre.parameters()) and list(feats.parameters()) == []


# -- issue 15: backward() through an ORT bridge names the bridge and to_torch ------------------
FROZEN = r"bridge 'mul2' runs in onnxruntime and is frozen; use artifact\.to_torch\(\) to train it"


def test_backward_through_ort_bridge_says_frozen_and_to_torch():
    m = mmbridge.to_ort(mul2_model())
    lin = torch.nn.Linear(3, 3)
    y = m(lin(torch.randn(2, 3)))  # a trainable layer before the frozen bridge
    with pytest.raises(RuntimeBackendError, match=FROZEN):
        y.sum().backward()
    head = torch.nn.Linear(3, 1)  # through a head too: the gradient would have to cross the bridge
    with pytest.raises(RuntimeBackendError, match=FROZEN + r".*detach"):
        head(m(lin(torch.randn(2, 3)))).sum().backward()
    # detached inputs / no_grad: no autograd node at all, and a head after the bridge still trains
    y = m(lin(torch.randn(2, 3)).detach())
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        assert m(lin(torch.randn(2, 3))).grad_fn is None
    head(m(torch.randn(4, 3))).sum().backward()
    assert head.weight.grad is not None


def test_backward_guard_keeps_zero_copy_and_exact_outputs_non_differentiable():
    m = mmbridge.to_ort(mul2_model())
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    y = m(x)
    assert y.requires_grad and y.data_ptr() == m._runner_for(torch.device("cpu")).binding.get_outputs()[0].data_ptr()
    torch.testing.assert_close(y.detach(), 2 * x.detach(), rtol=0, atol=0)
    idx = mmbridge.to_ort(nonzero_model())(torch.tensor([0.0, 2.0, 3.0], requires_grad=True))  # int64, DLPack
    assert idx.dtype == torch.int64 and not idx.requires_grad and idx.tolist() == [[1, 2]]
    s, r = mmbridge.to_ort(two_io_model())(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))
    with pytest.raises(RuntimeBackendError, match=r"bridge 'two_io' runs in onnxruntime and is frozen"):
        (s.sum() + r.sum()).backward()


# -- dtype / autocast -------------------------------------------------------------------------
def test_autocast_casts_to_graph_dtype_and_logs_once(caplog):
    m = mmbridge.to_ort(mul2_model())
    x = torch.randn(4, 3).bfloat16()
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = m(x)
        y2 = m(x)
    assert y1.dtype == torch.float32  # graph dtype
    torch.testing.assert_close(y1, 2 * x.float(), rtol=0, atol=0)  # bf16 -> fp32 is exact
    assert torch.equal(y1, y2)
    casts = [r for r in caplog.records if "inside torch.autocast" in r.getMessage()]
    assert len(casts) == 1 and "'x' is bfloat16" in casts[0].getMessage()
    with pytest.raises(SpecError, match="input 'x' has dtype bfloat16 but the graph expects float32"):
        m(x)  # outside autocast: an error
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(SpecError, match="dtype int64"):
        m(torch.ones(2, 3, dtype=torch.int64))  # never cast integers


# -- threads, devices, replication ------------------------------------------------------------
def test_intra_op_threads_default_per_local_rank(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ort_session.default_intra_op_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert ort_session.default_intra_op_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ort_session.default_intra_op_threads() == 16
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    m = mmbridge.to_ort(mul2_model())
    m(torch.ones(1, 3))
    so = m._runner_for(torch.device("cpu")).session.get_session_options()
    assert so.intra_op_num_threads == 1
    m3 = mmbridge.to_ort(mul2_model(), intra_op_threads=3)
    m3(torch.ones(1, 3))
    assert m3._runner_for(torch.device("cpu")).session.get_session_options().intra_op_num_threads == 3


def test_session_options_pass_through_and_unknown_rejected():
    m = mmbridge.to_ort(mul2_model(), graph_optimization_level="ORT_DISABLE_ALL", options={"enable_mem_pattern": False},
                        config_entries={"session.intra_op.allow_spinning": "0"})
    m(torch.ones(1, 3))
    so = m._runner_for(torch.device("cpu")).session.get_session_options()
    assert so.enable_mem_pattern is False and str(so.graph_optimization_level).endswith("ORT_DISABLE_ALL")
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(TypeError, match=r"unknown session options \['threads'\]"):
        mmbridge.to_ort(mul2_model(), threads=2)


def test_to_device_pickle_deepcopy_recreate_session_lazily():
    m = mmbridge.to_ort(mul2_model(), device="cpu")
    x = torch.randn(2, 3)
    y = m(x)
    assert m.device == torch.device("cpu") and len(m._runners) == 1
    parent = torch.nn.Sequential(m, torch.nn.Linear(3, 2))
    assert parent.to("cpu")[0] is m and m.device == torch.device("cpu")
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert clone._runners == {}  # no session travels
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
        assert len(clone._runners) == 1
    assert len(m._runners) == 1


def test_loads_from_path_and_rejects_bad_input(tmp_path):
    import onnx

    p = tmp_path / "mul2.onnx"
    onnx.save(mul2_model(), str(p))
    m = mmbridge.to_ort(p)
    assert m.name == "mul2" and [s.name for s in m.input_specs] == ["x"] and m.input_specs[0].shape == ("N", "C")
    torch.testing.assert_close(m(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    with pytest.raises(FileNotFoundError, match="neither an .onnx file nor an mmbridge artifact"):
        mmbridge.to_ort(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="not int"):
        mmbridge.to_ort(3)
    with pytest.raises(RuntimeBackendError, match="device meta is not supported"):
        mmbridge.to_ort(mul2_model(), device="meta")


def test_graph_without_declared_rank_runs():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, None)],
               [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    mod = mmbridge.to_ort(m)
    assert mod._out_plan == [None]
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    assert mod(x).tolist() == [[0.0, 2.0], [3.0, 0.0]]
    assert mod(x[0]).tolist() == [0.0, 2.0]  # any rank


def test_string_graph_input_rejected_at_construction():
    m = _model([helper.make_node("Identity", ["s"], ["t"])], [helper.make_tensor_value_info("s", TP.STRING, ["N"])],
               [helper.make_tensor_value_info("t", TP.STRING, ["N"])])
    with pytest.raises(SpecError, match="input 's' has ONNX type"):
        mmbridge.to_ort(m)


def test_lazy_public_names():
    assert mmbridge.to_ort is ort_backend.to_ort and mmbridge.ORTModule is ort_backend.ORTModule


# -- TF parity (foundation: a Keras CNN and a preprocessing tf.function) ------------------------
@pytest.fixture(scope="module")
def tf_artifacts(tf, keras):
    from mmbridge.specs import TensorSpec

    @tf.function(input_signature=[tf.TensorSpec([None, 24, 24, 3], tf.uint8, name="image")])
    def preprocess(image):
        x = tf.image.resize(tf.cast(image, tf.float32), (16, 16), method="bilinear")
        x = (x / 255.0 - tf.constant([0.485, 0.456, 0.406])) / tf.constant([0.229, 0.224, 0.225])
        return tf.transpose(x, [0, 3, 1, 2])

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="x")
    h = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    cnn = keras.Model(inp, keras.layers.Dense(5)(h))
    pre = mmbridge.export(preprocess, name="ort_test_prep", role="preprocess",
                          input_specs=[TensorSpec("image", ("batch", 24, 24, 3), "uint8", "NHWC", (0, 255))])
    enc = mmbridge.export(cnn, name="ort_test_cnn")
    return {"prep": pre, "cnn": enc}


@pytest.mark.tf
@pytest.mark.parametrize("which", ["prep", "cnn"])
def test_tf_parity_against_golden(tf_artifacts, which):
    from mmbridge.parity import compare, load_golden

    art = tf_artifacts[which]
    golden = load_golden(art)
    m = art.to_ort()
    args = [torch.from_numpy(np.ascontiguousarray(golden["inputs"][s.name])) for s in art.input_specs]
    out = m(*args)
    outs = (out,) if isinstance(out, torch.Tensor) else out
    got = {n: o.numpy() for n, o in zip(art.output_names, outs)}
    rows = compare(got, golden["outputs"], backend="ort_module", stage="onnx")
    assert rows and all(r.passed for r in rows), rows
    assert all(got[n].shape == golden["outputs"][n].shape for n in art.output_names)


# -- DDP: an ORT branch feeding a trainable head, 2 gloo processes -----------------------------
def _ddp_worker(rank: int, world: int, model_bytes: bytes, port: int, out_dir: str) -> None:
    import onnx
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        branch = mmbridge.to_ort(onnx.load_from_string(model_bytes))

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.branch = branch
                self.head = torch.nn.Linear(3, 2)

            def forward(self, img):
                return self.head(self.branch(img).mean(dim=(2, 3)))

        model = torch.nn.parallel.DistributedDataParallel(Model())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        img = torch.randint(0, 256, (4, 4, 4, 3), dtype=torch.uint8, generator=g)
        target = torch.randn(4, 2, generator=g)
        before = model.module.head.weight.detach().clone()
        loss = torch.nn.functional.mse_loss(model(img), target)
        loss.backward()
        opt.step()
        threads = model.module.branch._runner_for(torch.device("cpu")).session.get_session_options().intra_op_num_threads
        torch.save({"before": before, "after": model.module.head.weight.detach().clone(),
                    "bias": model.module.head.bias.detach().clone(), "threads": threads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_process_gloo_ort_branch_feeds_trainable_head():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, u8_model().SerializeToString(), port, d), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(d, "rank1.pt"), weights_only=True)
    assert torch.equal(r0["before"], r1["before"])
    assert not torch.equal(r0["after"], r0["before"])  # the step changed the head
    assert torch.equal(r0["after"], r1["after"]) and torch.equal(r0["bias"], r1["bias"])  # DDP averaged grads
    assert r0["threads"] == max(1, (os.cpu_count() or 1) // 2)


# -- CUDA (skipped without a GPU) -----------------------------------------------------------
def _need_cuda_ep():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime here has no CUDA EP ({ort.get_available_providers()}); install onnxruntime-gpu")


@pytest.mark.gpu
def test_cuda_matches_cpu_and_output_on_device():
    _need_cuda_ep()
    m = mmbridge.to_ort(two_io_model())
    a, b = torch.randn(64, 4), torch.randn(64, 4)
    s_cpu, r_cpu = m(a, b)
    s, r = m(a.cuda(), b.cuda())
    assert s.device == torch.device("cuda", 0) and r.device == s.device
    runner = m._runner_for(s.device)
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    assert s.data_ptr() == runner.binding.get_outputs()[0].data_ptr()  # written in place on the GPU
    torch.testing.assert_close(s.cpu(), s_cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.cpu(), r_cpu, rtol=1e-5, atol=1e-5)
    y = mmbridge.to_ort(nonzero_model())(torch.tensor([0.0, 2.0, 3.0], device="cuda"))  # DLPack on CUDA
    assert y.device.type == "cuda" and y.cpu().tolist() == [[1, 2]]


@pytest.mark.gpu
def test_cuda_stream_ordering_case21():
    """A long producer chain on the current stream, a non-default current stream, and a side
    stream ordered with wait_stream: every result equals the synchronous reference."""
    _need_cuda_ep()
    n = 1 << 20
    m = _model([helper.make_node("Mul", ["x", "two"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, [n])],
               [helper.make_tensor_value_info("y", TP.FLOAT, [n])],
               [numpy_helper.from_array(np.array(2, np.float32), "two")])
    mod = mmbridge.to_ort(m, device="cuda")
    bad = 0
    side = torch.cuda.Stream()
    for _ in range(20):
        x = torch.zeros(n, device="cuda")
        for _ in range(20):
            x.add_(1.0)  # same stream as the call: ordered
        bad += int(not torch.equal(mod(x), torch.full_like(x, 40.0)))
        with torch.cuda.stream(side):  # another current stream for the call itself
            z = torch.zeros(n, device="cuda")
            for _ in range(10):
                z.add_(1.0)
            yz = mod(z)
        torch.cuda.current_stream().wait_stream(side)
        bad += int(not torch.equal(yz, torch.full_like(z, 20.0)))
    assert bad == 0


@pytest.mark.gpu
def test_cuda_device_mismatch_and_index():
    _need_cuda_ep()
    m = mmbridge.to_ort(mul2_model()).to("cuda:0")
    assert m.device == torch.device("cuda", 0)
    with pytest.raises(RuntimeBackendError, match="is on cuda:0 but its inputs are on cpu"):
        m(torch.ones(1, 3))
    if torch.cuda.device_count() > 1:
        m2 = mmbridge.to_ort(mul2_model())
        y = m2(torch.ones(1, 3, device="cuda:1"))
        assert y.device == torch.device("cuda", 1)
        opts = m2._runner_for(torch.device("cuda", 1)).session.get_provider_options()["CUDAExecutionProvider"]
        assert opts["device_id"] == "1"


@pytest.mark.gpu
def test_cuda_autocast_fp16_into_fp32_graph():
    _need_cuda_ep()
    m = mmbridge.to_ort(mul2_model())
    x = torch.randn(8, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        h = x.half()
        y = m(h)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, 2 * h.float(), rtol=0, atol=0)


# --- the CPU fast path (issue 16 item 4): bind once, reuse unreferenced outputs --------------
def test_fast_path_never_overwrites_a_result_the_caller_holds():
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    held = [mod(x) for _ in range(4)]  # after the first call these go through the fast path
    assert mod._fast is not None
    assert len({h.data_ptr() for h in held}) == 4  # every held result is its own memory
    for h in held:
        assert torch.equal(h, x * 2)
    view = mod(x)[0]  # only a view of the result survives: its storage must not be reused
    for _ in range(3):
        y = mod(x + 1)
    assert torch.equal(view, x[0] * 2) and torch.equal(y, (x + 1) * 2)


def test_fast_path_reuses_a_dropped_output_and_rebinds_new_inputs():
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    ptrs = []
    for _ in range(4):
        ptrs.append(mod(x).data_ptr())  # dropped at once
    # the slots hold the outputs; reusing one is opportunistic (only when torch reports no other
    # reference: seen to hold alone, not always after hundreds of other tests in one process)
    assert all(es[0] is not None for _, _, es in mod._fast.slots) and len(ptrs) == 4
    for k in range(3):  # a new tensor (new pointer) each call, same shape: rebound, right values
        xk = torch.full((2, 3), float(k))
        assert torch.equal(mod(xk), xk * 2)
    # a shape change, a non-contiguous input and a dtype error all leave the fast path correctly
    assert torch.equal(mod(torch.ones(5, 3)), torch.full((5, 3), 2.0))
    xt = torch.arange(6, dtype=torch.float32).reshape(3, 2).t()
    assert torch.equal(mod(xt), xt * 2)
    with pytest.raises(SpecError):
        mod(torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(mod(x), x * 2)


def test_fast_path_keeps_the_frozen_backward_error():
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    for _ in range(3):
        mod(torch.ones(2, 3))
    x = torch.ones(2, 3, requires_grad=True)
    y = mod(x)
    assert y.requires_grad
    with pytest.raises(RuntimeBackendError, match="frozen"):
        y.sum().backward()


def test_fast_path_never_reuses_an_output_the_caller_changed_in_place():
    """A dropped result whose layout the caller changed in place (``t_()`` keeps a square shape,
    ``resize_`` / ``set_`` move the data) is not handed out again: the next result is fresh and
    contiguous with the right values (reusing the transposed tensor would return its values
    transposed)."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    for _ in range(3):
        mod(x)
    for change in (lambda y: y.t_(), lambda y: y.resize_(2, 2), lambda y: y.set_(torch.zeros(3, 3).untyped_storage())):
        for _ in range(3):  # both pool entries end up changed
            change(mod(x))
        z = mod(x)
        assert z.is_contiguous() and z.stride() == (3, 1)
        torch.testing.assert_close(z, x * 2, rtol=0, atol=0)


def test_fast_path_never_overwrites_a_storage_the_caller_kept():
    """Keeping only ``y.untyped_storage()`` of a result (torch returns the pool's own storage object,
    so no use count rises) keeps its values: the pool does not hand that buffer to the next call
    (it was overwritten with the next result before, on main too)."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    for _ in range(3):
        mod(x)
    kept = []
    for k in range(3):  # both pool entries held through their storage only
        y = mod(x * (k + 1))
        kept.append((y.untyped_storage(), 2.0 * (k + 1)))
        del y
    mod(x * 5)
    for st, want in kept:
        assert torch.tensor([], dtype=torch.float32).set_(st).tolist() == [want] * 6


def test_fast_path_runs_a_subclass_or_instance_forward():
    """A forward of a subclass, or one set on the instance (accelerate's ``convert_outputs_to_fp32``
    wraps it so), runs on every call: ``__call__``'s fast path is only for ORTModule's own forward
    (it returned the bare graph's 2.0 from the second call on before)."""
    from mmbridge.runtime.module import ORTModule

    class Scaled(ORTModule):
        def forward(self, x):
            return super().forward(x * 10)

    base = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    m2 = mul2_model()
    sub = Scaled(m2, source=m2.SerializeToString(), intra_op_threads=1)
    x = torch.ones(2, 3)
    assert [float(sub(x)[0, 0]) for _ in range(3)] == [20.0, 20.0, 20.0]
    orig = base.forward
    base.forward = lambda t: orig(t + 1)
    assert [float(base(x)[0, 0]) for _ in range(3)] == [4.0, 4.0, 4.0]
    del base.forward
    assert [float(base(x)[0, 0]) for _ in range(3)] == [2.0, 2.0, 2.0]


def test_fast_path_runs_module_and_global_hooks():
    """``ORTModule.__call__`` skips ``nn.Module.__call__`` only when no hook is registered."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    for _ in range(3):
        mod(x)
    assert mod._fast is not None
    seen = []
    h = mod.register_forward_hook(lambda m, args, out: seen.append(("fwd", out.clone())))
    hp = mod.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].clone())))
    assert torch.equal(mod(x), x * 2)
    assert [k for k, _ in seen] == ["pre", "fwd"] and torch.equal(seen[1][1], x * 2)
    h.remove()
    hp.remove()
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(("global", m)))
    try:
        mod(x)
    finally:
        g.remove()
    assert seen[-1] == ("global", mod)
    n = len(seen)
    assert torch.equal(mod(x), x * 2) and len(seen) == n  # hooks removed: nothing recorded


def test_fast_path_held_result_loop_binds_no_output():
    """``y = mod(x)`` in a loop holds the previous result while the next call runs: the two
    slots (each its own IO binding with its pooled output bound) are taken in turn, so after the
    first call on each slot no output is allocated or bound again (with one binding the two
    pooled buffers were bound in turn, one ``bind_output`` per call), and every result has the
    right values while it is held."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    y = mod(x)  # full path: builds the fast path
    y = mod(x)
    y = mod(x)  # both slots have their buffer now
    slots = list(mod._fast.slots)
    entries = [es[0] for _, _, es in slots]
    assert all(e is not None for e in entries)
    ptrs = []
    for k in range(20):
        prev = y
        y = mod(x + k)
        ptrs.append(y.data_ptr())
        assert torch.equal(y, (x + k) * 2) and torch.equal(prev, (x + k - 1) * 2 if k else x * 2)
    del prev
    assert [es[0] for _, _, es in slots] == entries  # no buffer replaced, so nothing bound again
    assert len(set(ptrs)) == 2 and ptrs[0::2] == [ptrs[0]] * 10 and ptrs[1::2] == [ptrs[1]] * 10


def test_fast_path_never_hands_out_a_result_the_caller_changed():
    """A dropped result that the caller made require grad, gave a ``.grad`` or a backward hook, or
    an attribute, is not handed out by a later call: results are as fresh as ``torch.empty``'s
    (main reused the tensor object: the next call returned it requiring grad, with the old
    ``.grad`` and attributes)."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    for _ in range(3):
        mod(x)

    def hooked(y):
        y.requires_grad_()
        y.register_hook(lambda g: g)
        y.requires_grad_(False)

    changes = (lambda y: y.requires_grad_(), lambda y: setattr(y, "grad", torch.ones(2, 3)), hooked,
               lambda y: setattr(y, "tag", 1), lambda y: setattr(y, "data", y.data[:1]))
    for change in changes:
        for _ in range(2):  # both slots' buffers changed and dropped
            change(mod(x))
        for _ in range(3):
            z = mod(x)
            assert not z.requires_grad and z.grad is None and z._backward_hooks is None
            assert not hasattr(z, "tag") and z.shape == (2, 3) and z.is_contiguous()
            assert torch.equal(z, x * 2)


def test_fast_path_two_inputs_two_outputs_held_results_keep_their_values():
    mod = mmbridge.to_ort(two_io_model(), intra_op_threads=1)
    a, b = torch.arange(8, dtype=torch.float32).reshape(2, 4), torch.ones(2, 4)
    held = []
    for k in range(6):
        held.append((k, mod(a + k, b)))
        assert mod._fast is not None or k == 0
    for k, (s, r) in held:
        assert torch.equal(s, a + k + b) and torch.equal(r, ((a + k) * b).sum(1))
    assert len({s.data_ptr() for _, (s, _) in held}) == 6


def test_fast_path_concurrent_calls_from_threads_keep_their_results():
    """The fast path takes a slot off a FIFO instead of a lock: calls from several threads (ORT
    releases the GIL while it runs) each get their own result, never another call's buffer."""
    import threading

    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(64, 6)
    for _ in range(3):
        mod(x)
    assert mod._fast is not None
    errors: list[str] = []

    def work(k: int) -> None:
        xk = torch.full((64, 6), float(k))
        held = []
        for i in range(300):
            y = mod(xk)
            if i % 50 == 0:
                held.append(y)
            if not torch.equal(y, xk * 2):
                errors.append(f"thread {k} call {i}: wrong values")
                return
        if not all(torch.equal(h, xk * 2) for h in held):
            errors.append(f"thread {k}: a held result was overwritten")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(mod._fast.slots) == 2  # every slot went back to the FIFO


def test_fast_path_result_is_held_before_its_slot_goes_back():
    """Between the slot's return to the queue and ``return``, the one-output fast path's result was
    referenced only by the pool: another call running in that window (a thread switch, a trace or
    profile hook) took the slot, saw the output free and overwrote it; the first caller then got the
    other call's values, as the same object (review 4)."""
    import sys

    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x, other = torch.ones(2, 3), torch.full((2, 3), 5.0)
    for _ in range(3):
        mod(x)  # warm: both slots bound
    seen = {}

    import linecache

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "fast1" and not seen:
            def local(f, ev, a):
                line = linecache.getline(f.f_code.co_filename, f.f_lineno) if ev == "line" else ""
                if "append(slot)" in line:  # the next line event is the return: the window
                    local.after_append = True
                elif getattr(local, "after_append", False) and line.strip().startswith("return") and not seen:
                    seen["busy"] = True
                    mod(other)  # takes the other slot (FIFO), its result dropped at once
                    seen["other"] = mod(other)  # takes this call's slot: is this call's output free?
                return local
            return local
        return None

    sys.settrace(tracer)
    try:
        y = mod(x)
    finally:
        sys.settrace(None)
    assert "other" in seen and y is not seen["other"]
    assert torch.equal(y, torch.full((2, 3), 2.0)) and torch.equal(seen["other"], torch.full((2, 3), 10.0))


def test_fast_path_outputs_are_not_inference_tensors_after_inference_mode():
    """Calls under ``torch.inference_mode()`` filled the pool with inference tensors that later
    normal calls handed out (backward: "Inference tensors cannot be saved for backward")."""
    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    with torch.inference_mode():
        for _ in range(4):
            assert torch.equal(mod(x), torch.full((2, 3), 2.0))
    for _ in range(4):
        y = mod(x)
        assert not y.is_inference()
        w = torch.ones(3, requires_grad=True)
        (y * w).sum().backward()  # an inference tensor could not be saved for backward
        assert torch.equal(w.grad, torch.full((3,), 4.0))


def test_fast_path_never_revives_a_weakly_referenced_result():
    """A dropped result still weakly referenced (a WeakIdKeyDictionary key, a weakref) is never handed
    out again: the weak reference would come back to life holding the next call's values."""
    import weakref

    mod = mmbridge.to_ort(mul2_model(), intra_op_threads=1)
    x = torch.ones(2, 3)
    for _ in range(3):
        y = mod(x)  # warm: the fast path and its pool
    ref = weakref.ref(y)
    del y
    for _ in range(3):
        z = mod(x * 7)
    assert ref() is None or torch.equal(ref(), torch.full((2, 3), 2.0))
    assert torch.equal(z, torch.full((2, 3), 14.0))
