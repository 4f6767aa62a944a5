"""Training-mode preprocessing: ``export(..., training=True)`` of Keras augmentation layers (issue 12).

The output is random, so parity is a distribution check (``mmbridge.export.augment``): TF vs
onnxruntime vs torch, two-sample Kolmogorov-Smirnov tests with a rounding band, Bonferroni at
family-wise alpha 1e-3. These tests show it passes on a correct graph, fails on a corrupted one,
that refused layers are named, and that a default export says the layers are inactive.

Images are 8x8x3 on 0-255; draws are cut to 128 per backend here (the default is 256) to keep the
file fast; with 128 draws a flip probability moved from 0.5 to 1 is still found (KS D = 0.5 against
a critical D of about 0.32).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper

import mmbridge
from mmbridge import TensorSpec
from mmbridge.errors import ParityError, SpecError, UnsupportedOpsError
from mmbridge.export import augment
from mmbridge.export.options import ExportOptions
from mmbridge.runtime.session import make_session

SPEC = TensorSpec("image", ("batch", 8, 8, 3), "float32", "NHWC", (0, 255))
X = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)


@pytest.fixture(autouse=True)
def fewer_draws(monkeypatch):
    monkeypatch.setattr(augment, "DRAWS", 128)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("augment-cache")


def _export(layer, cache, **kw):
    return mmbridge.export(layer, input_specs=[SPEC], sample_inputs={"image": X}, cache_dir=cache, role="preprocess",
                           **kw)


# -- options (no TensorFlow) ------------------------------------------------------------------
def test_training_option_is_validated_serialised_and_fingerprinted():
    o = ExportOptions(training=True)
    assert o.to_dict()["training"] is True and ExportOptions.from_dict(o.to_dict()) == o
    assert o.stable_hash() != ExportOptions().stable_hash()
    with pytest.raises(SpecError, match="training='yes': must be True or False"):
        ExportOptions.from_dict({"training": "yes"})
    with pytest.raises(SpecError, match="training=True with trainable=True"):
        ExportOptions(training=True, trainable=True)


# -- the table --------------------------------------------------------------------------------
@pytest.mark.tf
def test_table_lists_every_keras_augmentation_layer(keras):
    from keras.src.layers.preprocessing.image_preprocessing.base_image_preprocessing_layer import (
        BaseImagePreprocessingLayer,
    )

    shipped = {n for n in dir(keras.layers) if isinstance(getattr(keras.layers, n), type)
               and issubclass(getattr(keras.layers, n), BaseImagePreprocessingLayer)}
    assert shipped == set(augment.BY_NAME), (sorted(shipped - set(augment.BY_NAME)), sorted(set(augment.BY_NAME) - shipped))
    for e in augment.LAYERS:
        assert e.status in ("exported", "refused") and e.torch
        assert (e.status == "refused") == bool(augment.why_refused(e)), e.name


# -- exported: the distribution check passes, and fails on a corrupted graph -------------------
@pytest.fixture(scope="module")
def flip(keras, tmp_path_factory):
    layer = keras.layers.RandomFlip("horizontal", seed=1)
    cache = tmp_path_factory.mktemp("flip")
    import mmbridge.export.augment as aug

    old, aug.DRAWS = aug.DRAWS, 128
    try:
        art = _export(layer, cache, training=True)
    finally:
        aug.DRAWS = old
    return layer, art, cache


def _flipped(out, x):
    """Per draw: True if ``out`` is ``x`` mirrored left-right, False if it is ``x`` (else an error)."""
    out = np.asarray(out).reshape(-1, 8, 8, 3)
    flipped = np.all(np.abs(out - x[:, :, ::-1]) < 1e-3, axis=(1, 2, 3))
    same = np.all(np.abs(out - x) < 1e-3, axis=(1, 2, 3))
    assert np.all(flipped ^ same), "an output is neither the image nor its mirror"
    return flipped


@pytest.mark.tf
def test_random_flip_exports_with_training_and_its_distribution_matches(flip):
    layer, art, _ = flip
    meta = art.meta
    assert meta["training"] is True and meta["augmentation"]["layers"] == [{"name": layer.name, "class": "RandomFlip"}]
    dist = meta["distribution"]
    assert dist["passed"] and dist["ort"]["passed"] and dist["torch"]["passed"], dist
    assert dist["ort"]["tests"] > 100 and dist["ort"]["draws"] == 128
    rand = [n for n in art.model.graph.node if n.op_type in augment.RANDOM_OPS]
    assert rand and all(a.name != "seed" for n in rand for a in n.attribute)  # fresh draws, no fixed seed
    # fresh draws in onnxruntime: the flip fraction over 200 calls is 1/2 within 5 binomial sigmas (0.177)
    sess = make_session(art.model)
    one = X[:1]
    flips = np.array([_flipped(sess.run(None, {"image": one})[0], one)[0] for _ in range(200)])
    assert abs(flips.mean() - 0.5) < 5 * np.sqrt(0.25 / 200), flips.mean()
    # torch draws from torch's generator: the same seed gives the same batch, the flip fraction is 1/2
    module = art.to_torch()
    batch = torch.from_numpy(np.repeat(one, 200, axis=0))
    torch.manual_seed(3)
    a = module(batch)
    torch.manual_seed(3)
    b = module(batch)
    assert torch.equal(a, b)
    f = _flipped(a.numpy(), one)
    assert abs(f.mean() - 0.5) < 5 * np.sqrt(0.25 / 200), f.mean()
    with pytest.raises(ValueError, match="training=True"):
        mmbridge.verify(art)
    assert augment.verify_training(art, layer)["passed"]


def _corrupt(model, **attrs):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type in augment.RANDOM_OPS:
            for k, v in attrs.items():
                n.attribute.append(helper.make_attribute(k, v))
    return m


def _drop_random(model):
    """The random op replaced by a constant 0.9 of the same shape (the flip then never happens)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "RandomUniformLike":  # its input is ConstantOfShape(0): zeros + 0.9
            n.CopyFrom(helper.make_node("Add", [n.input[0], "mmb_test_c"], list(n.output), name=n.name))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.9, np.float32), "mmb_test_c"))
    return m


