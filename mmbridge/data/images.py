"""An image input pipeline that decodes like ``tf.io.decode_jpeg`` and feeds batched bridges.

The TF pipelines users bring decode JPEGs with ``tf.io.decode_jpeg`` / ``tf.io.decode_image``,
whose default IDCT is libjpeg's fast integer one (``dct_method=""`` means ``"INTEGER_FAST"``,
``JDCT_IFAST``), with fancy upsampling of subsampled chroma. Pillow and torchvision decode with the
accurate integer IDCT (``JDCT_ISLOW``), so the same file differs by up to 8 levels per channel
from TF's default (measured on 4:4:4, 4:2:2 and 4:2:0 files at quality 50-95,
``tests/data/test_images.py``). A bridged preprocessing graph fed other pixels than TF's computes
other features, so this module decodes with libjpeg-turbo through ``simplejpeg``, which exposes
both IDCTs: ``dct_method="INTEGER_FAST"`` (TF's default) and ``"INTEGER_ACCURATE"`` (TF's
``dct_method="INTEGER_ACCURATE"``, equal to Pillow). Both are bit-exact with TF on the files tested.
Non-JPEG files (PNG, BMP, GIF) are decoded with Pillow by the folder loader's rules
(:func:`mmbridge.data.load_image`): an alpha channel is composited on white, where
``tf.io.decode_png(channels=3)`` drops it, so only opaque images decode as TF decodes them.

* :func:`decode_image`: one file or its bytes -> uint8 ``[H, W, 3]`` (HWC, RGB).
* :class:`ImageFileDataset`: a map-style dataset of files -> uint8 ``[H, W, 3]`` tensors.
* :func:`image_loader`: a ``torch.utils.data.DataLoader`` decoding in worker processes and
  collating uint8 NHWC ``[B, H, W, 3]`` batches (pinned on CUDA), ready for a bridged
  preprocessing module (``BridgeArtifact.to_ort()`` / ``to_torch()``) applied once per batch.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmbridge.errors import DataError

DCT_METHODS = ("INTEGER_FAST", "INTEGER_ACCURATE")
"""The IDCTs of ``tf.io.decode_jpeg(dct_method=...)`` this module reproduces; ``""`` means the first
(TF's default)."""

_JPEG_MAGIC = b"\xff\xd8\xff"


def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError as exc:  # a dependency of mmbridge; missing only in a broken install
        raise ImportError("mmbridge.data.images needs simplejpeg (libjpeg-turbo with a selectable IDCT) to decode "
                          "JPEGs exactly as tf.io.decode_jpeg does; install it: pip install simplejpeg") from exc
    return simplejpeg


def decode_image(source: str | Path | bytes, *, dct_method: str = "INTEGER_FAST", name: str | None = None) -> np.ndarray:
    """Decode one image to uint8 RGB ``[H, W, 3]`` (HWC), as ``tf.io.decode_image(x, channels=3)``.

    JPEGs are decoded by libjpeg-turbo (``simplejpeg``) with the IDCT of ``dct_method`` and fancy
    upsampling, which is what ``tf.io.decode_jpeg(contents, channels=3, dct_method=...)`` does
    (``fancy_upscaling=True`` is TF's default): bit-exact on the files of the test suite. Greyscale
    JPEGs are replicated to 3 channels, as TF does. Other formats are decoded with Pillow the way
    :func:`mmbridge.data.load_image` decodes them (palette and 16-bit images become 8-bit RGB;
    alpha is composited on white, which ``tf.io.decode_png(channels=3)`` does not do: it drops
    alpha; opaque images decode the same).

    Args:
        source: a file path or the encoded bytes.
        dct_method: ``"INTEGER_FAST"`` (TF's default, ``dct_method=""``) or ``"INTEGER_ACCURATE"``
            (Pillow's and torchvision's IDCT); ``""`` is taken as TF takes it (the first).
        name: how errors name the image (default: the path, or ``"<bytes>"``).

    Returns:
        uint8 array ``[H, W, 3]``, C-contiguous.

    Raises:
        ValueError: ``dct_method`` is not one of :data:`DCT_METHODS` (or ``""``).
        DataError: the image cannot be read or decoded (names the image and the decoder's reason),
            or it is a CMYK JPEG (TF refuses those too).
    """
    method = dct_method or DCT_METHODS[0]
    if method not in DCT_METHODS:
        raise ValueError(f"dct_method={dct_method!r} is not one of {DCT_METHODS} (the values of tf.io.decode_jpeg's "
                         f"dct_method; '' means INTEGER_FAST)")
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DataError(f"image {label} cannot be read: {exc}") from exc
    if data[:3] == _JPEG_MAGIC:
        sj = _simplejpeg()
        try:
            header = sj.decode_jpeg_header(data)
            if header[2] == "CMYK":
                raise DataError(f"image {label} is a CMYK JPEG; tf.io.decode_jpeg refuses those too. Convert it to RGB")
            out = sj.decode_jpeg(data, colorspace="RGB", fastdct=method == "INTEGER_FAST", fastupsample=False)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - simplejpeg raises ValueError / RuntimeError on corrupt data
            raise DataError(f"image {label} cannot be decoded as JPEG ({type(exc).__name__}: {exc}); "
                            f"replace or remove it") from exc
        return np.ascontiguousarray(out)
    from mmbridge.data.folder import _decode_rgb  # Pillow, full decode, RGB rules of the folder loader

    return np.ascontiguousarray(np.asarray(_decode_rgb(data if isinstance(source, (bytes, bytearray)) else source),
                                           dtype=np.uint8))


class ImageFileDataset(Dataset):
    """Image files as uint8 ``[H, W, 3]`` tensors (HWC, RGB), decoded by :func:`decode_image`.

    Decoding happens in ``__getitem__``, so a ``DataLoader`` with workers decodes in parallel
    processes (:func:`image_loader`). Items are returned as decoded: resizing, scaling and
    normalising belong to the bridged preprocessing graph, applied to whole batches.

    Args:
        paths: image files, in order.
        dct_method: see :func:`decode_image`.

    Raises:
        ValueError: ``paths`` is empty, or ``dct_method`` is unknown.
    """

    def __init__(self, paths: Sequence[str | Path], *, dct_method: str = "INTEGER_FAST") -> None:
        if not len(paths):
            raise ValueError("ImageFileDataset: paths is empty; give at least one image file")
        if (dct_method or DCT_METHODS[0]) not in DCT_METHODS:
            raise ValueError(f"ImageFileDataset: dct_method={dct_method!r} is not one of {DCT_METHODS}")
        self.paths = [str(p) for p in paths]
        self.dct_method = dct_method

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.paths[i], dct_method=self.dct_method))


