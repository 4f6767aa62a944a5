"""Numerical parity between TensorFlow and the bridged graph (onnxruntime, converted torch).

One tolerance table, keyed by (stage, dtype), each entry with the reason it is as loose as it
is. Elementwise criterion (``numpy.isclose`` form): ``|got - ref| <= atol + rtol * |ref|``.
Integer and string outputs must match exactly. For each output the report gives the max
absolute error, the max relative error (``|got - ref| / max(|ref|, tiny)``) and the smallest
``atol`` that would pass at the entry's ``rtol`` (``required_atol``), so a failing check says
by how much it failed.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmbridge.errors import CacheError, MMBridgeError, ParityError
from mmbridge.specs import Tolerance

if TYPE_CHECKING:  # pragma: no cover
    from mmbridge.artifact import BridgeArtifact

from mmbridge.artifact import GOLDEN_FILE  # noqa: E402
from mmbridge.store import rebuild_hint, sha256_file  # noqa: E402


class MissingGoldenError(CacheError, FileNotFoundError):
    """An artifact has no ``golden.npz`` (or an unreadable one), so it cannot be re-checked on its own.

    A :class:`~mmbridge.errors.CacheError` (so ``mmbridge verify`` reports it as an error with an
    exit code, not a traceback) and a ``FileNotFoundError`` (what ``load_golden`` raised before).
    """

# (stage, dtype) -> Tolerance. Stages: "onnx" = TF vs onnxruntime on the exported graph;
# "torch" = TF (or ORT) vs the onnx2torch module in eval mode; "autocast" = fp32 reference vs the
# torch module under torch.autocast.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnx", "float32"): Tolerance(1e-5, 1e-4, "ORT (MLAS) and TF (Eigen/oneDNN) sum in different orders: ~1 ulp per "
                                   "accumulation, growing with depth; rtol covers outputs far from 1"),
    ("onnx", "float64"): Tolerance(1e-10, 1e-9, "reduction order only"),
    ("onnx", "float16"): Tolerance(1e-2, 1e-2, "fp16 has 11 significant bits (eps 9.8e-4)"),
    ("torch", "float32"): Tolerance(1e-5, 1e-4, "torch CPU kernels sum in another order than TF/ORT, as above"),
    ("torch", "float64"): Tolerance(1e-10, 1e-9, "reduction order only (export checks float64 graphs on torch too)"),
    ("torch", "float16"): Tolerance(1e-2, 1e-2, "fp16 has 11 significant bits (eps 9.8e-4)"),
    ("autocast", "bfloat16"): Tolerance(5e-2, 5e-2, "bf16 has 8 significant bits (eps 7.8e-3); errors add up per layer"),
    ("autocast", "float16"): Tolerance(1e-2, 1e-2, "fp16 has 11 significant bits (eps 9.8e-4)"),
}
# Where a known numeric difference makes a stage looser than the table, bridges state it with a
# reason, e.g. bilinear resize on 0-255 pixels: Tolerance(1e-3, 0, "TF computes the interpolation
# weights in another order than ORT's Resize; measured up to 4e-3 on 0-255 inputs").


ROUNDING_HINT_REL = 1e-5
"""A float32 parity failure whose ``max_abs`` is at most this fraction of the output's max ``|ref|`` gets a
hint in its :class:`ParityError` message (when it is also at most 10x the atol): float32 rounding
accumulated through a deep graph comes near that size (measured: NASNetLarge at 32 px, TF float32 vs TF
float64 1.4e-6 of the output's scale, ORT vs TF 1.7e-6, about 6x below it; ``tools/parity_by_layer.py``). The check itself does not change; the hint only points at the tool
and the documented way to widen ``atol``."""


def tolerance_for(stage: str, dtype: str) -> Tolerance:
    """Look up the table; integer, bool and string outputs get ``Tolerance(0, 0)`` (exact).

    Raises:
        KeyError: no entry for a floating dtype at that stage.
    """
    if not (dtype.startswith("float") or dtype == "bfloat16"):
        return Tolerance(0.0, 0.0, "integer / bool / string outputs must match exactly")
    try:
        return TOLERANCES[(stage, dtype)]
    except KeyError:
        raise KeyError(f"no parity tolerance for stage {stage!r}, dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


@dataclasses.dataclass(frozen=True)
class OutputParity:
    """Parity of one output of one backend against the reference.

    Attributes:
        backend: ``"ort"`` or ``"torch"`` (what was compared against the reference).
        output: output name.
        shape: reference shape.
        dtype: reference dtype.
        max_abs: max ``|got - ref|`` (0 for exact-match dtypes that match).
        max_rel: max ``|got - ref| / max(|ref|, 1e-12)``.
        required_atol: smallest atol that would pass at ``tolerance.rtol``.
        tolerance: the tolerance applied.
        passed: whether every element is within tolerance (and shapes/dtypes agree).
        problem: why it failed when it is not a number (shape or dtype mismatch), else "".
        ref_scale: max ``|ref|`` over the finite reference values of a floating output (``None``
            for other rows and for reports stored before it was recorded); the failure message
            states ``max_abs`` as a fraction of it (see :data:`ROUNDING_HINT_REL`).
    """

    backend: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    required_atol: float
    tolerance: Tolerance
    passed: bool
    problem: str = ""
    ref_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclasses.dataclass
class ParityReport:
    """Per output and backend parity; ``passed`` only if every row passed."""

    rows: list[OutputParity]
    reference: str = "tensorflow"
    #: train parity (``verify(train_steps=k)``): the ``TrainParityReport.to_dict()`` re-run with the
    #: Keras model (``"source": "rerun"``) or what export recorded (``"source": "recorded at export"``).
    train: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and (self.train is None or self.train.get("passed") is not False)

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "passed": self.passed, "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityReport:
        rows = []
        for r in d["rows"]:
            r = dict(r)
            r["tolerance"] = Tolerance(**r["tolerance"])
            r["shape"] = tuple(r["shape"])
            rows.append(OutputParity(**r))
        return cls(rows, d.get("reference", "tensorflow"))

    def __str__(self) -> str:
        lines = [f"parity vs {self.reference}: {'PASSED' if self.passed else 'FAILED'}"]
        lines.append(f"  {'backend':7} {'output':24} {'shape':18} {'dtype':8} {'max_abs':>9} {'max_rel':>9} "
                     f"{'need_atol':>9} {'atol':>8} {'rtol':>8}  ok")
        for r in self.rows:
            lines.append(
                f"  {r.backend:7} {r.output[:24]:24} {str(list(r.shape))[:18]:18} {r.dtype:8} {r.max_abs:9.2e} "
                f"{r.max_rel:9.2e} {r.required_atol:9.2e} {r.tolerance.atol:8.1e} {r.tolerance.rtol:8.1e}  "
                f"{'yes' if r.passed else 'NO ' + r.problem}"
            )
        if self.train is not None:
            lines.append(train_parity_summary(self.train))
        return "\n".join(lines)

    def raise_if_failed(self, what: str = "bridge") -> ParityReport:
        """Raise :class:`ParityError` (carrying this report) unless every row passed."""
        if self.train is not None and self.train.get("passed") is False and all(r.passed for r in self.rows):
            raise ParityError(f"{what}: training parity failed ({self.train.get('source')}): "
                              f"{self.train.get('first_failure')}\n{self}", report=self)
        if not self.passed:
            bad = [r for r in self.rows if not r.passed]
            worst = ", ".join(
                f"{r.backend}:{r.output} max_abs={r.max_abs:.3g} (needs atol {r.required_atol:.3g} at rtol {r.tolerance.rtol:g})"
                + (f" = {r.max_abs / r.ref_scale:.2g} of the output's max |ref| {r.ref_scale:.3g}" if r.ref_scale else "")
                if not r.problem else f"{r.backend}:{r.output} {r.problem}"
                for r in bad
            )
            # tiny against the output's max |ref| and within 10x atol: one huge reference value (a -1e9 mask
            # fill) must not make a large error on the ordinary elements look like rounding
            small = [r for r in bad if not r.problem and r.dtype == "float32" and r.ref_scale
                     and r.max_abs / r.ref_scale <= ROUNDING_HINT_REL and r.max_abs <= 10 * r.tolerance.atol]
            hint = (f" An error of at most {ROUNDING_HINT_REL:g} of the output's scale is within what float32 rounding "
                    "can reach through a deep graph (TF's own float32 result can differ that much from float64), but a "
                    "conversion edge can be that small too: tools/parity_by_layer.py compares TF and onnxruntime "
                    "against float64 layer by layer, and docs/known-limits.md "
                    "(\"Deep random nets: float32 rounding above the default atol\") says when and how to widen atol."
                    if small and len(small) == len(bad) else "")
            raise ParityError(
                f"{what} does not compute what TensorFlow computes: {worst}.{hint} If the difference is expected "
                f"(documented numerics), pass tolerance=mmbridge.Tolerance(atol, rtol, reason=...).\n{self}",
                report=self,
            )
        return self


def compare(
    got: Mapping[str, np.ndarray],
    ref: Mapping[str, np.ndarray],
    *,
    backend: str,
    stage: str,
    tolerance: Tolerance | None = None,
) -> list[OutputParity]:
    """Compare named outputs elementwise; see the module doc for the criterion.

    Args:
        got: backend outputs by name (numpy arrays or anything ``np.asarray`` takes).
        ref: reference outputs by name. A reference name missing from ``got`` and a ``got`` name
            missing from the reference each give a failing row (nothing is truncated away).
        backend: label for the rows.
        stage: tolerance-table stage (``"onnx"``, ``"torch"``, ``"autocast"``).
        tolerance: override for floating outputs (integers stay exact).
    """
    rows = []
    for name in got:  # nothing is truncated away: an output the reference lacks is a failure too
        if name not in ref:
            g = np.asarray(got[name])
            rows.append(OutputParity(backend, name, g.shape, _dtype(g), np.inf, np.inf, np.inf, Tolerance(0.0, 0.0),
                                     False, f"the backend returns output {name!r} that the reference lacks "
                                     f"(reference outputs {sorted(ref)})"))
    for name, r in ref.items():
        r = np.asarray(r)
        dtype = _dtype(r)
        tol = tolerance if (tolerance is not None and dtype.startswith("float")) else tolerance_for(stage, dtype)
        if name not in got:
            rows.append(OutputParity(backend, name, r.shape, dtype, np.inf, np.inf, np.inf, tol, False, "missing output"))
            continue
        g = np.asarray(got[name])
        if g.shape != r.shape:
            rows.append(OutputParity(backend, name, r.shape, dtype, np.inf, np.inf, np.inf, tol, False,
                                     f"shape {list(g.shape)} != reference {list(r.shape)}"))
            continue
        if dtype == "string" or r.dtype == bool:
            eq = np.asarray(g.astype(r.dtype) == r) if dtype != "string" else np.asarray(
                np.vectorize(_s)(g) == np.vectorize(_s)(r))
            n_bad = int((~eq).sum())
            rows.append(OutputParity(backend, name, r.shape, dtype, float(n_bad > 0), float(n_bad > 0), 0.0, tol,
                                     n_bad == 0, f"{n_bad} elements differ" if n_bad else ""))
            continue
        if not dtype.startswith("float") and _dtype(g) != dtype:
            # integer outputs: values must match exactly, and so must the dtype
            rows.append(OutputParity(backend, name, r.shape, dtype, np.inf, np.inf, np.inf, tol, False,
                                     f"dtype {_dtype(g)} != reference {dtype}"))
            continue
        gf, rf = g.astype(np.float64), r.astype(np.float64)
        if r.size == 0:
            rows.append(OutputParity(backend, name, r.shape, dtype, 0.0, 0.0, 0.0, tol, True))
            continue
        nonfinite = ~np.isfinite(rf) | ~np.isfinite(gf)
        same_nonfinite = np.array_equal(np.isnan(rf), np.isnan(gf)) and np.array_equal(
            np.where(np.isinf(rf), rf, 0), np.where(np.isinf(gf), gf, 0))
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf: masked out by nonfinite
            diff = np.where(nonfinite, 0.0, np.abs(gf - rf))
        max_abs = float(diff.max())
        max_rel = float((diff / np.maximum(np.abs(rf), 1e-12)).max())
        required = float(np.max(np.maximum(diff - tol.rtol * np.abs(np.where(nonfinite, 0, rf)), 0.0)))
        ok = same_nonfinite and required <= tol.atol
        # floating outputs only: a fraction of an integer output's max (class ids, counts) means nothing
        scale = (float(np.abs(np.where(nonfinite, 0.0, rf)).max())
                 if str(dtype).startswith("float") or dtype == "bfloat16" else None)
        rows.append(OutputParity(backend, name, r.shape, dtype, max_abs, max_rel, required, tol, bool(ok),
                                 "" if same_nonfinite else "NaN/Inf positions differ", scale))
    return rows


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _dtype(a: np.ndarray) -> str:
    if a.dtype == object or a.dtype.kind in "SU":
        return "string"
    return a.dtype.name


def run_ort(model_or_path: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX model (``ModelProto``, bytes or path) on CPU with plain ``session.run``."""
    from mmbridge.runtime.session import make_session

    sess = make_session(model_or_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feed)))


