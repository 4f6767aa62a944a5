"""Training-mode preprocessing: Keras augmentation layers exported with ``training=True``.

Keras image augmentation layers (``RandomFlip``, ``RandomBrightness``, ... ``Equalization``,
``Solarization``) do nothing, or their inference behaviour, when called with ``training=False``,
which is how :func:`mmbridge.export` traces by default: the bridge then does not do what
``ds.map(layer)`` does in a training pipeline. This module holds:

* :data:`LAYERS`: every augmentation layer Keras 3.15 ships (``keras.layers`` classes derived from
  ``BaseImagePreprocessingLayer``), what it does at inference, whether a ``training=True`` export
  is **exported** (random ops converted, distribution checked) or **refused** (with the TF op that
  has no ONNX form), and the torch-side augmentation of the same kind to use instead
  (``torchvision.transforms.v2``; same kind, not the same sampling or formula). The table in
  ``docs/preprocessing.md`` is measured from it by ``tools/gen_preprocessing_table.py``.
* :func:`random_handlers`: tf2onnx handlers, used only by ``training=True`` exports, that turn TF's
  counter-based ``StatelessRandom*V2`` ops into ONNX ``RandomUniformLike`` / ``RandomNormalLike``.
  Keras draws its seed from a ``SeedGenerator`` variable that advances on every call; freezing
  the graph would turn that variable into a constant and the "random" output into the same one on
  every call, so the seed inputs are dropped and ONNX draws afresh on every run instead. The
  values are therefore not TF's values, only the same distribution (same range, same shape, same
  per-sample / per-batch structure of the draws), which :func:`distribution_check` proves.
* :func:`distribution_check`: TF vs onnxruntime (and the torch module when the graph converts)
  on :data:`DRAWS` independent calls at batch 1 on one fixed input, compared per output position
  and per draw (mean, std over positions) with the two-sample Kolmogorov-Smirnov test (Kolmogorov
  1933 / Smirnov 1948; asymptotic p-values from ``scipy.stats.kstwobign``) widened by a rounding
  band (:func:`ks_with_tolerance`), Bonferroni-corrected so that a correct export is refused with
  probability at most :data:`ALPHA`.
* :func:`inactive_layers` / :func:`inference_record`: what a default ``training=False`` export of a
  model with such layers records (``meta["augmentation"]``) and warns about.

Seeding at run time (both backends draw afresh on every call): onnxruntime seeds its random
kernels once per process (``onnxruntime.set_seed(n)`` before the session is created makes it
reproducible; every new session in a process restarts the same stream); ``to_torch()`` draws from
torch's default generator (:mod:`mmbridge.convert.ops.random_ops`), so ``torch.manual_seed`` and
per-rank DDP seeding apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from mmbridge.errors import ParityError, SpecError, UnsupportedOpsError

logger = logging.getLogger("mmbridge.export")

DRAWS = 256
"""Independent draws per backend in :func:`distribution_check` (calls at batch 1)."""
ALPHA = 1e-3
"""Family-wise false-refusal probability of :func:`distribution_check` (Bonferroni over all tests)."""
MAX_POSITIONS = 256
"""Output positions tested per output; larger outputs are sub-sampled (fixed ``numpy`` seed 0)."""

TV = "torchvision.transforms.v2"


@dataclasses.dataclass(frozen=True)
class AugmentationLayer:
    """One Keras augmentation layer and what a ``training=True`` export does with it.

    Attributes:
        name: the ``keras.layers`` class name.
        inference: what the layer does with ``training=False`` (what a default export holds).
        status: ``"exported"`` (random ops converted, distribution-checked) or ``"refused"``.
        refused_op: for ``"refused"``: the TF op (in the layer's training graph) with no ONNX form.
        torch: the torch-side augmentation of the same kind to use instead (or alongside).
        kwargs: the constructor arguments measured for the docs table (and tests).
        inactive: True when ``training=False`` skips the augmentation (False: the layer computes
            the same thing in both modes; a default export is then already what training runs).
    """

    name: str
    inference: str
    status: str
    torch: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    refused_op: str = ""
    inactive: bool = True


_R = (0, 255)
_PROJ = "ImageProjectiveTransformV3"
_WHY = {
    _PROJ: "ImageProjectiveTransformV3 (TF's projective warp with fill_mode / interpolation) has no ONNX form "
           "here (ONNX GridSample's padding modes are not TF's reflect / wrap / constant fill)",
    "HSVToRGB": "RGBToHSV / HSVToRGB have no ONNX op (tf2onnx leaves them unconverted)",
    "StatelessRandomGammaV3": "StatelessRandomGammaV3 (the Beta draw of the mixing ratio) has no ONNX op",
    "BitwiseOr": "tf2onnx emits ONNX BitwiseOr, which needs opset 18: onnx.checker rejects the graph at the default "
                 "opset 17 (an ExportError naming the node; opset 18 is not measured here)",
}

LAYERS: tuple[AugmentationLayer, ...] = (
    AugmentationLayer("RandomFlip", "identity", "exported", f"{TV}.RandomHorizontalFlip / RandomVerticalFlip"),
    AugmentationLayer("RandomCrop", "center crop (resized to the target)", "exported", f"{TV}.RandomCrop",
                      {"height": 6, "width": 6}),
    AugmentationLayer("RandomContrast", "identity", "exported", f"{TV}.ColorJitter(contrast=...)", {"factor": 0.3}),
    AugmentationLayer("RandomBrightness", "identity", "exported",
                      f"{TV}.ColorJitter(brightness=...) (multiplicative; Keras adds an offset)",
                      {"factor": 0.2, "value_range": _R}),
    AugmentationLayer("RandomGrayscale", "identity", "exported", f"{TV}.RandomGrayscale", {"factor": 0.5}),
    AugmentationLayer("RandomSharpness", "identity", "exported", f"{TV}.RandomAdjustSharpness",
                      {"factor": 0.5, "value_range": _R}),
    AugmentationLayer("RandomPosterization", "identity", "exported", f"{TV}.RandomPosterize",
                      {"factor": (1, 8), "value_range": _R}),
    AugmentationLayer("RandomColorDegeneration", "identity", "exported", f"{TV}.ColorJitter(saturation=...)",
                      {"factor": 0.3}),
    AugmentationLayer("RandomColorJitter", "identity", "exported",
                      f"{TV}.ColorJitter (with hue / saturation factors it is refused like RandomHue)",
                      {"value_range": _R, "brightness_factor": 0.2, "contrast_factor": 0.3}),
    AugmentationLayer("RandomInvert", "identity", "exported", f"{TV}.RandomInvert", {"value_range": _R}),
    AugmentationLayer("RandomErasing", "identity", "exported", f"{TV}.RandomErasing", {"value_range": _R}),
    AugmentationLayer("RandomGaussianBlur", "identity", "exported", f"{TV}.GaussianBlur", {"value_range": _R}),
    AugmentationLayer("RandomElasticTransform", "identity", "refused", f"{TV}.ElasticTransform",
                      {"value_range": _R}, "BitwiseOr"),
    AugmentationLayer("Solarization", "identity", "exported", f"{TV}.RandomSolarize",
                      {"addition_factor": 0.2, "threshold_factor": 0.2, "value_range": _R}),
    AugmentationLayer("Equalization", "identity", "exported", f"{TV}.RandomEqualize", {"value_range": _R}),
    AugmentationLayer("RandomRotation", "identity", "refused", f"{TV}.RandomRotation", {"factor": 0.2}, _PROJ),
    AugmentationLayer("RandomZoom", "identity", "refused", f"{TV}.RandomAffine(scale=...)", {"height_factor": 0.2},
                      _PROJ),
    AugmentationLayer("RandomTranslation", "identity", "refused", f"{TV}.RandomAffine(translate=...)",
                      {"height_factor": 0.1, "width_factor": 0.1}, _PROJ),
    AugmentationLayer("RandomShear", "identity", "refused", f"{TV}.RandomAffine(shear=...)",
                      {"x_factor": 0.2}, _PROJ),
    AugmentationLayer("RandomPerspective", "identity", "refused", f"{TV}.RandomPerspective", {}, _PROJ),
    AugmentationLayer("RandAugment", "identity", "refused", f"{TV}.RandAugment", {"value_range": _R}, _PROJ),
    AugmentationLayer("AugMix", "identity", "refused", f"{TV}.AugMix", {"value_range": _R}, _PROJ),
    AugmentationLayer("RandomHue", "identity", "refused", f"{TV}.ColorJitter(hue=...)",
                      {"factor": 0.2, "value_range": _R}, "HSVToRGB"),
    AugmentationLayer("RandomSaturation", "identity", "refused", f"{TV}.ColorJitter(saturation=...)",
                      {"factor": 0.2, "value_range": _R}, "HSVToRGB"),
    AugmentationLayer("MixUp", "identity", "refused", f"{TV}.MixUp (on the batch and its labels)", {},
                      "StatelessRandomGammaV3"),
    AugmentationLayer("CutMix", "identity", "refused", f"{TV}.CutMix (on the batch and its labels)", {},
                      "StatelessRandomGammaV3"),
    # deterministic: the same in both modes, so a default export already is what training runs
    AugmentationLayer("AutoContrast", "the same (active in both modes)", "exported", f"{TV}.RandomAutocontrast",
                      {"value_range": _R}, inactive=False),
    AugmentationLayer("ContrastLimitedAdaptiveHistogramEqualization", "the same (active in both modes)", "exported",
                      "no torchvision equivalent (kornia.enhance.equalize_clahe)", {"value_range": _R},
                      inactive=False),
    AugmentationLayer("CenterCrop", "the same (active in both modes)", "exported", f"{TV}.CenterCrop",
                      {"height": 6, "width": 6}, inactive=False),
    AugmentationLayer("Resizing", "the same (active in both modes)", "exported", f"{TV}.Resize",
                      {"height": 6, "width": 6}, inactive=False),
    AugmentationLayer("MaxNumBoundingBoxes", "the same (bounding boxes only)", "exported",
                      f"{TV}.SanitizeBoundingBoxes", {"max_number": 4}, inactive=False),
)
"""Every Keras 3.15 image augmentation layer (``tests/export/test_augment.py`` checks the list against
``keras.layers``), in docs order."""

BY_NAME: dict[str, AugmentationLayer] = {a.name: a for a in LAYERS}


def why_refused(entry: AugmentationLayer) -> str:
    """The reason a ``training=True`` export of ``entry`` is refused (``""`` when it is exported)."""
    return _WHY.get(entry.refused_op, "") if entry.status == "refused" else ""


# ---------------------------------------------------------------------------------------------
# finding the layers in a model
# ---------------------------------------------------------------------------------------------
def augmentation_layers(obj: Any) -> list[tuple[Any, AugmentationLayer]]:
    """``(layer, table entry)`` for ``obj`` itself and every layer inside it whose class is in
    :data:`LAYERS` (by class name: Keras 3 and tf-keras alike), in the model's order."""
    from mmbridge.export.sources import _sublayers

    found = []
    for layer in [obj, *_sublayers(obj)]:
        entry = BY_NAME.get(type(layer).__name__)
        if entry is not None and all(layer is not x for x, _ in found):
            found.append((layer, entry))
    return found


def inactive_layers(obj: Any) -> list[dict[str, str]]:
    """The augmentation layers of ``obj`` that ``training=False`` skips: ``[{"name", "class",
    "inference"}]`` (the layer's ``.name``, its class, what it does at inference)."""
    return [{"name": str(getattr(layer, "name", "?")), "class": e.name, "inference": e.inference}
            for layer, e in augmentation_layers(obj) if e.inactive]


def inference_record(obj: Any, name: str) -> dict[str, Any] | None:
    """``meta["augmentation"]`` of a default (``training=False``) export, or ``None`` when ``obj``
    holds no layer that ``training=False`` skips. Also warns (``UserWarning``) and logs once,
    naming the layers and how to export the training behaviour. Numerics are not changed."""
    layers = inactive_layers(obj)
    if not layers:
        return None
    names = ", ".join(f"{d['name']} ({d['class']})" for d in layers)
    note = (f"exported with training=False: the augmentation layer(s) {names} are inactive in this bridge "
            f"(identity / inference behaviour), unlike ds.map(layer) in a training pipeline. For the training "
            f"behaviour export with training=True (random ops, distribution-checked) or augment in torch "
            f"({TV}); see docs/user-guide.md, 'Training-mode preprocessing'")
    logger.warning("export %s: %s", name, note)
    warnings.warn(f"export {name!r}: {note}", UserWarning, stacklevel=3)
    return {"training": False, "inactive_layers": layers, "note": note}


# ---------------------------------------------------------------------------------------------
# refusal
# ---------------------------------------------------------------------------------------------
def _strip_index(part: str) -> str:
    head, _, tail = part.rpartition("_")
    return head if head and tail.isdigit() else part


def explain_refusal(exc: UnsupportedOpsError, obj: Any, name: str) -> UnsupportedOpsError:
    """The error a ``training=True`` export raises when ops are left unconverted: the augmentation
    layers whose graph holds them (by node name scope), the reason from :data:`LAYERS` and the torch
    augmentation to use instead; ``exc``'s own text follows."""
    ops = list(getattr(exc, "ops", []) or [])
    layers = augmentation_layers(obj)
    hit = []
    for layer, entry in layers:
        lname = str(getattr(layer, "name", ""))
        for op in ops:
            node = str(op.get("node", "") if isinstance(op, Mapping) else "")
            parts = {_strip_index(p) for p in node.split("/")} | set(node.split("/"))
            if lname and lname in parts and (layer, entry) not in hit:
                hit.append((layer, entry))
    if not hit:
        hit = [(layer, e) for layer, e in layers if e.status == "refused"]
    lines = []
    for layer, e in hit:
        why = why_refused(e) or "its training graph holds the TF op(s) listed below, which have no ONNX form here"
        lines.append(f"  - layer {getattr(layer, 'name', '?')!r} ({e.name}): {why}. Instead: keep this augmentation "
                     f"in torch ({e.torch}) and export the rest with training=True, or export with training=False "
                     f"(the layer is then {e.inference})")
    head = (f"cannot export {name!r} with training=True: " +
            (f"{len(hit)} augmentation layer(s) have no ONNX form in training mode (nothing was written):\n"
             if hit else "its training graph has ops with no ONNX form (nothing was written):\n"))
    return UnsupportedOpsError(head + "\n".join(lines) + ("\n" if lines else "") + str(exc), ops)


def check_training_source(kind: str, name: str) -> None:
    """Refuse ``training=True`` for sources it cannot apply to (``trainable=True`` with it is refused
    by :class:`~mmbridge.export.options.ExportOptions`).

    Raises:
        SpecError: ``kind`` is not a Keras model or layer (a ``tf.function`` / SavedModel has no
            ``training`` argument to pass).
    """
    if kind not in ("keras_model", "keras_layer"):
        raise SpecError(f"export {name!r}: training=True applies to Keras models and layers (it passes "
                        f"training=True to their call); this source is a {kind}. Call the layers with "
                        f"training=True inside your tf.function instead, or export the Keras object")


def training_record(obj: Any) -> dict[str, Any]:
    """``meta["augmentation"]`` of a ``training=True`` export: the augmentation layers found, that
    the output is random, and the seeding semantics of both backends."""
    return {
        "training": True,
        "layers": [{"name": str(getattr(layer, "name", "?")), "class": e.name} for layer, e in augmentation_layers(obj)],
        "note": "training=True: the outputs are random (fresh draws on every call, in train() and eval() alike); "
                "parity is the distribution check in meta['distribution'], not elementwise",
        "seeding": {"onnxruntime": "RandomUniformLike / RandomNormalLike without a seed: seeded once per process; "
                                   "onnxruntime.set_seed(n) before creating the session makes it reproducible; "
                                   "every new session in a process restarts the same stream",
                    "torch": "torch's default generator on the input's device: torch.manual_seed(n); seed DDP ranks "
                             "differently (seed + rank) for different augmentations per rank"},
    }


# ---------------------------------------------------------------------------------------------
# tracing and converting (training=True exports only)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_patches() -> Iterator[None]:
    """Patches active while a ``training=True`` export is traced; undone on exit.

    Keras 3's TensorFlow backend draws ``keras.random.uniform`` / ``normal`` / ``randint`` with
    ``tf.random.stateless_*`` seeded from a ``SeedGenerator`` variable. Freezing turns that variable
    into a constant, and TF's constant folding (grappler, in tf2onnx's loader) then replaces every
    draw whose shape is static (``RandomCrop``'s offsets, one per batch) by one fixed number: the
    bridge would crop the same window forever. While tracing, these three functions use TF's
    stateful ``tf.random.uniform`` / ``tf.random.normal`` instead (same distributions; ops
    ``RandomUniform``, ``RandomUniformInt``, ``RandomStandardNormal``, which are never folded and
    which tf2onnx converts to ONNX ``RandomUniform(Like)`` / ``RandomNormal(Like)``; their seed
    attributes are removed by :func:`strip_seeds`). Each draw gets its own op seed while tracing: two
    draws of the same shape with equal seeds are otherwise merged into one by tf2onnx's duplicate-node
    optimiser (``RandomInvert`` then compared one draw with itself and never inverted). Other Keras draws (``categorical``, ``gamma``,
    ``beta``, ``binomial``, ``truncated_normal``, ``shuffle``) are not patched: their stateless
    ops have no ONNX form and are refused.

    TF's reference draws in :func:`distribution_check` come from the unpatched layer, called eagerly.
    """
    try:
        from keras.src.backend.tensorflow import random as krandom
    except ImportError:  # another Keras layout: nothing to patch (the stateless handlers still apply)
        yield
        return
    import tensorflow as tf
    from keras.src.backend.config import floatx

    ids = itertools.count(1)  # a distinct op seed per draw, or tf2onnx merges identical draws into one

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        dtype = dtype or floatx()
        return tf.random.uniform(shape, minval=tf.cast(minval, dtype), maxval=tf.cast(maxval, dtype), dtype=dtype,
                                 seed=next(ids))

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return tf.random.normal(shape, mean=mean, stddev=stddev, dtype=dtype or floatx(), seed=next(ids))

    def randint(shape, minval, maxval, dtype="int32", seed=None):
        inter = dtype if dtype in ("int32", "int64") else "int64"
        return tf.cast(tf.random.uniform(shape, minval=minval, maxval=maxval, dtype=inter, seed=next(ids)), dtype)

    saved = {k: getattr(krandom, k) for k in ("uniform", "normal", "randint")}
    krandom.uniform, krandom.normal, krandom.randint = uniform, normal, randint
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(krandom, k, v)


RANDOM_OPS = ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike")


def strip_seeds(model: Any) -> int:
    """Remove the ``seed`` attribute of every ONNX random node (tf2onnx writes ``seed=0`` from TF's
    ``seed2``): onnxruntime then seeds per process and ``to_torch()`` draws from torch's generator.
    Returns the number of nodes changed."""
    n = 0
    for node in model.graph.node:
        if node.op_type in RANDOM_OPS and any(a.name == "seed" for a in node.attribute):
            keep = [a for a in node.attribute if a.name != "seed"]
            del node.attribute[:]
            node.attribute.extend(keep)
            n += 1
    return n


def random_handlers() -> dict[str, Any]:
    """tf2onnx ``custom_op_handlers`` entries for TF's stateless random ops (``training=True`` only).

    ==============================  =================================================================
    TF op                           ONNX
    ==============================  =================================================================
    ``StatelessRandomUniformV2``    ``RandomUniformLike(ConstantOfShape(shape))``, ``[0, 1)``, dtype kept
    ``StatelessRandomNormalV2``     ``RandomNormalLike(ConstantOfShape(shape))``, mean 0, scale 1
    ``StatelessRandomUniformIntV2`` ``Cast(Min(Floor(lo + (hi - lo) * U[0, 1) in float64), hi - 1))``:
                                    integers uniform in ``[minval, maxval)``
    ``StatelessRandomUniform`` /    the same for the V1 ops (``(shape, seed)`` inputs)
    ``StatelessRandomNormal`` /
    ``StatelessRandomUniformInt``
    ==============================  =================================================================

    The key / counter / seed inputs are dropped (see the module docstring): the draw is fresh on
    every run, as Keras's advancing ``SeedGenerator`` makes it in TF.
    """
    from mmbridge.export.handlers import _guarded

    table = {
        "StatelessRandomUniformV2": (_uniform, "uniform"),
        "StatelessRandomUniform": (_uniform, "uniform"),
        "StatelessRandomNormalV2": (_uniform, "normal"),
        "StatelessRandomNormal": (_uniform, "normal"),
        "StatelessRandomUniformIntV2": (_uniform_int, 4),
        "StatelessRandomUniformInt": (_uniform_int, 2),
    }
    return {op: (_guarded(fn), [None, arg]) for op, (fn, arg) in table.items()}


def _zeros_like_shape(e: Any, shape: str) -> str:
    from onnx import TensorProto, numpy_helper

    s64 = e.out("Cast", [shape], attr={"to": TensorProto.INT64})
    return e.out("ConstantOfShape", [s64], attr={"value": numpy_helper.from_array(np.zeros(1, np.float32))})


def _uniform(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    from mmbridge.export.handlers import _Emit, _take_over

    kind = args[0]
    e = _Emit(ctx, name)
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    zeros = _zeros_like_shape(e, ins[0])
    op, attr = (("RandomUniformLike", {"low": 0.0, "high": 1.0}) if kind == "uniform"
                else ("RandomNormalLike", {"mean": 0.0, "scale": 1.0}))
    e.node(op, [zeros], attr={"dtype": dtypes[0], **attr}, outputs=outs, dtype=dtypes[0], shape=shapes[0])


def _uniform_int(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    from onnx import TensorProto

    from mmbridge.export.handlers import _Emit, _take_over

    at = args[0]  # index of minval (V2: shape, key, counter, alg, minval, maxval; V1: shape, seed, minval, maxval)
    e = _Emit(ctx, name)
    ins, outs, dtypes, shapes = _take_over(ctx, node, like=None)
    zeros = _zeros_like_shape(e, ins[0])
    d = TensorProto.DOUBLE
    u = e.out("RandomUniformLike", [zeros], attr={"dtype": d, "low": 0.0, "high": 1.0})
    lo = e.out("Cast", [ins[at]], attr={"to": d})
    hi = e.out("Cast", [ins[at + 1]], attr={"to": d})
    v = e.out("Floor", [e.out("Add", [lo, e.out("Mul", [u, e.out("Sub", [hi, lo])])])])
    v = e.out("Min", [v, e.out("Sub", [hi, e.const(np.array(1.0, np.float64), "one")])])
    e.node("Cast", [v], attr={"to": dtypes[0]}, outputs=outs, dtype=dtypes[0], shape=shapes[0])


# ---------------------------------------------------------------------------------------------
# the distribution check
# ---------------------------------------------------------------------------------------------
def seeded_copy(model: Any, seed: int = 0) -> Any:
    """A copy of ``model`` whose ONNX random nodes carry ``seed`` attributes (drawn with numpy from
    ``seed``), so that :func:`distribution_check`'s onnxruntime draws are reproducible without touching
    onnxruntime's process-wide seed. The artifact keeps the unseeded graph."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    # spread seeds: onnxruntime's engine (minstd) gives correlated streams for adjacent seeds
    seeds = iter(np.random.default_rng(seed).integers(1, 2**24, 10_000).tolist())
    for node in m.graph.node:
        if node.op_type in RANDOM_OPS:
            keep = [a for a in node.attribute if a.name != "seed"]
            del node.attribute[:]
            node.attribute.extend(keep + [onnx.helper.make_attribute("seed", float(next(seeds)))])
    return m


def draw(run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], inputs: Mapping[str, np.ndarray],
         n: int | None = None) -> dict[str, np.ndarray]:
    """``{output: array [n, *output shape at batch 1]}``: ``run`` called ``n`` (default :data:`DRAWS`)
    times on ``inputs`` (each a batch of 1), outputs as float64."""
    n = DRAWS if n is None else n
    out: dict[str, list[np.ndarray]] = {}
    for _ in range(n):
        for k, v in run(inputs).items():
            out.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    return {k: np.stack(v) for k, v in out.items()}


RELATIVE_ATOL = 1e-4
"""Rounding allowance of :func:`compare_draws`: ``RELATIVE_ATOL * max(1, max |TF output|)``."""


def ks_with_tolerance(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic with a rounding band, and its p-value.

    ``D = max(sup_x F_a(x) - F_b(x + atol), sup_x F_b(x) - F_a(x + atol), 0)`` (``F`` the empirical
    CDFs): the classic KS statistic (Smirnov 1948) when ``atol = 0``, and 0 when one sample is the
    other moved by at most ``atol``, so float rounding between TF and ONNX (one ulp on a value that
    takes two levels, as a flip or a grayscale mix gives) cannot fail the test, while a changed
    probability or range can. ``D`` is at most the KS statistic, so the p-value from Kolmogorov's
    limit distribution (``scipy.stats.kstwobign``, as ``scipy.stats.ks_2samp(method="asymp")``) is
    conservative.
    """
    from scipy.stats import kstwobign

    a, b = np.sort(a), np.sort(b)
    n, m = len(a), len(b)
    d1 = np.max(np.searchsorted(a, a, "right") / n - np.searchsorted(b, a + atol, "right") / m)
    d2 = np.max(np.searchsorted(b, b, "right") / m - np.searchsorted(a, b + atol, "right") / n)
    d = float(max(d1, d2, 0.0))
    return d, float(kstwobign.sf(d * math.sqrt(n * m / (n + m))))


def compare_draws(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], *, backend: str,
                  alpha: float = ALPHA, max_positions: int = MAX_POSITIONS, atol: float = 0.0) -> dict[str, Any]:
    """Compare two sets of draws (from :func:`draw`) output by output.

    Tests, each a two-sample Kolmogorov-Smirnov test with a rounding band (:func:`ks_with_tolerance`,
    band ``atol + RELATIVE_ATOL * max(1, max |ref|)`` per output): the values at each output position
    (up to ``max_positions`` positions, sub-sampled with numpy seed 0), and the per-draw mean and
    standard deviation over all positions (what a global factor such as a brightness offset or a
    flip changes). Positions where both sides are one and the same constant are not tested. The
    comparison fails when any p-value is below ``alpha / m`` (``m`` tests: Bonferroni), or when
    shapes differ.

    Returns:
        ``{"backend", "passed", "draws", "tests", "alpha", "threshold", "min_p", "worst": {"output",
        "statistic", "D", "p"}, "outputs": {name: {"shape", "positions_tested", "max_abs_mean_diff",
        "max_abs_std_diff", "ref_mean_range", "ref_std_range"}}, "problem"}`` (JSON-ready).
    """
    rows: list[tuple[str, str, float, float]] = []
    per_output: dict[str, Any] = {}
    problem = ""
    for k, r in ref.items():
        g = got.get(k)
        if g is None or g.shape[1:] != r.shape[1:]:
            problem = (f"output {k!r}: shape {None if g is None else list(g.shape[1:])} vs TF {list(r.shape[1:])}")
            continue
        rf, gf = r.reshape(len(r), -1), g.reshape(len(g), -1)
        pos = np.arange(rf.shape[1])
        if len(pos) > max_positions:
            pos = np.sort(np.random.default_rng(0).choice(len(pos), max_positions, replace=False))
        band = float(atol + RELATIVE_ATOL * max(1.0, float(np.max(np.abs(rf))) if rf.size else 1.0))
        stats = {f"position {int(p)}": (gf[:, p], rf[:, p]) for p in pos}
        stats["per-draw mean"] = (gf.mean(1), rf.mean(1))
        stats["per-draw std"] = (gf.std(1), rf.std(1))
        for label, (a, b) in stats.items():
            if np.all(a == a[0]) and np.all(b == b[0]) and a[0] == b[0]:
                continue
            rows.append((k, label, *ks_with_tolerance(a, b, band)))
        per_output[k] = {
            "shape": list(r.shape[1:]), "positions_tested": int(len(pos)), "band": band,
            "max_abs_mean_diff": float(np.max(np.abs(gf.mean(0) - rf.mean(0)))) if rf.size else 0.0,
            "max_abs_std_diff": float(np.max(np.abs(gf.std(0) - rf.std(0)))) if rf.size else 0.0,
            "ref_mean_range": [float(rf.mean(0).min()), float(rf.mean(0).max())] if rf.size else None,
            "ref_std_range": [float(rf.std(0).min()), float(rf.std(0).max())] if rf.size else None,
        }
    m = max(len(rows), 1)
    threshold = alpha / m
    worst = min(rows, key=lambda t: t[3]) if rows else None
    passed = not problem and (worst is None or worst[3] >= threshold)
    return {
        "backend": backend, "passed": bool(passed), "draws": int(len(next(iter(ref.values())))) if ref else 0,
        "tests": len(rows), "alpha": alpha, "threshold": threshold,
        "min_p": worst[3] if worst else 1.0,
        "worst": {"output": worst[0], "statistic": worst[1], "D": worst[2], "p": worst[3]} if worst else None,
        "outputs": per_output, "problem": problem,
    }


def distribution_check(tf_call: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], model: Any,
                       inputs: Mapping[str, np.ndarray], *, name: str, torch_module: Any = None,
                       n: int | None = None, seed: int = 0, ref: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """TF vs onnxruntime (and ``torch_module``) draws on one fixed input; the record for
    ``meta["distribution"]``.

    Args:
        tf_call: ``{input: array} -> {output: array}``: the Keras object traced with ``training=True``.
        model: the exported ``onnx.ModelProto`` (run as :func:`seeded_copy` in onnxruntime).
        inputs: one sample per input, batch 1, in the ONNX graph's layout (the same arrays go to TF
            but for ``inputs_as_nchw``, which the caller's ``tf_call`` handles).
        name: the artifact name, for messages.
        torch_module: the converted module, or ``None`` to skip torch; drawn under
            ``torch.random.fork_rng`` with ``torch.manual_seed(seed)`` (the caller's RNG state is kept).
        n: draws per backend; seed: onnxruntime's node seeds and torch's seed.
        ref: TF's draws when already taken (``tf_call`` is then not called).

    Returns:
        ``{"method", "draws", "alpha", "ort": compare_draws(...), "torch": compare_draws(...) | None,
        "passed"}``.
    """
    from mmbridge.runtime.session import make_session

    ref = dict(ref) if ref is not None else draw(tf_call, inputs, n)
    n = len(next(iter(ref.values())))
    sess = make_session(seeded_copy(model, seed))
    names = [o.name for o in sess.get_outputs()]
    ort = compare_draws(draw(lambda x: dict(zip(names, sess.run(None, dict(x)))), inputs, n), ref, backend="ort")
    tor = None
    if torch_module is not None:
        import torch

        graph_inputs = [i.name for i in model.graph.input if i.name in inputs]  # the module's positional order

        def run_torch(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            from mmbridge.parity import module_outputs

            with torch.no_grad():
                outs = torch_module(*[torch.from_numpy(np.ascontiguousarray(x[k])) for k in graph_inputs])
            return module_outputs(outs, names)  # strict: no truncation

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tor = compare_draws(draw(run_torch, inputs, n), ref, backend="torch")
    return {
        "method": (f"two-sample Kolmogorov-Smirnov tests with a rounding band of {RELATIVE_ATOL} x max(1, max|TF|) "
                   f"(p from scipy.stats.kstwobign) of {n} draws per backend at batch 1 on one fixed input: each "
                   f"output position (up to {MAX_POSITIONS}) and the per-draw mean and std; Bonferroni at "
                   f"family-wise alpha={ALPHA}"),
        "draws": n, "alpha": ALPHA, "ort": ort, "torch": tor,
        "passed": bool(ort["passed"] and (tor is None or tor["passed"])),
    }


def verify_training(artifact: Any, source: Any, *, raise_on_failure: bool = True) -> dict[str, Any]:
    """Re-run the distribution check of a ``training=True`` artifact against its Keras source.

    Args:
        artifact: a :class:`~mmbridge.BridgeArtifact` exported with ``training=True``.
        source: the Keras layer or model it was exported from (called eagerly with ``training=True``
            on the first stored sample, ``golden.npz``'s inputs; NHWC as in TF).
        raise_on_failure: raise :class:`ParityError` when the distributions differ.

    Returns:
        The record :func:`distribution_check` returns (ORT, and torch when the graph converts).

    Raises:
        SpecError: the artifact was not exported with ``training=True``, or its inputs are NCHW.
        ParityError: a distribution differs and ``raise_on_failure``.
    """
    from mmbridge.convert.core import to_torch
    from mmbridge.errors import ConversionError
    from mmbridge.export._tf import import_tensorflow
    from mmbridge.export.sources import _caller, call_structure
    from mmbridge.parity import load_golden

    if not (artifact.meta or {}).get("training"):
        raise SpecError(f"verify_training(): bridge {artifact.name!r} was not exported with training=True; "
                        f"use mmbridge.verify(artifact)")
    if any(s.get("layout") == "NCHW" for s in artifact.meta.get("inputs", [])):
        raise SpecError("verify_training(): NCHW inputs (inputs_as_nchw) are not supported; export NHWC")
    tf = import_tensorflow()
    one = {k: np.asarray(v)[:1] for k, v in load_golden(artifact)["inputs"].items()}
    names = [s["name"] for s in artifact.meta["tf_inputs"]]
    call = _caller(source, call_structure(source), names, tf, training=True)
    outs = [o["name"] for o in artifact.meta["outputs"]]
    args = tuple(tf.constant(one[n]) for n in names)

    def tf_call(_: Any) -> dict[str, np.ndarray]:
        return dict(zip(outs, [np.asarray(t) for t in tf.nest.flatten(call(args))]))

    try:
        module = to_torch(artifact.model)
    except ConversionError:
        module = None
    record = distribution_check(tf_call, artifact.model, one, name=artifact.name, torch_module=module)
    if raise_on_failure:
        raise_if_failed(record, artifact.name)
    return record


def raise_if_failed(record: Mapping[str, Any], name: str) -> None:
    """Raise :class:`ParityError` naming the backend, output and statistic whose distribution differs.

    Raises:
        ParityError: ``record["passed"]`` is false.
    """
    if record.get("passed"):
        return
    bad = [r for r in (record.get("ort"), record.get("torch")) if r is not None and not r["passed"]]
    lines = []
    for r in bad:
        if r["problem"]:
            lines.append(f"{r['backend']}: {r['problem']}")
        else:
            w = r["worst"]
            lines.append(f"{r['backend']}: output {w['output']!r}, {w['statistic']}: KS D={w['D']:.3f}, "
                         f"p={w['p']:.2e} < {r['threshold']:.2e} (alpha {r['alpha']} / {r['tests']} tests)")
    raise ParityError(
        f"training=True export of {name!r}: the exported graph's random outputs are not distributed like TF's "
        f"({record['draws']} draws each):\n  " + "\n  ".join(lines) +
        "\nNothing was written. The augmentation is not reproduced; keep it in torch or export with training=False")


__all__ = ["LAYERS", "BY_NAME", "AugmentationLayer", "DRAWS", "ALPHA", "MAX_POSITIONS", "augmentation_layers",
           "inactive_layers", "inference_record", "explain_refusal", "check_training_source", "random_handlers",
           "seeded_copy", "training_patches", "strip_seeds", "RANDOM_OPS", "draw", "compare_draws", "distribution_check", "raise_if_failed", "why_refused",
           "training_record", "verify_training", "ks_with_tolerance", "RELATIVE_ATOL"]
