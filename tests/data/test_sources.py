"""In-memory data sources (DataFrame / datasets.Dataset / column mapping) and tf.data fed to the Trainer.

pandas and ``datasets`` are optional: without them the tests use small stand-ins with the same
duck-typed surface (``columns`` + ``df[c].tolist()``; ``column_names`` + ``to_pandas`` + ``ds[c]``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from mmbridge.data import load_frame_splits, load_splits
from mmbridge.errors import DataError


class Column(list):
    def tolist(self):
        return list(self)


class MiniFrame:
    """The part of pandas.DataFrame the loader reads."""

    def __init__(self, data: dict):
        self._data = {k: Column(v) for k, v in data.items()}
        self.columns = list(self._data)

    def __getitem__(self, c):
        return self._data[c]


class MiniHFDataset:
    """The part of datasets.Dataset the loader reads (to_pandas needs pandas; column access does not)."""

    def __init__(self, data: dict):
        self._data = data
        self.column_names = list(data)

    def __getitem__(self, c):
        return list(self._data[c])

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self._data)


def make_frame(data: dict):
    try:
        import pandas as pd
    except ImportError:
        return MiniFrame(data)
    return pd.DataFrame(data)


def png_bytes(colour, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = ["cat", "dog"]
    return {
        "id": list(range(100, 100 + n)),
        "img": [png_bytes((i * 5 % 255, 0, 0)) for i in range(n)],
        "title": [f"title {i}" for i in range(n)],
        "body": [f"{labels[i % 2]} body words {i}" for i in range(n)],
        "weight": [float(v) for v in rng.normal(size=n)],
        "height": [float("nan") if i % 7 == 0 else float(i) for i in range(n)],
        "colour": [["red", "green", "blue", None][i % 4] for i in range(n)],
        "label": [labels[i % 2] for i in range(n)],
    }


KW = dict(image_column="img", text_columns=["title", "body"], numeric_columns=["weight", "height"],
          categorical_columns=["colour"], image_size=8, max_length=12)


# ------------------------------------------------------------------------------ DataFrame sources
def test_frame_items_categories_and_multiple_text_columns():
    splits = load_frame_splits(make_frame(table()), **KW)
    tr, te = splits["train"], splits["test"]
    assert len(tr) + len(splits["val"]) + len(te) == 40 and tr.label_names == ["cat", "dog"]
    item = tr[0]
    assert set(item) == {"id", "image", "text", "text_mask", "numeric", "categorical", "label"}
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == torch.uint8
    assert item["categorical"].dtype == torch.int64 and item["categorical"].shape == (1,)
    # codes 1..K from the train split's sorted values, 0 = missing; the mapping goes with the model
    assert tr.categories == {"colour": ["blue", "green", "red"]}
    assert te.categories == tr.categories and tr.metadata()["categories"] == tr.categories
    for ds in (tr, te):
        for k in range(len(ds)):
            i = ds.ids[k] - 100
            want = {"red": 1 + 2, "green": 1 + 1, "blue": 1 + 0, None: 0}[table()["colour"][i]]
            assert int(ds[k]["categorical"][0]) == want
    # NaN = a missing value: imputed with the train median and an indicator column
    assert tr.numeric_columns == ["weight", "height", "height_missing"]
    # both text columns reach the tokenizer (joined in the order given)
    assert "title" in tr.tokenizer.vocab and "body" in tr.tokenizer.vocab


def test_frame_checks_name_the_ids_like_the_folder_loader():
    t = table()
    t["id"][3] = t["id"][4]                      # duplicate id 104
    t["img"][5] = b"not a png"                   # unreadable image, id 105
    t["img"][6] = None                           # missing image, id 106
    t["weight"][7] = math.inf                    # non-finite, id 107
    t["height"][8] = "tall"                      # not a number, id 108
    t["label"][9] = ""                           # empty label, id 109
    t["body"][10] = None                         # missing text, id 110
    with pytest.raises(DataError) as err:
        load_frame_splits(make_frame(t), **KW)
    msg = str(err.value)
    for part in ("<DataFrame> has several rows for: 1 id [104]",
                 "has unreadable images in column 'img' for: 1 id [105]",
                 "has no image (empty cell or no such file) in column 'img' for: 1 id [106]",
                 "non-finite values (inf) in columns ['weight'] for: 1 id [107]",
                 "cells that are not numbers (columns ['height']) for: 1 id [108]",
                 "empty label (column 'label') for: 1 id [109]",
                 "has no text (a missing cell in ['title', 'body']) for: 1 id [110]"):
        assert part in msg, f"{part!r} not in\n{msg}"
    assert err.value.problems["duplicate_id"] == [104]
    skipped = load_frame_splits(make_frame(t), on_error="skip", **KW)["train"].skipped
    assert skipped == {"duplicate_id": 1, "unreadable_image": 1, "missing_image": 1, "non_finite": 1,
                       "bad_value": 1, "missing_label": 1, "missing_text": 1}
    bad = table()
    bad["id"][0] = "x1"
    with pytest.raises(DataError, match=r"column 'id' must hold integer ids; 1 rows do not: \[\"row 0: 'x1'\"\]"):
        load_frame_splits(make_frame(bad), **KW)
    with pytest.raises(DataError, match=r"lacks column\(s\) 'nope' \(numeric_columns\)"):
        load_frame_splits(make_frame(table()), **{**KW, "numeric_columns": ["weight", "nope"]})


def test_frame_paths_split_column_and_optional_labels(tmp_path):
    (tmp_path / "im").mkdir()
    t = table(30)
    for i, b in zip(t["id"], t["img"]):
        (tmp_path / "im" / f"{i}.png").write_bytes(b)
    t["img"] = [f"im/{i}.png" for i in t["id"]]
    t["split"] = ["train"] * 20 + ["val"] * 5 + ["test"] * 4 + [None]   # the last id is in no split
    splits = load_frame_splits(make_frame(t), image_root=tmp_path, split_column="split", **KW)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 5, 4]
    assert splits["test"].ids == t["id"][25:29]
    # labels="optional": no label column -> items without "label"; an empty label -> -1
    t.pop("label")
    unl = load_frame_splits(make_frame(t), image_root=tmp_path, split_column="split", label_column=None,
                            labels="optional", **KW)
    assert "label" not in unl["test"][0] and unl["test"].has_labels is False
    with pytest.raises(ValueError, match="labels='optional'"):
        load_frame_splits(make_frame(t), image_root=tmp_path, label_column=None, **KW)
    t["label"] = ["a", "b"] * 12 + [""] * 6
    part = load_frame_splits(make_frame(t), image_root=tmp_path, split_column="split", labels="optional", **KW)
    assert part["test"].targets.tolist() == [-1] * 4 and part["train"].targets.tolist() == [0, 1] * 10


def test_hf_datasets_are_read_through_their_columns():
    t = table()
    # datasets' Image feature in its pandas view: {"bytes": ..., "path": ...}
    t["img"] = [{"bytes": b, "path": None} for b in t["img"]]
    a = load_frame_splits(MiniHFDataset(t), **KW)
    b = load_frame_splits(make_frame(table()), **KW)
    assert a["train"].ids == b["train"].ids
    assert torch.equal(a["train"][3]["image"], b["train"][3]["image"])
    assert torch.equal(a["val"][1]["numeric"], b["val"][1]["numeric"])


def _pokedex_columns(root: Path) -> dict:
    def rows(name):
        with open(root / name, newline="", encoding="utf-8") as f:
            return {int(r["id"]): r for r in csv.DictReader(f)}

    text, num, spl = rows("text.csv"), rows("numeric.csv"), rows("splits.csv")
    ids = sorted(spl)
    feats = [c for c in next(iter(num.values())) if c not in ("id", "label")]
    cols = {"id": ids, "image": [f"images/{i}.png" for i in ids], "text": [text[i]["text"] for i in ids],
            "label": [text[i]["label"] for i in ids], "split": [spl[i]["split"] for i in ids]}
    for c in feats:
        cols[c] = [float(num[i][c]) if num[i][c].strip() else float("nan") for i in ids]
    return cols, feats


@pytest.mark.data
@pytest.mark.slow
def test_pokedex_as_dataframe_trains_to_the_same_metrics_as_the_folder(pokedex_dir, tmp_path):
    from mmbridge import Trainer
    from mmbridge.train.build import build_model
    from mmbridge.train.config import load_config

    cfg = load_config(None, data={
        "data": {"root": str(pokedex_dir), "image_size": 32, "max_length": 32},
        "model": {"branches": {"image": {"encoder": {"type": "conv", "width": 8, "depth": 2}},
                               "text": {"encoder": {"type": "text", "dim": 32}},
                               "numeric": {"encoder": {"type": "mlp", "hidden": 32}}},
                  "fusion": "concat", "fusion_dim": 32},
        "training": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "precision": "fp32", "progress": False,
                     "seed": 0, "device": "cpu"},
        "output": {"tensorboard": False},
    })
    cols, feats = _pokedex_columns(pokedex_dir)
    sources = {
        "folder": load_splits(pokedex_dir, image_size=32, max_length=32),
        "frame": load_frame_splits(make_frame(cols), image_root=pokedex_dir, numeric_columns=feats,
                                   split_column="split", image_size=32, max_length=32),
    }
    results = {}
    for name, splits in sources.items():
        model = build_model(cfg, splits["train"])
        trainer = Trainer.from_config(model, splits["train"], splits["val"], cfg.training,
                                      cfg.output.__class__(dir=str(tmp_path / name), tensorboard=False))
        trainer.fit()
        results[name] = {**trainer.history[-1], **trainer.evaluate(splits["test"], prefix="test")}
    print("pokedex 2 epochs:", results)
    keys = [k for k in results["folder"] if k.startswith(("val/", "test/", "train/"))]
    assert keys and all(results["frame"][k] == results["folder"][k] for k in keys), results


# ------------------------------------------------------------------------------ tf.data
def _ids_per_rank(ds, world, epoch=0, batch_size=8):
    """What the Trainer's sampler gives each simulated rank (its DistributedSampler, as it builds it)."""
    out = []
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=False)
        sampler.set_epoch(epoch)
        batches = list(DataLoader(ds, batch_size=batch_size, sampler=sampler))
        out.append(([int(i) for b in batches for i in b["id"]], len(batches)))
    return out


