"""What :func:`mmbridge.export` accepts: one adapter per source kind, in :data:`SOURCES`.

An adapter answers two questions about one kind of source:

1. :meth:`SourceAdapter.locate` (in the calling process, **never importing TensorFlow**): where
   does this export run and what identifies it? A path gives the file(s) whose bytes are the
   fingerprint and a default name, and runs in a child process by default; a
   ``"module:attribute"`` reference runs in a child; a registered bridge adds its registration's
   defaults and hands over to its builder's source; a live TF object is exported in-process.
2. :meth:`SourceAdapter.prepare` (TensorFlow imported): what tf2onnx needs, as a
   :class:`Traceable`: a ``tf.function`` taking one positional tensor per input spec, the
   resolved specs, a default name, the source kind and what the fingerprint hashes.

Adapters are tried in registration order and the first whose :meth:`~SourceAdapter.matches`
holds wins (strings: a Keras file, a SavedModel directory, a reference, else a bridge name; live
objects: Keras 3, tf-keras, ``tf.function``, else any Python callable). This is an ordered list
with predicates rather than a name -> object :class:`~mmbridge._registry.Registry` because the
order is the meaning: a Keras model is also callable, and a bridge name is any string that is
not a path or a reference. A new source kind is one :class:`SourceAdapter` subclass below,
decorated with ``@SOURCES.register`` (``before=`` puts it ahead of an existing kind).

Shapes and dtypes: the ``tf.function`` of a :class:`Traceable` takes tensors of the specs'
shapes (symbolic dims become ``None``) and dtypes (``"string"`` -> ``tf.string``), NHWC for
images, and returns a tensor, a list / tuple, or a dict of tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mmbridge.errors import ExportError, RegistryError, SpecError
from mmbridge.specs import BridgeSpec, TensorSpec

if TYPE_CHECKING:
    from mmbridge.export.options import ExportOptions

logger = logging.getLogger("mmbridge.export")

KERAS_FILE_EXTENSIONS = (".keras", ".h5", ".hdf5")


# ---------------------------------------------------------------------------------------------
# what adapters return
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Located:
    """Where and how a source is exported, decided without TensorFlow.

    Args:
        adapter: the adapter whose :meth:`~SourceAdapter.prepare` turns ``obj`` into a
            :class:`Traceable`.
        obj: what ``prepare`` receives (the path as ``str``, the reference, a live object, or
            the :class:`~mmbridge.BridgeSpec` whose builder is called in-process).
        isolate: export in a spawned child process (which re-locates ``ref`` there).
        ref: the string a child process re-locates (a path or ``"module:attribute"``), or
            ``None`` for live objects.
        path: the file or directory whose bytes are the fingerprint, or ``None``.
        name: the default artifact name known without TF (a file's stem), or ``None``.
        bridge: the registration whose defaults apply to the options, or ``None``.
    """

    adapter: SourceAdapter
    obj: Any
    isolate: bool = False
    ref: str | None = None
    path: str | None = None
    name: str | None = None
    bridge: BridgeSpec | None = None


@dataclasses.dataclass(frozen=True)
class Traceable:
    """What tf2onnx needs from a source, once TensorFlow is imported.

    Args:
        fn: a ``tf.function`` with one positional argument per spec, in spec order, whose
            ``get_concrete_function()`` needs no arguments (an ``input_signature`` is set).
        specs: the resolved input specs (from the options, or read from the source).
        name: the default artifact name (model / function / directory name).
        kind: the source kind written to ``meta.json`` (``"keras_model"``, ``"keras_layer"``,
            ``"tf_function"``, ``"python_function"``, ``"saved_model"``).
        obj: the object exported (its type is recorded in ``meta.json``).
        payload: returns the bytes the fingerprint hashes without tracing (Keras: config and
            weights), or ``None`` to hash the frozen graph instead.
    """

    fn: Any
    specs: tuple[TensorSpec, ...]
    name: str
    kind: str
    obj: Any
    payload: Callable[[], bytes | None] = lambda: None
    origin: str | None = None
    """Where ``obj`` came from when it is not what the user passed (``"saved_model:<dir>"`` for a
    tf-keras model reloaded from its SavedModel directory); recorded in ``meta["source"]``."""


# ---------------------------------------------------------------------------------------------
# the adapter interface and the ordered list
# ---------------------------------------------------------------------------------------------
class SourceAdapter:
    """One kind of source. Subclasses set :attr:`kind` and :attr:`description` and implement
    :meth:`matches` and :meth:`prepare` (and :meth:`locate` for paths and references)."""

    kind: ClassVar[str] = ""
    """Registry key, e.g. ``"saved_model"``."""
    description: ClassVar[str] = ""
    """What the user gives, for error messages: ``"a SavedModel directory"``."""

    def matches(self, obj: Any) -> bool:
        """True when ``obj`` is this kind of source. Must not import TensorFlow or Keras."""
        raise NotImplementedError

    def locate(self, obj: Any, *, isolate: bool | None) -> Located:
        """Where ``obj`` is exported (default: a live object, in this process).

        Args:
            obj: the source, for which :meth:`matches` holds.
            isolate: the caller's ``isolate=`` (``None``: this kind's default).

        Raises:
            SpecError: the source is recognisably this kind but unusable (a missing file...).
        """
        return Located(self, obj)

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        """Turn ``obj`` (``Located.obj``) into a :class:`Traceable`; TensorFlow is imported.

        Raises:
            SpecError: the input specs are missing and cannot be read from the source, or they
                disagree with it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<source adapter {self.kind!r}>"


