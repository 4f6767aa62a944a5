"""Scale-out as the cluster examples run it (examples/slurm/train.sbatch, examples/kubeflow/pytorchjob.yaml).

1. ``mmbridge prepare CONFIG --out ART`` exports the TF parts once (TensorFlow in a child process)
   and writes ``ART/train.yaml`` with ``{type: artifact, path: ...}`` components;
2. training from that config runs with TensorFlow made unimportable (as in a pod without it), and
   a resubmission into the same ``output.dir`` resumes from ``last.pt``;
3. two ``torchrun --nnodes 2 --nproc-per-node 1`` launches (c10d rendezvous on 127.0.0.1) train it
   on gloo: both ranks finish, see disjoint ids that cover the train split, and end with identical
   weights; only rank 0 logs.

Model build progress lines (one per step on stderr, cache hit / miss, seconds) are checked on the
way (``mmbridge: build ...``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import mmbridge  # noqa: F401 - first (import order)

pytestmark = [pytest.mark.tf]

CFG = {
    "data": {"root": None, "image_size": 16, "max_length": 16, "modalities": ["image", "numeric"]},
    "model": {
        "branches": {
            # the export README.md's example makes too (same options: one cache entry per test session)
            "image": {"preprocess": {"type": "export", "ref": "mmbridge.baselines.tf_models:image_preprocess",
                                     "backend": "ort"},
                      "encoder": {"type": "conv", "width": 4, "depth": 2}},
            "numeric": {"encoder": {"type": "mlp", "hidden": 8}},
        },
        "fusion": "concat", "fusion_dim": 16,
    },
    "training": {"epochs": 2, "batch_size": 8, "lr": 0.01, "precision": "fp32", "progress": False,
                 "restore_best": False, "seed": 0},
    "output": {"dir": "runs/unused"},
}

#: a training process in a "pod without TensorFlow": importing tensorflow / keras / tf2onnx fails
NO_TF = textwrap.dedent("""
    import sys
    BLOCKED = ("tensorflow", "keras", "tf_keras", "tf2onnx")
    for name in BLOCKED:  # as if not installed: `import` raises ModuleNotFoundError, find_spec says None
        sys.modules[name] = None
    def tf_loaded():
        return sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED and mod is not None)
""")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``mmbridge prepare`` of :data:`CFG` (one TF export, in a child process) -> (dir, stderr)."""
    from mmbridge.cli import main

    tmp = tmp_path_factory.mktemp("scaleout")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    art = tmp / "artifacts"
    import contextlib
    import io

    err = io.StringIO()
    tf_before = "tensorflow" in sys.modules  # earlier tests of the same process may have loaded it
    with contextlib.redirect_stderr(err):
        assert main(["prepare", str(tmp / "cfg.yaml"), "--out", str(art)]) == 0
    if not tf_before:
        assert "tensorflow" not in sys.modules  # the export ran in a child process
    return tmp, err.getvalue()


def test_prepare_writes_artifacts_and_a_config_that_loads_them(prepared):
    tmp, err = prepared
    art = tmp / "artifacts"
    cfg = yaml.safe_load((art / "train.yaml").read_text())
    pre = cfg["model"]["branches"]["image"]["preprocess"]
    assert pre == {"type": "artifact", "path": str(art.resolve() / "image.preprocess"), "backend": "ort"}
    assert (art / "image.preprocess" / "model.onnx").is_file()
    assert cfg["model"]["branches"]["image"]["encoder"]["type"] == "conv"  # untouched
    (line,) = [ln for ln in err.splitlines() if ln.startswith("mmbridge: prepare model.branches.image.preprocess")]
    assert "exported in a child process in" in line or "cache hit" in line


