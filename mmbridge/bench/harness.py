"""The timing harness: warm-up, interleaved repetitions, median and IQR, ratios, peak memory.

Method (the same for every suite):

1. **Warm-up.** Each variant is called ``warmup`` times (at least once: tracing, first-call
   setup), then (unless the warm-up call took over 1 s) once more to calibrate ``number``, the calls per repetition, so that one
   repetition lasts at least ``min_rep_s`` (the ``timeit.Timer.autorange`` idea). A variant that raises here is recorded
   as ``status="error"`` with the exception and left out; the others still run.
2. **Interleaved repetitions.** ``repeats`` rounds; in each round every variant runs one
   repetition, in an order rotated by one each round (no variant always runs first). A
   repetition is ``number`` back-to-back calls timed with ``time.perf_counter`` (garbage
   collection off, as ``timeit`` does; ``torch.cuda.synchronize`` before and after on CUDA).
   The time of one call is the repetition time divided by ``number``.
3. **Statistics.** Per variant: the median and the interquartile range (25th..75th percentile,
   ``numpy.percentile``, linear) of the per-call times in ms, and throughput in items/s
   (``items_per_call / median``). The **ratio** of a variant is the median over rounds of the
   *paired* per-round ratio ``t(variant) / t(baseline)`` (below 1: faster than the baseline) and
   its spread the IQR of those paired ratios: two variants timed back to back share the load
   of that moment, so a burst from another process mostly cancels out. ``extra.ratio_of_medians``
   (``median(variant) / median(baseline)``) is kept for comparison.
4. **Peak memory**, in one extra untimed call per variant, in MiB:
   ``peak_rss_mib``: the largest resident-set growth during the call over the RSS just before
   it, sampled every 1 ms from ``/proc/self/statm`` by a thread (Linux; ``None`` elsewhere) —
   it covers torch, onnxruntime and TF allocations but only memory not already held by their
   allocators; ``peak_py_mib``: ``tracemalloc``'s peak of Python and numpy allocations;
   ``peak_cuda_mib`` on CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before
   the call (torch's caching allocator only, not onnxruntime's arena).
   The process high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is recorded in
   :func:`environment`.

Budget: a variant whose calls are slow gets fewer repetitions (at least ``min_repeats``) so
that one case stays within ``max_case_s`` seconds.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


@dataclasses.dataclass
class HarnessConfig:
    """How to time one case.

    Args:
        warmup: untimed calls per variant before timing (at least 1; the last calibrates ``number``).
        repeats: interleaved rounds (one repetition of each variant per round).
        min_rep_s: minimum duration of one repetition, in s; sets calls per repetition.
        max_number: cap on calls per repetition.
        min_repeats: fewest rounds kept when ``max_case_s`` would be exceeded.
        max_case_s: time budget of one case's timed rounds, in s (soft).
        device: ``"cpu"`` or ``"cuda"``; on CUDA every repetition is bracketed by synchronize.
        memory: measure peak memory (one extra untimed call per variant).
    """

    warmup: int = 2
    repeats: int = 7
    min_rep_s: float = 0.05
    max_number: int = 1000
    min_repeats: int = 3
    max_case_s: float = 60.0
    device: str = "cpu"
    memory: bool = True

    @classmethod
    def quick(cls, device: str = "cpu") -> HarnessConfig:
        """CI-sized settings: 1 warm-up, 5 rounds, 20 ms repetitions, 20 s per case."""
        return cls(warmup=1, repeats=5, min_rep_s=0.02, max_case_s=20.0, device=device)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (stored in ``bench.json`` under ``config.harness``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Variant:
    """One way of computing a case (``"tf"``, ``"ort_session"``, ``"torch_native"``...).

    Args:
        name: variant name, unique within the case.
        fn: zero-argument callable doing one unit of work (e.g. one batch); its return value is
            dropped. ``None`` marks the variant as skipped, with ``note`` saying why.
        note: why skipped, or a remark shown in the report.
        items_per_call: samples processed by one call (for samples/s); default the case's.
    """

    name: str
    fn: Callable[[], Any] | None
    note: str = ""
    items_per_call: int | None = None


@dataclasses.dataclass
class Timing:
    """Per-call time statistics of one variant, in ms.

    Attributes:
        times_ms: per-call time of each repetition (repetition time / ``number``), in ms.
        number: calls per repetition.
        median_ms, p25_ms, p75_ms, iqr_ms, min_ms: statistics of ``times_ms`` (numpy, linear).
    """

    times_ms: list[float]
    number: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    iqr_ms: float
    min_ms: float

    @classmethod
    def from_times(cls, times_ms: Sequence[float], number: int) -> Timing:
        """Statistics of per-call times (ms). Raises ``ValueError`` on an empty sequence."""
        if not times_ms:
            raise ValueError("Timing.from_times needs at least one time")
        a = np.asarray(times_ms, dtype=float)
        p25, med, p75 = np.percentile(a, [25, 50, 75])
        return cls([float(x) for x in a], int(number), float(med), float(p25), float(p75), float(p75 - p25), float(a.min()))


@dataclasses.dataclass
class Result:
    """One row of a benchmark report: one variant of one case.

    Attributes:
        suite: suite name (``"preprocess"``, ``"encoders"``...).
        case: what is computed, with its size (``"mobilenet_v2 forward b8 96px"``).
        variant: how (``"ort_session"``...).
        baseline: the variant this row's ratio is against (the same for every row of a case).
        status: ``"ok"``, ``"skipped"`` (a backend or dependency is missing; see ``note``) or
            ``"error"`` (it raised; ``note`` holds the exception).
        note: why skipped / what failed / a remark.
        timing: per-call statistics in ms (``None`` unless ok).
        items_per_call: samples per call.
        samples_per_s: ``items_per_call / median`` in samples/s.
        ratio: median of the paired per-round ratios ``t(variant) / t(baseline)`` (unitless; < 1
            is faster than the baseline); 1.0 on the baseline row; ``None`` when either side did
            not run.
        ratio_p25, ratio_p75: IQR of the paired per-round ratios.
        peak_rss_mib, peak_py_mib, peak_cuda_mib: peak memory of one call, in MiB (see module doc).
        params: case parameters (batch, image size, threads...).
        extra: derived figures specific to the suite (speed-up, scaling efficiency...).
    """

    suite: str
    case: str
    variant: str
    baseline: str
    status: str = "ok"
    note: str = ""
    timing: Timing | None = None
    items_per_call: int = 1
    samples_per_s: float | None = None
    ratio: float | None = None
    ratio_p25: float | None = None
    ratio_p75: float | None = None
    peak_rss_mib: float | None = None
    peak_py_mib: float | None = None
    peak_cuda_mib: float | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def median_ms(self) -> float | None:
        """Median time of one call in ms, or None when the row was not measured."""
        return self.timing.median_ms if self.timing else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, ``timing`` as a dict, plus ``median_ms``."""
        d = dataclasses.asdict(self)
        d["median_ms"] = self.median_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """Inverse of :meth:`to_dict` (unknown keys are dropped). Raises ``KeyError`` without suite/case/variant."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("timing"):
            kw["timing"] = Timing(**kw["timing"])
        for k in ("suite", "case", "variant"):
            if k not in kw:
                raise KeyError(f"benchmark result lacks {k!r}: {d}")
        kw.setdefault("baseline", kw["variant"])
        return cls(**kw)


@dataclasses.dataclass
class BenchRun:
    """Everything one ``mmbridge bench`` invocation measured.

    Attributes:
        results: every row, in run order.
        environment: see :func:`environment` (versions, CPU/GPU, threads, load).
        config: the harness settings and CLI options.
        external: per external script (``benchmarks/bench_ort.py``...): its return code, the
            JSON it wrote (``results`` rows are also merged into ``results``) or its error tail.
        notes: suite-level notes (skipped suites, missing modules).
        started, finished: UTC ISO-8601 times; ``wall_s``: total seconds.
    """

    results: list[Result] = dataclasses.field(default_factory=list)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    external: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    started: str = ""
    finished: str = ""
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The whole run as a JSON-ready dict (the ``bench.json`` schema, ``schema_version`` 1)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "started": self.started,
            "finished": self.finished,
            "wall_s": self.wall_s,
            "environment": self.environment,
            "config": self.config,
            "notes": self.notes,
            "external": self.external,
            "results": [r.to_dict() for r in self.results],
        }


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIB = float(1 << 20)


def rss_bytes() -> int | None:
    """Current resident set size of this process in bytes (``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler:
    """Samples RSS every ``interval_s`` in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak = rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_bytes()
            if v is not None and v > self.peak:
                self.peak = v
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        v = rss_bytes()
        if v is not None and v > self.peak:
            self.peak = v


def tensor_memory(fn: Callable[[], Any], params: Any = ()) -> dict[str, float]:
    """Deterministic tensor memory of one call of ``fn`` (CPU or CUDA), in MiB.

    RSS growth (:func:`peak_memory`) depends on what the allocator already holds from earlier
    calls; this counts tensors instead:

    * ``peak_live_mib``: the largest sum of the storages created during the call that are alive
      at once (every op output is seen through a ``TorchDispatchMode``; a storage counts from its
      creation until its last tensor is freed; views and in-place results add nothing);
    * ``saved_for_backward_mib``: the storages autograd saves for backward during the call
      (``torch.autograd.graph.saved_tensors_hooks``), without ``params`` (weights are not extra
      memory). 0 under ``no_grad``.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.sizes: dict[int, int] = {}
            self.refs: list[Any] = []

        def _free(self, key: int) -> None:
            n = self.sizes.pop(key, None)
            if n is not None:
                self.live -= n

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            # an output on an operand's storage is a view / alias, not an allocation (``_is_view()``
            # is False at this dispatch level under no_grad: a slice of a pre-call tensor counted its
            # whole storage)
            operands = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                        if isinstance(a, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t._is_view():
                    key = t.untyped_storage().data_ptr()
                    if key and key not in self.sizes and key not in operands:
                        self.sizes[key] = n = t.untyped_storage().nbytes()
                        self.live += n
                        self.peak = max(self.peak, self.live)
                        self.refs.append(weakref.ref(t, lambda _r, key=key: self._free(key)))
            return out

    skip = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: Any) -> Any:
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    gc.collect()
    mode = _Live()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        fn()
    return {"peak_live_mib": round(mode.peak / _MIB, 3), "saved_for_backward_mib": round(sum(saved.values()) / _MIB, 3)}


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> dict[str, float | None]:
    """Peak memory of one call of ``fn``, in MiB (method in the module docstring).

    Returns:
        ``{"peak_rss_mib", "peak_py_mib", "peak_cuda_mib"}``; entries that cannot be measured
        here are None.
    """
    out: dict[str, float | None] = {"peak_rss_mib": None, "peak_py_mib": None, "peak_cuda_mib": None}
    gc.collect()
    before = rss_bytes()
    if before is not None:
        with _RssSampler() as s:
            fn()
        out["peak_rss_mib"] = round(max(0, s.peak - before) / _MIB, 3)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        out["peak_py_mib"] = round(max(0, peak - base) / _MIB, 3)
    finally:
        if started:
            tracemalloc.stop()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        out["peak_cuda_mib"] = round((torch.cuda.max_memory_allocated() - base) / _MIB, 3)
    return out


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _syncer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _time_rep(fn: Callable[[], Any], number: int, sync: Callable[[], None]) -> float:
    """Seconds for ``number`` calls of ``fn`` (gc off, synchronised at both ends)."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        sync()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()


def _err(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


def measure_case(
    suite: str,
    case: str,
    variants: Sequence[Variant],
    *,
    baseline: str,
    items_per_call: int = 1,
    config: HarnessConfig | None = None,
    params: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Result]:
    """Time the variants of one case interleaved and return one :class:`Result` per variant.

    Args:
        suite: suite name for the rows.
        case: case name (say what and how big: ``"mobilenet_v2 forward b8 96px"``).
        variants: the variants; ``fn=None`` ones become ``status="skipped"`` rows.
        baseline: name of the variant every ratio is taken against; if it is skipped or fails,
            the other rows have ``ratio=None`` and a note.
        items_per_call: samples per call (for samples/s), unless a variant sets its own; 0
            when throughput means nothing (an export), leaving ``samples_per_s`` None.
        config: harness settings (default :class:`HarnessConfig`).
        params: case parameters stored on every row.
        log: progress callback (one line per variant), e.g. ``print``.

    Returns:
        The rows, in the order of ``variants``. Timings in ms, throughput in samples/s, memory in MiB.

    Raises:
        ValueError: ``baseline`` is not one of the variant names, or names repeat.
    """
    cfg = config or HarnessConfig()
    names = [v.name for v in variants]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    log = log or (lambda s: None)
    sync = _syncer(cfg.device)
    rows = {v.name: Result(suite, case, v.name, baseline, params=dict(params or {}),
                           items_per_call=v.items_per_call or items_per_call) for v in variants}
    live: list[Variant] = []
    number: dict[str, int] = {}
    per_call_s: dict[str, float] = {}
    for v in variants:
        row = rows[v.name]
        if v.fn is None:
            row.status, row.note = "skipped", v.note or "not available"
            log(f"  {case} / {v.name}: skipped ({row.note})")
            continue
        try:
            for _ in range(max(1, cfg.warmup)):
                t = _time_rep(v.fn, 1, sync)
            if t < 1.0:  # calibrate on a call after the warm-up (tracing, first-call setup); slow calls: number=1 anyway
                t = _time_rep(v.fn, 1, sync)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
            row.status, row.note = "error", _err(exc)
            log(f"  {case} / {v.name}: error ({row.note})")
            continue
        row.note = v.note
        per_call_s[v.name] = max(t, 1e-7)
        number[v.name] = int(min(cfg.max_number, max(1, math.ceil(cfg.min_rep_s / per_call_s[v.name]))))
        live.append(v)

    # budget: estimated seconds per round
    round_s = sum(max(cfg.min_rep_s, number[v.name] * per_call_s[v.name]) for v in live)
    repeats = cfg.repeats
    if round_s > 0 and round_s * repeats > cfg.max_case_s:
        repeats = min(cfg.repeats, max(cfg.min_repeats, int(cfg.max_case_s // round_s)))
    times: dict[str, list[float]] = {v.name: [] for v in live}
    for r in range(repeats):
        k = r % len(live) if live else 0
        for v in live[k:] + live[:k]:
            if rows[v.name].status != "ok":
                continue
            try:
                times[v.name].append(_time_rep(v.fn, number[v.name], sync) / number[v.name] * 1e3)
            except Exception as exc:  # noqa: BLE001
                rows[v.name].status, rows[v.name].note = "error", _err(exc)

    for v in live:
        row = rows[v.name]
        if row.status != "ok" or not times[v.name]:
            continue
        row.timing = Timing.from_times(times[v.name], number[v.name])
        if row.items_per_call > 0:
            row.samples_per_s = round(row.items_per_call / (row.timing.median_ms / 1e3), 3)
        if cfg.memory:
            try:
                row.__dict__.update(peak_memory(v.fn, cfg.device))
            except Exception as exc:  # noqa: BLE001
                row.note = (row.note + "; " if row.note else "") + f"memory not measured ({_err(exc)})"

    base = rows[baseline]
    for v in variants:
        row = rows[v.name]
        if row.status != "ok":
            continue
        if base.status != "ok" or base.timing is None:
            row.note = (row.note + "; " if row.note else "") + f"no ratio: baseline {baseline!r} {base.status}"
        else:
            paired = [a / b for a, b in zip(row.timing.times_ms, base.timing.times_ms) if b > 0]
            if paired:
                p25, med, p75 = (float(x) for x in np.percentile(paired, [25, 50, 75]))
                row.ratio, row.ratio_p25, row.ratio_p75 = med, p25, p75
            else:
                row.ratio = row.timing.median_ms / base.timing.median_ms
            row.extra.setdefault("ratio_of_medians", round(row.timing.median_ms / base.timing.median_ms, 4))
        if row.timing is not None:
            log(f"  {case} / {v.name}: {row.timing.median_ms:.3f} ms "
                f"(IQR {row.timing.iqr_ms:.3f}, n={len(row.timing.times_ms)}x{row.timing.number})"
                + (f", ratio {row.ratio:.3f}" if row.ratio is not None else ""))
    return [rows[n] for n in names]


def skipped_case(suite: str, case: str, variants: Sequence[str], baseline: str, note: str,
                 params: dict[str, Any] | None = None) -> list[Result]:
    """Rows for a case that cannot run at all (``status="skipped"``, ``note`` says why)."""
    return [Result(suite, case, v, baseline, status="skipped", note=note, params=dict(params or {})) for v in variants]


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "fma"})
    except OSError:
        pass
    return []


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: versions, CPU/GPU, threads, load, memory high-water mark.

    Reads library versions from package metadata (:func:`mmbridge.info.versions`; imports none
    of them), torch's thread counts and CUDA devices, ``os.getloadavg()`` (other processes
    competing for the CPU) and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (process peak RSS,
    MiB on Linux, where ru_maxrss is in KiB).
    """
    from mmbridge.info import versions

    env: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": device,
        "git_commit": _git_commit(),
        "versions": {k: v for k, v in versions().items() if v},
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")
                        if k in os.environ},
    }
    try:
        import resource

        env["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    except ImportError:  # pragma: no cover - not POSIX
        env["ru_maxrss_mib"] = None
    if "torch" in sys.modules or device.startswith("cuda"):
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["torch_interop_threads"] = torch.get_num_interop_threads()
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["cuda_version"] = torch.version.cuda
    if "onnxruntime" in sys.modules:
        env["onnxruntime_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return env


def script_output(script: str, device: str, out: str | os.PathLike) -> Any:
    """Start-up shared by the ``benchmarks/bench_*.py`` scripts: torch's stack, device check, output path.

    Loads torch's compiler stack before anything may import TensorFlow
    (:func:`mmbridge.preload_torch_stack`), refuses ``device="cuda"`` without a CUDA device, and
    resolves ``out`` (a directory, or a path ending in ``.json``) to the JSON file to write,
    creating its folder.

    Returns:
        The ``pathlib.Path`` of the JSON file (``<out>/<script>.json`` for a directory), or None
        after printing ``"<script>: --device cuda but torch sees no CUDA device"`` to stderr
        (the caller exits with status 2).
    """
    from pathlib import Path

    import mmbridge

    mmbridge.preload_torch_stack()
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return None
    path = Path(out)
    out_file = path if path.suffix == ".json" else path / f"{script}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return out_file


__all__ = ["HarnessConfig", "Variant", "Timing", "Result", "BenchRun", "measure_case", "skipped_case",
           "peak_memory", "tensor_memory", "rss_bytes", "environment", "script_output", "SCHEMA_VERSION"]