@pytest.mark.tf
def test_the_distribution_check_fails_on_a_corrupted_graph(flip, tf):
    layer, art, _ = flip
    one = X[:1]
    ref = augment.draw(lambda _: {"output": np.asarray(layer(tf.constant(one), training=True))}, {"image": one})
    good = augment.distribution_check(None, art.model, {"image": one}, name="f", ref=ref)
    assert good["passed"], good
    for bad in (_corrupt(art.model, high=0.25), _drop_random(art.model)):  # always / never flipped
        rec = augment.distribution_check(None, bad, {"image": one}, name="f", ref=ref)
        assert not rec["passed"] and rec["ort"]["worst"]["D"] > 0.4, rec["ort"]["worst"]
        with pytest.raises(ParityError, match=r"ort: output 'output'.*KS D="):
            augment.raise_if_failed(rec, "f")


@pytest.mark.tf
def test_a_failed_distribution_check_refuses_the_export(keras, tmp_path, monkeypatch):
    real = augment.strip_seeds

    def strip_and_break(model):  # the converter "bug": the flip probability becomes 1
        n = real(model)
        for node in model.graph.node:
            if node.op_type == "RandomUniformLike":
                node.attribute.append(helper.make_attribute("high", 0.25))
        return n

    monkeypatch.setattr(augment, "strip_seeds", strip_and_break)
    with pytest.raises(ParityError, match="not distributed like TF's"):
        _export(keras.layers.RandomFlip("horizontal", seed=1), tmp_path, training=True)
    assert not list(tmp_path.rglob("model.onnx"))  # nothing was written


# -- refused layers -----------------------------------------------------------------------------
@pytest.mark.tf
def test_a_refused_layer_is_named_with_the_reason_and_the_torch_equivalent(keras, cache):
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.RandomFlip(seed=1, name="flip"),
                              keras.layers.RandomRotation(0.2, seed=1, name="rot")])
    with pytest.raises(UnsupportedOpsError) as ei:
        mmbridge.export(model, cache_dir=cache, training=True, sample_inputs={"input": X})
    msg = str(ei.value)
    assert "layer 'rot' (RandomRotation)" in msg and "ImageProjectiveTransformV3" in msg
    assert "torchvision.transforms.v2.RandomRotation" in msg and "'flip'" not in msg.split("\n")[1]


@pytest.mark.tf
def test_training_applies_to_keras_sources_only(tf, cache):
    fn = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    with pytest.raises(SpecError, match="training=True applies to Keras models and layers"):
        mmbridge.export(fn, cache_dir=cache, training=True)


