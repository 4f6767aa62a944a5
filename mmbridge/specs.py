"""Tensor and bridge specifications.

A :class:`TensorSpec` says what one graph input is (name, shape with symbolic dims, dtype,
layout, value range); a :class:`BridgeSpec` says how to build, export and check one bridge.
Both serialise to plain JSON (``to_dict`` / ``from_dict``) for the artifact's ``meta.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mmbridge.errors import SpecError

Dim = int | str | None
"""One dimension: a fixed size, a symbolic name (``"batch"``), or ``None`` (unnamed dynamic)."""

LAYOUTS = ("NHWC", "NCHW", "NC", "NTC", "NT", "N", None)
_DTYPES = ("float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool", "string")
Role = Literal["preprocess", "encoder"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input (or output) of a bridge.

    Args:
        name: graph input name; becomes the ONNX input name and the key of input dicts.
        shape: one entry per axis: an ``int`` (fixed), a ``str`` (a named symbolic dim shared
            across inputs, e.g. ``"batch"``) or ``None`` (dynamic). The first axis is the batch.
        dtype: numpy dtype name (``"float32"``, ``"uint8"``, ``"int64"``, ``"string"``...).
        layout: axis meaning: ``"NHWC"`` (TF images), ``"NCHW"`` (torch images), ``"NC"``
            (features), ``"NTC"`` / ``"NT"`` (sequences), or ``None`` when it does not apply.
        value_range: ``(low, high)`` of valid values (e.g. ``(0, 255)`` for uint8 pixels,
            ``(0, vocab_size - 1)`` for token ids); sample inputs are drawn from it.

    Raises:
        SpecError: unknown dtype or layout, a layout whose rank disagrees with ``shape``, or an
            empty / reversed ``value_range``.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    layout: str | None = None
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        dtype = np.dtype(self.dtype).name if self.dtype not in ("bfloat16", "string") else self.dtype
        if dtype == "str" or dtype.startswith("<U") or dtype == "object":
            dtype = "string"
        object.__setattr__(self, "dtype", dtype)
        if not self.name or not isinstance(self.name, str):
            raise SpecError(f"TensorSpec.name must be a non-empty string, got {self.name!r}")
        if dtype not in _DTYPES:
            raise SpecError(f"TensorSpec {self.name!r}: dtype {dtype!r} is not supported; use one of {_DTYPES}")
        if self.layout not in LAYOUTS:
            raise SpecError(f"TensorSpec {self.name!r}: layout {self.layout!r} is not one of {LAYOUTS}")
        if self.layout is not None and len(self.layout) != len(self.shape):
            raise SpecError(
                f"TensorSpec {self.name!r}: layout {self.layout} has {len(self.layout)} axes but shape "
                f"{self.shape} has {len(self.shape)}"
            )
        for d in self.shape:
            if not (d is None or isinstance(d, str) or (isinstance(d, int) and d > 0)):
                raise SpecError(f"TensorSpec {self.name!r}: dim {d!r} in shape {self.shape} must be a positive int, a name or None")
        if self.value_range is not None:
            lo, hi = self.value_range
            if not lo <= hi:
                raise SpecError(f"TensorSpec {self.name!r}: value_range {self.value_range} has low > high")
            object.__setattr__(self, "value_range", (float(lo), float(hi)))

    # -- shapes ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dim but the batch dim is a fixed int."""
        return all(isinstance(d, int) for d in self.shape[1:])

    def concrete_shape(self, batch: int = 2, fill: int = 8) -> tuple[int, ...]:
        """A concrete shape: batch dim -> ``batch``, other dynamic dims -> ``fill``."""
        return tuple(
            d if isinstance(d, int) else (batch if i == 0 else fill) for i, d in enumerate(self.shape)
        )

    def check(self, array: Any, bindings: dict[str, int] | None = None) -> None:
        """Check that ``array`` (numpy array or torch tensor) matches this spec.

        Args:
            array: the value; needs ``.shape`` and ``.dtype``.
            bindings: symbolic dim name -> size seen so far across inputs; updated in place so
                that a dim name shared by several inputs must agree.

        Raises:
            SpecError: rank, a fixed dim, a shared symbolic dim, or the dtype differs; the
                message names this input and both values.
        """
        shape = tuple(int(s) for s in array.shape)
        if len(shape) != self.rank:
            raise SpecError(
                f"input {self.name!r}: expected rank {self.rank} {self._fmt()} but got shape {shape}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, shape)):
            if isinstance(want, int) and want != got:
                raise SpecError(
                    f"input {self.name!r}: axis {axis} must be {want} {self._fmt()} but got shape {shape}"
                )
            if isinstance(want, str) and bindings is not None:
                if bindings.setdefault(want, got) != got:
                    raise SpecError(
                        f"input {self.name!r}: symbolic dim {want!r} is {got} here but "
                        f"{bindings[want]} in another input"
                    )
        got_dtype = _dtype_name(array.dtype)
        if got_dtype != self.dtype:
            raise SpecError(
                f"input {self.name!r}: dtype {got_dtype} does not match the spec's {self.dtype}; "
                f"convert it explicitly (mmbridge never casts silently)"
            )

    def _fmt(self) -> str:
        return f"(spec shape {self.shape}{', ' + self.layout if self.layout else ''})"

    # -- samples --------------------------------------------------------------------------
    def sample(self, batch: int = 2, seed: int = 0) -> np.ndarray:
        """A deterministic random input for parity checks.

        Floats are uniform in ``value_range`` (default ``[0, 1)``); integers are uniform
        integers in ``value_range`` (default ``[0, 10]``); strings are short ASCII words.

        Returns:
            ``np.ndarray`` of :meth:`concrete_shape` ``(batch, ...)`` and this spec's dtype.
        """
        rng = np.random.default_rng(seed)
        shape = self.concrete_shape(batch)
        lo, hi = self.value_range or ((0.0, 1.0) if self.dtype.startswith(("float", "bfloat")) else (0, 10))
        if self.dtype == "string":
            words = np.array(["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"], dtype=object)
            return words[rng.integers(0, len(words), size=shape)]
        if self.dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        if self.dtype.startswith(("float", "bfloat")):
            out = rng.uniform(lo, hi, size=shape)
            return out.astype("float32" if self.dtype == "bfloat16" else self.dtype)
        return rng.integers(int(lo), int(hi) + 1, size=shape).astype(self.dtype)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "value_range": list(self.value_range) if self.value_range else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        vr = d.get("value_range")
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float32"), d.get("layout"), tuple(vr) if vr else None)


def _dtype_name(dtype: Any) -> str:
    """Canonical numpy-style name for a numpy or torch dtype (``torch.float32`` -> ``"float32"``)."""
    s = str(dtype)
    if s.startswith("torch."):
        s = s[len("torch.") :]
        return {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}.get(s, s)
    if s == "object" or s.startswith("<U") or s.startswith("|S"):
        return "string"
    return np.dtype(dtype).name


SampleFn = Callable[[int, int], dict[str, np.ndarray]]
"""``sample_inputs(batch, seed) -> {input name: array}`` for parity checks."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Parity tolerance: ``|a - b| <= atol + rtol * |b|`` elementwise (``numpy.isclose`` form).

    Args:
        atol: absolute tolerance, in the output's units.
        rtol: relative tolerance.
        reason: why this tolerance (shown in reports; required when looser than the table).
    """

    atol: float
    rtol: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BridgeSpec:
    """How to build, export and check one named bridge (see ``mmbridge.register_bridge``).

    Args:
        name: registry name.
        role: ``"preprocess"`` (a TF preprocessing graph; usually frozen, runs on ORT) or
            ``"encoder"`` (a Keras/TF model that may be fine-tuned with the torch backend).
        builder: a zero-argument callable that returns the TF object (``tf.function``, Keras
            model or layer), a SavedModel directory, or a ``"module:attribute"`` reference.
        input_specs: the graph inputs, in call order.
        opset: ONNX opset to export to (default 17: the newest opset that onnx2torch covers
            without mmbridge's extra converters).
        tolerance: parity tolerance; ``None`` uses the table in :mod:`mmbridge.parity`.
        sample_inputs: ``(batch, seed) -> {name: array}``; default draws from ``input_specs``.
        description: one line, shown by ``mmbridge bridges``.
        export_kwargs: extra keyword arguments for :func:`mmbridge.export` (e.g. ``inputs_as_nchw``).
    """

    name: str
    role: Role
    builder: Callable[[], Any] | str
    input_specs: tuple[TensorSpec, ...]
    opset: int = 17
    tolerance: Tolerance | None = None
    sample_inputs: SampleFn | None = None
    description: str = ""
    export_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_specs", tuple(self.input_specs))
        if self.role not in ("preprocess", "encoder"):
            raise SpecError(f"bridge {self.name!r}: role must be 'preprocess' or 'encoder', got {self.role!r}")
        names = [s.name for s in self.input_specs]
        if len(set(names)) != len(names):
            raise SpecError(f"bridge {self.name!r}: input names {names} are not unique")


def is_padding_mask(spec: TensorSpec) -> bool:
    """An integer / bool input named like a mask (``"padding_mask"``, ``"attention_mask"``)
    whose values are 0 / 1 (no ``value_range`` or one inside ``[0, 1]``), with a batch axis and
    at least one more axis."""
    if "mask" not in spec.name.lower() or spec.rank < 2 or spec.dtype in ("string",) or \
            spec.dtype.startswith(("float", "bfloat")):
        return False
    return spec.value_range is None or (spec.value_range[0] >= 0 and spec.value_range[1] <= 1)


def padding_mask_sample(spec: TensorSpec, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A padding mask: per row, ones for a random length in ``[1, T]`` along the last axis and
    zeros after (every row has at least one 1, like a real tokenizer's mask; the first row is
    all ones)."""
    rng = np.random.default_rng(seed)
    shape = spec.concrete_shape(batch)
    t = shape[-1]
    lengths = rng.integers(1, t + 1, size=shape[:-1])
    lengths.reshape(-1)[0] = t
    out = np.arange(t) < lengths[..., None]
    return out.astype(spec.dtype)


def samples_from_specs(specs: Sequence[TensorSpec], batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Default sample inputs: :meth:`TensorSpec.sample` per spec, with seeds ``seed + i``.

    Padding masks (:func:`is_padding_mask`) are 1s then 0s with at least one 1 per row
    (:func:`padding_mask_sample`): an all-zero row makes attention softmax over nothing.
    """
    return {s.name: (padding_mask_sample if is_padding_mask(s) else TensorSpec.sample)(s, batch, seed + i)
            for i, s in enumerate(specs)}
