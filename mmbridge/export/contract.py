"""The training contract, Keras side: what a trainable bridge must hold, and proof that it trains alike.

* :func:`keras_inventory` lists a Keras model's variables (path, shape, trainable) and the layers
  whose behaviour differs between training and inference (BatchNormalization, Dropout), in the
  JSON form that :func:`mmbridge.convert.contract.audit` checks a converted module against;
* :func:`train_parity` runs ``k`` SGD steps on the Keras model (``training=True``) and on the
  converted torch module from the same weights and batches, with every Dropout rate set to 0 for
  the comparison, and compares every variable after the steps against a measured float32 noise
  floor: the same torch steps in float64 (plus :data:`MOVED_FRACTION` of each variable's movement,
  for TF's own kernel rounding). When a variable is outside that floor, Keras' own float32
  sensitivity is measured before it is called a mismatch: the same Keras steps again from weights
  moved by one ulp each (``keras_floor`` of the row): on some deep random-init nets at small inputs
  (DenseNet169 at 32 px, batch 4) the Keras steps are far more sensitive to rounding than torch's,
  which the torch floor alone cannot see. A real mismatch (a folded BatchNorm, a wrong momentum,
  an unbiased running variance, a frozen weight) is deterministic: a one-ulp change of the start
  does not move it, so where the measured noise is small beside a variable's movement it stands
  far above both floors. Where the noise is as large as the movement
  (:meth:`TrainParityReport.inconclusive`) the check cannot see a mismatch on that variable; those
  are listed. Layers that draw random values in training besides Dropout (``GaussianNoise``,
  ``GaussianDropout``, ``AlphaDropout``, ``Random*`` augmentation) are refused by name: the
  exported graph does not have them, and noise against noise has no floor.

Neither changes the Keras model: its weights, Dropout rates and other variables (Keras 3 seed
generator states) are restored afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmbridge.convert.contract import BATCH_NORM, DROPOUT, audit
from mmbridge.errors import ParityError
from mmbridge.export.trainable import STATE_MARK, VAR_MARK, _safe_path, is_tf_keras, variable_paths

#: float32 machine epsilon; the floor of a variable is never below ``8 * steps * EPS32 * max|value|``.
EPS32 = float(np.finfo(np.float32).eps)
#: How far above the float64-measured noise floor a float32 difference may be. The floor measures
#: torch's float32 rounding only; Keras' own float32 rounding (another op order) is of the same size
#: but unmeasured, and both are amplified through BatchNorm at small batches: 8 refused a correct
#: BatchNorm(scale=False) model by 1 % (``tests/export/test_contract.py``). Real mismatches (a folded
#: BatchNorm, a wrong momentum, an unbiased running variance, a frozen weight) are 100x+ above.
FLOOR_FACTOR = 16.0
#: A variable may also differ by this fraction of how far the steps moved it. TF's CPU kernels
#: (oneDNN convolutions) round differently from torch's, which the torch float64 floor cannot see:
#: measured 15x the floor on a Conv -> BatchNorm kernel, under 1e-4 of its movement. A real mismatch
#: differs by a large part of the movement (a frozen weight: all of it; an unbiased running variance
#: at 512 values per channel: 2e-3 of it).
MOVED_FRACTION = 5e-4


def _is_float(v: Any) -> bool:
    return np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)).kind == "f"


def _float_weights(model: Any) -> list[Any]:
    """``model.weights`` without integer / bool variables, in order (what :func:`keras_inventory` lists)."""
    return [v for v in model.weights if _is_float(v)]


def _iter_layers(model: Any) -> list[Any]:
    return list(getattr(model, "_flatten_layers", lambda **k: [])(include_self=False, recursive=True))


def keras_inventory(model: Any, unread: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The Keras side of the training contract (see the module doc and :mod:`mmbridge.convert.contract`).

    Args:
        model: a Keras 3 or tf-keras model or layer (variables read through ``.weights``, named by
            :func:`~mmbridge.export.trainable.variable_paths`).
        unread: the trainable variables the traced forward never reads, as a trainable export found
            them (:meth:`mmbridge.export.trainable.VariableReads.unread`); recorded as
            ``"unread_variables"`` when given (also when empty), omitted when None.

    Returns:
        ``{"variables": [{"path", "marker", "shape", "trainable", "layer"}], "layers": [{"name",
        "class", "kind", ...}]}`` (+ ``"unread_variables": [{"path", "shape", "values"}]``);
        ``kind`` is ``"batch_norm"`` (with momentum, epsilon, scale, center) or ``"dropout"``
        (with rate and noise_shape).

    Raises:
        ValueError: an ``unread`` path that is not a trainable variable of ``model``.
    """
    import sys

    import keras

    if is_tf_keras(model):  # tf-keras (Keras 2) classes
        keras = sys.modules["tf_keras"]
    variables = []
    for v, path in variable_paths(model):
        if not _is_float(v):  # int counters / seed state (Normalization's count): not weights, never marked
            continue
        trainable = bool(v.trainable)
        variables.append({"path": path, "marker": (VAR_MARK if trainable else STATE_MARK) + _safe_path(path),
                          "shape": [int(d) for d in v.shape], "trainable": trainable,
                          "layer": path.rsplit("/", 1)[0] if "/" in path else path})
    layers = []
    for layer in _iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layers.append({"name": layer.name, "class": type(layer).__name__, "kind": BATCH_NORM,
                           "momentum": float(layer.momentum), "epsilon": float(layer.epsilon),
                           "scale": bool(layer.scale), "center": bool(layer.center)})
        elif isinstance(layer, keras.layers.Dropout):
            ns = getattr(layer, "noise_shape", None)
            ns = list(ns) if ns is not None else None
            if ns is None and type(layer).__name__.startswith("SpatialDropout"):  # its noise_shape is set per call
                ns = "one mask value per channel (SpatialDropout)"
            layers.append({"name": layer.name, "class": type(layer).__name__, "kind": DROPOUT, "rate": float(layer.rate),
                           "noise_shape": ns})
    out: dict[str, Any] = {"variables": variables, "layers": layers}
    if unread is not None:
        trainable_paths = {v["path"] for v in variables if v["trainable"]}
        stray = [u["path"] for u in unread if u["path"] not in trainable_paths]
        if stray:
            raise ValueError(f"keras_inventory(unread=...): {stray} are not trainable variables of "
                             f"{getattr(model, 'name', '?')!r}; pass what VariableReads.unread() returned for this model")
        out["unread_variables"] = [{"path": u["path"], "shape": [int(d) for d in u["shape"]],
                                    "values": int(u.get("values", int(np.prod(u["shape"], dtype=np.int64))))}
                                   for u in unread]
    return out


