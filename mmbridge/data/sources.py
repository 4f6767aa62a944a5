"""In-memory data sources: a pandas ``DataFrame`` or a Hugging Face ``datasets.Dataset``.

:func:`load_frame_splits` reads one table with a row per id (an id column, an image column of
file paths or encoded image bytes, any number of text columns, numeric and categorical columns,
an optional label column and an optional split column) and returns the same train / val / test
:class:`~mmbridge.data.MultimodalDataset`\\ s as :func:`~mmbridge.data.load_splits` does for a
folder: the same checks, run on the same rules and reported the same way (every problem with
its ids at once, or ``on_error="skip"``), the same items, the same fitted state shared from the
train split. A folder and the DataFrame holding the same rows give identical datasets.

Neither pandas nor ``datasets`` is imported here: a table is anything with named columns,

* a pandas ``DataFrame`` (``df.columns``, ``df[c].tolist()``),
* a ``datasets.Dataset`` (read through its pandas view ``ds.to_pandas()`` when pandas is
  installed, else column by column, ``ds.column_names`` / ``ds[c]``),
* a plain ``{column: list}`` mapping.

Rules beyond the folder's:

* Ids must be integers (an ``int`` or an integral float/str); a row whose id is not is refused
  with the row numbers. A repeated id is a ``duplicate_id`` problem.
* Image cells: a path (``str`` / ``PathLike``; relative ones are relative to ``image_root``),
  encoded bytes (PNG / JPEG file contents), or a ``{"bytes": ..., "path": ...}`` dict (how
  ``datasets``' ``Image`` feature appears in its pandas view). An empty cell or a path that does
  not exist is ``missing_image``; a cell that does not decode is ``unreadable_image``.
* Text cells: several text columns are joined, in the order given, with ``text_separator``
  (default ``"\\n"``) into the one ``text`` input. A missing cell (None / NaN) in a text column
  is ``missing_text``; an empty string is an empty text (as in ``text.csv``).
* Numeric cells: numbers (or numeric strings); NaN / None / an empty string is a missing value
  (imputed with the train median, as for ``numeric.csv``); ``inf`` is ``non_finite``; anything
  else ``bad_value``.
* Categorical columns become integer codes in the item key ``"categorical"`` (int64 ``[C]``):
  the train split's distinct values, sorted as strings, are codes ``1..K``; 0 is a missing
  cell or a value the train split never had. The mapping is ``ds.categories``
  (``{column: [value of code 1, value of code 2, ...]}``), saved in ``ds.metadata()`` for
  prediction.
* Labels are the label column's values as strings. ``labels="required"`` (default) refuses an
  empty one (``missing_label``); ``labels="optional"`` accepts unlabelled rows (label ``-1``)
  and a table without a label column (items then have no ``"label"``).
* Splits: the split column (``train`` / ``val`` / ``test``; an empty cell = in no split), else
  ``splits={id: split}``, else the deterministic stratified 70/15/15 split of the folder loader
  (seed 0).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.data.folder import (
    LABEL_POLICIES,
    MODALITIES,
    SPLIT_FRACTIONS,
    SPLITS,
    MultimodalDataset,
    _check_common,
    _fmt_ids,
    _image_problems,
    _parse_number,
    _Problems,
    _splits_of,
    _stratified,
    _Table,
)
from mmbridge.data.tokenizers import Tokenizer
from mmbridge.errors import DataError

__all__ = ["LABEL_POLICIES", "frame_columns", "load_frame_splits"]


def frame_columns(frame: Any) -> dict[str, list[Any]]:
    """``{column: list of cells}`` of a pandas DataFrame, a ``datasets.Dataset`` or a mapping of lists.

    Raises:
        TypeError: ``frame`` has no named columns.
        DataError: the columns have different lengths.
    """
    if hasattr(frame, "column_names") and hasattr(frame, "to_pandas"):  # datasets.Dataset
        try:
            import pandas  # noqa: F401
        except ImportError:
            return {str(c): list(frame[c]) for c in frame.column_names}
        frame = frame.to_pandas()
    if hasattr(frame, "columns") and hasattr(frame, "__getitem__"):  # pandas.DataFrame (or alike)
        cols = [str(c) for c in frame.columns]
        dup = sorted(c for c, n in Counter(cols).items() if n > 1)
        if dup:
            raise DataError(f"the DataFrame repeats column(s) {dup}; rename them")
        out = {}
        for c in frame.columns:
            col = frame[c]
            out[str(c)] = col.tolist() if hasattr(col, "tolist") else list(col)
        return out
    if isinstance(frame, Mapping):
        out = {str(k): list(v) for k, v in frame.items()}
    else:
        raise TypeError(f"expected a pandas DataFrame, a datasets.Dataset or a {{column: list}} mapping, got "
                        f"{type(frame).__name__}")
    lengths = {c: len(v) for c, v in out.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"the table's columns have different lengths: {lengths}")
    return out


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType")


def _as_id(v: Any) -> int | None:
    if isinstance(v, bool) or _is_missing(v):
        return None
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return int(v) if float(v).is_integer() else None
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _number(v: Any) -> float | None:
    """float, NaN for a missing cell, None for a cell that is not a number (as :func:`_parse_number`)."""
    if _is_missing(v):
        return math.nan
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    if isinstance(v, str):
        return _parse_number(v)
    return None


def _image_cell(v: Any, image_root: Path | None) -> Path | bytes | None:
    """A path or encoded bytes, or None (missing)."""
    if isinstance(v, Mapping):  # datasets' Image feature in its pandas view: {"bytes": b"...", "path": "..."}
        if v.get("bytes"):
            return bytes(v["bytes"])
        v = v.get("path")
    if _is_missing(v) or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v) if len(v) else None
    if isinstance(v, str | os.PathLike):
        p = Path(v)
        if not p.is_absolute() and image_root is not None:
            p = Path(image_root) / p
        return p if p.is_file() else None
    if hasattr(v, "save") and hasattr(v, "mode"):  # a PIL image (datasets' Image feature, decoded)
        import io

        buf = io.BytesIO()
        v.save(buf, format="PNG")
        return buf.getvalue()
    return None


def _frame_table(frame: Any, *, name: str, modalities: Sequence[str], id_column: str, image_column: str | None,
                 image_root: str | Path | None, text_columns: Sequence[str], text_separator: str,
                 numeric_columns: Sequence[str], categorical_columns: Sequence[str], label_column: str | None,
                 split_column: str | None, splits: Mapping[int, str] | None, labels: str, on_error: str,
                 seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> _Table:
    from mmbridge.data.folder import _check_args

    mods = _check_args(modalities, on_error)
    if labels not in LABEL_POLICIES:
        raise ValueError(f"labels must be one of {list(LABEL_POLICIES)}, got {labels!r}")
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    if isinstance(numeric_columns, str):
        numeric_columns = [numeric_columns]
    if isinstance(categorical_columns, str):
        categorical_columns = [categorical_columns]
    cols = frame_columns(frame)
    root = Path(name)

    # which columns are needed, all checked at once
    need: dict[str, str] = {id_column: "id_column"}
    if "image" in mods:
        if image_column is None:
            raise ValueError("modalities include 'image': pass image_column= (paths or encoded bytes)")
        need[image_column] = "image_column"
    if "text" in mods:
        if not text_columns:
            raise ValueError("modalities include 'text': pass text_columns=[...] (one or more)")
        need.update({c: "text_columns" for c in text_columns})
    if "numeric" in mods:
        if not numeric_columns and not categorical_columns:
            raise ValueError("modalities include 'numeric': pass numeric_columns=[...] and/or categorical_columns=[...]")
        need.update({c: "numeric_columns" for c in numeric_columns})
        need.update({c: "categorical_columns" for c in categorical_columns})
        overlap = sorted(set(numeric_columns) & set(categorical_columns))
        if overlap:
            raise ValueError(f"column(s) {overlap} are both numeric and categorical")
    if label_column is not None:
        need[label_column] = "label_column"
    elif labels == "required":
        raise ValueError("labels='required' needs label_column=...; pass labels='optional' for a table without labels")
    if split_column is not None:
        need[split_column] = "split_column"
    absent = [f"{c!r} ({arg})" for c, arg in need.items() if c not in cols]
    if absent:
        raise DataError(f"{name} lacks column(s) {', '.join(absent)}; its columns are {list(cols)}")

    ids: list[int | None] = [_as_id(v) for v in cols[id_column]]
    bad_rows = [r for r, i in enumerate(ids) if i is None]
    if bad_rows:
        shown = [f"row {r}: {cols[id_column][r]!r}" for r in bad_rows[:10]]
        raise DataError(f"{name}: column {id_column!r} must hold integer ids; {len(bad_rows)} rows do not: {shown}")
    counts = Counter(ids)
    all_ids = {i for i in ids if i is not None}
    rows: dict[int, int] = {}  # id -> its (first) row
    for r, i in enumerate(ids):
        rows.setdefault(i, r)  # type: ignore[arg-type]

    # splits first: with a split column / mapping, ids in no split are left out silently (as splits.csv)
    universe: set[int] | None = None
    assignment_given: dict[int, str] | None = None
    if split_column is not None:
        assignment_given = {}
        badsplit = {}
        for i, r in rows.items():
            v = cols[split_column][r]
            if _is_missing(v) or (isinstance(v, str) and not v.strip()):
                continue
            s = str(v).strip()
            if s not in SPLITS:
                badsplit[i] = s
            assignment_given[i] = s
        if badsplit:
            raise DataError(f"{name}: column {split_column!r} has split names {sorted(set(badsplit.values()))} for "
                            f"{_fmt_ids(badsplit)}; each must be one of {list(SPLITS)} (or empty: in no split)")
    elif splits is not None:
        assignment_given = {int(i): str(s) for i, s in splits.items()}
        bad = {i for i, s in assignment_given.items() if s not in SPLITS}
        if bad:
            raise DataError(f"splits: names {sorted({assignment_given[i] for i in bad})} for {_fmt_ids(bad)} are not "
                            f"one of {list(SPLITS)}")
    if assignment_given is not None:
        universe = set(assignment_given)
        all_ids &= universe
        missing_rows = universe - set(rows)
    else:
        missing_rows = set()

    problems = _Problems()
    problems.add("duplicate_id", {i for i in all_ids if counts[i] > 1}, f"{name} has several rows for")
    if missing_rows:
        problems.add("missing_row", missing_rows, f"{name} has no row for (the split lists them)")
    all_ids |= missing_rows

    texts: dict[int, str] = {}
    if "text" in mods:
        missing_text = set()
        for i in all_ids - missing_rows:
            parts = [cols[c][rows[i]] for c in text_columns]
            if any(_is_missing(p) for p in parts):
                missing_text.add(i)
                continue
            texts[i] = text_separator.join(str(p) for p in parts)
        problems.add("missing_text", missing_text, f"{name} has no text (a missing cell in {list(text_columns)}) for")

    features: dict[int, np.ndarray] = {}
    categorical: dict[int, tuple[str | None, ...]] = {}
    if "numeric" in mods:
        bad_cols: dict[int, list[str]] = {}
        inf_cols: dict[int, list[str]] = {}
        for i in all_ids - missing_rows:
            vals = []
            for c in numeric_columns:
                v = _number(cols[c][rows[i]])
                if v is None:
                    bad_cols.setdefault(i, []).append(c)
                    v = math.nan
                elif math.isinf(v):
                    inf_cols.setdefault(i, []).append(c)
                vals.append(v)
            features[i] = np.array(vals, dtype=np.float64)
            categorical[i] = tuple(None if _is_missing(v := cols[c][rows[i]]) or (isinstance(v, str) and not v.strip())
                                   else str(v) for c in categorical_columns)
        if bad_cols:
            names = sorted({c for cs in bad_cols.values() for c in cs})
            problems.add("bad_value", bad_cols, f"{name} has cells that are not numbers (columns {names}) for")
        if inf_cols:
            names = sorted({c for cs in inf_cols.values() for c in cs})
            problems.add("non_finite", inf_cols, f"{name} has non-finite values (inf) in columns {names} for")

    label_of: dict[int, str] = {}
    if label_column is not None:
        empty = set()
        for i in all_ids - missing_rows:
            v = cols[label_column][rows[i]]
            lab = "" if _is_missing(v) else str(v).strip()
            if lab:
                label_of[i] = lab
            else:
                empty.add(i)
        if labels == "required":
            problems.add("missing_label", empty, f"{name} has an empty label (column {label_column!r}) for")

    images: dict[int, Path | bytes] = {}
    if "image" in mods:
        missing_img = set()
        for i in all_ids - missing_rows:
            cell = _image_cell(cols[image_column][rows[i]], Path(image_root) if image_root is not None else None)
            if cell is None:
                missing_img.add(i)
            else:
                images[i] = cell
        problems.add("missing_image", missing_img,
                     f"{name} has no image (empty cell or no such file) in column {image_column!r} for")
        fine = all_ids - problems.ids()
        bad_images = _image_problems({i: images[i] for i in fine if i in images})
        problems.add("unreadable_image", bad_images, f"{name} has unreadable images in column {image_column!r} for",
                     bad_images)

    skipped: dict[str, int] = {}
    dropped = problems.resolve(root, on_error, skipped)
    kept = sorted(all_ids - dropped)
    if not kept:
        raise DataError(f"{name}: no id is left after the checks; nothing to load")
    if assignment_given is not None:
        assignment = {i: assignment_given[i] for i in kept}
        source = f"{name} column {split_column!r}" if split_column is not None else "the given splits"
    else:
        if labels == "optional" and not label_of:
            assignment = _stratified({i: "" for i in kept}, fractions, seed)
        else:
            assignment = _stratified({i: label_of.get(i, "") for i in kept}, fractions, seed)
        source = (f"generated: stratified {'/'.join(str(round(f * 100)) for f in fractions)} split of the "
                  f"{len(kept)} kept ids by label, seed {seed} (no split column)")
    keep = set(kept)
    return _Table(root, mods, kept, {i: label_of[i] for i in kept if i in label_of},
                  {i: texts[i] for i in kept if i in texts}, {i: features[i] for i in kept if i in features},
                  list(numeric_columns) if "numeric" in mods else [],
                  {i: images[i] for i in kept if i in images}, skipped, assignment, source,
                  assignment_given is not None,
                  categorical={i: categorical[i] for i in keep if i in categorical} if categorical_columns else {},
                  categorical_columns=list(categorical_columns) if "numeric" in mods else [],
                  labels_optional=labels == "optional")


def load_frame_splits(
    frame: Any,
    *,
    id_column: str = "id",
    image_column: str | None = "image",
    image_root: str | Path | None = None,
    text_columns: Sequence[str] = ("text",),
    text_separator: str = "\n",
    numeric_columns: Sequence[str] = (),
    categorical_columns: Sequence[str] = (),
    label_column: str | None = "label",
    split_column: str | None = None,
    splits: Mapping[int, str] | None = None,
    modalities: Sequence[str] = MODALITIES,
    image_size: int = 128,
    tokenizer: str | Tokenizer | None = "word",
    max_length: int = 64,
    on_error: str = "raise",
    labels: str = "required",
    name: str = "<DataFrame>",
) -> dict[str, MultimodalDataset]:
    """Train, val and test datasets of a DataFrame / ``datasets.Dataset`` (rules: the module doc).

    Args:
        frame: a pandas DataFrame, a ``datasets.Dataset`` or a ``{column: list}`` mapping; one row per id.
        id_column: the integer id column.
        image_column: paths (relative ones under ``image_root``) or encoded image bytes.
        text_columns: one or more text columns, joined with ``text_separator``.
        numeric_columns: float features (NaN = missing, imputed with the train median).
        categorical_columns: columns turned into integer codes (item key ``"categorical"``).
        label_column: class names; None with ``labels="optional"``.
        split_column / splits: the split of each id (else a stratified 70/15/15 split, seed 0).
        modalities, image_size, tokenizer, max_length, on_error: as :func:`~mmbridge.data.load_splits`.
        labels: ``"required"`` (default) or ``"optional"`` (unlabelled rows allowed, label -1).
        name: how messages name the table.

    Returns:
        ``{"train": ds, "val": ds, "test": ds}`` of :class:`~mmbridge.data.MultimodalDataset`.

    Raises:
        DataError: absent columns, non-integer ids, or ids with problems (all listed at once).
        ValueError: bad arguments (checked before the cells are read).
        TypeError: ``frame`` is not a table.
    """
    _check_common(None, image_size, max_length, tokenizer)
    table = _frame_table(frame, name=name, modalities=modalities, id_column=id_column, image_column=image_column,
                         image_root=image_root, text_columns=text_columns, text_separator=text_separator,
                         numeric_columns=numeric_columns, categorical_columns=categorical_columns,
                         label_column=label_column, split_column=split_column, splits=splits, labels=labels,
                         on_error=on_error)
    return _splits_of(table, image_size=image_size, tokenizer=tokenizer, max_length=max_length, on_error=on_error)
