"""``mmbridge train`` under ``torchrun --nproc-per-node 2`` (gloo, CPU, bf16 autocast).

Each run is a real torchrun launch of the CLI (a subprocess), through a small wrapper that also
checks that TensorFlow never entered a training process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

WRAPPER = textwrap.dedent("""
    import sys
    from mmbridge.cli import main
    rc = main(sys.argv[1:])
    assert "tensorflow" not in sys.modules, "TensorFlow was imported by a training process"
    sys.exit(rc)
""")

SAMPLE_CFG = {
    "data": {"root": None, "image_size": 16, "max_length": 16},
    "model": {
        "branches": {"image": {"encoder": {"type": "conv", "width": 4, "depth": 2}},
                     "text": {"encoder": {"type": "text", "dim": 32}},
                     "numeric": {"encoder": {"type": "mlp", "hidden": 16}}},
        "fusion": "concat", "fusion_dim": 32, "modality_dropout": 0.1,
    },
    "training": {"epochs": 4, "batch_size": 8, "lr": 0.01, "precision": "bf16", "progress": False,
                 "restore_best": False, "seed": 0},
    "output": {"tensorboard": True},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, cfg: dict, *overrides: str, timeout: float = 240) -> str:
    """Run ``mmbridge train CFG overrides`` on 2 gloo processes; return the combined output."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    wrapper = tmp_path / "run_cli.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(wrapper), "train", str(cfg_path), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_ddp_loss_falls_and_resume_equals_uninterrupted(tmp_path):
    """Run A trains 4 epochs and keeps each epoch's checkpoint; run B (a new torchrun launch)
    resumes from A's first checkpoint, as a job preempted after it would, and must end with
    exactly A's weights. (A single-process test interrupts a run for real, test_trainer.py.)"""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    out = torchrun(tmp_path, SAMPLE_CFG, f"output.dir={full}", "training.keep_checkpoints=true")
    assert "2 processes, cpu, bf16" in out and "the built-in sample" in out
    state = torch.load(full / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # one RNG state per rank
    losses = [h["train/loss"] for h in state["history"]]
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    assert (full / "report.json").is_file() and (full / "report.md").is_file()

    first = torch.load(full / "epoch-0001.pt", weights_only=True)
    assert first["epoch"] == 1 and len(first["history"]) == 1
    assert not all(torch.equal(v, state["model"][k]) for k, v in first["model"].items())

    torchrun(tmp_path, SAMPLE_CFG, f"output.dir={resumed}", f"training.resume={full / 'epoch-0001.pt'}")
    a, b = state["model"], _weights(resumed / "last.pt")
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resumed run differs from the uninterrupted one in {mismatched}"
    again = torch.load(resumed / "last.pt", weights_only=True)
    assert [h["val/loss"] for h in again["history"]] == [h["val/loss"] for h in state["history"]]


@pytest.mark.data
def test_ddp_hybrid_on_pokedex_short(tmp_path, pokedex_dir):
    """Bridged TF preprocessing (exported in a child process, onnxruntime, frozen, outside DDP)
    + native image / text / numeric encoders on the real pokedex split, 2 short epochs."""
    cfg = {
        "data": {"root": str(pokedex_dir), "image_size": 32, "max_length": 48},
        "model": {
            "branches": {
                "image": {"preprocess": {"type": "export", "ref": "mmbridge.baselines.tf_models:image_preprocess", "backend": "ort",
                                         "name": "test_ddp_preprocess"},
                          "encoder": {"type": "conv", "width": 8, "depth": 3}},
                "text": {"encoder": {"type": "text", "dim": 32}},
                "numeric": {"encoder": {"type": "mlp", "hidden": 32}},
            },
            "fusion": "attention", "fusion_dim": 32, "fusion_kwargs": {"num_layers": 1},
        },
        "training": {"epochs": 2, "max_steps_per_epoch": 4, "batch_size": 16, "lr": 0.005, "precision": "bf16",
                     "progress": False, "restore_best": False, "scheduler": "none"},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    out = torchrun(tmp_path, cfg, timeout=300)
    assert f"data: {pokedex_dir} (565 train / 122 val / 122 test, 18 classes" in out
    assert "<- ORTModule" in out
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    losses = [h["train/loss"] for h in state["history"]]
    assert losses[1] < losses[0], losses
    assert state["extra"]["data"]["label_names"][:3] == sorted(state["extra"]["data"]["label_names"])[:3]
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    row = next(iter(report["results"].values()))
    assert {"test/top1", "test/top5", "test/macro_f1", "val/top1"} <= set(row)
    assert row["world_size"] == 2