@dataclasses.dataclass
class VariableParity:
    """One Keras variable after the steps: Keras vs torch float32, and the float64-measured floor."""

    path: str
    max_abs: float
    floor: float
    tolerance: float
    moved: float
    passed: bool
    keras_floor: float | None = None
    """Keras' own float32 sensitivity, when it was measured (only after a variable failed against the
    torch floor): how far the same Keras steps end from weights moved by one ulp. ``None``: not measured."""
    unread: bool = False
    """The forward never reads it (``keras_inventory["unread_variables"]``): it has no torch tensor,
    and passes when Keras' steps left it exactly unchanged (``moved == 0``)."""


@dataclasses.dataclass
class TrainParityReport:
    """Result of :func:`train_parity`.

    Attributes:
        steps: SGD steps taken on each side; lr: their learning rate.
        rows: one :class:`VariableParity` per Keras variable, in ``model.weights`` order.
        problems: anything that prevented a comparison (no torch tensor, unrelated layouts).
        passed: every row passed and there are no problems.
    """

    steps: int
    lr: float
    rows: list[VariableParity]
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems and all(r.passed for r in self.rows)

    def first_failure(self) -> str | None:
        """The first problem or diverging variable, as a sentence (None if everything passed)."""
        if self.problems:
            return self.problems[0]
        for r in self.rows:
            if not r.passed and r.unread:
                return (f"Keras variable {r.path!r} is recorded as never read by the forward, yet Keras' "
                        f"{self.steps} SGD steps moved it by {r.moved:.3g}")
            if not r.passed:
                return (f"Keras variable {r.path!r} differs by {r.max_abs:.3g} after {self.steps} SGD steps "
                        f"(float32 noise floor {r.floor:.3g}, tolerance {r.tolerance:.3g})")
        return None

    def inconclusive(self) -> list[str]:
        """Variables whose tolerance is at least their movement (``moved > 0``): there the measured
        noise is as large as what the steps did, so the check could not tell a frozen weight from a
        trained one. Empty on a well-conditioned model; listed, not refused (the floor is measured)."""
        return [r.path for r in self.rows if not r.unread and r.moved > 0 and r.tolerance >= r.moved]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the artifact's ``meta["train_parity"]``)."""
        weak = self.inconclusive()
        return {"steps": self.steps, "lr": self.lr, "passed": self.passed, "problems": self.problems,
                "first_failure": self.first_failure(), "worst_ratio": self.worst_ratio(),
                "keras_floor_measured": any(r.keras_floor is not None for r in self.rows),
                "inconclusive": len(weak), "inconclusive_paths": weak[:20],
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def worst_ratio(self) -> float:
        """The largest ``max_abs / tolerance`` over the variables (< 1 passes; the margin is its inverse)."""
        return max((r.max_abs / r.tolerance for r in self.rows if r.tolerance > 0), default=0.0)

    def raise_if_failed(self, what: str) -> None:
        """Raise :class:`~mmbridge.errors.ParityError` naming the first diverging variable."""
        if not self.passed:
            raise ParityError(f"{what}: training parity failed: {self.first_failure()}. The converted module would "
                              f"not fine-tune like the Keras model; export with trainable=False and keep the bridge "
                              f"frozen (to_ort() / to_torch(trainable=False)), or fix what the first failure names")


def _layout(keras_value: np.ndarray, torch_value: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """A map from the Keras layout to the torch tensor's, found on the (equal) initial values.

    Tried in order: the same layout; an axis permutation (conv kernels HWIO -> OIHW); a reshape; a
    permutation and a reshape (Conv1D kernels as Conv2D weights);
    a split of the Keras axes into two groups, transposed (``MultiHeadAttention``'s
    ``[in, heads, dim]`` query kernel as a ``[heads * dim, in]`` ``nn.Linear`` weight).
    """
    k, t = keras_value, torch_value
    candidates: list[Callable[[np.ndarray], np.ndarray]] = [lambda a: a]
    candidates += [lambda a, p=perm: np.transpose(a, p) for perm in itertools.permutations(range(k.ndim))][1:]
    candidates.append(lambda a: a.reshape(t.shape))
    # a permutation then a reshape: Conv1D's [k, in, out] kernel as a Conv2D's [out, in, 1, k] weight
    candidates += [lambda a, p=perm: np.transpose(a, p).reshape(t.shape) for perm in itertools.permutations(range(k.ndim))]
    for cut in range(1, k.ndim):
        rows = int(np.prod(k.shape[:cut]))
        candidates.append(lambda a, r=rows: a.reshape(r, -1).T.reshape(t.shape))
    for fn in candidates:
        try:
            mapped = fn(k)
        except ValueError:
            continue
        if mapped.shape == t.shape and np.array_equal(mapped, t):
            return fn
    return None


def train_parity(model: Any, module: Any, batches: Sequence[Mapping[str, np.ndarray]], *,
                 input_names: Sequence[str], nchw: Sequence[str] = (), inventory: Mapping[str, Any] | None = None,
                 lr: float = 0.05, seed: int = 0, consume_module: bool = False) -> TrainParityReport:
    """Train both sides ``len(batches)`` SGD steps and compare every variable (see the module doc).

    Args:
        model: the Keras 3 or tf-keras model that was exported (left unchanged).
        module: the converted torch module (``to_torch(trainable=True)``; left unchanged: a copy trains,
            unless ``consume_module``).
        batches: one ``{input name: array}`` per step, in the Keras layout (images NHWC).
        input_names: the inputs in call order.
        nchw: inputs the torch module takes as NCHW (``inputs_as_nchw`` of the export).
        inventory: :func:`keras_inventory` of ``model`` (computed when None).
        lr: SGD learning rate of both sides.
        seed: seed of the regression targets (``mean((out - target)^2)`` summed over float outputs).
        consume_module: train ``module`` itself as the float32 side (its weights change, its Dropout
            rates become 0) instead of a copy: one copy of the weights less, for a caller that
            discards the module afterwards (the export does).

    Returns:
        A :class:`TrainParityReport`. A variable passes when it differs by at most
        ``max(FLOOR_FACTOR * floor, FLOOR_FACTOR * steps * EPS32 * max|value|, MOVED_FRACTION * moved,
        FLOOR_FACTOR * keras_floor)``; ``keras_floor`` (Keras' steps from a one-ulp perturbed start,
        a second Keras run) is measured only when some variable fails without it, so a passing
        export pays nothing for it.
    """
    import sys

    import keras
    import torch

    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    inventory = inventory or keras_inventory(model)
    report = audit(module, inventory, trainable=True)
    problems = [p for p in report.problems if "has no torch tensor" in p or "became" in p]
    rng = np.random.default_rng(seed)
    weights = _float_weights(model)
    if [v["path"] for v in inventory["variables"]] != [p for w, p in variable_paths(model) if _is_float(w)]:
        # an inventory of another model version: list this one's (keeping what the export found unread)
        unread_paths = {v["path"] for v in keras_inventory(model)["variables"] if v["trainable"]}
        inventory = keras_inventory(model, unread=[u for u in inventory.get("unread_variables", [])
                                                   if u["path"] in unread_paths])
    unread = {u["path"] for u in inventory.get("unread_variables", [])}
    initial = [np.array(v.numpy(), copy=True) for v in weights]
    path_of = {id(w): p for w, p in variable_paths(model)}
    trainable_paths = [path_of.get(id(w), "?") for w in model.trainable_weights]
    tf_keras = is_tf_keras(model)
    layers_mod = (sys.modules["tf_keras"] if tf_keras else keras).layers
    dropouts = [ly for ly in _iter_layers(model) if isinstance(ly, layers_mod.Dropout)]
    rates = [ly.rate for ly in dropouts]
    flagged = _stochastic_layer_problems(model)
    problems.extend(msg for _, msg in flagged)
    # every other Keras variable (Keras 3 SeedGenerator states, integer counters): reset before each
    # Keras run and restored afterwards, so the steps leave the model exactly as it was
    weight_ids = {id(w) for w in weights}
    others = [v for v in getattr(model, "variables", []) if id(v) not in weight_ids]
    others_initial = [np.array(v.numpy(), copy=True) for v in others]

    def torch_copy(dtype: torch.dtype) -> Any:
        m = (module if consume_module and dtype == torch.float32 else copy.deepcopy(module)).to(dtype).train()
        for sub in m.modules():
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
        return m

    m64 = torch_copy(torch.float64)  # first: a consumed module is cast in place by the float32 side
    m32 = torch_copy(torch.float32)
    tensors32 = {**dict(m32.named_parameters()), **dict(m32.named_buffers())}
    layouts: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for var, init in zip(inventory["variables"], initial):
        key = report.matched.get(var["path"])
        if key is None:
            continue
        lay = _layout(init, tensors32[key].detach().numpy())
        if lay is None:
            problems.append(f"Keras variable {var['path']!r} and torch tensor {key!r} hold different initial values")
        else:
            layouts[var["path"]] = lay
    steps = len(batches)

    def torch_inputs(batch: Mapping[str, np.ndarray], dtype: torch.dtype) -> list[Any]:
        out = []
        for name in input_names:
            a = np.asarray(batch[name])
            if name in nchw:
                a = np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))
            t = torch.from_numpy(np.array(a, copy=True))
            out.append(t.to(dtype) if t.is_floating_point() else t)
        return out

    def loss_of(outs: Any, targets: list[Any]) -> Any:
        flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return sum(((o - t) ** 2).mean() for o, t in zip(flat, targets) if o.is_floating_point())

    from mmbridge.export.sources import _caller, call_structure

    keras_call = _caller(model, call_structure(model), list(input_names), tf, training=True)
    trainable_ids = {id(w) for w in model.trainable_weights}
    targets_of: list[list[np.ndarray]] = []  # drawn on the first Keras run, reused by the second

    def keras_steps(record_torch: bool) -> list[np.ndarray]:
        """The Keras SGD steps from the current weights (and, on the first run, the torch steps beside them)."""
        for v, init in zip(others, others_initial):
            v.assign(init)
        # Keras 3's SGD for Keras 3 models; plain ``w -= lr * g`` (what SGD without momentum does) for
        # tf-keras ones, whose tf.Variables a Keras 3 optimizer does not take
        opt_k = None if tf_keras else keras.optimizers.SGD(learning_rate=lr)
        for i, batch in enumerate(batches):
            xs = [batch[n] for n in input_names]
            # called in the structure the model takes (a dict for keras-hub backbones), as export traced it
            with tf.GradientTape() as tape:
                out_k = keras_call(tuple(tf.constant(x) for x in xs))
                flat_k = tf.nest.flatten(out_k)
                if i == len(targets_of):
                    targets_of.append([rng.normal(size=tuple(o.shape)).astype(np.float32) for o in flat_k])
                targets = targets_of[i]
                loss_k = tf.add_n([tf.reduce_mean(tf.square(o - t)) for o, t in zip(flat_k, targets)
                                   if o.dtype.is_floating])
            grads = tape.gradient(loss_k, model.trainable_weights)
            if record_torch:
                for g, path in zip(grads, trainable_paths):
                    if path in unread and g is not None:  # the export's read log was wrong: say so, never exempt
                        problems.append(f"Keras variable {path!r} is recorded as never read by the forward "
                                        f"(keras_inventory['unread_variables']) but Keras computes a gradient for it")
                        unread.discard(path)
            pairs = [(g, w) for g, w in zip(grads, model.trainable_weights) if g is not None]
            if opt_k is not None:
                opt_k.apply_gradients(pairs)
            else:
                for g, w in pairs:
                    w.assign_sub(lr * tf.convert_to_tensor(g))
            if record_torch:
                for m, opt, dtype in ((m32, opt32, torch.float32), (m64, opt64, torch.float64)):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_of(m(*torch_inputs(batch, dtype)), [torch.from_numpy(t).to(dtype) for t in targets])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)  # the other side's backward then runs without these
        return [np.array(v.numpy(), copy=True) for v in weights]

    opt32 = torch.optim.SGD([p for p in m32.parameters() if p.requires_grad], lr=lr)
    opt64 = torch.optim.SGD([p for p in m64.parameters() if p.requires_grad], lr=lr)
    keras_floor: list[float | None] = [None] * len(weights)
    try:
        for ly in dropouts:
            ly.rate = 0.0
        after = keras_steps(record_torch=True)
        # any other randomness Keras drew in training (a recurrent layer's dropout / recurrent_dropout,
        # Attention(dropout=...), a subclass of a noise layer, a drop-path layer): its seed generator moved
        problems.extend(_drawn_randomness_problems(model, others, others_initial, {n for n, _ in flagged}))
        rows = _compare(inventory, initial, after, unread, layouts, report.matched, tensors32,
                        {**dict(m64.named_parameters()), **dict(m64.named_buffers())}, steps, keras_floor)
        if any(not r.passed and not r.unread for r in rows) and not problems:
            # A variable is outside the torch-measured floor. Measure Keras' own float32 sensitivity before
            # calling it a mismatch: the same Keras steps from weights moved by one ulp (a random sign each).
            # Rounding differences grow like that perturbation does; a real mismatch (a folded BatchNorm, a
            # wrong momentum, a frozen weight) is deterministic and does not.
            ulp_rng = np.random.default_rng(seed + 1)
            for v, init in zip(weights, initial):
                if init.size and id(v) in trainable_ids:
                    bumped = init + np.sign(ulp_rng.standard_normal(init.shape)) * np.spacing(init)
                    v.assign(bumped.astype(init.dtype))
                else:
                    v.assign(init)
            after_bumped = keras_steps(record_torch=False)
            keras_floor = [float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(after, after_bumped)]
            rows = _compare(inventory, initial, after, unread, layouts, report.matched, tensors32,
                            {**dict(m64.named_parameters()), **dict(m64.named_buffers())}, steps, keras_floor)
    finally:
        for ly, r in zip(dropouts, rates):
            ly.rate = r
        for v, init in zip(weights, initial):
            v.assign(init)
        for v, init in zip(others, others_initial):
            v.assign(init)
    return TrainParityReport(steps=steps, lr=lr, rows=rows, problems=problems)


