"""TF -> ONNX export: ``mmbridge.export``.

Pipeline (each step is a function below, in order):

1. **resolve** what was given: a ``tf.function``, a Keras model or layer, a Keras model file
   (``.keras`` / ``.h5``), a SavedModel directory, a ``"module:attribute"`` reference, a
   registered bridge name or a :class:`~mmbridge.BridgeSpec`;
2. **fingerprint** it (what determines the graph: weights and config, or the frozen graph;
   specs, opset, options, library versions) and return the cached artifact on a hit;
3. **trace and freeze** into a concrete function with one placeholder per input spec; captured
   tensors (a module-level ``tf.constant`` used inside a ``tf.function``) are frozen into the
   graph instead of becoming extra graph inputs;
4. **convert** with tf2onnx (``from_graph_def``: Keras 3 models never go through tf2onnx's
   Keras-2 helpers, which raise ``KeyError: 'keras_tensor_1'``, onnx/tensorflow-onnx#2348);
5. **repair** what tf2onnx leaves behind with an exact ONNX form (:data:`ONNX_REWRITES`, e.g.
   ``Erfc(x) = 1 - Erf(x)`` for exact GELU), then **refuse** every remaining non-ONNX node
   with one :class:`UnsupportedOpsError` listing op, node and origin;
6. ``onnx.checker`` (full check, with shape inference) and an onnxruntime load;
7. **optimise** with onnxoptimizer, one pass at a time, keeping a pass only if parity holds;
8. **verify** parity against TF on the sample inputs (``ParityError`` on failure);
9. **write** the artifact atomically into the cache (with ``golden.npz`` for later checks).

Exports of a SavedModel path, a Keras file, a reference or an importable registered builder
run in a spawned child process by default (``isolate=None``), so the calling process never
loads TensorFlow (DESIGN.md, "TF isolation").
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.artifact import BridgeArtifact, cache_root, cached_or_build, entry_dir
from mmbridge.errors import CacheError, ExportError, SpecError, UnsupportedOpsError
from mmbridge.export import _tf
from mmbridge.export.fingerprint import export_versions
from mmbridge.export.rewrites import repair_and_check_ops
from mmbridge.graph.passes import backend_requirements, resize_scales_to_sizes
from mmbridge.parity import GOLDEN_FILE, ParityReport, compare, run_ort
from mmbridge.specs import BridgeSpec, TensorSpec, Tolerance, samples_from_specs

logger = logging.getLogger("mmbridge.export")

DEFAULT_OPSET = 17

# onnxoptimizer passes that only remove or fold (never add runtime nodes). Each is applied on
# its own and kept only if ORT parity still holds after it.
SAFE_PASSES = (
    "eliminate_deadend",
    "eliminate_identity",
    "eliminate_nop_dropout",
    "eliminate_nop_monotone_argmax",
    "eliminate_nop_pad",
    "eliminate_nop_concat",
    "eliminate_nop_split",
    "eliminate_nop_expand",
    "eliminate_nop_transpose",
    "eliminate_nop_reshape",
    "eliminate_nop_flatten",
    "eliminate_duplicate_initializer",
    "eliminate_consecutive_idempotent_ops",
    "fuse_consecutive_transposes",
    "fuse_consecutive_squeezes",
    "fuse_consecutive_unsqueezes",
    "fuse_consecutive_reduce_unsqueeze",
    "fuse_transpose_into_gemm",
    "eliminate_unused_initializer",
)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def export(
    obj: Any,
    *,
    input_specs: Sequence[TensorSpec] | None = None,
    opset: int | None = None,
    name: str | None = None,
    role: str | None = None,
    tolerance: Tolerance | None = None,
    sample_inputs: Mapping[str, np.ndarray] | Callable[[int, int], Mapping[str, np.ndarray]] | None = None,
    inputs_as_nchw: Sequence[str] | None = None,
    trainable: bool = False,
    optimize: bool = True,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    isolate: bool | None = None,
    out: str | os.PathLike | None = None,
) -> BridgeArtifact:
    """Export a TensorFlow object to a checked, cached ONNX :class:`~mmbridge.BridgeArtifact`.

    Args:
        obj: a ``tf.function``; a Keras model (functional, ``Sequential`` or subclassed) or
            layer; a SavedModel directory; a Keras model file (``.keras``, ``.h5``); a
            ``"module:attribute"`` reference to any of these (or to a zero-argument builder
            returning one); a registered bridge name; or a :class:`~mmbridge.BridgeSpec`.
        input_specs: the graph inputs in call order. Optional when they can be read from
            ``obj`` (a ``tf.function`` with ``input_signature``, a functional Keras model, a
            SavedModel signature, a registered bridge). TF images are NHWC.
        opset: ONNX opset (default 17, or the bridge's).
        name: artifact name (default: the bridge / model / function name).
        role: ``"preprocess"`` or ``"encoder"`` (metadata; default ``"encoder"``).
        tolerance: parity tolerance for floating outputs (default: :data:`mmbridge.parity.TOLERANCES`).
        sample_inputs: inputs for the parity check, as ``{name: array}`` or ``(batch, seed) ->
            {name: array}``; default: drawn from the specs' dtypes and value ranges, batch 2.
        inputs_as_nchw: input names that the ONNX graph should take as NCHW instead of TF's
            NHWC (tf2onnx's ``inputs_as_nchw``; the parity check transposes for TF).
        trainable: export for fine-tuning: BatchNormalization, Dropout and LayerNormalization
            stay real ONNX ops (see :mod:`mmbridge.export.trainable`) instead of being folded away.
        optimize: run onnxoptimizer's parity-preserving passes.
        verify: check parity against TF (always done unless False; ``ParityError`` on failure).
        cache_dir: cache root (default ``$MMBRIDGE_CACHE`` or the user cache dir).
        force: re-export even if the cache holds a valid artifact.
        isolate: export in a spawned child process. Default: yes for paths, references and
            importable registered builders; in-process for live TF objects.
        out: also copy the artifact directory here (atomically).

    Returns:
        The :class:`~mmbridge.BridgeArtifact` (``model.onnx`` + ``meta.json`` + ``golden.npz``).

    Raises:
        UnsupportedOpsError: the graph needs ops with no ONNX form; lists each op, node, origin.
        ExportError: tf2onnx failed, or the result fails ``onnx.checker`` / onnxruntime loading or running.
        ParityError: ORT's outputs differ from TF's beyond the tolerance.
        ImportOrderError: in-process export with TF imported before torch's compiler stack.
        SpecError: input specs are missing or disagree with the TF object.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    spec: BridgeSpec | None = None
    if isinstance(obj, str) and not _looks_like_path_or_ref(obj):
        from mmbridge.registry import get_bridge

        spec = get_bridge(obj)
    elif isinstance(obj, BridgeSpec):
        spec = obj
    if spec is not None:
        input_specs = input_specs or spec.input_specs
        opset = opset or spec.opset
        name = name or spec.name
        role = role or spec.role
        tolerance = tolerance or spec.tolerance
        sample_inputs = sample_inputs or spec.sample_inputs
        from mmbridge.registry import BRIDGE_EXPORT_KEYS

        ek = dict(spec.export_kwargs)
        unknown = sorted(set(ek) - set(BRIDGE_EXPORT_KEYS))
        if unknown:
            raise SpecError(f"bridge {spec.name!r}: export options {unknown} are not export() arguments; "
                            f"allowed: {list(BRIDGE_EXPORT_KEYS)}")
        # the registration's options apply where the call left the argument at its default
        inputs_as_nchw = inputs_as_nchw if inputs_as_nchw is not None else ek.get("inputs_as_nchw")
        trainable = trainable or bool(ek.get("trainable", False))
        optimize = optimize and bool(ek.get("optimize", True))
        verify = verify and bool(ek.get("verify", True))
        obj = spec.builder
        if isolate is None and callable(obj) and _importable_ref(obj):
            obj = _importable_ref(obj)
    opset = opset or DEFAULT_OPSET
    role = role or "encoder"
    if role not in ("preprocess", "encoder"):
        raise SpecError(f"export(role=...): must be 'preprocess' or 'encoder', got {role!r}")
    options = dict(
        input_specs=[s.to_dict() for s in input_specs] if input_specs else None,
        opset=opset, name=name, role=role, tolerance=tolerance.to_dict() if tolerance else None,
        inputs_as_nchw=list(inputs_as_nchw) if inputs_as_nchw else None, trainable=bool(trainable),
        optimize=optimize, verify=verify,
    )

    if isinstance(obj, (str, os.PathLike)):
        path_like = os.fspath(obj)
        if isolate is None:
            isolate = True
        if callable(sample_inputs):  # numpy-only callables: evaluate here, pass arrays on
            sample_inputs = dict(sample_inputs(2, 0))
        fingerprint = None
        if os.path.exists(path_like):
            # files are fingerprinted by their bytes, without TF: a cache hit never starts TF
            options["name"] = options["name"] or _path_name(path_like)
            fingerprint = _path_fingerprint(path_like, options, sample_inputs)
            if not force:
                with contextlib.suppress(CacheError):
                    return _copy_out(BridgeArtifact.load(entry_dir(options["name"], fingerprint, root), check="size"), out)
        if isolate:
            art = _export_in_child(path_like, options, sample_inputs, root, force, fingerprint)
            return _copy_out(art, out)
        obj = _load_reference(path_like)
        return _copy_out(_export_live(obj, options, sample_inputs, root, force, fingerprint), out)
    art = _export_live(obj, options, sample_inputs, root, force)
    return _copy_out(art, out)


def _path_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.is_file() else (p.resolve().name or "saved_model")


def _path_fingerprint(path: str, options: Mapping[str, Any], samples: Mapping[str, np.ndarray] | None) -> str:
    """sha256 of a Keras file or every file of a SavedModel directory, plus options and versions."""
    from mmbridge.artifact import sha256_file

    h = hashlib.sha256(b"path-v1")
    h.update(json.dumps({k: v for k, v in options.items() if k != "name"}, sort_keys=True, default=str).encode())
    h.update(json.dumps(export_versions(), sort_keys=True).encode())
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        h.update(sha256_file(f).encode())
    for k in sorted(samples or {}):
        a = np.ascontiguousarray(np.asarray(samples[k]))
        h.update(f"{k}:{a.dtype}:{a.shape}".encode() + (a.tobytes() if a.dtype != object else repr(a.tolist()).encode()))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# resolution helpers
# ---------------------------------------------------------------------------------------------
def _looks_like_path_or_ref(s: str) -> bool:
    return os.path.exists(s) or ":" in s and not os.path.isabs(s) or s.endswith((".keras", ".h5", ".hdf5"))


def _importable_ref(fn: Callable[..., Any]) -> str | None:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        return None
    return f"{mod}:{qual}"


def _load_reference(ref: str) -> Any:
    """Turn a path or ``"module:attribute"`` into a TF object (TF is imported here)."""
    tf = _tf.import_tensorflow()
    if os.path.isdir(ref):
        if not os.path.isfile(os.path.join(ref, "saved_model.pb")):
            raise SpecError(f"export({ref!r}): directory has no saved_model.pb; pass a SavedModel directory")
        return _SavedModelSource(ref, tf.saved_model.load(ref))
    if os.path.isfile(ref):
        if not ref.endswith((".keras", ".h5", ".hdf5")):
            raise SpecError(f"export({ref!r}): a file must be a Keras model (.keras, .h5); got another extension")
        import keras

        return keras.models.load_model(ref, compile=False)
    if ":" not in ref:
        raise SpecError(f"export({ref!r}): not a path, a 'module:attribute' reference or a registered bridge")
    mod_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SpecError(f"export({ref!r}): cannot import module {mod_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"export({ref!r}): module {mod_name!r} has no attribute {attr!r}") from None
    if callable(obj) and not _is_tf_object(obj) and not inspect.signature(obj).parameters:
        obj = obj()  # a zero-argument builder
    if isinstance(obj, str):
        return _load_reference(obj)
    return obj


def _is_tf_object(obj: Any) -> bool:
    return hasattr(obj, "get_concrete_function") or _is_keras(obj)


def _is_keras(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    return any(c.__module__.startswith(("keras", "tf_keras")) for c in type(obj).__mro__) or mod.startswith("keras")


class _SavedModelSource:
    def __init__(self, path: str, loaded: Any):
        self.path = path
        self.loaded = loaded


# ---------------------------------------------------------------------------------------------
# child-process export
# ---------------------------------------------------------------------------------------------
def _export_in_child(ref: str, options: dict[str, Any], sample_inputs: Mapping[str, np.ndarray] | None,
                     root: Path, force: bool, fingerprint: str | None = None) -> BridgeArtifact:
    """Run the export in ``python -m mmbridge.export._child`` and load the artifact it wrote."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmbridge-export-") as tmp:
        request = {"ref": ref, "options": options, "cache_dir": str(root), "force": force, "fingerprint": fingerprint}
        if sample_inputs is not None:
            np.savez(os.path.join(tmp, "samples.npz"), **{k: np.asarray(v) for k, v in sample_inputs.items()})
            request["samples"] = os.path.join(tmp, "samples.npz")
        req_path = os.path.join(tmp, "request.json")
        res_path = os.path.join(tmp, "result.json")
        with open(req_path, "w") as f:
            json.dump(request, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.getcwd()])
        proc = subprocess.run(
            [sys.executable, "-m", "mmbridge.export._child", req_path, res_path],
            env=env, capture_output=True, text=True,
        )
        if not os.path.isfile(res_path):
            raise ExportError(
                f"export of {ref!r} in a child process died (exit code {proc.returncode}) before reporting; "
                f"its stderr ends with:\n{proc.stderr[-3000:]}"
            )
        with open(res_path) as f:
            result = json.load(f)
    if "error" in result:
        from mmbridge import errors

        err = result["error"]
        cls = getattr(errors, err["type"], None)
        if cls is UnsupportedOpsError:
            raise UnsupportedOpsError(err["message"], err.get("ops", []))
        if cls is not None and issubclass(cls, Exception) and cls is not errors.ParityError:
            raise cls(err["message"])
        if cls is errors.ParityError:
            from mmbridge.parity import ParityReport as _PR

            raise errors.ParityError(err["message"], _PR.from_dict(err["report"]) if err.get("report") else None)
        raise ExportError(f"export of {ref!r} failed in the child process: {err['type']}: {err['message']}")
    return BridgeArtifact.load(result["path"])


# ---------------------------------------------------------------------------------------------
# in-process export
# ---------------------------------------------------------------------------------------------
def _export_live(obj: Any, options: dict[str, Any], sample_inputs: Any, root: Path, force: bool,
                 fingerprint: str | None = None) -> BridgeArtifact:
    tf = _tf.import_tensorflow()
    t0 = time.perf_counter()
    specs = _resolve_specs(obj, options["input_specs"], tf)
    name = options["name"] or _default_name(obj)
    fn, kind = _as_tf_callable(obj, specs, tf)
    if fingerprint is None:
        fingerprint = hashlib.sha256(_fingerprint_payload(obj, kind, fn, specs, options, tf)).hexdigest()

    def build():
        return _build(obj, fn, kind, specs, name, options, sample_inputs, tf, t0)

    art, hit = cached_or_build(name, fingerprint, build, root=root, force=force)
    logger.info("export %s: %s in %.2f s (%s)", name, "cache hit" if hit else "exported", time.perf_counter() - t0, art.path)
    return art


def _default_name(obj: Any) -> str:
    if isinstance(obj, _SavedModelSource):
        return Path(obj.path).name or "saved_model"
    n = getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return str(n)


def _tf_spec_to_tensor_spec(s: Any, name: str) -> TensorSpec:
    shape = tuple(None if d is None else int(d) for d in s.shape.as_list()) if s.shape.rank is not None else None
    if shape is None:
        raise SpecError(f"input {name!r} has unknown rank in TF; pass input_specs=")
    shape = ("batch",) + shape[1:] if shape and shape[0] is None else shape
    layout = "NHWC" if len(shape) == 4 else None
    return TensorSpec(name, shape, s.dtype.name if s.dtype.name != "string" else "string", layout)


def _resolve_specs(obj: Any, given: list[dict] | None, tf: Any) -> tuple[TensorSpec, ...]:
    if given:
        return tuple(TensorSpec.from_dict(d) for d in given)
    if isinstance(obj, _SavedModelSource):
        sig = obj.loaded.signatures.get("serving_default")
        if sig is None:
            raise SpecError(f"SavedModel {obj.path} has no 'serving_default' signature; pass input_specs=")
        _, kw = sig.structured_input_signature
        return tuple(_tf_spec_to_tensor_spec(s, k) for k, s in sorted(kw.items()))
    if hasattr(obj, "input_signature") and getattr(obj, "input_signature", None):
        flat = tf.nest.flatten(obj.input_signature)
        return tuple(_tf_spec_to_tensor_spec(s, s.name or f"input_{i}") for i, s in enumerate(flat))
    if _is_keras(obj):
        inputs = getattr(obj, "inputs", None)
        if inputs:
            specs = []
            for i, t in enumerate(inputs):
                nm = (getattr(t, "name", None) or "").split(":")[0]
                if not nm or nm.startswith("keras_tensor"):  # Keras 3 auto-name: not meaningful
                    nm = "input" if len(inputs) == 1 else f"input_{i}"
                shape = tuple(t.shape)
                shape = ("batch",) + tuple(shape[1:]) if shape and shape[0] is None else shape
                dt = t.dtype if isinstance(t.dtype, str) else t.dtype.name
                specs.append(TensorSpec(nm, shape, dt, "NHWC" if len(shape) == 4 else None))
            return tuple(specs)
    raise SpecError(
        f"cannot read the input specs of {type(obj).__name__} {_default_name(obj)!r}: pass input_specs="
        f"[mmbridge.TensorSpec(name, shape, dtype, layout)] (a tf.function needs an input_signature or specs; "
        f"a subclassed Keras model or a layer needs specs)"
    )


def _tf_signature(specs: Sequence[TensorSpec], tf: Any) -> list[Any]:
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape],
                          tf.string if s.dtype == "string" else tf.as_dtype(s.dtype), name=s.name) for s in specs]


def _as_tf_callable(obj: Any, specs: Sequence[TensorSpec], tf: Any) -> tuple[Any, str]:
    """A ``tf.function`` with one positional argument per spec, and the source kind."""
    sig = _tf_signature(specs, tf)
    if isinstance(obj, _SavedModelSource):
        fn = obj.loaded.signatures["serving_default"]
        names = [s.name for s in specs]

        @tf.function(input_signature=sig)
        def saved_model_fn(*args):
            return fn(**dict(zip(names, args)))

        return saved_model_fn, "saved_model"
    if _is_keras(obj):
        import keras

        is_model = isinstance(obj, keras.Model)

        @tf.function(input_signature=sig)
        def keras_fn(*args):
            x = args[0] if len(args) == 1 else list(args)
            return obj(x, training=False)

        return keras_fn, "keras_model" if is_model else "keras_layer"
    if hasattr(obj, "get_concrete_function"):
        if getattr(obj, "input_signature", None):
            return obj, "tf_function"

        @tf.function(input_signature=sig)
        def wrapped(*args):
            return obj(*args)

        return wrapped, "tf_function"
    if callable(obj):
        return tf.function(obj, input_signature=sig), "python_function"
    raise SpecError(
        f"export(): cannot export a {type(obj).__name__}; give a tf.function, a Keras model or layer, a SavedModel "
        f"directory, a Keras model file, a 'module:attribute' reference or a registered bridge name"
    )


def _fingerprint_payload(obj: Any, kind: str, fn: Any, specs: Sequence[TensorSpec], options: dict, tf: Any) -> bytes:
    """Bytes that determine the exported graph; their sha256 is the cache key.

    Keras models: class, config JSON, the source of non-Keras layer classes, every weight's
    bytes (fast: no tracing, ResNet50 hashes in ~0.1 s). Everything else: the frozen graph.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in options.items() if k not in ("name",)}, sort_keys=True, default=str).encode())
    h.update(json.dumps([s.to_dict() for s in specs]).encode())
    h.update(json.dumps(export_versions(), sort_keys=True).encode())
    h.update(kind.encode())
    keras_done = False
    if kind in ("keras_model", "keras_layer"):
        try:
            cfg = json.dumps(obj.get_config(), sort_keys=True, default=str)
            h.update(type(obj).__qualname__.encode() + cfg.encode())
            for layer in _iter_layers(obj):
                cls = type(layer)
                if not cls.__module__.startswith("keras"):
                    with contextlib.suppress(OSError, TypeError):
                        h.update(inspect.getsource(cls).encode())
            for w in obj.weights:
                a = np.asarray(w.numpy())
                h.update(f"{w.path if hasattr(w, 'path') else w.name}:{a.dtype}:{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            from mmbridge.export.fingerprint import state_fingerprint

            h.update(state_fingerprint(obj))  # adapted vocabularies / bin boundaries: not weights
            keras_done = True
        except (NotImplementedError, TypeError, AttributeError, ValueError):
            keras_done = False
    if not keras_done:
        gd = _freeze(fn, specs, tf, options.get("trainable", False))[0]
        h.update(gd.SerializeToString(deterministic=True))
    return h.digest()


def _iter_layers(obj: Any) -> Iterator[Any]:
    yield obj
    yield from getattr(obj, "_flatten_layers", lambda **k: [])(include_self=False, recursive=True)


# ---------------------------------------------------------------------------------------------
# trace, freeze, convert
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_patches() -> Iterator[None]:
    """Patches active while tracing for export (undone afterwards).

    * Keras 3 runs grouped ``Conv`` (``groups > 1``, e.g. ConvNeXt's depthwise 7x7) through a
      nested ``tf.function(jit_compile=True)`` because TF's CPU kernel lacks it; tf2onnx cannot
      see into that call. While tracing for export, the plain ``tf.nn.convolution`` is emitted
      instead (a graph is only traced, never run, so the CPU kernel gap does not matter), which
      tf2onnx converts to ONNX ``Conv(group=...)``.
    """
    patched = []
    try:
        from keras.src.backend.tensorflow import nn as knn

        orig_conv = knn.conv
        tf = sys.modules["tensorflow"]

        def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
            fmt = knn._convert_data_format(data_format, len(inputs.shape))
            return tf.nn.convolution(inputs, kernel, strides, padding.upper(), data_format=fmt, dilations=dilation_rate)

        knn.conv = conv
        patched.append((knn, "conv", orig_conv))
    except (ImportError, AttributeError):  # another Keras layout: nothing to patch
        pass
    try:
        yield
    finally:
        for mod, attr, orig in patched:
            setattr(mod, attr, orig)


def _freeze(fn: Any, specs: Sequence[TensorSpec], tf: Any, trainable: bool = False) -> tuple[Any, list[str], list[str], list[str], dict]:
    """Trace ``fn`` and freeze variables and captured tensors into constants.

    Returns:
        ``(graph_def, input tensor names, output tensor names, output keys, tables)``; only the
        placeholders of ``specs`` are inputs (captured tensors become constants); ``tables``
        holds the contents of captured lookup tables (:func:`mmbridge.export.handlers.table_contents`).
    """
    from tf2onnx import tf_loader

    from mmbridge.export.trainable import trainable_patches

    with export_patches(), (trainable_patches() if trainable else contextlib.nullcontext()):
        cf = fn.get_concrete_function()
    from mmbridge.export.handlers import table_contents

    tables = table_contents(cf)
    n = len(specs)
    inputs = [t.name for t in cf.inputs[:n]]
    if any(t.dtype == tf.resource for t in cf.inputs[:n]):
        raise SpecError("export(): the traced function's first inputs are resources, not the input specs")
    outputs = [t.name for t in cf.outputs if t.dtype != tf.resource]
    structured = cf.structured_outputs
    if isinstance(structured, Mapping):
        flat_keys = [str(k) for k in sorted(structured)]  # tf.nest flattens dicts in sorted key order
    elif isinstance(structured, (list, tuple)):
        flat_keys = [f"output_{i}" for i in range(len(tf.nest.flatten(structured)))]
    else:
        flat_keys = ["output"]
    if len(flat_keys) != len(outputs):
        flat_keys = [f"output_{i}" for i in range(len(outputs))]
    graph_def = tf_loader.from_function(cf, inputs, outputs)
    return graph_def, inputs, outputs, flat_keys, tables


def _convert(graph_def: Any, inputs: list[str], outputs: list[str], opset: int, inputs_as_nchw: list[str] | None,
             name: str, tables: dict | None = None) -> Any:
    import tf2onnx

    from mmbridge.errors import MMBridgeError
    from mmbridge.export.handlers import tf2onnx_handlers

    handlers, extra_opset = tf2onnx_handlers(tables)
    with _quiet_tf2onnx():
        try:
            model, _ = tf2onnx.convert.from_graph_def(
                graph_def, name=name, input_names=inputs, output_names=outputs, opset=opset,
                inputs_as_nchw=inputs_as_nchw, custom_op_handlers=handlers or None, extra_opset=extra_opset or None,
            )
        except MMBridgeError:  # a refusal raised by one of mmbridge's handlers: already explains itself
            raise
        except Exception as exc:  # tf2onnx raises bare Exceptions / ValueErrors on internal failures
            raise ExportError(f"tf2onnx could not convert {name!r} at opset {opset}: {type(exc).__name__}: {exc}") from exc
    return model


@contextlib.contextmanager
def _quiet_tf2onnx() -> Iterator[None]:
    lg = logging.getLogger("tf2onnx")
    old = lg.level
    lg.setLevel(logging.CRITICAL)  # unsupported ops are reported by repair_and_check_ops instead
    try:
        yield
    finally:
        lg.setLevel(old)


def _rename_io(model: Any, input_map: Mapping[str, str], output_map: Mapping[str, str]) -> None:
    """Rename graph inputs/outputs in place (``"image:0"`` -> ``"image"``)."""
    mapping = {**input_map, **output_map}
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return

    def ren(graph: Any) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.name in mapping:
                vi.name = mapping[vi.name]
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x in mapping:
                    node.input[i] = mapping[x]
            for i, x in enumerate(node.output):
                if x in mapping:
                    node.output[i] = mapping[x]
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    ren(attr.g)

    ren(model.graph)


def check_model(model: Any, name: str) -> Any:
    """``onnx.checker`` (full check with shape inference) and an onnxruntime CPU load.

    Returns:
        The model with inferred shapes.

    Raises:
        ExportError: the checker or onnxruntime rejects the graph; the message carries theirs.
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph {name!r} is not valid ONNX (onnx.checker): {exc}") from exc
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except onnx.shape_inference.InferenceError as exc:  # pragma: no cover - full_check already ran it
        raise ExportError(f"shape inference failed on {name!r}: {exc}") from exc
    from mmbridge.runtime.session import make_session

    try:
        make_session(model)
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise ExportError(f"onnxruntime cannot load the exported graph {name!r}: {exc}") from exc
    return model


def optimize_model(model: Any, check: Callable[[Any], bool], passes: Sequence[str] = SAFE_PASSES) -> tuple[Any, list[str], list[str]]:
    """Apply onnxoptimizer passes one at a time, keeping each only if ``check(model)`` holds.

    A pass that crashes, or whose graph ``check`` cannot run (e.g. onnxruntime refuses it), is
    rejected like one that breaks parity.

    Args:
        model: the ``onnx.ModelProto``.
        check: ``model -> bool``; True if the candidate still passes parity.
        passes: onnxoptimizer pass names (default :data:`SAFE_PASSES`).

    Returns:
        ``(model, applied passes, rejected passes)``; passes that changed nothing are in neither.
    """
    import onnxoptimizer

    available = set(onnxoptimizer.get_available_passes())
    applied, rejected = [], []
    current = model.SerializeToString()
    for p in passes:
        if p not in available:
            continue
        try:
            cand = onnxoptimizer.optimize(model, [p])
        except Exception:  # noqa: BLE001 - a pass that crashes is simply not used
            rejected.append(p)
            continue
        cand_bytes = cand.SerializeToString()
        if cand_bytes == current:
            continue
        try:
            ok = check(cand)
        except Exception:  # noqa: BLE001 - a pass whose graph onnxruntime cannot run is rejected, like a mismatch
            ok = False
        if ok:
            model, current = cand, cand_bytes
            applied.append(p)
        else:
            rejected.append(p)
    return model, applied, rejected


def _build(obj: Any, fn: Any, kind: str, specs: Sequence[TensorSpec], name: str, options: dict, sample_inputs: Any,
           tf: Any, t0: float) -> tuple[Any, dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    import onnx

    opset = options["opset"]
    nchw = options["inputs_as_nchw"] or []
    unknown_nchw = set(nchw) - {s.name for s in specs}
    if unknown_nchw:
        raise SpecError(f"inputs_as_nchw names {sorted(unknown_nchw)} that are not inputs {[s.name for s in specs]}")
    graph_def, in_names, out_names, out_keys, tables = _freeze(fn, specs, tf, options["trainable"])
    model = _convert(graph_def, in_names, out_names, opset, [n for n in in_names if n.split(":")[0] in nchw], name,
                     tables)
    _rename_io(model, {t: s.name for t, s in zip(in_names, specs)}, dict(zip(out_names, out_keys)))
    notes = []
    if options["trainable"]:
        from mmbridge.export.trainable import postprocess

        notes += postprocess(model)
    n_resize = resize_scales_to_sizes(model)
    if n_resize:
        notes.append(f"Resize scales -> exact sizes (TF's target size): {n_resize} node(s)")
    notes += repair_and_check_ops(model, name)
    model = check_model(model, name)

    # parity data: TF on NHWC inputs; the ONNX graph gets NCHW for inputs_as_nchw
    if callable(sample_inputs):
        samples = dict(sample_inputs(2, 0))
    elif sample_inputs is not None:
        samples = dict(sample_inputs)
    else:
        samples = samples_from_specs(specs, batch=2, seed=0)
    missing = [s.name for s in specs if s.name not in samples]
    if missing:
        raise SpecError(f"sample_inputs lack {missing}; give one array per input spec")
    tf_out = fn(*[tf.constant(samples[s.name]) for s in specs])
    ref = dict(zip(out_keys, [np.asarray(t) for t in tf.nest.flatten(tf_out)]))
    onnx_inputs = {k: (np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2))) if k in nchw else v) for k, v in samples.items()}
    tol = Tolerance(**options["tolerance"]) if options["tolerance"] else None

    def passes_parity(m: Any) -> bool:
        got = run_ort(m, onnx_inputs)
        return all(r.passed for r in compare(got, ref, backend="ort", stage="onnx", tolerance=tol))

    try:  # the unoptimised graph must run at all; otherwise no optimiser pass could be judged
        run_ort(model, onnx_inputs)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidArgument types
        raise ExportError(
            f"exported bridge {name!r}: the ONNX graph tf2onnx wrote (opset {opset}) does not run in onnxruntime: "
            f"{type(exc).__name__}: {str(exc)[-400:]}. This is a converter bug for this graph, not your model; "
            f"try another opset (e.g. opset={17 if opset != 17 else 18}), trainable={not options['trainable']}, "
            f"or a dynamic batch / larger spatial size in input_specs, and report it with `mmbridge info`") from exc
    applied: list[str] = []
    rejected: list[str] = []
    if options["optimize"]:
        model, applied, rejected = optimize_model(model, passes_parity)
        model = check_model(model, name)
    report = ParityReport(compare(run_ort(model, onnx_inputs), ref, backend="ort", stage="onnx", tolerance=tol))
    if options["verify"]:
        report.raise_if_failed(f"exported bridge {name!r}")
    import tf2onnx

    model.producer_name = "mmbridge"
    model.doc_string = f"mmbridge bridge {name!r} exported from {kind} with tf2onnx {tf2onnx.__version__}"
    graph_inputs = {i.name: i for i in model.graph.input}
    out_specs = []
    for o in model.graph.output:
        tt = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out_specs.append({"name": o.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                          if tt.elem_type != onnx.TensorProto.STRING else "string"})
    onnx_specs = []
    for s in specs:
        d = s.to_dict()
        if s.name in nchw:
            n, h, w, c = s.shape
            d.update(shape=[n, c, h, w], layout="NCHW")
        assert s.name in graph_inputs
        onnx_specs.append(d)
    meta = {
        "role": options["role"],
        "opset": opset,
        "source": {"kind": kind, "type": f"{type(obj).__module__}.{type(obj).__qualname__}"},
        "inputs": onnx_specs,
        "tf_inputs": [s.to_dict() for s in specs],
        "outputs": out_specs,
        "versions": export_versions(),
        "parity": report.to_dict(),
        "rewrites": notes,
        "tolerance": options["tolerance"],  # what export checked with; verify() reuses it
        "trainable": options["trainable"],
        "backend": backend_requirements(model),
        "optimizer": {"applied": applied, "rejected": rejected},
        "export_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    golden = {"inputs": onnx_inputs, "outputs": ref}
    return model, meta, golden


def _copy_out(art: BridgeArtifact, out: str | os.PathLike | None) -> BridgeArtifact:
    if out is None:
        return art
    import shutil
    import uuid

    from mmbridge.artifact import replace_dir

    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(art.path, tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BridgeArtifact.load(dest)


__all__ = ["export", "export_patches", "check_model", "optimize_model", "SAFE_PASSES", "GOLDEN_FILE"]
