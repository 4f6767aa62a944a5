"""A cache of frozen branches' pooled features, keyed by row id (issue 16 item 2).

A frozen encoder (e.g. a MiniLM text branch) computes the same features for the same row every
epoch. :class:`FeatureCache` keeps them, per branch, keyed by the batch's ``"id"`` and checked
against three things; a mismatch in any of them means "recompute":

* **the branch fingerprint**: the class of the preprocess / encoder and the bytes of their
  parameters and buffers (blake2b), or for a module without tensors that declares one
  (``mmbridge_fingerprint`` / ``fingerprint`` str attribute, or an onnxruntime module's
  ``_source`` bytes / path) that. It is recomputed only when a cheap version key changes (each
  tensor's ``data_ptr`` and in-place ``_version``: ``load_state_dict``, ``copy_``, an optimiser
  step, ``p.data = ...`` all bump it); a changed fingerprint drops that branch's whole store;
* **the row's inputs**: a blake2b hash of the bytes of every input tensor of the branch for that
  row (``input_keys``: token ids, mask, image...), compared on every sight, so a changed input
  under the same id (a different tokenizer, a re-decoded image) is a miss and overwrites the row;
* **the compute context**: autocast on/off and its dtype, and the feature dtype.

A branch is used with the cache only when it is **deterministic and frozen**: ``trainable`` is
False, no parameter of its preprocess / encoder requires grad, and every submodule is in eval
mode (so a Dropout left in train mode, or any module that behaves differently in training, is
never cached: that branch is computed every step and counted under ``bypass``). Batches without
an ``"id"`` key are computed as usual (``bypass``). Modality dropout runs after the cache, in the
trainable stage, so it still applies on top of cached features.

A batch is served from the cache only when **every** row hits; otherwise the whole batch is
computed (the same call the uncached model makes) and its rows stored. Storage: by default the
features stay on the device they were computed on (the model's device); ``device="cpu"`` keeps
them in host memory and copies the hit rows to the batch's device. ``max_bytes`` caps the store
(all branches together, default 2 GiB); rows past the cap are not stored (counted in ``full``).

Cost per step on a cached branch: the ids and the branch's input tensors are copied to the host
and hashed (one device -> host sync on CUDA); for token ids this is small next to an encoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

Branch = Any  # mmbridge.composition.model.Branch (not imported: model imports this module)

__all__ = ["FeatureCache", "branch_cacheable", "module_fingerprint"]

_DEFAULT_MAX_BYTES = 2 << 30


def branch_cacheable(branch: Branch) -> bool:
    """True when ``branch``'s frozen part is deterministic and frozen (see the module doc)."""
    if branch.trainable:
        return False
    parts = [m for m in (branch.preprocess, branch.encoder) if m is not None]
    for part in parts:
        if any(p.requires_grad for p in part.parameters()):
            return False
        if any(m.training for m in part.modules()):
            return False
    return True


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _version_key(modules: Sequence[nn.Module]) -> tuple:
    out = []
    for m in modules:
        out.append(type(m).__qualname__)
        for name, t in _tensors(m):
            out.append((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)))
    return tuple(out)


