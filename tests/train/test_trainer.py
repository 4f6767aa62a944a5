"""Trainer in a single process on a tiny synthetic set: learning, exact resume, checkpoints, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

import mmbridge
from mmbridge.composition import Branch
from mmbridge.errors import CacheError, ConfigError
from mmbridge.train import checkpoint as ckpt_io
from mmbridge.train.encoders import ConvEncoder, MLPEncoder, TextEncoder
from mmbridge.train.metrics import markdown_table, write_report
from mmbridge.train.trainer import Trainer


class FakeMultimodal(Dataset):
    """Items in mmbridge.data's format; the label is recoverable from every modality."""

    def __init__(self, n: int = 64, num_classes: int = 5, size: int = 12, max_length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.num_features, self.vocab_size = num_classes, 4, 40
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.images = torch.randint(0, 60, (n, size, size, 3), generator=g, dtype=torch.uint8)
        for i, y in enumerate(self.labels.tolist()):
            self.images[i, :, :, y % 3] += 100 + 30 * (y // 3)
        self.mask = torch.ones(n, max_length, dtype=torch.int64)
        self.mask[:, max_length // 2:] = 0
        self.text = torch.randint(10, 40, (n, max_length), generator=g) * self.mask
        self.text[:, 0] = 1 + self.labels
        self.numeric = torch.randn(n, 4, generator=g)
        self.numeric[:, 0] += 1.5 * self.labels.float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"id": torch.tensor(i), "image": self.images[i], "text": self.text[i], "text_mask": self.mask[i],
                "numeric": self.numeric[i], "label": self.labels[i]}


def build(fusion: str = "concat", modality_dropout: float = 0.2) -> mmbridge.HybridModel:
    torch.manual_seed(0)
    return mmbridge.compose(
        {"image": ConvEncoder(4, 2), "text": Branch(TextEncoder(40, 16), input_keys=("text", "text_mask")),
         "numeric": MLPEncoder(4, 16)},
        fusion=fusion, num_classes=5, fusion_dim=16, modality_dropout=modality_dropout)


TRAIN, VAL = FakeMultimodal(64), FakeMultimodal(20, seed=1)
KW = dict(epochs=3, batch_size=8, lr=2e-2, progress=False, tensorboard=False, seed=3)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_and_metrics_are_logged(tmp_path):
    t = Trainer(build("gated"), TRAIN, VAL, out_dir=tmp_path, precision="bf16", **{**KW, "tensorboard": True})
    res = t.fit()
    losses = [h["train/loss"] for h in res["history"]]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.6 * losses[0], losses
    last = res["history"][-1]
    assert {"val/loss", "val/top1", "val/top5", "val/macro_f1", "lr"} <= set(last)
    assert last["val/top1"] >= 0.6  # 5 classes: chance is ~0.2
    assert res["best"] == max(h["val/top1"] for h in res["history"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "tensorboard"]  # no tmp files
    t.close()


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    """Interrupted mid-epoch right after its first checkpoint, then resumed in a new Trainer."""
    kw = dict(KW, precision="bf16", grad_accum=2, checkpoint_every_steps=2, epochs=2)  # 4 steps / epoch
    full = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "full", **kw)
    full.fit()

    run = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "cut", **kw)
    real_step = Trainer._optimizer_step

    def step_then_crash(self):
        real_step(self)
        if self.global_step == 3:  # one step after the first checkpoint (step 2)
            raise KeyboardInterrupt("simulated preemption")

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    saved = ckpt_io.load(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 4, 2)
    import shutil

    shutil.copy(tmp_path / "cut" / "last.pt", tmp_path / "mid_epoch.pt")

    resumed = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "cut", **kw)
    resumed.fit(resume="auto")
    assert resumed.global_step == full.global_step == 8
    assert _same(full.model.state_dict(), resumed.model.state_dict())
    assert _same(full.optimizer.state_dict()["state"][0], resumed.optimizer.state_dict()["state"][0])
    assert [h["val/loss"] for h in full.history] == [h["val/loss"] for h in resumed.history]

    # the same mid-epoch checkpoint under another epoch layout is refused, naming what changed
    other = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "other", **dict(kw, batch_size=4))
    with pytest.raises(ConfigError, match="batch_size 8 in the checkpoint vs 4 now"):
        other.load_checkpoint(tmp_path / "mid_epoch.pt")  # saved before the resumed run overwrote last.pt


