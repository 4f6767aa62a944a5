"""The weight audit of the training contract: the converted module holds exactly the Keras model's
trainable variables as ``nn.Parameter`` s, its state as buffers, and its Dropout layers as modules.

A trainable export (:mod:`mmbridge.export.trainable`) names every Keras variable's initializer
``mmb_var__<path>`` (trainable) or ``mmb_state__<path>`` (state), and records the Keras side in the
artifact's metadata as an *inventory* (:func:`mmbridge.export.contract.keras_inventory`):

    {"variables": [{"path": "dense/kernel", "marker": "mmb_var__dense__kernel", "shape": [8, 3],
                    "trainable": true, "layer": "dense"}, ...],
     "layers": [{"name": "dropout", "class": "Dropout", "kind": "dropout", "rate": 0.5,
                 "noise_shape": null}, {"name": "bn", "kind": "batch_norm", ...}, ...]}

A trainable export adds ``"unread_variables": [{"path": "token_embedding/reverse_embeddings",
"shape": [16, 100], "values": 1600}]``: the trainable variables the traced forward never reads
(:meth:`mmbridge.export.trainable.VariableReads.unread`; e.g. an untied ``ReversibleEmbedding``'s
``reverse_embeddings`` in a keras-hub backbone, which only a CausalLM head reads). They are in no
graph, so they have no torch tensor, and Keras gives them no gradient either (train parity checks
that they stay unchanged). The audit exempts exactly those (listed in ``unread``) and counts their
values apart (``unread_trainable_values``); any other trainable variable without a torch tensor, a
read one whose marker was lost included, is still refused.

:func:`audit` checks a converted module against it, with no TensorFlow:

* every Keras **trainable** variable is exactly one torch ``Parameter`` with ``requires_grad``
  (when the module is trainable) and the same number of values (layouts differ: Dense kernels are
  transposed, conv kernels HWIO -> OIHW);
* every Keras **non-trainable** variable (BatchNorm moving statistics) is exactly one buffer; one
  outside a BatchNormalization (``Normalization``'s adapted mean / variance, which Keras training
  never changes) may instead be folded into constants (listed in ``constants``);
* no torch ``Parameter`` exists that no Keras variable accounts for (e.g. a BatchNorm with
  ``scale=False`` must not gain a trainable gamma);
* every Keras **Dropout** is a torch Dropout module with the same rate and the same mask:
  ``nn.Dropout`` (elementwise), :class:`~mmbridge.convert.ops.dropout.PerSampleDropout`
  (``noise_shape=(None, 1, ..., 1)``) or :class:`~mmbridge.convert.ops.dropout.ChannelDropout`
  (``SpatialDropout1D/2D/3D``); every Keras **BatchNormalization** is a torch BatchNorm
  module (train / eval modes and running statistics).

A failure names the Keras layer and variable and says what to do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from typing import Any

from torch import nn

from mmbridge.errors import ConversionError

#: The Keras layer classes whose kind the audit checks by module (besides their variables).
DROPOUT = "dropout"
BATCH_NORM = "batch_norm"


@dataclasses.dataclass
class AuditReport:
    """Result of :func:`audit`.

    Attributes:
        passed: no problem was found.
        problems: one sentence per problem (Keras layer / variable, what is wrong, what to do).
        keras_trainable_values: scalar values in the Keras trainable variables the forward reads.
        torch_trainable_values: scalar values in the module's ``requires_grad`` parameters.
        matched: Keras variable path -> torch parameter / buffer name.
        counts: ``{"variables", "parameters", "buffers", "batch_norms", "dropouts"}`` found.
        constants: Keras non-trainable variables outside BatchNormalization (``Normalization``'s
            adapted mean / variance) that the graph holds as folded constants: Keras never changes
            them in training either, so that is allowed.
        unread: Keras trainable variables the traced forward never reads (the inventory's
            ``unread_variables``) and that have no torch tensor: exempt, not counted in
            ``keras_trainable_values``.
        unread_trainable_values: scalar values in ``unread``.
    """

    passed: bool
    problems: list[str]
    keras_trainable_values: int
    torch_trainable_values: int
    matched: dict[str, str]
    counts: dict[str, int]
    constants: list[str] = dataclasses.field(default_factory=list)
    unread: list[str] = dataclasses.field(default_factory=list)
    unread_trainable_values: int = 0

    def summary(self) -> str:
        """``"N trainable values in Keras and torch, plus M never read by the forward ([paths])"``."""
        text = f"{self.keras_trainable_values:,} trainable values in Keras, {self.torch_trainable_values:,} in torch"
        if self.unread:
            text += (f", plus {self.unread_trainable_values:,} not read by the exported forward (the inference "
                     f"trace, training=False; no gradient in Keras from it either, not in the torch module): "
                     f"{self.unread}. A variable the model reads only in training (an add_loss head, a "
                     f"training-only branch) is not trained by the torch module")
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the artifact's ``meta.json`` stores under ``"audit"``; with ``summary``)."""
        return dict(dataclasses.asdict(self), summary=self.summary())

    def raise_if_failed(self, what: str) -> None:
        """Raise :class:`~mmbridge.errors.ConversionError` listing every problem, if any."""
        if not self.passed:
            raise ConversionError(
                f"{what} does not keep the training contract ({len(self.problems)} problem(s)); training it would "
                f"silently train something other than the Keras model:\n" + "\n".join(f"  - {p}" for p in self.problems)
            )


