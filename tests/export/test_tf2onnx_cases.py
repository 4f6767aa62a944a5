"""The public bug reports of ../shared/cases/ 03, 04 and 05, swapped onto mmbridge.export.

Each case's RAW STACK call (``keras.Model.export(format="onnx")``) wrote a file that onnxruntime
could not load. Through mmbridge the same inputs must give Keras's values, or a refusal at export
that names the layer and the TF op.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmbridge
import mmbridge.export.handlers  # noqa: F401  (loads onnxruntime-extensions before any test imports TF; see preload_extensions)
from mmbridge.errors import UnsupportedOpsError
from mmbridge.parity import run_ort

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cases-cache")


@pytest.mark.case("03")
def test_keras_exact_gelu_erfc(keras, cache):
    """onnx/tensorflow-onnx#2347: exact GELU lowers to TF Erfc; mmbridge rewrites it to 1 - Erf."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(5, activation="gelu")(inp))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    ref = np.asarray(model(x))
    art = mmbridge.export(model, sample_inputs={"input": x}, cache_dir=cache, name="case03")
    ops = {n.op_type for n in art.model.graph.node}
    assert "Erfc" not in ops and "Erf" in ops
    assert any("Erfc" in note for note in art.meta["rewrites"])
    got = next(iter(run_ort(art.onnx_path, {"input": x}).values()))
    assert np.abs(got - ref).max() <= 1e-5


@pytest.mark.case("04")
def test_text_vectorization_ids_equal_keras(keras, cache):
    """onnx/tensorflow-onnx#1886, #1328: StaticRegexReplace / StringSplitV2 / LookupTableFindV2."""
    tv = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    tv.adapt(["the cat sat", "a dog ran fast"])
    inp = keras.Input((1,), dtype="string")
    model = keras.Model(inp, tv(inp))
    x = np.array([["the dog sat"], ["a cat"]], dtype=object)
    ref = np.asarray(model(x))
    art = mmbridge.export(model, sample_inputs={"input": x}, cache_dir=cache, name="case04")
    ops = {n.op_type for n in art.model.graph.node}
    assert not ops & {"StaticRegexReplace", "StringSplitV2", "LookupTableFindV2", "StringNormalizer"}
    got = next(iter(run_ort(art.onnx_path, {"input": x}).values()))
    assert got.dtype == ref.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    assert (ref > 1).any()  # real vocabulary ids, not only OOV / padding


@pytest.mark.parametrize("name,make,shape,dtype,x", [
    ("StringLookup", lambda k: k.layers.StringLookup(vocabulary=["a", "b", "c"]), (2,), "string",
     np.array([["a", "z"], ["c", "b"]], dtype=object)),
    ("Discretization", lambda k: k.layers.Discretization(bin_boundaries=[0.0, 1.0, 2.0]), (3,), "float32",
     np.array([[-1.0, 0.5, 3.0]], np.float32)),
])
@pytest.mark.case("05")
def test_layers_give_keras_ids(keras, cache, name, make, shape, dtype, x):
    """onnx/tensorflow-onnx#1867: the same integer ids as Keras through the exported graph."""
    inp = keras.Input(shape, dtype=dtype)
    model = keras.Model(inp, make(keras)(inp))
    ref = np.asarray(model(x))
    art = mmbridge.export(model, sample_inputs={"input": x}, cache_dir=cache, name=f"case05_{name}")
    got = next(iter(run_ort(art.onnx_path, {"input": x}).values()))
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


@pytest.mark.case("05")
def test_hashing_integers_give_keras_ids(keras, cache):
    """Keras Hashing on integers = FarmHash Fingerprint64 of the decimal string, rebuilt in ONNX."""
    inp = keras.Input((2,), dtype="int64")
    model = keras.Model(inp, keras.layers.Hashing(num_bins=8)(inp))
    x = np.array([[1, 2], [3, 4]], np.int64)
    art = mmbridge.export(model, sample_inputs={"input": x}, cache_dir=cache, name="case05_hashing")
    got = next(iter(run_ort(art.onnx_path, {"input": x}).values()))
    np.testing.assert_array_equal(got, np.asarray(model(x)))
    assert "StringToHashBucketFast" not in {n.op_type for n in art.model.graph.node}


@pytest.mark.case("05")
def test_string_hashing_is_refused_naming_layer_and_op(keras, cache):
    """On strings, FarmHash needs the string's bytes, which no ONNX / ORT-extensions op exposes."""
    inp = keras.Input((2,), dtype="string")
    model = keras.Model(inp, keras.layers.Hashing(num_bins=8, name="bucket_ids")(inp))
    with pytest.raises(UnsupportedOpsError, match="StringToHashBucketFast") as info:
        mmbridge.export(model, sample_inputs={"input": np.array([["a", "b"]], object)}, cache_dir=cache,
                        name="case05_hashing_str")
    msg = str(info.value)
    assert "bucket_ids" in msg and "Fingerprint64" in msg and "What to do" in msg
    assert info.value.ops and info.value.ops[0]["op_type"] == "StringToHashBucketFast"
