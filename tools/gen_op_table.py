"""Generate docs/ops.md: the TF op types mmbridge's exporter takes, with their status on ORT and torch.

Built from ``docs/tf2onnx_backend.json``, the measured run of tf2onnx's own backend tests through
``mmbridge.export`` -> ``to_ort()`` / ``to_torch(trainable=False)``
(``tools/run_tf2onnx_backend_tests.py``, which records the TF op types of every case's traced
graph). The suite's fast representative subset (``tests/export/test_tf2onnx_backend_subset.py``)
re-measures a few dozen of those cases on every run and checks they still have the recorded
status, and ``tests/test_op_table.py`` checks this page is what this script renders from the JSON.

For each TF op type (``Placeholder``, ``Identity``, ``Const``, ``NoOp`` left out), over the
cases whose traced graph contains it:

* **exact** - every output bit-equal to TF (shape and dtype too);
* **tolerance** - floats within the test's tolerance or mmbridge's parity tolerance; the
  column gives the largest max abs error measured and the largest ``|err| / max(|tf|, 1)``
  (some tests feed ``arange`` values whose conv outputs reach 1e14);
* **refused** - a clear mmbridge error (at export, ``to_ort`` or ``to_torch``); the reasons are
  listed. A refusal whose message names TF op types is counted for those ops only; one that
  names none is counted for every op of the case;
* **wrong** - silently wrong (value / shape / dtype differs, no error); listed with its owner;
* **crash** - a raw, non-mmbridge exception.

Usage (repository root)::

    python tools/gen_op_table.py            # writes docs/ops.md from docs/tf2onnx_backend.json
    python tools/gen_op_table.py --check    # exit 1 if docs/ops.md is stale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON = REPO / "docs" / "tf2onnx_backend.json"
OUT = REPO / "docs" / "ops.md"
BACKENDS = ("ort", "torch")


def _bucket(status: str) -> str | None:
    if status in ("exact", "tolerance", "wrong", "crash"):
        return status
    if status.startswith("refused"):
        return "refused"
    return None  # n/a


def _short(reason: str, n: int = 140) -> str:
    reason = re.sub(r"'test_[A-Za-z0-9_#]+'", "'<case>'", reason)  # the artifact name is the case id
    reason = re.sub(r"(__|_)\d+\b", r"\1N", reason)  # tf2onnx's generated node-name counters
    reason = re.sub(r"\s+", " ", reason).replace("|", "\\|")
    return reason if len(reason) <= n else reason[: n - 3] + "..."


def aggregate(doc: dict) -> dict[str, dict]:
    """``{tf_op: {"cases": set, backend: {bucket: count}, backend+"_err": float, backend+"_why": {reason}}}``."""
    table: dict[str, dict] = defaultdict(lambda: {"cases": set(), "wrong_ids": set(),
                                                  **{b: defaultdict(int) for b in BACKENDS},
                                                  **{f"{b}_err": 0.0 for b in BACKENDS},
                                                  **{f"{b}_rel": 0.0 for b in BACKENDS},
                                                  **{f"{b}_why": set() for b in BACKENDS}})
    for case in doc["cases"]:
        ops = case.get("tf_ops") or []
        for b in BACKENDS:
            bucket = _bucket(case["status"].get(b, "n/a"))
            if bucket is None:
                continue
            detail = case.get("detail", {}).get(b, "") or ""
            blamed = ops
            if bucket in ("refused", "wrong", "crash"):
                named = [op for op in ops if re.search(rf"\b{re.escape(op)}\b", detail)]
                blamed = named or ops
            for op in ops:
                row = table[op]
                row["cases"].add(case["id"])
                b_here = bucket if op in blamed else "exact_or_tol"
                if b_here == "exact_or_tol":
                    continue  # another op of the case was blamed; this one is not counted for it
                row[b][bucket] += 1
                if bucket == "tolerance":
                    row[f"{b}_err"] = max(row[f"{b}_err"], case.get("max_abs", {}).get(b) or 0.0)
                    row[f"{b}_rel"] = max(row[f"{b}_rel"], case.get("max_rel", {}).get(b) or 0.0)
                if bucket in ("refused", "crash", "wrong"):
                    row[f"{b}_why"].add(_short(detail))
                if bucket == "wrong":
                    row["wrong_ids"].add(f"{case['id']} [{case['variant']}, {b}]"
                                         + (f" (owner: {case['owner']})" if case.get("owner") else ""))
    return table


def _cell(row: dict, b: str) -> str:
    counts = row[b]
    if not counts:
        return "–"
    parts = []
    for bucket in ("exact", "tolerance", "refused", "wrong", "crash"):
        n = counts.get(bucket, 0)
        if not n:
            continue
        label = f"{bucket} {n}"
        if bucket == "tolerance":
            label += f" (max abs {row[f'{b}_err']:.1e}, rel {row[f'{b}_rel']:.1e})"
        if bucket in ("wrong", "crash"):
            label = f"**{label}**"
        parts.append(label)
    return ", ".join(parts)


def _overall(row: dict, b: str) -> str:
    c = row[b]
    if c.get("wrong"):
        return "wrong"
    if c.get("crash"):
        return "crash"
    if c.get("refused") and not (c.get("exact") or c.get("tolerance")):
        return "refused"
    if c.get("refused"):
        return "partly refused"
    if c.get("tolerance"):
        return "tolerance"
    return "exact" if c else "–"


def render(doc: dict) -> str:
    """The Markdown page for ``doc`` (the JSON of tools/run_tf2onnx_backend_tests.py)."""
    table = aggregate(doc)
    meta = doc["meta"]
    n_cases = sum(1 for c in doc["cases"] if any(_bucket(s) for s in c["status"].values()))
    lines = [
        "# TF ops: status on onnxruntime and torch (generated)", "",
        "<!-- generated by tools/gen_op_table.py from docs/tf2onnx_backend.json; do not edit by hand -->", "",
        "Every TF op type that appears in the traced graph of a case of tf2onnx's own backend tests "
        f"(`tests/test_backend.py` at {meta['tf2onnx_tag']}, the installed tf2onnx), run through "
        "`mmbridge.export` with the test's own input, then `to_ort()` and `to_torch(trainable=False)`, and "
        "compared with TF - with static shapes and with every dim unknown. Counts are (case, variant) pairs. "
        "**exact**: bit-equal; **tolerance**: floats within the test's or mmbridge's tolerance (largest max abs "
        "error and largest error relative to max(|TF|, 1) in brackets); **refused**: a clear mmbridge error (reasons below the table); **wrong**: a value or "
        "shape differs with no error; **crash**: a raw exception. An op's refusals and failures are counted "
        "for the ops their message names (or for every op of the case when it names none).", "",
        f"{n_cases} measured (case, variant) pairs; selection, statuses and per-case details: "
        "[tf2onnx_backend.md](tf2onnx_backend.md). Regenerate: "
        f"`{meta['command']}` then `python tools/gen_op_table.py`. The run of tf2onnx's tests is checked "
        "in CI by a representative subset (`tests/export/test_tf2onnx_backend_subset.py`).", "",
        "Ops that tf2onnx converts but no selected test covers are not listed: they may work; nothing here "
        "says so. String ops are covered by [preprocessing.md](preprocessing.md).", "",
        "| TF op | cases | ORT | ORT detail | torch | torch detail |", "|---|---|---|---|---|---|",
    ]
    for op in sorted(table, key=str.lower):
        row = table[op]
        lines.append(f"| `{op}` | {len(row['cases'])} | {_overall(row, 'ort')} | {_cell(row, 'ort')} | "
                     f"{_overall(row, 'torch')} | {_cell(row, 'torch')} |")
    lines += ["", "## Why refused, wrong or crashed", ""]
    any_reason = False
    for op in sorted(table, key=str.lower):
        row = table[op]
        for b in BACKENDS:
            for why in sorted(row[f"{b}_why"]):
                any_reason = True
                lines.append(f"* `{op}` on {b}: {why}")
        for wid in sorted(row["wrong_ids"]):
            lines.append(f"* `{op}` **silently wrong** in `{wid}`")
    if not any_reason:
        lines.append("None.")
    vers = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    lines += ["", f"Measured with {vers}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=JSON)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text(encoding="utf-8")))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python tools/gen_op_table.py", file=sys.stderr)
            return 1
        return 0
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)  # atomic
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
