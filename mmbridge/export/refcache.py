"""Cache hits for ``"module:attribute"`` references without starting TensorFlow.

A reference's graph is only known once its builder ran, in the export child (which imports TF,
~20 s). So the child also records *which source files the builder's process loaded* outside the
standard library and site-packages (the reference's own module, the modules it imports, and
mmbridge's code), each with its sha256; the parent stores that next to the artifact under
``<cache>/refs/<key>.json``, keyed by the reference, the export options, the sample inputs and the
library versions. The next export of the same reference is a cache hit, in this process and
without TensorFlow, when every recorded file still has its recorded bytes.

What this cannot see: data a builder reads at run time (a weights file opened with ``open()``,
an environment variable). Pass ``force=True`` (``mmbridge export --force``) after changing those,
or export the file itself (``.keras`` / SavedModel paths are fingerprinted by their bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbridge.errors import CacheError
from mmbridge.store import sha256_file

FORMAT = 1


def _key(ref: str, options_hash: str, samples: bytes, versions: Mapping[str, str]) -> str:
    h = hashlib.sha256(f"ref-v{FORMAT}:{ref}:{options_hash}".encode())
    h.update(samples)
    h.update(json.dumps(dict(versions), sort_keys=True).encode())
    return h.hexdigest()


def record_path(root: Path, ref: str, options_hash: str, samples: bytes, versions: Mapping[str, str]) -> Path:
    """``<root>/refs/<key>.json`` for one reference export."""
    return Path(root) / "refs" / f"{_key(ref, options_hash, samples, versions)}.json"


def _library_dirs() -> list[str]:
    dirs = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return sorted(os.path.realpath(d) for d in dirs if d)


def loaded_source_files() -> dict[str, str]:
    """``{file: sha256}`` of every loaded module file outside the standard library and site-packages."""
    libs = _library_dirs()
    files: dict[str, str] = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py") or os.path.basename(f).startswith("__autograph_generated"):
            continue  # (autograph writes the code it converts to temporary modules)
        real = os.path.realpath(f)
        if any(real.startswith(d + os.sep) for d in libs) or not os.path.isfile(real):
            continue
        files[real] = sha256_file(real)
    return files


def lookup(path: Path) -> str | None:
    """The artifact directory recorded at ``path`` if every recorded file is unchanged, else None."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("format") != FORMAT or not isinstance(rec.get("files"), dict):
        return None
    for f, digest in rec["files"].items():
        try:
            if sha256_file(f) != digest:
                return None
        except OSError:
            return None
    return rec.get("artifact")


def save(path: Path, artifact: str | os.PathLike, files: Mapping[str, str]) -> None:
    """Record that the reference of ``path`` exported to ``artifact`` from ``files``.

    Raises:
        CacheError: the record cannot be written (the export itself stands; the next call re-exports).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot write the reference record {path}: {exc}") from exc
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"format": FORMAT, "artifact": str(artifact), "files": dict(files)}, indent=1,
                                  sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old record or the new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"cannot write the reference record {path}: {exc}") from exc


def describe(files: Mapping[str, Any]) -> str:
    """One line for logs: how many files a reference's cache hit depends on."""
    return f"{len(files)} source file(s)"
