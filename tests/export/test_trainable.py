"""Trainable export (mmbridge.export.trainable) + torch backend: the converted module trains like Keras.

Models are tiny so the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.convert import core as tb
from mmbridge.export.trainable import STATE_MARK, VAR_MARK, _safe_path

pytestmark = pytest.mark.tf


def _cnn(keras, dropout=0.5):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False)(h)
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(dropout)(h)
    return keras.Model(inp, keras.layers.Dense(3)(h), name=f"cnn_bn_{int(dropout * 10)}")


def _mlp(keras, dropout=0.0):
    keras.utils.set_random_seed(1)
    inp = keras.Input((10,))
    h = keras.layers.Dense(16)(inp)  # zero bias at init: must survive export
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(dropout)(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    h = keras.layers.LayerNormalization()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h), name=f"mlp_bn_{int(dropout * 10)}")


def _transformer(keras, dropout=0.1):
    """Embedding + one post-LN encoder block (MHA, GELU FFN) + pooled head; int32 tokens [N, 12]."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((12,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, 16)(inp)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x)
    x = keras.layers.LayerNormalization()(x + a)
    f = keras.layers.Dense(32, activation="gelu")(x)
    f = keras.layers.Dropout(dropout)(f)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(16)(f))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(2)(x), name=f"tiny_transformer_{int(dropout * 10)}")


def _n_trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.fixture(scope="module")
def cnn(keras, tmp_path_factory):
    model = _cnn(keras, dropout=0.5)
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path_factory.mktemp("cache"))
    return model, art


def test_export_keeps_batchnorm_and_dropout_nodes(cnn):
    _, art = cnn
    ops = [n.op_type for n in art.model.graph.node]
    assert ops.count("BatchNormalization") == 2 and ops.count("Dropout") == 1
    momenta = sorted(a.f for n in art.model.graph.node if n.op_type == "BatchNormalization"
                     for a in n.attribute if a.name == "momentum")
    assert momenta == pytest.approx([0.9, 0.99])
    assert art.meta["trainable"] is True
    # only the spec input is required; the weights are overridable initializers
    from mmbridge.runtime.session import make_session

    assert [i.name for i in make_session(art.onnx_path).get_inputs()] == [s.name for s in art.input_specs]


def test_converted_cnn_matches_keras_counts_modes_and_values(cnn):
    model, art = cnn
    tm = art.to_torch()
    assert not tm.training
    assert tb.parameter_count(tm) == _n_trainable(model) == 4 * 27 + 4 + 8 + 6 * 36 + 12 + 6 * 3 + 3
    n_state = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    bns = [m for m in tm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 and all(isinstance(m, tb.BatchNorm2d) for m in bns)
    assert sum(m.running_mean.numel() + m.running_var.numel() for m in bns) == n_state
    assert sorted((round(m.momentum, 6), m.eps) for m in bns) == [(0.01, pytest.approx(1e-3)), (0.1, pytest.approx(1e-5))]
    drops = [m for m in tm.modules() if isinstance(m, torch.nn.Dropout)]
    assert [d.p for d in drops] == [0.5]
    convs = sorted((m for m in tm.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.out_channels)
    assert [(m.out_channels, m.bias is not None) for m in convs] == [(4, True), (6, False)]  # zero bias kept
    assert float(convs[0].bias.detach().abs().sum()) == 0.0
    report = mmbridge.verify(art, backends=("ort", "torch"))
    assert report.passed and {r.backend for r in report.rows} == {"ort", "torch"}


def test_dropout_is_active_in_train_and_not_in_eval(cnn):
    _, art = cnn
    tm = art.to_torch()
    drop = next(m for m in tm.modules() if isinstance(m, torch.nn.Dropout))
    seen = []
    drop.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    x = torch.rand(256, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e1, e2 = tm(x), tm(x)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    torch.testing.assert_close(seen[-1][1], seen[-1][0], rtol=0, atol=0)  # eval: identity
    tm.train()
    with torch.no_grad():
        t1 = tm(x)
    inp, out = seen[-1]
    live = inp != 0
    assert int(live.sum()) > 300
    dropped = out[live] == 0
    frac = float(dropped.float().mean())
    assert 0.4 < frac < 0.6, frac  # rate 0.5
    torch.testing.assert_close(out[live][~dropped], 2.0 * inp[live][~dropped])  # kept units scaled by 1/(1-p)
    assert not torch.allclose(t1, e1, atol=1e-3)


def _torch_value(tm, var) -> np.ndarray:
    """The torch tensor that holds Keras variable ``var`` after conversion, in Keras layout."""
    mark = (VAR_MARK if var.trainable else STATE_MARK) + _safe_path(var.path)
    pattern = re.compile(re.escape(mark) + r"(?::|__|$)")
    keys = [k for k, src in tm.mmbridge_sources.items() if pattern.search(src)]
    assert len(keys) == 1, f"{var.path}: torch tensors {keys} (sources {tm.mmbridge_sources})"
    tensors = dict(tm.named_parameters())
    tensors.update(dict(tm.named_buffers()))
    value = tensors[keys[0]].detach().cpu().numpy()
    if keys[0] in tm.mmbridge_transposed:
        value = value.T
    want = tuple(var.shape)
    if value.shape != want and value.ndim == 4:  # conv kernel OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    return value.reshape(want)


@pytest.mark.parametrize("build", [_cnn, _mlp, _transformer], ids=["cnn_bn", "mlp_bn_ln", "transformer"])
def test_gradient_parity_five_sgd_steps(keras, tf, tmp_path, build):
    """5 SGD steps in Keras (training=True) and on the converted module (train()) agree."""
    model = build(keras, dropout=0.0)
    specs = None
    if build is _transformer:
        specs = [mmbridge.TensorSpec("tokens", ("batch", 12), "int32", value_range=(0, 49))]
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path, input_specs=specs)
    tm = art.to_torch()
    assert tb.parameter_count(tm) == _n_trainable(model)
    art_initial_kernel = np.array(model.layers[-1].kernel.numpy())
    n_ln = sum(isinstance(layer, keras.layers.LayerNormalization) for layer in model.layers)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in tm.modules()) == n_ln  # LayerNorm stays LayerNorm
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tm.modules()) == n_bn
    tm.train()
    rng = np.random.default_rng(0)
    shape = (16,) + tuple(model.inputs[0].shape[1:])
    n_out = int(model.outputs[0].shape[-1])

    def make_x():
        if build is _transformer:
            return rng.integers(0, 50, size=shape).astype(np.int32)
        return rng.normal(size=shape).astype(np.float32)

    batches = [(make_x(), rng.normal(size=(16, n_out)).astype(np.float32)) for _ in range(5)]
    lr = 0.05
    opt_k = keras.optimizers.SGD(learning_rate=lr)
    opt_t = torch.optim.SGD(tm.parameters(), lr=lr)
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        opt_k.apply_gradients(zip(tape.gradient(loss, model.trainable_weights), model.trainable_weights))
        opt_t.zero_grad()
        loss_t = (tm(torch.from_numpy(x)) - torch.from_numpy(y)).pow(2).mean()
        loss_t.backward()
        opt_t.step()
    checked = 0
    for var in model.weights:
        want = np.asarray(var.numpy())
        got = _torch_value(tm, var)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=var.path)
        checked += 1
    assert checked == len(model.weights)
    # the weights and statistics really moved (the comparison above is not vacuous)
    assert not np.allclose(model.layers[-1].kernel.numpy(), art_initial_kernel)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not np.allclose(layer.moving_mean.numpy(), 0.0)