@pytest.mark.tf
def test_tf_dataset_for_the_trainer_shards_exactly_with_an_unseeded_shuffle(tf):
    from mmbridge.data import tf_data_to_dataset

    def pipeline():
        ds = tf.data.Dataset.from_tensor_slices({"id": np.arange(200, dtype=np.int64),
                                                 "x": np.arange(200, dtype=np.float32)[:, None]})
        return ds.shuffle(200)  # unseeded: a different order in each copy (each rank)

    per_rank = [tf_data_to_dataset(pipeline()) for _ in range(2)]  # what rank 0 and rank 1 each build
    assert len(per_rank[0]) == 200 and per_rank[0].ids == list(range(200)) == per_rank[1].ids
    for epoch in (0, 1):
        (ids0, n0), _ = _ids_per_rank(per_rank[0], 2, epoch)
        _, (ids1, n1) = _ids_per_rank(per_rank[1], 2, epoch)
        assert n0 == n1 == 13 and not set(ids0) & set(ids1) and set(ids0) | set(ids1) == set(range(200))
        assert len(ids0) == len(ids1) == 100
    # a batched pipeline is unbatched first; 201 ids over 2 ranks: equal batches, one id padded (the sampler's rule)
    batched = tf.data.Dataset.from_tensor_slices({"id": np.arange(201, dtype=np.int64)}).shuffle(201).batch(16)
    ds = tf_data_to_dataset(batched)
    (ids0, n0), (ids1, n1) = _ids_per_rank(ds, 2)
    assert len(ds) == 201 and n0 == n1 and len(ids0) == len(ids1) == 101
    assert set(ids0) | set(ids1) == set(range(201)) and len(set(ids0) & set(ids1)) == 1
    with pytest.raises(ValueError, match="occur more than once"):
        tf_data_to_dataset(tf.data.Dataset.from_tensor_slices({"id": np.array([1, 2, 2])}))
    with pytest.raises(ValueError, match="infinite"):
        tf_data_to_dataset(tf.data.Dataset.from_tensor_slices({"id": np.arange(3)}).repeat())


