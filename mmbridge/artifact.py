"""``BridgeArtifact``: an exported, checked ONNX graph plus its metadata, and the cache lookup.

The files and their format are :mod:`mmbridge.store`'s; this is the object users hold, with
the two ways to run it: :meth:`BridgeArtifact.to_torch` (trainable module) and
:meth:`BridgeArtifact.to_ort` (frozen onnxruntime module).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbridge.errors import CacheError
from mmbridge.specs import TensorSpec
from mmbridge.store import (  # noqa: F401  (re-exported for callers of the old module)
    GOLDEN_FILE,
    META_FILE,
    MODEL_FILE,
    cache_lock,
    cache_root,
    entry_dir,
    read_meta,
    replace_dir,
    sha256_file,
    write_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

logger = logging.getLogger(__name__)


class BridgeArtifact:
    """An exported bridge: ``model.onnx`` + ``meta.json`` in one directory.

    Create one with :func:`mmbridge.export`; reopen one with :meth:`load` (no TensorFlow needed).

    Attributes:
        path: the artifact directory.
        meta: the parsed ``meta.json`` (see :mod:`mmbridge.store` for the fields).
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
    def to_torch(self, *, trainable: bool | None = None, allow_unverified: bool = False) -> torch.nn.Module:
        """Materialise as a ``torch.nn.Module`` (onnx2torch + mmbridge converters).

        ``trainable`` defaults to what the artifact is for: an inference export of a Keras model
        (BatchNorm folded, Dropout gone) converts frozen, and ``trainable=True`` on one raises
        :class:`~mmbridge.errors.ConversionError` (re-export with ``trainable=True``, or pass
        ``trainable=False``); every other artifact converts trainable. A trainable Keras export
        is checked against its Keras inventory (the weight audit) on conversion. An artifact whose
        export found the torch backend wrong (``meta["backends"]["torch"]``: does not convert, or
        does not match TensorFlow at some checked shape) raises ``ConversionError`` with the
        recorded reason and the fix (``to_ort()``), unless ``allow_unverified=True``.
        See :func:`mmbridge.convert.core.to_torch` for arguments, shapes and errors.
        """
        from mmbridge._torch_stack import guard_torch_stack

        guard_torch_stack("BridgeArtifact.to_torch()")  # onnx2torch imports torchvision
        from mmbridge.convert.core import to_torch

        return to_torch(self, trainable=trainable, allow_unverified=allow_unverified)

    def to_ort(self, *, device: Any = None, **session_options: Any) -> torch.nn.Module:
        """Materialise as a frozen onnxruntime session wrapped in an ``nn.Module`` (IO binding).

        See :func:`mmbridge.runtime.module.to_ort` for arguments, shapes and errors.
        """
        from mmbridge.runtime.module import to_ort

        return to_ort(self, device=device, **session_options)

    # -- persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool | str = True) -> BridgeArtifact:
        """Open an artifact directory without TensorFlow.

        Args:
            path: the artifact directory (holding ``model.onnx`` and ``meta.json``).
            check: ``True`` (and ``"size"``, kept for old callers): verify ``model.onnx``
                against its recorded size and sha256 (~0.1 s for 94 MB); ``False``: no check of
                the graph's bytes (see :func:`mmbridge.store.read_meta`). ``meta.json``'s
                required keys are validated either way.

        Raises:
            CacheError: the directory, ``meta.json`` or ``model.onnx`` is missing, unreadable,
                of an unknown format version, lacks required keys, or does not match its
                recorded sha256; the message says how to rebuild (``force=True`` / ``--force``).
        """
        return cls(Path(path), read_meta(path, check=check))

    @staticmethod
    def write(dest: str | os.PathLike, model: onnx.ModelProto, meta: dict[str, Any],
              golden: dict[str, dict[str, Any]] | None = None) -> BridgeArtifact:
        """Write an artifact atomically and return it (see :func:`mmbridge.store.write_dir`).

        Raises:
            CacheError: ``dest``'s parent is not writable.
        """
        return BridgeArtifact(Path(dest), write_dir(dest, model, meta, golden))


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
        ``(artifact, hit)`` where ``hit`` is True when the entry came from the cache. A hit is
        checked in full (size and sha256 of ``model.onnx``, keys of ``meta.json``); an entry that
        fails the check is logged at WARNING and rebuilt, never used.
    """
    dest = entry_dir(name, fingerprint, root)
    if not force:
        hit = _load_hit(dest)
        if hit is not None:
            return hit, True
    with cache_lock(fingerprint, root):
        if not force:  # another process may have finished while we waited
            hit = _load_hit(dest)
            if hit is not None:
                return hit, True
        model, meta, *golden = build()
        meta = dict(meta, name=name, fingerprint=fingerprint)
        stale = _set_aside_non_artifact(dest)
        art = BridgeArtifact.write(dest, model, meta, golden[0] if golden else None)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        return art, False


def _set_aside_non_artifact(dest: Path) -> Path | None:
    """A cache entry directory without meta.json (e.g. meta.json deleted by hand) cannot be
    replaced by :func:`replace_dir`, which protects users' own directories; inside the cache it
    is ours, so it is renamed aside (deleted after the rebuild). Returns where it went, or None."""
    if not dest.is_dir() or (dest / META_FILE).is_file():
        return None
    stale = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:8]}"
    os.rename(dest, stale)
    return stale


def _load_hit(dest: Path) -> BridgeArtifact | None:
    """The cache entry at ``dest`` when it is complete and its content matches its recorded
    sha256; ``None`` when absent or corrupt (a corrupt entry is logged, then rebuilt)."""
    if not dest.exists():
        return None
    try:
        return BridgeArtifact.load(dest, check=True)
    except CacheError as exc:
        logger.warning("cache entry %s is unusable and will be rebuilt: %s", dest, exc)
        return None