def marker_pattern(marker: str) -> re.Pattern[str]:
    """The ONNX initializer names that hold the variable of ``marker`` (``marker`` + ``:0`` / ``__<op>`` / end)."""
    return re.compile(re.escape(marker) + r"(?::|__|$)")


def audit(module: nn.Module, inventory: dict[str, Any], *, trainable: bool = True) -> AuditReport:
    """Check a converted module against the Keras inventory of its export (see the module doc).

    Args:
        module: what :func:`mmbridge.to_torch` returned (it carries ``mmbridge_sources``: tensor
            name -> ONNX initializer name).
        inventory: the artifact's ``meta["keras_inventory"]``.
        trainable: whether the module was converted with ``trainable=True`` (then every Keras
            trainable variable's parameter must have ``requires_grad``).

    Returns:
        An :class:`AuditReport` (never raises; call ``raise_if_failed``).
    """
    sources: dict[str, str] = dict(getattr(module, "mmbridge_sources", {}))
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    problems: list[str] = []
    matched: dict[str, str] = {}
    constants: list[str] = []
    bn_layers = {ly["name"] for ly in inventory.get("layers", []) if ly["kind"] == BATCH_NORM}
    unread_paths = {u["path"] for u in inventory.get("unread_variables", [])}
    unread: list[str] = []
    for var in inventory.get("variables", []):
        pattern = marker_pattern(var["marker"])
        keys = [k for k, src in sources.items() if pattern.search(src) and (k in params or k in buffers)]
        where = f"Keras variable {var['path']!r} (layer {var.get('layer', '?')!r})"
        numel = 1
        for d in var["shape"]:
            numel *= int(d)
        if not keys and not var["trainable"] and var.get("layer", "").rsplit("/", 1)[-1] not in bn_layers:
            constants.append(var["path"])  # e.g. Normalization's adapted statistics: fixed in Keras training too
            continue
        if not keys and var["trainable"] and var["path"] in unread_paths:
            unread.append(var["path"])  # never read by the traced forward: no gradient in Keras either
            continue
        if not keys:
            problems.append(f"{where} has no torch tensor: tf2onnx folded it into a constant, so it would not train. "
                            f"Report the layer type; meanwhile keep the bridge frozen (to_ort()) or re-export at "
                            f"another opset")
            continue
        if len(keys) > 1:
            problems.append(f"{where} became {len(keys)} torch tensors {keys}; they would train apart")
            continue
        key = keys[0]
        matched[var["path"]] = key
        tensor = params.get(key, buffers.get(key))
        if tensor.numel() != numel:
            problems.append(f"{where} has {numel} values but torch tensor {key!r} has {tensor.numel()}")
        if var["trainable"] and key not in params:
            problems.append(f"{where} is trainable in Keras but a frozen buffer ({key!r}) in torch")
        elif var["trainable"] and trainable and not params[key].requires_grad:
            problems.append(f"{where} is trainable in Keras but {key!r} has requires_grad=False")
        elif not var["trainable"] and key in params and params[key].requires_grad:
            problems.append(f"{where} is Keras state (not trainable) but a trainable parameter {key!r} in torch")
    claimed = set(matched.values())
    for name, p in params.items():
        if p.requires_grad and name not in claimed:
            problems.append(f"torch parameter {name!r} (from ONNX initializer {sources.get(name, '?')!r}) has no Keras "
                            f"variable: it would train values the Keras model holds fixed (e.g. the gamma of a "
                            f"BatchNormalization(scale=False))")
    layers = inventory.get("layers", [])
    # a Dropout of rate 0 is the identity (Keras MultiHeadAttention's default): nothing to keep. Each
    # Keras Dropout must meet a torch Dropout module of the same rate *and* mask (elementwise, per
    # sample, per (sample, channel)): a SpatialDropout as an elementwise nn.Dropout would train otherwise
    keras_rates = Counter((round(float(ly["rate"]), 6), _keras_mask(ly)) for ly in layers
                          if ly["kind"] == DROPOUT and ly["rate"] > 0)
    torch_rates = Counter((round(float(m.p), 6), _torch_mask(m)) for m in module.modules()
                          if isinstance(m, nn.Dropout) and m.p > 0)
    for (rate, mask), n in (keras_rates - torch_rates).items():
        names = [ly["name"] for ly in layers if ly["kind"] == DROPOUT and round(float(ly["rate"]), 6) == rate
                 and _keras_mask(ly) == mask]
        shaped = [ly["name"] for ly in layers if ly["kind"] == DROPOUT and ly.get("noise_shape") is not None]
        why = (f"; {shaped[:5]} have a noise_shape: only a per-sample one (None, 1, ..., 1), e.g. stochastic depth, "
               f"and SpatialDropout1D/2D/3D (per channel) are kept; replace the others or keep the bridge frozen "
               f"(to_ort())" if shaped else "")
        problems.append(f"Keras Dropout layer(s) {names[:5]} with rate {rate} and a {mask} mask ({n} missing) are not "
                        f"Dropout modules with that mask in torch: fine-tuning would run without them{why}")
    n_bn_keras = sum(1 for ly in layers if ly["kind"] == BATCH_NORM)
    n_bn_torch = sum(1 for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if n_bn_torch < n_bn_keras:
        names = [ly["name"] for ly in layers if ly["kind"] == BATCH_NORM]
        problems.append(f"{n_bn_keras} Keras BatchNormalization layers ({names[:5]}...) but {n_bn_torch} torch BatchNorm "
                        f"modules: the others were folded into convolutions and would train without batch statistics")
    keras_values = unread_values = 0
    for v in inventory.get("variables", []):
        if v["trainable"]:
            n = 1
            for d in v["shape"]:
                n *= int(d)
            if v["path"] in unread:
                unread_values += n
            else:
                keras_values += n
    torch_values = sum(p.numel() for p in params.values() if p.requires_grad)
    return AuditReport(
        passed=not problems, problems=problems, keras_trainable_values=keras_values,
        torch_trainable_values=torch_values, matched=matched, constants=constants, unread=unread,
        unread_trainable_values=unread_values,
        counts={"variables": len(inventory.get("variables", [])), "parameters": len(params), "buffers": len(buffers),
                "batch_norms": n_bn_torch, "dropouts": sum(torch_rates.values())})


def _keras_mask(layer: dict[str, Any]) -> str:
    """The mask a Keras Dropout of the inventory draws: ``"elementwise"`` (no ``noise_shape``),
    ``"per-sample"`` (``(None, 1, ..., 1)``), ``"per-channel"`` (SpatialDropout*) or ``"other"``."""
    ns = layer.get("noise_shape")
    if ns is None:
        return "elementwise"
    if isinstance(ns, str):
        return "per-channel" if "SpatialDropout" in ns else "other"
    dims = list(ns)
    return "per-sample" if len(dims) >= 2 and all(d == 1 for d in dims[1:]) else "other"


def _torch_mask(module: nn.Module) -> str:
    """The mask a converted torch Dropout module draws (see :func:`_keras_mask`)."""
    from mmbridge.convert.ops.dropout import ChannelDropout, PerSampleDropout

    if isinstance(module, ChannelDropout):
        return "per-channel"
    if isinstance(module, PerSampleDropout):
        return "per-sample"
    return "elementwise" if type(module) is nn.Dropout else "other"


def artifact_meta(source: Any) -> dict[str, Any] | None:
    """The ``meta.json`` of what :func:`mmbridge.to_torch` was given (artifact or artifact directory), or None."""
    meta = getattr(source, "meta", None)
    if isinstance(meta, dict):
        return meta
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from mmbridge.store import read_meta

        try:
            return read_meta(source, check=False)
        except Exception:  # noqa: BLE001 - to_torch reports an unreadable artifact itself
            return None
    return None


def resolve_trainable(source: Any, trainable: bool | None) -> bool:
    """The one rule of ``to_torch(trainable=...)``: the default follows the artifact.

    * an **inference** export of a Keras model (``meta["keras_inventory"]`` recorded,
      ``meta["trainable"]`` false: BatchNorm folded into constants, Dropout gone; also a SavedModel
      written by tf-keras or Keras 3's ``model.export``) converts to a frozen module by default, and
      asking for ``trainable=True`` raises (with ``meta["trainable_refusal"]``'s fix when recorded);
    * everything else (a ``trainable=True`` export, a tf.function / SavedModel export, an ONNX
      file, an artifact written before inventories existed) is trainable by default, as before.

    Raises:
        ConversionError: ``trainable=True`` on a Keras inference export, with the fix.
    """
    meta = artifact_meta(source)
    inference_keras = bool(meta) and meta.get("keras_inventory") is not None and not meta.get("trainable")
    if trainable is None:
        return not inference_keras
    if trainable and inference_keras and meta.get("trainable_refusal"):  # a Keras-written SavedModel: its own fix
        raise ConversionError(f"bridge {meta.get('name', '?')!r}: to_torch(trainable=True) refused: "
                              f"{meta['trainable_refusal']}")
    if trainable and inference_keras:
        raise ConversionError(
            f"bridge {meta.get('name', '?')!r} is an inference export of a Keras model: its BatchNormalization layers "
            f"are folded into constants and its Dropout layers are gone, so training it in torch would silently train "
            f"something other than the Keras model. What to do: re-export with trainable=True (mmbridge.export(model, "
            f"trainable=True) / `mmbridge export --trainable`), or to_torch(trainable=False) for a frozen module")
    return bool(trainable)


def check_torch_verified(source: Any, allow_unverified: bool = False) -> None:
    """Refuse to convert an artifact whose export found the torch backend unverified.

    Since export checks both backends (``meta["backends"]["torch"]``, written by
    :mod:`mmbridge.export.backends`: ``{"converts", "matches", "reason", "max_abs", ...}``), an
    artifact records whether ``to_torch`` converted and matched TensorFlow at every shape checked.
    Artifacts written before that record (no ``"backends"`` key), exports with ``verify=False``
    (``converts`` / ``matches`` None: not checked), ONNX files and ``ModelProto`` sources convert
    as before.

    Args:
        source: what :func:`mmbridge.to_torch` was given.
        allow_unverified: the caller's explicit override (``to_torch(allow_unverified=True)``):
            convert anyway (e.g. to debug the converter); the module may compute something else
            than TensorFlow.

    Raises:
        ConversionError: the record says the torch backend does not convert or does not match;
            the message carries the recorded reason and the fix (``to_ort()``, or the override).
    """
    meta = artifact_meta(source)
    record = ((meta or {}).get("backends") or {}).get("torch")
    if allow_unverified or not isinstance(record, dict):
        return
    if record.get("converts") is not False and record.get("matches") is not False:  # verified, or not checked (None)
        return
    what = "does not convert to torch" if not record.get("converts") else "converts to torch but does not match TensorFlow"
    raise ConversionError(
        f"bridge {meta.get('name', '?')!r} {what} (checked at export): {record.get('reason') or 'no reason recorded'}.\n"
        f"What to do: use the onnxruntime backend, which export verified (artifact.to_ort(), or backend='ort' in "
        f"compose()); or register a correct op converter and re-export (force=True); or, knowingly, "
        f"to_torch(allow_unverified=True) to get the module anyway.")


def audit_converted(module: nn.Module, source: Any, trainable: bool) -> None:
    """Run :func:`audit` on a ``to_torch(trainable=True)`` result when its artifact records a Keras
    inventory from a trainable export (a no-op otherwise).

    Raises:
        ConversionError: the audit failed (every problem listed).
    """
    meta = artifact_meta(source)
    if not trainable or not meta or not meta.get("trainable") or meta.get("keras_inventory") is None:
        return
    audit(module, meta["keras_inventory"], trainable=True).raise_if_failed(
        f"to_torch(trainable=True) of bridge {meta.get('name', '?')!r}")