def verify(
    artifact: BridgeArtifact,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    reference: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | Mapping[str, np.ndarray] | None = None,
    backends: Sequence[str] = ("ort",),
    tolerance: Tolerance | None = None,
    raise_on_failure: bool = True,
    train_steps: int | None = None,
    source: Any = None,
) -> ParityReport:
    """Check that a bridge computes what TensorFlow computes.

    Args:
        artifact: the exported bridge.
        inputs: input arrays by name (layouts and dtypes as in ``artifact.input_specs``);
            default: the sample inputs stored at export (``golden.npz``).
        reference: TF outputs by name, or a callable ``inputs -> outputs`` (e.g. the Keras
            model); default: the TF outputs stored at export for the stored inputs. Needed when
            ``inputs`` are given.
        backends: which to check: ``"ort"`` (onnxruntime CPU, plain ``session.run``),
            ``"ort_module"`` (the IO-binding module of :func:`~mmbridge.to_ort`, CPU) and/or
            ``"torch"`` (the onnx2torch module in eval mode, on CPU).
        tolerance: the caller's tolerance for floating outputs (for example a stricter one, or a
            documented looser one stated in code); default: the tolerance of the bridge
            registered under the artifact's name in this process, if any (code, as at export),
            else the table (:data:`TOLERANCES`, per stage and dtype). The tolerance recorded in
            the artifact's ``meta.json`` is never used: that file travels with the artifact and a
            loosened one would let wrong weights pass (a failing report names it, so the caller
            can decide to pass it explicitly).
        raise_on_failure: raise :class:`ParityError` instead of returning a failing report.
        train_steps: also report train parity (``ParityReport.train``): with ``source`` (the Keras
            model that was exported, unchanged afterwards) it is re-run for ``train_steps`` SGD steps
            on the Keras model and ``to_torch(trainable=True)``; without it, what export recorded
            is reported, labelled ``"recorded at export, not re-run"``. A failed train parity
            fails the report.
        source: the Keras model, for ``train_steps``.

    Returns:
        A :class:`ParityReport` with one row per (backend, output).

    Raises:
        ParityError: a row failed and ``raise_on_failure``.
        ValueError: ``inputs`` given without ``reference``, or an unknown backend.
        ValueError: also for an artifact exported with ``training=True`` (random outputs: use
            :func:`mmbridge.export.augment.verify_training`).
        MissingGoldenError: neither ``inputs`` given nor a readable ``golden.npz`` (a
            :class:`~mmbridge.errors.CacheError`; the message says how to re-export).
    """
    if (getattr(artifact, "meta", None) or {}).get("training"):
        raise ValueError(
            f"verify(): bridge {artifact.name!r} was exported with training=True: its outputs are random, so an "
            f"elementwise comparison cannot hold. The distribution check ran at export (meta['distribution']); "
            f"re-run it with mmbridge.export.augment.verify_training(artifact, source=<the Keras layer or model>)")
    if inputs is None:
        golden = load_golden(artifact)
        inputs, ref = golden["inputs"], golden["outputs"]
        if reference is not None:
            raise ValueError("verify(): `reference` was given without `inputs`; pass both, or neither to use the stored golden pair")
    else:
        if reference is None:
            raise ValueError(
                "verify(): `inputs` were given without `reference`; pass the TF outputs (or the TF callable) "
                "as reference=, or omit both to check the golden pair stored at export"
            )
        ref = dict(reference(inputs)) if callable(reference) else dict(reference)
    ref = {k: np.asarray(v) for k, v in ref.items()}
    if tolerance is None:
        tolerance = _registered_tolerance(artifact.name)
    rows: list[OutputParity] = []
    for backend in backends:
        if backend == "ort":
            got = run_ort(artifact.onnx_path, inputs)
            rows += compare(got, ref, backend="ort", stage="onnx", tolerance=tolerance)
        elif backend == "ort_module":  # the IO-binding nn.Module, so the binding code is checked too
            import torch

            module = artifact.to_ort()
            outs = module(*[torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in artifact.input_specs])
            try:
                got = module_outputs(outs, artifact.output_names, what="the to_ort() module")
            except OutputStructureError as exc:
                rows += structure_rows(ref, str(exc), backend="ort_module", stage="onnx", tolerance=tolerance)
                continue
            rows += compare(got, ref, backend="ort_module", stage="onnx", tolerance=tolerance)
        elif backend == "torch":
            try:
                got = run_torch(artifact, inputs)
            except OutputStructureError as exc:
                rows += structure_rows(ref, str(exc), backend="torch", stage="torch", tolerance=tolerance)
                continue
            rows += compare(got, ref, backend="torch", stage="torch", tolerance=tolerance)
        else:
            raise ValueError(f"verify(): unknown backend {backend!r}; use 'ort', 'ort_module' and/or 'torch'")
    report = ParityReport(rows)
    if train_steps:
        report.train = _train_record(artifact, int(train_steps), source)
    if raise_on_failure and not report.passed:
        try:
            report.raise_if_failed(f"bridge {artifact.name!r}")
        except ParityError as exc:
            note = _recorded_tolerance_note(artifact, tolerance)
            if not note:
                raise
            raise ParityError(f"{exc}\n{note}", report=report) from None
    return report


