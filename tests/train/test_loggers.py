"""Experiment loggers (mmbridge.train.loggers): TensorBoard, W&B offline, MLflow (a stand-in module).

W&B is installed in CI (the ``[wandb]`` extra) and runs with ``mode="offline"``: the test reads the
run's ``.wandb`` record file back. MLflow is not installed (its dependency tree is large: Flask,
SQLAlchemy, pandas, pyarrow, ...): a stand-in ``mlflow`` module records the client calls, and the
test asserts them.
"""

from __future__ import annotations

import glob
import json
import struct
import sys
import types

import pytest
import yaml

import mmbridge  # noqa: F401 - first (import order)
from mmbridge.errors import ConfigError
from mmbridge.train.config import load_config

TINY = {
    "data": {"root": None, "image_size": 16, "max_length": 16, "modalities": ["text", "numeric"]},
    "model": {"branches": {"text": {"encoder": {"type": "text", "dim": 16}},
                           "numeric": {"encoder": {"type": "mlp", "hidden": 16}}},
              "fusion": "concat", "fusion_dim": 16},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.01, "precision": "fp32", "progress": False,
                 "log_every": 1, "seed": 0},
}


def _cfg(tmp_path, **output):
    return {**TINY, "output": {"dir": str(tmp_path / "run"), **output}}


def test_unknown_logger_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, data=_cfg(tmp_path, loggers=["tensorbord"]))
    msg = str(err.value)
    assert "output.loggers: unknown logger 'tensorbord'" in msg
    assert "['mlflow', 'tensorboard', 'wandb']" in msg


def test_missing_package_names_the_pip_command_at_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed, whether it is or not
    with pytest.raises(ConfigError) as err:
        load_config(None, data=_cfg(tmp_path, loggers=["tensorboard", "mlflow"],
                                    logger_options={"mlflow": {"experiment": "x", "bogus": 1}}))
    msg = str(err.value)
    assert "'mlflow' needs the 'mlflow' package, which is not installed: pip install \"mmbridge[mlflow]\"" in msg
    assert "output.logger_options.mlflow: unknown key(s) ['bogus']" in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_logger_options_for_an_unlisted_logger_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"logger_options.wandb: options for a logger not in output.loggers"):
        load_config(None, data=_cfg(tmp_path, loggers=["tensorboard"], logger_options={"wandb": {"mode": "offline"}}))


class _FakeMlflow:
    """A stand-in ``mlflow`` module: ``mlflow.tracking.MlflowClient`` recording every call."""

    def __init__(self):
        self.calls: list[tuple] = []
        fake = self

        class Client:
            def __init__(self, tracking_uri):
                fake.calls.append(("client", tracking_uri))

            def get_experiment_by_name(self, name):
                fake.calls.append(("get_experiment_by_name", name))
                return None

            def create_experiment(self, name):
                fake.calls.append(("create_experiment", name))
                return "7"

            def create_run(self, exp_id, tags):
                fake.calls.append(("create_run", exp_id, dict(tags)))
                return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

            def log_metric(self, run_id, key, value, step=0):
                fake.calls.append(("metric", run_id, key, value, step))

            def log_param(self, run_id, key, value):
                fake.calls.append(("param", run_id, key, value))

            def log_artifact(self, run_id, path):
                fake.calls.append(("artifact", run_id, path))

            def set_terminated(self, run_id):
                fake.calls.append(("terminated", run_id))

        self.module = types.ModuleType("mlflow")
        self.module.tracking = types.SimpleNamespace(MlflowClient=Client)


