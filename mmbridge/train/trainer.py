"""The training loop: :class:`Trainer`.

One readable loop, in this order per optimiser step::

    frozen = model.frozen_stage(batch)            # preprocessing + frozen branches, no grad
    with autocast(bf16 | fp16 | off):
        logits = ddp(frozen)                      # DDP wraps only the trainable stage
        loss = task_head.loss(logits, label) / micro_steps_in_this_step
    scaler.scale(loss).backward()                 # no gradient all-reduce until the last micro step
    scaler.step(optimizer); scaler.update(); scheduler.step()

Distributed runs come from torchrun (or a Kubeflow PyTorchJob) through
:func:`mmbridge.train.distributed.setup`; data is sharded with ``DistributedSampler`` (also in a
single process, so that the order of samples depends only on ``seed`` and the epoch: this is
what makes resuming exact). Checkpoints (``last.pt`` every epoch and every
``checkpoint_every_steps`` optimiser steps, ``best.pt`` on a new best validation value) hold the
model, optimiser, scaler, scheduler, counters, early-stopping state, every rank's RNG states
(CUDA ones per device index) and every rank's running loss sum of the epoch (so the epoch's
``train/loss`` after a mid-epoch resume covers the whole epoch).

Between logging steps (``log_every``) the step path makes no host sync: the loss is summed and
checked for NaN / inf on the device and read back only at logging steps, before a checkpoint
and at the end of the epoch; a non-finite loss stops the run with :class:`NonFiniteLossError`
naming the step. Under DDP, ``find_unused_parameters`` is decided from a one-batch dry run (or
declared by the model), and the process-group timeout is ``ddp_timeout_min``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mmbridge.composition.config import ModelConfig
from mmbridge.composition.heads import TaskHead, task_heads
from mmbridge.errors import ConfigError, MMBridgeError
from mmbridge.train import checkpoint as ckpt_io
from mmbridge.train import distributed
from mmbridge.train.config import SCHEDULERS, OutputConfig, TrainConfig
from mmbridge.train.loggers import Logger, make_loggers, summary_writer  # noqa: F401 - summary_writer: re-export

logger = logging.getLogger("mmbridge.train")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_T, _O = TrainConfig, OutputConfig  # the defaults of the keyword arguments below


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random`` with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train and evaluate a :class:`~mmbridge.HybridModel` (single process or under torchrun).

    Args:
        model: the model (any ``nn.Module`` whose ``forward(batch)`` returns logits works;
            a HybridModel gets DDP around its trainable stage only).
        train_data: a map-style dataset of dict items (``"label"`` int64 scalar plus the model's
            input keys, e.g. ``"image"`` uint8 ``[H, W, 3]``, ``"text"`` int64 ``[T]``).
        val_data: validation dataset (same items); enables early stopping and ``best.pt``.
        out_dir: directory for checkpoints (``last.pt``, ``best.pt``), TensorBoard logs
            (``tensorboard/``) and reports. Created on rank 0.
        epochs: number of epochs.
        batch_size: per-process batch size (the global batch is ``batch_size * world_size *
            grad_accum``).
        lr: AdamW learning rate. weight_decay: AdamW weight decay.
        precision: ``"fp32"`` (default), ``"bf16"`` (autocast) or ``"fp16"`` (autocast + ``GradScaler``).
        grad_accum: micro-batches per optimiser step (gradients are synced only on the last).
        grad_clip: max global gradient norm (None: no clipping).
        scheduler: ``"cosine"`` (``CosineAnnealingLR`` over all optimiser steps) or ``"none"``.
        seed: seed of the model's dropout RNG (``seed + rank``), the sampler and the loaders.
        num_workers: DataLoader workers per process.
        task: a :data:`mmbridge.task_heads` name (``"classification"``: cross-entropy,
            ``"regression"``: MSE on ``[N, K]`` targets). Default: the model's own task head
            (``model.head``, a :class:`~mmbridge.composition.heads.TaskHead`), else ``model.task``,
            else ``"classification"``. The task head supplies the loss, the metrics, the default
            ``monitor`` and its ``mode``.
        num_classes: C, for metrics. Default: ``train_data.num_classes`` or the head's.
        monitor: validation metric for early stopping / ``best.pt`` (default: the task head's,
            ``"val/top1"`` for classification, ``"val/loss"`` for regression). mode: ``"max"`` or
            ``"min"`` (default: the task head's for that metric).
        patience: stop after this many epochs without improvement (None: never stop early).
        checkpoint_every_steps: also write ``last.pt`` every this many optimiser steps.
        keep_checkpoints: also keep a copy of each epoch's checkpoint as ``epoch-NNNN.pt``.
        deterministic: use deterministic CUDA kernels (``torch.use_deterministic_algorithms``
            with ``warn_only``, cuDNN deterministic without benchmark, ``CUBLAS_WORKSPACE_CONFIG``,
            scaled-dot-product attention on the math kernel, no TF32) so that resuming on a GPU
            is exact too; slower. CPU runs are deterministic without it. The settings chosen
            are ``self.numerics`` (:func:`mmbridge.train.distributed.numerics`, with its table of
            tolerances); on CUDA, deterministic or not, torch's cuDNN TF32 flag is set to agree
            with its matmul flag, and ``self.numerics.ort_cuda_provider_options`` are the
            onnxruntime CUDA options that agree with torch (pass them to the ORT bridges).
        max_steps_per_epoch: cap on micro-batches per epoch (quick runs).
        log_every: interval, in optimiser steps, of the step loss (TensorBoard, progress bar)
            and of the non-finite-loss check. The step path makes no host sync in between (the
            loss stays on the device), so a larger value costs nothing but log detail.
        ddp_timeout_min: minutes a collective waits for a rank that stopped before every other
            rank fails with :class:`~mmbridge.train.distributed.DistributedTimeoutError`.
        find_unused_parameters: DDP's flag. None (default): decided from the model (its
            ``ddp_find_unused_parameters`` / ``unused_parameters`` attributes if it declares
            them, else a one-batch dry run listing the trainable parameters that get no
            gradient, e.g. a Hugging Face encoder's pooler; on with modality dropout); the list
            is logged and kept as ``self.unused_parameters``.
        progress: tqdm bar on rank 0. tensorboard: SummaryWriter on rank 0 (``out_dir/tensorboard``).
        loggers: experiment loggers on rank 0 (:mod:`mmbridge.train.loggers`): names
            (``"tensorboard"``, ``"wandb"``, ``"mlflow"``) or :class:`~mmbridge.train.loggers.Logger`
            instances; None (default): ``["tensorboard"]`` if ``tensorboard`` else none. They get
            every epoch record (step = epoch) and ``train/loss_step`` (step = optimiser step).
            ``self.loggers`` is the built list (empty on other ranks).
        logger_options: ``{name: options}`` for the named loggers (``output.logger_options``).
        logger_config: the run's config (YAML form) for loggers that store it (W&B).
        device: ``"cpu"``, ``"cuda"`` or None (CUDA if available).
        extra_state: plain values saved in every checkpoint under ``"extra"`` (e.g. the config
            and the label mapping).
        feature_cache: on a :class:`~mmbridge.HybridModel`, call ``model.enable_feature_cache()``
            (default True): deterministic frozen branches' pooled features are computed once per
            row id and served from the cache afterwards (``model.feature_cache.stats``).

    Every default is the field of the same name of :class:`~mmbridge.train.config.TrainConfig`
    (``out_dir`` / ``tensorboard``: :class:`~mmbridge.train.config.OutputConfig`), the dataclass
    the YAML ``training`` section is read into; :meth:`from_config` takes those dataclasses.

    Raises:
        ConfigError: an unknown ``precision`` / ``scheduler`` / ``task``, ``grad_accum < 1``, a
            non-finite or out-of-range number (``lr``, ``weight_decay``, ``grad_clip``,
            ``ddp_timeout_min``, ``epochs``, ``batch_size``, ...; the message names the field), or
            ``fp16`` / ``bf16`` on a device that cannot autocast to it.

    :meth:`fit` raises :class:`NonFiniteLossError` (naming the optimiser step) when the training
    loss becomes NaN or inf on any rank; no checkpoint is written after that step.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset | None = None, *,
                 out_dir: str | os.PathLike = _O.dir, epochs: int = _T.epochs, batch_size: int = _T.batch_size,
                 lr: float = _T.lr, weight_decay: float = _T.weight_decay, precision: str = _T.precision,
                 grad_accum: int = _T.grad_accum, grad_clip: float | None = _T.grad_clip,
                 scheduler: str = _T.scheduler, seed: int = _T.seed, num_workers: int = _T.num_workers,
                 task: str | None = None, num_classes: int | None = None, monitor: str | None = _T.monitor,
                 mode: str | None = _T.mode, patience: int | None = _T.patience,
                 checkpoint_every_steps: int | None = _T.checkpoint_every_steps,
                 keep_checkpoints: bool = _T.keep_checkpoints, deterministic: bool = _T.deterministic,
                 max_steps_per_epoch: int | None = _T.max_steps_per_epoch, log_every: int = _T.log_every,
                 progress: bool = _T.progress, tensorboard: bool = _O.tensorboard, device: str | None = _T.device,
                 ddp_timeout_min: float = _T.ddp_timeout_min, find_unused_parameters: bool | None = None,
                 extra_state: Mapping[str, Any] | None = None, feature_cache: bool = _T.feature_cache,
                 loggers: Sequence[str | Logger] | None = None, logger_options: Mapping[str, Any] | None = None,
                 logger_config: Mapping[str, Any] | None = None):
        problems = _numeric_problems(
            positive={"lr": lr, "ddp_timeout_min": ddp_timeout_min},
            non_negative={"weight_decay": weight_decay},
            optional_positive={"grad_clip": grad_clip},
            counts={"epochs": epochs, "batch_size": batch_size, "log_every": log_every},
            optional_counts={"patience": patience, "checkpoint_every_steps": checkpoint_every_steps,
                             "max_steps_per_epoch": max_steps_per_epoch},
        )
        if precision not in PRECISIONS:
            problems.append(f"precision={precision!r} is not one of {sorted(PRECISIONS)}")
        if scheduler not in SCHEDULERS:
            problems.append(f"scheduler={scheduler!r} is not 'cosine' or 'none'")
        if not _is_int(grad_accum) or grad_accum < 1:
            problems.append(f"grad_accum={grad_accum!r} must be an int >= 1")
        head, task = _task_head(model, task, problems)
        if problems:
            raise ConfigError("Trainer: " + "; ".join(problems))
        self.env = distributed.setup(device, timeout_s=float(ddp_timeout_min) * 60.0)
        self.device = self.env.device
        self.model = model.to(self.device)
        if feature_cache and hasattr(self.model, "enable_feature_cache"):
            self.model.enable_feature_cache()  # frozen branches' features by row id (HybridModel)
        self.train_data, self.val_data = as_map_dataset(train_data, "train_data"), as_map_dataset(val_data, "val_data")
        train_data = self.train_data
        self.out_dir = Path(out_dir)
        self.epochs, self.batch_size, self.grad_accum = int(epochs), int(batch_size), int(grad_accum)
        self.grad_clip, self.seed, self.num_workers = grad_clip, int(seed), int(num_workers)
        self.precision, self.task, self.task_head = precision, task, head
        self.amp_dtype = PRECISIONS[precision]
        self.num_classes = num_classes or getattr(train_data, "num_classes", None) or _head_classes(model)
        self.monitor = monitor or head.monitor
        self.mode = mode or head.metric_mode(self.monitor)
        self.patience = patience
        self.checkpoint_every_steps = checkpoint_every_steps
        self.keep_checkpoints = keep_checkpoints
        self.max_steps_per_epoch = max_steps_per_epoch
        self.log_every = int(log_every)
        self.progress = progress
        self.extra_state = dict(extra_state or {})
        if self.amp_dtype is not None and self.device.type == "cpu" and self.amp_dtype == torch.float16:
            logger.warning("fp16 autocast on CPU is slow and rarely useful; prefer precision=bf16 on CPU")

        #: torch and onnxruntime numeric settings (TF32, SDPA kernels, cuDNN search); pass
        #: ``self.numerics.ort_cuda_provider_options`` to the ORT bridges (see distributed.numerics)
        self.numerics = distributed.numerics(deterministic)
        if deterministic or self.device.type == "cuda":
            distributed.apply_numerics(self.numerics)
        seed_everything(self.seed + self.env.rank)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("Trainer: the model has no trainable parameters (every branch frozen and no head?)")
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.sampler = DistributedSampler(train_data, num_replicas=self.env.world_size, rank=self.env.rank,
                                          shuffle=True, seed=self.seed, drop_last=False)
        self.steps_per_epoch = self._micro_steps()
        total = self.epochs * math.ceil(self.steps_per_epoch / self.grad_accum)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total))
                          if scheduler == "cosine" else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

        core = self.model.trainable_module() if hasattr(self.model, "trainable_module") else None
        self._staged = core is not None
        self.runner: nn.Module = core if core is not None else self.model
        self.unused_parameters: list[str] = []
        self.find_unused_parameters = False
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.find_unused_parameters = self._decide_find_unused(find_unused_parameters)
            self.runner = DDP(
                self.runner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
            )

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        # this rank's running train-loss sum and sample count of the current epoch (on device;
        # checkpointed, so the epoch's mean after a mid-epoch resume covers the whole epoch)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = torch.zeros((), dtype=torch.float64, device=self.device)
        # first optimiser step (1-based) whose loss was not finite on this rank; _NO_STEP: none
        self._bad_step = torch.full((), _NO_STEP, dtype=torch.int64, device=self.device)
        self.loggers: list[Logger] = []
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            names = loggers if loggers is not None else (["tensorboard"] if tensorboard else [])
            self.loggers = make_loggers(names, self.out_dir, logger_options, logger_config)

    @classmethod
    def from_config(cls, model: nn.Module, train_data: Dataset, val_data: Dataset | None = None,
                    training: TrainConfig | None = None, output: OutputConfig | None = None, *,
                    task: str | None = None, **kwargs: Any) -> Trainer:
        """A Trainer from the config dataclasses (``cfg.training``, ``cfg.output``).

        ``kwargs`` (``num_classes``, ``extra_state``, or any field to override) win over them.
        """
        training, output = training or TrainConfig(), output or OutputConfig()
        kw = {**training.trainer_kwargs(), "out_dir": output.dir, "tensorboard": output.tensorboard,
              "loggers": list(output.active_loggers), "logger_options": dict(output.logger_options), **kwargs}
        return cls(model, train_data, val_data, task=task, **kw)

    # ------------------------------------------------------------------------------------------
    def _decide_find_unused(self, declared: bool | None) -> bool:
        """DDP's ``find_unused_parameters``: declared, else from a one-batch dry run (logged).

        A trainable parameter that gets no gradient in a step (a Hugging Face encoder's pooler
        when the branch pools ``last_hidden_state``; a branch missing from the batch; a
        modality-dropout model) makes DDP without ``find_unused_parameters`` fail at the next
        step on 2+ ranks. The dry run (forward + backward of the first items of the training set,
        RNG states and buffers restored, gradients cleared) lists the parameters whose ``grad``
        stays None; ``self.unused_parameters`` keeps the list. A model may also declare them
        (``model.unused_parameters``: names, or ``model.ddp_find_unused_parameters``: a bool).
        """
        if declared is None:
            declared = getattr(self.model, "ddp_find_unused_parameters", None)
        named = [(n, p) for n, p in self.runner.named_parameters() if p.requires_grad]
        listed = list(getattr(self.model, "unused_parameters", None) or [])
        if declared is None and not listed:
            # every rank must pass DDP the same flag: the union of what each rank's dry run saw
            seen = distributed.all_gather_object(self._dry_run_unused(named), self.env.world_size)
            listed = sorted({name for names in seen for name in names})
        self.unused_parameters = listed
        dropout = float(getattr(self.model, "modality_dropout", 0.0) or 0.0) > 0
        decided = bool(declared) if declared is not None else bool(listed) or dropout
        if self.env.is_main:
            if listed:
                shown = ", ".join(listed[:20]) + (f", ... ({len(listed)} in all)" if len(listed) > 20 else "")
                logger.info("DDP find_unused_parameters=%s: %d trainable parameter(s) got no gradient in a dry run: "
                            "%s", decided, len(listed), shown)
            else:
                logger.info("DDP find_unused_parameters=%s (%s)", decided,
                            "declared" if declared is not None else "modality dropout" if dropout
                            else "every trainable parameter got a gradient in a dry run")
        return decided

    def _dry_run_unused(self, named: list[tuple[str, nn.Parameter]]) -> list[str]:
        n = min(len(self.train_data), max(2, min(self.batch_size, 4)))
        if n == 0:
            return []
        batch = next(iter(DataLoader(Subset(self.train_data, range(n)), batch_size=n, shuffle=False)))
        buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        grads_before = [p.grad for _, p in named]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batch = self._to_device(batch)
            for _, p in named:
                p.grad = None
            with self._autocast():
                out = self._forward(batch)
                loss = self._loss(out, batch["label"])
            loss.backward()
        unused = [name for name, p in named if p.grad is None]
        for (_, p), g in zip(named, grads_before):
            p.grad = g
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
        return unused

    def _micro_steps(self) -> int:
        n = math.ceil(len(self.sampler) / self.batch_size)
        return min(n, self.max_steps_per_epoch) if self.max_steps_per_epoch else n

    def _loader(self, epoch: int) -> DataLoader:
        # a fresh generator per epoch: the loader never draws from the global RNG, so resuming
        # (which restores the global RNG) sees the same dropout masks as an uninterrupted run
        self.sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return DataLoader(self.train_data, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=self.num_workers, generator=gen, drop_last=False,
                          pin_memory=self.device.type == "cuda")

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if self._staged:
            return self.runner(self.model.frozen_stage(batch))
        return self.runner(batch)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.task_head.loss(out.float(), target)

    # ------------------------------------------------------------------------------------------
    def fit(self, resume: str | os.PathLike | None = None, *, stop_after_epochs: int | None = None,
            restore_best: bool = False) -> dict[str, Any]:
        """Train for the remaining epochs; validate, checkpoint and early-stop after each.

        Args:
            resume: a checkpoint path, ``"auto"`` (``out_dir/last.pt`` if it exists) or None.
            stop_after_epochs: return after this many epochs of this call (simulates an
                interrupted job; the checkpoint is written first).
            restore_best: load ``best.pt``'s weights at the end (when validation ran).

        Returns:
            ``{"history": [per-epoch dict], "best": value, "best_epoch": int, "monitor": name,
            "stopped_early": bool, "epochs_run": int, "train_time_s": float}``; each history
            entry holds ``epoch``, ``train/loss`` (mean over the epoch, all ranks), ``lr`` and the
            validation metrics (``val/loss``, ``val/top1``, ``val/top5``, ``val/macro_f1``).
        """
        if resume == "auto":
            resume = self.out_dir / "last.pt" if (self.out_dir / "last.pt").is_file() else None
        if resume is not None:
            self.load_checkpoint(resume)
            if self.env.is_main:
                print(f"resumed from {resume}: epoch {self.epoch + 1}/{self.epochs}, micro-step {self.step_in_epoch} "
                      f"of {self.steps_per_epoch}, optimiser step {self.global_step}"
                      + (" (training already finished)" if self.epoch >= self.epochs else ""), flush=True)
        t0 = time.perf_counter()
        stopped_early, run = False, 0
        while self.epoch < self.epochs:
            try:
                record = self._train_epoch()
            except RuntimeError as exc:  # DDP's gradient all-reduce waiting for a rank that stopped
                if self.env.distributed and distributed.is_timeout(exc) and not isinstance(
                        exc, distributed.DistributedTimeoutError):
                    raise distributed.timeout_error(exc, f"a training step of epoch {self.epoch + 1}") from exc
                raise
            if self.env.distributed:  # every rank evaluates (and ends with) rank 0's BatchNorm statistics
                distributed.broadcast_buffers(self.model)
            if self.val_data is not None:
                record.update(self.evaluate(self.val_data, prefix="val"))
                stopped_early = self._early_stopping(record)
            self.history.append(record)
            self._log_epoch(record)
            self.epoch += 1
            self.step_in_epoch = 0
            self.save_checkpoint(self.out_dir / "last.pt")
            if self.keep_checkpoints and self.env.is_main:
                shutil.copyfile(self.out_dir / "last.pt", self.out_dir / f"epoch-{self.epoch:04d}.pt")
            run += 1
            if stopped_early or (stop_after_epochs is not None and run >= stop_after_epochs):
                break
        elapsed = time.perf_counter() - t0
        if restore_best and self.val_data is not None and (self.out_dir / "best.pt").is_file():
            distributed.barrier()
            self.model.load_state_dict(ckpt_io.load(self.out_dir / "best.pt")["model"])
        for lg in self.loggers:
            if hasattr(lg, "flush"):
                lg.flush()
        return {"history": self.history, "best": self.best, "best_epoch": self.best_epoch,
                "monitor": self.monitor, "stopped_early": stopped_early, "epochs_run": run,
                "train_time_s": elapsed}

    def _train_epoch(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.model.train()
        steps = self.steps_per_epoch
        start = self.step_in_epoch
        loader = itertools.islice(self._loader(self.epoch), start, steps)
        bar = tqdm(loader, total=steps, initial=start, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   disable=not (self.progress and self.env.is_main), leave=False, dynamic_ncols=True)
        if start == 0:  # a fresh epoch; mid-epoch, the sums come from the checkpoint (load_checkpoint)
            self._loss_sum.zero_()
            self._loss_count.zero_()
        loss_sum, count = self._loss_sum, self._loss_count
        # No host sync in this loop between logging steps: the loss stays on the device (summed
        # into loss_sum, its first non-finite step recorded in _bad_step) and is read back only
        # every log_every optimiser steps, before a checkpoint and at the end of the epoch.
        for i, batch in enumerate(bar, start=start):
            batch = self._to_device(batch)
            group_start = (i // self.grad_accum) * self.grad_accum
            group_size = min(self.grad_accum, steps - group_start)
            last_micro = i + 1 == group_start + group_size
            sync = contextlib.nullcontext()
            if self.env.distributed and not last_micro:
                sync = self.runner.no_sync()
            with sync:
                with self._autocast():
                    out = self._forward(batch)
                    loss = self._loss(out, batch["label"])
                self.scaler.scale(loss / group_size).backward()
            n = batch["label"].shape[0]
            detached = loss.detach()
            loss_sum += detached.double() * n
            count += n
            step = self.global_step + 1  # the optimiser step this micro-batch belongs to
            torch.where(torch.isfinite(detached) | (self._bad_step != _NO_STEP), self._bad_step,
                        torch.full_like(self._bad_step, step), out=self._bad_step)
            self.step_in_epoch = i + 1
            if last_micro:
                self._optimizer_step()
                checkpoint_now = bool(self.checkpoint_every_steps and self.global_step % self.checkpoint_every_steps == 0
                                      and self.step_in_epoch < steps)
                if self.global_step % self.log_every == 0 or checkpoint_now:
                    self._check_finite()
                    value = detached.item()
                    for lg in self.loggers:
                        lg.log_scalars(self.global_step, {"train/loss_step": value})
                    bar.set_postfix(loss=f"{value:.4f}")
                if checkpoint_now:
                    self.save_checkpoint(self.out_dir / "last.pt")
        bar.close()
        self._check_finite()
        total, total_count = loss_sum.clone(), count.clone()  # the running sums stay this rank's own
        distributed.all_reduce_sum(total)
        distributed.all_reduce_sum(total_count)
        return {"epoch": self.epoch + 1, "train/loss": (total / total_count.clamp_min(1)).item(),
                "lr": self.optimizer.param_groups[0]["lr"], "step": self.global_step}

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if some rank saw a NaN / inf loss (collective; syncs)."""
        bad = self._bad_step.clone()
        distributed.all_reduce_min(bad)
        step = int(bad.item())
        if step != _NO_STEP:
            raise NonFiniteLossError(
                f"training loss is not finite (NaN or inf) at optimiser step {step} (epoch {self.epoch + 1}); "
                f"the run is stopped and the last checkpoint (written before it) is kept. Lower lr, set grad_clip, "
                f"use precision bf16 instead of fp16, or check the data for NaN / inf inputs")

    def _optimizer_step(self) -> None:
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1

    def _early_stopping(self, record: dict[str, Any]) -> bool:
        value = record.get(self.monitor)
        if value is None:
            raise ConfigError(f"Trainer: monitor {self.monitor!r} is not among the validation metrics "
                              f"{sorted(k for k in record if k.startswith('val/'))}; set monitor to one of them")
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = float(value), self.epoch + 1, 0
            self.save_checkpoint(self.out_dir / "best.pt", weights_only_model=True)
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def _log_epoch(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        msg = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        print(msg, flush=True)
        scalars = {k if "/" in k else f"train/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        for lg in self.loggers:
            lg.log_scalars(record["epoch"], scalars)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Dataset, prefix: str = "test", batch_size: int | None = None) -> dict[str, float]:
        """Loss and metrics on ``dataset`` (sharded over ranks without padding; all ranks agree).

        Args:
            dataset: map-style dataset of dict items (see the class doc).
            prefix: key prefix (``"val"`` -> ``"val/top1"``).
            batch_size: default: the training batch size.

        Returns:
            ``{prefix}/loss`` plus the task head's metrics: ``{prefix}/top1``, ``{prefix}/top5``
            (C >= 5), ``{prefix}/macro_f1`` for classification (fractions in [0, 1]); ``mse``,
            ``mae`` for regression.
        """
        was_training = self.model.training
        self.model.eval()
        shard = Subset(dataset, range(self.env.rank, len(dataset), self.env.world_size))
        loader = DataLoader(shard, batch_size=batch_size or self.batch_size, shuffle=False,
                            num_workers=self.num_workers)
        metrics = self.task_head.make_metrics(self.num_classes).to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        model = self.model
        for batch in loader:
            batch = self._to_device(batch)
            with self._autocast():
                out = model(batch)
            out = out.float()
            target = batch["label"]
            loss_sum += self._loss(out, target).double() * target.shape[0]
            count += target.shape[0]
            metrics.update(out, self.task_head.metric_target(target, out))
        distributed.all_reduce_sum(loss_sum)
        distributed.all_reduce_sum(count)
        result = {f"{prefix}/loss": (loss_sum / count.clamp_min(1)).item()}
        result.update({f"{prefix}/{k}": float(v) for k, v in metrics.compute().items()})
        self.model.train(was_training)
        return result

    # ------------------------------------------------------------------------------------------
    def state_dict(self, *, weights_only_model: bool = False) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and plain values only; see :mod:`.checkpoint`).

        Collective under DDP (gathers every rank's RNG states): call it on every rank.
        """
        mine = {"rng": ckpt_io.rng_state(),
                "epoch_loss": [float(self._loss_sum.item()), float(self._loss_count.item())]}
        gathered = distributed.all_gather_object(mine, self.env.world_size)
        rng_all = [g["rng"] for g in gathered]
        state: dict[str, Any] = {
            "format": "mmbridge.train/1",
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best": self.best, "best_epoch": self.best_epoch, "monitor": self.monitor,
            "num_classes": self.num_classes, "task": self.task, "extra": self.extra_state,
        }
        if weights_only_model:
            return state
        state.update({
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "bad_epochs": self.bad_epochs, "history": self.history, "world_size": self.env.world_size,
            "sampler_epoch": self.epoch, "sampler_seed": self.seed, "rng": rng_all,
            # per rank [loss sum, sample count] of the current epoch so far (mid-epoch checkpoints)
            "epoch_loss": [g["epoch_loss"] for g in gathered],
            "steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
        })
        return state

    def save_checkpoint(self, path: str | os.PathLike, *, weights_only_model: bool = False) -> Path:
        """Write a checkpoint atomically on rank 0 (all ranks must call it; ends with a barrier)."""
        state = self.state_dict(weights_only_model=weights_only_model)
        if self.env.is_main:
            ckpt_io.save_atomic(state, path)
        distributed.barrier()
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimiser, scaler, scheduler, counters and this rank's RNG states.

        Raises:
            CacheError: unreadable checkpoint (see :func:`mmbridge.train.checkpoint.load`).
            ConfigError: the checkpoint holds only weights (``best.pt``), or was written with a
                different number of steps per epoch than this run has.
        """
        state = ckpt_io.load(path, map_location="cpu")
        if "optimizer" not in state:
            raise ConfigError(f"checkpoint {path} holds only model weights (a best.pt); resume from last.pt, "
                              f"or load it with model.load_state_dict(...)")
        if int(state["step_in_epoch"]) > 0:  # mid-epoch: the position only means something in the same epoch layout
            ours = {"steps_per_epoch": self.steps_per_epoch, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
            diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) is not None and state.get(k) != v}
            if diff:
                raise ConfigError(
                    f"checkpoint {path} stopped mid-epoch (micro-step {state['step_in_epoch']}) under a different "
                    f"epoch layout: " + ", ".join(f"{k} {a} in the checkpoint vs {b} now" for k, (a, b) in diff.items())
                    + "; resume with the same batch_size / grad_accum / data, or from an end-of-epoch checkpoint"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best, self.best_epoch = state["best"], int(state["best_epoch"])
        self.bad_epochs, self.history = int(state["bad_epochs"]), list(state["history"])
        rng = state["rng"]
        if len(rng) != self.env.world_size:
            logger.warning("checkpoint %s was written by %d processes, this run has %d: resuming is not exact",
                           path, len(rng), self.env.world_size)
        ckpt_io.set_rng_state(rng[self.env.rank % len(rng)])
        # the epoch's running loss: rank r continues the sums of the saved ranks i with i % world == r
        sums = state.get("epoch_loss")
        self._loss_sum.zero_()
        self._loss_count.zero_()
        if self.step_in_epoch > 0:
            if sums is None:
                logger.warning("checkpoint %s has no running epoch loss (older format): train/loss of epoch %d "
                               "covers only the steps after the resume", path, self.epoch + 1)
            else:
                mine = [s for i, s in enumerate(sums) if i % self.env.world_size == self.env.rank]
                self._loss_sum.fill_(sum(float(s[0]) for s in mine))
                self._loss_count.fill_(sum(float(s[1]) for s in mine))

    def close(self) -> None:
        """Close the loggers (TensorBoard, W&B, MLflow); destroy the process group if this trainer started one."""
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            lg.close()
        distributed.cleanup()


_NO_STEP = 2**62  # "no non-finite loss seen" (a min over ranks keeps the first bad step)


def as_map_dataset(data: Any, what: str) -> Any:
    """``data`` as the map-style dataset the Trainer shards exactly (one rank per id per epoch).

    A ``tf.data.Dataset`` is read once through :func:`mmbridge.data.tf_adapter.tf_data_to_dataset`
    (sorted by its ``"id"``, so an unseeded ``.shuffle()`` cannot send an id to two ranks); the
    streaming :class:`~mmbridge.data.tf_adapter.TFDataIterable` is refused (a ``DistributedSampler``
    needs indices). Anything else is returned as it is (``None`` too).

    Raises:
        ConfigError: ``data`` is a ``TFDataIterable``.
    """
    if data is None:
        return None
    if type(data).__name__ == "TFDataIterable":
        raise ConfigError(f"Trainer({what}=...): a streaming TFDataIterable cannot be sharded by index; pass the "
                          f"tf.data.Dataset itself (it is read through mmbridge.data.tf_data_to_dataset)")
    if (type(data).__module__ or "").startswith("tensorflow") and hasattr(data, "element_spec"):
        from mmbridge.data.tf_adapter import tf_data_to_dataset

        return tf_data_to_dataset(data)
    return data


class NonFiniteLossError(MMBridgeError, FloatingPointError):
    """The training loss became NaN or inf; the message names the optimiser step."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numeric_problems(*, positive: Mapping[str, Any], non_negative: Mapping[str, Any],
                      optional_positive: Mapping[str, Any], counts: Mapping[str, Any],
                      optional_counts: Mapping[str, Any]) -> list[str]:
    """One message per numeric argument that is not a finite number in its range (names the field)."""
    problems = []
    for key, v in positive.items():
        if not (_is_num(v) and math.isfinite(v) and v > 0):
            problems.append(f"{key}={v!r} must be a finite number > 0")
    for key, v in non_negative.items():
        if not (_is_num(v) and math.isfinite(v) and v >= 0):
            problems.append(f"{key}={v!r} must be a finite number >= 0")
    for key, v in optional_positive.items():
        if v is not None and not (_is_num(v) and math.isfinite(v) and v > 0):
            problems.append(f"{key}={v!r} must be a finite number > 0 or None")
    for key, v in counts.items():
        if not (_is_int(v) and v >= 1):
            problems.append(f"{key}={v!r} must be an int >= 1")
    for key, v in optional_counts.items():
        if v is not None and not (_is_int(v) and v >= 1):
            problems.append(f"{key}={v!r} must be an int >= 1 or None")
    return problems


def _task_head(model: nn.Module, task: str | None, problems: list[str]) -> tuple[Any, str]:
    """The task contract (a :class:`TaskHead` instance or class) and the task's name.

    ``task`` given: that registered head's class. Otherwise the model's own head when it is a
    :class:`TaskHead`, else the registered head named ``model.task`` (default classification).
    """
    own = getattr(model, "head", None)
    if task is None and isinstance(own, TaskHead):
        name = getattr(model, "task", None)
        return own, name if isinstance(name, str) else type(own).__name__
    task = task or getattr(model, "task", None) or ModelConfig.task
    if task not in task_heads:
        problems.append(f"task={task!r} is not a registered task head ({', '.join(map(repr, task_heads.names()))})")
        return TaskHead, str(task)
    head = task_heads.get(task)
    if not (isinstance(head, type) and issubclass(head, TaskHead)):
        problems.append(f"task={task!r}: its head {head!r} is not a mmbridge.composition.TaskHead, so it does not say "
                        f"which loss, metrics and monitored metric to use; derive it from TaskHead")
        return TaskHead, task
    return head, task


def _head_classes(model: nn.Module) -> int | None:
    head = getattr(model, "head", None)
    return getattr(head, "num_classes", None) or getattr(head, "num_outputs", None)