def test_build_progress_lines_name_each_step_and_the_cache_outcome(prepared, capsys):
    from mmbridge.train.build import build_data, build_model
    from mmbridge.train.config import load_config

    tmp, _ = prepared
    cfg = load_config(tmp / "cfg.yaml")
    train = build_data(cfg)["train"]
    capsys.readouterr()
    tf_before = "tensorflow" in sys.modules  # earlier tests of the same process may have loaded it
    build_model(cfg, train, progress=True)  # the same export again: a cache hit without TF
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mmbridge: ")]
    assert len(lines) == 4, lines  # image preprocess, image encoder, numeric encoder, compose
    assert lines[0].startswith("mmbridge: build model.branches.image.preprocess (export "
                               "mmbridge.baselines.tf_models:image_preprocess -> ort): cache hit (reference, no "
                               "TensorFlow) in ")
    assert lines[1].startswith("mmbridge: build model.branches.image.encoder (conv): ") and lines[1].endswith(" s")
    assert lines[2].startswith("mmbridge: build model.branches.numeric.encoder (mlp): ")
    assert lines[3].startswith("mmbridge: build compose (2 branches, concat fusion, classification): ")
    if not tf_before:
        assert "tensorflow" not in sys.modules
    build_model(cfg, train)  # progress off (the default of the library call; `--quiet` on the CLI)
    assert "mmbridge: " not in capsys.readouterr().err


def test_prepared_config_trains_without_tensorflow_and_resubmission_resumes(prepared):
    tmp, _ = prepared
    cfg = str(tmp / "artifacts" / "train.yaml")
    out = tmp / "run-notf"
    code = NO_TF + textwrap.dedent(f"""
        from mmbridge.cli import main
        # the first job is preempted after epoch 1 (stop_after_epochs), the resubmitted one resumes
        assert main(["train", {cfg!r}, "output.dir={out}", "training.stop_after_epochs=1"]) == 0
        assert main(["train", {cfg!r}, "output.dir={out}"]) == 0
        print("TF-MODULES", tf_loaded())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TF-MODULES []" in proc.stdout
    assert f"resumed from {out / 'last.pt'}: epoch 2/2" in proc.stdout
    assert "mmbridge: build model.branches.image.preprocess (artifact " in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert next(iter(report["results"].values()))["epochs"] == 2


WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from mmbridge.train import trainer as T

    rank, out = int(os.environ["RANK"]), Path(sys.argv[1])
    seen = []
    loader = T.Trainer._loader

    def recording_loader(self, epoch):
        for batch in loader(self, epoch):
            seen.append([int(i) for i in batch["id"]])
            yield batch

    close = T.Trainer.close

    def saving_close(self):
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, out / f"weights-{rank}.pt")
        (out / f"ids-{rank}.json").write_text(json.dumps({"ids": seen, "world": self.env.world_size,
                                                          "loggers": [type(x).__name__ for x in self.loggers]}))
        close(self)

    T.Trainer._loader, T.Trainer.close = recording_loader, saving_close
    from mmbridge.cli import main
    rc = main(sys.argv[2:])
    assert "tensorflow" not in sys.modules, "TensorFlow was imported by a training process"
    sys.exit(rc)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_node_torchrun_rendezvous_on_gloo(prepared):
    tmp, _ = prepared
    out = tmp / "run-2node"
    out.mkdir()
    (tmp / "worker.py").write_text(WORKER)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "mmbridge-test", "--max-restarts", "0", str(tmp / "worker.py"), str(out),
               "train", str(tmp / "artifacts" / "train.yaml"), f"output.dir={out}", "training.epochs=1",
               "--quiet"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=tmp))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    both = "\n".join(outputs)
    assert "mmbridge: build" not in both  # --quiet
    assert both.count("report: ") == 1  # rank 0 reports
    runs = [json.loads((out / f"ids-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in runs] == [2, 2]
    assert runs[0]["loggers"] == ["TensorBoardLogger"] and runs[1]["loggers"] == []  # rank 0 only
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    ids = [{i for batch in r["ids"] for i in batch} for r in runs]
    n = [sum(len(b) for b in r["ids"]) for r in runs]
    assert not ids[0] & ids[1], "an id was trained on by both ranks"
    assert n == [40, 40] and len(ids[0] | ids[1]) == 80  # the sample's 80 train ids, each exactly once
    w0, w1 = (torch.load(out / f"weights-{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and w0
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])]
