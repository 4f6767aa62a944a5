"""``framework: keras`` (mmbridge.baselines.keras_run): the TF-only baseline and the parts a hybrid reuses.

One small Keras run through the CLI (on the real pokedex data when it is beside the repo, at 32
pixels and 2 epochs; else on the built-in sample) is shared by the TF tests; its
``image_encoder.keras`` is then exported for fine-tuning and converted to torch. The config
checks need no TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mmbridge
from mmbridge.errors import ConfigError
from mmbridge.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
POKEDEX = REPO.parent / "shared" / "data" / "pokedex"


def _keras_cfg(root: str | None, out: Path) -> dict:
    return {
        "framework": "keras",
        "data": {"root": root, "image_size": 32, "max_length": 32, "tokenizer": "word"},
        "model": {"branches": {"image": {"encoder": {"type": "conv", "width": 8, "depth": 2}},
                               "text": {"encoder": {"type": "text", "kind": "gru", "dim": 16}},
                               "numeric": {"encoder": {"type": "mlp", "hidden": 16}}},
                  "fusion": "concat", "fusion_dim": 16, "modality_dropout": 0.1},
        "training": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "precision": "fp32", "progress": False,
                     "patience": 5, "seed": 0},
        "output": {"dir": str(out), "tensorboard": False, "name": "tf-only-test"},
    }


@pytest.fixture(scope="module")
def keras_run(keras, tmp_path_factory):
    """``mmbridge train`` (the CLI entry, in this process) of a tiny ``framework: keras`` config."""
    from mmbridge.cli.train import main

    tmp = tmp_path_factory.mktemp("keras_run")
    root = str(POKEDEX) if (POKEDEX / "text.csv").is_file() else None
    (tmp / "tf-only.yaml").write_text(yaml.safe_dump(_keras_cfg(root, tmp / "run")))
    assert main(["train", str(tmp / "tf-only.yaml")]) == 0
    return tmp / "run"


@pytest.mark.tf
def test_keras_run_writes_report_and_keras_parts(keras_run):
    rep = json.loads((keras_run / "report.json").read_text())
    row = rep["results"]["tf-only-test"]
    data = json.loads((keras_run / "data.json").read_text())
    n_classes = len(data["label_names"])
    keys = ["test/top1", "test/macro_f1", "val/top1", "val/macro_f1"] + (["test/top5"] if n_classes >= 5 else [])
    for k in keys:
        assert 0.0 <= row[k] <= 1.0, (k, row[k])  # fractions, shown as % in report.md
    if n_classes >= 5:
        assert row["test/top5"] >= row["test/top1"]
    assert row["test/loss"] > 0 and row["epochs"] == 2 and 1 <= row["best_epoch"] <= 2
    assert row["train_time_s"] > 0 and row["precision"] == "fp32" and row["world_size"] == 1
    assert any("framework: keras" in n for n in rep["notes"])
    assert "| tf-only-test |" in (keras_run / "report.md").read_text()
    assert load_config(keras_run / "config.yaml")["framework"] == "keras"
    for name in ("image_encoder.keras", "numeric_preprocess.keras"):
        assert (keras_run / name).stat().st_size > 0
    # the comparison table reads it like a torch run
    from mmbridge.train.metrics import compare_reports

    _, md = compare_reports([keras_run], keras_run / "cmp")
    assert "tf-only-test" in md.read_text()


@pytest.mark.tf
def test_saved_image_encoder_bridges_trainable_with_batchnorm(keras_run, keras, tmp_path):
    path = keras_run / "image_encoder.keras"
    art = mmbridge.export(str(path), trainable=True, cache_dir=tmp_path / "cache")  # in a child process
    tm = art.to_torch()
    model = keras.models.load_model(path, compile=False)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    bns = [m for m in tm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert n_bn == 2 and len(bns) == n_bn
    assert sum(p.numel() for p in tm.parameters()) == sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)  # NHWC in [-1, 1]
    ref = np.asarray(model(x, training=False))
    tm.eval()
    with torch.no_grad():
        out = tm(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (5, 16)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    # the adapted Normalization runs on onnxruntime as a frozen preprocess
    pre = mmbridge.export(str(keras_run / "numeric_preprocess.keras"), role="preprocess",
                          cache_dir=tmp_path / "cache", isolate=False).to_ort()
    kpre = keras.models.load_model(keras_run / "numeric_preprocess.keras", compile=False)
    xn = np.random.default_rng(1).normal(50, 30, (4, kpre.inputs[0].shape[1])).astype(np.float32)
    np.testing.assert_allclose(pre(torch.from_numpy(xn)).numpy(), np.asarray(kpre(xn)), rtol=1e-5, atol=1e-4)


def test_keras_framework_rejects_branches_without_keras_counterpart():
    data = {"framework": "keras", "data": {"root": None, "tokenizer": "minilm"},
            "model": {"branches": {"caption": {"encoder": {"type": "hf", "path": "minilm"},
                                               "input_keys": ["text", "text_mask"]},
                                   "image": {"encoder": {"type": "conv"}}},
                      "fusion": "attention"},
            "training": {"precision": "bf16"}}
    with pytest.raises(ConfigError) as err:
        load_config(None, data=data)
    msg = str(err.value)
    assert "model.branches.caption.encoder.type: 'hf' has no Keras equivalent" in msg and "'caption'" in msg
    assert "model.fusion: framework: keras supports only 'concat'" in msg
    assert "training.precision: framework: keras trains in fp32 only" in msg
    assert "model.branches.image" not in msg
    with pytest.raises(ConfigError, match="framework: must be one of"):
        load_config(None, ["framework=jax"], data={"model": {"branches": {"image": {"encoder": {"type": "conv"}}}}})


def test_hybrid_refuses_a_missing_tf_only_encoder_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overrides = ["data.root=null", f"model.branches.image.encoder.ref={tmp_path}/tf-only-s7/image_encoder.keras"]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "examples" / "pokedex" / "hybrid.yaml", overrides)
    msg = str(err.value)
    assert "model.branches.image.encoder.ref:" in msg and "image_encoder.keras' does not exist" in msg
    assert "run examples/pokedex/tf-only.yaml first" in msg and f"output.dir={tmp_path}/tf-only-s7" in msg
    # an existing Keras file is accepted as ref (the export runs later, in a child process)
    for part in ("image_encoder", "numeric_preprocess"):
        (tmp_path / f"{part}.keras").touch()
    cfg = load_config(REPO / "examples" / "pokedex" / "hybrid.yaml",
                      ["data.root=null", f"model.branches.image.encoder.ref={tmp_path}/image_encoder.keras",
                       f"model.branches.numeric.preprocess.ref={tmp_path}/numeric_preprocess.keras"])
    enc = cfg["model"]["branches"]["image"]["encoder"]
    assert enc["trainable_export"] is True and enc["backend"] == "torch"
    with pytest.raises(ConfigError, match="is a file but not a Keras model"):
        load_config(REPO / "examples" / "pokedex" / "hybrid.yaml",
                    ["data.root=null", f"model.branches.image.encoder.ref={REPO / 'README.md'}"])


def test_keras_runs_refuse_evaluate_and_torchrun(tmp_path, monkeypatch):
    from mmbridge.baselines.keras_run import run_keras
    from mmbridge.cli.train import run_evaluate

    cfg = load_config(None, data=_keras_cfg(None, tmp_path / "run"))
    with pytest.raises(ConfigError, match="read .*report.json"):
        run_evaluate(cfg, str(tmp_path / "best.pt"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="trains in one process"):
        run_keras(cfg)


def test_save_keras_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """No TF needed: any object with ``save(path)``; a failure at the rename keeps the old bytes."""
    import os

    from mmbridge.baselines.keras_run import save_keras_atomic

    class FakeModel:
        def __init__(self, payload: bytes):
            self.payload = payload

        def save(self, path):
            open(path, "wb").write(self.payload)

    target = tmp_path / "image_encoder.keras"
    save_keras_atomic(FakeModel(b"old"), target)
    assert target.read_bytes() == b"old"

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        save_keras_atomic(FakeModel(b"new"), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["image_encoder.keras"]  # the temporary is gone
    with pytest.raises(ValueError, match="must end in .keras"):
        save_keras_atomic(FakeModel(b"x"), tmp_path / "model.h5")


@pytest.mark.tf
def test_numeric_preprocess_centres_constant_columns_without_blowing_them_up(keras):
    from mmbridge.baselines.keras_run import numeric_preprocess

    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(5, 2, 1000), np.full(1000, 0.1), np.full(1000, 123.456)], 1).astype(np.float32)
    model = numeric_preprocess(keras, x)
    probe = np.array([[5.0, 0.2, 124.456]], np.float32)  # constant columns off by 0.1 and 1.0
    out = np.asarray(model(probe))
    np.testing.assert_allclose(out[0, 1:], [0.1, 1.0], atol=1e-5)  # centred, divided by 1 (Keras alone: 836)
    assert abs(out[0, 0]) < 0.2  # the varying column is standardised
