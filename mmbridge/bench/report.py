"""Benchmark reports: JSON (everything), a Markdown table (what a person reads) and a PNG plot.

Files written by :func:`write_all` into one directory:

* ``bench.json``: :meth:`BenchRun.to_dict` (schema ``schema_version`` 1): environment, config,
  notes, external script outputs, and one row per (suite, case, variant) with per-call times in
  ms, median and IQR, samples/s, ratio against the case's baseline with the IQR of the paired
  per-round ratios, and peak memory in MiB;
* ``bench.md``: the environment and command, then one table per suite;
* ``bench.png``: one horizontal bar per measured row, the ratio against its baseline on a log
  axis with the paired-ratio IQR as error bars and a line at 1.0 (matplotlib, ``Agg`` backend;
  skipped with a note when matplotlib is not installed: ``pip install 'mmbridge[bench]'``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbridge.bench.harness import BenchRun, Result

JSON_FILE = "bench.json"
MD_FILE = "bench.md"
PNG_FILE = "bench.png"
_HIDDEN_EXTRA = {"ratio_of_medians"}  # in the JSON, not in the table


def write_json(run: BenchRun, path: str | os.PathLike) -> Path:
    """Write ``run`` as JSON (atomically: temp file then rename; non-finite floats as null). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(run.to_dict()), indent=2, default=_default, allow_nan=False))
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike) -> BenchRun:
    """Read a ``bench.json`` back into a :class:`BenchRun`.

    Raises:
        ValueError: the file is not a benchmark report of a known schema version.
    """
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or d.get("schema_version") != 1 or "results" not in d:
        raise ValueError(f"{path} is not an mmbridge benchmark report (schema_version 1)")
    return BenchRun(
        results=[Result.from_dict(r) for r in d["results"]], environment=d.get("environment", {}),
        config=d.get("config", {}), external=d.get("external", {}), notes=d.get("notes", []),
        started=d.get("started", ""), finished=d.get("finished", ""), wall_s=d.get("wall_s", 0.0),
    )


def _finite(obj: Any) -> Any:
    """NaN / inf floats -> None, recursively (JSON has no NaN; a reader should see "not measured")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _ratio_cell(r: Result) -> str:
    if r.ratio is None:
        return "–"
    if r.variant == r.baseline:
        return "1 (baseline)"
    spread = f" ({_f(r.ratio_p25)}–{_f(r.ratio_p75)})" if r.ratio_p25 is not None else ""
    return f"**{_f(r.ratio) if r.ratio < 0.1 else f'{r.ratio:.2f}'}×**{spread}"


def markdown(run: BenchRun, *, command: str | None = None) -> str:
    """The report as Markdown: header (command, environment, method) and one table per suite."""
    env = run.environment
    v = env.get("versions", {})
    lines = ["# mmbridge benchmark report", ""]
    cmd = command or run.config.get("command")
    if cmd:
        lines += ["Command:", "", "```bash", cmd, "```", ""]
    gpus = ", ".join(env.get("gpus", [])) or "none"
    lines += [
        f"- When: {run.started} ({run.wall_s:.0f} s); git {env.get('git_commit') or 'unknown'}",
        f"- Device: **{env.get('device', '?')}**; CPU: {env.get('cpu', '?')} ({env.get('cpu_affinity') or env.get('cpu_count')} usable cores,"
        f" flags {', '.join(env.get('cpu_flags', [])) or 'n/a'}); GPUs: {gpus}",
        f"- Threads: torch {env.get('torch_threads', '?')}; load average at start {env.get('loadavg_1m', '?')}"
        f" (other processes share this machine: read ratios, not absolute times)",
        "- Versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorflow-cpu",
                                                            "tensorflow", "tf2onnx", "onnx", "onnx2torch") if v.get(k)),
        "",
        "Method: warm-up, then every variant of a case timed in interleaved rounds (order rotated each round); "
        "time per call = median over rounds, spread = interquartile range (IQR). **Ratio** = median over rounds of "
        "the paired ratio t(variant) / t(baseline) measured back to back (below 1 = faster than the baseline), in "
        "brackets its IQR. Peak memory = largest RSS growth during one call (sampled every 1 ms), in MiB.",
        "",
    ]
    for note in run.notes:
        lines.append(f"> {note}")
    if run.notes:
        lines.append("")
    suites: dict[str, list[Result]] = {}
    for r in run.results:
        suites.setdefault(r.suite, []).append(r)
    for suite, rows in suites.items():
        lines += [f"## {suite}", "",
                  "| case | variant | baseline | ms / call (IQR) | samples/s | ratio vs baseline (IQR) | peak RSS MiB | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.status != "ok" or r.timing is None:
                lines.append(f"| {r.case} | {r.variant} | {r.baseline} | {r.status} | | | | {_esc(r.note)} |")
                continue
            t = r.timing
            extra = "; ".join(f"{k} {_f(x) if isinstance(x, float) else x}" for k, x in r.extra.items()
                              if k not in _HIDDEN_EXTRA)
            note = "; ".join(s for s in (_esc(r.note), _esc(extra)) if s)
            lines.append(
                f"| {r.case} | {r.variant} | {r.baseline} | {_f(t.median_ms)} ({_f(t.iqr_ms, 2)}) | "
                f"{_f(r.samples_per_s)} | {_ratio_cell(r)} | {_f(r.peak_rss_mib, 2)} | {note} |"
            )
        lines.append("")
    if run.external:
        lines += ["## external scripts", ""]
        for name, info in run.external.items():
            lines.append(f"- `{name}`: {info.get('status', '?')}" + (f" — {_esc(info.get('note', ''))}" if info.get("note") else ""))
        lines.append("")
    return "\n".join(lines)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _esc(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_markdown(run: BenchRun, path: str | os.PathLike, *, command: str | None = None) -> Path:
    """Write :func:`markdown` to ``path``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(run, command=command))
    return path


