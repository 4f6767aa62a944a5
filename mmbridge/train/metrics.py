"""Metrics (torchmetrics) and evaluation reports (JSON + Markdown).

The metrics of a task are its task head's (:class:`~mmbridge.composition.heads.TaskHead`):
classification: ``top1`` (micro accuracy), ``top5`` (when ``num_classes >= 5``) and ``macro_f1``
(``torchmetrics.classification.MulticlassAccuracy`` / ``MulticlassF1Score``); regression: ``mse``
and ``mae``. Values are fractions in [0, 1] for classification. Under DDP torchmetrics sums its
states across ranks in ``compute()``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchmetrics


def make_metrics(task: str, num_classes: int | None) -> torchmetrics.MetricCollection:
    """The metric collection of the task head registered as ``task``.

    Args:
        task: a :data:`mmbridge.task_heads` name (``"classification"``, ``"regression"``).
        num_classes: C (classification only).

    Returns:
        A ``MetricCollection``; ``update(preds, target)`` takes logits ``[N, C]`` and int64
        labels ``[N]`` (classification) or predictions and targets ``[N, K]`` (regression).

    Raises:
        RegistryError: unknown ``task`` (with close matches).
    """
    from mmbridge.composition.heads import task_heads

    return task_heads.get(task).make_metrics(num_classes)


def write_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *,
                 title: str = "mmbridge evaluation", name: str = "report",
                 notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``{name}.json`` and ``{name}.md`` comparing configurations side by side.

    Args:
        results: configuration name -> flat metrics (``{"test/top1": 0.61, "train_time_s": 12.3,
            ...}``). Numbers in [0, 1] under keys ending in top1/top5/macro_f1 are shown as %.
            A value may also be a list of numbers (several seeds): shown as mean ± std.
        out_dir: directory (created).
        title: Markdown title.
        name: file stem.
        notes: extra lines under the table (data used, versions, command).

    Returns:
        ``(json_path, markdown_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    plain = {k: {m: _plain(v) for m, v in row.items()} for k, row in results.items()}
    from mmbridge.train.checkpoint import write_text_atomic

    write_text_atomic(jpath, json.dumps({"title": title, "results": plain, "notes": list(notes)}, indent=2))
    write_text_atomic(mpath, markdown_table(plain, title=title, notes=notes))
    return jpath, mpath


def compare_reports(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                    title: str = "mmbridge comparison", name: str = "comparison") -> tuple[Path, Path]:
    """Merge the ``report.json`` of several runs (``mmbridge train`` output dirs) into one table.

    Rows with the same configuration name in several runs (e.g. seeds) are merged into lists,
    shown as mean ± std.

    Returns:
        ``(json_path, markdown_path)`` of the combined report.

    Raises:
        FileNotFoundError: a run directory has no ``report.json`` (names it).
    """
    merged: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for d in run_dirs:
        path = Path(d) / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `mmbridge train` with output.dir={d} first")
        rep = json.loads(path.read_text())
        notes += [f"{d}: {n}" for n in rep.get("notes", [])]
        for cfg_name, row in rep["results"].items():
            into = merged.setdefault(cfg_name, {})
            for k, v in row.items():
                if k in into and isinstance(v, (int, float)) and not isinstance(v, bool):
                    prev = into[k]
                    into[k] = (prev if isinstance(prev, list) else [prev]) + [v]
                else:
                    into.setdefault(k, v)
    return write_report(merged, out_dir, title=title, name=name, notes=notes)


def markdown_table(results: Mapping[str, Mapping[str, Any]], *, title: str = "", notes: Sequence[str] = ()) -> str:
    """A Markdown table: one row per configuration, one column per metric (union, first-seen order)."""
    cols: list[str] = []
    for row in results.values():
        cols += [c for c in row if c not in cols]
    lines = [f"# {title}", ""] if title else []
    lines += ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k, row in results.items():
        lines.append(f"| {k} | " + " | ".join(_fmt(c, row.get(c)) for c in cols) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "–"
    pct = col.endswith(("top1", "top5", "macro_f1"))
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / max(1, len(v) - 1)) if len(v) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.4g} ± {std:.2g}"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmbridge.train.metrics OUT_DIR RUN_DIR...``: :func:`compare_reports` from the shell."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mmbridge.train.metrics",
                                description="merge the report.json of several mmbridge train runs into one table")
    p.add_argument("out", help="directory for comparison.json / comparison.md")
    p.add_argument("runs", nargs="+", help="output.dir of each run")
    p.add_argument("--title", default="mmbridge comparison")
    args = p.parse_args(argv)
    _, md = compare_reports(args.runs, args.out, title=args.title)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
