"""Supported TF preprocessing (Keras preprocessing layers, tf.image, tf.strings) as data.

:data:`CASES` lists every layer / op and mode that mmbridge exports, and every mode it refuses,
each with a builder, an input spec and a sample input. ``tools/gen_preprocessing_table.py`` runs
each one through :func:`mmbridge.export`, measures parity against TF with :func:`measure`, and
writes ``docs/preprocessing.md``; ``tests/export/test_preprocessing.py`` asserts the same behaviour.

How each TF op becomes ONNX is in :mod:`mmbridge.export.handlers`.

Backends: graphs with string inputs or string ops run on the onnxruntime backend only (the
``ai.onnx.contrib`` ops of onnxruntime-extensions, registered automatically by
:func:`mmbridge.runtime.session.make_session`), and end in integer ids (int64) or float
vectors at the torch boundary: torch has no string tensors. :func:`mmbridge.graph.passes.backend_requirements` says
this for a given graph.

Shape notation: B batch, H/W image height/width (pixels), C channels (NHWC, as TF), L tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mmbridge.specs import TensorSpec, Tolerance

if TYPE_CHECKING:
    from mmbridge.export.augment import AugmentationLayer

RESIZE_TOLERANCE = Tolerance(
    1e-3, 0.0, "TF and onnxruntime compute bilinear interpolation weights in another order; measured 2.2e-4 on 0-255")


@dataclasses.dataclass(frozen=True)
class PreprocessingCase:
    """One layer / op in one mode.

    Attributes:
        group: ``"image"``, ``"numeric"``, ``"categorical"`` or ``"text"``.
        name: the layer or op (``"keras.layers.Resizing"``).
        mode: the mode / arguments (``"bilinear 13x17 -> 7x9"``).
        build: ``(tf, keras) -> obj`` returning the Keras layer or ``tf.function`` to export.
        spec: the single input's :class:`~mmbridge.TensorSpec`.
        sample: ``() -> np.ndarray``: the input used for the parity measurement.
        expect: ``"exact"`` (integers/strings identical, floats bit-equal), ``"close"`` (floats
            within ``tolerance``) or ``"refused"`` (export raises ``UnsupportedOpsError`` naming
            ``refused_op``).
        tolerance: for ``"close"``.
        refused_op: the TF op named in the refusal.
        note: one line for the docs table.
    """

    group: str
    name: str
    mode: str
    build: Callable[[Any, Any], Any]
    spec: TensorSpec
    sample: Callable[[], np.ndarray]
    expect: str = "exact"
    tolerance: Tolerance | None = None
    refused_op: str = ""
    note: str = ""


def _img() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, 13, 17, 3)).astype(np.float32)


def _unit(shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    return lambda: np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)


_IMG = TensorSpec("image", ("batch", 13, 17, 3), "float32", "NHWC", (0, 255))
_TEXT = TensorSpec("text", ("batch",), "string")
_CORPUS = ["The cat sat on the mat.", "A dog ran fast!", "the DOG, the cat & the bird", "Pokémon: Pikachu's day"]
_QUERY = ["The dog sat... on a CAT", "unknown words only", "", "pokémon PIKACHUS day!"]


def _adapted_normalization(invert: bool) -> Callable[[Any, Any], Any]:
    def build(tf: Any, keras: Any) -> Any:
        layer = keras.layers.Normalization(invert=invert)
        layer.adapt(np.random.default_rng(2).uniform(0, 1, (64, 5)).astype(np.float32))
        return layer

    return build


def _text_vectorization(**kwargs: Any) -> Callable[[Any, Any], Any]:
    def build(tf: Any, keras: Any) -> Any:
        layer = keras.layers.TextVectorization(max_tokens=30, **kwargs)
        layer.adapt(_CORPUS)
        return layer

    return build


def _resize_fn(method: str, antialias: bool, size: tuple[int, int]) -> Callable[[Any, Any], Any]:
    def build(tf: Any, keras: Any) -> Any:
        return tf.function(lambda im: tf.image.resize(im, size, method=method, antialias=antialias))

    return build


def _strings_fn(make: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def build(tf: Any, keras: Any) -> Any:
        return tf.function(lambda s: make(tf, s))

    return build


def _cases() -> list[PreprocessingCase]:
    c: list[PreprocessingCase] = []
    add = c.append
    # -- image ---------------------------------------------------------------------------------
    add(PreprocessingCase("image", "keras.layers.Rescaling", "scale=1/255, offset=-0.5",
                          lambda tf, k: k.layers.Rescaling(1 / 255.0, offset=-0.5), _IMG, _img, "close",
                          Tolerance(1e-5, 0.0, "elementwise")))
    for invert in (False, True):
        add(PreprocessingCase("numeric", "keras.layers.Normalization", f"adapted, invert={invert}",
                              _adapted_normalization(invert), TensorSpec("x", ("batch", 5), "float32"),
                              _unit((4, 5)), "close", Tolerance(1e-5, 0.0, "[0, 1] inputs")))
    add(PreprocessingCase("image", "keras.layers.CenterCrop", "13x17 -> 7x9", lambda tf, k: k.layers.CenterCrop(7, 9),
                          _IMG, _img))
    for interp in ("bilinear", "nearest"):
        for size in ((7, 9), (20, 29)):
            add(PreprocessingCase(
                "image", "keras.layers.Resizing", f"{interp} 13x17 -> {size[0]}x{size[1]}",
                lambda tf, k, i=interp, s=size: k.layers.Resizing(*s, interpolation=i), _IMG, _img,
                "close" if interp == "bilinear" else "exact", RESIZE_TOLERANCE if interp == "bilinear" else None))
    add(PreprocessingCase("image", "keras.layers.Resizing", "bilinear, crop_to_aspect_ratio=True",
                          lambda tf, k: k.layers.Resizing(7, 9, crop_to_aspect_ratio=True), _IMG, _img, "close",
                          RESIZE_TOLERANCE))
    for method, aa in (("bilinear", False), ("nearest", False), ("nearest", True)):
        add(PreprocessingCase("image", "tf.image.resize", f"{method}, antialias={aa}", _resize_fn(method, aa, (20, 11)),
                              _IMG, _img, "close" if method == "bilinear" else "exact",
                              RESIZE_TOLERANCE if method == "bilinear" else None))
    for method, aa, op in (("bilinear", True, "ScaleAndTranslate"), ("bicubic", False, "ResizeBicubic"),
                           ("bicubic", True, "ScaleAndTranslate"), ("area", False, "ResizeArea"),
                           ("lanczos3", False, "ScaleAndTranslate"), ("lanczos5", False, "ScaleAndTranslate"),
                           ("gaussian", False, "ScaleAndTranslate"), ("mitchellcubic", False, "ScaleAndTranslate")):
        add(PreprocessingCase("image", "tf.image.resize", f"{method}, antialias={aa}", _resize_fn(method, aa, (7, 9)),
                              _IMG, _img, "refused", refused_op=op,
                              note="no ONNX Resize kernel reproduces it; refused at export"))
    for layer, kw in (("RandomFlip", {}), ("RandomRotation", {"factor": 0.2}), ("RandomZoom", {"height_factor": 0.2}),
                      ("RandomContrast", {"factor": 0.3}),
                      ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1}),
                      ("RandomBrightness", {"factor": 0.2, "value_range": (0, 255)})):
        add(PreprocessingCase("image", f"keras.layers.{layer}", "inference (training=False)",
                              lambda tf, k, n=layer, a=kw: getattr(k.layers, n)(**a), _IMG, _img,
                              note="identity at inference"))
    # -- numeric / categorical -----------------------------------------------------------------
    add(PreprocessingCase("numeric", "keras.layers.Discretization", "output_mode=int (NaN, +-inf, edges)",
                          lambda tf, k: k.layers.Discretization(bin_boundaries=[-1.0, 0.0, 0.5, 2.0]),
                          TensorSpec("x", ("batch", 4), "float32"),
                          lambda: np.array([[-5, -1, 0.5, 2.0], [np.nan, np.inf, -np.inf, 0.25]], np.float32),
                          note="Bucketize -> N - sum(x < b)"))
    for mode in ("one_hot", "multi_hot", "count"):
        one = mode == "one_hot"
        add(PreprocessingCase(
            "categorical", "keras.layers.CategoryEncoding", f"output_mode={mode}",
            lambda tf, k, m=mode: k.layers.CategoryEncoding(num_tokens=6, output_mode=m),
            TensorSpec("x", ("batch",) if one else ("batch", 4), "int64"),
            (lambda: np.array([0, 3, 5, 1], np.int64)) if one else (lambda: np.array([[0, 1, 1, 5], [4, 4, 4, 2]], np.int64))))
    for kw in ({}, {"mask_token": 0}, {"invert": True}):
        add(PreprocessingCase(
            "categorical", "keras.layers.IntegerLookup", ", ".join(f"{a}={b}" for a, b in kw.items()) or "vocabulary, OOV",
            lambda tf, k, a=kw: k.layers.IntegerLookup(vocabulary=[12, 7, 1000, 3], **a),
            TensorSpec("x", ("batch", 4), "int64"),
            (lambda: np.array([[0, 1, 2, 3], [4, 9, 1, 0]], np.int64)) if kw.get("invert") else
            (lambda: np.array([[7, 12, 3, 1000], [0, 3, 7, 5]], np.int64)),
            note="Equal+ArgMax+Gather+Where" if not kw.get("invert") else "ai.onnx.ml LabelEncoder"))
    for kw in ({}, {"mask_token": ""}, {"invert": True}):
        add(PreprocessingCase(
            "categorical", "keras.layers.StringLookup", ", ".join(f"{a}={b!r}" for a, b in kw.items()) or "vocabulary, OOV",
            lambda tf, k, a=kw: k.layers.StringLookup(vocabulary=["fire", "water", "grass", "Pokémon"], **a),
            TensorSpec("x", ("batch", 3), "int64" if kw.get("invert") else "string"),
            (lambda: np.array([[0, 1, 2], [3, 4, 9]], np.int64)) if kw.get("invert") else
            (lambda: np.array([["fire", "zzz", "Pokémon"], ["", "grass", "FIRE"]], dtype=object)),
            note="ai.onnx.ml LabelEncoder"))
    for cls in ("StringLookup", "IntegerLookup"):
        for mode in ("one_hot", "multi_hot", "count", "tf_idf"):
            strings, one = cls == "StringLookup", mode == "one_hot"
            x = (np.array([["fire", "zz", "fire"], ["grass", "", "water"]], object) if strings
                 else np.array([[7, 5, 7], [12, 0, 3]], np.int64))
            add(PreprocessingCase(
                "categorical", f"keras.layers.{cls}", f"output_mode={mode}",
                lambda tf, k, c=cls, m=mode, s=strings: getattr(k.layers, c)(
                    vocabulary=["fire", "water", "grass"] if s else [12, 7, 3], output_mode=m,
                    **({"idf_weights": [0.5, 1.0, 2.0]} if m == "tf_idf" else {})),
                TensorSpec("x", ("batch",) if one else ("batch", 3), "string" if strings else "int64"),
                (lambda a=x[:, 0]: a) if one else (lambda a=x: a),
                "close" if mode == "tf_idf" else "exact",
                Tolerance(1e-5, 0.0, "idf weights * counts") if mode == "tf_idf" else None))
    add(PreprocessingCase("categorical", "keras.layers.StringLookup", "num_oov_indices=3 (hashed OOV)",
                          lambda tf, k: k.layers.StringLookup(vocabulary=["a", "b"], num_oov_indices=3),
                          TensorSpec("x", ("batch", 2), "string"), lambda: np.array([["a", "q"]], dtype=object),
                          "refused", refused_op="StringToHashBucketFast",
                          note="FarmHash of string bytes: no ONNX op reads a string's bytes"))
    for dtype, bins in (("int64", 8), ("int64", 2**31 - 1), ("int32", 17)):
        add(PreprocessingCase(
            "categorical", "keras.layers.Hashing", f"{dtype} input, num_bins={bins}",
            lambda tf, k, b=bins: k.layers.Hashing(num_bins=b), TensorSpec("x", ("batch", 4), dtype),
            lambda d=dtype: np.random.default_rng(4).integers(
                np.iinfo(d).min, np.iinfo(d).max, (8, 4), dtype=d),
            note="FarmHash Fingerprint64 of the decimal string, in standard ONNX (BitShift, Mul, Where ...)"))
    for oov in ("floormod", "farmhash"):
        add(PreprocessingCase(
            "categorical", "keras.layers.IntegerLookup", f"num_oov_indices=4, oov_method={oov}",
            lambda tf, k, o=oov: k.layers.IntegerLookup(vocabulary=[1, 2, 3], num_oov_indices=4, oov_method=o),
            TensorSpec("x", ("batch", 4), "int64"), lambda: np.array([[1, 5, 9, 1000], [2, -7, 3, -2**63]], np.int64)))
    for kw, op in (({}, "StringToHashBucketFast"), ({"salt": 7}, "StringToHashBucketStrong")):
        add(PreprocessingCase(
            "categorical", "keras.layers.Hashing", "string input" + (", salt=7" if kw else ""),
            lambda tf, k, a=kw: k.layers.Hashing(num_bins=8, **a), TensorSpec("x", ("batch", 2), "string"),
            lambda: np.array([["a", "b"]], dtype=object), "refused", refused_op=op,
            note="FarmHash / keyed SipHash of string bytes: no ONNX op reads a string's bytes"))
    # -- text ----------------------------------------------------------------------------------
    text = lambda: np.array(["Hello WORLD, Ärger ÉCOLE straße!", "  a\tb\nC  d", "", "Mr. Mime's BIG-day"], dtype=object)  # noqa: E731
    add(PreprocessingCase("text", "tf.strings.lower", "encoding='' (ASCII)", _strings_fn(lambda tf, s: tf.strings.lower(s)),
                          _TEXT, text, note="26 StringRegexReplace nodes; no locale"))
    add(PreprocessingCase("text", "tf.strings.upper", "encoding='' (ASCII)", _strings_fn(lambda tf, s: tf.strings.upper(s)),
                          _TEXT, text))
    add(PreprocessingCase("text", "tf.strings.lower", "encoding='utf-8'",
                          _strings_fn(lambda tf, s: tf.strings.lower(s, encoding="utf-8")), _TEXT, text, "refused",
                          refused_op="StringLower", note="ICU case mapping has no exact equivalent"))
    add(PreprocessingCase("text", "tf.strings.regex_replace", "RE2, global and first-only",
                          _strings_fn(lambda tf, s: tf.strings.regex_replace(
                              tf.strings.regex_replace(s, r"([A-Z])(\w)", r"<\2\1>"), "a", "A", replace_global=False)),
                          _TEXT, text))
    add(PreprocessingCase("text", "tf.strings.split", "whitespace, to_tensor",
                          _strings_fn(lambda tf, s: tf.strings.split(s).to_tensor(default_value="<pad>")), _TEXT, text))
    add(PreprocessingCase("text", "tf.strings.split", "sep=',', to_tensor",
                          _strings_fn(lambda tf, s: tf.strings.split(s, sep=",").to_tensor(default_value="<pad>")), _TEXT,
                          lambda: np.array(["a,b,,c", "  lone  ", "", "x y,"], dtype=object)))
    add(PreprocessingCase("text", "tf.strings.join / reduce_join", "separator, axis=1",
                          _strings_fn(lambda tf, s: tf.strings.reduce_join(
                              tf.strings.join([s, s], separator="-"), axis=1, separator=" ")),
                          TensorSpec("t", ("batch", 3), "string"),
                          lambda: np.array([["a", "bb", "Ω"], ["", "x", "y"]], dtype=object)))
    for kw in ({"output_mode": "int", "output_sequence_length": 6}, {"output_mode": "int"},
               {"output_mode": "multi_hot"}, {"output_mode": "count"}, {"output_mode": "tf_idf"}):
        add(PreprocessingCase("text", "keras.layers.TextVectorization",
                              "lower_and_strip_punctuation, whitespace, " + ", ".join(f"{a}={b}" for a, b in kw.items()),
                              _text_vectorization(**kw), _TEXT, lambda: np.array(_QUERY, dtype=object),
                              "close" if kw["output_mode"] == "tf_idf" else "exact",
                              Tolerance(1e-5, 0.0, "idf weights * counts") if kw["output_mode"] == "tf_idf" else None))
    return c


CASES: tuple[PreprocessingCase, ...] = tuple(_cases())
"""Every measured layer / op and mode (see :class:`PreprocessingCase`)."""


def measure(case: PreprocessingCase, *, cache_dir: Any = None) -> dict[str, Any]:
    """Export one case and measure it against TF.

    Args:
        case: the case.
        cache_dir: artifact cache (default: mmbridge's).

    Returns:
        ``{"status": "exact" | "close" | "refused" | "FAILED", "max_abs": float | None,
        "ops": [ONNX op types], "backend": str, "detail": str}``; ``status`` is what was
        measured (compare with ``case.expect``).
    """
    from mmbridge.errors import MMBridgeError, UnsupportedOpsError
    from mmbridge.export._tf import import_tensorflow
    from mmbridge.export.exporter import export
    from mmbridge.graph.passes import backend_requirements
    from mmbridge.parity import run_ort

    tf = import_tensorflow()
    import keras

    obj = case.build(tf, keras)
    x = case.sample()
    try:
        art = export(obj, input_specs=[case.spec], role="preprocess", tolerance=case.tolerance,
                     sample_inputs={case.spec.name: x}, cache_dir=cache_dir,
                     name=f"doc_{abs(hash((case.name, case.mode))) % 10**10}")
    except UnsupportedOpsError as exc:
        ok = case.refused_op in str(exc)
        return {"status": "refused" if ok else "FAILED", "max_abs": None, "ops": [], "backend": "-",
                "detail": str(exc).split("\n")[-1][:200]}
    except MMBridgeError as exc:
        return {"status": "FAILED", "max_abs": None, "ops": [], "backend": "-", "detail": f"{type(exc).__name__}: {exc}"[:200]}
    got = next(iter(run_ort(art.onnx_path, {case.spec.name: x}).values()))
    ref = np.asarray(obj(x) if hasattr(obj, "get_concrete_function") else obj(x, training=False))
    req = backend_requirements(art.model)
    backend = "ORT + extensions" if req["onnxruntime_extensions"] else "ORT"
    if req["torch_backend"]:  # measured, not assumed: convert with the torch backend and compare
        try:
            from mmbridge.parity import run_torch

            t = next(iter(run_torch(art, {case.spec.name: x}).values()))
            r = np.asarray(obj(x) if hasattr(obj, "get_concrete_function") else obj(x, training=False))
            tol = case.tolerance.atol if case.tolerance is not None else 0.0
            ok = t.shape == r.shape and float(np.nanmax(np.abs(t.astype(np.float64) - r.astype(np.float64)),
                                                       initial=0.0)) <= max(tol, 1e-5 if r.dtype.kind == "f" else 0)
            backend = "ORT, torch" if ok else "ORT (torch differs)"
        except Exception as exc:  # noqa: BLE001 - reported in the table, not raised
            backend = f"ORT (torch: {type(exc).__name__})"
    ops = sorted({n.op_type for n in art.model.graph.node})
    if ref.dtype.kind in "OSU" or got.dtype.kind in "OSU":
        def as_text(a: np.ndarray) -> np.ndarray:
            return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[object])(a)

        same = got.shape == ref.shape and bool((as_text(got) == as_text(ref)).all())
        return {"status": "exact" if same else "FAILED", "max_abs": 0.0 if same else None, "ops": ops, "backend": backend,
                "detail": ""}
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return {"status": "FAILED", "max_abs": None, "ops": ops, "backend": backend,
                "detail": f"shape/dtype {got.shape} {got.dtype} vs TF {ref.shape} {ref.dtype}"}
    diff = float(np.nanmax(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    same_nan = bool(np.array_equal(np.isnan(got.astype(np.float64)), np.isnan(ref.astype(np.float64))))
    if diff == 0.0 and same_nan:
        status = "exact"
    elif case.tolerance is not None and diff <= case.tolerance.atol and same_nan:
        status = "close"
    else:
        status = "FAILED"
    return {"status": status, "max_abs": diff, "ops": ops, "backend": backend, "detail": ""}


def measure_training(entry: AugmentationLayer, *, cache_dir: Any = None) -> dict[str, Any]:
    """Export the layer of an :data:`mmbridge.export.augment.LAYERS` entry (``entry.kwargs``,
    ``seed=1``) with ``training=True`` on an 8x8x3 float32 0-255 image (batch 2, numpy seed 0) and
    report what happened, for the docs table (``tools/gen_preprocessing_table.py``).

    Returns:
        ``{"status": "exported" | "refused" | "FAILED", "ort_min_p", "torch": str, "ops": [random op
        types], "detail": str}``; ``status`` is measured (compare with ``entry.status``): ``"refused"``
        only when the error names ``entry.refused_op``.
    """
    import keras

    from mmbridge.errors import MMBridgeError
    from mmbridge.export.augment import RANDOM_OPS
    from mmbridge.export.exporter import export

    cls = getattr(keras.layers, entry.name)
    kw = dict(entry.kwargs)
    import inspect

    if "seed" in inspect.signature(cls.__init__).parameters:  # deterministic layers take no seed
        kw["seed"] = 1
    layer = cls(**kw)
    spec = TensorSpec("image", ("batch", 8, 8, 3), "float32", "NHWC", (0, 255))
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    out: dict[str, Any] = {"status": "FAILED", "ort_min_p": None, "torch": "-", "ops": [], "detail": ""}
    try:
        art = export(layer, input_specs=[spec], training=True, sample_inputs={"image": x}, cache_dir=cache_dir,
                     role="preprocess", name=f"aug_{entry.name}")
    except MMBridgeError as exc:
        ok = bool(entry.refused_op) and entry.refused_op in str(exc)
        out.update(status="refused" if ok else "FAILED", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
        return out
    d = art.meta["distribution"]
    out.update(status="exported", ort_min_p=d["ort"]["min_p"],
               ops=sorted({n.op_type for n in art.model.graph.node if n.op_type in RANDOM_OPS}))
    if d.get("torch") is not None:
        out["torch"] = f"checked (min p {d['torch']['min_p']:.2g})"
    else:
        out["torch"] = "ORT only: " + str(d.get("torch_skipped", ""))[:120]
    return out


__all__ = ["CASES", "PreprocessingCase", "RESIZE_TOLERANCE", "measure", "measure_training"]