#: The function :func:`verify` re-runs train parity with (``(artifact, source, steps) -> dict``); set by
#: :mod:`mmbridge.export.contract` when it is imported (it needs TensorFlow, a layer above this one).
TRAIN_PARITY_RUNNER: list[Callable[..., dict[str, Any]]] = []


def train_parity_summary(train: Mapping[str, Any]) -> str:
    """One or two lines on a train-parity record (re-run or recorded at export)."""
    src = train.get("source", "recorded at export")
    if train.get("skipped"):
        return f"train parity ({src}): not run: {train['skipped']}"
    if train.get("passed") is None:
        return f"train parity ({src}): none recorded"
    ratio = train.get("worst_ratio")
    margin = f", worst variable at {ratio:.2g} of its tolerance" if isinstance(ratio, (int, float)) else ""
    head = (f"train parity ({src}): {'PASSED' if train['passed'] else 'FAILED'} after {train.get('steps')} SGD steps "
            f"(lr {train.get('lr')}, batch {train.get('batch', '?')}), {len(train.get('rows', []))} Keras variables{margin}")
    return head if train["passed"] else f"{head}\n  first failure: {train.get('first_failure')}"


def _train_record(artifact: BridgeArtifact, steps: int, source: Any) -> dict[str, Any]:
    """What ``verify(train_steps=steps, source=...)`` reports under ``ParityReport.train``."""
    if source is not None:
        if not TRAIN_PARITY_RUNNER:
            # The runner lives in the export stage (TensorFlow), a layer above this one, and registers
            # itself when mmbridge.export.contract loads. A caller holding a Keras model has TF loaded
            # already, so loading the export stage by name here is safe (and is not a static import).
            import importlib

            importlib.import_module("mmbridge.export.contract")
        if not TRAIN_PARITY_RUNNER:
            raise ValueError("verify(source=...): re-running train parity needs mmbridge.export (TensorFlow); "
                             "import mmbridge.export.contract first, or omit source= to report what export recorded")
        return dict(TRAIN_PARITY_RUNNER[0](artifact, source, steps), source="rerun with the Keras model")
    recorded = artifact.meta.get("train_parity")
    if recorded is None:
        why = ("an inference export (trainable=False): nothing to train" if not artifact.meta.get("trainable")
               else "not a Keras export, or exported before train parity was recorded")
        return {"passed": None, "skipped": why, "source": "recorded at export"}
    return dict(recorded, source="recorded at export, not re-run (pass source=<the Keras model> to re-run)")