_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SourceAdapters:
    """The ordered adapters :func:`mmbridge.export` tries; the first that matches wins.

    Example:
        >>> SOURCES.kinds()[:3]
        ['keras_file', 'saved_model', 'reference']
    """

    def __init__(self) -> None:
        self._adapters: list[SourceAdapter] = []

    def register(self, cls: type[SourceAdapter] | None = None, *, before: str | None = None,
                 override: bool = False) -> Any:
        """Class decorator: add an instance of ``cls`` (after the others, or ahead of ``before``).

        Returns the class unchanged.

        Raises:
            RegistryError: ``cls.kind`` is not lower_snake_case, is already registered (unless
                ``override``), or ``before`` is not a registered kind.
        """

        def add(c: type[SourceAdapter]) -> type[SourceAdapter]:
            if not _KIND_RE.match(c.kind or ""):
                raise RegistryError(f"source adapter {c.__qualname__}: kind {c.kind!r} must be lower_snake_case")
            taken = [i for i, a in enumerate(self._adapters) if a.kind == c.kind]
            if taken and not override:
                raise RegistryError(f"source kind {c.kind!r} is already registered (by "
                                    f"{type(self._adapters[taken[0]]).__qualname__}); pass override=True to replace it")
            for i in reversed(taken):
                del self._adapters[i]
            at = len(self._adapters) if before is None else self._index(before)
            self._adapters.insert(at, c())
            return c

        return add if cls is None else add(cls)

    def _index(self, kind: str) -> int:
        return self._adapters.index(self.get(kind))

    def get(self, kind: str) -> SourceAdapter:
        """The adapter of ``kind``.

        Raises:
            RegistryError: unknown kind (the message lists the registered ones).
        """
        for a in self._adapters:
            if a.kind == kind:
                return a
        raise RegistryError(f"unknown source kind {kind!r}; registered: {self.kinds()}")

    def kinds(self) -> list[str]:
        """The registered kinds, in the order they are tried."""
        return [a.kind for a in self._adapters]

    def __iter__(self) -> Iterator[SourceAdapter]:
        return iter(list(self._adapters))

    def match(self, obj: Any) -> SourceAdapter:
        """The first adapter that matches ``obj``.

        Raises:
            SpecError: no adapter matches; the message lists what export() accepts.
        """
        for a in self._adapters:
            if a.matches(obj):
                return a
        accepted = ", ".join(a.description for a in self._adapters if a.description)
        raise SpecError(f"export(): cannot export a {type(obj).__name__} ({_short_repr(obj)}); give {accepted}")

    def locate(self, obj: Any, *, isolate: bool | None = None) -> Located:
        """``self.match(obj).locate(obj, isolate=isolate)``: where ``obj`` is exported, without TF."""
        return self.match(obj).locate(obj, isolate=isolate)


SOURCES = SourceAdapters()
"""The adapters :func:`mmbridge.export` tries, in order (see the module docstring)."""


# ---------------------------------------------------------------------------------------------
# helpers shared by adapters
# ---------------------------------------------------------------------------------------------
def _short_repr(obj: Any) -> str:
    r = repr(obj)
    return r if len(r) <= 80 else r[:77] + "..."


def _fspath(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        p = os.fspath(obj)
        return p if isinstance(p, str) else None
    return None


def default_name(obj: Any) -> str:
    """An object's own name: ``.name``, else ``__name__``, else its type's name."""
    n = getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return str(n)


def tf_signature(specs: tuple[TensorSpec, ...], tf: Any) -> list[Any]:
    """``tf.TensorSpec`` per input spec: symbolic dims -> ``None``, ``"string"`` -> ``tf.string``."""
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape],
                          tf.string if s.dtype == "string" else tf.as_dtype(s.dtype), name=s.name) for s in specs]


def spec_from_tf(s: Any, name: str) -> TensorSpec:
    """A :class:`TensorSpec` from a ``tf.TensorSpec``: a dynamic first dim becomes ``"batch"``;
    4-D inputs are NHWC.

    Raises:
        SpecError: unknown rank.
    """
    shape = tuple(None if d is None else int(d) for d in s.shape.as_list()) if s.shape.rank is not None else None
    if shape is None:
        raise SpecError(f"input {name!r} has unknown rank in TF; pass input_specs=")
    shape = ("batch",) + shape[1:] if shape and shape[0] is None else shape
    layout = "NHWC" if len(shape) == 4 else None
    return TensorSpec(name, shape, s.dtype.name if s.dtype.name != "string" else "string", layout)


