"""Feed an existing ``tf.data.Dataset`` into PyTorch, sharded per DDP rank.

TensorFlow is not imported by this module; :func:`tf_data_to_torch` goes through
:func:`mmbridge.export._tf.import_tensorflow` (import-order guard) when it is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["TFDataIterable", "resolve_rank", "tf_data_to_torch"]


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun / the launcher)") from exc


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The (rank, world_size) to shard by.

    Each value not given comes from ``torch.distributed`` when a process group is initialised,
    else from the environment (``RANK`` / ``WORLD_SIZE``, as set by torchrun or Kubeflow), else
    0 / 1.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        d_rank, d_world = dist.get_rank(), dist.get_world_size()
    else:
        d_rank, d_world = _env_int("RANK"), _env_int("WORLD_SIZE")
    rank = rank if rank is not None else (d_rank if d_rank is not None else 0)
    world_size = world_size if world_size is not None else (d_world if d_world is not None else 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} are invalid: need world_size >= 1 and 0 <= rank < world_size")
    return int(rank), int(world_size)


def _to_torch(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_torch(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_to_torch(v) for v in x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "OSU":  # tf.string -> bytes; torch has no string tensor
            return x
        return torch.from_numpy(np.array(x, copy=True))  # TF's buffers are read-only
    if isinstance(x, bytes):
        return x
    if isinstance(x, np.generic):
        return torch.from_numpy(np.array(x))
    return x


class TFDataIterable(IterableDataset):
    """A ``torch.utils.data.IterableDataset`` over one rank's shard of a ``tf.data.Dataset``.

    Iterating yields the dataset's elements with every numeric tensor converted to a
    ``torch.Tensor`` (same shape and dtype; e.g. a uint8 [H, W, 3] NHWC image stays uint8
    [H, W, 3]); string tensors stay ``bytes`` / numpy object arrays. Dicts, tuples and lists keep
    their structure. Rank ``r`` of ``W`` sees ``dataset.shard(W, r)``, so the W ranks together see
    every element exactly once (element k goes to rank k mod W); with DataLoader workers each
    worker takes a further ``shard``. Shard BEFORE batching / shuffling with a fixed seed in the
    TF pipeline if ranks must see disjoint single elements.

    Build it with :func:`tf_data_to_torch`.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int):
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Any]:
        shards, index = self.world_size, self.rank
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            shards, index = shards * info.num_workers, index * info.num_workers + info.id
        ds = self.dataset.shard(shards, index) if shards > 1 else self.dataset
        for element in ds.as_numpy_iterator():
            yield _to_torch(element)


def tf_data_to_torch(dataset: Any, *, rank: int | None = None, world_size: int | None = None) -> TFDataIterable:
    """Wrap a ``tf.data.Dataset`` as a PyTorch ``IterableDataset`` sharded for this DDP rank.

    Args:
        dataset: a ``tf.data.Dataset`` whose elements are dicts (or tuples) of tensors.
        rank: this process's rank; default from ``torch.distributed`` if initialised, else env
            ``RANK``, else 0.
        world_size: number of ranks; default from ``torch.distributed``, else env
            ``WORLD_SIZE``, else 1.

    Returns:
        :class:`TFDataIterable`; use it with ``DataLoader(it, batch_size=None)`` when the TF
        pipeline already batches, or with a ``batch_size`` for per-element datasets. Use
        ``num_workers=0`` unless the TF dataset can be used in forked workers.

    Raises:
        TypeError: ``dataset`` is not a ``tf.data.Dataset``.
        ValueError: invalid rank / world size.
        ImportOrderError: TensorFlow was imported before torch's compiler stack.
    """
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"tf_data_to_torch() needs a tf.data.Dataset, got {type(dataset).__name__}")
    rank, world_size = resolve_rank(rank, world_size)
    return TFDataIterable(dataset, rank, world_size)
