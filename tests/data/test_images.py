"""The image input pipeline (mmbridge.data.images): decoding bit-exact with tf.io.decode_jpeg for both
IDCTs, errors that name the file, and a DataLoader of uint8 NHWC batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import mmbridge  # noqa: F401  (first: loads torch's stack before TF)
from mmbridge.data.images import DCT_METHODS, ImageFileDataset, decode_image, image_loader
from mmbridge.errors import DataError


def _jpeg(seed: int, shape=(37, 53), quality=90, subsampling=2, grey=False) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(np.cumsum(rng.uniform(0, 255, (*shape, 3)), axis=1) / 8, 0, 255).astype(np.uint8)
    im = Image.fromarray(a).convert("L") if grey else Image.fromarray(a)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=subsampling if not grey else 0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tf():
    pytest.importorskip("tensorflow")
    from mmbridge.export._tf import import_tensorflow

    return import_tensorflow()


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["444", "422", "420"])
@pytest.mark.parametrize("quality", [50, 95])
def test_decode_is_bit_exact_with_tf_for_both_idcts(tf, subsampling, quality):
    data = _jpeg(subsampling * 100 + quality, quality=quality, subsampling=subsampling)
    fast = decode_image(data)  # TF's default dct_method ("" = INTEGER_FAST)
    np.testing.assert_array_equal(fast, tf.io.decode_jpeg(data, channels=3).numpy())
    np.testing.assert_array_equal(decode_image(data, dct_method=""), fast)
    accurate = decode_image(data, dct_method="INTEGER_ACCURATE")
    np.testing.assert_array_equal(accurate, tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy())
    assert fast.dtype == np.uint8 and fast.shape == (37, 53, 3) and fast.flags.c_contiguous
    # why this module exists: Pillow (and torchvision) decode with the accurate IDCT, not TF's default
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(pil, accurate)
    assert np.abs(pil.astype(int) - fast).max() > 0


def test_grey_jpeg_is_replicated_and_png_matches_tf(tf, tmp_path):
    grey = _jpeg(3, grey=True)
    np.testing.assert_array_equal(decode_image(grey), tf.io.decode_jpeg(grey, channels=3).numpy())
    a = np.random.default_rng(4).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    np.testing.assert_array_equal(decode_image(path), tf.io.decode_png(path.read_bytes(), channels=3).numpy())


def test_errors_name_the_image(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(_jpeg(5)[:40])
    with pytest.raises(DataError, match="broken.jpg"):
        decode_image(bad)
    with pytest.raises(DataError, match="missing.jpg.*cannot be read"):
        decode_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="dct_method='ISLOW'.*INTEGER_FAST"):
        decode_image(_jpeg(6), dct_method="ISLOW")
    with pytest.raises(ValueError, match="paths is empty"):
        ImageFileDataset([])
    with pytest.raises(ValueError, match="batch_size"):
        image_loader([bad], batch_size=0)


def _files(tmp_path, n, shape=(24, 20)):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i:03d}.jpg"
        p.write_bytes(_jpeg(10 + i, shape=shape))
        paths.append(p)
    return paths


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_uint8_nhwc_batches_in_order(tmp_path, workers):
    paths = _files(tmp_path, 5)
    loader = image_loader(paths, batch_size=2, num_workers=workers)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 24, 20, 3), (2, 24, 20, 3), (1, 24, 20, 3)]
    assert all(b.dtype == torch.uint8 for b in batches)
    got = torch.cat(batches).numpy()
    want = np.stack([decode_image(p, dct_method=DCT_METHODS[0]) for p in paths])
    np.testing.assert_array_equal(got, want)
    assert list(loader)[0].equal(batches[0])  # a second epoch (persistent workers) gives the same data


def test_loader_refuses_mixed_sizes_in_one_batch(tmp_path):
    paths = _files(tmp_path, 1) + [tmp_path / "big.jpg"]
    paths[1].write_bytes(_jpeg(99, shape=(30, 20)))
    with pytest.raises(DataError, match=r"different sizes.*\(24, 20, 3\).*\(30, 20, 3\)"):
        next(iter(image_loader(paths, batch_size=2, num_workers=0)))