#: Keras layers that draw random values in training besides Dropout (which the comparison sets to
#: rate 0 and the audit checks): the exported inference graph has none of them.
_NOISE_LAYERS = {"GaussianNoise": "stddev", "GaussianDropout": "rate", "AlphaDropout": "rate"}


def _drawn_randomness_problems(model: Any, others: Sequence[Any], initial: Sequence[np.ndarray],
                               already: set[str]) -> list[str]:
    """One problem per Keras 3 layer whose ``SeedGenerator`` state moved during the Keras steps (every
    Dropout rate was 0, so nothing should have drawn): randomness in training that the inference
    graph does not have, whatever the layer's class. ``already``: layer names refused by class."""
    owner = {}
    for ly in _iter_layers(model):
        for sg in getattr(ly, "_seed_generators", None) or []:
            state = getattr(sg, "state", None)
            if state is not None:
                owner.setdefault(id(state), ly)
    out = []
    seen: set[str] = set(already)
    for v, init in zip(others, initial):
        ly = owner.get(id(v))
        if ly is None or ly.name in seen or np.array_equal(np.asarray(v.numpy()), init):
            continue
        seen.add(ly.name)
        out.append(f"Keras layer {ly.name!r} ({type(ly).__name__}) drew random values in training (its seed "
                   f"generator advanced with every Dropout rate at 0: e.g. an RNN's dropout / recurrent_dropout, "
                   f"Attention(dropout=...), a drop-path or noise layer), which the exported graph (the inference "
                   f"trace) does not: the torch module would train without it. Set that randomness to 0 in the "
                   f"model you export, or export with trainable=False")
    return out


