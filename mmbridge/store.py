"""The artifact store: the on-disk format of a bridge artifact and the cache around it.

An artifact is a directory::

    <name>-<fingerprint[:16]>/
        model.onnx    # the optimised, checker-clean graph
        meta.json     # fingerprint, specs, opset, library versions, parity report, sha256 of model.onnx
        golden.npz    # the parity inputs and TF's outputs (re-checks without TensorFlow)

The cache lives under ``$MMBRIDGE_CACHE`` (default: the user cache dir, e.g.
``~/.cache/mmbridge``). Entries are written to a temporary directory and renamed into place
(atomic on POSIX), under a per-fingerprint file lock (``filelock``), so N processes exporting
the same bridge at once leave exactly one valid artifact. This module knows files and JSON only
(no backend, no TensorFlow); :class:`mmbridge.artifact.BridgeArtifact` is the object over it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmbridge.errors import CacheError

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
GOLDEN_FILE = "golden.npz"


def cache_root() -> Path:
    """The artifact cache directory: ``$MMBRIDGE_CACHE`` or the platform user cache dir."""
    env = os.environ.get("MMBRIDGE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mmbridge"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_meta(path: str | os.PathLike, *, check: bool | str = True) -> dict[str, Any]:
    """Read and validate an artifact directory's ``meta.json`` (and its ``model.onnx``).

    Args:
        path: the artifact directory (holding ``model.onnx`` and ``meta.json``).
        check: ``True``: verify ``model.onnx`` against the sha256 recorded in ``meta.json``
            (~0.25 s for ResNet50's 94 MB); ``"size"``: compare the byte size only (what
            cache hits use: artifacts are written atomically, so a torn write cannot
            appear under the final name, and a truncated or replaced file changes size);
            ``False``: no check.

    Returns:
        The parsed ``meta.json``.

    Raises:
        CacheError: the directory, ``meta.json`` or ``model.onnx`` is missing, unreadable,
            of an unknown format version, or does not match its recorded sha256.
    """

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / MODEL_FILE).is_file():
        raise CacheError(
            f"{path} is not a complete mmbridge artifact (needs {MODEL_FILE} and {META_FILE}); "
            f"re-export it with mmbridge.export(...) or `mmbridge export`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{meta_path} is unreadable ({exc}); delete {path} and re-export") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: artifact format {meta.get('format_version')!r} is not the supported {FORMAT_VERSION}; re-export it"
        )
    if check == "size" and meta.get("onnx_bytes") is not None:
        if (path / MODEL_FILE).stat().st_size != meta["onnx_bytes"]:
            raise CacheError(f"{path / MODEL_FILE} does not have the size recorded in {META_FILE} (partial or corrupt); re-export it")
    elif check and sha256_file(path / MODEL_FILE) != meta.get("onnx_sha256"):
        raise CacheError(f"{path / MODEL_FILE} does not match the sha256 in {META_FILE} (partial or corrupt); re-export it")
    return meta


def write_dir(dest: str | os.PathLike, model: Any, meta: dict[str, Any],
              golden: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write an artifact directory atomically: a temporary sibling directory renamed into ``dest``.

    ``golden`` (``{"inputs": {name: array}, "outputs": {name: array}}``) is stored as
    ``golden.npz`` so :func:`mmbridge.verify` can re-check the artifact without TF.

    An existing *valid* artifact at ``dest`` is replaced only after the new one is complete;
    a crash leaves either the old artifact or the new one, never a mix.

    Returns:
        The metadata as written (with ``format_version``, ``onnx_sha256``, ``onnx_bytes``).

    Raises:
        CacheError: ``dest``'s parent is not writable.
    """
    import onnx

    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise CacheError(f"cannot write artifact to {dest}: {exc}") from exc
    try:
        onnx.save_model(model, str(tmp / MODEL_FILE))
        if golden is not None:
            import numpy as np

            arrays = {f"in/{k}": _plain(v) for k, v in golden["inputs"].items()}
            arrays.update({f"out/{k}": _plain(v) for k, v in golden["outputs"].items()})
            np.savez(tmp / GOLDEN_FILE, **arrays)
        meta = dict(meta, format_version=FORMAT_VERSION, onnx_sha256=sha256_file(tmp / MODEL_FILE),
                    onnx_bytes=(tmp / MODEL_FILE).stat().st_size)
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def replace_dir(src: Path, dest: Path) -> None:
    """Move the complete directory ``src`` to ``dest`` by renames (atomic on POSIX within a file
    system): an existing ``dest`` artifact is renamed aside first and deleted after, so a reader
    sees the old directory or the new one, never a mix. ``src`` must be a sibling of ``dest``.

    Raises:
        CacheError: ``dest`` exists, is not empty and is not an artifact (nothing is deleted).
    """
    if dest.exists():
        if not (dest / META_FILE).is_file() and (not dest.is_dir() or any(dest.iterdir())):
            raise CacheError(
                f"{dest} exists and is not an mmbridge artifact (no {META_FILE}); refusing to replace it. "
                f"Give a new or empty directory, e.g. {dest / 'my_bridge'}"
            )
        trash = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:8]}"
        os.rename(dest, trash)
        os.rename(src, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dest)


def _plain(a: Any) -> Any:
    """numpy array safe for ``np.savez(allow_pickle=False)``: object/bytes strings -> unicode."""
    import numpy as np

    a = np.asarray(a)
    if a.dtype == object or a.dtype.kind == "S":
        return np.vectorize(lambda x: x.decode() if isinstance(x, bytes) else str(x), otypes=[str])(a) if a.size else a.astype(str)
    return a


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def entry_dir(name: str, fingerprint: str, root: Path | None = None) -> Path:
    """Cache directory for (name, fingerprint)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return (root or cache_root()) / f"{safe}-{fingerprint[:16]}"


@contextlib.contextmanager
def cache_lock(fingerprint: str, root: Path | None = None, timeout: float = 3600) -> Iterator[None]:
    """Inter-process lock for one fingerprint (``filelock.FileLock`` on ``<cache>/locks/``)."""
    from filelock import FileLock

    lock_dir = (root or cache_root()) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{fingerprint[:32]}.lock"), timeout=timeout):
        yield
