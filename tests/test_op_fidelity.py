"""Op fidelity: TF ops the exporter lets through compute what TF computes, on ORT and on torch,
on the inputs where tf2onnx's own form is wrong (negative integers, sizes that do not divide)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmbridge

pytestmark = pytest.mark.tf


def _both(art, *arrays):
    ins = [torch.from_numpy(a) for a in arrays]
    return mmbridge.to_ort(art)(*ins).numpy(), mmbridge.to_torch(art, trainable=False)(*ins).numpy()


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "float64"])
def test_floordiv_rounds_toward_negative_infinity(tf, tmp_path, dtype):
    """tf2onnx writes integer FloorDiv as a truncating Div: -7 // 2 gave -3 instead of -4."""

    @tf.function(input_signature=[tf.TensorSpec([None], dtype, name="a"), tf.TensorSpec([None], dtype, name="b")])
    def floordiv(a, b):
        return a // b

    a = np.array([-7, 7, -1, 5, 0, -9, 9, -3], dtype)
    b = np.array([2, -2, 3, -3, 4, 3, -4, -5], dtype)
    art = mmbridge.export(floordiv, sample_inputs={"a": a[:2], "b": b[:2]}, cache_dir=tmp_path)
    want = tf.math.floordiv(a, b).numpy()
    np.testing.assert_array_equal(want[:5], np.array([-4, -4, -1, -2, 0], dtype))
    for got in _both(art, a, b):
        np.testing.assert_array_equal(got, want)


def test_center_crop_with_dynamic_size_matches_the_traced_layer_at_every_size(keras, tf, tmp_path):
    """CenterCrop(10, 12) exported with dynamic H/W: the offsets are ``(size - crop) // 2``, negative
    for inputs smaller than the crop (6x7 gave 2x2 instead of 2x3 columns before FloorDiv was exact)."""
    layer = keras.layers.CenterCrop(10, 12)
    spec = [mmbridge.TensorSpec("image", ("batch", "h", "w", 3), "float32", "NHWC")]
    art = mmbridge.export(layer, input_specs=spec, cache_dir=tmp_path)
    traced = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for h, w in ((6, 7), (11, 12), (20, 31)):
        x = np.random.default_rng(h).random((2, h, w, 3), dtype=np.float32)
        want = traced(x).numpy()
        for got in _both(art, x):
            assert got.shape == want.shape, (h, w)
            np.testing.assert_array_equal(got, want)