def _stack_same_size(items: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise DataError(f"image_loader: a batch holds images of different sizes {sorted(shapes)}; a batched bridge "
                        f"needs one size per batch. Resize the files to one size first, or use batch_size=1 and "
                        f"a bridge with dynamic H/W")
    return torch.stack(items)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is single-threaded; N workers must not each start N OpenMP threads


def image_loader(paths: Sequence[str | Path], *, batch_size: int, num_workers: int = 2, dct_method: str = "INTEGER_FAST",
                 pin_memory: bool | None = None, shuffle: bool = False, drop_last: bool = False,
                 multiprocessing_context: str | None = None, prefetch_factor: int | None = None,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A ``DataLoader`` of uint8 NHWC batches ``[B, H, W, 3]`` decoded as TF decodes them.

    The counterpart of ``tf.data.Dataset.from_tensor_slices(paths).map(read + decode_jpeg,
    num_parallel_calls=N).batch(B)``: ``num_workers`` processes decode (TF uses threads; Python
    needs processes), batches are collated in shared memory and, with ``pin_memory``, copied into
    page-locked memory so that ``.to("cuda", non_blocking=True)`` overlaps the copy. Workers stay
    alive across epochs (``persistent_workers``) and each runs one torch thread. Apply the bridged
    preprocessing module to each batch: one ORT / torch call per batch, not per image.

    Args:
        paths: image files; every image in one batch must have the same size.
        batch_size: images per batch (>= 1).
        num_workers: decoding processes (0 decodes in the calling process).
        dct_method: see :func:`decode_image` (``"INTEGER_FAST"`` is ``tf.io.decode_jpeg``'s default).
        pin_memory: page-locked batches; default: when CUDA is available.
        shuffle, drop_last, generator: as ``torch.utils.data.DataLoader``.
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"`` for the workers
            (default torch's). Use ``"forkserver"`` or ``"spawn"`` when TensorFlow is loaded in the
            calling process.
        prefetch_factor: batches each worker loads ahead (default torch's, 2).

    Returns:
        ``DataLoader`` yielding uint8 tensors ``[B, H, W, 3]`` (NHWC).

    Raises:
        ValueError: ``batch_size`` < 1, ``num_workers`` < 0, empty ``paths`` or unknown ``dct_method``.
        DataError: (while iterating) an unreadable image, or one batch with images of different sizes.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"image_loader: batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"image_loader: num_workers must be an int >= 0, got {num_workers!r}")
    dataset = ImageFileDataset(paths, dct_method=dct_method)
    kwargs: dict[str, Any] = {}
    if num_workers:
        kwargs.update(persistent_workers=True, worker_init_fn=_one_thread,
                      multiprocessing_context=multiprocessing_context)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      collate_fn=_stack_same_size, generator=generator,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **kwargs)


__all__ = ["DCT_METHODS", "ImageFileDataset", "decode_image", "image_loader"]