@pytest.mark.tf
def test_tf_stream_has_len_and_equal_batch_counts(tf):
    from mmbridge.data import tf_data_to_torch

    ds = tf.data.Dataset.from_tensor_slices({"id": np.arange(7, dtype=np.int64)}).batch(1)  # 7 batches
    counts, seen = [], []
    for rank in (0, 1):
        it = tf_data_to_torch(ds, rank=rank, world_size=2)
        got = list(DataLoader(it, batch_size=None))
        counts.append((len(it), len(got)))
        seen.append([int(b["id"][0]) for b in got])
    assert counts == [(3, 3), (3, 3)] and seen == [[0, 2, 4], [1, 3, 5]]   # the 7th batch is dropped
    filtered = tf.data.Dataset.from_tensor_slices({"id": np.arange(10)}).filter(lambda e: e["id"] % 3 > 0)
    assert len(tf_data_to_torch(filtered, rank=0, world_size=2)) == 3   # 6 elements (counted once) // 2


@pytest.mark.tf
def test_trainer_runs_on_a_tf_dataset(tf, tmp_path):
    from mmbridge import Trainer, compose
    from mmbridge.data import tf_data_to_dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    ds = tf_data_to_dataset(tf.data.Dataset.from_tensor_slices(
        {"id": np.arange(64), "numeric": x, "label": y}).shuffle(64).batch(10))
    model = compose({"numeric": torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())}, num_classes=2,
                    fusion_dim=8, example_batch={"numeric": torch.zeros(2, 5)})
    trainer = Trainer(model, ds, ds, out_dir=str(tmp_path), epochs=2, batch_size=16, progress=False,
                      tensorboard=False, device="cpu")
    trainer.fit()
    assert len(trainer.history) == 2 and "val/top1" in trainer.history[-1]


