"""What determines an exported graph: the artifact fingerprint (the cache key) and its parts.

Two fingerprints, both sha256 hex:

* :func:`path_fingerprint` -- a Keras file or a SavedModel directory, by the bytes of its files
  (computed without TensorFlow: a cache hit never starts TF);
* :func:`live_fingerprint` -- a live object, by what its source adapter hashes
  (:func:`keras_payload` for Keras: config, weights, adapted state; otherwise the frozen graph).

Both include the :class:`~mmbridge.export.options.ExportOptions` (all fields but the name), the
sample inputs when given (:func:`samples_bytes`) and :func:`export_versions`, so a cached
artifact is never reused after the options, the parity samples, TensorFlow, tf2onnx, onnx,
onnxoptimizer or mmbridge's export code changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmbridge.info import EXPORT_DISTRIBUTIONS, dist_version

if TYPE_CHECKING:
    from mmbridge.export.options import ExportOptions
    from mmbridge.specs import TensorSpec

# mmbridge's own modules that shape an exported graph: their bytes are part of every fingerprint,
# so a cached artifact is never reused after the export code changed.
_EXPORT_CODE = ("export", "graph")  # packages of mmbridge, every .py file in them
_export_code_hash: str | None = None


def export_code_hash() -> str:
    """sha256 (first 16 hex digits) of the ``.py`` files of mmbridge's export and graph packages."""
    global _export_code_hash
    if _export_code_hash is None:
        import hashlib
        from pathlib import Path

        h = hashlib.sha256()
        root = Path(__file__).resolve().parents[1]
        for package in _EXPORT_CODE:
            for path in sorted((root / package).glob("*.py")):
                h.update(f"{package}/{path.name}".encode() + path.read_bytes())
        _export_code_hash = h.hexdigest()[:16]
    return _export_code_hash


def export_versions() -> dict[str, str]:
    """Versions that determine an exported graph (only the installed ones), and the export code hash."""
    from mmbridge._version import __version__

    v = {n: dist_version(n) for n in EXPORT_DISTRIBUTIONS}
    return {"mmbridge": __version__, "mmbridge_export_code": export_code_hash(), **{k: x for k, x in v.items() if x}}


def state_fingerprint(obj: Any) -> bytes:
    """Bytes of the adapted state of Keras preprocessing layers that is *not* in their weights.

    ``StringLookup`` / ``IntegerLookup`` / ``TextVectorization`` keep an adapted vocabulary in a
    lookup table (not a weight, and not in ``get_config()`` after ``adapt``), and
    ``Discretization`` keeps adapted ``bin_boundaries`` as an attribute. A fingerprint made of
    config + weights therefore does not change when such a layer is re-adapted, and a cached
    artifact with the *old* vocabulary would be returned (measured: TextVectorization re-adapted
    on other text gave the same fingerprint and stale ids). Hash this into the fingerprint.

    Args:
        obj: a Keras layer or model (anything else gives ``b""``).

    Returns:
        Deterministic bytes: for each sub-layer (in ``_flatten_layers`` order) its path, the
        vocabulary (``get_vocabulary(include_special_tokens=True)``) and ``bin_boundaries``.
    """
    import json

    layers = [obj]
    flatten = getattr(obj, "_flatten_layers", None)
    if flatten is not None:
        layers += list(flatten(include_self=False, recursive=True))
    parts: list[Any] = []
    for i, layer in enumerate(layers):
        entry: dict[str, Any] = {}
        get_vocab = getattr(layer, "get_vocabulary", None)
        if callable(get_vocab):
            try:
                vocab = get_vocab(include_special_tokens=True)
            except TypeError:
                vocab = get_vocab()
            entry["vocabulary"] = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                                   for v in vocab]
        bounds = getattr(layer, "bin_boundaries", None)
        if bounds is not None:
            entry["bin_boundaries"] = [float(b) for b in np.asarray(bounds, np.float64).reshape(-1)]
        if entry:
            parts.append([i, getattr(layer, "name", ""), entry])
    return json.dumps(parts, sort_keys=True).encode("utf-8") if parts else b""


