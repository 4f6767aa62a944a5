"""mmbridge.convert.core on hand-built ONNX graphs (no TensorFlow needed).

Every graph is also run in onnxruntime, which is the reference for forward values.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import mmbridge
from mmbridge.convert import core as tb
from mmbridge.parity import TOLERANCES
from mmbridge.runtime.session import make_session


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _ort(m, feed):
    return make_session(m).run(None, feed)


@pytest.fixture(scope="module")
def mlp():
    """x[N,8] -> MatMul W1[8,6] + b1(zeros) -> Relu -> MatMul W2[6,3] + b2 -> y[N,3]."""
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.randn(8, 6).astype(np.float32), "W1"),
             numpy_helper.from_array(np.zeros(6, np.float32), "b1"),
             numpy_helper.from_array(rng.randn(6, 3).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.randn(3).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "W2"], ["h2"], name="mm2"),
             helper.make_node("Add", ["h2", "b2"], ["y"], name="add2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 3])], inits)


def test_matmul_add_weights_become_parameters_zero_bias_included(mlp):
    m = tb.to_torch(mlp)
    assert not m.training
    params = dict(m.named_parameters())
    assert sum(p.numel() for p in params.values()) == 8 * 6 + 6 + 6 * 3 + 3
    # MatMul + Add became nn.Linear (weight stored transposed, torch layout [out, in])
    linears = {n: x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
    assert sorted(linears) == ["mm1", "mm2"]
    assert tuple(linears["mm1"].weight.shape) == (6, 8) and tuple(linears["mm2"].weight.shape) == (3, 6)
    np.testing.assert_array_equal(linears["mm1"].weight.detach().numpy().T, numpy_helper.to_array(mlp.graph.initializer[0]))
    assert float(params["mm1.bias"].detach().abs().sum()) == 0.0  # the zero bias is a real parameter
    assert sum(b.numel() for b in m.buffers()) == 0
    assert m.mmbridge_sources == {"mm1.weight": "W1", "mm1.bias": "b1", "mm2.weight": "W2", "mm2.bias": "b2"}
    assert m.mmbridge_transposed == {"mm1.weight", "mm2.weight"}


def test_forward_equals_ort_any_batch_and_sgd_updates_every_weight(mlp):
    m = tb.to_torch(mlp)
    tol = TOLERANCES[("torch", "float32")]
    for batch in (1, 2, 7):  # dynamic batch
        x = np.random.RandomState(batch).randn(batch, 8).astype(np.float32)
        with torch.no_grad():
            got = m(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, _ort(mlp, {"x": x})[0], rtol=tol.rtol, atol=tol.atol)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    m.train()
    m(x).pow(2).mean().backward()
    opt.step()
    for n, p in m.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated"


def test_frozen_module_has_no_trainable_parameters(mlp):
    m = tb.to_torch(mlp, trainable=False)
    assert tb.parameter_count(m) == 0
    assert tb.parameter_count(m, trainable_only=False) == 8 * 6 + 6 + 6 * 3 + 3
    assert len(tb.frozen_parameters(m)) == 4
    assert not m.training
    x = torch.randn(2, 8)
    assert not m(x).requires_grad


def test_gather_table_is_a_parameter_and_shared_initializer_is_one_tensor():
    rng = np.random.RandomState(1)
    table = rng.randn(10, 4).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="emb"),
             helper.make_node("MatMul", ["e", "Et"], ["logits"], name="tied")]  # tied output projection
    m = _model(nodes, [helper.make_tensor_value_info("ids", TP.INT64, ["N", 5])],
               [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", 5, 10])],
               [numpy_helper.from_array(table, "E"), numpy_helper.from_array(table.T.copy(), "Et")])
    t = tb.to_torch(m)
    assert tb.parameter_count(t) == 2 * 40
    ids = rng.randint(0, 10, size=(3, 5)).astype(np.int64)
    with torch.no_grad():
        got = t(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, _ort(m, {"ids": ids})[0], rtol=1e-5, atol=1e-5)
    # the same initializer used twice becomes one parameter, not two copies
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="a"), helper.make_node("MatMul", ["a", "W"], ["y"], name="b")]
    m2 = _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])], [numpy_helper.from_array(rng.randn(4, 4).astype(np.float32), "W")])
    assert [n for n, _ in tb.to_torch(m2).named_parameters()] == ["weights.W"]


def _bn_model(momentum=0.99, eps=1e-3, c=3):
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.rand(c).astype(np.float32) + 0.5, "scale"),
             numpy_helper.from_array(rng.randn(c).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.randn(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.rand(c).astype(np.float32) + 0.1, "var")]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn",
                            epsilon=eps, momentum=momentum)
    return _model([node], [helper.make_tensor_value_info("x", TP.FLOAT, ["N", c, 4, 4])],
                  [helper.make_tensor_value_info("y", TP.FLOAT, ["N", c, 4, 4])], inits, opset=15)


def test_batchnorm_keras_momentum_population_variance_and_modes():
    onnx_bn = _bn_model()
    m = tb.to_torch(onnx_bn)
    bn = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bn) == 1 and isinstance(bn[0], tb.BatchNorm2d)
    bn = bn[0]
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    x = np.random.RandomState(3).rand(8, 3, 4, 4).astype(np.float32) * 2
    with torch.no_grad():  # returned in eval mode: equals ORT and leaves the stats alone
        np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), _ort(onnx_bn, {"x": x})[0], rtol=1e-5, atol=1e-5)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    m.train()
    y = m(torch.from_numpy(x))
    # training mode normalises with the batch statistics (population variance) ...
    bm, bv = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    ref = (x - bm[None, :, None, None]) / np.sqrt(bv[None, :, None, None] + 1e-3)
    ref = ref * bn.weight.detach().numpy()[None, :, None, None] + bn.bias.detach().numpy()[None, :, None, None]
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    # ... and moves the running stats 1 % towards them, variance divided by n as Keras does
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.99 * mean0.numpy() + 0.01 * bm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.99 * var0.numpy() + 0.01 * bv, rtol=1e-6, atol=1e-6)


def test_dropout_ratio_is_kept_and_follows_train_eval():
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    m = _model([helper.make_node("Dropout", ["x", "ratio"], ["y"], name="do")],
               [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 1000])],
               [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 1000])], [ratio])
    t = tb.to_torch(m)
    drops = [x for x in t.modules() if isinstance(x, torch.nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.5
    x = torch.ones(4, 1000)
    assert torch.equal(t(x), x)  # eval: identity
    t.train()
    y = t(x)
    frac_zero = float((y == 0).float().mean())
    assert 0.45 < frac_zero < 0.55
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 2.0))


def test_unsupported_ops_are_reported_together():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("MyOp", ["a"], ["b"], name="custom_1", domain="com.example"),
             helper.make_node("MyOp", ["b"], ["c"], name="custom_2", domain="com.example"),
             helper.make_node("Bernoulli", ["c"], ["y"], name="coin")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(mmbridge.ConversionError) as err:
        tb.to_torch(m)
    msg = str(err.value)
    assert "MyOp (domain com.example, opset 1): 2 node(s): 'custom_1', 'custom_2'" in msg
    assert "Bernoulli (domain ai.onnx, opset 17): 1 node(s): 'coin'" in msg
    assert "'ok'" not in msg
    assert '@mmbridge.op_converters.register("Bernoulli", since_version=15)' in msg  # the first missing op, resolved


def test_bf16_autocast_and_half(mlp):
    m = tb.to_torch(mlp)
    x = np.random.RandomState(0).randn(5, 8).astype(np.float32)
    ref = _ort(mlp, {"x": x})[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(torch.from_numpy(x))
    assert got.dtype == torch.bfloat16
    tol = TOLERANCES[("autocast", "bfloat16")]
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=tol.rtol, atol=tol.atol * np.abs(ref).max())
    m64 = tb.to_torch(mlp).double()
    with torch.no_grad():
        np.testing.assert_allclose(m64(torch.from_numpy(x).double()).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_to_torch_accepts_paths_and_rejects_other_things(mlp, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(mlp, str(p))
    assert tb.parameter_count(tb.to_torch(str(p))) == 75
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        tb.to_torch(str(tmp_path / "missing.onnx"))
    with pytest.raises(TypeError, match="expected a BridgeArtifact"):
        tb.to_torch(42)


def test_torch_compile_static_mlp(mlp):
    m = tb.to_torch(mlp)
    x = torch.randn(3, 8)
    try:
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        got = compiled(x)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"torch.compile(fullgraph=True) failed on a converted MLP: {exc}")
    torch.testing.assert_close(got, m(x))


def test_converting_and_training_never_imports_tensorflow(mlp, tmp_path):
    """The training process reads ONNX only (DESIGN.md, TF isolation)."""
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    onnx.save(mlp, str(path))
    code = (
        "import sys, torch\n"
        "from mmbridge.convert.core import to_torch\n"
        f"m = to_torch({str(path)!r}).train()\n"
        "m(torch.randn(3, 8)).sum().backward()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_swish_becomes_one_silu_and_shared_sigmoid_is_kept():
    """x * sigmoid(x) (Keras swish) -> nn.SiLU; a Sigmoid with another user stays as it is."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"), helper.make_node("Mul", ["s", "x"], ["sw"], name="swish"),
             helper.make_node("Sigmoid", ["sw"], ["s2"], name="sig2"), helper.make_node("Mul", ["sw", "s2"], ["g"], name="gate"),
             helper.make_node("Add", ["g", "s2"], ["y"], name="add")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 5])],
               [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 5])], [])
    tm = tb.to_torch(m)
    assert sum(isinstance(mod, torch.nn.SiLU) for mod in tm.modules()) == 1
    assert sum(isinstance(mod, torch.nn.Sigmoid) for mod in tm.modules()) == 1  # sig2 has two users
    x = np.random.RandomState(3).randn(4, 5).astype(np.float32) * 4
    with torch.no_grad():
        got = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(m, {"x": x})[0], rtol=1e-6, atol=1e-6)