def write_png(run: BenchRun, path: str | os.PathLike) -> Path | None:
    """Plot every measured non-baseline row's ratio (log x axis, IQR error bars, line at 1).

    Returns:
        The path, or None when matplotlib is missing or no row has a ratio.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in run.results if r.ratio is not None and r.variant != r.baseline and r.ratio > 0]
    if not rows:
        return None
    labels = [f"{_short(r.case, 56)} — {r.variant} / {r.baseline}" for r in rows]
    ratios = [r.ratio for r in rows]
    lo = [max(0.0, r.ratio - (r.ratio_p25 if r.ratio_p25 is not None else r.ratio)) for r in rows]
    hi = [max(0.0, (r.ratio_p75 if r.ratio_p75 is not None else r.ratio) - r.ratio) for r in rows]
    suites = list(dict.fromkeys(r.suite for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = [cmap(suites.index(r.suite) % 10) for r in rows]
    fig_h = max(2.5, 0.26 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(12, fig_h))
    y = list(range(len(rows)))[::-1]
    # bars grow from the 1.0 line: left of it = faster than the baseline, right = slower
    ax.barh(y, [x - 1.0 for x in ratios], left=1.0, xerr=[lo, hi], color=colors, alpha=0.85, capsize=2,
            error_kw={"elinewidth": 0.8})
    for yi, x, r in zip(y, ratios, rows):
        end = (r.ratio_p75 or x) if x >= 1 else (r.ratio_p25 or x)  # beyond the whisker
        label = f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"
        ax.text(end, yi, f" {label}" if x >= 1 else f"{label} ", va="center", ha="left" if x >= 1 else "right", fontsize=6)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("time ratio vs the case's baseline (median of paired per-round ratios; whiskers: IQR); < 1 = faster")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=cmap(i % 10), label=s) for i, s in enumerate(suites)], fontsize=7, loc="lower right")
    env = run.environment
    ax.set_title(f"mmbridge bench, {env.get('device', '?')}: {env.get('cpu', '')[:50]}, "
                 f"{env.get('cpu_affinity') or env.get('cpu_count')} cores, torch threads {env.get('torch_threads', '?')}",
                 fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(run: BenchRun, out_dir: str | os.PathLike, *, command: str | None = None) -> dict[str, Path | None]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``.

    Returns:
        ``{"json": path, "markdown": path, "png": path or None}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = write_png(run, out / PNG_FILE)
    if png is None:
        run.notes.append("no PNG plot: matplotlib is not installed (pip install 'mmbridge[bench]') or no ratios")
    return {
        "json": write_json(run, out / JSON_FILE),
        "markdown": write_markdown(run, out / MD_FILE, command=command),
        "png": png,
    }


def merge_results(run: BenchRun, rows: Sequence[dict[str, Any]], *, source: str) -> int:
    """Append result dicts from another script's JSON (same row schema) to ``run``.

    Rows that do not parse are skipped. Returns the number merged.
    """
    n = 0
    for d in rows:
        try:
            r = Result.from_dict(d)
        except (KeyError, TypeError):
            continue
        r.note = (r.note + "; " if r.note else "") + f"from {source}"
        run.results.append(r)
        n += 1
    return n


__all__ = ["write_all", "write_json", "write_markdown", "write_png", "markdown", "load_json", "merge_results",
           "JSON_FILE", "MD_FILE", "PNG_FILE"]