def _wandb_records(run_dir):
    """The history / summary / config records of an offline W&B run (its ``run-*.wandb`` file).

    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records
    ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last) | data``, each a
    ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    b = open(path, "rb").read()
    assert b[:4] == b":W&B"
    block, pos, part, datas = 32768, 7, b"", []
    while pos + 7 <= len(b):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        data, pos = b[pos:pos + n], pos + n
        if kind == 1:
            datas.append(data)
        elif kind == 2:
            part = data
        elif kind == 3:
            part += data
        elif kind == 4:
            datas.append(part + data)
    history, summary, config = [], {}, {}
    for d in datas:
        r = pb.Record()
        r.ParseFromString(d)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for u in r.summary.update:
                summary["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
        elif kind in ("config", "run"):
            items = r.config.update if kind == "config" else r.run.config.update
            for u in items:
                config["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
    return history, summary, config


def test_run_logs_to_tensorboard_wandb_offline_and_mlflow(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="the [wandb] extra (installed in CI by .ci/run)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmbridge.train.run import run_train

    fake = _FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake.module)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, data=_cfg(tmp_path, loggers=["tensorboard", "wandb", "mlflow"],
                                      logger_options={"wandb": {"mode": "offline", "project": "mmb-test"},
                                                      "mlflow": {"experiment": "mmb-test"}}))
    res = run_train(cfg)
    run = tmp_path / "run"
    hist = res["fit"]["history"]
    assert len(hist) == 2
    last_step = max(c[4] for c in fake.calls if c[0] == "metric" and c[2] == "train/loss_step")

    # TensorBoard: the epoch records and the step loss, read back from the event files
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == [1, 2]
    assert [v for _, v in tb_loss] == pytest.approx([h["train/loss"] for h in hist], rel=1e-6)
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx([h["val/top1"] for h in hist], rel=1e-6)
    assert acc.Scalars("test/top1")[0].value == pytest.approx(res["test"]["test/top1"], rel=1e-6)
    assert (run / "tensorboard" / "hparams").is_dir()

    # W&B offline: history rows per epoch, the test metrics in the summary, hparams in the config
    import wandb

    wandb.teardown()  # the W&B service process writes the run file: wait for it to exit
    history, summary, config = _wandb_records(run)
    epochs = [h for h in history if "train/loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["train/loss"] for h in epochs] == pytest.approx([h["train/loss"] for h in hist], rel=1e-6)
    assert [h["val/top1"] for h in epochs] == pytest.approx([h["val/top1"] for h in hist], rel=1e-6)
    assert summary["test/top1"] == pytest.approx(res["test"]["test/top1"], rel=1e-6)
    assert summary["val/loss"] == pytest.approx(res["val"]["val/loss"], rel=1e-6)
    assert summary["epoch"] == 2 and summary["optimizer_step"] == last_step
    assert max(h["optimizer_step"] for h in history if "train/loss_step" in h) == last_step
    assert config.get("hparams/lr") == pytest.approx(0.01) or config.get("hparams", {}).get("lr") == pytest.approx(0.01)
    assert config.get("training/epochs", config.get("training", {}).get("epochs")) == 2

    # MLflow (stand-in): the run, per-epoch metrics at step = epoch, params, artifacts, terminated
    assert fake.calls[0] == ("client", (run.resolve() / "mlruns").as_uri())
    assert ("create_experiment", "mmb-test") in fake.calls
    mlf_loss = [(c[4], c[3]) for c in fake.calls if c[0] == "metric" and c[2] == "train/loss"]
    assert [s for s, _ in mlf_loss] == [1, 2]
    assert [v for _, v in mlf_loss] == pytest.approx([h["train/loss"] for h in hist], rel=1e-9)
    params = {c[2]: c[3] for c in fake.calls if c[0] == "param"}
    assert params["lr"] == 0.01 and params["epochs"] == 2 and params["branches"] == "text,numeric"
    arts = sorted(c[2].rsplit("/", 1)[-1] for c in fake.calls if c[0] == "artifact")
    assert "report.md" in arts and "report.json" in arts and "learning_curve.png" in arts
    assert fake.calls[-1] == ("terminated", "r1")


def test_yaml_round_trip_keeps_loggers(tmp_path):
    cfg = load_config(None, data=_cfg(tmp_path, loggers=["tensorboard"], logger_options={}))
    from mmbridge.train.config import dump

    again = yaml.safe_load(dump(cfg))
    assert again["output"]["loggers"] == ["tensorboard"] and again["output"]["logger_options"] == {}
