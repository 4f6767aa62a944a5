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


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_one_hot_of_negative_and_out_of_range_ids_is_all_off(tf, tmp_path, dtype):
    """ONNX OneHot counts negative ids from the end; TF gives an all-off row (-1 was class 3 of 4)."""

    @tf.function(input_signature=[tf.TensorSpec([None], dtype, name="ids")])
    def one_hot(ids):
        return tf.one_hot(ids, 4, on_value=2.0, off_value=-1.0)

    ids = np.array([-1, 0, 3, 4, 7, -5, 2, -4], dtype)
    art = mmbridge.export(one_hot, sample_inputs={"ids": ids[1:3]}, cache_dir=tmp_path)
    want = one_hot(ids).numpy()
    assert (want[0] == -1.0).all() and (want[3] == -1.0).all()
    for got in _both(art, ids):
        np.testing.assert_array_equal(got, want)


def test_scatter_nd_adds_the_updates_of_repeated_indices(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.int32, name="idx"),
                                  tf.TensorSpec([None], tf.float32, name="upd")])
    def scatter(idx, upd):
        return tf.scatter_nd(idx, upd, [5])

    art = mmbridge.export(scatter, sample_inputs={"idx": np.array([[0], [2]], np.int32),
                                                  "upd": np.array([1.0, 2.0], np.float32)}, cache_dir=tmp_path)
    idx, upd = np.array([[1], [1], [3], [1]], np.int32), np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    want = scatter(idx, upd).numpy()
    np.testing.assert_array_equal(want, [0, 11, 0, 4, 0])
    for got in _both(art, idx, upd):  # ScatterND(reduction="add") on ORT and on torch
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("begin", "size"), [(2, -1), (0, -1), (4, 2), (5, -1)])
def test_slice_with_a_runtime_size_of_minus_one_goes_to_the_end(tf, tmp_path, begin, size):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x"), tf.TensorSpec([], tf.int32, name="b"),
                                  tf.TensorSpec([], tf.int32, name="s")])
    def sliced(x, b, s):
        return tf.slice(x, [b], [s])

    x = np.arange(7, dtype=np.float32)
    art = mmbridge.export(sliced, sample_inputs={"x": x, "b": np.array(1, np.int32), "s": np.array(2, np.int32)},
                          cache_dir=tmp_path)
    want = sliced(x, np.int32(begin), np.int32(size)).numpy()
    for got in _both(art, x, np.array(begin, np.int32), np.array(size, np.int32)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("lower", "upper"), [(-1, 0), (0, -1), (1, 0), (-1, -1), (0, 2)])
def test_band_part_with_runtime_bounds(tf, tmp_path, lower, upper):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="x"),
                                  tf.TensorSpec([], tf.int32, name="lo"), tf.TensorSpec([], tf.int32, name="hi")])
    def band(x, lo, hi):
        return tf.linalg.band_part(x, lo, hi)

    x = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5) + 1
    art = mmbridge.export(band, sample_inputs={"x": x[:, :3, :3], "lo": np.array(1, np.int32),
                                               "hi": np.array(1, np.int32)}, cache_dir=tmp_path)
    want = band(x, np.int32(lower), np.int32(upper)).numpy()
    for got in _both(art, x, np.array(lower, np.int32), np.array(upper, np.int32)):
        np.testing.assert_array_equal(got, want)


def test_bfloat16_casts_are_bfloat16_not_float16(tf, tmp_path):
    """tf2onnx mapped TF's bfloat16 to float16: 1.00390625 stayed 1.00390625 (float16 keeps it) where
    bfloat16 rounds it to 1.0, and values past 65504 overflowed."""

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def through_bf16(x):
        return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)

    x = np.array([[1.00390625, 3.14159, 1e-3, 1.0e5]], np.float32)
    art = mmbridge.export(through_bf16, sample_inputs={"x": x}, cache_dir=tmp_path)
    want = through_bf16(x).numpy()
    assert want[0, 0] == 1.0 and want[0, 3] == 99840.0
    for got in _both(art, x):
        np.testing.assert_array_equal(got, want)


