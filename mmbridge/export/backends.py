"""Both backends checked at export, at every shape: what ``meta["backends"]`` and ``meta["parity_shapes"]`` record.

Export used to run onnxruntime on one sample shape and claim ``torch_backend: true`` from the op
types alone; 33 artifacts claimed it that ``to_torch`` refused, and 20 that were wrong on torch
(issue 18). Now :func:`check_backends`, called by :func:`mmbridge.export.exporter._build`:

1. converts the graph once with :func:`mmbridge.convert.to_torch` (frozen, or trainable for a
   ``trainable=True`` export, whose module the training contract then reuses);
2. runs onnxruntime and the torch module on the base samples and at the extra shapes of
   :mod:`mmbridge.export.shapes`, and compares each with TensorFlow
   (:func:`mmbridge.parity.compare`: every output, nothing truncated; stages ``"onnx"`` and ``"torch"``
   of the tolerance table, or the export's tolerance for floating outputs);
3. refuses the export (:class:`~mmbridge.errors.ParityError`, nothing cached) on an onnxruntime
   mismatch at any shape (or a crash at the sample shape), naming the input, the dim, the size,
   the output and the error. An extra size that TF runs and onnxruntime refuses with an error
   (loud, not silently wrong: TF's own CPU kernels return a 5x5 valid convolution of a 4x5
   image without complaint) is skipped and recorded with the reason, like a size TF refuses;
4. records per backend ``{"converts", "matches", "reason", "max_abs", "shapes"}``. A torch mismatch
   does not refuse the export (onnxruntime is the reference backend): ``meta["backend"]["torch_backend"]``
   is then false and :func:`mmbridge.to_torch` on the artifact raises with the recorded reason
   (:func:`mmbridge.convert.contract.check_torch_verified`) unless ``allow_unverified=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmbridge.errors import ParityError
from mmbridge.export.shapes import (
    DimGroup,
    ShapeRun,
    describe_case,
    dynamic_groups,
    plan_shapes,
    run_shapes,
    size_targets,
)
from mmbridge.parity import (
    OutputParity,
    OutputStructureError,
    ParityReport,
    compare,
    module_outputs,
    structure_rows,
)
from mmbridge.specs import TensorSpec, Tolerance

logger = logging.getLogger("mmbridge.export")

Feeds = Mapping[str, np.ndarray]
Runner = Callable[[Feeds], dict[str, np.ndarray]]


def convert_torch(model: Any, *, trainable: bool, requirements: Mapping[str, Any]) -> tuple[Any | None, str]:
    """Convert the exported graph with :func:`mmbridge.convert.to_torch` once.

    Args:
        model: the final ``onnx.ModelProto``.
        trainable: convert trainable (a ``trainable=True`` export) or frozen.
        requirements: :func:`mmbridge.graph.passes.backend_requirements` of ``model`` (string
            graphs never convert: torch has no string tensors).

    Returns:
        ``(module, "")``, or ``(None, reason)`` when it does not convert.
    """
    if not requirements.get("torch_backend", True):
        return None, requirements.get("note") or "the graph needs the onnxruntime backend"
    from mmbridge.convert.core import to_torch

    try:
        return to_torch(model, trainable=trainable), ""
    except Exception as exc:  # noqa: BLE001 - any conversion failure is recorded, not raised (ORT is the reference)
        return None, f"to_torch fails: {type(exc).__name__}: {str(exc)[:2000]}"


def module_runner(module: Any, input_names: Sequence[str], output_names: Sequence[str]) -> Runner:
    """``feeds -> {output: array}`` for a converted torch module (eval mode, CPU, no grad).

    Args:
        module: from :func:`convert_torch`.
        input_names: the graph inputs in call order; feeds are in the ONNX layout (NCHW for
            ``inputs_as_nchw`` inputs), of the specs' dtypes.
        output_names: the graph outputs in order.

    Raises:
        OutputStructureError: the module returns another number or nesting of outputs than the graph.
    """
    import torch

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.array(feeds[n], copy=True)) for n in input_names]
        with torch.no_grad():
            out = module(*args)
        return module_outputs(out, output_names, what="the to_torch() module")

    return run


@dataclasses.dataclass
class BackendCheck:
    """What one backend did at every shape checked (filled by :func:`check_backends`)."""

    name: str
    stage: str
    converts: bool
    reason: str = ""
    rows: list[tuple[str, OutputParity]] = dataclasses.field(default_factory=list)
    failure: str = ""
    shapes: int = 0

    @property
    def matches(self) -> bool | None:
        if not self.converts:
            return None
        return not self.failure and all(r.passed for _, r in self.rows)

    def record(self) -> dict[str, Any]:
        """The JSON entry of ``meta["backends"][name]``."""
        finite = [r.max_abs for _, r in self.rows if np.isfinite(r.max_abs)]
        return {"converts": self.converts, "matches": self.matches, "reason": self.reason or self.failure,
                "max_abs": max(finite) if finite else None, "shapes": self.shapes}


def _run(check: BackendCheck, runner: Runner, feeds: Feeds, ref: Mapping[str, np.ndarray], label: str,
         tolerance: Tolerance | None) -> list[OutputParity]:
    """Run one backend at one shape and add its rows; a crash becomes failing rows with the error."""
    try:
        rows = compare(runner(feeds), ref, backend=check.name, stage=check.stage, tolerance=tolerance)
    except OutputStructureError as exc:
        rows = structure_rows(ref, str(exc), backend=check.name, stage=check.stage, tolerance=tolerance)
    except Exception as exc:  # noqa: BLE001 - onnxruntime / torch raise their own error types
        rows = structure_rows(ref, f"fails to run: {type(exc).__name__}: {str(exc)[-300:]}", backend=check.name,
                              stage=check.stage, tolerance=tolerance)
    check.rows += [(label, r) for r in rows]
    check.shapes += 1
    bad = [r for r in rows if not r.passed]
    if bad and not check.failure:
        r = bad[0]
        what = r.problem or f"max_abs {r.max_abs:.3g} (needs atol {r.required_atol:.3g} at rtol {r.tolerance.rtol:g})"
        check.failure = f"at {label}: output {r.output!r}: {what}"
    return rows


def _label(run: ShapeRun | None, groups: Sequence[DimGroup], base_shapes: Mapping[str, Sequence[int]]) -> str:
    if run is None:
        return "the sample shape " + ", ".join(f"{k} {list(v)}" for k, v in base_shapes.items())
    return f"shape {run.case.label!r} (" + describe_case(run, groups) + ")"


def check_backends(name: str, model: Any, specs: Sequence[TensorSpec], samples: Mapping[str, np.ndarray], *,
                   given: bool, sample_fn: Callable[[int, int], Feeds] | None,
                   tf_run: Callable[[Feeds], dict[str, np.ndarray]], tf_errors: tuple[type[BaseException], ...],
                   to_onnx: Callable[[Feeds], dict[str, np.ndarray]], ref: Mapping[str, np.ndarray],
                   runners: Mapping[str, Runner | None], conversion_errors: Mapping[str, str],
                   tolerance: Tolerance | None, verify: bool,
                   base_outputs: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Run every backend at the base samples and the extra shapes, compare with TF, record it all.

    Args:
        name: the bridge name, for messages.
        model: the final ``onnx.ModelProto`` (its crop / resize sizes choose the small shape).
        specs: the input specs (TF layout); samples: the base samples (TF layout).
        given: ``samples`` are the user's; sample_fn: the user's ``(batch, seed)`` callable, if any.
        tf_run: ``{input: array (TF layout)} -> {output: array}``; tf_errors: what it raises when
            TF refuses a size (skipped, recorded).
        to_onnx: TF-layout feeds -> the graph's layout (NCHW for ``inputs_as_nchw``).
        ref: TF's outputs on ``samples``.
        runners: ``{"ort": runner, "torch": runner or None}`` (None: did not convert).
        conversion_errors: ``{backend: reason}`` for a runner that is None.
        tolerance: the export's tolerance for floating outputs (None: the table).
        verify: False skips the extra shapes and records the torch backend as unchecked.
        base_outputs: ``{backend: outputs}`` already computed on ``samples`` (export's own ORT
            parity run), compared instead of running that backend again.

    Returns:
        ``{"parity_shapes": {...}, "backends": {backend: record}, "torch_verified": bool,
        "seconds": float}``; ``parity_shapes`` lists ``groups`` (each dim group: members, sizes
        checked), ``targets`` (crop / resize sizes found), ``checked`` (the shapes each backend
        ran), ``skipped`` (sizes TF refused, with the reason) and ``note`` (e.g. no second size ran).

    Raises:
        ParityError: ``verify`` and onnxruntime differs from TF (or fails to run) at some shape;
            the message names the dims and sizes, the output and the error; the report holds the rows.
    """
    t0 = time.perf_counter()
    base_shapes = {s.name: list(np.shape(samples[s.name])) for s in specs}
    groups = dynamic_groups(specs, samples)
    targets = size_targets(model)
    ort_runner = runners.get("ort")
    ort_seen: dict[int, dict[str, np.ndarray]] = {}

    def ort_runs_at(feeds: Feeds) -> str:
        """A size onnxruntime refuses with an error (loud, never silently wrong) is skipped, with the reason."""
        if ort_runner is None:
            return ""
        try:
            ort_seen[id(feeds)] = ort_runner(to_onnx(feeds))  # compared below: onnxruntime runs once per size
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
            why = f"onnxruntime cannot run this size (TensorFlow ran it): {type(exc).__name__}: {str(exc)[-300:]}"
            logger.warning("export %s: %s; inputs %s", name, why, {k: list(np.shape(v)) for k, v in feeds.items()})
            return why
        return ""

    if verify:
        runs, skipped = run_shapes(plan_shapes(groups, targets), groups, specs, samples, tf_run, tf_errors,
                                   given=given, sample_fn=sample_fn, runs_at=ort_runs_at)
    else:
        runs, skipped = [], []
    checks: dict[str, BackendCheck] = {}
    for backend, runner in runners.items():
        stage = "onnx" if backend.startswith("ort") else backend
        check = BackendCheck(backend, stage, runner is not None, conversion_errors.get(backend, ""))
        checks[backend] = check
        if runner is None or (backend != "ort" and not verify):
            continue
        known = (base_outputs or {}).get(backend)
        _run(check, (lambda _f, out=known: dict(out)) if known is not None else runner, to_onnx(samples), ref,
             _label(None, groups, base_shapes), tolerance)
        for run in runs:
            seen = ort_seen.get(id(run.inputs)) if backend == "ort" else None
            _run(check, (lambda _f, out=seen: out) if seen is not None else runner, to_onnx(run.inputs), run.reference,
                 _label(run, groups, base_shapes), tolerance)
    ort = checks.get("ort")
    if verify and ort is not None and ort.matches is False:
        raise ParityError(
            f"exported bridge {name!r} does not compute what TensorFlow computes on onnxruntime {ort.failure}. "
            f"A graph that matches at one shape and not at another mishandles a dynamic dim (a crop offset, a "
            f"rounding of a size); the export is refused and nothing is cached. What to do: fix that dim in "
            f"input_specs (a static size), or report it with `mmbridge info`; a tolerance does not fix a shape.\n"
            f"{ParityReport([r for _, r in ort.rows if not r.passed])}",
            report=ParityReport([r for _, r in ort.rows]))
    checked = [{"label": "sample", "shapes": base_shapes}] + [
        {"label": r.case.label, "shapes": {k: list(v) for k, v in r.shapes.items()}} for r in runs]
    sizes = {g.key: sorted({g.base} | {int(r.case.sizes[g.key]) for r in runs}) for g in groups}
    note = ""
    if not verify:
        note = "not checked: exported with verify=False"
    elif groups and not runs:
        note = ("no second size ran: TensorFlow refused every extra size (see skipped), so the symbolic dims "
                "were checked at the sample shape only")
    elif groups and any(len(v) < 2 for v in sizes.values()):
        note = f"dims checked at one size only: {[k for k, v in sizes.items() if len(v) < 2]}"
    records = {}
    for backend, check in checks.items():
        rec = check.record()
        if backend != "ort" and not verify:
            rec.update(converts=check.converts if check.converts else None, matches=None,
                       reason="not checked: exported with verify=False")
        records[backend] = rec
    torch_rec = records.get("torch", {})
    return {
        "parity_shapes": {"groups": [{"dim": g.key, "members": [list(m) for m in g.members], "sizes": sizes[g.key]}
                                     for g in groups],
                          "targets": targets, "checked": checked, "skipped": skipped, "note": note},
        "backends": records,
        "torch_verified": bool(torch_rec.get("converts") and torch_rec.get("matches")),
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["convert_torch", "module_runner", "check_backends", "BackendCheck"]
