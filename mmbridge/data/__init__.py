"""Multimodal data: an image folder + text CSV + numeric CSV joined by id (docs/design.md section 8).

* :class:`MultimodalDataset` / :func:`load_splits`: torch datasets yielding raw tensors
  (uint8 NHWC images, token ids + mask, float features, int64 labels).
* :func:`load_frame_splits`: the same datasets from a pandas DataFrame or a ``datasets.Dataset``
  (:mod:`mmbridge.data.sources`).
* :mod:`mmbridge.data.tokenizers`: ``"word"`` (fit on train) and ``"minilm"`` (offline).
* :func:`tf_data_to_torch`: an existing ``tf.data.Dataset`` as a per-rank torch ``IterableDataset``.
* :func:`sample_dir`: the small synthetic dataset shipped with the package (offline demo).

Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

from pathlib import Path

from mmbridge.data.folder import (
    MODALITIES,
    SPLITS,
    MultimodalDataset,
    apply_stats,
    compute_stats,
    load_image,
    load_splits,
    make_splits,
)
from mmbridge.data.sources import frame_columns, load_frame_splits
from mmbridge.data.tf_adapter import (
    TFDataDataset,
    TFDataIterable,
    resolve_rank,
    tf_data_to_dataset,
    tf_data_to_torch,
)
from mmbridge.data.tokenizers import (
    HFTokenizer,
    WordTokenizer,
    get_tokenizer,
    minilm_path,
    tokenizer_from_dict,
)

__all__ = [
    "MODALITIES",
    "SPLITS",
    "HFTokenizer",
    "MultimodalDataset",
    "TFDataDataset",
    "TFDataIterable",
    "WordTokenizer",
    "apply_stats",
    "compute_stats",
    "get_tokenizer",
    "frame_columns",
    "load_frame_splits",
    "load_image",
    "load_splits",
    "make_splits",
    "minilm_path",
    "resolve_rank",
    "sample_dir",
    "tf_data_to_dataset",
    "tf_data_to_torch",
    "tokenizer_from_dict",
]


def sample_dir() -> Path:
    """Folder of the built-in synthetic sample (``mmbridge/_sample/shapes``), in the layout of
    :meth:`MultimodalDataset.from_folder`: 120 ids, 4 classes, 32x32 (some 48x48) RGBA PNGs of
    coloured shapes, short texts, 5 numeric columns (``male_pct`` partly empty), ``splits.csv``
    (80 / 20 / 20). Regenerate with ``python -m mmbridge._sample.make_sample`` (deterministic).

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    path = Path(__file__).resolve().parent.parent / "_sample" / "shapes"
    if not (path / "text.csv").is_file():
        raise FileNotFoundError(f"the built-in sample is missing at {path}; reinstall mmbridge "
                                "(package data mmbridge/_sample/**) or run python -m mmbridge._sample.make_sample")
    return path