def _stochastic_layer_problems(model: Any) -> list[tuple[str, str]]:
    """``(layer name, problem)`` per Keras layer that adds randomness in training which the export does not keep:
    ``GaussianNoise`` / ``GaussianDropout`` / ``AlphaDropout`` with a non-zero stddev / rate, and the
    augmentation layers that act in training only (``RandomFlip``, ``RandomRotation``, ...: the
    ``inactive`` entries of :data:`mmbridge.export.augment.LAYERS`). The torch module, converted from the inference trace, trains without
    them; a comparison of the two would also be noise against noise (no floor can tell)."""
    from mmbridge.export.augment import BY_NAME  # Keras 3.15's augmentation layers, by class name

    out = []
    for ly in _iter_layers(model):
        cls = type(ly).__name__
        attr = _NOISE_LAYERS.get(cls)
        aug = BY_NAME.get(cls)
        if attr is not None and float(getattr(ly, attr, 0.0) or 0.0) > 0.0:
            what = f"{cls}, {attr} {float(getattr(ly, attr)):g}"
        elif aug is not None and aug.inactive:  # a training-only transform (not e.g. Resizing, the same in both)
            what = f"{cls}, an augmentation layer; at inference: {aug.inference}"
        else:
            continue
        out.append((ly.name, f"Keras layer {ly.name!r} ({what}) draws random values in training, which the exported "
                             f"graph (the inference trace) does not: the torch module would train without it. Export "
                             f"the model without it and apply it in the torch training loop (a Random* layer can be "
                             f"bridged on its own with export(layer, training=True)), or export with trainable=False"))
    return out