def _registered_tolerance(name: str) -> Tolerance | None:
    """The tolerance of a bridge registered under ``name`` in this process (code, not the artifact's
    files), as export used it; None when no such bridge is registered (no plugins are loaded here)."""
    from mmbridge.registry import bridges

    return bridges.get(name).tolerance if name in bridges else None


def _recorded_tolerance_note(artifact: BridgeArtifact, tolerance: Tolerance | None) -> str:
    """For a failing report: the tolerance meta.json records, which verify() did not use."""
    recorded = artifact.meta.get("tolerance")
    if tolerance is not None or not recorded:
        return ""
    return (f"Checked against the tolerance table: {artifact.path / 'meta.json'} records tolerance {recorded}, "
            f"which is not trusted from the file (it could hide wrong weights); pass it as tolerance= if it is "
            f"the bridge's documented numerics.")


class OutputStructureError(MMBridgeError, ValueError):
    """A backend module returned another structure than the graph's outputs: more or fewer
    tensors, a tuple where one tensor is expected, or something that is not a tensor."""


def module_outputs(out: Any, names: Sequence[str], *, what: str = "the torch module") -> dict[str, np.ndarray]:
    """Map what a backend module returned onto the graph's output names, strictly.

    Args:
        out: the module's return value: one tensor for a one-output graph; a tuple / list of
            exactly ``len(names)`` tensors in graph order, or a mapping with exactly ``names`` as
            keys, for several outputs (torch tensors or numpy arrays).
        names: the graph's output names, in order (``artifact.output_names``).
        what: the module, for the message.

    Returns:
        ``{name: numpy array}`` (detached, on CPU), one per name.

    Raises:
        OutputStructureError: more or fewer outputs than ``names``, a tuple where one tensor is
            expected (onnx2torch returns every output of a multi-output node such as TopK or
            Split when the graph uses only the first), or an element that is not a tensor. The
            message says what came back; nothing is truncated.
    """
    names = list(names)

    def arr(name: str, v: Any) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v
        if hasattr(v, "detach") and hasattr(v, "cpu"):
            return v.detach().cpu().numpy()
        raise OutputStructureError(f"{what} returned a {type(v).__name__} for output {name!r} where a tensor is "
                                   f"expected (graph outputs {names})")

    def describe(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return f"a {type(v).__name__} of {len(v)} ({', '.join(describe(x) for x in v)})"
        shape = getattr(v, "shape", None)
        return f"tensor {list(shape)}" if shape is not None else type(v).__name__

    if isinstance(out, Mapping):
        if set(out) != set(names):
            raise OutputStructureError(f"{what} returned outputs {sorted(out)} but the graph's outputs are {names}")
        return {n: arr(n, out[n]) for n in names}
    if len(names) == 1:
        if isinstance(out, (tuple, list)):
            raise OutputStructureError(f"{what} returned {describe(out)} where the graph has one output {names[0]!r} "
                                       f"(one tensor expected); a node with several outputs of which the graph uses "
                                       f"one was converted to return them all")
        return {names[0]: arr(names[0], out)}
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise OutputStructureError(f"{what} returned {describe(out)} but the graph has {len(names)} outputs {names}")
    return {n: arr(n, o) for n, o in zip(names, out)}


def structure_rows(ref: Mapping[str, np.ndarray], problem: str, *, backend: str, stage: str,
                   tolerance: Tolerance | None = None) -> list[OutputParity]:
    """One failing :class:`OutputParity` per reference output, for a backend whose outputs could
    not be matched to the graph's at all (``problem``: why, e.g. an :class:`OutputStructureError`)."""
    rows = []
    for name, r in ref.items():
        r = np.asarray(r)
        dtype = _dtype(r)
        try:
            tol = tolerance if (tolerance is not None and dtype.startswith("float")) else tolerance_for(stage, dtype)
        except KeyError:  # a dtype the table has no entry for: the row fails anyway
            tol = Tolerance(0.0, 0.0, f"no table entry for ({stage}, {dtype})")
        rows.append(OutputParity(backend, name, r.shape, dtype, np.inf, np.inf, np.inf, tol, False, problem))
    return rows


def run_torch(artifact: BridgeArtifact, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the artifact's onnx2torch module (eval mode, CPU, no grad) on numpy inputs.

    The module is converted with ``allow_unverified=True``: this is the check itself, so it also
    runs on an artifact whose export found the torch backend wrong (``meta["backends"]``).

    Returns:
        ``{output name: array}``, one per graph output (:func:`module_outputs`).

    Raises:
        OutputStructureError: the module returns more or fewer outputs than the graph, or a tuple
            where one tensor is expected.
    """
    import torch

    module = artifact.to_torch(trainable=False, allow_unverified=True).eval()  # forward only: frozen works for every artifact
    args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in artifact.input_specs]
    with torch.no_grad():
        out = module(*args)
    return module_outputs(out, artifact.output_names, what=f"to_torch() of bridge {artifact.name!r}")


def load_golden(artifact: BridgeArtifact) -> dict[str, dict[str, np.ndarray]]:
    """The sample inputs and TF outputs stored at export: ``{"inputs": {...}, "outputs": {...}}``.

    Raises:
        MissingGoldenError: the artifact has no ``golden.npz`` (exported with ``verify=False``), or
            it is unreadable, does not match the sha256 recorded in ``meta.json``, or lacks an
            input of the graph or any output. The message names the file and the fix (re-export
            with ``force=True`` / ``--force``, or pass ``inputs=`` and ``reference=``).
    """
    path = artifact.path / GOLDEN_FILE
    fix = f"re-export the artifact to store it ({rebuild_hint(artifact.path)}), or pass inputs= and reference= to verify()"
    if not path.is_file():
        raise MissingGoldenError(f"{path} is missing: this artifact was exported without parity data; {fix}")
    want = artifact.meta.get("golden_sha256")
    if want is not None and sha256_file(path) != want:
        raise MissingGoldenError(f"{path} does not match the sha256 recorded in meta.json (corrupt or altered); {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            inputs = {k[len("in/"):]: z[k] for k in z.files if k.startswith("in/")}
            outputs = {k[len("out/"):]: z[k] for k in z.files if k.startswith("out/")}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise MissingGoldenError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {fix}") from exc
    lacking = [s.name for s in artifact.input_specs if s.name not in inputs]
    if lacking or not outputs:
        what = f"the input(s) {lacking}" if lacking else "any output"
        raise MissingGoldenError(f"{path} lacks {what} (it holds inputs {sorted(inputs)}, outputs {sorted(outputs)}); {fix}")
    return {"inputs": inputs, "outputs": outputs}