def test_converted_cnn_dynamic_batch_autocast_and_compile(cnn):
    model, art = cnn
    tm = art.to_torch()
    x = np.random.default_rng(1).random((5, 8, 8, 3), dtype=np.float32)  # exported with batch 2
    ref = np.asarray(model(x, training=False))
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.from_numpy(x)).numpy(), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = tm(torch.from_numpy(x))
    from mmbridge.parity import TOLERANCES

    tol = TOLERANCES[("autocast", "bfloat16")]
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=tol.rtol, atol=tol.atol)
    import torch._dynamo as dynamo

    dynamo.reset()
    explanation = dynamo.explain(tm)(torch.from_numpy(x))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    compiled = torch.compile(tm, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (3, 6):
            xb = torch.from_numpy(np.random.default_rng(batch).random((batch, 8, 8, 3), dtype=np.float32))
            torch.testing.assert_close(compiled(xb), tm(xb))


def test_nchw_input_export_has_no_transposes(keras, tmp_path):
    model = _cnn(keras, dropout=0.2)
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path, inputs_as_nchw=["input"])
    assert [n.op_type for n in art.model.graph.node].count("Transpose") == 0
    assert art.input_specs[0].layout == "NCHW"
    tm = art.to_torch()
    x = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    with torch.no_grad():
        got = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mobilenet_v2_trainable_export_keeps_every_bn_and_weight(keras, tmp_path):
    """A zoo model: keras.applications.MobileNetV2 (alpha 0.35, 64 px, weights=None)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35, classes=10)
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path, inputs_as_nchw=["input"])
    tm = art.to_torch()
    assert tb.parameter_count(tm) == _n_trainable(model)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert n_bn == 52
    assert sum(isinstance(m, tb.BatchNorm2d) for m in tm.modules()) == n_bn
    assert [n.op_type for n in art.model.graph.node].count("Transpose") == 0
    assert mmbridge.verify(art, backends=("ort", "torch")).passed
    x = np.random.default_rng(0).random((3, 64, 64, 3), dtype=np.float32)
    with torch.no_grad():
        got = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-5)


def test_transformer_compiles_without_graph_breaks_any_batch_and_bf16(keras, tmp_path):
    model = _transformer(keras, dropout=0.1)
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path,
                          input_specs=[mmbridge.TensorSpec("tokens", ("batch", 12), "int32", value_range=(0, 49))])
    tm = art.to_torch()
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == pytest.approx(0.1) for m in tm.modules()) == 1
    tokens = np.random.default_rng(0).integers(0, 50, size=(5, 12)).astype(np.int32)
    ref = np.asarray(model(tokens, training=False))
    import torch._dynamo as dynamo

    dynamo.reset()
    explanation = dynamo.explain(tm)(torch.from_numpy(tokens))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    compiled = torch.compile(tm, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        np.testing.assert_allclose(compiled(torch.from_numpy(tokens)).numpy(), ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(compiled(torch.from_numpy(tokens[:3])).numpy(), ref[:3], rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = tm(torch.from_numpy(tokens))
    assert got.dtype == torch.bfloat16  # Linear layers keep the autocast dtype
    from mmbridge.parity import TOLERANCES

    tol = TOLERANCES[("autocast", "bfloat16")]
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=tol.rtol, atol=tol.atol)