@pytest.mark.tf
def test_trainer_takes_the_tf_dataset_itself_and_refuses_the_stream(tf, tmp_path):
    """Trainer(model, tf.data.Dataset) used to fail with "has no len()"; the stream is refused by name."""
    from mmbridge import ConfigError, Trainer, compose
    from mmbridge.data import tf_data_to_torch

    x = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
    pipeline = tf.data.Dataset.from_tensor_slices({"id": np.arange(32), "numeric": x,
                                                   "label": (x[:, 0] > 0).astype(np.int64)}).shuffle(32).batch(8)
    model = compose({"numeric": torch.nn.Linear(5, 8)}, num_classes=2, fusion_dim=8,
                    example_batch={"numeric": torch.zeros(2, 5)})
    trainer = Trainer(model, pipeline, pipeline, out_dir=str(tmp_path), epochs=1, batch_size=8, progress=False,
                      tensorboard=False, device="cpu")
    assert len(trainer.train_data) == 32 and trainer.train_data.ids == list(range(32))
    trainer.fit()
    assert len(trainer.history) == 1
    with pytest.raises(ConfigError, match="TFDataIterable cannot be sharded"):
        Trainer(model, tf_data_to_torch(pipeline), out_dir=str(tmp_path / "b"), progress=False, device="cpu")


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import mmbridge
    mmbridge.preload_torch_stack()
    import torch
    import torch.distributed as dist
    from mmbridge.export._tf import import_tensorflow
    tf = import_tensorflow()
    from mmbridge import Trainer, compose
    from mmbridge.data import tf_data_to_dataset
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    ds = tf_data_to_dataset(tf.data.Dataset.from_tensor_slices(
        {"id": np.arange(101), "numeric": x, "label": y}).shuffle(101).batch(8))   # unseeded, batched
    seen = []
    class Spy(torch.utils.data.Dataset):
        def __len__(self): return len(ds)
        def __getitem__(self, i):
            item = ds[i]; seen.append(int(item["id"])); return item
    model = compose({"numeric": torch.nn.Linear(4, 8)}, num_classes=2, fusion_dim=8,
                    example_batch={"numeric": torch.zeros(2, 4)})
    tr = Trainer(model, Spy(), None, out_dir=sys.argv[1], epochs=1, batch_size=8, progress=False,
                 tensorboard=False, device="cpu")
    seen.clear()  # the items the DDP find_unused_parameters dry run read while the Trainer was built
    tr.fit()
    got = [None, None]
    dist.all_gather_object(got, seen)
    # without ids, an unseeded shuffle gives each rank another order: refused on every rank
    try:
        tf_data_to_dataset(tf.data.Dataset.from_tensor_slices({"numeric": x}).shuffle(101), id_key=None)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    flags = [None, None]
    dist.all_gather_object(flags, refused)
    if rank == 0:
        with open(os.path.join(sys.argv[1], "ids.json"), "w") as f:
            json.dump({"ids": got, "refused": flags}, f)
    dist.destroy_process_group()
""")


@pytest.mark.tf
@pytest.mark.ddp
@pytest.mark.slow
def test_two_gloo_processes_train_on_a_tf_dataset(tf, tmp_path):
    script = tmp_path / "ddp_tf.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    out = json.loads((tmp_path / "ids.json").read_text())
    ids0, ids1 = out["ids"]
    assert all("the ranks read different elements" in r for r in out["refused"]), out["refused"]
    assert len(ids0) == len(ids1) == 51                      # 101 ids, one padded: 7 batches per rank
    assert set(ids0) | set(ids1) == set(range(101)) and len(set(ids0) & set(ids1)) == 1
