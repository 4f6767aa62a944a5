"""mmbridge predict / load_run, labels="optional" in the data layer, explicit resume, CLI flags.

Most tests train a small native run (text bag + numeric MLP + conv image, fp32, 2 epochs) on the
built-in sample in a few seconds; the demo test (TF export in a child process) is ``slow``/``tf``.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmbridge.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def _native_config(out: Path, **training) -> dict:
    return {
        "data": {"root": None, "image_size": 32, "tokenizer": "word", "max_length": 48},
        "model": {"branches": {"image": {"encoder": {"type": "conv", "width": 8, "depth": 2}},
                               "text": {"encoder": {"type": "text", "kind": "bag", "dim": 32}},
                               "numeric": {"encoder": {"type": "mlp", "hidden": 32}}},
                  "fusion": "attention", "fusion_dim": 32, "fusion_kwargs": {"num_layers": 1, "num_heads": 4}},
        "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "progress": False,
                     "device": "cpu", **training},
        "output": {"dir": str(out), "tensorboard": False},
    }


def _train(cfg: dict, **kw):
    from mmbridge.train.config import load_config
    from mmbridge.train.run import run_train

    return run_train(load_config(None, data=cfg), **kw)


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "run"
    _train(_native_config(out))
    return out


def strip_labels(src: Path, dst: Path, split: str = "test", *, drop_column: bool = True) -> list[int]:
    """Copy the ``split`` ids of ``src`` to ``dst`` without labels (text.csv: no label column;
    numeric.csv: empty label cells; no splits.csv). Returns the ids."""
    with open(src / "splits.csv", newline="") as f:
        ids = sorted(int(r["id"]) for r in csv.DictReader(f) if r["split"] == split)
    keep = {str(i) for i in ids}
    (dst / "images").mkdir(parents=True)
    for p in (src / "images").iterdir():
        if p.stem in keep:
            shutil.copy(p, dst / "images" / p.name)
    for name in ("text.csv", "numeric.csv"):
        with open(src / name, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r["id"] in keep]
            header = list(reader.fieldnames)
        if name == "text.csv" and drop_column:
            header = [h for h in header if h != "label"]
            rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
        else:
            rows = [{**r, "label": ""} for r in rows]
        with open(dst / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
    return ids


def _labels_of(src: Path, ids: list[int]) -> dict[int, str]:
    with open(src / "text.csv", newline="") as f:
        return {int(r["id"]): r["label"] for r in csv.DictReader(f) if int(r["id"]) in set(ids)}


# -- data layer: labels="optional" ---------------------------------------------------------------
def test_rows_without_labels_load_with_labels_optional_and_are_refused_by_default(tmp_path):
    from mmbridge.data import MultimodalDataset, load_splits, sample_dir

    ids = strip_labels(sample_dir(), tmp_path / "rows")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        MultimodalDataset.from_folder(tmp_path / "rows", image_size=32)
    strip_labels(sample_dir(), tmp_path / "empty", drop_column=False)  # the label columns there, but empty
    with pytest.raises(DataError, match="has an empty label for"):
        MultimodalDataset.from_folder(tmp_path / "empty", image_size=32)

    train = load_splits(sample_dir(), image_size=32)["train"]
    for folder in ("rows", "empty"):
        ds = MultimodalDataset.from_folder(tmp_path / folder, image_size=32, tokenizer=train.tokenizer,
                                           label_map=train.label_map, stats=train.stats, labels="optional")
        assert ds.ids == ids and ds.label_names == train.label_names
        assert (ds.targets == -1).all() and not ds.has_labels and "label" not in ds[0]  # no label at all
        assert ds[0]["text"].shape == (64,) and ds.num_features == train.num_features
    with pytest.raises(ValueError, match=r"labels must be one of \['required', 'optional'\]"):
        MultimodalDataset.from_folder(tmp_path / "rows", image_size=32, labels="maybe")


def test_labels_optional_keeps_given_labels_and_checks_them(tmp_path):
    from mmbridge.data import MultimodalDataset, load_splits, sample_dir

    train = load_splits(sample_dir(), image_size=32)["train"]
    ds = MultimodalDataset.from_folder(sample_dir(), split="test", image_size=32, tokenizer=train.tokenizer,
                                       label_map=train.label_map, stats=train.stats, labels="optional")
    ref = load_splits(sample_dir(), image_size=32)["test"]
    assert ds.ids == ref.ids and (ds.targets == ref.targets).all()


# -- load_run / predict / evaluate ---------------------------------------------------------------
def test_load_run_predicts_rows_without_labels_with_the_top1_evaluate_reports(native_run, tmp_path):
    import mmbridge
    from mmbridge.data import sample_dir

    run = mmbridge.load_run(native_run)
    assert not run.model.training and run.checkpoint.name == "best.pt"
    assert run.label_names == ["Electric", "Fire", "Grass", "Water"]
    ids = strip_labels(sample_dir(), tmp_path / "rows")
    pred = run.predict(tmp_path / "rows", as_frame=False)
    assert [r["id"] for r in pred] == ids
    assert set(pred[0]) == {"id", "label", "p_Electric", "p_Fire", "p_Grass", "p_Water"}
    assert abs(sum(v for k, v in pred[0].items() if k.startswith("p_")) - 1) < 1e-5
    truth = _labels_of(sample_dir(), ids)
    top1 = sum(r["label"] == truth[r["id"]] for r in pred) / len(pred)
    ev = run.evaluate()
    assert top1 == pytest.approx(ev["test"]["test/top1"], abs=1e-6)
    # the same on a labelled folder passed in, and per row against the test split's logits
    ids2, logits = run.logits(sample_dir())
    by_id = dict(zip(ids2, logits.argmax(-1).tolist()))
    assert all(run.label_names[by_id[r["id"]]] == r["label"] for r in pred)
    frame = run.predict(tmp_path / "rows")
    if importlib.util.find_spec("pandas") is not None:
        assert list(frame["id"]) == ids and list(frame["label"]) == [r["label"] for r in pred]


def test_predict_cli_writes_a_csv(native_run, tmp_path):
    from mmbridge.cli import main
    from mmbridge.data import sample_dir

    ids = strip_labels(sample_dir(), tmp_path / "rows")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(native_run), "--data", str(tmp_path / "rows"), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == ids and rows[0]["label"] in ("Electric", "Fire", "Grass", "Water")


def test_load_run_refuses_a_folder_without_a_run(tmp_path):
    import mmbridge

    with pytest.raises(ConfigError, match="holds no best.pt / last.pt"):
        mmbridge.load_run(tmp_path)


# -- resume is explicit -----------------------------------------------------------------------
def test_a_different_config_in_an_existing_run_dir_is_refused_with_the_diff(native_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(native_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    cfg = _native_config(out, lr=1e-2, epochs=3)
    with pytest.raises(ConfigError) as err:
        _train(cfg)
    msg = str(err.value)
    assert "training.lr: 0.003 -> 0.01" in msg and "training.epochs: 2 -> 3" in msg and "--resume" in msg
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written
    # explicit: resumes from last.pt (epoch 2 of 3) and records the old config beside the new one
    res = _train(cfg, allow_config_change=True)
    assert len(res["fit"]["history"]) == 3 and res["fit"]["epochs_run"] == 1
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert "lr: 0.003" in (out / "config.previous.yaml").read_text()


def test_the_same_config_resumes_as_before(native_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(native_run, out)
    res = _train(_native_config(out))
    assert res["fit"]["epochs_run"] == 0 and len(res["fit"]["history"]) == 2  # already finished


def test_resuming_another_models_checkpoint_is_refused_before_anything_is_written(native_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(native_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    cfg = _native_config(out)
    cfg["model"]["fusion_dim"] = 64
    with pytest.raises(ConfigError, match=r"cannot resume from .*last.pt: it holds another model's weights.*shape"):
        _train(cfg, allow_config_change=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_train_cli_resume_flag_and_training_resume_override_are_explicit(monkeypatch, tmp_path):
    import mmbridge.cli.train as cli_train
    from mmbridge.cli import main

    seen = []
    monkeypatch.setattr(cli_train, "run_train", lambda cfg, **kw: seen.append((cfg.training.resume, kw)))
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_native_config(tmp_path / "o")))
    assert main(["train", str(cfg_path)]) == 0
    assert main(["train", str(cfg_path), "--resume"]) == 0
    assert main(["train", str(cfg_path), "training.resume=auto"]) == 0
    assert main(["train", str(cfg_path), "--resume", "x/last.pt", "training.lr=0.1"]) == 0
    assert main(["train", str(cfg_path), "--quiet"]) == 0
    q = {"quiet": False}
    assert seen == [("auto", {"allow_config_change": False, **q}), ("auto", {"allow_config_change": True, **q}),
                    ("auto", {"allow_config_change": True, **q}), ("x/last.pt", {"allow_config_change": True, **q}),
                    ("auto", {"allow_config_change": False, "quiet": True})]


# -- CLI flags do what they say -----------------------------------------------------------------
@pytest.mark.parametrize("order", ["overrides_last", "overrides_first", "mixed"])
def test_evaluate_takes_overrides_before_or_after_the_options(monkeypatch, tmp_path, order):
    import yaml

    import mmbridge.cli.train as cli_train
    from mmbridge.cli import main

    seen = {}

    def fake(cfg, checkpoint, *, out=None, splits_to_eval=()):
        seen.update(lr=cfg.training.lr, bs=cfg.training.batch_size, ckpt=checkpoint, splits=splits_to_eval)
        return {}

    monkeypatch.setattr(cli_train, "run_evaluate", fake)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_native_config(tmp_path / "o")))
    argv = {"overrides_last": [str(cfg_path), "--checkpoint", "P.pt", "training.lr=0.5", "training.batch_size=4"],
            "overrides_first": [str(cfg_path), "training.lr=0.5", "training.batch_size=4", "--checkpoint", "P.pt"],
            "mixed": [str(cfg_path), "training.lr=0.5", "--checkpoint", "P.pt", "--split", "test",
                      "training.batch_size=4"]}[order]
    assert main(["evaluate", *argv]) == 0
    assert seen["lr"] == 0.5 and seen["bs"] == 4 and seen["ckpt"] == "P.pt"


def test_unknown_arguments_are_still_refused(capsys):
    from mmbridge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "c.yaml", "--checkpoint", "P", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_demo_epochs_must_be_at_least_one(capsys, bad):
    from mmbridge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", bad])
    assert exc.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_run_demo_refuses_zero_epochs_instead_of_training_eight():
    from mmbridge.demo import run_demo

    with pytest.raises(ConfigError, match="epochs must be a whole number >= 1"):
        run_demo(epochs=0)


# -- the demo (TF export in a child process) ---------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("TensorFlow / tf2onnx are not installed (install mmbridge[tf])")
    out = tmp_path_factory.mktemp("demo") / "run"
    code = textwrap.dedent(f"""
        from mmbridge.cli import main
        raise SystemExit(main(["demo", "--epochs", "2", "--out", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


@pytest.mark.tf
@pytest.mark.slow
def test_demo_run_predicts_the_top1_evaluate_reports(demo_run, tmp_path):
    import mmbridge
    from mmbridge.data import sample_dir

    run = mmbridge.load_run(demo_run)
    assert type(run.model.branches["image"].preprocess).__name__ == "ORTModule"
    ids = strip_labels(sample_dir(), tmp_path / "rows")
    pred = run.predict(tmp_path / "rows", as_frame=False)
    truth = _labels_of(sample_dir(), ids)
    top1 = sum(r["label"] == truth[r["id"]] for r in pred) / len(pred)
    ev = run.evaluate()
    assert top1 == pytest.approx(ev["test"]["test/top1"], abs=1e-6)
    ids2, logits = run.logits(sample_dir())
    by_id = dict(zip(ids2, logits.argmax(-1).tolist()))
    assert all(run.label_names[by_id[r["id"]]] == r["label"] for r in pred)
    assert torch.isfinite(logits).all()
