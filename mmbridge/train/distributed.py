"""Process group and device from the launcher's environment (torchrun, SLURM via torchrun, Kubeflow).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. A Kubeflow ``PyTorchJob`` that starts one process per pod sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` but no ``LOCAL_RANK``; the local rank is then 0
(one process per pod), unless ``LOCAL_RANK`` is set.

Backends: NCCL when CUDA is available, gloo on CPU (torch.distributed).

Device: ``cuda:<local_rank % device_count>``, so a launcher that shows each process only its own
GPU (SLURM ``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per rank) gets ``cuda:0`` instead
of "invalid device ordinal" (:func:`select_cuda_device`).

Timeout: a rank that stops (crash, preemption, a hung data loader) makes the others wait in
their next collective for ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`, 30 minutes; the
``training.ddp_timeout_min`` config field), then they fail with :class:`DistributedTimeoutError`
naming the collective and the setting, instead of hanging.

Numerics: :func:`numerics` picks the TF32, SDPA and cuDNN settings for torch and the matching
onnxruntime CUDA provider options, deterministic or not (see its table of tolerances).
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from mmbridge.errors import ConfigError, MMBridgeError

logger = logging.getLogger("mmbridge.train")

#: Default process-group timeout: 30 minutes (torch's own default for gloo; NCCL's is 10). Long
#: enough for rank 0 to write a large checkpoint or run validation while the others wait at
#: the barrier, short enough that a job whose rank died does not hold its GPUs for hours.
DEFAULT_TIMEOUT_S = 30 * 60.0


class DistributedTimeoutError(MMBridgeError, RuntimeError):
    """A collective waited longer than the process-group timeout: another rank stopped or is stuck."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process runs.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this host (selects the GPU).
        local_world_size: processes on this host (used to split CPU threads).
        device: ``torch.device`` of this process (``cuda:<local_rank>`` or ``cpu``).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Rank numbers from the environment (torchrun or Kubeflow style).

    Returns:
        ``{"rank", "world_size", "local_rank", "local_world_size"}``; all default to a single
        process (0, 1, 0, 1).

    Raises:
        ConfigError: a variable is not an integer, ``RANK`` is outside ``[0, WORLD_SIZE)``, or
            ``WORLD_SIZE > 1`` without ``MASTER_ADDR`` / ``MASTER_PORT``.
    """
    env = os.environ if environ is None else environ
    problems = []

    def _int(key: str, default: int) -> int:
        raw = env.get(key)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            problems.append(f"{key}={raw!r} is not an integer")
            return default

    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local_rank = _int("LOCAL_RANK", 0)  # Kubeflow: one process per pod -> 0
    local_world = _int("LOCAL_WORLD_SIZE", 1 if "LOCAL_RANK" not in env else world)
    if world < 1 or not 0 <= rank < world:
        problems.append(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if world > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(key):
                problems.append(f"WORLD_SIZE={world} but {key} is not set (launch with torchrun, or set it)")
    if problems:
        raise ConfigError("distributed environment: " + "; ".join(problems))
    return {"rank": rank, "world_size": world, "local_rank": local_rank, "local_world_size": max(1, local_world)}


def select_cuda_device(local_rank: int) -> int:
    """The CUDA device index for this process: ``local_rank % torch.cuda.device_count()``.

    torchrun on one node shows every process all GPUs (``local_rank`` is the index). Launchers
    that give each process one GPU (SLURM ``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per
    rank) show one device, ``cuda:0``, whatever the local rank; indexing by ``local_rank`` there
    fails with "invalid device ordinal". Logged when the index differs from ``local_rank``.

    Raises:
        ConfigError: no CUDA device is visible.
    """
    count = torch.cuda.device_count()
    if count < 1:
        raise ConfigError("device 'cuda' was asked for but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use device=cpu or check the launcher")
    index = 0 if count == 1 else local_rank % count
    if index != local_rank:
        logger.info("local rank %d sees %d CUDA device(s) (CUDA_VISIBLE_DEVICES=%r): using cuda:%d",
                    local_rank, count, os.environ.get("CUDA_VISIBLE_DEVICES"), index)
    return index


def _init_supports_device_id() -> bool:
    try:
        return "device_id" in inspect.signature(dist.init_process_group).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-implemented or wrapped signature
        return False


#: whether this torch's ``init_process_group`` takes ``device_id=`` (torch >= 2.3), read once at import
INIT_TAKES_DEVICE_ID = _init_supports_device_id()


def setup(device: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Initialise the process group (if ``WORLD_SIZE > 1``) and pick this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA if available, else CPU). With CUDA the
            device is ``cuda:<local_rank % device_count>`` (:func:`select_cuda_device`), and NCCL
            is bound to it (``device_id=``, where torch supports it).
        timeout_s: process-group timeout in seconds (default 30 minutes): how long a collective
            waits for a rank that stopped before every other rank fails.

    Returns:
        The :class:`DistEnv`. On CPU, torch's intra-op threads are split between the processes
        of the host (``cpu_count // local_world_size``, at least 1) so ranks do not oversubscribe.

    Raises:
        ConfigError: bad environment (see :func:`read_env`), a non-positive or non-finite
            ``timeout_s``, or ``device="cuda"`` without CUDA.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"distributed setup: timeout_s={timeout_s!r} must be a finite number of seconds > 0 "
                          f"(training.ddp_timeout_min in the config)")
    r = read_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    init_kwargs: dict[str, Any] = {}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use device=cpu")
        index = select_cuda_device(r["local_rank"])
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
        backend = "nccl"
        if INIT_TAKES_DEVICE_ID:
            init_kwargs["device_id"] = dev  # binds NCCL to this GPU (eager init, no barrier guessing the device)
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        if r["local_world_size"] > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // r["local_world_size"]))
    if r["world_size"] > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=r["rank"], world_size=r["world_size"],
                                timeout=datetime.timedelta(seconds=timeout_s), **init_kwargs)
        global _timeout_s
        _timeout_s = float(timeout_s)
    return DistEnv(r["rank"], r["world_size"], r["local_rank"], r["local_world_size"], dev,
                   backend if r["world_size"] > 1 else None)


_timeout_s: float | None = None  # the timeout this module's setup() gave the process group


def is_timeout(exc: BaseException) -> bool:
    """True when ``exc`` is a collective's timeout (gloo / NCCL word it differently)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def timeout_error(exc: BaseException, where: str) -> DistributedTimeoutError:
    """A :class:`DistributedTimeoutError` for ``exc`` raised by the collective ``where``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    limit = f"{_timeout_s:g} s" if _timeout_s is not None else "the process-group timeout"
    return DistributedTimeoutError(
        f"rank {rank} waited {limit} at {where} for the other ranks: one of them stopped (crashed, was "
        f"preempted, or its data loader hangs) or is much slower; look at the other ranks' logs. If the wait "
        f"is legitimate (a long validation or checkpoint on rank 0), raise training.ddp_timeout_min "
        f"(Trainer(ddp_timeout_min=...)). ({exc})")


def _collective(where: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError as exc:
        if is_timeout(exc):
            raise timeout_error(exc, where) from exc
        raise


def barrier() -> None:
    """``dist.barrier()`` when a process group is initialised; otherwise nothing."""
    if dist.is_available() and dist.is_initialized():
        _collective("a barrier", dist.barrier)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` across ranks in place (no-op in a single process); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        _collective("an all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum of ``t`` across ranks in place (no-op in a single process); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        _collective("an all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
    return t


def all_gather_object(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (``[obj]`` in a single process)."""
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * world_size
        _collective("an all-gather", lambda: dist.all_gather_object(gathered, obj))
        return gathered
    return [obj]


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        _collective("a broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]
    return obj


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's floating-point buffers (BatchNorm running mean / var) to every rank, in place.

    DDP broadcasts buffers from rank 0 only at the start of each training forward, so after the
    last step of an epoch every rank holds running statistics updated with its own last batch.
    Evaluation runs the plain module on each rank's shard, and the checkpoint is rank 0's: without
    this, the ranks evaluated slightly different models. No-op in a single process.
    """
    if dist.is_available() and dist.is_initialized():
        for b in module.buffers():
            if b.is_floating_point():
                _collective("a broadcast", lambda b=b: dist.broadcast(b, src=0))


def cleanup() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# numerics: TF32, attention kernels and cuDNN algorithm choice, the same in torch and onnxruntime


@dataclasses.dataclass(frozen=True)
class Numerics:
    """The numeric settings of a run (see :func:`numerics`).

    Attributes:
        deterministic: bit-identical reruns on the same machine, software and world size.
        tf32: TF32 tensor-core math for fp32 matmuls and convolutions, in torch and in ORT.
        torch: the torch settings :func:`apply_numerics` sets (name -> value).
        ort_cuda_provider_options: the onnxruntime CUDA execution provider options that agree
            with ``torch``; pass them to the ORT bridges, e.g.
            ``artifact.to_ort(provider_options=trainer.numerics.ort_cuda_provider_options)``
            (``mmbridge.runtime`` accepts ``provider_options``; the recipe that builds the ORT
            branches, ``mmbridge.train.build`` / ``components``, is where they must be passed).
    """

    deterministic: bool
    tf32: bool
    torch: dict[str, Any]
    ort_cuda_provider_options: dict[str, str]


def numerics(deterministic: bool, *, tf32: bool | None = None) -> Numerics:
    """Choose the TF32 / SDPA / cuDNN settings for torch and the matching ORT CUDA options.

    Args:
        deterministic: deterministic kernels: cuDNN ``deterministic`` without ``benchmark``,
            scaled-dot-product attention on the math kernel only (the flash, memory-efficient
            and cuDNN kernels have non-deterministic backward passes), onnxruntime's
            ``cudnn_conv_algo_search=DEFAULT`` (a fixed algorithm instead of a timed search that
            may pick another one on the next run), and no TF32 unless ``tf32=True``.
        tf32: TF32 for fp32 matmuls and convolutions in both torch
            (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``) and
            ORT (``use_tf32``). None: off when deterministic, else torch's current matmul setting
            (off by default in torch; ORT's own default is on, which is why it is passed
            explicitly: a bridged ORT branch and a torch branch then round the same way).

    Tolerances to expect between devices or between torch and ORT, fp32 inputs (relative,
    per output, typical models; the parity table in :mod:`mmbridge.parity` has the exact ones):

    ==========================  ==========================  ========================================
    setting                     same device, rerun          CPU vs GPU / torch vs ORT
    ==========================  ==========================  ========================================
    deterministic, no TF32      bit-identical               ~1e-5 (different reduction orders)
    not deterministic, no TF32  ~1e-6 (atomics, algos)      ~1e-5
    TF32 on                     ~1e-6 (det.: identical)     ~1e-3 (10-bit mantissa in matmul/conv)
    bf16 / fp16 autocast        as above                    ~1e-2 bf16, ~1e-3 fp16
    ==========================  ==========================  ========================================

    Bit-identical also needs the same GPU model, driver, CUDA/cuDNN/torch/ORT versions and world size.
    """
    if tf32 is None:
        tf32 = False if deterministic else bool(torch.backends.cuda.matmul.allow_tf32)
    det = bool(deterministic)
    settings = {
        "torch.backends.cuda.matmul.allow_tf32": tf32,
        "torch.backends.cudnn.allow_tf32": tf32,
        "torch.backends.cudnn.deterministic": det,
        "torch.backends.cudnn.benchmark": False if det else bool(torch.backends.cudnn.benchmark),
        "sdpa.math": True,
        "sdpa.flash": not det,
        "sdpa.mem_efficient": not det,
        "sdpa.cudnn": not det,
        "use_deterministic_algorithms": det,
    }
    ort = {"cudnn_conv_algo_search": "DEFAULT" if det else "EXHAUSTIVE", "use_tf32": "1" if tf32 else "0"}
    return Numerics(det, tf32, settings, ort)


def apply_numerics(n: Numerics) -> Numerics:
    """Set torch's global flags to ``n.torch`` (process-wide); returns ``n``.

    Deterministic mode also sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set), which cuBLAS
    reads when the CUDA context is created: a warning says so when CUDA was already initialised.
    ``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without a deterministic
    implementation warns (naming the op) instead of failing the run.
    """
    t = n.torch
    torch.backends.cuda.matmul.allow_tf32 = t["torch.backends.cuda.matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = t["torch.backends.cudnn.allow_tf32"]
    torch.backends.cudnn.deterministic = t["torch.backends.cudnn.deterministic"]
    torch.backends.cudnn.benchmark = t["torch.backends.cudnn.benchmark"]
    torch.backends.cuda.enable_math_sdp(t["sdpa.math"])
    torch.backends.cuda.enable_flash_sdp(t["sdpa.flash"])
    torch.backends.cuda.enable_mem_efficient_sdp(t["sdpa.mem_efficient"])
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(t["sdpa.cudnn"])
    if n.deterministic:
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
            logger.warning("deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set, so cuBLAS "
                           "may still be non-deterministic; export CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return n
