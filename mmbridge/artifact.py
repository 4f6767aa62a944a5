"""``BridgeArtifact``: an exported, checked ONNX graph plus its metadata, and the artifact cache.

On disk an artifact is a directory::

    <name>-<fingerprint[:16]>/
        model.onnx    # the optimised, checker-clean graph
        meta.json     # fingerprint, specs, opset, library versions, parity report, sha256 of model.onnx

The cache lives under ``$MMBRIDGE_CACHE`` (default: the user cache dir, e.g.
``~/.cache/mmbridge``). Entries are written to a temporary directory and renamed into place
(atomic on POSIX), under a per-fingerprint file lock (``filelock``), so N processes exporting
the same bridge at once leave exactly one valid artifact. An entry whose ``meta.json`` is
missing or whose ``model.onnx`` does not match the recorded sha256 is treated as absent and
rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CacheError
from .specs import TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

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


class BridgeArtifact:
    """An exported bridge: ``model.onnx`` + ``meta.json`` in one directory.

    Create one with :func:`mmbridge.export`; reopen one with :meth:`load` (no TensorFlow needed).

    Attributes:
        path: the artifact directory.
        meta: the parsed ``meta.json`` (see :mod:`mmbridge.artifact` for the fields).
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta
        self._model: onnx.ModelProto | None = None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def role(self) -> str:
        return self.meta["role"]

    @property
    def fingerprint(self) -> str:
        """sha256 over what determines the graph: TF graph / weights, specs, opset, versions."""
        return self.meta["fingerprint"]

    @property
    def opset(self) -> int:
        return int(self.meta["opset"])

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_dict(d) for d in self.meta["inputs"])

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.meta["outputs"]]

    @property
    def parity(self) -> dict[str, Any] | None:
        """The parity report recorded at export (``ParityReport.to_dict()``), or None."""
        return self.meta.get("parity")

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model(self) -> onnx.ModelProto:
        """The ONNX ``ModelProto`` (loaded on first access)."""
        if self._model is None:
            import onnx

            self._model = onnx.load(str(self.onnx_path))
        return self._model

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.input_specs)
        return f"BridgeArtifact({self.name!r}, role={self.role}, opset={self.opset}, inputs=[{ins}], path={str(self.path)!r})"

    # -- backends ---------------------------------------------------------------------------
    def to_torch(self, *, trainable: bool = True) -> torch.nn.Module:
        """Materialise as a ``torch.nn.Module`` (onnx2torch + mmbridge converters).

        See :func:`mmbridge.backends.torch_backend.to_torch` for arguments, shapes and errors.
        """
        from ._tf import guard_torch_stack

        guard_torch_stack("BridgeArtifact.to_torch()")  # onnx2torch imports torchvision
        from .backends.torch_backend import to_torch

        return to_torch(self, trainable=trainable)

    def to_ort(self, *, device: Any = None, **session_options: Any) -> torch.nn.Module:
        """Materialise as a frozen onnxruntime session wrapped in an ``nn.Module`` (IO binding).

        See :func:`mmbridge.backends.ort_backend.to_ort` for arguments, shapes and errors.
        """
        from .backends.ort_backend import to_ort

        return to_ort(self, device=device, **session_options)

    # -- persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool | str = True) -> BridgeArtifact:
        """Open an artifact directory without TensorFlow.

        Args:
            path: the artifact directory (holding ``model.onnx`` and ``meta.json``).
            check: ``True``: verify ``model.onnx`` against the sha256 recorded in ``meta.json``
                (~0.25 s for ResNet50's 94 MB); ``"size"``: compare the byte size only (what
                cache hits use: artifacts are written atomically, so a torn write cannot
                appear under the final name, and a truncated or replaced file changes size);
                ``False``: no check.

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
        return cls(path, meta)

    @staticmethod
    def write(dest: str | os.PathLike, model: onnx.ModelProto, meta: dict[str, Any],
              golden: dict[str, dict[str, Any]] | None = None) -> BridgeArtifact:
        """Write an artifact atomically: a temporary sibling directory renamed into ``dest``.

        ``golden`` (``{"inputs": {name: array}, "outputs": {name: array}}``) is stored as
        ``golden.npz`` so :func:`mmbridge.verify` can re-check the artifact without TF.

        An existing *valid* artifact at ``dest`` is replaced only after the new one is complete;
        a crash leaves either the old artifact or the new one, never a mix.

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
        return BridgeArtifact(dest, meta)


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


def cached_or_build(
    name: str,
    fingerprint: str,
    build: Callable[[], tuple[Any, ...]],
    *,
    root: Path | None = None,
    force: bool = False,
) -> tuple[BridgeArtifact, bool]:
    """Return the cached artifact for ``fingerprint``, building and writing it if absent.

    Args:
        name: bridge name (part of the directory name).
        fingerprint: content fingerprint; the cache key.
        build: ``() -> (ModelProto, meta[, golden])``, called at most once, under the lock.
        root: cache root (default :func:`cache_root`).
        force: rebuild even if a valid entry exists.

    Returns:
        ``(artifact, hit)`` where ``hit`` is True when the entry came from the cache.
    """
    dest = entry_dir(name, fingerprint, root)
    if not force:
        with contextlib.suppress(CacheError):
            return BridgeArtifact.load(dest, check="size"), True
    with cache_lock(fingerprint, root):
        if not force:  # another process may have finished while we waited
            with contextlib.suppress(CacheError):
                return BridgeArtifact.load(dest, check="size"), True
        model, meta, *golden = build()
        meta = dict(meta, name=name, fingerprint=fingerprint)
        return BridgeArtifact.write(dest, model, meta, golden[0] if golden else None), False
