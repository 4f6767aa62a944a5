"""Trainable export of tf-keras (Keras 2) models and of the SavedModel directories tf-keras writes
(issue 12: "a tf-keras CNN; a SavedModel CNN: train parity (k=3) within the noise floor, exact
parameter counts, and the audit in the artifact"; issue 13: the tf-keras ``params`` gap).

The models are tiny; everything runs in this process (a SavedModel directory too, ``isolate=False``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbridge
from mmbridge.convert.ops.dropout import PerSampleDropout
from mmbridge.convert.ops.normalization import _PopulationVarianceBN

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def tf_keras(tf):
    return pytest.importorskip("tf_keras")


def _n_trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _tfk_cnn(tf_keras):
    """Conv -> fused BatchNorm (4-D) -> PReLU -> per-sample Dropout -> Dense -> BatchNorm(scale=False)
    (2-D, not fused) -> LayerNorm -> Dropout -> Dense; float32 [N, 6, 6, 3] -> [N, 2]."""
    tf_keras.utils.set_random_seed(0)
    layers = tf_keras.layers
    inp = tf_keras.Input((6, 6, 3), name="image")
    x = layers.Conv2D(4, 3, name="conv")(inp)  # 4 x 4 output: 16 values per channel per sample
    x = layers.BatchNormalization(name="bn_fused")(x)
    x = layers.PReLU(name="prelu")(x)
    x = layers.Dropout(0.3, noise_shape=(None, 1, 1, 1), name="drop_path")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(5, name="dense")(x)
    x = layers.BatchNormalization(scale=False, momentum=0.9, name="bn_2d")(x)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    return tf_keras.Model(inp, layers.Dense(2, name="head")(x), name="tfk_cnn")


@pytest.fixture(scope="module")
def tfk_cnn(tf_keras, tmp_path_factory):
    model = _tfk_cnn(tf_keras)
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path_factory.mktemp("tfk"))
    return model, art


def test_tf_keras_cnn_keeps_every_weight_batchnorm_dropout_and_layernorm(tfk_cnn):
    model, art = tfk_cnn
    audit = art.meta["audit"]
    assert audit["passed"], audit["problems"]
    # conv 3*3*3*4+4, bn gamma/beta 8, prelu alpha 4*4*4, dense 64*5+5, bn beta 5, ln 10, head 5*2+2
    assert _n_trainable(model) == 112 + 8 + 64 + 325 + 5 + 10 + 12 == 536
    assert audit["keras_trainable_values"] == audit["torch_trainable_values"] == 536
    assert audit["counts"]["batch_norms"] == 2 and audit["counts"]["dropouts"] == 2
    assert len(audit["matched"]) == len(model.weights) == 16
    assert "2 BatchNormalization, 1 LayerNormalization and 2 Dropout nodes kept" in art.meta["rewrites"][0]
    tm = art.to_torch(trainable=True)
    bns = [m for m in tm.modules() if isinstance(m, _PopulationVarianceBN)]
    # tf-keras' fused BN moves its moving variance to the unbiased batch variance, the 2-D one to the population one
    assert sorted(b.population_variance for b in bns) == [False, True]
    assert sorted(float(1 - b.momentum) for b in bns) == pytest.approx([0.9, 0.99])
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in tm.modules()) == 1
    assert [m.p for m in tm.modules() if isinstance(m, PerSampleDropout)] == pytest.approx([0.3])
    # BatchNorm(scale=False): no trainable gamma (a buffer of ones)
    assert sum(p.numel() for p in tm.parameters() if p.requires_grad) == 536


def test_tf_keras_cnn_train_parity_within_the_noise_floor(tfk_cnn):
    _, art = tfk_cnn
    tp = art.meta["train_parity"]
    assert tp["passed"], tp["first_failure"]
    assert tp["steps"] == 3 and len(tp["rows"]) == 16
    assert 0 < tp["worst_ratio"] < 1.0


def test_population_variance_on_the_fused_batchnorm_fails_train_parity(tfk_cnn):
    """Without the Bessel marker the torch BN would move its running variance like Keras 3 (population
    variance); train parity must tell that apart from tf-keras' fused layer and name the variable."""
    from mmbridge.export.contract import train_batches, train_parity
    from mmbridge.specs import TensorSpec

    model, art = tfk_cnn
    tm = art.to_torch(trainable=True)
    fused = [m for m in tm.modules() if isinstance(m, _PopulationVarianceBN) and not m.population_variance]
    assert len(fused) == 1
    specs = [TensorSpec.from_dict(d) for d in art.meta["tf_inputs"]]
    batches = train_batches(specs, None, None)
    assert train_parity(model, tm, batches, input_names=["image"]).passed  # as converted
    fused[0].population_variance = True
    report = train_parity(model, tm, batches, input_names=["image"])
    assert not report.passed and "bn_fused/moving_variance" in report.first_failure()