def module_fingerprint(module: nn.Module) -> str:
    """A hex digest of ``module``'s class and parameter / buffer bytes (or its declared fingerprint)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    declared = getattr(module, "mmbridge_fingerprint", None) or getattr(module, "fingerprint", None)
    if isinstance(declared, str):
        h.update(b"declared:" + declared.encode())
    source = getattr(module, "_source", None)  # an onnxruntime module: the ONNX bytes or path
    if isinstance(source, bytes):
        h.update(b"source:" + source)
    elif isinstance(source, str):
        h.update(b"path:" + source.encode())
    for name, t in _tensors(module):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _context_key(device: torch.device) -> tuple:
    kind = device.type
    try:
        on = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if on else None
    except (TypeError, RuntimeError, AttributeError):  # older torch / device types without autocast
        on, dtype = torch.is_autocast_enabled(), None
    return (kind, bool(on), str(dtype))


def _row_hashes(tensors: Sequence[torch.Tensor], n: int) -> list[bytes]:
    host = [t.detach().contiguous().cpu() for t in tensors]
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for t in host:
            row = t[i]
            h.update(f"{tuple(row.shape)}:{row.dtype}".encode())
            h.update(row.reshape(-1).view(torch.uint8).numpy().tobytes() if row.numel() else b"")
        out.append(h.digest())
    return out


class _BranchStore:
    def __init__(self) -> None:
        self.version: tuple | None = None
        self.fingerprint: str | None = None
        self.rows: dict[tuple[tuple, int], tuple[bytes, torch.Tensor]] = {}  # (context, id) -> (hash, feat [F])


class FeatureCache:
    """Per-branch store of pooled frozen features (see the module doc for the key and the rule).

    Args:
        device: ``None`` (default): keep features on the device they were computed on (the
            model's device); ``"cpu"``: keep them in host memory.
        max_bytes: cap on the stored feature bytes, all branches together (default 2 GiB).

    Attributes:
        stats: counters ``{"hits", "misses", "bypass", "invalidations", "full"}``; hits and misses
            count rows, bypass counts branch calls that could not use the cache, invalidations
            count dropped stores (fingerprint changed) and overwritten rows (input changed).
    """

    def __init__(self, *, device: str | torch.device | None = None, max_bytes: int = _DEFAULT_MAX_BYTES):
        self.device = torch.device(device) if device is not None else None
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._stores: dict[str, _BranchStore] = {}
        self.stats = {"hits": 0, "misses": 0, "bypass": 0, "invalidations": 0, "full": 0}

    def clear(self) -> None:
        """Drop every stored feature (the counters are kept)."""
        self._stores.clear()
        self.bytes = 0

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    def cached_rows(self, branch: str) -> int:
        """How many rows of branch ``branch`` are stored."""
        store = self._stores.get(branch)
        return len(store.rows) if store is not None else 0

    def __len__(self) -> int:
        return sum(len(s.rows) for s in self._stores.values())

    def _store_for(self, branch: Branch) -> _BranchStore:
        store = self._stores.setdefault(branch.name, _BranchStore())
        parts = [m for m in (branch.preprocess, branch.encoder) if m is not None]
        version = _version_key(parts)
        if version != store.version:
            fp = "|".join(module_fingerprint(m) for m in parts)
            if store.fingerprint is not None and fp != store.fingerprint and store.rows:
                self.stats["invalidations"] += 1
                self._drop(store)
            store.version, store.fingerprint = version, fp
        return store

    def _drop(self, store: _BranchStore) -> None:
        self.bytes -= sum(f.numel() * f.element_size() for _, f in store.rows.values())
        store.rows.clear()

    def frozen_forward(self, branch: Branch, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``branch.frozen_forward(batch)``, served from / stored into the cache when allowed."""
        ids = batch.get("id")
        if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 1 or not branch_cacheable(branch):
            self.stats["bypass"] += 1
            return branch.frozen_forward(batch)
        inputs = [batch[k] for k in branch.input_keys]
        n = int(ids.shape[0])
        device = inputs[0].device if isinstance(inputs[0], torch.Tensor) else torch.device("cpu")
        context = _context_key(device)
        store = self._store_for(branch)
        keys = [(context, int(i)) for i in ids.cpu().tolist()]
        hashes = _row_hashes(inputs, n)
        found = [store.rows.get(k) for k in keys]
        if all(f is not None and f[0] == h for f, h in zip(found, hashes)):
            self.stats["hits"] += n
            feat = torch.stack([f[1] for f in found])
            return {"feat": feat.to(device, non_blocking=True)}
        self.stats["misses"] += n
        state = branch.frozen_forward(batch)
        feat = state["feat"]
        keep = feat.detach().to(self.device) if self.device is not None else feat.detach()
        for i, (k, h, f) in enumerate(zip(keys, hashes, found)):
            row = keep[i].clone()  # its own storage: the batch tensor is not pinned by the cache
            size = row.numel() * row.element_size()
            if f is not None:
                if f[0] != h:
                    self.stats["invalidations"] += 1
                self.bytes -= f[1].numel() * f[1].element_size()
                del store.rows[k]
            if self.bytes + size > self.max_bytes:
                self.stats["full"] += 1
                continue
            store.rows[k] = (h, row)
            self.bytes += size
        return state

    def __repr__(self) -> str:
        where = str(self.device) if self.device is not None else "model device"
        return f"FeatureCache(rows={len(self)}, bytes={self.bytes}, on={where}, stats={self.stats})"