def _signature_specs(obj: Any, tf: Any) -> tuple[TensorSpec, ...] | None:
    if getattr(obj, "input_signature", None):
        flat = tf.nest.flatten(obj.input_signature)
        return tuple(spec_from_tf(s, s.name or f"input_{i}") for i, s in enumerate(flat))
    return None


def _missing_specs(obj: Any) -> SpecError:
    return SpecError(
        f"cannot read the input specs of {type(obj).__name__} {default_name(obj)!r}: pass input_specs="
        f"[mmbridge.TensorSpec(name, shape, dtype, layout)] (a tf.function needs an input_signature or specs; "
        f"a subclassed Keras model or a layer needs specs)"
    )


def importable_ref(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` of a function a child process can import, else ``None``."""
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        return None
    return f"{mod}:{qual}"


def _locate_returned(value: str, where: str) -> Located:
    """Locate a string a builder or a registration returned: a path or a reference only."""
    located = SOURCES.locate(value, isolate=False)
    if isinstance(located.adapter, BridgeSource):
        raise SpecError(f"{where} returned {value!r}, which is not an existing path or a 'module:attribute' "
                        f"reference; return a TF object, a SavedModel directory, a Keras file or a reference")
    return located


# ---------------------------------------------------------------------------------------------
# sources given by name: files, directories, references, registered bridges
# ---------------------------------------------------------------------------------------------
@SOURCES.register
class KerasFileSource(SourceAdapter):
    """A Keras model file, ``.keras`` (Keras 3) or ``.h5`` / ``.hdf5`` (Keras 2 HDF5).

    Fingerprinted by the file's bytes; exported in a child process by default; loaded with
    ``keras.models.load_model(path, compile=False)`` and then exported as a Keras model.
    """

    kind = "keras_file"
    description = "a Keras model file (.keras, .h5)"

    def matches(self, obj: Any) -> bool:
        p = _fspath(obj)
        return p is not None and (os.path.isfile(p) or p.endswith(KERAS_FILE_EXTENSIONS))

    def locate(self, obj: Any, *, isolate: bool | None) -> Located:
        p = _fspath(obj)
        assert p is not None
        if not os.path.isfile(p):
            raise SpecError(f"export({p!r}): no such file (cwd {os.getcwd()}); give the path of a saved Keras model")
        if not p.endswith(KERAS_FILE_EXTENSIONS):
            raise SpecError(f"export({p!r}): a file must be a Keras model (.keras, .h5); got another extension. "
                            f"A SavedModel is a directory: pass the directory")
        return Located(self, p, isolate=True if isolate is None else isolate, ref=p, path=p, name=Path(p).stem)

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        import keras

        model = keras.models.load_model(obj, compile=False)
        return SOURCES.match(model).prepare(model, options, tf)


class LoadedSavedModel:
    """A loaded SavedModel and its directory (recorded as the source type in ``meta.json``).

    ``writer`` is who wrote it (:func:`saved_model_writer`); for a Keras-written one,
    ``keras_variables`` lists its variables as the training-contract inventory does
    (``{"path", "marker", "shape", "trainable", "layer"}``) and ``trainable_refusal`` says why an
    inference export of it cannot become trainable in torch (what ``to_torch(trainable=True)`` raises).
    """

    def __init__(self, path: str, loaded: Any, writer: str | None = None):
        self.path = path
        self.loaded = loaded
        self.writer = writer
        self.keras_variables: list[dict[str, Any]] | None = None
        self.trainable_refusal: str | None = None
        if writer in ("tf_keras", "keras3_export"):
            from mmbridge.export.trainable import STATE_MARK, VAR_MARK, _safe_path

            out = []
            for v in getattr(loaded, "variables", ()):
                if not v.dtype.is_floating:
                    continue
                vpath = v.name.split(":")[0]
                out.append({"path": vpath, "marker": (VAR_MARK if v.trainable else STATE_MARK) + _safe_path(vpath),
                            "shape": [int(d) for d in v.shape], "trainable": bool(v.trainable),
                            "layer": vpath.rsplit("/", 1)[0] if "/" in vpath else vpath})
            self.keras_variables = out
            self.trainable_refusal = (
                f"SavedModel {path} was written by {'tf-keras (model.save)' if writer == 'tf_keras' else 'Keras 3 (model.export)'} "
                f"and exported as an inference graph: its BatchNormalization layers are folded into constants and its "
                f"Dropout layers are gone. What to do: " + (
                    "re-export it with trainable=True (mmbridge reloads the tf-keras model from the directory)"
                    if writer == "tf_keras" else
                    "export the Keras model object or its .keras file with trainable=True (a model.export() "
                    "directory holds only the inference signature)") + ", or use to_torch(trainable=False) / to_ort()")


#: Files / attributes that tell who wrote a SavedModel directory.
TF_KERAS_METADATA = "keras_metadata.pb"


def saved_model_writer(path: str, loaded: Any = None) -> str | None:
    """Who wrote the SavedModel at ``path``: ``"tf_keras"`` (tf-keras' ``model.save(dir)``: a
    ``keras_metadata.pb`` beside ``saved_model.pb``, from which ``tf_keras.models.load_model`` rebuilds the
    model), ``"keras3_export"`` (Keras 3's ``model.export(dir)`` / ``ExportArchive``: the loaded object
    tracks ``trainable_variables`` and ``non_trainable_variables`` but holds only inference endpoints), or
    ``None`` (anything else, e.g. ``tf.saved_model.save`` of a ``tf.Module``)."""
    if os.path.isfile(os.path.join(path, TF_KERAS_METADATA)):
        return "tf_keras"
    if loaded is not None and hasattr(loaded, "non_trainable_variables") and hasattr(loaded, "trainable_variables"):
        return "keras3_export"
    return None


@SOURCES.register
class SavedModelSource(SourceAdapter):
    """A SavedModel directory (``saved_model.pb`` + ``variables/``), exported through its
    ``serving_default`` signature (whose keyword inputs, sorted by name, are the specs when
    none are given). Fingerprinted by the bytes of every file; exported in a child by default."""

    kind = "saved_model"
    description = "a SavedModel directory"

    def matches(self, obj: Any) -> bool:
        p = _fspath(obj)
        return p is not None and os.path.isdir(p)

    def locate(self, obj: Any, *, isolate: bool | None) -> Located:
        p = _fspath(obj)
        assert p is not None
        if not os.path.isfile(os.path.join(p, "saved_model.pb")):
            raise SpecError(f"export({p!r}): directory has no saved_model.pb; pass a SavedModel directory")
        return Located(self, p, isolate=True if isolate is None else isolate, ref=p, path=p,
                       name=Path(p).resolve().name or "saved_model")

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        if options.trainable:
            return self._prepare_trainable(obj, options, tf)
        loaded = tf.saved_model.load(obj)
        sig = loaded.signatures.get("serving_default")
        if sig is None:
            raise SpecError(f"SavedModel {obj} has no 'serving_default' signature; re-save it with "
                            f"signatures={{'serving_default': fn}}")
        if options.input_specs:
            specs = options.input_specs
        else:
            _, kw = sig.structured_input_signature
            specs = tuple(spec_from_tf(s, k) for k, s in sorted(kw.items()))
        names = [s.name for s in specs]

        @tf.function(input_signature=tf_signature(specs, tf))
        def saved_model_fn(*args):
            return sig(**dict(zip(names, args)))

        return Traceable(saved_model_fn, specs, Path(obj).name or "saved_model", "saved_model",
                         LoadedSavedModel(obj, loaded, saved_model_writer(obj, loaded)))

    def _prepare_trainable(self, obj: str, options: ExportOptions, tf: Any) -> Traceable:
        """``trainable=True``: the training graph of the model, not the serving signature.

        * tf-keras' ``model.save(dir)``: ``tf_keras.models.load_model(dir, compile=False)`` rebuilds the
          model (its config is in ``keras_metadata.pb``), exported as a tf-keras model (BatchNorm,
          Dropout, every weight kept; the training contract runs);
        * Keras 3's ``model.export(dir)``: refused (only the inference endpoint was saved, with
          BatchNorm folded and Dropout gone);
        * any other SavedModel (a ``tf.Module``): its ``serving_default`` signature, like a
          ``tf.function`` (no Keras layers to keep; the converter recognises weights by their ops).

        Raises:
            ExportError: a Keras 3 export directory, or a tf-keras one that does not reload.
        """
        from mmbridge.errors import ExportError

        writer = saved_model_writer(obj)
        loaded = None
        if writer is None:
            loaded = tf.saved_model.load(obj)
            writer = saved_model_writer(obj, loaded)
        if writer == "keras3_export":
            raise ExportError(
                f"trainable export of SavedModel {obj}: it was written by Keras 3's model.export(), which saves only "
                f"the inference endpoint (BatchNormalization folded into constants, Dropout removed), so no training "
                f"graph can be recovered from it and a trainable torch module would silently train something else. "
                f"What to do: export the Keras model object or its .keras file (model.save('m.keras')) with "
                f"trainable=True, or export this directory with trainable=False (a frozen bridge)")
        if writer != "tf_keras":
            return self.prepare(obj, dataclasses.replace(options, trainable=False), tf)  # the signature path
        try:
            import tf_keras

            model = tf_keras.models.load_model(obj, compile=False)
        except Exception as exc:  # noqa: BLE001 - custom layers / objects the directory does not rebuild
            raise ExportError(
                f"trainable export of SavedModel {obj}: it was written by tf-keras (model.save), but "
                f"tf_keras.models.load_model could not rebuild the model ({type(exc).__name__}: {str(exc)[:300]}), and "
                f"its serving signature alone has BatchNormalization folded and Dropout removed. What to do: make the "
                f"custom objects importable (tf_keras.utils.custom_object_scope / register_keras_serializable) in a "
                f"module and export the loaded model object, or export with trainable=False (frozen)") from exc
        src = SOURCES.match(model).prepare(model, options, tf)
        return dataclasses.replace(src, name=Path(obj).resolve().name or src.name, origin=f"saved_model:{obj}")


@SOURCES.register
class ReferenceSource(SourceAdapter):
    """A ``"module:attribute"`` reference (``"pkg.models:build"``, ``"pkg:Model.create"``) to
    any other source, or to a zero-argument builder returning one (or a path / reference).
    Exported in a child process by default, which imports the module (the caller never does)."""

    kind = "reference"
    description = "a 'module:attribute' reference"

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, str) and ":" in obj and not os.path.isabs(obj) and not os.path.exists(obj)

    def locate(self, obj: Any, *, isolate: bool | None) -> Located:
        return Located(self, obj, isolate=True if isolate is None else isolate, ref=obj)

    #: How many references a builder may hand on (``a:build`` returning ``"b:build"``...).
    MAX_CHAIN = 8

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        chain = [obj]
        value = self.resolve(obj)
        while isinstance(value, str):
            located = _locate_returned(value, f"reference {chain[-1]!r}")
            if not isinstance(located.adapter, ReferenceSource):
                return located.adapter.prepare(located.obj, options, tf)
            if value in chain or len(chain) >= self.MAX_CHAIN:
                raise SpecError(f"export({obj!r}): the references lead in a circle or more than {self.MAX_CHAIN} deep "
                                f"({' -> '.join(chain + [value])}); a builder must return a TF object, a path, or a "
                                f"reference that ends in one")
            chain.append(value)
            value = self.resolve(value)
        return SOURCES.match(value).prepare(value, options, tf)

    @staticmethod
    def resolve(ref: str) -> Any:
        """Import ``module``, follow the dotted ``attribute`` and call it if it is a zero-argument
        builder (a plain callable, not a TF object).

        Raises:
            SpecError: the module does not import or lacks the attribute.
        """
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
        is_tf = any(SOURCES.get(k).matches(obj) for k in ("keras", "tf_keras", "tf_function"))
        if callable(obj) and not is_tf and _takes_no_args(obj):
            obj = obj()  # a zero-argument builder (or a class built without arguments)
        return obj


def _takes_no_args(fn: Any) -> bool:
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


@SOURCES.register
class BridgeSource(SourceAdapter):
    """A registered bridge name (``mmbridge.bridges.names()``) or a :class:`~mmbridge.BridgeSpec`.

    Its registration supplies the defaults of the options (input specs, opset, name, role,
    tolerance, sample inputs, ``export_kwargs``). The builder is exported through its own source:
    a string builder is located as a path / reference; an importable builder function becomes a
    ``"module:qualname"`` reference exported in a child (``isolate=None``); otherwise (or with
    ``isolate=False``) the builder is called in this process and its result exported.
    """

    kind = "bridge"
    description = "a registered bridge name or a BridgeSpec"

    def matches(self, obj: Any) -> bool:
        return isinstance(obj, (BridgeSpec, str))  # tried after the path and reference kinds

    def locate(self, obj: Any, *, isolate: bool | None) -> Located:
        if isinstance(obj, BridgeSpec):
            spec = obj
        else:
            from mmbridge.registry import get_bridge

            spec = get_bridge(obj)
        builder = spec.builder
        if isinstance(builder, str):
            located = SOURCES.locate(builder, isolate=isolate)
            if isinstance(located.adapter, BridgeSource):
                raise SpecError(f"bridge {spec.name!r}: builder {builder!r} is not an existing path or a "
                                f"'module:attribute' reference")
            return dataclasses.replace(located, bridge=spec)
        ref = importable_ref(builder)
        if isolate is None and ref is not None:
            return dataclasses.replace(SOURCES.get("reference").locate(ref, isolate=None), bridge=spec)
        if isolate and ref is None:
            raise SpecError(f"bridge {spec.name!r}: builder {builder!r} cannot be imported by a child process "
                            f"(defined in __main__ or a local scope); pass isolate=False or define it in a module")
        if isolate:
            return dataclasses.replace(SOURCES.get("reference").locate(ref, isolate=True), bridge=spec)
        if isolate is None:
            logger.info("export %s: builder %r is not importable by module path; exporting in this process "
                        "(TensorFlow is loaded here)", spec.name, builder)
        return Located(self, spec, bridge=spec)

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        value = obj.builder()
        if isinstance(value, str):
            located = _locate_returned(value, f"bridge {obj.name!r}'s builder")
            return located.adapter.prepare(located.obj, options, tf)
        return SOURCES.match(value).prepare(value, options, tf)


# ---------------------------------------------------------------------------------------------
# live TF objects (exported in this process)
# ---------------------------------------------------------------------------------------------
@SOURCES.register
class KerasSource(SourceAdapter):
    """A Keras 3 model (functional, ``Sequential``, subclassed) or layer, called with
    ``training=False`` (``options.training``: ``True`` for a training-mode export, see
    :mod:`mmbridge.export.augment`) in the structure it takes (:func:`_caller`): the dict / list / nested
    structure a functional model was built on (keras-hub backbones take
    ``{"token_ids", "padding_mask", ...}``), else one tensor, keyword tensors when ``call``
    names every input spec, or a list (a dict by spec name if the list is refused).

    Specs come from a functional model's inputs, named by their dict keys (else the ``Input``
    names; Keras auto-names become ``"input"`` / ``"input_{i}"``); subclassed models and layers
    need ``input_specs``. Integer inputs without a ``value_range`` get one from the model's
    embeddings (:func:`with_model_ranges`), so the default parity samples are valid ids. The
    fingerprint hashes config and weights (:func:`~mmbridge.export.fingerprint.keras_payload`),
    without tracing.
    """

    kind = "keras"
    description = "a Keras model or layer"
    module = "keras"
    """The top-level module whose ``layers.Layer`` / ``Model`` this adapter handles."""

    def _module(self) -> Any:
        return sys.modules.get(self.module)  # not imported yet: obj cannot be one of its objects

    def matches(self, obj: Any) -> bool:
        k = self._module()
        try:
            return k is not None and isinstance(obj, k.layers.Layer)
        except AttributeError:  # a partly imported module
            return False

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        from mmbridge.export.fingerprint import keras_payload

        structure = call_structure(obj)
        specs = options.input_specs or _signature_specs(obj, tf) or self._input_specs(obj)
        if not specs:
            raise _missing_specs(obj)
        specs = with_model_ranges(obj, specs)
        names = [s.name for s in specs]
        call = _caller(obj, structure, names, tf, training=options.training)

        @tf.function(input_signature=tf_signature(specs, tf))
        def keras_fn(*args):
            with self.trace_patches():
                return call(args)

        kind = "keras_model" if isinstance(obj, self._module().Model) else "keras_layer"
        return Traceable(keras_fn, specs, default_name(obj), kind, obj, lambda: keras_payload(obj))

    @contextlib.contextmanager
    def trace_patches(self) -> Iterator[None]:
        """Patches active while the model's call is traced (none for Keras 3: see
        :func:`mmbridge.export.exporter.export_patches`)."""
        yield

    @staticmethod
    def _input_specs(obj: Any) -> tuple[TensorSpec, ...] | None:
        named = _named_inputs(obj)
        if not named:
            return None
        specs = []
        for nm, t in named:
            shape = tuple(None if d is None else int(d) for d in t.shape)
            shape = ("batch",) + tuple(shape[1:]) if shape and shape[0] is None else shape
            dt = t.dtype if isinstance(t.dtype, str) else t.dtype.name
            specs.append(TensorSpec(nm, shape, dt, "NHWC" if len(shape) == 4 else None))
        return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Keras call structure (one tensor, a list, a dict, keyword tensors) and value ranges
# ---------------------------------------------------------------------------------------------
def call_structure(obj: Any) -> Any:
    """The nested input structure a functional Keras model was built on (a ``dict`` of
    ``KerasTensor`` for keras-hub backbones, a list for multi-input models, one tensor), or
    ``None`` when the model does not record one (subclassed models, layers).

    Keras 3 keeps it as ``_inputs_struct``, tf-keras as ``_nested_inputs``.
    """
    for attr in ("_inputs_struct", "_nested_inputs"):
        try:
            value = getattr(obj, attr, None)
        except Exception:  # noqa: BLE001 - a property that raises on an unbuilt model
            value = None
        if value is not None:
            return value
    return None


def _flatten_with_names(structure: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(name, leaf)`` in ``tf.nest`` order: dict keys (sorted) name their leaves; list items
    take their tensor's own name."""
    if isinstance(structure, dict):
        out = []
        for k in sorted(structure):
            out += _flatten_with_names(structure[k], f"{prefix}{k}" if not prefix else f"{prefix}_{k}")
        return out
    if isinstance(structure, (list, tuple)):
        out = []
        for i, v in enumerate(structure):
            out += _flatten_with_names(v, prefix + (f"_{i}" if prefix else ""))
        return out
    return [(prefix, structure)]


def _named_inputs(obj: Any) -> list[tuple[str, Any]]:
    """The model's input tensors with the names the input specs take: dict keys for a dict of
    inputs, else the ``Input`` names (Keras auto-names become ``"input"`` / ``"input_{i}"``)."""
    structure = call_structure(obj)
    if structure is not None:
        leaves = _flatten_with_names(structure)
    else:
        leaves = [("", t) for t in (getattr(obj, "inputs", None) or [])]
    out = []
    n = len(leaves)
    for i, (nm, t) in enumerate(leaves):
        if not nm:
            nm = (getattr(t, "name", None) or "").split(":")[0]
        if not nm or nm.startswith("keras_tensor"):  # Keras 3 auto-name: not meaningful
            nm = "input" if n == 1 else f"input_{i}"
        out.append((nm, t))
    names = [nm for nm, _ in out]
    if len(set(names)) != len(names):  # clashing Input names: fall back to positions
        out = [("input" if n == 1 else f"input_{i}", t) for i, (_, t) in enumerate(out)]
    return out


def _caller(obj: Any, structure: Any, names: list[str], tf: Any, *, training: bool = False
            ) -> Callable[[tuple], Any]:
    """``args -> obj(<args in the structure the model takes>, training=training)`` (False for export,
    True for the training contract's train parity).

    * a recorded dict structure: a dict by key (``names`` are the specs' names; when they are
      not the dict's keys, the specs are taken in ``tf.nest`` order);
    * a recorded list / tuple / nested structure: ``tf.nest.pack_sequence_as``;
    * no record (subclassed model, layer): one tensor; keyword tensors when the ``call``
      signature names every spec; else a list, and a dict by spec name if the list is refused.
    """
    n = len(names)
    if isinstance(structure, dict) and set(structure) == set(names):
        return lambda args: obj(dict(zip(names, args)), training=training)
    if structure is not None and not _is_leaf(structure):
        return lambda args: obj(tf.nest.pack_sequence_as(structure, list(args)), training=training)
    if n == 1:
        return lambda args: obj(args[0], training=training)
    if structure is not None:  # a single recorded input but several specs: what export() always did
        return lambda args: obj(list(args), training=training)
    params = _call_params(obj)
    if params is not None and set(names) <= set(params):
        return lambda args: obj(**dict(zip(names, args)), training=training)

    def list_then_dict(args: tuple) -> Any:
        try:
            return obj(list(args), training=training)
        except (ValueError, TypeError, KeyError) as exc:
            try:
                return obj(dict(zip(names, args)), training=training)
            except Exception:  # noqa: BLE001 - report the first (list) failure, it is the default call
                raise exc from None

    return list_then_dict


def _is_leaf(structure: Any) -> bool:
    return not isinstance(structure, (dict, list, tuple))


def _call_params(obj: Any) -> list[str] | None:
    """The parameter names of ``obj.call`` (without ``self``), or ``None``."""
    try:
        return [p for p in inspect.signature(obj.call).parameters if p not in ("training", "mask", "kwargs")]
    except (TypeError, ValueError, AttributeError):
        return None


_INTEGER = ("int8", "int16", "int32", "int64", "uint8")


def _sublayers(obj: Any) -> list[Any]:
    """Every layer inside ``obj`` (Keras 3 ``_flatten_layers``, tf-keras ``submodules``)."""
    for attr in ("_flatten_layers",):
        fn = getattr(obj, attr, None)
        if callable(fn):
            try:
                return [x for x in fn(include_self=False, recursive=True)]
            except TypeError:
                pass
    try:
        return list(getattr(obj, "submodules", ()))
    except Exception:  # noqa: BLE001
        return []


def _vocab_size(layer: Any) -> int | None:
    """The number of ids an embedding-like layer accepts (``Embedding.input_dim``,
    keras-hub ``TokenAndPositionEmbedding.vocabulary_size``)."""
    for attr in ("input_dim", "vocabulary_size"):
        v = getattr(layer, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def embedding_bounds(obj: Any) -> tuple[dict[str, int], int | None]:
    """``({input name: ids accepted}, smallest vocabulary in the model)``.

    An integer input feeding an embedding-like layer directly is bounded by that layer's size;
    the smallest vocabulary of all embedding layers is the fallback for inputs that reach an
    embedding through other layers (or models without a recorded graph).
    """
    try:
        by_id = {id(t): nm for nm, t in _named_inputs(obj)}
    except Exception:  # noqa: BLE001 - an unbuilt subclassed model raises on .inputs
        by_id = {}
    direct: dict[str, int] = {}
    sizes = []
    for layer in _sublayers(obj):
        size = _vocab_size(layer)
        if size is None:
            continue
        sizes.append(size)
        for node in getattr(layer, "_inbound_nodes", None) or []:
            try:
                tensors = node.input_tensors
            except Exception:  # noqa: BLE001 - tf-keras nodes of layers called eagerly
                continue
            for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors]):
                nm = by_id.get(id(t))
                if nm is not None:
                    direct[nm] = min(direct.get(nm, size), size)
    return direct, (min(sizes) if sizes else None)


def with_model_ranges(obj: Any, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """``specs`` with a ``value_range`` for integer inputs that have none: ``(0, n - 1)`` for an
    input bounded by an embedding of ``n`` ids (the segment embedding for segment ids), ``(0, 1)``
    for padding masks (names containing ``"mask"``; :func:`mmbridge.specs.samples_from_specs`
    gives every row at least one 1). A spec's own ``value_range`` always wins."""
    if not any(s.dtype in _INTEGER and s.value_range is None for s in specs):
        return specs
    direct, smallest = embedding_bounds(obj)
    out = []
    for s in specs:
        if s.dtype in _INTEGER and s.value_range is None:
            if "mask" in s.name.lower():
                s = dataclasses.replace(s, value_range=(0, 1))
            elif s.name in direct:
                s = dataclasses.replace(s, value_range=(0, direct[s.name] - 1))
            elif smallest is not None:
                s = dataclasses.replace(s, value_range=(0, smallest - 1))
        out.append(s)
    return tuple(out)


def tf_run_error(exc: BaseException, name: str, specs: tuple[TensorSpec, ...], samples: Any) -> ExportError:
    """The error to raise when TF itself fails on the sample inputs during the parity run.

    Names the input(s) the failure is most likely about (the integer inputs, the one whose
    name or embedding layer the TF message mentions first) with the value range sampled, the
    TF message's first line, and how to pass ``sample_inputs`` / ``value_range``.
    """
    import numpy as np

    msg = str(exc).strip()
    text = getattr(exc, "message", None) or msg
    useful = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(
        ("Graph execution error", "Detected at node", "File ", "[[", "Stack trace", "Traceback"))]
    first = useful[-1] if useful else type(exc).__name__
    node = re.search(r"\{\{node ([^}]+)\}\}", msg)
    if node:
        first += f" (at TF node {node.group(1)!r})"
    m = re.search(r"indices\[[^\]]*\] = (-?\d+) is not in \[(-?\d+), (-?\d+)\)", msg)
    if m:
        first = m.group(0) + (f" (at TF node {node.group(1)!r})" if node else "")
    named = [s for s in specs if re.search(rf"\b{re.escape(s.name)}\b", msg)]
    ints = [s for s in specs if s.dtype in _INTEGER]
    suspects = named or ints or list(specs)
    lines = []
    for s in suspects:
        arr = np.asarray(samples.get(s.name)) if samples is not None and s.name in samples else None
        got = f"sampled values {arr.min()}..{arr.max()}" if arr is not None and arr.size and arr.dtype.kind in "iub" \
            else "sampled"
        lines.append(f"input {s.name!r} ({s.dtype}, shape {list(s.shape)}, {got}, value_range {s.value_range})")
    hint = f" (the model accepts ids in [{m.group(2)}, {m.group(3)})" if m else ""
    ex = ", ".join(f"{s.name!r}: np.array(..., dtype={s.dtype!r})" for s in specs)
    return ExportError(
        f"export {name!r}: TensorFlow failed running the model on the sample inputs{hint}: {first[:300]}\n"
        f"  suspected: " + "; ".join(lines) + "\n"
        f"What to do: pass sample_inputs={{{ex}}} with values the model accepts (or a "
        f"(batch, seed) -> dict callable), or give the TensorSpec a value_range=(low, high)."
    )


@SOURCES.register
class TFKerasSource(KerasSource):
    """A tf-keras (Keras 2, ``import tf_keras``) model or layer, handled like a Keras 3 one.

    Never matches when ``tf_keras`` is not installed (or not imported: then no object can be
    one of its models).
    """

    kind = "tf_keras"
    description = ""  # listed with "a Keras model or layer"
    module = "tf_keras"

    @contextlib.contextmanager
    def trace_patches(self) -> Iterator[None]:
        """tf-keras runs grouped convolutions (``groups > 1``: RegNet, ResNeXt) through a nested
        ``tf.function(jit_compile=True)``, which reaches tf2onnx as an opaque ``PartitionedCall``
        it refuses. While tracing, the plain ``convolution_op`` (``tf.nn.convolution`` with the
        grouped kernel, ONNX ``Conv(group=...)``) is used instead: the same computation inlined.
        """
        try:
            from tf_keras.src.layers.convolutional.base_conv import Conv
        except ImportError:  # another tf-keras layout: nothing to patch
            yield
            return
        orig = Conv.__dict__.get("_jit_compiled_convolution_op")
        if orig is None:
            yield
            return

        def inlined(layer, inputs, kernel):
            return layer.convolution_op(inputs, kernel)

        Conv._jit_compiled_convolution_op = inlined
        try:
            yield
        finally:
            Conv._jit_compiled_convolution_op = orig


@SOURCES.register
class TFFunctionSource(SourceAdapter):
    """A ``tf.function`` (anything with ``get_concrete_function``). With an ``input_signature``
    it is used as is (the signature gives the specs when none are given); without one it is
    wrapped in a ``tf.function`` with the specs' signature."""

    kind = "tf_function"
    description = "a tf.function"

    def matches(self, obj: Any) -> bool:
        return hasattr(obj, "get_concrete_function")

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        specs = options.input_specs or _signature_specs(obj, tf)
        if not specs:
            raise _missing_specs(obj)
        if getattr(obj, "input_signature", None):
            fn = obj
        else:
            @tf.function(input_signature=tf_signature(specs, tf))
            def fn(*args):
                return obj(*args)

        return Traceable(fn, specs, default_name(obj), "tf_function", obj)


@SOURCES.register
class PythonFunctionSource(SourceAdapter):
    """Any other Python callable taking one tensor per input spec (``input_specs`` required),
    traced with ``tf.function(fn, input_signature=...)``."""

    kind = "python_function"
    description = "a Python function of TF tensors"

    def matches(self, obj: Any) -> bool:
        return callable(obj) and not isinstance(obj, type)

    def prepare(self, obj: Any, options: ExportOptions, tf: Any) -> Traceable:
        specs = options.input_specs or _signature_specs(obj, tf)
        if not specs:
            raise _missing_specs(obj)
        return Traceable(tf.function(obj, input_signature=tf_signature(specs, tf)), specs, default_name(obj),
                         "python_function", obj)


__all__ = ["SOURCES", "SourceAdapter", "SourceAdapters", "Located", "Traceable", "LoadedSavedModel",
           "KERAS_FILE_EXTENSIONS", "default_name", "importable_ref", "spec_from_tf", "tf_signature",
           "call_structure", "embedding_bounds", "with_model_ranges", "tf_run_error"]