def test_tf_keras_text_model_embedding_attention_layernorm(tf_keras, tmp_path):
    """Embedding (read through ``sparse_read``), MultiHeadAttention (EinsumDense kernels), LayerNorm."""
    tf_keras.utils.set_random_seed(2)
    layers = tf_keras.layers
    inp = tf_keras.Input((12,), dtype="int32", name="tokens")
    x = layers.Embedding(50, 16)(inp)
    x = layers.LayerNormalization()(x + layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x))
    f = layers.Dropout(0.1)(layers.Dense(32, activation="gelu")(x))
    x = layers.LayerNormalization()(x + layers.Dense(16)(f))
    model = tf_keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling1D()(x)))
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path,
                          input_specs=[mmbridge.TensorSpec("tokens", ("batch", 12), "int32", value_range=(0, 49))])
    audit, tp = art.meta["audit"], art.meta["train_parity"]
    assert audit["passed"], audit["problems"]
    assert audit["keras_trainable_values"] == audit["torch_trainable_values"] == _n_trainable(model) == 3058
    assert tp["passed"] and tp["worst_ratio"] < 1.0, tp["first_failure"]
    tm = art.to_torch(trainable=True)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in tm.modules()) == 2


def test_tf_keras_spatial_dropout_is_kept_per_sample_and_channel(tf_keras, tmp_path):
    """Failed before: refused (audit: Dropout missing). Now a ChannelDropout: one mask value per
    (sample, channel); the channel axis is found from the values (C = 5, unlike H = 4, W = 6)."""
    from mmbridge.convert.ops.dropout import ChannelDropout

    tf_keras.utils.set_random_seed(3)
    layers = tf_keras.layers
    inp = tf_keras.Input((6, 8, 3))
    x = layers.SpatialDropout2D(0.25, name="sd")(layers.Conv2D(5, 3)(inp))
    model = tf_keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path)
    assert art.meta["audit"]["passed"] and art.meta["train_parity"]["passed"]
    tm = art.to_torch().train()
    (drop,) = [m for m in tm.modules() if isinstance(m, ChannelDropout)]
    assert drop.p == 0.25
    seen = []
    drop.register_forward_hook(lambda mod, i, o: seen.append((i[0].detach(), o.detach())))
    torch.manual_seed(0)
    with torch.no_grad():
        tm(torch.rand(64, 6, 8, 3) + 0.5)
    inp_t, out_t = seen[-1]
    kept = (out_t != 0).to(torch.float32)
    torch.testing.assert_close(out_t, kept * inp_t / 0.75)
    varying = {ax for ax in range(kept.dim()) if not torch.equal(kept.amax(dim=ax), kept.amin(dim=ax))}
    assert varying == {0, drop.channel_axis % kept.dim()} and inp_t.shape[drop.channel_axis] == 5


def test_tf_keras_inference_export_still_converts_frozen(tf_keras, tmp_path):
    inp = tf_keras.Input((6,))
    model = tf_keras.Model(inp, tf_keras.layers.Dropout(0.2)(tf_keras.layers.Dense(4)(inp)))
    art = mmbridge.export(model, cache_dir=tmp_path)
    assert art.meta["keras_inventory"]["layers"][0]["kind"] == "dropout"
    assert not any(p.requires_grad for p in art.to_torch().parameters())
    with pytest.raises(mmbridge.ConversionError, match="re-export with trainable=True"):
        art.to_torch(trainable=True)


