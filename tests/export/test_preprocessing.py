"""Keras preprocessing layers, tf.image and tf.strings steps through mmbridge.export (issue 6).

Each test exports through the real pipeline (tf2onnx + mmbridge.export.handlers handlers + checker + ORT
load + parity), then runs the artifact in onnxruntime on its own inputs and compares with what
Keras / TF computes: integer and string outputs must be identical; float outputs within 1e-5 on
[0, 1] inputs and within 1e-3 on 0-255 images (resize). Modes that cannot be matched must be
refused at export with an error that names the TF op and the layer.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import mmbridge
import mmbridge.export.handlers  # noqa: F401  (loads onnxruntime-extensions before any test imports TF; see preload_extensions)
from mmbridge import TensorSpec, Tolerance
from mmbridge.errors import UnsupportedOpsError
from mmbridge.parity import run_ort

pytestmark = pytest.mark.tf

RESIZE_TOL = Tolerance(1e-3, 0.0, "TF and ORT compute bilinear weights in another order; measured 2.2e-4 on 0-255")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("preprocessing-cache")


def _export_run(obj, spec, x, cache, *, tolerance=None):
    """Export ``obj`` with one input; return (artifact, ORT output, TF output) on ``x``."""
    art = mmbridge.export(obj, input_specs=[spec], role="preprocess", sample_inputs={spec.name: x},
                          tolerance=tolerance, cache_dir=cache, name=f"t{abs(hash(repr(obj))) % 10**8}")
    got = run_ort(art.onnx_path, {spec.name: x})
    assert len(got) == 1
    ref = obj(x) if hasattr(obj, "get_concrete_function") else obj(x, training=False)  # Keras: inference mode
    return art, next(iter(got.values())), np.asarray(ref)


def _str(a):
    return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[object])(np.asarray(a))


def _assert_ints_equal(got, ref):
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (2, 13, 17, 3)).astype(np.float32)


IMG = TensorSpec("image", ("batch", 13, 17, 3), "float32", "NHWC", (0, 255))


def test_rescaling(keras, cache, images):
    _, got, ref = _export_run(keras.layers.Rescaling(1 / 255.0, offset=-0.5), IMG, images, cache)
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.parametrize("invert", [False, True])
def test_normalization_adapted(keras, cache, invert):
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 1, (64, 5)).astype(np.float32)
    layer = keras.layers.Normalization(invert=invert)
    layer.adapt(data)
    x = rng.uniform(0, 1, (4, 5)).astype(np.float32)
    _, got, ref = _export_run(layer, TensorSpec("x", ("batch", 5), "float32"), x, cache)
    assert not np.allclose(ref, x)  # the layer really transforms
    assert np.abs(got - ref).max() <= 1e-5


def test_center_crop(keras, cache, images):
    _, got, ref = _export_run(keras.layers.CenterCrop(7, 9), IMG, images, cache)
    assert got.shape == (2, 7, 9, 3)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("size", [(7, 9), (20, 29)])
def test_resizing_layer(keras, cache, images, interpolation, size):
    layer = keras.layers.Resizing(*size, interpolation=interpolation)
    _, got, ref = _export_run(layer, IMG, images, cache, tolerance=RESIZE_TOL)
    assert got.shape == ref.shape == (2, *size, 3)
    assert np.abs(got - ref).max() <= (0.0 if interpolation == "nearest" else 1e-3)


def test_resizing_crop_to_aspect_ratio(keras, cache, images):
    layer = keras.layers.Resizing(7, 9, crop_to_aspect_ratio=True)
    _, got, ref = _export_run(layer, IMG, images, cache, tolerance=RESIZE_TOL)
    assert np.abs(got - ref).max() <= 1e-3


@pytest.mark.parametrize("method,antialias", [("bilinear", False), ("nearest", False), ("nearest", True)])
def test_tf_image_resize(tf, cache, images, method, antialias):
    fn = tf.function(lambda im: tf.image.resize(im, (20, 11), method=method, antialias=antialias))
    _, got, ref = _export_run(fn, IMG, images, cache, tolerance=RESIZE_TOL)
    assert np.abs(got - ref).max() <= 1e-3


@pytest.mark.parametrize("method,antialias,op", [
    ("bilinear", True, "ScaleAndTranslate"),
    ("bicubic", False, "ResizeBicubic"),
    ("area", False, "ResizeArea"),
    ("lanczos3", False, "ScaleAndTranslate"),
    ("lanczos5", False, "ScaleAndTranslate"),
    ("gaussian", False, "ScaleAndTranslate"),
    ("mitchellcubic", False, "ScaleAndTranslate"),
])
def test_tf_image_resize_unmatched_methods_are_refused(tf, cache, images, method, antialias, op):
    fn = tf.function(lambda im: tf.image.resize(im, (7, 9), method=method, antialias=antialias))
    with pytest.raises(UnsupportedOpsError, match=op) as info:
        mmbridge.export(fn, input_specs=[IMG], sample_inputs={"image": images}, cache_dir=cache, name=f"r_{method}")
    assert "tf.image.resize" in str(info.value) and "What to do" in str(info.value)


@pytest.mark.parametrize("layer_name,kwargs", [
    ("RandomFlip", {}), ("RandomRotation", {"factor": 0.2}), ("RandomZoom", {"height_factor": 0.2}),
    ("RandomContrast", {"factor": 0.3}), ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
    ("RandomBrightness", {"factor": 0.2, "value_range": (0, 255)}),
])
def test_random_augmentation_is_identity_at_inference(keras, cache, images, layer_name, kwargs):
    layer = getattr(keras.layers, layer_name)(**kwargs)
    _, got, ref = _export_run(layer, IMG, images, cache)
    np.testing.assert_array_equal(ref, images)
    np.testing.assert_array_equal(got, images)


# ---------------------------------------------------------------------------------------------
# numeric / categorical
# ---------------------------------------------------------------------------------------------
def test_discretization_exact_at_edges_nan_inf(keras, cache):
    layer = keras.layers.Discretization(bin_boundaries=[-1.0, 0.0, 0.5, 2.0])
    x = np.array([[-5, -1, -0.999, 0, 0.5, 0.49999997, 2.0, 3.0],
                  [np.nan, np.inf, -np.inf, 1e-30, -0.0, 1.9999999, 2.0000002, 0.25]], np.float32)
    art, got, ref = _export_run(layer, TensorSpec("x", ("batch", 8), "float32"), x, cache)
    _assert_ints_equal(got, ref)
    assert "Bucketize" not in {n.op_type for n in art.model.graph.node}


@pytest.mark.parametrize("mode", ["one_hot", "multi_hot", "count"])
def test_discretization_output_modes(keras, cache, mode):
    layer = keras.layers.Discretization(bin_boundaries=[0.0, 1.0, 2.0], output_mode=mode)
    x = np.array([[-1.0, 0.5, 3.0], [1.0, 1.5, 1.2]], np.float32) if mode != "one_hot" else np.array([-1.0, 1.5, 3.0], np.float32)
    spec = TensorSpec("x", ("batch", 3) if mode != "one_hot" else ("batch",), "float32")
    _, got, ref = _export_run(layer, spec, x, cache)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("mode", ["one_hot", "multi_hot", "count"])
def test_category_encoding(keras, cache, mode):
    layer = keras.layers.CategoryEncoding(num_tokens=6, output_mode=mode)
    if mode == "one_hot":
        x, spec = np.array([0, 3, 5, 1], np.int64), TensorSpec("x", ("batch",), "int64")
    else:
        x, spec = np.array([[0, 1, 1, 5], [4, 4, 4, 2]], np.int64), TensorSpec("x", ("batch", 4), "int64")
    _, got, ref = _export_run(layer, spec, x, cache)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kwargs", [{}, {"mask_token": 0}, {"num_oov_indices": 0}])
def test_integer_lookup(keras, cache, kwargs):
    layer = keras.layers.IntegerLookup(vocabulary=[12, 7, 1000, 3], **kwargs)
    x = np.array([[7, 12, 3, 1000], [5, 3, 7, 12]], np.int64)
    if "mask_token" in kwargs:
        x[1, 0] = 0
    if kwargs.get("num_oov_indices") == 0:
        x[1, 0] = 3
    art, got, ref = _export_run(layer, TensorSpec("x", ("batch", 4), "int64"), x, cache)
    _assert_ints_equal(got, ref)
    assert "LookupTableFindV2" not in {n.op_type for n in art.model.graph.node}


def test_integer_lookup_invert(keras, cache):
    layer = keras.layers.IntegerLookup(vocabulary=[12, 7, 1000, 3], invert=True)
    x = np.array([[0, 1, 2], [3, 4, 9]], np.int64)
    _, got, ref = _export_run(layer, TensorSpec("x", ("batch", 3), "int64"), x, cache)
    _assert_ints_equal(got, ref)


@pytest.mark.parametrize("kwargs", [{}, {"mask_token": ""}, {"oov_token": "<oov>"}])
def test_string_lookup(keras, cache, kwargs):
    layer = keras.layers.StringLookup(vocabulary=["fire", "water", "grass", "Pokémon"], **kwargs)
    x = np.array([["fire", "zzz", "Pokémon"], ["", "grass", "FIRE"]], dtype=object)
    art, got, ref = _export_run(layer, TensorSpec("x", ("batch", 3), "string"), x, cache)
    _assert_ints_equal(got, ref)
    assert art.meta["inputs"][0]["dtype"] == "string"


def test_string_lookup_invert(keras, cache):
    layer = keras.layers.StringLookup(vocabulary=["fire", "water", "grass"], invert=True)
    x = np.array([[0, 1, 2], [3, 7, 1]], np.int64)
    _, got, ref = _export_run(layer, TensorSpec("x", ("batch", 3), "int64"), x, cache)
    assert (_str(got) == _str(ref)).all(), (got, ref)


@pytest.mark.parametrize("mode", ["one_hot", "multi_hot", "count", "tf_idf"])
@pytest.mark.parametrize("cls", ["StringLookup", "IntegerLookup"])
def test_lookup_output_modes(keras, cache, cls, mode):
    strings = cls == "StringLookup"
    vocab = ["fire", "water", "grass"] if strings else [12, 7, 3]
    x = np.array([["fire", "zz", "fire"], ["grass", "", "water"]], object) if strings else \
        np.array([[7, 5, 7], [12, 0, 3]], np.int64)
    kw = {"idf_weights": [0.5, 1.0, 2.0]} if mode == "tf_idf" else {}
    layer = getattr(keras.layers, cls)(vocabulary=vocab, output_mode=mode, **kw)
    if mode == "one_hot":
        x = x[:, 0]
    spec = TensorSpec("x", ("batch",) if mode == "one_hot" else ("batch", 3), "string" if strings else "int64")
    _, got, ref = _export_run(layer, spec, x, cache)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.abs(got - ref).max() <= (1e-5 if mode == "tf_idf" else 0)
    assert ref.sum() > 0


@pytest.mark.parametrize("num_bins", [2, 8, 1000, 2**31 - 1])
def test_hashing_integers_equals_tf_farmhash(keras, cache, num_bins):
    """Hashing(int) = Fingerprint64(AsString(x)) % bins, built from standard ONNX ops."""
    rng = np.random.default_rng(num_bins)
    edges = [0, 1, -1, 9, 10, -10, 99, 100, 9999999, 10**7, 10**15, 10**16 - 1, 10**16, 10**18, 2**63 - 1, -2**63]
    x = np.concatenate([np.array(edges, np.int64), rng.integers(-2**63, 2**63 - 1, 48, dtype=np.int64),
                        rng.integers(-5000, 5000, 64)]).astype(np.int64).reshape(-1, 4)
    layer = keras.layers.Hashing(num_bins=num_bins)
    art, got, ref = _export_run(layer, TensorSpec("x", ("batch", 4), "int64"), x, cache)
    _assert_ints_equal(got, ref)
    assert len(np.unique(ref)) > min(num_bins, 8) // 2  # really spread over the bins
    assert not {n.domain for n in art.model.graph.node} - {"", "ai.onnx"}  # standard ONNX only


def test_hashing_int32_input(keras, cache):
    x = np.random.default_rng(5).integers(-2**31, 2**31 - 1, (6, 3)).astype(np.int32)
    _, got, ref = _export_run(keras.layers.Hashing(num_bins=17), TensorSpec("x", ("batch", 3), "int32"), x, cache)
    _assert_ints_equal(got, ref)


@pytest.mark.parametrize("kwargs,op", [
    ({}, "StringToHashBucketFast"),
    ({"salt": 7}, "StringToHashBucketStrong"),
])
def test_hashing_strings_is_refused_naming_layer_and_op(keras, cache, kwargs, op):
    layer = keras.layers.Hashing(num_bins=8, **kwargs)
    with pytest.raises(UnsupportedOpsError, match=op) as info:
        mmbridge.export(layer, input_specs=[TensorSpec("x", ("batch", 2), "string")],
                        sample_inputs={"x": np.array([["a", "b"]], dtype=object)}, cache_dir=cache,
                        name=f"hash_str_{len(kwargs)}")
    msg = str(info.value)
    assert "Hashing" in msg and "What to do" in msg


@pytest.mark.parametrize("oov_method", ["floormod", "farmhash"])
def test_integer_lookup_hashed_oov(keras, cache, oov_method):
    layer = keras.layers.IntegerLookup(vocabulary=[1, 2, 3], num_oov_indices=4, oov_method=oov_method)
    x = np.array([[1, 5, 9, 1000], [2, -7, 3, -2**63]], np.int64)
    _, got, ref = _export_run(layer, TensorSpec("x", ("batch", 4), "int64"), x, cache)
    _assert_ints_equal(got, ref)


def test_string_lookup_with_hashed_oov_is_refused(keras, cache):
    layer = keras.layers.StringLookup(vocabulary=["a", "b"], num_oov_indices=3)
    with pytest.raises(UnsupportedOpsError, match="StringToHashBucketFast"):
        mmbridge.export(layer, input_specs=[TensorSpec("x", ("batch", 2), "string")],
                        sample_inputs={"x": np.array([["a", "q"]], object)}, cache_dir=cache, name="sl_oov3")


# ---------------------------------------------------------------------------------------------
# tf.strings
# ---------------------------------------------------------------------------------------------
TEXT = np.array(["Hello WORLD, Ärger ÉCOLE straße!", "  a\tb\nC  d\x0be\x0cf\rg ", "", "Mr. Mime's BIG-day"],
                dtype=object)
TEXT_SPEC = TensorSpec("text", ("batch",), "string")


@pytest.mark.parametrize("op", ["lower", "upper"])
def test_strings_case_is_ascii_only_like_tf(tf, cache, op):
    fn = tf.function(lambda s: getattr(tf.strings, op)(s))
    art, got, ref = _export_run(fn, TEXT_SPEC, TEXT, cache)
    assert (_str(got) == _str(ref)).all(), (got, ref)
    assert "StringNormalizer" not in {n.op_type for n in art.model.graph.node}  # locale-dependent in ORT


def test_strings_lower_utf8_is_refused(tf, cache):
    fn = tf.function(lambda s: tf.strings.lower(s, encoding="utf-8"))
    with pytest.raises(UnsupportedOpsError, match="StringLower"):
        mmbridge.export(fn, input_specs=[TEXT_SPEC], sample_inputs={"text": TEXT}, cache_dir=cache, name="lower_utf8")


@pytest.mark.parametrize("replace_global", [True, False])
def test_strings_regex_replace(tf, cache, replace_global):
    fn = tf.function(lambda s: tf.strings.regex_replace(s, r"([A-Z])(\w)", r"<\2\1>", replace_global=replace_global))
    _, got, ref = _export_run(fn, TEXT_SPEC, TEXT, cache)
    assert (_str(got) == _str(ref)).all(), (got, ref)


@pytest.mark.parametrize("sep", [None, ","])
def test_strings_split_to_dense(tf, cache, sep):
    x = np.array(["a,b,,c", "  lone  ", "", "x y\tz,"], dtype=object)
    fn = tf.function(lambda s: tf.strings.split(s, sep=sep).to_tensor(default_value="<pad>"))
    _, got, ref = _export_run(fn, TEXT_SPEC, x, cache)
    assert got.shape == ref.shape and (_str(got) == _str(ref)).all(), (got, ref)


def test_strings_join_and_reduce_join(tf, cache):
    x = np.array([["a", "bb", "Ω"], ["", "x", "y"]], dtype=object)
    spec = TensorSpec("t", ("batch", 3), "string")
    fn = tf.function(lambda s: tf.strings.reduce_join(tf.strings.join([s, s], separator="-"), axis=1, separator=" "))
    _, got, ref = _export_run(fn, spec, x, cache)
    assert (_str(got) == _str(ref)).all(), (got, ref)


# ---------------------------------------------------------------------------------------------
# TextVectorization
# ---------------------------------------------------------------------------------------------
CORPUS = ["The cat sat on the mat.", "A dog ran fast!", "the DOG, the cat & the bird", "Pokémon: Pikachu's day"]
QUERY = np.array(["The dog sat... on a CAT", "unknown words only", "", "pokémon PIKACHUS day!"], dtype=object)


@pytest.mark.parametrize("kwargs", [
    {"output_mode": "int", "output_sequence_length": 6},
    {"output_mode": "int"},
    {"output_mode": "multi_hot"},
    {"output_mode": "count"},
    {"output_mode": "tf_idf"},
])
def test_text_vectorization_modes(keras, cache, kwargs):
    layer = keras.layers.TextVectorization(max_tokens=30, **kwargs)
    layer.adapt(CORPUS)
    art, got, ref = _export_run(layer, TEXT_SPEC, QUERY, cache)
    if ref.dtype.kind == "f":
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5
    else:
        _assert_ints_equal(got, ref)
    assert art.meta["outputs"][0]["dtype"] != "string"  # strings end in ids at the torch boundary


@pytest.mark.data
def test_text_vectorization_pokedex_all_rows(keras, cache, pokedex_dir):
    with open(pokedex_dir / "text.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    assert len(texts) == 898
    layer = keras.layers.TextVectorization(max_tokens=5000, output_sequence_length=64)
    layer.adapt(texts)
    x = np.array(texts, dtype=object)
    _, got, ref = _export_run(layer, TEXT_SPEC, x, cache)
    _assert_ints_equal(got, ref)
    assert (ref > 1).sum() > 10_000  # real vocabulary hits, not all OOV / padding


@pytest.mark.parametrize("make,op", [
    (lambda tf, s: tf.strings.split(s, sep="ab").to_tensor(), "StringSplitV2"),
    (lambda tf, s: tf.strings.split(s, maxsplit=1).to_tensor(), "StringSplitV2"),
    (lambda tf, s: tf.strings.as_string(tf.strings.length(s), width=4), "AsString"),
])
def test_strings_unmatched_modes_are_refused(tf, cache, make, op):
    fn = tf.function(lambda s: make(tf, s))
    with pytest.raises(UnsupportedOpsError, match=op) as info:
        mmbridge.export(fn, input_specs=[TEXT_SPEC], sample_inputs={"text": TEXT}, cache_dir=cache,
                        name=f"refuse_{op}_{abs(hash(make)) % 1000}")
    assert "What to do" in str(info.value)


def test_string_bridge_is_ort_only_with_ids_at_the_torch_boundary(keras, cache):
    from mmbridge.export.handlers import preload_extensions
    from mmbridge.graph.passes import backend_requirements

    layer = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=4)
    layer.adapt(CORPUS)
    art, got, ref = _export_run(layer, TEXT_SPEC, QUERY, cache)
    req = backend_requirements(art.model)
    assert req["string_inputs"] == ["text"] and req["onnxruntime_extensions"] and not req["torch_backend"]
    assert req["string_outputs"] == [] and "onnxruntime backend only" in req["note"]
    assert got.dtype == np.int64
    assert preload_extensions() is True  # RE2 of onnxruntime-extensions is not TF's in this process


def test_generated_docs_table_lists_every_case():
    """docs/preprocessing.md is generated from mmbridge.export.preprocessing.CASES; regenerate when stale."""
    from pathlib import Path

    from mmbridge.export.preprocessing import CASES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "preprocessing.md").read_text(encoding="utf-8")
    missing = [f"{c.name} [{c.mode}]" for c in CASES if f"| `{c.name}` | {c.mode} |" not in doc]
    assert not missing, f"docs/preprocessing.md is stale; run tools/gen_preprocessing_table.py (missing {missing})"
    assert "FAILED" not in doc


def test_state_fingerprint_changes_when_a_layer_is_re_adapted(keras):
    """Adapted vocabularies / bin boundaries are not weights: the fingerprint must see them."""
    from mmbridge.export.fingerprint import state_fingerprint

    tv = keras.layers.TextVectorization(max_tokens=20)
    tv.adapt(["the cat sat", "the cat"])
    inp = keras.Input((1,), dtype="string")
    model = keras.Model(inp, tv(inp))
    before = state_fingerprint(model)
    tv.adapt(["a dog ran", "dog dog"])
    after = state_fingerprint(model)
    assert before and after and before != after
    disc = keras.layers.Discretization(num_bins=3)
    disc.adapt(np.array([0.0, 1.0, 2.0, 3.0], np.float32))
    b1 = state_fingerprint(disc)
    disc.adapt(np.array([10.0, 11.0, 12.0, 13.0], np.float32))
    assert b1 != state_fingerprint(disc)
    assert state_fingerprint(keras.layers.Rescaling(0.5)) == b""