def samples_bytes(samples: Mapping[str, Any] | None) -> bytes:
    """Deterministic bytes of parity sample inputs: name, dtype, shape and data of each array.

    Args:
        samples: ``{input name: array-like}`` (string inputs as object arrays), or ``None``.

    Returns:
        ``b""`` for ``None`` or ``{}`` (the default samples follow from the specs, which are
        hashed already); otherwise the arrays in sorted-name order.
    """
    out = bytearray()
    for k in sorted(samples or {}):
        a = np.ascontiguousarray(np.asarray(samples[k]))
        out += f"{k}:{a.dtype}:{a.shape}".encode() + (a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return bytes(out)


def path_fingerprint(path: str | Path, options: ExportOptions, samples: Mapping[str, Any] | None) -> str:
    """sha256 of a Keras file or of every file of a SavedModel directory, plus options and versions.

    Reads only bytes (no TensorFlow), so an unchanged file is a cache hit without starting TF.

    Args:
        path: a file (hashed with its base name) or a directory (every file below it, with its
            relative path, in sorted order).
        options: the export options (``name`` is not hashed).
        samples: the parity sample inputs as arrays, or ``None``.
    """
    from mmbridge.artifact import sha256_file

    h = hashlib.sha256(b"path-v1")
    h.update(options.fingerprint_bytes())
    h.update(json.dumps(export_versions(), sort_keys=True).encode())
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        h.update(sha256_file(f).encode())
    h.update(samples_bytes(samples))
    return h.hexdigest()


def live_fingerprint(kind: str, specs: Sequence[TensorSpec], options: ExportOptions,
                     samples: Mapping[str, Any] | None, payload: bytes) -> str:
    """sha256 of what determines the graph exported from a live object.

    Args:
        kind: the source kind (``"keras_model"``, ``"tf_function"``...).
        specs: the resolved input specs.
        options: the export options (``name`` is not hashed).
        samples: the parity sample inputs as arrays, or ``None``; hashed, so re-exporting with
            other (e.g. harder) samples re-checks parity instead of reusing the old artifact.
        payload: what the source adapter hashes: :func:`keras_payload`, or the frozen graph.
    """
    h = hashlib.sha256()
    h.update(options.fingerprint_bytes())
    h.update(json.dumps([s.to_dict() for s in specs]).encode())
    h.update(json.dumps(export_versions(), sort_keys=True).encode())
    h.update(kind.encode())
    h.update(payload)
    h.update(samples_bytes(samples))
    return hashlib.sha256(h.digest()).hexdigest()


_BUILTIN_LAYER_MODULES = ("keras", "tf_keras")


def keras_payload(obj: Any) -> bytes | None:
    """Bytes that determine a Keras model or layer's graph, without tracing it.

    Class, config JSON, the source of every non-Keras layer class (subclassed layers), every
    weight's path, dtype, shape and bytes, and :func:`state_fingerprint` (ResNet50 hashes in
    ~0.1 s). Works for Keras 3 and tf-keras objects.

    Returns:
        The bytes, or ``None`` when the object cannot be described this way (``get_config``
        not implemented, weights without values...): then the frozen graph is hashed instead.
    """
    h = hashlib.sha256()
    try:
        cfg = json.dumps(obj.get_config(), sort_keys=True, default=str)
        h.update(type(obj).__qualname__.encode() + cfg.encode())
        layers = [obj, *getattr(obj, "_flatten_layers", lambda **k: [])(include_self=False, recursive=True)]
        for layer in layers:
            cls = type(layer)
            if not cls.__module__.startswith(_BUILTIN_LAYER_MODULES):
                with contextlib.suppress(OSError, TypeError):
                    h.update(inspect.getsource(cls).encode())
        for w in obj.weights:
            a = np.asarray(w.numpy())
            h.update(f"{w.path if hasattr(w, 'path') else w.name}:{a.dtype}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(state_fingerprint(obj))  # adapted vocabularies / bin boundaries: not weights
    except (NotImplementedError, TypeError, AttributeError, ValueError):
        return None
    return h.digest()
