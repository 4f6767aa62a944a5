"""The options of one export: :class:`ExportOptions`, one frozen dataclass.

:func:`mmbridge.export` builds one :class:`ExportOptions` from its keyword arguments (and, for a
registered bridge, the registration's defaults) and passes that object down the pipeline; the
child process that exports paths and references receives ``options.to_dict()`` and rebuilds the
same object with :meth:`ExportOptions.from_dict`. What determines the graph is hashed into the
artifact fingerprint through :meth:`ExportOptions.fingerprint_bytes`.

Not options (they say how to run an export, not what it produces): ``sample_inputs`` (arrays,
hashed separately), ``cache_dir``, ``force``, ``isolate`` and ``out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from mmbridge.errors import SpecError
from mmbridge.specs import BridgeSpec, TensorSpec, Tolerance

DEFAULT_OPSET = 17
"""ONNX opset when neither the call nor the bridge gives one (the newest opset onnx2torch covers)."""

ROLES = ("preprocess", "encoder")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What one export produces (everything but the source and the sample inputs).

    Args:
        input_specs: the graph inputs in call order, or ``None`` to read them from the source
            (a ``tf.function``'s ``input_signature``, a functional Keras model's inputs, a
            SavedModel's ``serving_default`` signature). TF images are NHWC. Names are unique.
        opset: ONNX opset, a positive int (default :data:`DEFAULT_OPSET`).
        name: artifact name, or ``None`` for the source's own name (bridge, file stem, model,
            function).
        role: ``"preprocess"`` or ``"encoder"`` (metadata).
        tolerance: parity tolerance for floating outputs, or ``None`` for the table in
            :mod:`mmbridge.parity`; ``atol`` and ``rtol`` are >= 0.
        inputs_as_nchw: names of 4-D NHWC inputs that the ONNX graph takes as NCHW, or ``None``.
        trainable: keep BatchNormalization, Dropout and LayerNormalization as real ONNX ops.
        training: trace a Keras model / layer with ``training=True`` (augmentation layers active;
            their random draws become ONNX random ops and parity is a distribution check, see
            :mod:`mmbridge.export.augment`). Keras sources only; not with ``trainable=True``.
        optimize: run onnxoptimizer's parity-preserving passes.
        verify: fail the export (``ParityError``) when ORT's outputs differ from TF's.
        probes: also feed the probe inputs of :mod:`mmbridge.export.probes` (edge values for the ops
            in the graph) to TF and the backends, and refuse (``ProbeError``) on a mismatch; only
            with ``verify``. ``False`` accepts such a graph knowingly (recorded in ``meta.json``).

    Raises:
        SpecError: one message listing every invalid field (``field=value: what is wrong``).

    Example:
        >>> ExportOptions(opset=18, trainable=True).to_dict()["opset"]
        18
    """

    input_specs: tuple[TensorSpec, ...] | None = None
    opset: int = DEFAULT_OPSET
    name: str | None = None
    role: str = "encoder"
    tolerance: Tolerance | None = None
    inputs_as_nchw: tuple[str, ...] | None = None
    trainable: bool = False
    optimize: bool = True
    verify: bool = True
    probes: bool = True
    training: bool = False

    def __post_init__(self) -> None:
        for field in ("input_specs", "inputs_as_nchw"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        problems = _problems(self)
        if problems:
            raise _error(problems)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_arguments(
        cls,
        *,
        input_specs: Sequence[TensorSpec] | None = None,
        opset: int | None = None,
        name: str | None = None,
        role: str | None = None,
        tolerance: Tolerance | None = None,
        inputs_as_nchw: Sequence[str] | None = None,
        trainable: bool = False,
        optimize: bool = True,
        verify: bool = True,
        probes: bool = True,
        bridge: BridgeSpec | None = None,
        training: bool = False,
    ) -> ExportOptions:
        """The options of an :func:`mmbridge.export` call, with a registered bridge's defaults.

        ``None`` (and an empty sequence) means "not given": the bridge's value, else the default.
        A bridge's ``export_kwargs`` apply where the call left the argument at its default:
        ``inputs_as_nchw`` if the call gave none, ``trainable`` if either asks for it,
        ``optimize`` / ``verify`` only if both leave them on.

        Raises:
            SpecError: the bridge's ``export_kwargs`` hold keys that are not export options, or
                a field is invalid (every problem in one message).
        """
        if bridge is not None:
            from mmbridge.registry import BRIDGE_EXPORT_KEYS

            ek = dict(bridge.export_kwargs)
            unknown = sorted(set(ek) - set(BRIDGE_EXPORT_KEYS))
            if unknown:
                raise SpecError(f"bridge {bridge.name!r}: export options {unknown} are not export() arguments; "
                                f"allowed: {list(BRIDGE_EXPORT_KEYS)}")
            input_specs = input_specs or bridge.input_specs
            opset = opset or bridge.opset
            name = name or bridge.name
            role = role or bridge.role
            tolerance = tolerance or bridge.tolerance
            inputs_as_nchw = inputs_as_nchw if inputs_as_nchw is not None else ek.get("inputs_as_nchw")
            trainable = trainable or bool(ek.get("trainable", False))
            training = training or bool(ek.get("training", False))
            optimize = optimize and bool(ek.get("optimize", True))
            verify = verify and bool(ek.get("verify", True))
            probes = probes and bool(ek.get("probes", True))
        return cls(
            input_specs=tuple(input_specs) if input_specs else None,
            opset=DEFAULT_OPSET if opset is None else opset,
            name=name,
            role=role or "encoder",
            tolerance=tolerance,
            inputs_as_nchw=(inputs_as_nchw if isinstance(inputs_as_nchw, str) else tuple(inputs_as_nchw))
            if inputs_as_nchw else None,
            trainable=bool(trainable),
            optimize=bool(optimize),
            verify=bool(verify),
            probes=bool(probes),
            training=bool(training),
        )

    def replace(self, **changes: Any) -> ExportOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: specs and tolerance as dicts, tuples as lists, ``None`` kept."""
        return {
            "input_specs": [s.to_dict() for s in self.input_specs] if self.input_specs else None,
            "opset": self.opset,
            "name": self.name,
            "role": self.role,
            "tolerance": self.tolerance.to_dict() if self.tolerance else None,
            "inputs_as_nchw": list(self.inputs_as_nchw) if self.inputs_as_nchw else None,
            "trainable": self.trainable,
            "optimize": self.optimize,
            "verify": self.verify,
            "probes": self.probes,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportOptions:
        """Rebuild from :meth:`to_dict` output (or a hand-written mapping of the same form).

        Missing keys take their defaults.

        Raises:
            SpecError: unknown keys, an input spec or tolerance that does not parse, or an
                invalid field; every problem in one message.
        """
        if not isinstance(d, Mapping):
            raise SpecError(f"ExportOptions.from_dict: expected a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        problems = [f"{k}: not an export option (known: {', '.join(names)})" for k in sorted(set(d) - set(names), key=str)]
        kw: dict[str, Any] = {k: d[k] for k in names if k in d}
        if kw.get("input_specs") is not None:
            raw = kw["input_specs"]
            if isinstance(raw, (list, tuple)):
                specs = []
                for i, s in enumerate(raw):
                    try:
                        specs.append(s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s))
                    except (SpecError, KeyError, TypeError, ValueError, AttributeError) as exc:
                        problems.append(f"input_specs[{i}]={s!r}: {_reason(exc)}")
                kw["input_specs"] = tuple(specs) if len(specs) == len(raw) else None
        if kw.get("tolerance") is not None and not isinstance(kw["tolerance"], Tolerance):
            raw = kw["tolerance"]
            try:
                kw["tolerance"] = Tolerance(**raw)
            except TypeError as exc:
                problems.append(f"tolerance={raw!r}: {exc}; give {{'atol': float, 'rtol': float, 'reason': str}}")
                kw["tolerance"] = None
        for field in ("input_specs", "inputs_as_nchw"):
            if isinstance(kw.get(field), list):
                kw[field] = tuple(kw[field])
        problems += _problems(_Fields(**{**{f.name: f.default for f in dataclasses.fields(cls)}, **kw}))
        if problems:
            raise _error(problems)
        return cls(**kw)

    def fingerprint_bytes(self) -> bytes:
        """Deterministic bytes of every field that shapes the exported graph (all but ``name``).

        Part of every artifact fingerprint (:mod:`mmbridge.export.fingerprint`).
        """
        d = self.to_dict()
        d.pop("name")
        return json.dumps(d, sort_keys=True, default=str).encode()

    def stable_hash(self) -> str:
        """sha256 hex of :meth:`fingerprint_bytes`: equal across processes and Python runs."""
        return hashlib.sha256(self.fingerprint_bytes()).hexdigest()


@dataclasses.dataclass
class _Fields:
    """Unvalidated field values (what :func:`_problems` reads), for ``from_dict``."""

    input_specs: Any = None
    opset: Any = DEFAULT_OPSET
    name: Any = None
    role: Any = "encoder"
    tolerance: Any = None
    inputs_as_nchw: Any = None
    trainable: Any = False
    optimize: Any = True
    verify: Any = True
    probes: Any = True
    training: Any = False


def _problems(o: Any) -> list[str]:
    """Every invalid field of ``o`` (an :class:`ExportOptions` or :class:`_Fields`), one line each."""
    out = []
    specs = o.input_specs
    if specs is not None:
        if not isinstance(specs, tuple) or not specs or not all(isinstance(s, TensorSpec) for s in specs):
            out.append(f"input_specs={specs!r}: give a non-empty list of mmbridge.TensorSpec, or None to read them "
                       f"from the source")
        else:
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                out.append(f"input_specs: input names {names} are not unique; give each input its own name")
    if isinstance(o.opset, bool) or not isinstance(o.opset, int) or o.opset < 1:
        out.append(f"opset={o.opset!r}: must be a positive int (e.g. {DEFAULT_OPSET})")
    if o.name is not None and (not isinstance(o.name, str) or not o.name):
        out.append(f"name={o.name!r}: must be a non-empty string, or None for the source's own name")
    if o.role not in ROLES:
        out.append(f"role={o.role!r}: must be 'preprocess' or 'encoder'")
    tol = o.tolerance
    if tol is not None:
        if not isinstance(tol, Tolerance):
            out.append(f"tolerance={tol!r}: give an mmbridge.Tolerance(atol, rtol, reason), or None for the table")
        elif not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0 for v in (tol.atol, tol.rtol)):
            out.append(f"tolerance={tol!r}: atol and rtol must be numbers >= 0")
    nchw = o.inputs_as_nchw
    if nchw is not None and (not isinstance(nchw, tuple) or not all(isinstance(n, str) and n for n in nchw)):
        out.append(f"inputs_as_nchw={nchw!r}: give a list of input names (e.g. ['image']), or None")
    for flag in ("trainable", "optimize", "verify", "probes", "training"):
        if not isinstance(getattr(o, flag), bool):
            out.append(f"{flag}={getattr(o, flag)!r}: must be True or False")
    if o.training is True and o.trainable is True:
        out.append("training=True with trainable=True: train parity compares deterministic SGD steps and random "
                   "augmentation cannot pass it; export the augmentation layers as their own bridge with "
                   "training=True and the model with trainable=True")
    return out


def _reason(exc: BaseException) -> str:
    return f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)


def _error(problems: list[str]) -> SpecError:
    head = "invalid export option" if len(problems) == 1 else f"{len(problems)} invalid export options"
    return SpecError(f"{head} (mmbridge.export / ExportOptions):\n" + "\n".join(f"  - {p}" for p in problems))


__all__ = ["ExportOptions", "DEFAULT_OPSET", "ROLES"]