def test_resume_at_epoch_boundary(tmp_path):
    kw = dict(KW, precision="fp32", epochs=2, keep_checkpoints=True)
    a = Trainer(build(), TRAIN, VAL, out_dir=tmp_path / "a", **kw)
    a.fit()
    b = Trainer(build(), TRAIN, VAL, out_dir=tmp_path / "b", **kw)
    b.fit(stop_after_epochs=1)
    assert b.epoch == 1 and sorted(p.name for p in (tmp_path / "b").glob("*.pt")) == ["best.pt", "epoch-0001.pt",
                                                                                      "last.pt"]
    # the stopped run's checkpoint is the uninterrupted run's first one, byte for byte in its tensors
    assert _same(ckpt_io.load(tmp_path / "b" / "last.pt")["model"], ckpt_io.load(tmp_path / "a" / "epoch-0001.pt")["model"])
    assert not _same(b.model.state_dict(), a.model.state_dict())
    c = Trainer(build(), TRAIN, VAL, out_dir=tmp_path / "b", **kw)
    c.fit(resume=tmp_path / "b" / "last.pt")
    assert _same(a.model.state_dict(), c.model.state_dict())


def test_checkpoint_is_weights_only_loadable_and_complete(tmp_path):
    t = Trainer(build(), TRAIN, None, out_dir=tmp_path, precision="fp16", **dict(KW, epochs=1))
    t.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "scheduler", "epoch", "global_step", "rng", "history"} <= set(state)
    assert state["scaler"]["scale"] > 0  # fp16 -> a real GradScaler state
    assert isinstance(state["rng"][0]["torch"], torch.Tensor) and state["rng"][0]["numpy"]["keys"].numel() == 624
    with pytest.raises(CacheError, match="does not exist"):
        ckpt_io.load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CacheError, match="weights_only=True"):
        ckpt_io.load(tmp_path / "bad.pt")


def test_early_stopping_stops_after_patience(tmp_path):
    t = Trainer(build(), TRAIN, VAL, out_dir=tmp_path, **dict(KW, epochs=20, lr=1e-9, patience=2,
                                                              monitor="val/loss", scheduler="none"))
    res = t.fit()
    # lr ~ 0: val/loss never improves after epoch 1 by more than float noise, or not at all
    assert res["stopped_early"] and res["epochs_run"] < 20
    assert res["epochs_run"] - res["best_epoch"] == 2
    assert t.mode == "min"


