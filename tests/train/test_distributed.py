"""Robustness of the training stack: devices, RNG, DDP, numerics, host syncs, config values, disks.

What needs a GPU is tested with mocks of ``torch.cuda`` / ``torch.distributed`` (the settings
chosen and the calls made); the DDP tests start two real gloo processes on the CPU.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import mmbridge
from mmbridge.composition import Branch
from mmbridge.errors import CacheError, ConfigError
from mmbridge.train import checkpoint as ckpt_io
from mmbridge.train import distributed
from mmbridge.train.config import TrainConfig
from mmbridge.train.encoders import MLPEncoder, TextEncoder
from mmbridge.train.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[2]


class Tiny(Dataset):
    """Numeric + text items, the label readable from both; ``numeric_present`` marks rows with numbers."""

    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = 3
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.numeric = torch.randn(n, 4, generator=g)
        self.numeric[:, 0] += 2.0 * self.labels.float()
        self.text = torch.randint(5, 30, (n, 6), generator=g)
        self.text[:, 0] = 1 + self.labels
        self.mask = torch.ones(n, 6, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"numeric": self.numeric[i], "text": self.text[i], "text_mask": self.mask[i],
                "numeric_present": torch.tensor(i % 5 != 0), "label": self.labels[i]}


def tiny_model(modality_dropout: float = 0.0) -> mmbridge.HybridModel:
    torch.manual_seed(0)
    return mmbridge.compose({"numeric": MLPEncoder(4, 8),
                             "text": Branch(TextEncoder(30, 8), input_keys=("text", "text_mask"))},
                            num_classes=3, fusion_dim=8, modality_dropout=modality_dropout)


KW = dict(epochs=1, batch_size=8, lr=1e-2, progress=False, tensorboard=False, device="cpu")
CFG = {k: v for k, v in KW.items() if k != "tensorboard"}  # TrainConfig fields (tensorboard is output's)


# -- 1. per-device CUDA RNG states ---------------------------------------------------------------
def _fake_cuda(monkeypatch, count: int):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i=0: torch.full((8,), 10 + int(i), dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i=0: calls.append((int(i), int(s[0]))))

    def set_all(states):  # torch's own raises IndexError past the visible devices
        for i, s in enumerate(states):
            if i >= count:
                raise IndexError(f"device {i} out of range")
            calls.append((i, int(s[0])))

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    return calls


def test_cuda_rng_states_are_saved_per_device_and_restored_where_the_device_exists(monkeypatch, tmp_path, caplog):
    _fake_cuda(monkeypatch, count=2)
    state = ckpt_io.rng_state()
    assert set(state["cuda"]) == {0, 1} and int(state["cuda"][1][0]) == 11
    torch.save(state, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # keyed by index, still weights_only-loadable

    calls = _fake_cuda(monkeypatch, count=1)  # restarted with one GPU visible per process
    ckpt_io._warned_missing_cuda.clear()
    with caplog.at_level(logging.WARNING, logger="mmbridge.train"):
        ckpt_io.set_rng_state(state)
        ckpt_io.set_rng_state(state)
    assert calls == [(0, 10), (0, 10)]  # device 0 restored both times, device 1 skipped
    warnings = [r for r in caplog.records if "CUDA RNG states of device(s) [1]" in r.getMessage()]
    assert len(warnings) == 1  # warned once
    # the older format (a list by index) is read the same way
    calls.clear()
    assert ckpt_io.set_cuda_rng_states([torch.full((8,), 7, dtype=torch.uint8)] * 3) == [1, 2]
    assert calls == [(0, 7)]


# -- 2. one visible GPU per process --------------------------------------------------------------
@pytest.mark.parametrize("count, local_rank, expect", [(1, 3, 0), (4, 5, 1), (8, 3, 3)])
def test_cuda_device_is_local_rank_modulo_the_visible_devices(monkeypatch, count, local_rank, expect):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert distributed.select_cuda_device(local_rank) == expect


def test_setup_binds_nccl_to_the_visible_gpu_and_passes_the_timeout(monkeypatch, caplog):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set_device", i))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    with caplog.at_level(logging.INFO, logger="mmbridge.train"):
        env = distributed.setup("cuda", timeout_s=90)
    assert env.device == torch.device("cuda", 0) and seen["set_device"] == 0
    assert seen["backend"] == "nccl" and seen["timeout"].total_seconds() == 90
    assert seen["device_id"] == torch.device("cuda", 0)
    assert any("local rank 3 sees 1 CUDA device(s)" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="timeout_s"):
        distributed.setup("cuda", timeout_s=float("inf"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        distributed.setup("cuda")


def test_ddp_timeout_is_a_config_field_passed_to_setup(monkeypatch, tmp_path):
    seen = []
    real = distributed.setup
    monkeypatch.setattr(distributed, "setup", lambda device=None, **kw: seen.append(kw) or real(device, **kw))
    assert TrainConfig().ddp_timeout_min == 30.0 and "ddp_timeout_min" in TrainConfig().trainer_kwargs()
    Trainer.from_config(tiny_model(), Tiny(), None, TrainConfig(ddp_timeout_min=2.5, **CFG), out_dir=tmp_path,
                        tensorboard=False)
    assert seen == [{"timeout_s": 150.0}]
    problems: list[str] = []
    TrainConfig(ddp_timeout_min=-1)._validate("training", problems)
    assert any("ddp_timeout_min" in p for p in problems)


# -- 4. deterministic numerics -------------------------------------------------------------------
@pytest.fixture
def restore_numerics():
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark,
             b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark) = saved[:4]
    b.cuda.enable_flash_sdp(saved[4])
    b.cuda.enable_mem_efficient_sdp(saved[5])
    b.cuda.enable_math_sdp(saved[6])
    torch.use_deterministic_algorithms(saved[7], warn_only=saved[8])


def test_deterministic_mode_picks_math_sdpa_no_tf32_and_matching_ort_options(restore_numerics, tmp_path):
    torch.backends.cudnn.allow_tf32 = True
    t = Trainer(tiny_model(), Tiny(), None, out_dir=tmp_path, deterministic=True, **KW)
    n = t.numerics
    assert n.ort_cuda_provider_options == {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": "0"}
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    # not deterministic: ORT follows torch's TF32 choice, so the two round the same way
    torch.backends.cuda.matmul.allow_tf32 = True
    fast = distributed.numerics(False)
    assert fast.tf32 and fast.ort_cuda_provider_options == {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1"}
    assert fast.torch["torch.backends.cudnn.allow_tf32"] and fast.torch["sdpa.flash"]
    assert distributed.numerics(True, tf32=True).ort_cuda_provider_options["use_tf32"] == "1"


# -- 5. no host sync per step --------------------------------------------------------------------
def test_no_host_sync_in_the_step_path_between_logging_steps(monkeypatch, tmp_path):
    """Counts item/tolist/cpu/bool/int/float on tensors called from mmbridge code at each step."""
    mm = str(REPO / "mmbridge")
    counter = {"n": 0, "where": []}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            f = sys._getframe(1)
            if f.f_code.co_filename.startswith(mm):
                counter["n"] += 1
                counter["where"].append(f"{name} at {f.f_code.co_filename}:{f.f_lineno}")
            return real(self, *a, **kw)
        return wrapper

    t = Trainer(tiny_model(modality_dropout=0.3), Tiny(64), None, out_dir=tmp_path, **dict(KW, log_every=100))
    at_step = []
    real_step = Trainer._optimizer_step
    monkeypatch.setattr(Trainer, "_optimizer_step", lambda self: (real_step(self), at_step.append(counter["n"])))
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    t.fit()
    assert len(at_step) == 8
    assert at_step == [0] * 8, counter["where"]  # nothing until the epoch's end
    assert t.history[0]["train/loss"] > 0


# -- 6. numeric config values; non-finite loss ----------------------------------------------------
@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", -1e-3), ("weight_decay", float("nan")),
                                          ("weight_decay", -0.1), ("grad_clip", float("inf")), ("grad_clip", 0.0),
                                          ("ddp_timeout_min", float("nan")), ("epochs", 0)])
def test_trainer_refuses_non_finite_or_out_of_range_numbers(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"{field}={value!r}"):
        Trainer(tiny_model(), Tiny(), None, out_dir=tmp_path, **{**KW, field: value})
    with pytest.raises(ConfigError, match=rf"{field}="):  # the config path goes through the constructor
        Trainer.from_config(tiny_model(), Tiny(), None, TrainConfig(**{**CFG, field: value}), out_dir=tmp_path,
                            tensorboard=False)


def test_non_finite_loss_stops_the_run_naming_the_step(monkeypatch, tmp_path):
    t = Trainer(tiny_model(), Tiny(64), None, out_dir=tmp_path, **dict(KW, epochs=2, log_every=100))
    real_loss = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, out, y: real_loss(self, out, y) * (
        float("nan") if self.global_step == 2 and self.model.training else 1.0))
    with pytest.raises(NonFiniteLossError, match="optimiser step 3 .epoch 1."):
        t.fit()
    assert not (tmp_path / "last.pt").exists()  # no NaN checkpoint written


# -- 7. checkpoint writes on a full / read-only disk -------------------------------------------------
@pytest.mark.parametrize("where, code", [("torch.save", errno.ENOSPC), ("os.replace", errno.EROFS),
                                         ("mkstemp", errno.EROFS)])
def test_checkpoint_write_on_a_full_disk_names_path_and_fix_and_keeps_the_old_one(monkeypatch, tmp_path, where, code):
    t = Trainer(tiny_model(), Tiny(16), None, out_dir=tmp_path, **KW)
    path = t.save_checkpoint(tmp_path / "last.pt")
    before = path.read_bytes()

    def fail(*a, **kw):
        raise OSError(code, os.strerror(code))

    target = {"torch.save": (torch, "save"), "os.replace": (os, "replace"),
              "mkstemp": (ckpt_io.tempfile, "mkstemp")}[where]
    monkeypatch.setattr(*target, fail)
    t.global_step = 99
    with pytest.raises(CacheError, match="Free space") as info:
        t.save_checkpoint(tmp_path / "last.pt")
    assert str(path) in str(info.value) and info.value.errno == code and isinstance(info.value, OSError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    monkeypatch.undo()
    assert ckpt_io.load(path)["global_step"] == 0


# -- 9. epoch metrics after a mid-epoch resume ---------------------------------------------------------
def test_epoch_loss_after_a_mid_epoch_resume_covers_the_whole_epoch(monkeypatch, tmp_path):
    kw = dict(KW, epochs=2, checkpoint_every_steps=3, log_every=100)  # 6 steps / epoch
    full = Trainer(tiny_model(), Tiny(), None, out_dir=tmp_path / "full", **kw)
    full.fit()

    cut = Trainer(tiny_model(), Tiny(), None, out_dir=tmp_path / "cut", **kw)
    real_step = Trainer._optimizer_step

    def crash(self):
        real_step(self)
        if self.global_step == 4:  # one step after the mid-epoch checkpoint at step 3
            raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(Trainer, "_optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    saved = ckpt_io.load(tmp_path / "cut" / "last.pt")
    assert saved["step_in_epoch"] == 3 and len(saved["epoch_loss"]) == 1 and saved["epoch_loss"][0][1] == 24

    resumed = Trainer(tiny_model(), Tiny(), None, out_dir=tmp_path / "cut", **kw)
    resumed.fit(resume="auto")
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in full.history]


# -- 3 and 8: two real gloo processes -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path: Path, script: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(script))
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(path), str(tmp_path)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


@pytest.mark.ddp
@pytest.mark.slow
def test_a_rank_that_stops_fails_the_other_within_the_timeout(tmp_path):
    r0, r1 = _two_ranks(tmp_path, """
        import os, sys, time
        from mmbridge.train import distributed
        env = distributed.setup("cpu", timeout_s=5)
        if env.rank == 1:
            time.sleep(25)  # stopped: never reaches the barrier in time
            os._exit(0)
        t0 = time.monotonic()
        try:
            distributed.barrier()
        except distributed.DistributedTimeoutError as exc:
            print(f"ELAPSED {time.monotonic() - t0:.1f}")
            print("ERROR", exc)
            os._exit(3)
        os._exit(0)
    """, timeout=120)
    assert r0.returncode == 3, r0.stdout[-3000:]
    elapsed = float(r0.stdout.split("ELAPSED ")[1].split()[0])
    assert elapsed < 30, r0.stdout
    assert "waited 5 s at a barrier" in r0.stdout and "training.ddp_timeout_min" in r0.stdout


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_with_a_trainable_hf_encoder_whose_pooler_gets_no_gradient(tmp_path):
    pytest.importorskip("transformers")
    r0, r1 = _two_ranks(tmp_path, """
        import sys
        import torch
        from transformers import BertConfig, BertModel
        import mmbridge
        from mmbridge.composition import Branch
        from mmbridge.train.encoders import MLPEncoder
        from mmbridge.train.trainer import Trainer
        sys.path.insert(0, %r)
        from test_distributed import Tiny

        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16))
        model = mmbridge.compose({"text": Branch(bert, trainable=True), "numeric": MLPEncoder(4, 8)},
                                 num_classes=3, fusion_dim=8, modality_dropout=0.0)
        t = Trainer(model, Tiny(48), None, out_dir=sys.argv[1], epochs=1, batch_size=4, lr=1e-3, progress=False,
                    tensorboard=False, device="cpu", max_steps_per_epoch=4)
        res = t.fit()
        print("UNUSED", t.find_unused_parameters, sorted(t.unused_parameters))
        print("STEPS", t.global_step)
        t.close()
    """ % str(REPO / "tests" / "train"))
    assert r0.returncode == 0 and r1.returncode == 0, r0.stdout[-4000:] + r1.stdout[-4000:]
    assert "UNUSED True" in r0.stdout and "pooler.dense.weight" in r0.stdout and "STEPS 4" in r0.stdout
