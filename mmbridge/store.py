"""The artifact store: the on-disk format of a bridge artifact and the cache around it.

An artifact is a directory::

    <name>-<fingerprint[:16]>/
        model.onnx    # the optimised, checker-clean graph
        meta.json     # fingerprint, specs, opset, library versions, parity report, sha256 of model.onnx
        golden.npz    # the parity inputs and TF's outputs (re-checks without TensorFlow)

Integrity: ``meta.json`` records the byte size and sha256 of ``model.onnx`` (and the sha256 of
``golden.npz``) at write; every read, cache hits included, compares them (:func:`read_meta`),
so a file altered in place is refused, never used. Every corruption error says how to rebuild.

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


# keys every meta.json must hold: what BridgeArtifact and the backends read without a default
REQUIRED_META_KEYS = ("format_version", "name", "role", "fingerprint", "opset", "inputs", "outputs", "onnx_sha256")


def rebuild_hint(path: str | os.PathLike) -> str:
    """The sentence every corruption message ends with: how to rebuild the artifact at ``path``."""
    return (f"delete {path} or rebuild it: mmbridge.export(..., force=True) in Python, "
            f"`mmbridge export ... --force` on the command line")


def read_meta(path: str | os.PathLike, *, check: bool | str = True) -> dict[str, Any]:
    """Read and validate an artifact directory's ``meta.json`` (and its ``model.onnx``).

    Args:
        path: the artifact directory (holding ``model.onnx`` and ``meta.json``).
        check: ``True`` (also ``"sha256"``, and ``"size"``: see below): verify ``model.onnx``
            against the byte size and the sha256 recorded in ``meta.json`` at write. A cache hit
            uses this: hashing is cheap next to loading the graph (sha256 runs at ~1 GB/s on
            CPUs with SHA instructions: 0.09-0.12 s for ResNet50's 94 MB, measured) and it
            catches a file altered in place without a size change, which a size comparison
            does not. ``"size"`` is kept for callers written when hits compared the size only;
            it now checks the content too (the size first, as a fast reject). ``False``: no
            check of ``model.onnx`` (the keys of ``meta.json`` are still validated).

    Returns:
        The parsed ``meta.json``.

    Raises:
        CacheError: the directory, ``meta.json`` or ``model.onnx`` is missing or unreadable;
            ``meta.json`` is of an unknown format version, lacks required keys
            (:data:`REQUIRED_META_KEYS`) or holds malformed input / output specs; or
            ``model.onnx`` does not match its recorded size and sha256. Each message names the
            file and ends with how to rebuild (:func:`rebuild_hint`).
    """
    if check not in (True, False, "sha256", "size"):
        raise ValueError(f"read_meta(check=...) must be True, False, 'sha256' or 'size', got {check!r}")
    path = Path(path)
    meta_path = path / META_FILE
    model_path = path / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise CacheError(
            f"{path} is not a complete mmbridge artifact (needs {MODEL_FILE} and {META_FILE}); "
            f"re-export it: {rebuild_hint(path)}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{meta_path} is unreadable ({exc}); {rebuild_hint(path)}") from exc
    if not isinstance(meta, dict):
        raise CacheError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; {rebuild_hint(path)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: artifact format {meta.get('format_version')!r} is not the supported {FORMAT_VERSION}; "
            f"{rebuild_hint(path)}"
        )
    _validate_meta(meta, meta_path)
    if check:
        size, want_size = model_path.stat().st_size, meta.get("onnx_bytes")
        if (want_size is not None and size != want_size) or sha256_file(model_path) != meta["onnx_sha256"]:
            raise CacheError(
                f"{model_path} does not match the sha256 recorded in {META_FILE} ({size} bytes; recorded "
                f"{want_size} bytes, sha256 {str(meta['onnx_sha256'])[:16]}...): partial or corrupt; "
                f"{rebuild_hint(path)}"
            )
    return meta


def _validate_meta(meta: dict[str, Any], meta_path: Path, fix: str | None = None) -> None:
    """Refuse a meta.json that lacks what the artifact's readers index without a default.

    ``fix``: the sentence that ends the message (default: :func:`rebuild_hint`).
    """
    from mmbridge.specs import TensorSpec

    fix = fix or rebuild_hint(meta_path.parent)
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise CacheError(f"{meta_path} lacks the required key(s) {missing} (has {sorted(meta)}); {fix}")
    problems = []
    for key in ("name", "role", "fingerprint", "onnx_sha256"):
        if not isinstance(meta[key], str) or not meta[key]:
            problems.append(f"{key!r} must be a non-empty string, got {meta[key]!r}")
    if isinstance(meta["opset"], bool) or not isinstance(meta["opset"], int):
        problems.append(f"'opset' must be an int, got {meta['opset']!r}")
    for key in ("inputs", "outputs"):
        items = meta[key]
        if not isinstance(items, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in items):
            problems.append(f"{key!r} must be a list of specs with a 'name', got {str(items)[:80]}")
        elif key == "inputs":
            for d in items:
                try:
                    TensorSpec.from_dict(d)
                except (KeyError, TypeError, ValueError) as exc:
                    problems.append(f"input spec {d.get('name')!r} is malformed ({type(exc).__name__}: {exc})")
    if problems:
        raise CacheError(f"{meta_path} is malformed: " + "; ".join(problems) + f"; {fix}")


def write_dir(dest: str | os.PathLike, model: Any, meta: dict[str, Any],
              golden: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write an artifact directory atomically: a temporary sibling directory renamed into ``dest``.

    ``golden`` (``{"inputs": {name: array}, "outputs": {name: array}}``) is stored as
    ``golden.npz`` so :func:`mmbridge.verify` can re-check the artifact without TF.

    An existing *valid* artifact at ``dest`` is replaced only after the new one is complete;
    a crash leaves either the old artifact or the new one, never a mix.

    Returns:
        The metadata as written (with ``format_version``, ``onnx_sha256``, ``onnx_bytes`` and, with
        ``golden``, ``golden_sha256``).

    Raises:
        CacheError: ``dest``'s parent is not writable, or ``meta`` (with what this adds) lacks a
            key of :data:`REQUIRED_META_KEYS` or holds malformed specs (nothing is written).
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
        if golden is not None:
            meta["golden_sha256"] = sha256_file(tmp / GOLDEN_FILE)
        text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
        # refuse to write what read_meta would refuse (a cache entry that could never be hit)
        _validate_meta(json.loads(text), dest / META_FILE,
                       fix=f"fix the code that writes the artifact (required keys: {list(REQUIRED_META_KEYS)})")
        with open(tmp / META_FILE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CacheError):
            raise
        import errno

        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}.get(exc.errno, str(exc))
        raise CacheError(exc.errno or 0, f"cannot write artifact {dest}: {why} ({exc}); nothing was left behind. "
                         f"Free space under {dest.parent}, or point MMBRIDGE_CACHE (or cache_dir= / --out) at "
                         f"another disk, then export again") from exc
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
