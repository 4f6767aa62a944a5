"""What determines an exported graph: the library versions and mmbridge's own export code.

Every artifact fingerprint (the cache key) includes :func:`export_versions`, so a cached artifact
is never reused after TensorFlow, tf2onnx, onnx, onnxoptimizer or mmbridge's export code changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmbridge.info import EXPORT_DISTRIBUTIONS, dist_version

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
