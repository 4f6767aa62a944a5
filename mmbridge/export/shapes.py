"""Parity at several shapes: which sizes export checks for every symbolic dim, and the samples there.

One sample shape proves little for a graph with dynamic dims: tf2onnx's integer ``FloorDiv`` was
a truncating ``Div``, so ``keras.layers.CenterCrop(10, 12)`` with dynamic H/W matched TF on an
8x8 input (``(8 - 10) // 2`` is ``-1`` either way) and returned ``(2, 2, 2, 3)`` where Keras returns
``(2, 10, 12, 3)`` on a 6x7 one. So export also checks, beside the user's (or default) samples:

* **small**: batch 1, and every other symbolic dim below the smallest crop / resize target found in
  the graph (:func:`size_targets`), each dim a different size (6 and 7 for targets 10 and 12), so
  that a negative or odd crop offset and a swapped H / W show;
* **odd**: batch 3 and every other symbolic dim at ``base + 1 + 2k`` (the other parity of the base
  size); only when the inputs have symbolic dims other than the batch, or when ``small`` could
  not run in TensorFlow.

A dim group is what must take one size together: a symbolic dim name shared by inputs, the batch
(axis 0 of every input), or an unnamed (``None``) axis of the same index and base size. Samples at
a new shape respect what the base samples were: drawn from the specs (dtype, ``value_range``, the
bounded integer ranges :func:`mmbridge.export.sources.with_model_ranges` gave, 0/1 padding masks)
when export drew them, else from the user's values (floats uniform between their min and max,
a constant input stays that constant; integers / strings / bools from the values seen, so ids
stay valid ids), or from the user's
``sample_fn(batch, seed)`` when its arrays have the needed shape.

TF failing at a size (a CNN that needs 32 px) skips that size and records why; :func:`run_shapes`
returns what ran. Nothing here imports TensorFlow: the caller passes TF in as a function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmbridge.specs import TensorSpec, is_padding_mask, padding_mask_sample, samples_from_specs

#: Integer constants at or above this are sentinels (tf2onnx's 1e9 slice bounds), not sizes.
_MAX_TARGET = 1 << 16
#: How many graph nodes above a Slice / Resize are searched for its size constants.
_SEARCH_NODES = 64


@dataclasses.dataclass(frozen=True)
class DimGroup:
    """Input axes that take one size together.

    Attributes:
        key: ``"batch"``, the symbolic dim name, or ``"<input>[<axis>]"`` for an unnamed axis.
        members: ``(input name, axis)`` pairs, axes in the TF layout (NHWC).
        base: the size of these axes in the base samples.
        is_batch: axis 0 of the inputs.
    """

    key: str
    members: tuple[tuple[str, int], ...]
    base: int
    is_batch: bool


@dataclasses.dataclass(frozen=True)
class ShapeCase:
    """One extra shape to check: ``label`` (``"small"`` / ``"odd"``) and a size per :class:`DimGroup` key."""

    label: str
    sizes: Mapping[str, int]

    def shapes(self, groups: Sequence[DimGroup], samples: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """The concrete shape of each input (TF layout) at this case."""
        out = {k: list(np.shape(v)) for k, v in samples.items()}
        for g in groups:
            for name, axis in g.members:
                out[name][axis] = int(self.sizes[g.key])
        return {k: tuple(v) for k, v in out.items()}


def dynamic_groups(specs: Sequence[TensorSpec], samples: Mapping[str, np.ndarray]) -> list[DimGroup]:
    """The symbolic dims of ``specs`` grouped into :class:`DimGroup` (see the module doc), in spec order.

    Args:
        specs: the input specs (TF layout).
        samples: the base samples (their shapes give each group's base size).
    """
    order: list[str] = []
    members: dict[str, list[tuple[str, int]]] = {}
    base: dict[str, int] = {}
    batch: dict[str, bool] = {}
    for s in specs:
        shape = np.shape(samples[s.name])
        for axis, d in enumerate(s.shape):
            if isinstance(d, int) or axis >= len(shape):
                continue
            if axis == 0 and (d is None or d == "batch"):
                key = "batch"
            elif isinstance(d, str):
                key = d
            else:
                same = [k for k in order if k.endswith(f"[{axis}]") and base[k] == int(shape[axis]) and k != "batch"
                        and not any(n == s.name for n, _ in members[k])]
                key = same[0] if same else f"{s.name}[{axis}]"
            if key not in members:
                order.append(key)
                members[key] = []
                base[key] = int(shape[axis])
                batch[key] = axis == 0
            members[key].append((s.name, axis))
    return [DimGroup(k, tuple(members[k]), base[k], batch[k]) for k in order]


def size_targets(model: Any) -> list[int]:
    """The static crop / resize sizes a graph computes with, smallest first.

    Found above each ``Slice`` (its ``starts`` / ``ends``) and ``Resize`` (its ``sizes``), up to
    :data:`_SEARCH_NODES` producers up: integer constants (initializers or ``Constant`` nodes) that
    are an operand of ``Add`` / ``Sub`` / ``Min`` / ``Max`` / ``Concat`` (``CenterCrop``'s
    ``(h - 10) // 2``, ``Resizing``'s ``Concat(shape[:2], [h, w])``), and the spatial entries of a
    constant ``sizes``. Divisors, slice indices of a ``Shape`` and sentinels (>= 2^16) are not sizes.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        Sorted distinct sizes > 1 (empty when the graph has none).
    """
    from onnx import numpy_helper

    g = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in g.node for o in n.output}
    found: set[int] = set()

    def ints(name: str) -> list[int]:
        v = consts.get(name)
        if v is None or v.dtype.kind not in "iu" or v.size > 8:
            return []
        return [int(x) for x in v.reshape(-1) if 1 < int(x) < _MAX_TARGET]

    def search(start: str) -> None:
        todo, seen = [start], set()
        while todo and len(seen) < _SEARCH_NODES:
            node = producer.get(todo.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Add", "Sub", "Min", "Max", "Concat"):
                for x in node.input:
                    found.update(ints(x))
            if node.op_type == "Shape":
                continue
            todo += [x for x in node.input if x in producer]

    for n in g.node:
        if n.op_type == "Slice":
            for x in list(n.input)[1:3]:
                search(x)
        elif n.op_type == "Resize" and len(n.input) > 3 and n.input[3]:
            sizes = n.input[3]
            if sizes in consts:
                found.update(ints(sizes)[1:] if consts[sizes].size == 4 else ints(sizes))
            search(sizes)
    return sorted(found)


def plan_shapes(groups: Sequence[DimGroup], targets: Sequence[int]) -> list[ShapeCase]:
    """The extra shapes to check (see the module doc): ``[small, odd]``, each size != the base.

    Args:
        groups: from :func:`dynamic_groups`.
        targets: from :func:`size_targets`.

    Returns:
        ``[]`` when no input has a symbolic dim; else the ``small`` case and the ``odd`` case
        (:func:`run_shapes` runs ``odd`` only when it adds a size: see the module doc).
    """
    if not groups:
        return []
    small: dict[str, int] = {}
    odd: dict[str, int] = {}
    k = 0
    low = min(targets) if targets else None
    for g in groups:
        if g.is_batch:
            small[g.key] = 1 if g.base != 1 else 2
            odd[g.key] = 3 if g.base != 3 else 4
            continue
        if low is not None:
            s = max(1, min(low - 1, low // 2 + 1 + k))
        else:
            s = max(1, g.base // 2 + k)
        if s == g.base:
            s = s - 1 if s > 1 else s + 1
        small[g.key] = s
        odd[g.key] = g.base + 1 + 2 * k
        k += 1
    return [ShapeCase("small", small), ShapeCase("odd", odd)]


def samples_at(specs: Sequence[TensorSpec], base: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], *,
               seed: int, given: bool, sample_fn: Callable[[int, int], Mapping[str, np.ndarray]] | None = None,
               ) -> dict[str, np.ndarray]:
    """Sample inputs of the given shapes, drawn as the base samples were (see the module doc).

    Args:
        specs: the input specs (TF layout).
        base: the base samples (TF layout; their dtypes are kept).
        shapes: the wanted shape per input (TF layout).
        seed: the random seed (deterministic samples).
        given: the base samples are the user's (draw from their values) rather than export's
            own draw from the specs.
        sample_fn: the user's ``(batch, seed) -> {name: array}``, used for every input whose
            array it returns at the wanted shape.

    Returns:
        ``{input name: array}``, one per spec.
    """
    rng = np.random.default_rng(seed)
    from_fn: Mapping[str, np.ndarray] = {}
    if sample_fn is not None:
        batch = next(iter(shapes.values()))[0] if shapes else 1
        from_fn = {k: np.asarray(v) for k, v in sample_fn(int(batch), seed).items()}
    out = {}
    for i, s in enumerate(specs):
        shape = tuple(shapes[s.name])
        b = np.asarray(base[s.name])
        f = from_fn.get(s.name)
        if f is not None and f.shape == shape and f.dtype == b.dtype:
            out[s.name] = f
        elif is_padding_mask(s):
            out[s.name] = padding_mask_sample(dataclasses.replace(s, shape=shape), shape[0], seed + i).astype(b.dtype)
        elif not given:
            out[s.name] = samples_from_specs([dataclasses.replace(s, shape=shape)], batch=shape[0],
                                             seed=seed + i)[s.name].astype(b.dtype)
        elif b.dtype.kind == "f" and b.size:
            lo, hi = float(b.min()), float(b.max())
            out[s.name] = (rng.uniform(lo, hi, shape) if hi > lo else np.full(shape, lo)).astype(b.dtype)
        elif b.size:
            out[s.name] = rng.choice(b.reshape(-1), size=shape).astype(b.dtype)
        else:
            out[s.name] = np.zeros(shape, b.dtype)
    return out


@dataclasses.dataclass
class ShapeRun:
    """One extra shape that ran in TensorFlow: the inputs (TF layout), TF's outputs, the case."""

    case: ShapeCase
    shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]


def run_shapes(cases: Sequence[ShapeCase], groups: Sequence[DimGroup], specs: Sequence[TensorSpec],
               base: Mapping[str, np.ndarray], tf_run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
               tf_errors: tuple[type[BaseException], ...], *, given: bool,
               sample_fn: Callable[[int, int], Mapping[str, np.ndarray]] | None = None,
               runs_at: Callable[[Mapping[str, np.ndarray]], str] | None = None,
               ) -> tuple[list[ShapeRun], list[dict[str, Any]]]:
    """Draw the samples of each case and run TF on them; a size TF refuses is skipped and recorded.

    ``odd`` runs only when a group other than the batch exists or ``small`` was skipped.

    Args:
        cases: from :func:`plan_shapes`; groups: from :func:`dynamic_groups`.
        specs, base, given, sample_fn: as for :func:`samples_at`.
        tf_run: ``{input: array (TF layout)} -> {output: array}``: the exported TF function.
        tf_errors: the exceptions that mean "TF does not accept this size" (``tf.errors.OpError``,
            ``ValueError``, ``TypeError``).
        runs_at: ``feeds -> ""`` or why the graph cannot run at this size (the reference backend
            raised); such a size is skipped and recorded like one TF refuses.

    Returns:
        ``(runs, skipped)``: the cases TF ran, and ``{"label", "shapes", "reason"}`` per case it refused.
    """
    runs: list[ShapeRun] = []
    skipped: list[dict[str, Any]] = []
    only_batch = all(g.is_batch for g in groups)
    for i, case in enumerate(cases):
        if case.label == "odd" and only_batch and runs:
            continue
        shapes = case.shapes(groups, base)
        feeds = samples_at(specs, base, shapes, seed=100 + i, given=given, sample_fn=sample_fn)
        try:
            ref = tf_run(feeds)
        except tf_errors as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            skipped.append({"label": case.label, "shapes": {k: list(v) for k, v in shapes.items()},
                            "reason": f"TensorFlow refuses this size: {type(exc).__name__}: {first[:300]}"})
            continue
        why = runs_at(feeds) if runs_at is not None else ""
        if why:
            skipped.append({"label": case.label, "shapes": {k: list(v) for k, v in shapes.items()}, "reason": why})
            continue
        runs.append(ShapeRun(case, shapes, feeds, ref))
    return runs, skipped


def describe_case(run: ShapeRun, groups: Sequence[DimGroup]) -> str:
    """``"dim 'batch' = 1, dim 'image[1]' = 6 (input 'image' axis 1)..."``: what a case changed, for messages."""
    parts = []
    for g in groups:
        where = ", ".join(f"input {n!r} axis {a}" for n, a in g.members)
        parts.append(f"dim {g.key!r} = {run.case.sizes[g.key]} ({where}; base {g.base})")
    return "; ".join(parts)


__all__ = ["DimGroup", "ShapeCase", "ShapeRun", "dynamic_groups", "size_targets", "plan_shapes", "samples_at",
           "run_shapes", "describe_case"]