def _compare(inventory: Mapping[str, Any], initial: Sequence[np.ndarray], after: Sequence[np.ndarray],
             unread: set[str], layouts: Mapping[str, Callable[[np.ndarray], np.ndarray]], matched: Mapping[str, str],
             tensors32: Mapping[str, Any], t64: Mapping[str, Any], steps: int,
             keras_floor: Sequence[float | None]) -> list[VariableParity]:
    """One :class:`VariableParity` per compared Keras variable (see :func:`train_parity`)."""
    rows = []
    for var, init, value, k_floor in zip(inventory["variables"], initial, after, keras_floor):
        if var["path"] in unread and var["path"] not in layouts:
            # never read by the forward: Keras' SGD must have left it exactly as it was (no gradient)
            moved = float(np.max(np.abs(value - init))) if value.size else 0.0
            rows.append(VariableParity(var["path"], moved, 0.0, 0.0, moved, moved == 0.0, unread=True))
            continue
        lay = layouts.get(var["path"])
        if lay is None:
            continue
        key = matched[var["path"]]
        want = lay(value).astype(np.float64)
        got = tensors32[key].detach().double().numpy()
        exact = t64[key].detach().numpy()
        max_abs = float(np.max(np.abs(got - want))) if got.size else 0.0
        floor = float(np.max(np.abs(got - exact))) if got.size else 0.0
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        moved = float(np.max(np.abs(value - init))) if value.size else 0.0
        tol = max(FLOOR_FACTOR * floor, FLOOR_FACTOR * steps * EPS32 * max(scale, 1e-3), MOVED_FRACTION * moved,
                  FLOOR_FACTOR * (k_floor or 0.0))
        rows.append(VariableParity(var["path"], max_abs, floor, tol, moved, max_abs <= tol, keras_floor=k_floor))
    return rows