def test_evaluate_matches_hand_computed_metrics(tmp_path):
    t = Trainer(build(), TRAIN, VAL, out_dir=tmp_path, **dict(KW, epochs=1))
    t.fit()
    res = t.evaluate(VAL, "test", batch_size=7)
    model = t.model.eval()
    batch = {k: torch.stack([VAL[i][k] for i in range(len(VAL))]) for k in VAL[0]}
    with torch.no_grad():
        logits = model(batch)
    y = batch["label"]
    top1 = (logits.argmax(1) == y).float().mean().item()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert res["test/top1"] == pytest.approx(top1)
    assert res["test/top5"] == pytest.approx(top5) and top5 == 1.0  # C = 5
    assert res["test/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert 0 <= res["test/macro_f1"] <= 1


def test_trainer_rejects_bad_arguments_all_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        Trainer(build(), TRAIN, out_dir=tmp_path, precision="fp8", scheduler="step", grad_accum=0)
    msg = str(err.value)
    assert "precision='fp8'" in msg and "scheduler='step'" in msg and "grad_accum=0" in msg


def test_report_json_and_markdown(tmp_path):
    rows = {"image only": {"test/top1": 0.5, "test/macro_f1": 0.25, "train_time_s": 3.0},
            "fusion": {"test/top1": [0.8, 0.9, 0.7], "test/macro_f1": 0.5}}
    j, m = write_report(rows, tmp_path, title="cmp", notes=["data: x"])
    assert json.loads(j.read_text())["results"]["fusion"]["test/top1"] == [0.8, 0.9, 0.7]
    md = m.read_text()
    assert "| image only | 50.0 | 25.0 | 3 |" in md
    assert "| fusion | 80.0 ± 10.0 | 50.0 | – |" in md
    assert markdown_table(rows).count("\n") == 4


def test_compare_reports_merges_runs_side_by_side(tmp_path):
    from mmbridge.train.metrics import compare_reports

    write_report({"fusion": {"test/top1": 0.8}}, tmp_path / "s0")
    write_report({"fusion": {"test/top1": 0.6}}, tmp_path / "s1")
    write_report({"text only": {"test/top1": 0.5}}, tmp_path / "t")
    _, md = compare_reports([tmp_path / "s0", tmp_path / "s1", tmp_path / "t"], tmp_path / "cmp")
    text = md.read_text()
    assert "| fusion | 70.0 ± 14.1 |" in text and "| text only | 50.0 |" in text
    with pytest.raises(FileNotFoundError, match="nope"):
        compare_reports([tmp_path / "nope"], tmp_path / "cmp")
    from mmbridge.train.metrics import main

    assert main([str(tmp_path / "cmp2"), str(tmp_path / "s0"), str(tmp_path / "t"), "--title", "T"]) == 0
    assert "| fusion | 80.0 |" in (tmp_path / "cmp2" / "comparison.md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_amp_training_learns_and_resumes(tmp_path, precision):
    kw = dict(KW, precision=precision, device="cuda", epochs=2, deterministic=True)
    a = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "a", **kw)
    res = a.fit()
    assert next(a.model.parameters()).device.type == "cuda"
    assert res["history"][1]["train/loss"] < res["history"][0]["train/loss"]
    b = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "b", **kw)
    b.fit(stop_after_epochs=1)
    c = Trainer(build("attention"), TRAIN, VAL, out_dir=tmp_path / "b", **kw)
    c.fit(resume="auto")
    assert _same(a.model.state_dict(), c.model.state_dict())


def test_text_and_checkpoint_writes_are_atomic_and_keep_the_usual_mode(tmp_path, monkeypatch):
    import os
    import stat

    path = ckpt_io.write_text_atomic(tmp_path / "report.json", '{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    ckpt = ckpt_io.save_atomic({"model": {}}, tmp_path / "last.pt")
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o666 & ~umask

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt_io.write_text_atomic(tmp_path / "report.json", '{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "report.json"]  # no temporary left


def test_trainer_asks_the_task_head_for_loss_metrics_and_monitor(tmp_path):
    from mmbridge.composition import TaskHead, task_heads
    from mmbridge.composition.heads import ClassificationHead

    assert ClassificationHead.monitor == "val/top1" and ClassificationHead.metric_mode("val/loss") == "min"
    calls = []

    @task_heads.register("smoothed_classification_test")
    class Smoothed(ClassificationHead):
        monitor = "val/macro_f1"

        @classmethod
        def loss(cls, out, target):
            calls.append(1)
            return torch.nn.functional.cross_entropy(out, target, label_smoothing=0.1)

    try:
        torch.manual_seed(0)
        model = mmbridge.compose({"numeric": MLPEncoder(4, 16)}, task="smoothed_classification_test", num_classes=5,
                                 fusion_dim=16)
        t = Trainer(model, TRAIN, VAL, out_dir=tmp_path, **dict(KW, epochs=1))
        assert isinstance(t.task_head, Smoothed) and t.monitor == "val/macro_f1" and t.mode == "max"
        t.fit()
        assert calls and "val/macro_f1" in t.history[-1]
        # a plain nn.Module without a head: the registered head named by task= gives the contract
        assert Trainer(model, TRAIN, out_dir=tmp_path / "r", task="regression", **KW).task_head is task_heads.get("regression")
        with pytest.raises(ConfigError, match="task='regresion' is not a registered task head"):
            Trainer(model, TRAIN, out_dir=tmp_path, task="regresion", **KW)
        assert issubclass(task_heads.get("regression"), TaskHead)
    finally:
        task_heads.unregister("smoothed_classification_test")