# ---------------------------------------------------------------------------------------------
# SavedModel directories
# ---------------------------------------------------------------------------------------------
def test_tf_keras_saved_model_cnn_trainable_export(tf_keras, tmp_path):
    """``model.save(dir)`` (SavedModel format) -> reloaded with tf_keras.models.load_model -> the tf-keras
    trainable path: audit, exact count, train parity. In-process (``isolate=False``: the child process
    adds about a minute on a loaded 2-core machine); the families row "SavedModel / tf-keras CNN" runs
    the default child-process path."""
    tf_keras.utils.set_random_seed(3)
    layers = tf_keras.layers
    inp = tf_keras.Input((6, 6, 3), name="image")
    x = layers.BatchNormalization()(layers.Conv2D(4, 3)(inp))
    x = layers.Dropout(0.2)(layers.ReLU()(x))
    model = tf_keras.Model(inp, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    d = str(tmp_path / "tfk_cnn_sm")
    model.save(d, save_format="tf")
    art = mmbridge.export(d, trainable=True, cache_dir=tmp_path / "cache", isolate=False)
    assert art.name == "tfk_cnn_sm" and art.meta["source"]["origin"] == f"saved_model:{d}"
    audit, tp = art.meta["audit"], art.meta["train_parity"]
    assert audit["passed"], audit["problems"]
    assert audit["keras_trainable_values"] == audit["torch_trainable_values"] == _n_trainable(model) == 135
    assert audit["counts"]["batch_norms"] == 1 and audit["counts"]["dropouts"] == 1
    assert tp["passed"] and tp["steps"] == 3 and tp["worst_ratio"] < 1.0, tp["first_failure"]
    tm = art.to_torch(trainable=True)
    assert sum(p.numel() for p in tm.parameters() if p.requires_grad) == 135
    # an inference export of the same directory: frozen by default, trainable=True refused with the fix
    inf = mmbridge.export(d, cache_dir=tmp_path / "cache", isolate=False)
    assert not any(p.requires_grad for p in inf.to_torch().parameters())
    with pytest.raises(mmbridge.ConversionError, match=r"written by tf-keras.*re-export it with trainable=True"):
        inf.to_torch(trainable=True)


def test_keras3_export_dir_trainable_is_refused_with_the_fix(keras, tmp_path):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    d = str(tmp_path / "k3_export")
    m.export(d, verbose=False)
    with pytest.raises(mmbridge.ExportError, match=r"model\.export\(\).*inference endpoint.*\.keras file"):
        mmbridge.export(d, trainable=True, cache_dir=tmp_path / "cache", isolate=False)
    assert not list((tmp_path / "cache").rglob("meta.json"))
    inf = mmbridge.export(d, cache_dir=tmp_path / "cache", isolate=False)
    assert len(inf.meta["keras_inventory"]["variables"]) == 8
    with pytest.raises(mmbridge.ConversionError, match=r"Keras 3 \(model\.export\).*\.keras file with trainable=True"):
        inf.to_torch(trainable=True)


def test_tf_keras_mixed_float16_is_refused_with_the_fix(tf_keras, tmp_path):
    inp = tf_keras.Input((6,))
    h = tf_keras.layers.Dense(4, dtype="mixed_float16", name="half")(inp)
    model = tf_keras.Model(inp, tf_keras.layers.Dense(2, dtype="float32")(h))
    with pytest.raises(mmbridge.ExportError, match=r"layer 'half'.*'mixed_float16'.*torch.autocast"):
        mmbridge.export(model, trainable=True, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("meta.json"))


@pytest.mark.slow  # tf2onnx's Loop + recurrent train parity: about a minute on 2 loaded cores
def test_tf_keras_bidirectional_lstm_reads_its_kernels_outside_the_loop(tf_keras, tmp_path):
    """LSTM kernels are read inside tf.while_loop bodies: the markers go to the enclosing graph."""
    tf_keras.utils.set_random_seed(4)
    inp = tf_keras.Input((10,), dtype="int32", name="tokens")
    x = tf_keras.layers.Bidirectional(tf_keras.layers.LSTM(6))(tf_keras.layers.Embedding(30, 8)(inp))
    model = tf_keras.Model(inp, tf_keras.layers.Dense(2)(x))
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path,
                          input_specs=[mmbridge.TensorSpec("tokens", ("batch", 10), "int32", value_range=(0, 29))])
    audit, tp = art.meta["audit"], art.meta["train_parity"]
    assert audit["passed"], audit["problems"]
    assert audit["keras_trainable_values"] == audit["torch_trainable_values"] == _n_trainable(model) == 986
    assert tp["passed"] and tp["worst_ratio"] < 1.0, tp["first_failure"]


def test_tf_keras_weight_the_forward_never_reads_is_recorded_and_exempt(tf_keras, tmp_path):
    """The tf-keras read patch records reads too: a subclassed tf-keras model's unused trainable weight
    is listed as unread and exempt (failed before: "has no torch tensor"), the read ones are kept."""
    tf_keras.utils.set_random_seed(2)

    class WithSpare(tf_keras.Model):
        def __init__(self):
            super().__init__(name="tfk_spare")
            self.dense = tf_keras.layers.Dense(3, name="dense")
            self.spare = self.add_weight(shape=(2, 6), name="spare", initializer="random_normal")

        def call(self, x):
            return self.dense(x)

    model = WithSpare()
    model(np.zeros((1, 4), np.float32))
    art = mmbridge.export(model, trainable=True, cache_dir=tmp_path,
                          input_specs=[mmbridge.TensorSpec("x", ("batch", 4))])
    (spare_path,) = [p for v, p in mmbridge.export.trainable.variable_paths(model) if v is model.spare]
    assert art.meta["keras_inventory"]["unread_variables"] == [{"path": spare_path, "shape": [2, 6], "values": 12}]
    audit = art.meta["audit"]
    assert audit["passed"] and audit["unread"] == [spare_path] and audit["unread_trainable_values"] == 12
    assert audit["keras_trainable_values"] == audit["torch_trainable_values"] == 4 * 3 + 3
    tp = art.meta["train_parity"]
    assert tp["passed"] and [r["path"] for r in tp["rows"] if r["unread"]] == [spare_path]