#: SGD steps and batch size of the train-parity check a trainable Keras export runs.
TRAIN_PARITY_STEPS = 3
TRAIN_PARITY_BATCH = 8
#: Models with more trainable values than this run train parity at :data:`TRAIN_PARITY_MIN_BATCH`
#: (ResNet50 at batch 8 added 82 s to a 91 s export on a loaded 2-core machine).
TRAIN_PARITY_LARGE = 1_000_000
TRAIN_PARITY_MIN_BATCH = 4


def train_batches(specs: Sequence[Any], samples: Mapping[str, np.ndarray] | None, sample_fn: Callable[[int, int], Mapping[str, np.ndarray]] | None,
                  steps: int = TRAIN_PARITY_STEPS, batch: int = TRAIN_PARITY_BATCH) -> list[dict[str, np.ndarray]]:
    """``steps`` batches of ``batch`` rows (TF layout) for train parity, within the inputs' value ranges.

    From ``sample_fn(batch, seed)`` when the caller gave one; else from the given sample arrays
    (floats drawn uniformly between their min and max, integers / bools from their values, so
    e.g. pixel ranges or token ids stay valid); else from the specs (dtype and ``value_range``).
    """
    out = []
    for i in range(steps):
        seed = 1000 + i
        if sample_fn is not None:
            out.append({k: np.asarray(v) for k, v in sample_fn(batch, seed).items()})
        elif samples is not None:
            rng = np.random.default_rng(seed)
            b = {}
            for k, v in samples.items():
                v = np.asarray(v)
                shape = (batch,) + v.shape[1:]
                if np.issubdtype(v.dtype, np.floating):
                    lo, hi = float(v.min()), float(v.max())
                    b[k] = rng.uniform(lo, hi if hi > lo else lo + 1.0, shape).astype(v.dtype)
                else:
                    b[k] = rng.choice(v.reshape(-1), size=shape).astype(v.dtype)
            out.append(b)
        else:
            from mmbridge.specs import samples_from_specs

            out.append(samples_from_specs(specs, batch=batch, seed=seed))
    return out