def test_adjust_saturation_puts_the_channels_back_in_place(tf, tmp_path):
    """tf2onnx sorted the channels and then applied the sort permutation again instead of its
    inverse (0.13 off at factor 0.5 on [0, 1] pixels); a negative factor was not clamped at s = 0."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="x"),
                                  tf.TensorSpec([], tf.float32, name="f")])
    def saturate(x, f):
        return tf.image.adjust_saturation(x, f)

    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 4, 3), dtype=np.float32)
    x[0, 0, 0] = [0.25, 0.25, 0.25]  # gray: delta 0
    x[0, 0, 1] = [0.9, 0.1, 0.5]  # every channel order occurs among the random pixels too
    art = mmbridge.export(saturate, sample_inputs={"x": x[:1, :2, :2], "f": np.array(0.7, np.float32)},
                          cache_dir=tmp_path)
    for factor in (0.5, 2.0, -1.0):
        f = np.array(factor, np.float32)
        want = saturate(x, f).numpy()
        for got in _both(art, x, f):
            assert got.shape == want.shape == (2, 3, 4, 3)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"factor {factor}")


def test_crop_and_resize_nearest_rounds_ties_up(tf, tmp_path):
    """TF picks ``roundf(source)``: a .5 tie rounds up; ONNX Resize's default ``round_prefer_floor``
    took the lower pixel (box [0, 0, .5, .5] on 4x4, crop 3x3: sources 0, .75, 1.5)."""

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 1], tf.float32, name="x"),
                                  tf.TensorSpec([None, 4], tf.float32, name="boxes")])
    def crop(x, boxes):
        ids = tf.zeros(tf.shape(boxes)[:1], tf.int32)
        return tf.image.crop_and_resize(x, boxes, ids, [3, 3], method="nearest")

    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.75]], np.float32)
    art = mmbridge.export(crop, sample_inputs={"x": x, "boxes": boxes[:1]}, cache_dir=tmp_path)
    want = crop(x, boxes).numpy()
    np.testing.assert_array_equal(want[1, ..., 0], [[0, 1, 2], [4, 5, 6], [8, 9, 10]])
    for got in _both(art, x, boxes):
        assert got.shape == want.shape == (3, 3, 3, 1)
        np.testing.assert_array_equal(got, want)


def test_constant_outputs_export_and_run_on_both_backends(tf, tmp_path):
    """A constant output (``tf.shape`` of a static input, a ``tf.constant``) became an initializer
    under a name no node wrote: ``onnx.checker`` refused it, and onnx2torch raised ``KeyError``."""

    @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32, name="x")])
    def consts(x):
        return x * 2.0, tf.shape(x), tf.constant([1.5, -2.0])

    art = mmbridge.export(consts, cache_dir=tmp_path)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = [t.numpy() for t in consts(x)]
    ins = torch.from_numpy(x)
    for outs in (mmbridge.to_ort(art)(ins), mmbridge.to_torch(art, trainable=False)(ins)):
        assert len(outs) == 3
        for got, w in zip(outs, want):
            assert got.numpy().dtype == w.dtype and got.shape == w.shape
            np.testing.assert_array_equal(got.numpy(), w)


def test_single_channel_conv_with_dynamic_spatial_dims_converts_to_the_same_bytes_every_time(keras, tmp_path):
    """tf2onnx ordered nodes by memory address (a set of nodes), skipped nodes while rewriting a
    list it iterated, and numbered names with a process-wide counter: the same Conv2D(1, 3) on a
    (None, None, None, 1) input gave other bytes on every export, and some orders dropped the
    final Squeeze (a rank-5 output that failed parity)."""
    import hashlib

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 1))
    model = keras.Model(inp, keras.layers.Conv2D(1, 3, padding="same")(inp))
    x = np.random.default_rng(0).random((2, 5, 7, 1), dtype=np.float32)
    hashes = set()
    for i in range(6):
        art = mmbridge.export(model, sample_inputs={"input": x[:1, :4, :4]}, cache_dir=tmp_path / str(i), optimize=False)
        hashes.add(hashlib.sha256(art.model.SerializeToString(deterministic=True)).hexdigest())
    assert len(hashes) == 1
    assert [n.op_type for n in art.model.graph.node][-1] == "Squeeze"
    want = np.asarray(model(x))
    for got in _both(art, x):
        assert got.shape == want.shape == (2, 5, 7, 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bfloat16_arithmetic_is_refused_with_the_reason(tf, tmp_path):
    """bfloat16 arithmetic exports as ONNX BFLOAT16 (not float16); onnxruntime's CPU provider has no
    bfloat16 Mul, so the export is refused saying so, instead of a bare NOT_IMPLEMENTED."""

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def bf16_mul(x):
        return tf.cast(tf.cast(x, tf.bfloat16) * tf.constant(3.0, tf.bfloat16), tf.float32)

    with pytest.raises(mmbridge.errors.ExportError, match=r"(?s)NOT_IMPLEMENTED.*computes in bfloat16.*float32"):
        mmbridge.export(bf16_mul, cache_dir=tmp_path)


@pytest.mark.parametrize("method", ["bilinear"])  # bicubic / area are refused (TF's kernels differ): docs/preprocessing.md
def test_interpolating_resize_of_a_uint8_image_computes_in_float_as_tf(tf, tmp_path, method):
    """The seed pipeline: ``tf.image.resize(uint8 image)`` (float32 out in TF), then ``/ 255``.
    tf2onnx wrote the Resize on uint8, so onnx.checker refused the graph; now the image is cast to
    float32 first and both backends give TF's values."""

    @tf.function(input_signature=[tf.TensorSpec([None, 20, 24, 3], tf.uint8, name="image")])
    def seed_pipeline(image):
        return tf.cast(tf.image.resize(image, (16, 16), method=method), tf.float32) / 255.0

    x = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    art = mmbridge.export(seed_pipeline, cache_dir=tmp_path)
    assert any("integer image computes in float32" in n for n in art.meta["rewrites"]), art.meta["rewrites"]
    want = seed_pipeline(tf.constant(x)).numpy()
    assert want.shape == (2, 16, 16, 3) and want.dtype == np.float32
    for got in _both(art, x):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
