"""Checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

Everything in a checkpoint is a tensor or a plain Python value (dict, list, str, int, float,
bool, None), so ``weights_only=True`` can load it: RNG states are stored as tensors and numbers,
not as the tuples numpy and ``random`` hand out. A checkpoint is written to a temporary file in
the same directory, flushed to disk, then moved over the old one with ``os.replace``, so a crash
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbridge.errors import CacheError

logger = logging.getLogger("mmbridge.train")
_warned_missing_cuda: set[int] = set()  # device indices already warned about (warn once each)

#: errno values of a write that cannot succeed until the user frees space or fixes permissions.
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system"}


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # keyed by device index, one state per visible device: restoring with fewer (or more)
        # visible devices sets the ones that exist (see set_rng_state)
        state["cuda"] = {i: torch.cuda.get_rng_state(i).cpu() for i in range(torch.cuda.device_count())}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        set_cuda_rng_states(state["cuda"])


def set_cuda_rng_states(states: dict[int, torch.Tensor] | list[torch.Tensor]) -> list[int]:
    """Restore per-device CUDA RNG states (``{index: state}``, or the older list by index).

    ``torch.cuda.set_rng_state_all`` raises ``IndexError`` when fewer devices are visible than
    when the states were saved (a job restarted with ``CUDA_VISIBLE_DEVICES`` set per rank, or
    on a smaller node). Here the states of the devices that exist are restored and the others
    are skipped with one warning per device index (resuming is then not bit-exact for them).

    Returns:
        The device indices whose saved state was skipped.
    """
    items = states.items() if isinstance(states, dict) else enumerate(states)
    count = torch.cuda.device_count()
    skipped = []
    for index, s in items:
        index = int(index)
        if index < count:
            torch.cuda.set_rng_state(s.cpu(), index)
        else:
            skipped.append(index)
    new = [i for i in skipped if i not in _warned_missing_cuda]
    if new:
        _warned_missing_cuda.update(new)
        logger.warning("checkpoint holds CUDA RNG states of device(s) %s but only %d device(s) are visible: "
                       "their states are not restored, so resuming is not bit-exact on them", new, count)
    return skipped


def _default_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give (``mkstemp`` gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(path: str | os.PathLike, write: Any, binary: bool) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, usual mode, then ``os.replace``.

    On any error the temporary file is removed and ``path`` keeps its old content. A full disk,
    an exceeded quota, a read-only file system or a permission error raises
    :class:`~mmbridge.errors.CacheError` (also an ``OSError``, same ``errno``) naming the path and the fix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only file system fails here, before any temporary file exists
        err = _disk_error(path, exc)
        if err is exc:
            raise
        raise err from exc
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # must not hide the first error
            if os.path.exists(tmp):
                os.unlink(tmp)
        err = _disk_error(path, exc) if isinstance(exc, OSError) else exc
        if err is exc:
            raise
        raise err from exc
    return path


def _disk_error(path: Path, exc: OSError) -> OSError:
    """A :class:`CacheError` naming ``path`` and the fix for a full / read-only disk; else ``exc`` itself."""
    if isinstance(exc, CacheError) or exc.errno not in _DISK_ERRNOS:
        return exc
    return CacheError(
        exc.errno,
        f"could not write {path}: {_DISK_ERRNOS[exc.errno]} ({exc.strerror or exc}); the previous {path.name} "
        f"(if any) is unchanged and no temporary file was left. Free space on {path.parent} (or fix its "
        f"permissions / mount it read-write), or point the output directory (output.dir) at a writable disk "
        f"with room, then resume")


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    Returns:
        The path written.
    """
    return _write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file + fsync + ``os.replace``).

    Reports, configs and metadata next to checkpoints go through this, so a crash never leaves a
    half-written file or a new config beside an old run's weights. Returns the path written.
    """
    return _write_atomic(path, lambda f: f.write(text), binary=False)


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CacheError: the file is missing or is not a loadable mmbridge checkpoint (names the path
            and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"checkpoint {path} does not exist; pass the path of a .pt file written by mmbridge train")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CacheError(f"checkpoint {path} could not be loaded with weights_only=True ({exc}); "
                         f"it is partial, corrupt or not written by mmbridge") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CacheError(f"checkpoint {path} has no 'model' entry; it was not written by mmbridge train")
    return ckpt