def rerun_train_parity(artifact: Any, model: Any, steps: int = 3) -> dict[str, Any]:
    """Train parity of a stored trainable artifact against its Keras model, as a dict
    (:meth:`TrainParityReport.to_dict`); what ``mmbridge.verify(art, train_steps=k, source=model)`` runs.

    Batches as at export (:func:`train_batches`, from the stored golden inputs' ranges, at the batch
    size the export's check recorded); a non-trainable artifact reports ``skipped``.
    """
    if not artifact.meta.get("trainable"):
        return {"passed": None, "skipped": "an inference export (trainable=False): nothing to train"}
    from mmbridge.parity import load_golden
    from mmbridge.specs import TensorSpec

    specs = [TensorSpec.from_dict(d) for d in artifact.meta.get("tf_inputs", artifact.meta["inputs"])]
    nchw = [d["name"] for d in artifact.meta["inputs"] if d.get("layout") == "NCHW"]
    golden = load_golden(artifact)["inputs"]
    samples = {k: (np.transpose(v, (0, 2, 3, 1)) if k in nchw else v) for k, v in golden.items()}
    # the batch the export's own check used (models over TRAIN_PARITY_LARGE values run at TRAIN_PARITY_MIN_BATCH)
    batch = int((artifact.meta.get("train_parity") or {}).get("batch") or TRAIN_PARITY_BATCH)
    batches = train_batches(specs, samples, None, steps=steps, batch=batch)
    report = train_parity(model, artifact.to_torch(trainable=True), batches, input_names=[s.name for s in specs],
                          nchw=nchw, inventory=artifact.meta.get("keras_inventory"))
    return dict(report.to_dict(), batch=batch)


def _register() -> None:
    from mmbridge.parity import TRAIN_PARITY_RUNNER

    if rerun_train_parity not in TRAIN_PARITY_RUNNER:
        TRAIN_PARITY_RUNNER.insert(0, rerun_train_parity)


_register()
