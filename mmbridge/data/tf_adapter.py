"""Feed an existing ``tf.data.Dataset`` into PyTorch, sharded per DDP rank.

Two forms:

* :func:`tf_data_to_dataset` -> :class:`TFDataDataset`, a map-style dataset (``__len__``,
  ``__getitem__``) for :class:`~mmbridge.Trainer` and anything else that shards by index with a
  ``DistributedSampler``. The elements are read once into memory, a batched dataset is unbatched
  first, and the elements are put in a canonical order, ascending by ``id_key`` (default
  ``"id"``), so every rank holds the same list whatever order its copy of the pipeline produced
  (an unseeded ``.shuffle()`` included): the sampler then gives each id to exactly one rank per
  epoch and every rank the same number of batches. (The Trainer's sampler pads the epoch to a
  multiple of the number of ranks by repeating the first ``N mod W`` ids of that epoch's
  permutation, the ``DistributedSampler(drop_last=False)`` rule; those few ids are seen twice.)
  A duplicated id is an error. Without ``id_key`` in the elements, the order is the pipeline's
  and must be deterministic; under ``torch.distributed`` the ranks compare a fingerprint of
  their elements and raise if it differs.
* :func:`tf_data_to_torch` -> :class:`TFDataIterable`, a streaming ``IterableDataset``: rank
  ``r`` of ``W`` reads ``dataset.shard(W, r)`` and stops after ``N // W`` elements, so every rank
  yields the same number of elements (or batches, for a batched pipeline), and ``len()`` says
  how many; the last ``N mod W`` elements of the pipeline are dropped each epoch. Here each
  element's rank is decided by its position, so the pipeline's order must be the same on every
  rank (seed ``.shuffle(..., seed=S)``, or shuffle after ``.shard``).

TensorFlow is not imported by this module; :func:`tf_data_to_torch` goes through
:func:`mmbridge.export._tf.import_tensorflow` (import-order guard) when it is called.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["TFDataDataset", "TFDataIterable", "resolve_rank", "tf_data_to_dataset", "tf_data_to_torch"]


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

    Every rank yields exactly ``len(self) = N // W`` elements, where N is the dataset's
    cardinality (counted once by iterating when TF does not know it): the last ``N mod W``
    elements are dropped, so no rank runs an extra step (an extra batch on one rank would leave
    the others waiting in DDP's all-reduce).

    Build it with :func:`tf_data_to_torch`.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int):
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self._total: int | None = None

    def total(self) -> int:
        """N, the number of elements of the whole dataset (all ranks)."""
        if self._total is None:
            self._total = _cardinality(self.dataset)
        return self._total

    def __len__(self) -> int:
        return self.total() // self.world_size

    def __iter__(self) -> Iterator[Any]:
        per_rank = len(self)
        ds = self.dataset.take(per_rank * self.world_size)
        shards, index = self.world_size, self.rank
        info = get_worker_info()
        ds = ds.shard(shards, index) if shards > 1 else ds
        if info is not None and info.num_workers > 1:
            ds = ds.shard(info.num_workers, info.id)
        for element in ds.as_numpy_iterator():
            yield _to_torch(element)


def _cardinality(dataset: Any) -> int:
    import tensorflow as tf  # already imported by the caller (through import_tensorflow)

    n = int(dataset.cardinality())
    if n == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError("the tf.data.Dataset is infinite (.repeat() without a count); an epoch needs a finite "
                         "dataset: drop .repeat() (the Trainer repeats epochs itself) or .take(N)")
    if n == int(tf.data.UNKNOWN_CARDINALITY):  # e.g. after .filter(): count once
        n = int(dataset.reduce(np.int64(0), lambda acc, _: acc + 1))
    return n


def _fingerprint(elements: list[Any]) -> str:
    h = hashlib.sha256()

    def add(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                add(x[k])
        elif isinstance(x, tuple | list):
            for v in x:
                add(v)
        elif isinstance(x, torch.Tensor):
            h.update(x.numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(x.tobytes() if x.dtype.kind not in "OSU" else repr(x.tolist()).encode())
        else:
            h.update(repr(x).encode())

    for e in elements:
        add(e)
    return h.hexdigest()


class TFDataDataset(torch.utils.data.Dataset):
    """A map-style dataset of a ``tf.data.Dataset``'s elements, in canonical order (module doc).

    ``ds[i]`` is element ``i`` with numeric tensors as ``torch.Tensor`` (dicts / tuples kept);
    ``ids`` the elements' ``id_key`` values (ascending), when they have one.

    Build it with :func:`tf_data_to_dataset`.
    """

    def __init__(self, elements: list[Any], id_key: str | None):
        self.elements = elements
        self.id_key = id_key
        self.ids = ([int(e[id_key]) for e in elements]
                    if id_key is not None and elements and isinstance(elements[0], dict) and id_key in elements[0]
                    else None)

    def __len__(self) -> int:
        return len(self.elements)

    def __getitem__(self, index: int) -> Any:
        return self.elements[index]


def tf_data_to_dataset(dataset: Any, *, id_key: str | None = "id", unbatch: bool | None = None) -> TFDataDataset:
    """A ``tf.data.Dataset`` as a map-style dataset for :class:`~mmbridge.Trainer` (exact DDP sharding).

    Args:
        dataset: a finite ``tf.data.Dataset`` of dicts (or tuples) of tensors.
        id_key: the element key holding a unique integer id per sample; the elements are sorted
            by it (the same order on every rank). None: keep the pipeline's order (it must then
            be deterministic; checked across ranks when ``torch.distributed`` is initialised).
        unbatch: unbatch a batched pipeline first; None (default): when the pipeline's element
            spec has an unknown leading dimension (``.batch()``), as TF reports it.

    Returns:
        :class:`TFDataDataset` (every element in memory).

    Raises:
        TypeError: not a ``tf.data.Dataset``.
        ValueError: an infinite dataset; an id seen twice (named); ranks that read different elements.
        ImportOrderError: TensorFlow was imported before torch's compiler stack.
    """
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"tf_data_to_dataset() needs a tf.data.Dataset, got {type(dataset).__name__}")
    if unbatch is None:
        specs = tf.nest.flatten(dataset.element_spec)
        unbatch = bool(specs) and all(getattr(s, "shape", None) is not None and s.shape.rank
                                      and s.shape[0] is None for s in specs)
    if unbatch:
        dataset = dataset.unbatch()
    _cardinality(dataset)  # refuses an infinite dataset before reading it
    elements = [_to_torch(e) for e in dataset.as_numpy_iterator()]
    has_ids = id_key is not None and elements and isinstance(elements[0], dict) and id_key in elements[0]
    if has_ids:
        ids = [int(e[id_key]) for e in elements]
        dups = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dups:
            raise ValueError(f"tf.data.Dataset: {len(dups)} {id_key!r} values occur more than once: {dups[:10]}; "
                             f"each sample needs a unique id (a .repeat() or an overlapping .concatenate()?)")
        order = sorted(range(len(elements)), key=ids.__getitem__)
        elements = [elements[k] for k in order]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        fp = _fingerprint(elements)
        got: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(got, fp)
        if len(set(got)) > 1:
            raise ValueError(
                "tf.data.Dataset: the ranks read different elements (or the same in different orders), so index-"
                "based sharding would give some samples to two ranks and some to none. Give every element a unique "
                f"{id_key or 'id'!r} key (id_key=...), or make the pipeline deterministic (.shuffle(..., seed=S))")
    return TFDataDataset(elements, id_key if has_ids else None)


def tf_data_to_torch(dataset: Any, *, rank: int | None = None, world_size: int | None = None) -> TFDataIterable:
    """Wrap a ``tf.data.Dataset`` as a PyTorch ``IterableDataset`` sharded for this DDP rank.

    Args:
        dataset: a ``tf.data.Dataset`` whose elements are dicts (or tuples) of tensors.
        rank: this process's rank; default from ``torch.distributed`` if initialised, else env
            ``RANK``, else 0.
        world_size: number of ranks; default from ``torch.distributed``, else env
            ``WORLD_SIZE``, else 1.

    Returns:
        :class:`TFDataIterable` (``len()``: elements per rank, ``N // world_size``; the remainder
        is dropped so that every rank runs the same number of steps); use it with ``DataLoader(it, batch_size=None)`` when the TF
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
