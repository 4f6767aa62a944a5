"""TF -> ONNX export: ``mmbridge.export``.

Pipeline (in order; the source kinds are adapters in :mod:`mmbridge.export.sources`):

1. **options**: the keyword arguments become one frozen
   :class:`~mmbridge.export.options.ExportOptions` (validated; every bad field in one
   ``SpecError``), which is what travels down the pipeline and, as ``to_dict()``, to a child;
2. **locate** the source without TensorFlow (:data:`~mmbridge.export.sources.SOURCES`, first
   match wins): a Keras model file (``.keras`` / ``.h5``), a SavedModel directory, a
   ``"module:attribute"`` reference, a registered bridge name or
   :class:`~mmbridge.BridgeSpec` (its registration fills in the options' defaults), or a live
   Keras 3 / tf-keras model or layer, ``tf.function`` or Python callable;
3. **fingerprint** paths by their files' bytes (:func:`~mmbridge.export.fingerprint.path_fingerprint`,
   no TF) and return the cached artifact on a hit; paths and references then export in a
   spawned child process by default (``isolate=None``), so the caller never loads TensorFlow
   (DESIGN.md, "TF isolation"); the child rebuilds the options with ``ExportOptions.from_dict``;
4. **prepare** (TF imported): the adapter turns the source into a
   :class:`~mmbridge.export.sources.Traceable`: a ``tf.function`` with one positional argument
   per input spec, the resolved specs, a default name, the source kind, and what the
   fingerprint hashes; a live object is fingerprinted here
   (:func:`~mmbridge.export.fingerprint.live_fingerprint`: options, specs, sample inputs,
   versions, and Keras config + weights or else the frozen graph) and looked up in the cache;
5. **trace and freeze** into a concrete function with one placeholder per input spec; captured
   tensors (a module-level ``tf.constant`` used inside a ``tf.function``) are frozen into the
   graph instead of becoming extra graph inputs;
6. **convert** with tf2onnx (``from_graph_def``: Keras 3 models never go through tf2onnx's
   Keras-2 helpers, which raise ``KeyError: 'keras_tensor_1'``, onnx/tensorflow-onnx#2348);
7. **repair** what tf2onnx leaves behind with an exact ONNX form (:data:`ONNX_REWRITES`, e.g.
   ``Erfc(x) = 1 - Erf(x)`` for exact GELU), then **refuse** every remaining non-ONNX node
   with one :class:`UnsupportedOpsError` listing op, node and origin;
8. :func:`check_model`: ``onnx.checker`` (full check, with shape inference; a failure is an
   ``ExportError`` naming the node) and an onnxruntime load;
9. **optimise** with onnxoptimizer, one pass at a time, keeping a pass only if parity holds;
10. **verify** parity against TF on the sample inputs (``ParityError`` on failure), then on both
    backends (onnxruntime and ``to_torch``) at extra shapes of every symbolic dim
    (:mod:`mmbridge.export.backends`, :mod:`mmbridge.export.shapes`): an onnxruntime mismatch at any
    shape refuses the export, a torch one is recorded (``meta["backends"]``) and makes ``to_torch``
    refuse the artifact; then the **probe inputs** of :mod:`mmbridge.export.probes` (edge values for
    the ops in the graph, at most 8 runs per backend; on onnxruntime a mismatch is a ``ProbeError``,
    on torch it is recorded like a torch parity failure; ``probes=False`` to accept knowingly);
11. **write** the artifact atomically into the cache (with ``golden.npz`` for later checks).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.artifact import BridgeArtifact, cache_root, cached_or_build, entry_dir
from mmbridge.errors import CacheError, ExportError, SpecError, UnsupportedOpsError
from mmbridge.export import _tf
from mmbridge.export.contract import (  # also registers verify()'s train-parity re-run
    TRAIN_PARITY_BATCH,
    TRAIN_PARITY_LARGE,
    TRAIN_PARITY_MIN_BATCH,
    train_batches,
)
from mmbridge.export.fingerprint import export_versions, live_fingerprint, path_fingerprint
from mmbridge.export.options import DEFAULT_OPSET, ExportOptions
from mmbridge.export.rewrites import repair_and_check_ops
from mmbridge.export.sources import SOURCES, Located, Traceable
from mmbridge.graph.passes import backend_requirements, resize_scales_to_sizes
from mmbridge.parity import GOLDEN_FILE, ParityReport, compare, run_ort
from mmbridge.specs import TensorSpec, Tolerance, samples_from_specs

logger = logging.getLogger("mmbridge.export")

Samples = Mapping[str, np.ndarray]
SampleInputs = Samples | Callable[[int, int], Samples]

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
def _forget_outcome_on_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``last_export()`` is ``{}`` after a call that raised, wherever it raised (also while copying
    the artifact to ``out``, after the export itself had recorded its outcome)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException:
            _LAST.clear()
            raise

    return wrapper


@_forget_outcome_on_error
def export(
    obj: Any,
    *,
    input_specs: Sequence[TensorSpec] | None = None,
    opset: int | None = None,
    name: str | None = None,
    role: str | None = None,
    tolerance: Tolerance | None = None,
    sample_inputs: SampleInputs | None = None,
    inputs_as_nchw: Sequence[str] | None = None,
    trainable: bool = False,
    optimize: bool = True,
    verify: bool = True,
    probes: bool = True,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    isolate: bool | None = None,
    out: str | os.PathLike | None = None,
    training: bool = False,
) -> BridgeArtifact:
    """Export a TensorFlow object to a checked, cached ONNX :class:`~mmbridge.BridgeArtifact`.

    Args:
        obj: a ``tf.function``; a Keras model (functional, ``Sequential`` or subclassed) or
            layer (Keras 3, or tf-keras when installed); a plain Python function of TF tensors
            (with ``input_specs``); a SavedModel directory; a Keras model file (``.keras``,
            ``.h5``); a ``"module:attribute"`` reference to any of these (or to a zero-argument
            builder returning one); a registered bridge name; or a :class:`~mmbridge.BridgeSpec`.
            ``mmbridge.export.sources.SOURCES.kinds()`` lists the source kinds.
        input_specs: the graph inputs in call order. Optional when they can be read from
            ``obj`` (a ``tf.function`` with ``input_signature``, a functional Keras model, a
            SavedModel signature, a registered bridge). TF images are NHWC.
        opset: ONNX opset (default 17, or the bridge's).
        name: artifact name (default: the bridge / file / model / function name).
        role: ``"preprocess"`` or ``"encoder"`` (metadata; default ``"encoder"``).
        tolerance: parity tolerance for floating outputs (default: :data:`mmbridge.parity.TOLERANCES`).
        sample_inputs: inputs for the parity check, as ``{name: array}`` (one array per input,
            of the spec's dtype, batch first, NHWC) or ``(batch, seed) -> {name: array}``;
            default: drawn from the specs' dtypes and value ranges, batch 2. Given samples are
            part of the cache key.
        inputs_as_nchw: input names that the ONNX graph should take as NCHW instead of TF's
            NHWC (tf2onnx's ``inputs_as_nchw``; the parity check transposes for TF).
        trainable: export for fine-tuning: BatchNormalization, Dropout and LayerNormalization
            stay real ONNX ops (see :mod:`mmbridge.export.trainable`) instead of being folded away.
        optimize: run onnxoptimizer's parity-preserving passes.
        training: trace a Keras model or layer with ``training=True``, so its augmentation layers
            (``RandomFlip``, ``RandomBrightness``, ``Equalization`` ...) are active as in
            ``ds.map(layer)``: their random draws become ONNX ``RandomUniformLike`` /
            ``RandomNormalLike`` (fresh on every call) and parity becomes a distribution check (TF
            vs onnxruntime vs torch, :func:`mmbridge.export.augment.distribution_check`; a failure
            raises ``ParityError``). Layers without an ONNX form in training mode are refused naming
            the layer and the torch augmentation to use (:data:`mmbridge.export.augment.LAYERS`).
            Default ``False``: the layers are inactive and the artifact records (and warns) so.
        verify: check parity against TF (always done unless False; ``ParityError`` on failure).
        probes: with ``verify``, also check the probe inputs (:mod:`mmbridge.export.probes`: edge
            values for the ops in the graph, e.g. negative integers into ``FloorDiv``, ids outside
            ``[0, depth)`` into ``OneHot``, ``.5`` ties into ``Round``, at a second shape where dims
            are dynamic) on TF and onnxruntime (``ProbeError`` on a mismatch) and on the torch module when
            export verified it (a mismatch there is recorded and ``to_torch`` refuses the artifact). ``False`` accepts such
            a graph knowingly (``meta.json`` records it; part of the cache key).
        cache_dir: cache root (default ``$MMBRIDGE_CACHE`` or the user cache dir).
        force: re-export even if the cache holds a valid artifact.
        isolate: export in a spawned child process. Default: yes for paths, references and
            importable registered builders; in-process for live TF objects.
        out: also copy the artifact directory here (atomically).

    Returns:
        The :class:`~mmbridge.BridgeArtifact` (``model.onnx`` + ``meta.json`` + ``golden.npz``).

    Raises:
        UnsupportedOpsError: the graph needs ops with no ONNX form; lists each op, node, origin.
        ExportError: tf2onnx failed, or the result fails ``onnx.checker`` (the message names
            the node) / onnxruntime loading or running.
        ParityError: ORT's outputs differ from TF's beyond the tolerance.
        ProbeError: (a ``ParityError``) ORT differs from TF on a probe input; names the op, the input,
            the values and ``probes=False``.
        ImportOrderError: in-process export with TF imported before torch's compiler stack.
        SpecError: an invalid option (every one listed), a source export() does not accept, or
            input specs that are missing or disagree with the TF object.
        RegistryError: an unknown bridge name (with close matches).
    """
    t0 = time.perf_counter()
    _LAST.clear()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    located = SOURCES.locate(obj, isolate=isolate)
    bridge = located.bridge
    options = ExportOptions.from_arguments(
        input_specs=input_specs, opset=opset, name=name, role=role, tolerance=tolerance,
        inputs_as_nchw=inputs_as_nchw, trainable=trainable, optimize=optimize, verify=verify, probes=probes,
        bridge=bridge, training=training,
    )
    if bridge is not None and not sample_inputs:
        sample_inputs = bridge.sample_inputs
    if located.ref is None:  # a live object (or a builder called here): fingerprinted once traced
        art = export_located(located, options, sample_inputs, root, force)
        return _noted(_copy_out(art, out), _LAST.get("outcome", "exported"), t0)

    if callable(sample_inputs):  # numpy-only callables: evaluate here, pass arrays on
        sample_inputs = dict(sample_inputs(2, 0))
    if options.name is None and located.name is not None:
        options = options.replace(name=located.name)
    fingerprint = None
    if located.path is not None:
        # files are fingerprinted by their bytes, without TF: a cache hit never starts TF
        fingerprint = path_fingerprint(located.path, options, sample_inputs)
        if not force:
            with contextlib.suppress(CacheError):
                art = _say_inactive(BridgeArtifact.load(entry_dir(options.name, fingerprint, root), check="size"))
                return _noted(_copy_out(art, out), "cache hit (file fingerprint, no TensorFlow)", t0)
    if located.isolate:
        record = None
        if located.path is None:  # a "module:attribute" reference: a hit without TF (mmbridge.export.refcache)
            from mmbridge.export import refcache
            from mmbridge.export.fingerprint import samples_bytes

            record = refcache.record_path(root, located.ref, f"{options.stable_hash()}:{options.name}", samples_bytes(sample_inputs),
                                          export_versions())
            hit = None if force else refcache.lookup(record)
            if hit is not None:
                with contextlib.suppress(CacheError):
                    art = BridgeArtifact.load(hit, check="size")
                    logger.info("export %s: cache hit of reference %r without TensorFlow (%s)", art.name,
                                located.ref, art.path)
                    return _noted(_copy_out(_say_inactive(art), out), "cache hit (reference, no TensorFlow)", t0)
        art, files = _export_in_child(located.ref, options, sample_inputs, root, force, fingerprint)
        _say_inactive(art)  # the child's warning stays in the child
        if record is not None and files:
            with contextlib.suppress(CacheError):
                refcache.save(record, art.path, files)
        return _noted(_copy_out(art, out), f"{_LAST.get('outcome', 'exported')} in a child process", t0)
    art = export_located(located, options, sample_inputs, root, force, fingerprint)
    return _noted(_copy_out(art, out), _LAST.get("outcome", "exported"), t0)


#: how this process's latest export() call ended (see last_export)
_LAST: dict[str, Any] = {}


def _noted(art: BridgeArtifact, outcome: str, t0: float) -> BridgeArtifact:
    _LAST.update(outcome=outcome, seconds=time.perf_counter() - t0, name=art.name, path=str(art.path))
    return art


def last_export() -> dict[str, Any]:
    """How this process's latest :func:`export` call ended, for progress output.

    Returns:
        ``{"outcome", "seconds", "name", "path"}``: ``outcome`` is ``"exported"``, ``"cache hit"``
        (found by the traced graph's fingerprint: TF was loaded), ``"cache hit (reference, no
        TensorFlow)"`` / ``"cache hit (file fingerprint, no TensorFlow)"`` (found without starting
        TF), or one of the first two followed by ``" in a child process"``; ``seconds`` is the wall
        time of the call. ``{}`` before the first call or when the latest one raised.
    """
    return dict(_LAST)


# ---------------------------------------------------------------------------------------------
# child-process export
# ---------------------------------------------------------------------------------------------
# The child's entry point. `python -m` and `python -c` put the current directory FIRST on sys.path,
# so a stray `filelock.py` or `numpy.py` in the working directory would run in the export process
# (issue 15): the child drops it and appends the directory LAST instead, after the standard library
# and site-packages, where it can still provide the user's own `"module:attribute"` references.
_CHILD_MAIN = ("import os, sys; cwd = sys.argv[3]; "
               "sys.path[:] = [p for p in sys.path if p not in ('', '.') and os.path.abspath(p) != cwd] + [cwd]; "
               "from mmbridge.export._child import main; sys.exit(main(sys.argv[1], sys.argv[2]))")


def _child_path() -> list[str]:
    """The parent's import path for the child's PYTHONPATH, without the working directory."""
    cwd = os.path.abspath(os.getcwd())
    return [p for p in sys.path if p and p != "." and os.path.abspath(p) != cwd]


def _export_in_child(ref: str, options: ExportOptions, sample_inputs: Samples | None, root: Path, force: bool,
                     fingerprint: str | None = None) -> tuple[BridgeArtifact, dict[str, str]]:
    """Run the export in a child process (:mod:`mmbridge.export._child`) and load the artifact it wrote.

    Returns ``(artifact, {source file: sha256})``: the files the child loaded outside the standard
    library and site-packages (for :mod:`mmbridge.export.refcache`).

    The request carries ``options.to_dict()``, the samples (as ``samples.npz``), the cache root,
    ``force`` and the parent's fingerprint (paths), so the child writes to the same cache entry.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmbridge-export-") as tmp:
        request: dict[str, Any] = {"ref": ref, "options": options.to_dict(), "cache_dir": str(root), "force": force,
                                   "fingerprint": fingerprint}
        if sample_inputs is not None:
            np.savez(os.path.join(tmp, "samples.npz"), **{k: np.asarray(v) for k, v in sample_inputs.items()})
            request["samples"] = os.path.join(tmp, "samples.npz")
        req_path = os.path.join(tmp, "request.json")
        res_path = os.path.join(tmp, "result.json")
        with open(req_path, "w") as f:
            json.dump(request, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_child_path())
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_MAIN, req_path, res_path, os.getcwd()],
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
        raise child_error(result["error"], ref)
    _LAST["outcome"] = result.get("outcome", "exported")
    return BridgeArtifact.load(result["path"]), dict(result.get("files") or {})


def child_error(err: Mapping[str, Any], ref: str) -> Exception:
    """The exception a child export reported, rebuilt in this process.

    Args:
        err: ``{"type", "message", "ops"?, "report"?, "probes"?}`` as :mod:`mmbridge.export._child`
            writes it.
        ref: the exported reference, for the message of a non-mmbridge error.

    Returns:
        The same mmbridge error class with its message and its data (``UnsupportedOpsError.ops``,
        ``ParityError.report``, ``ProbeError.report`` and ``.probes``); any other exception type as
        an :class:`ExportError` naming it.
    """
    from mmbridge import errors

    cls = getattr(errors, err["type"], None)
    if cls is UnsupportedOpsError:
        return UnsupportedOpsError(err["message"], err.get("ops", []))
    if cls is not None and isinstance(cls, type) and issubclass(cls, errors.ParityError):
        from mmbridge.parity import ParityReport as _PR

        report = _PR.from_dict(err["report"]) if err.get("report") else None
        if issubclass(cls, errors.ProbeError):
            return cls(err["message"], report, err.get("probes"))
        return cls(err["message"], report)
    if cls is not None and isinstance(cls, type) and issubclass(cls, Exception):
        return cls(err["message"])
    return ExportError(f"export of {ref!r} failed in the child process: {err['type']}: {err['message']}")


# ---------------------------------------------------------------------------------------------
# in-process export
# ---------------------------------------------------------------------------------------------
def export_located(located: Located, options: ExportOptions, sample_inputs: SampleInputs | None, root: Path,
                   force: bool, fingerprint: str | None = None) -> BridgeArtifact:
    """Export a located source in this process (TensorFlow is imported here) into the cache.

    Steps 4-11 of the module docstring. Used by :func:`export` for live objects and by the
    child process (:mod:`mmbridge.export._child`) for paths and references.

    Args:
        located: from :meth:`SourceAdapters.locate <mmbridge.export.sources.SourceAdapters.locate>`.
        options: the export options (a bridge's defaults already applied).
        sample_inputs: ``{name: array}``, ``(batch, seed) -> {name: array}`` or ``None``.
        root: the cache root.
        force: rebuild even if the cache entry is valid.
        fingerprint: the cache key when already known (a path's file bytes); else computed
            from the traced source.

    Returns:
        The cached :class:`~mmbridge.BridgeArtifact`.

    Raises:
        Everything :func:`export` raises.
    """
    tf = _tf.import_tensorflow()
    t0 = time.perf_counter()
    samples = dict(sample_inputs(2, 0)) if callable(sample_inputs) else sample_inputs
    src = located.adapter.prepare(located.obj, options, tf)
    name = options.name or src.name
    if options.training:
        from mmbridge.export.augment import check_training_source

        check_training_source(src.kind, name)
    frozen: list[tuple] = []

    def freeze() -> tuple:  # traced once, for the fingerprint and the build
        if not frozen:
            frozen.append(_freeze(src.fn, src.specs, tf, options.trainable,
                                  src.obj if src.kind in KERAS_KINDS else None, options.training))
        return frozen[0]

    if fingerprint is None:
        payload = src.payload()
        if payload is None:
            payload = freeze()[0].SerializeToString(deterministic=True)
        fingerprint = live_fingerprint(src.kind, src.specs, options, samples, payload)
        del payload  # a serialised copy of the frozen graph (every weight), not needed past the fingerprint

    freeze.release = frozen.clear  # type: ignore[attr-defined]  # _build drops the frozen graph when done with it

    def build():
        return _build(src, name, options, samples, freeze, tf, t0,
                      sample_fn=sample_inputs if callable(sample_inputs) else None)

    art, hit = cached_or_build(name, fingerprint, build, root=root, force=force)
    _LAST["outcome"] = "cache hit" if hit else "exported"
    if hit:  # a default export of augmentation layers: say so on a cache hit too
        _say_inactive(art)
    logger.info("export %s: %s in %.2f s (%s)", name, "cache hit" if hit else "exported", time.perf_counter() - t0, art.path)
    return art


def _say_inactive(art: BridgeArtifact) -> BridgeArtifact:
    """Warn (and log) when ``art`` is a default export whose augmentation layers are inactive
    (``meta["augmentation"]``, :func:`mmbridge.export.augment.inference_record`); returns ``art``."""
    rec = art.meta.get("augmentation") or {}
    if rec.get("training") is False and rec.get("note"):
        import warnings

        logger.warning("export %s: %s", art.name, rec["note"])
        warnings.warn(f"export {art.name!r}: {rec['note']}", UserWarning, stacklevel=3)
    return art


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


def _freeze(fn: Any, specs: Sequence[TensorSpec], tf: Any, trainable: bool = False,
            keras_obj: Any = None, training: bool = False) -> tuple[Any, list[str], list[str], list[str], dict]:
    """Trace ``fn`` and freeze variables and captured tensors into constants.

    ``keras_obj``: the Keras model or layer ``fn`` calls, for :func:`~mmbridge.export.trainable.trainable_patches`
    (a tf-keras model's variables are marked by its own paths).

    Returns:
        ``(graph_def, input tensor names, output tensor names, output keys, tables, unread)``; only the
        placeholders of ``specs`` are inputs (captured tensors become constants); ``tables``
        holds the contents of captured lookup tables (:func:`mmbridge.export.handlers.table_contents`);
        ``unread``: for a trainable export of a Keras object, its trainable variables the trace never
        read (:meth:`mmbridge.export.trainable.VariableReads.unread`: ``[{"path", "shape", "values"}]``),
        else ``[]``.
    """
    from mmbridge.export.trainable import trainable_patches

    if training:
        from mmbridge.export.augment import training_patches
    with export_patches(), (trainable_patches(keras_obj) if trainable else contextlib.nullcontext()) as reads, \
            (training_patches() if training else contextlib.nullcontext()):
        cf = fn.get_concrete_function()
    unread = reads.unread(keras_obj, cf) if reads is not None and keras_obj is not None else []
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
    graph_def = _frozen_graph_def(cf, inputs, outputs, tf)
    return graph_def, inputs, outputs, flat_keys, tables, unread


def _reregister_functions(cf: Any, library: Any) -> None:
    """Put back into TF's eager context the library functions of ``cf`` that freezing took away.

    The frozen function that ``convert_variables_to_constants_v2`` builds reuses the names of the
    traced function's un-inlined library functions (a Keras ``LSTM(dropout=0.5)``'s ``while`` body
    and condition); when it is deleted, TF removes those names from the eager context, and the
    traced function then fails to run (``Op type not registered '..._while_cond_165'``) at the
    export's parity run. ``library``: ``cf``'s ``FunctionDefLibrary`` taken before freezing; each
    of its functions that is missing, or registered with another definition (a frozen version that
    outlived the frozen function), is registered again as ``cf`` had it."""
    from tensorflow.python.eager import context

    ctx = context.context()
    for fdef in library.function:
        name = fdef.signature.name
        if ctx.has_function(name):
            if ctx.get_function_def(name) == fdef:
                continue
            ctx.remove_function(name)
        ctx.add_function_def(fdef)


def _frozen_graph_def(cf: Any, inputs: list[str], outputs: list[str], tf: Any) -> Any:
    """``tf2onnx.tf_loader.from_function(cf, inputs, outputs)``, holding fewer copies of the weights.

    The same steps, on the same graph: TF's ``convert_variables_to_constants_v2`` (no control-flow
    lowering, aggressive inlining), tf2onnx's ``fix_freezing_errors_part2`` and its grappler pass
    (``tf_loader.tf_optimize``); on TF's "incompatible with expected resource" freezing error,
    tf2onnx's repair path (``convert_variables_to_constants_large_model`` + ``fix_freezing_errors``),
    as ``from_function`` takes it. Two things differ, both memory: the frozen ``ConcreteFunction``
    (a TF graph and a function-library entry holding every weight) is dropped as soon as its
    ``GraphDef`` is taken, and the ``GraphDef`` is not imported into a TF graph first (tf2onnx does
    that only to drop resource inputs, which :func:`_freeze` has already refused). A ConvNeXtBase
    export's freeze grew RSS by 6,862 MiB, 20 times its 334 MiB of weights, with those copies alive
    during grappler (``tools/export_memory.py ConvNeXtBase 32``); now 3,455 MiB. The resulting
    ``GraphDef`` is the one ``from_function`` gives (tested byte for byte)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tf2onnx import tf_loader

    library = cf.graph.as_graph_def().library  # the traced function's own, before freezing renames any
    repair = False
    try:
        frozen = convert_variables_to_constants_v2(cf, lower_control_flow=False, aggressive_inlining=True)
    except ValueError as exc:
        if "incompatible with expected resource" not in str(exc):
            raise
        repair = True  # leave the except block first: its traceback holds the failed freeze's frames
    if repair:
        logger.warning("TF freezing failed. Attempting to fix freezing errors.")  # tf2onnx's words
        graph_def = tf_loader.fix_freezing_errors(tf_loader.convert_variables_to_constants_large_model(cf))
    else:
        graph_def = frozen.graph.as_graph_def(add_shapes=True)
        del frozen
    if library.function or graph_def.ByteSize() >= LARGE_GRAPH_BYTES:
        gc.collect()  # the frozen function's deleter removes the names it shares before they are put back
        _reregister_functions(cf, library)
    graph_def = tf_loader.fix_freezing_errors_part2(graph_def)
    with tf.Graph().as_default():  # export_meta_graph (inside tf_optimize) refuses eager mode
        return tf_loader.tf_optimize(inputs, outputs, graph_def)


def _convert(graph_def: Any, inputs: list[str], outputs: list[str], opset: int, inputs_as_nchw: list[str] | None,
             name: str, tables: dict | None = None, training: bool = False) -> Any:
    import tf2onnx

    from mmbridge.errors import MMBridgeError
    from mmbridge.export.handlers import tf2onnx_handlers

    handlers, extra_opset = tf2onnx_handlers(tables)
    if training:  # TF's stateless random ops -> ONNX random ops (mmbridge.export.augment)
        from mmbridge.export.augment import random_handlers

        handlers = {**handlers, **random_handlers()}
    with _CONVERT_LOCK, _quiet_tf2onnx(), _bfloat16_is_bfloat16(), deterministic_tf2onnx(graph_def), \
            _collect_between_optimizers(graph_def.ByteSize()):
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


#: The patches :func:`_convert` applies to tf2onnx's module state (the optimiser table, the patches of
#: :func:`deterministic_tf2onnx`) are process-wide: one conversion at a time. Tracing's own patches
#: (``export_patches``, ``trainable_patches``) are not under it: exporting from several threads at once
#: is not supported (processes are: the cache lock, :mod:`mmbridge.store`).
_CONVERT_LOCK = threading.RLock()


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: :func:`_collect_between_optimizers` collects once RSS grew by this many times the graph's size (at least
#: :data:`COLLECT_FLOOR_BYTES`) since the last collection.
COLLECT_GROWTH = 2
COLLECT_FLOOR_BYTES = 512 * 2**20
#: Graphs at least this large get a full ``gc.collect()`` (~0.5 s in a process holding TF, Keras and
#: torch) where the export drops a copy of their weights: after freezing, after the ONNX checks, and
#: before train parity. Smaller graphs skip it; their copies are too small to matter.
LARGE_GRAPH_BYTES = 64 * 2**20


@contextlib.contextmanager
def _collect_between_optimizers(graph_bytes: int) -> Iterator[None]:
    """Run Python's cycle collector between tf2onnx's ONNX optimisers when memory piles up.

    ``tf2onnx.optimizer.optimize_graph`` (error catching on, tf2onnx's default) deep-copies the whole
    graph, constants included, before each of its 12 optimisers, and does so for every iteration
    (3 for a ConvNeXt). Each replaced graph is garbage with reference cycles, freed only when the
    cycle collector runs, so the copies piled up: inside the optimiser, ConvNeXtBase's RSS grew by
    9,747 MiB, 29 times its 334 MiB of weights, to the export's peak of 13,622 MiB
    (``tools/export_memory.py ConvNeXtBase 32``).
    While converting, each optimiser's factory first runs ``gc.collect()`` when RSS has grown by
    more than :data:`COLLECT_GROWTH` times ``graph_bytes`` (the TF ``GraphDef``'s size; at least
    :data:`COLLECT_FLOOR_BYTES`) since the last collection: small graphs never pay for it (a full
    collection costs ~0.5 s in a process holding TF, Keras and torch). Nothing else changes: the
    same optimisers, in the same order, on the same graphs."""
    import tf2onnx.optimizer as optimizer

    threshold = max(COLLECT_GROWTH * int(graph_bytes), COLLECT_FLOOR_BYTES)
    last = [_rss_bytes()]
    if last[0] is None:  # no RSS to watch: nothing to decide on
        yield
        return
    saved = dict(optimizer._optimizers)

    def collecting(factory: Callable[[], Any]) -> Callable[[], Any]:
        def make() -> Any:
            now = _rss_bytes()
            if now is not None and now - (last[0] or 0) > threshold:
                gc.collect()
                last[0] = _rss_bytes()
            return factory()
        return make

    try:
        for key, factory in saved.items():
            optimizer._optimizers[key] = collecting(factory)
        yield
    finally:
        optimizer._optimizers.clear()
        optimizer._optimizers.update(saved)


@contextlib.contextmanager
def deterministic_tf2onnx(graph_def: Any) -> Iterator[None]:
    """While converting, make tf2onnx's result a function of the TF graph alone (same bytes every run).

    tf2onnx 1.17 converted the same graph differently from run to run, and some orders were
    wrong: a ``Conv2D(1, ...)`` on a ``(None, None, None, 1)`` input dropped the final
    ``Squeeze`` in about 1 of 5 conversions (a rank-5 output, refused by parity). Causes, each
    fixed here for the duration of the conversion (undone afterwards):

    * ``Graph.extract_sub_graph_nodes`` returns ``list(set_of_nodes)``; a ``Node`` hashes by
      ``id()``, so ``delete_unused_nodes`` re-ordered the graph by memory address. Here it keeps
      the graph's node order, each node once (the set also dropped the nodes that tf2onnx's
      bidirectional-LSTM rewriter appends to the node list a second time).
    * ``TransposeOptimizer.post_optimize_action`` replaces single-channel ``Transpose`` nodes by
      ``Reshape`` while iterating over the live node list, so it skips the node after each
      replacement; which ``Transpose`` survived depended on the order above, and the later
      optimizers then lost the ``Squeeze``. Here ``nodes`` is a copy.
    * ``Graph.find_output_consumers`` iterates a ``set`` of names (order depends on
      ``PYTHONHASHSEED``). Here the consumers come sorted by node name.
    * ``utils.make_name`` numbers new nodes with a process-wide counter, so a second export in
      the same process got other names (and the first one more, as a lazily imported tf2onnx
      module takes a name). Here the counter restarts above every ``__N`` suffix in
      ``graph_def`` (tf2onnx's own rule for avoiding clashes).
    """
    import tf2onnx.rewriter.loop_rewriter_base  # noqa: F401 - takes a name from the counter when first imported
    from tf2onnx import graph as tf2onnx_graph
    from tf2onnx import utils
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    Graph = tf2onnx_graph.Graph
    old_extract, old_consumers = Graph.extract_sub_graph_nodes, Graph.find_output_consumers
    old_nodes, old_counter = TransposeOptimizer.__dict__["nodes"], utils.INTERNAL_NAME

    def extract_sub_graph_nodes(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        found = old_extract(self, *args, **kwargs)
        keep = {id(n) for n in found}
        ordered, seen = [], set()
        for n in self.get_nodes():  # once each: tf2onnx's bilstm rewriter appends nodes to the list twice
            if id(n) in keep and id(n) not in seen:
                ordered.append(n)
                seen.add(id(n))
        return ordered + sorted((n for n in found if id(n) not in seen), key=lambda n: n.name)

    def find_output_consumers(self: Any, output_name: str) -> list[Any]:
        return sorted(old_consumers(self, output_name), key=lambda n: n.name)

    suffix = re.compile(r"__(\d+)(:\d+)?$")
    start = 1
    for node in getattr(graph_def, "node", ()):
        m = suffix.search(node.name)
        if m:
            start = max(start, int(m.group(1)) + 1)
    Graph.extract_sub_graph_nodes = extract_sub_graph_nodes
    Graph.find_output_consumers = find_output_consumers
    TransposeOptimizer.nodes = property(lambda self: list(self._g.get_nodes()))
    utils.INTERNAL_NAME = start
    try:
        yield
    finally:
        Graph.extract_sub_graph_nodes, Graph.find_output_consumers = old_extract, old_consumers
        TransposeOptimizer.nodes = old_nodes
        utils.INTERNAL_NAME = max(utils.INTERNAL_NAME, old_counter)


@contextlib.contextmanager
def _bfloat16_is_bfloat16() -> Iterator[None]:
    """While converting, map TF's bfloat16 to ONNX BFLOAT16 (tf2onnx maps it to FLOAT16, so a
    ``tf.cast(x, tf.bfloat16)`` was exported as a float16 cast: other rounding, other range)."""
    from onnx import TensorProto
    from tensorflow.core.framework import types_pb2
    from tf2onnx import tf_utils

    old = tf_utils.TF_TO_ONNX_DTYPE.get(types_pb2.DT_BFLOAT16)
    tf_utils.TF_TO_ONNX_DTYPE[types_pb2.DT_BFLOAT16] = TensorProto.BFLOAT16
    try:
        yield
    finally:
        tf_utils.TF_TO_ONNX_DTYPE[types_pb2.DT_BFLOAT16] = old


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
    """Rename graph inputs/outputs in place (``"image:0"`` -> ``"image"``).

    An output that no node produces (tf2onnx folds a constant output, e.g. ``tf.shape`` of a
    static input, into an initializer; or a graph input returned as is) gets an ``Identity`` node
    that writes the renamed output: renaming the output alone left ``"Graph output 'output' is
    not an output of any node"`` for ``onnx.checker``.
    """
    from onnx import helper

    output_map = dict(output_map)
    produced = {o for n in model.graph.node for o in n.output}
    for vi in model.graph.output:
        src = vi.name
        if src in produced or src not in output_map:
            continue
        final = output_map.pop(src)
        out = final if final != src and final not in input_map.values() else f"{src}__mmb_out"
        model.graph.node.append(helper.make_node("Identity", [src], [out], name=f"{out}__mmb_identity"))
        vi.name = out
        produced.add(out)
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


_NODE_IN_MESSAGE = (
    re.compile(r"node name:\s*(?P<node>[^\s)]*)\)?", re.I),  # shape inference: "(op_type:Reshape, node name: x)"
    re.compile(r"Name:\s*(?P<node>\S*)\s+OpType:\s*(?P<op>\S+)", re.I),  # checker: "... Name: x OpType: y"
)


def _failing_node(model: Any, message: str) -> Any | None:
    """The node ``onnx.checker`` / shape inference complained about, from its message or by
    checking each top-level node on its own."""
    import onnx

    by_name = {n.name: n for n in model.graph.node if n.name}
    for pattern in _NODE_IN_MESSAGE:
        m = pattern.search(message)
        if m and m.group("node") in by_name:
            return by_name[m.group("node")]
        if m and m.groupdict().get("op"):
            same_op = [n for n in model.graph.node if n.op_type == m.group("op")]
            if len(same_op) == 1:
                return same_op[0]
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    lex = onnx.checker.C.LexicalScopeContext()
    for node in model.graph.node:
        try:
            onnx.checker.check_node(node, ctx, lex)
        except TypeError:  # an onnx without the lexical-scope argument
            try:
                onnx.checker.check_node(node, ctx)
            except Exception:  # noqa: BLE001 - the checker's own exception types differ across versions
                return node
        except Exception:  # noqa: BLE001
            return node
    return None


def _checker_reason(message: str) -> str:
    """The checker's complaint on one line, without its context dump and node locator."""
    text = " ".join(message.split("==> Context")[0].split())
    text = re.sub(r"\(op_type:[^)]*\):\s*", "", text)
    text = re.sub(r"(\[ShapeInferenceError\]\s*)+(Inference error\(s\):\s*)?", "", text).strip()
    text = re.sub(r"\s*of node:\s*name:.*?OpType:\s*\S+", "", text, flags=re.I)
    return (text or message.strip())[:300].rstrip(".")


def check_model(model: Any, name: str) -> Any:
    """``onnx.checker`` (full check with shape inference) and an onnxruntime CPU load.

    Args:
        model: the exported ``onnx.ModelProto``.
        name: the artifact name, for messages.

    Returns:
        The model with inferred shapes.

    Raises:
        ExportError: the checker rejects the graph (the message names the failing node, its op
            and origin, the checker's one-line reason and what to do; the checker's own error
            is chained as ``__cause__``), or onnxruntime cannot load it.
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise _checker_error(model, name, exc) from exc
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except onnx.shape_inference.InferenceError as exc:  # pragma: no cover - full_check already ran it
        raise _checker_error(model, name, exc) from exc
    from mmbridge.runtime.session import make_session

    try:
        make_session(model)
    except Exception as exc:  # onnxruntime raises its own exception classes
        hint = ""
        bf16 = onnx.TensorProto.BFLOAT16
        if "NOT_IMPLEMENTED" in str(exc) and (
                any(vi.type.tensor_type.elem_type == bf16 for vi in model.graph.value_info)
                or any(t.data_type == bf16 for t in model.graph.initializer)):
            hint = ("\nThe graph computes in bfloat16 (TF bfloat16 is exported as ONNX BFLOAT16, exactly), and "
                    "onnxruntime's CPU provider has no bfloat16 kernel for this op. What to do: compute in float32 "
                    "(cast to bfloat16 and back only where the rounding is wanted), or keep the arithmetic outside "
                    "the graph")
        raise ExportError(f"onnxruntime cannot load the exported graph {name!r}: {exc}{hint}") from exc
    return model


def _checker_error(model: Any, name: str, exc: Exception) -> ExportError:
    message = str(exc)
    node = _failing_node(model, message)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if node is not None:
        origin = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
        label = repr(node.name) if node.name else f"#{list(model.graph.node).index(node)} (unnamed)"
        where = (f"node {label} (op {node.op_type}{', domain ' + node.domain if node.domain else ''}"
                 f"{f'; from TF op / Keras layer {origin!r}' if origin else ''})")
    else:
        where = "the graph (no single node is at fault: a graph input, output or initializer)"
    other = 17 if opset != 17 else 18
    return ExportError(
        f"exported graph {name!r} is not valid ONNX at opset {opset}: onnx.checker rejects {where}: "
        f"{_checker_reason(message)}.\nWhat to do: this is a converter bug (tf2onnx or an mmbridge rewrite), "
        f"not your model. Try another opset (opset={other}) or the other trainable= setting"
        f"{', or replace the layer named above' if node is not None else ''}; "
        f"report it with the output of `mmbridge info`."
    )


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


def _build(src: Traceable, name: str, options: ExportOptions, samples: Samples | None, freeze: Callable[[], tuple],
           tf: Any, t0: float, sample_fn: Callable[[int, int], Samples] | None = None,
           ) -> tuple[Any, dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Steps 5-10: freeze, convert, repair, check, optimise, verify; returns ``(model, meta, golden)``.

    For a Keras source, also the training contract (:func:`_training_contract`): the inventory
    always, and for ``trainable=True`` the weight audit and train parity (a failure refuses the
    export: nothing is cached)."""
    import onnx

    keras_obj = src.obj if src.kind in KERAS_KINDS else None
    if keras_obj is not None and options.trainable:
        from mmbridge.export.trainable import check_trainable_source

        check_trainable_source(keras_obj)  # mixed precision: refused before any tracing
    specs = src.specs
    opset = options.opset
    nchw = list(options.inputs_as_nchw or [])
    unknown_nchw = set(nchw) - {s.name for s in specs}
    if unknown_nchw:
        raise SpecError(f"inputs_as_nchw names {sorted(unknown_nchw)} that are not inputs {[s.name for s in specs]}")
    graph_def, in_names, out_names, out_keys, tables, unread = freeze()
    try:
        model = _convert(graph_def, in_names, out_names, opset, [n for n in in_names if n.split(":")[0] in nchw],
                         name, tables, training=options.training)
        _rename_io(model, {t: s.name for t, s in zip(in_names, specs)}, dict(zip(out_names, out_keys)))
        notes = []
        if options.trainable:
            from mmbridge.export.trainable import postprocess

            notes += postprocess(model)
        n_resize = resize_scales_to_sizes(model)
        if n_resize:
            notes.append(f"Resize scales -> exact sizes (TF's target size): {n_resize} node(s)")
        from mmbridge.export.rewrites import float_resize_of_integer_images

        n_float = float_resize_of_integer_images(model)
        if n_float:
            notes.append(f"interpolating Resize of an integer image computes in float32, as TF: {n_float} node(s)")
        notes += repair_and_check_ops(model, name)
        if options.training:
            from mmbridge.export.augment import strip_seeds

            n_seeds = strip_seeds(model)
            if n_seeds:
                notes.append(f"training=True: seed attribute removed from {n_seeds} random node(s) (fresh draws)")
    except UnsupportedOpsError as exc:
        if not options.training:
            raise
        from mmbridge.export.augment import explain_refusal

        raise explain_refusal(exc, src.obj, name) from exc
    model = check_model(model, name)
    if model.ByteSize() >= LARGE_GRAPH_BYTES:  # a full collection costs ~0.5 s: large graphs only
        gc.collect()  # tf2onnx's graph objects hold reference cycles (and copies of every initializer)

    # parity data: TF on NHWC inputs; the ONNX graph gets NCHW for inputs_as_nchw
    given_samples = samples is not None
    drawn = samples is None
    samples = dict(samples) if samples is not None else samples_from_specs(specs, batch=2, seed=0)
    missing = [s.name for s in specs if s.name not in samples]
    if missing:
        raise SpecError(f"sample_inputs lack {missing}; give one array per input spec")
    from mmbridge.errors import MMBridgeError

    try:
        tf_out = src.fn(*[tf.constant(samples[s.name]) for s in specs])
    except MMBridgeError:
        raise
    except Exception as exc:  # TF refuses the samples (an OpError, or any error of the traced code): name the input
        from mmbridge.export.sources import tf_run_error

        raise tf_run_error(exc, name, specs, samples) from exc
    ref = dict(zip(out_keys, [np.asarray(t) for t in tf.nest.flatten(tf_out)]))
    onnx_inputs = {k: (np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2))) if k in nchw else v) for k, v in samples.items()}
    tol = options.tolerance
    ref_draws = None
    if options.training:  # random outputs: a distribution check replaces elementwise parity
        from mmbridge.export import augment
        from mmbridge.export.sources import _caller, call_structure
        from mmbridge.runtime.session import make_session

        tf_one = tuple(tf.constant(samples[s.name][:1]) for s in specs)
        onnx_one = {k: v[:1] for k, v in onnx_inputs.items()}
        keras_call = _caller(src.obj, call_structure(src.obj), [s.name for s in specs], tf, training=True)

        def tf_call(_: Any) -> dict[str, np.ndarray]:  # the Keras object itself, eagerly (unpatched draws)
            return dict(zip(out_keys, [np.asarray(t) for t in tf.nest.flatten(keras_call(tf_one))]))

        ref_draws = augment.draw(tf_call, onnx_one)

    def passes_parity(m: Any) -> bool:
        if ref_draws is not None:
            sess = make_session(augment.seeded_copy(m))
            names = [o.name for o in sess.get_outputs()]
            got = augment.draw(lambda x: dict(zip(names, sess.run(None, dict(x)))), onnx_one)
            return augment.compare_draws(got, ref_draws, backend="ort")["passed"]
        got = run_ort(m, onnx_inputs)
        return all(r.passed for r in compare(got, ref, backend="ort", stage="onnx", tolerance=tol))

    try:  # the unoptimised graph must run at all; otherwise no optimiser pass could be judged
        run_ort(model, onnx_inputs)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidArgument types
        raise ExportError(
            f"exported bridge {name!r}: the ONNX graph tf2onnx wrote (opset {opset}) does not run in onnxruntime: "
            f"{type(exc).__name__}: {str(exc)[-400:]}. "
            + (f"The sample inputs were drawn from the specs ({_drawn_ranges(specs, samples)}) and TF accepted "
               f"them; if onnxruntime rejects these values (an index or size out of range), pass sample_inputs= with "
               f"values the model is meant for. Otherwise this " if drawn else "This ")
            + f"is a converter bug for this graph, not your model; "
            f"try another opset (e.g. opset={17 if opset != 17 else 18}), trainable={not options.trainable}, "
            f"or a dynamic batch / larger spatial size in input_specs, and report it with `mmbridge info`") from exc
    applied: list[str] = []
    rejected: list[str] = []
    if options.optimize:
        model, applied, rejected = optimize_model(model, passes_parity)
        model = check_model(model, name)
    ort_session: list[Any] = []

    def ort_runner(feeds: Samples) -> dict[str, np.ndarray]:
        """The final graph on onnxruntime (CPU, plain session.run, one session for every shape checked);
        feeds in the graph's layout."""
        if not ort_session:
            from mmbridge.runtime.session import make_session

            ort_session.append(make_session(model, providers=["CPUExecutionProvider"]))
        sess = ort_session[0]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))

    distribution = None
    if ref_draws is not None:
        report = ParityReport([], reference="tensorflow (training=True: see meta['distribution'])")
        distribution = _distribution(model, ref_draws, onnx_one, name)
        if options.verify:
            augment.raise_if_failed(distribution, name)
    else:
        ort_base = ort_runner(onnx_inputs)  # the final graph at the samples (reused by the backend check below)
        report = ParityReport(compare(ort_base, ref, backend="ort", stage="onnx", tolerance=tol))
    if options.verify:
        report.raise_if_failed(f"exported bridge {name!r}")

    # ---- both backends at several shapes (mmbridge.export.backends / mmbridge.export.shapes) ----------------
    # The final graph is converted to torch once (trainable for a trainable export: the training
    # contract below reuses that module); ORT and torch then run at the samples and at the extra
    # shapes of every symbolic dim. An ORT mismatch at any shape raises ParityError (nothing is
    # cached); a torch one is recorded and makes to_torch() refuse the artifact.
    from mmbridge.export import backends as _backends

    t_backends = time.perf_counter()
    if ref_draws is not None:  # random outputs: the distribution check above stands in for both backends
        requirements = backend_requirements(model)
        tor = (distribution or {}).get("torch")
        torch_skipped = (distribution or {}).get("torch_skipped")
        checked = {
            "backends": {
                "ort": {"converts": True, "matches": bool((distribution or {}).get("ort", {}).get("passed")),
                        "reason": "training=True: distribution check (meta['distribution'])"},
                "torch": {"converts": torch_skipped is None, "matches": None if tor is None else bool(tor["passed"]),
                          "reason": torch_skipped or "training=True: distribution check (meta['distribution'])"},
            },
            "parity_shapes": {"skipped": "training=True: random outputs; one shape, distributions compared"},
            "torch_verified": tor is not None and bool(tor["passed"]), "seconds": 0.0,
        }
        requirements["torch_backend"] = checked["torch_verified"]
        convert_seconds = 0.0
        torch_module, torch_run = None, None
        backend_seconds = 0.0
    else:
        requirements = backend_requirements(model)
        torch_module, torch_error = _backends.convert_torch(model, trainable=options.trainable, requirements=requirements)
        convert_seconds = round(time.perf_counter() - t_backends, 3)
        graph_in = [s.name for s in specs]  # graph.input also lists a trainable export's weight placeholders
        graph_out = [o.name for o in model.graph.output]
        torch_run = _backends.module_runner(torch_module, graph_in, graph_out) if torch_module is not None else None

        def torch_runner(feeds: Samples) -> dict[str, np.ndarray]:
            """The converted torch module (eval, no grad); feeds in the graph's layout; raises
            ConversionError when the graph did not convert (``torch_error`` says why)."""
            if torch_run is None:
                from mmbridge.errors import ConversionError

                raise ConversionError(torch_error)
            return torch_run(feeds)

        def tf_runner(feeds: Samples) -> dict[str, np.ndarray]:
            """TF on TF-layout feeds (NHWC), outputs by name."""
            out = src.fn(*[tf.constant(feeds[s.name]) for s in specs])
            return dict(zip(out_keys, [np.asarray(t) for t in tf.nest.flatten(out)]))

        def to_graph_layout(feeds: Samples) -> dict[str, np.ndarray]:
            return {k: (np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2))) if k in nchw else v) for k, v in feeds.items()}

        checked = _backends.check_backends(
            name, model, specs, samples, given=given_samples, sample_fn=sample_fn, tf_run=tf_runner,
            tf_errors=(tf.errors.OpError, ValueError, TypeError), to_onnx=to_graph_layout, ref=ref,
            runners={"ort": ort_runner, "torch": torch_runner if torch_run is not None else None},
            conversion_errors={"torch": torch_error}, tolerance=tol, verify=options.verify, base_outputs={"ort": ort_base})
        requirements["torch_backend"] = checked["torch_verified"]  # "verified": converts AND matches at every shape
        if not checked["torch_verified"] and not requirements["note"]:
            requirements["note"] = f"torch backend not verified at export: {checked['backends']['torch']['reason']}"
        backend_seconds = round(time.perf_counter() - t_backends, 3)
    # ---- end of the backend / shape checks ----------------------------------------------------------------
    # ---- probe inputs (mmbridge.export.probes): edge values per op, TF vs every backend runner ----
    # onnxruntime refuses on a probe mismatch; torch (when it was verified above) is probed too, and a
    # mismatch there is recorded like a torch parity failure: to_torch() then refuses the artifact.
    if ref_draws is not None:  # random outputs cannot be compared value by value
        probes_record = {"passed": None, "skipped": "training=True: random outputs (see meta['distribution'])"}
    else:
        probes_record = _probe_check(model, src, specs, samples, out_keys, in_names, graph_def, nchw, options, name,
                                     runners={"ort": ort_runner})
    if ref_draws is None and checked["torch_verified"] and probes_record.get("passed") is not None:
        from mmbridge.errors import ProbeError

        try:
            torch_probes = _probe_check(model, src, specs, samples, out_keys, in_names, graph_def, nchw, options,
                                        name, runners={"torch": torch_runner})
        except ProbeError as exc:
            torch_probes = {"passed": False, "error": str(exc)}
            reason = f"probe input differs from TF on torch: {str(exc).splitlines()[0][:400]}"
            checked["backends"]["torch"].update(matches=False, reason=reason)
            requirements["torch_backend"] = False
            note = f"torch backend not verified at export: {reason}"
            requirements["note"] = f"{requirements['note']}; {note}" if requirements.get("note") else note
        probes_record = dict(probes_record, torch=torch_probes)
    # ---- end probe inputs ----
    import tf2onnx

    model.producer_name = "mmbridge"
    model.doc_string = f"mmbridge bridge {name!r} exported from {src.kind} with tf2onnx {tf2onnx.__version__}"
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
        if s.name not in graph_inputs:
            raise ExportError(f"exported bridge {name!r}: input {s.name!r} is not an input of the ONNX graph "
                              f"({sorted(graph_inputs)}); the traced function ignores it")
        onnx_specs.append(d)
    obj = src.obj
    meta = {
        "role": options.role,
        "opset": opset,
        "source": {"kind": src.kind, "type": f"{type(obj).__module__}.{type(obj).__qualname__}",
                   **({"origin": src.origin} if src.origin else {})},
        "inputs": onnx_specs,
        "tf_inputs": [s.to_dict() for s in specs],
        "outputs": out_specs,
        "versions": export_versions(),
        "parity": report.to_dict(),
        "rewrites": notes,
        "tolerance": tol.to_dict() if tol else None,  # what export checked with; verify() reuses it
        "trainable": options.trainable,
        "training": options.training,
        "backend": requirements,
        "backends": checked["backends"],
        "parity_shapes": checked["parity_shapes"],
        "backend_check_seconds": backend_seconds,  # torch conversion + both backends at every shape
        "backend_check_breakdown": {"to_torch": convert_seconds, "runs": checked["seconds"]},
        "optimizer": {"applied": applied, "rejected": rejected},
        "probes": probes_record,
        "export_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if distribution is not None:
        from mmbridge.export.augment import training_record

        meta["augmentation"] = training_record(src.obj)
        meta["distribution"] = distribution
    elif keras_obj is not None:
        from mmbridge.export.augment import inference_record

        rec = inference_record(keras_obj, name)
        if rec is not None:
            meta["augmentation"] = rec
    if keras_obj is not None:
        if options.trainable:
            # the checks that need them are done: drop onnxruntime's session and TF's frozen graph (each
            # holds the weights again) before train parity copies them (issue 13: a 196 M parameter
            # ConvNeXtLarge needed more than 24 GiB; tools/export_memory.py prints the stages)
            ort_session.clear()
            graph_def = None
            getattr(freeze, "release", lambda: None)()
            if model.ByteSize() >= LARGE_GRAPH_BYTES:
                gc.collect()
        meta.update(_training_contract(keras_obj, name, options, model, specs, samples, sample_fn, nchw,
                                       module=torch_module, unread=unread))
        meta["export_seconds"] = round(time.perf_counter() - t0, 3)
    elif getattr(obj, "keras_variables", None) is not None and not options.trainable:
        # an inference export of a Keras-written SavedModel: its Keras variables, so that to_torch() follows
        # the artifact (frozen by default; trainable=True refused with trainable_refusal's fix)
        meta["keras_inventory"] = {"variables": obj.keras_variables, "layers": []}
        meta["trainable_refusal"] = obj.trainable_refusal
    golden = {"inputs": onnx_inputs, "outputs": ref}
    return model, meta, golden


def _probe_check(model: Any, src: Traceable, specs: Sequence[TensorSpec], samples: Samples, out_keys: Sequence[str],
                 in_names: Sequence[str], graph_def: Any, nchw: Sequence[str], options: ExportOptions, name: str,
                 runners: Mapping[str, Callable[[Samples], Mapping[str, np.ndarray]]] | None = None) -> dict[str, Any]:
    """The probe check of :mod:`mmbridge.export.probes`; its record for ``meta.json``.

    Runs only with ``options.verify`` and ``options.probes`` (else records why not). Backends plug
    in as ``runners`` (name -> ``{input: array (ONNX layout)} -> {output: array}``); default
    onnxruntime CPU only (``"ort"``); a torch runner joins as ``runners={"ort": ..., "torch": ...}``.

    Raises:
        ProbeError: a backend differs from TF on a probe input.
    """
    if not (options.verify and options.probes):
        return {"passed": None, "skipped": "probes=False" if options.verify else "verify=False"}
    from mmbridge.export.probes import run_probes

    if runners is None:
        runners = {"ort": ort_runner(model)}
    return run_probes(model, specs, src.fn, runners=runners, out_keys=out_keys, samples=samples, name=name,
                      graph_def=graph_def, input_tensors=dict(zip(in_names, [s.name for s in specs])), nchw=nchw,
                      tolerance=options.tolerance)


def ort_runner(model: Any) -> Callable[[Samples], dict[str, np.ndarray]]:
    """``{input: array} -> {output: array}`` on one onnxruntime CPU session of ``model`` (made once)."""
    from mmbridge.runtime.session import make_session

    sess = make_session(model, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    in_onnx = [i.name for i in sess.get_inputs()]

    def ort(feeds: Samples) -> dict[str, np.ndarray]:
        return dict(zip(out_names, sess.run(out_names, {k: feeds[k] for k in in_onnx})))

    return ort


def _drawn_ranges(specs: Sequence[TensorSpec], samples: Samples) -> str:
    """``"'ids' int32 0..9; 'x' float32"``: what was drawn for each input, for messages."""
    parts = []
    for s in specs:
        a = np.asarray(samples.get(s.name))
        rng = f" {a.min()}..{a.max()}" if a.size and a.dtype.kind in "iub" else ""
        parts.append(f"{s.name!r} {s.dtype}{rng}")
    return "; ".join(parts)


#: Source kinds whose object is a Keras model or layer (Keras 3 or tf-keras).
KERAS_KINDS = ("keras_model", "keras_layer")


def _distribution(model: Any, ref_draws: Mapping[str, np.ndarray], onnx_one: Mapping[str, np.ndarray],
                  name: str) -> dict[str, Any]:
    """The distribution check of a ``training=True`` export (:func:`mmbridge.export.augment.distribution_check`):
    onnxruntime always; torch when the graph converts (else ``torch_skipped`` says why)."""
    from mmbridge.convert.core import to_torch
    from mmbridge.errors import ConversionError
    from mmbridge.export.augment import distribution_check

    module, skipped = None, None
    try:
        module = to_torch(model)
    except ConversionError as exc:
        skipped = f"does not convert to torch: {str(exc).splitlines()[0][:300]}"
    record = distribution_check(lambda _: dict(ref_draws), model, onnx_one, name=name, torch_module=module,
                                ref=ref_draws)
    if skipped:
        record["torch_skipped"] = skipped
    return record
def _training_contract(obj: Any, name: str, options: ExportOptions, model: Any, specs: Sequence[TensorSpec],
                       samples: Samples | None, sample_fn: Callable[[int, int], Samples] | None,
                       nchw: Sequence[str], module: Any = None,
                       unread: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The training contract of a Keras export, as meta entries.

    ``keras_inventory`` always (it makes :func:`mmbridge.to_torch` follow the artifact: an inference
    export converts frozen). For ``trainable=True``: the converted module must pass the weight
    audit (``audit``, :func:`mmbridge.convert.contract.audit`) and train parity
    (``train_parity``: 3 SGD steps at batch 8, or 4 for models over
    :data:`~mmbridge.export.contract.TRAIN_PARITY_LARGE` trainable values,
    :func:`mmbridge.export.contract.train_parity`); ``contract_seconds`` is what both cost.
    ``module``: the ``to_torch(model, trainable=True)`` the backend check already converted
    (:mod:`mmbridge.export.backends`), reused instead of converting again; None converts here.
    ``unread``: the trainable variables the traced forward never reads (``_freeze``); recorded as
    ``keras_inventory["unread_variables"]``, which the audit and train parity exempt (Keras gives them
    no gradient: train parity checks that, too).

    Raises:
        ConversionError: the module does not convert, or the audit fails (names the Keras layer /
            variable and what to do).
        ParityError: training parity fails (names the first diverging Keras variable).
    """
    from mmbridge.export.contract import keras_inventory, train_parity

    inventory = keras_inventory(obj, unread=unread if options.trainable else None)
    out: dict[str, Any] = {"keras_inventory": inventory}
    if not options.trainable:
        return out
    from mmbridge.convert.contract import audit
    from mmbridge.convert.core import to_torch
    from mmbridge.errors import ConversionError

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    what = f"trainable export of {name!r}"
    try:
        module = module if module is not None else to_torch(model, trainable=True)
    except ConversionError as exc:
        raise ConversionError(f"{what}: the graph does not convert to a trainable torch module, so the training "
                              f"contract cannot hold: {exc}\nWhat to do: export with trainable=False and keep the "
                              f"bridge frozen (to_ort()), or register the missing converter") from exc
    seconds["to_torch"] = round(time.perf_counter() - t0, 3)
    report = audit(module, inventory, trainable=True)
    seconds["audit"] = round(time.perf_counter() - t0 - seconds["to_torch"], 3)
    out["audit"] = report.to_dict()
    report.raise_if_failed(what)
    if report.unread:  # Keras' forward gives them no gradient either, but the counts differ and a
        # training-only read (add_loss) would not be in the trace: say it where users see it
        logger.warning("%s: %s", what, report.summary())
    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type in (1, 10, 11, 16)]
    if not any(v["trainable"] for v in inventory["variables"]):
        out["train_parity"] = {"skipped": "the model has no trainable variables", "passed": None}
    elif not floats:
        out["train_parity"] = {"skipped": "the model has no floating output to take a loss of", "passed": None}
    else:
        n_values = sum(int(np.prod(v["shape"])) for v in inventory["variables"] if v["trainable"])
        batch = TRAIN_PARITY_BATCH if n_values <= TRAIN_PARITY_LARGE else TRAIN_PARITY_MIN_BATCH
        batches = train_batches(specs, samples, sample_fn, batch=batch)
        t1 = time.perf_counter()
        tf = _tf.import_tensorflow()
        try:
            # the export discards the module after this: it trains as the float32 side (no copy)
            tp = train_parity(obj, module, batches, input_names=[s.name for s in specs], nchw=list(nchw),
                              inventory=inventory, consume_module=True)
        except tf.errors.OpError as exc:  # Keras refuses a drawn training batch: name the input, how to fix
            from mmbridge.export.sources import tf_run_error

            raise tf_run_error(exc, name, specs, batches[0]) from exc
        seconds["train_parity"] = round(time.perf_counter() - t1, 3)
        out["train_parity"] = dict(tp.to_dict(), batch=int(len(next(iter(batches[0].values())))))
        tp.raise_if_failed(what)
    out["contract_seconds"] = round(time.perf_counter() - t0, 3)
    out["contract_breakdown"] = seconds
    return out


def _copy_out(art: BridgeArtifact, out: str | os.PathLike | None) -> BridgeArtifact:
    if out is None:
        return art
    import hashlib
    import shutil
    import uuid

    from mmbridge.artifact import replace_dir
    from mmbridge.store import cache_lock

    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    # one copier at a time per destination: two concurrent rename dances on the same --out failed
    # (one process renamed the directory the other was moving aside) and left .trash-* behind
    key = "out-" + hashlib.sha256(str(dest.resolve()).encode()).hexdigest()
    try:
        shutil.copytree(art.path, tmp)
        with cache_lock(key):
            replace_dir(tmp, dest)
            return BridgeArtifact.load(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["export", "export_located", "export_patches", "check_model", "optimize_model", "ExportOptions", "SAFE_PASSES",
           "DEFAULT_OPSET", "GOLDEN_FILE"]
