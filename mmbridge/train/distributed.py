"""Process group and device from the launcher's environment (torchrun, SLURM via torchrun, Kubeflow).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. A Kubeflow ``PyTorchJob`` that starts one process per pod sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` but no ``LOCAL_RANK``; the local rank is then 0
(one process per pod), unless ``LOCAL_RANK`` is set.

Backends: NCCL when CUDA is available, gloo on CPU (torch.distributed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from mmbridge.errors import ConfigError


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


def setup(device: str | None = None, *, timeout_s: float = 600.0) -> DistEnv:
    """Initialise the process group (if ``WORLD_SIZE > 1``) and pick this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA if available, else CPU). With CUDA the
            device is ``cuda:<local_rank>``.
        timeout_s: process-group timeout in seconds.

    Returns:
        The :class:`DistEnv`. On CPU, torch's intra-op threads are split between the processes
        of the host (``cpu_count // local_world_size``, at least 1) so ranks do not oversubscribe.

    Raises:
        ConfigError: bad environment (see :func:`read_env`), or ``device="cuda"`` without CUDA.
    """
    import datetime

    r = read_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use device=cpu")
        torch.cuda.set_device(r["local_rank"])
        dev = torch.device("cuda", r["local_rank"])
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        if r["local_world_size"] > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // r["local_world_size"]))
    if r["world_size"] > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=r["rank"], world_size=r["world_size"],
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(r["rank"], r["world_size"], r["local_rank"], r["local_world_size"], dev,
                   backend if r["world_size"] > 1 else None)


def barrier() -> None:
    """``dist.barrier()`` when a process group is initialised; otherwise nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` across ranks in place (no-op in a single process); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def cleanup() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