# -- default export: inactive layers are recorded and warned about, numerics unchanged ----------
@pytest.mark.tf
def test_a_default_export_records_and_warns_that_augmentation_is_inactive(keras, cache):
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.RandomFlip(seed=1, name="flip"),
                              keras.layers.RandomBrightness(0.2, value_range=(0, 255), name="bright"),
                              keras.layers.Rescaling(1 / 255.0)], name="aug_default")
    with pytest.warns(UserWarning, match=r"flip \(RandomFlip\), bright \(RandomBrightness\) are inactive"):
        art = mmbridge.export(model, cache_dir=cache, sample_inputs={"input": X})
    rec = art.meta["augmentation"]
    assert rec["training"] is False and [d["class"] for d in rec["inactive_layers"]] == ["RandomFlip",
                                                                                        "RandomBrightness"]
    assert "training=True" in rec["note"] and art.meta["training"] is False
    got = make_session(art.model).run(None, {"input": X})[0]
    np.testing.assert_allclose(got, X / 255.0, rtol=1e-6)  # inactive: exactly the inference behaviour
    with pytest.warns(UserWarning, match="inactive"):  # a cache hit says so too
        again = mmbridge.export(model, cache_dir=cache, sample_inputs={"input": X})
    assert again.path == art.path


@pytest.mark.tf
def test_training_true_and_false_give_different_artifacts(flip, keras):
    layer, art, cache = flip
    with pytest.warns(UserWarning, match="inactive"):
        default = _export(layer, cache)
    assert default.path != art.path and default.meta["training"] is False
    assert not [n for n in default.model.graph.node if n.op_type in augment.RANDOM_OPS]


# -- the torch converters ------------------------------------------------------------------------
def _random_graph(op, **attrs):
    like = op.endswith("Like")
    node = helper.make_node(op, ["x"] if like else [], ["y"], **attrs)
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, [4000])] if like else []
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,attrs,mean,std", [
    ("RandomUniformLike", {"low": 2.0, "high": 5.0}, 3.5, 3 / np.sqrt(12)),
    ("RandomNormalLike", {"mean": -1.0, "scale": 2.0}, -1.0, 2.0),
    ("RandomUniform", {"shape": [4000], "low": 0.0, "high": 1.0}, 0.5, 1 / np.sqrt(12)),
    ("RandomNormal", {"shape": [4000]}, 0.0, 1.0),
])
def test_random_converters_draw_from_torchs_generator(op, attrs, mean, std):
    module = mmbridge.to_torch(_random_graph(op, **attrs))
    x = () if "shape" in attrs else (torch.zeros(4000),)
    torch.manual_seed(0)
    a = module(*x)
    torch.manual_seed(0)
    b = module(*x)
    c = module(*x)
    assert torch.equal(a, b) and not torch.equal(b, c) and a.shape == (4000,) and a.dtype == torch.float32
    # 4000 draws: the mean within 5 standard errors, the std within 10 %
    assert abs(float(a.mean()) - mean) < 5 * std / np.sqrt(4000) and abs(float(a.std()) / std - 1) < 0.1
    if op.startswith("RandomUniform"):
        assert float(a.min()) >= attrs["low"] and float(a.max()) < attrs["high"]


def test_a_fixed_seed_is_refused_by_the_torch_converter():
    from mmbridge.errors import ConversionError

    with pytest.raises(ConversionError, match="fixed 'seed'"):
        mmbridge.to_torch(_random_graph("RandomUniformLike", seed=3.0))


# -- the docs table is what the code measures -----------------------------------------------------
@pytest.mark.tf
@pytest.mark.parametrize("name", ["RandomBrightness", "RandomHue", "MixUp"])
def test_measured_status_matches_the_table(keras, cache, name):
    entry = augment.BY_NAME[name]
    from mmbridge.export.preprocessing import measure_training

    r = measure_training(entry, cache_dir=cache)
    assert r["status"] == entry.status, r
    if entry.status == "exported":
        assert r["ops"] == ["RandomUniformLike"] and r["ort_min_p"] > 1e-5 and r["torch"].startswith("checked")


def test_docs_table_lists_every_layer_with_its_status():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "preprocessing.md").read_text(encoding="utf-8")
    begin = "<!-- training-mode table: generated by tools/gen_preprocessing_table.py --section training -->"
    assert begin in text, "run tools/gen_preprocessing_table.py --section training"
    section = text.split(begin, 1)[1].split("<!-- end of training-mode table -->", 1)[0]
    for e in augment.LAYERS:
        assert f"| `{e.name}` | {e.inference} | **{e.status}** |" in section, e.name
