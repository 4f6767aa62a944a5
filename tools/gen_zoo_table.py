"""Regenerate ``docs/zoo.md``: every case of ``tests/export/test_families.py`` through :func:`measure`.

Usage (from the repository root)::

    PYTHONPATH=. python tools/gen_zoo_table.py            # all cases (~15 min on 2 CPU cores)
    PYTHONPATH=. python tools/gen_zoo_table.py --fast     # only the cases in CI's default run
    PYTHONPATH=. python tools/gen_zoo_table.py --only Bert --only GPT2 --out /tmp/zoo.md
    # or from a test run (the rows the tests measured, no second export):
    MMBRIDGE_ZOO=1 MMBRIDGE_ZOO_ROWS=/tmp/rows.jsonl PYTHONPATH=. python -m pytest tests/export/test_families.py
    PYTHONPATH=. python tools/gen_zoo_table.py --rows /tmp/rows.jsonl
    # keras.applications, one model per process, as its own section of docs/zoo.md (the rest kept):
    MMBRIDGE_COMPILE_BACKEND=aot_eager PYTHON=.venv/bin/python tools/zoo_rows.sh /tmp/apps.jsonl 420 InceptionV3 Xception
    PYTHONPATH=. python tools/gen_zoo_table.py --rows /tmp/apps.jsonl --section keras.applications

Every case is exported with ``trainable=True`` and no ``sample_inputs`` into a fresh cache; a
case that fails is a row with its error. The rows are also written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import mmbridge

REPO = Path(__file__).resolve().parents[1]
COMMAND = "PYTHONPATH=. python tools/gen_zoo_table.py"
ROWS_COMMAND = ("MMBRIDGE_ZOO=1 MMBRIDGE_ZOO_ROWS=/tmp/rows.jsonl PYTHONPATH=. python -m pytest tests/export/test_families.py && "
                "PYTHONPATH=. python tools/gen_zoo_table.py --rows /tmp/rows.jsonl   # from the tests' own rows")


def _cases_module():
    mmbridge.preload_torch_stack()  # before TF, as tests/conftest.py does
    spec = importlib.util.spec_from_file_location("mmbridge_test_families", REPO / "tests" / "export" / "test_families.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _fmt_err(v, scale=None) -> str:
    if v is None:
        return "–"
    return f"{v:.1e}" + (f" ({v / scale:.0e} rel)" if scale else "")


def _one_line(text: str, n: int = 260) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _train_parity_cell(r: dict) -> str:
    """The train-parity cell: worst |Keras - torch| / tolerance over the variables (< 1 passes; the
    export refuses otherwise), "Keras floor" where Keras' own float32 sensitivity had to be measured,
    and how many variables the steps moved by less than their measured noise ("below noise": there
    the check could not tell a frozen weight from a trained one)."""
    if r.get("trainable_export") is False:
        return "frozen export (trainable=False)"
    if r.get("train_parity_skipped"):
        return "skipped"
    ratio = r.get("train_parity_worst_ratio")
    if ratio is None:
        return "not recorded"
    extra = [f"b{r['train_parity_batch']}"] if r.get("train_parity_batch") else []
    if r.get("train_parity_keras_floor"):
        extra.append("Keras floor")
    if r.get("train_parity_inconclusive"):
        of = f"/{r['train_parity_variables']}" if r.get("train_parity_variables") else ""
        extra.append(f"{r['train_parity_inconclusive']}{of} below noise")
    verdict = "**no**" if r.get("train_parity_passed") is False else "ok"
    return f"{verdict} ({ratio:.2f}{', ' + ', '.join(extra) if extra else ''})"


def _train_step_cell(r: dict) -> str:
    """torch / Keras training-step time (medians of interleaved rounds, one process) and the two medians."""
    if r.get("train_step_ratio") is None:
        return "not run" if not r.get("train_step_not_run") else "not run (" + _one_line(r["train_step_not_run"], 60) + ")"
    threads = {str(r.get("torch_threads", "?")), str(r.get("tf_intra_op_threads", "?"))}
    t = "" if threads == {"1"} else f", threads torch {r.get('torch_threads', '?')} / TF {r.get('tf_intra_op_threads', '?')}"
    return (f"{r['train_step_ratio']:.2f}× ({r['torch_train_step_ms']:.3g} / {r['keras_train_step_ms']:.3g} ms, "
            f"b{r['train_step_batch']}{t})")


def table_lines(rows: list[dict], gaps: dict, note_prefix: str = "") -> tuple[list[str], list[str]]:
    """The table rows (Markdown lines) and their numbered notes' texts; a note is referenced as
    ``note {note_prefix}{n}`` (a prefix keeps two tables' notes apart on one page). A row with
    ``not_run`` (a reason) was not measured and says so."""
    p = note_prefix
    lines: list[str] = []
    notes: list[str] = []
    for r in rows:
        if r.get("not_run"):
            lines.append(f"| {r['family']} | {r.get('label', r['model'])} | not run here (note {p}{len(notes) + 1}) | – | – | – | – | – | – | – | – |")
            notes.append(f"{r['family']} {r['model']}: {r['not_run']}")
            continue
        if not r.get("export"):
            lines.append(f"| {r['family']} | {r.get('label', r['model'])} | **no** (note {p}{len(notes) + 1}) | – | – | – | – | – | – | – | – |")
            notes.append(f"{r['family']} {r['model']}: {r.get('error', '')}" + _gap(gaps, r, "export"))
            continue
        kp = r.get("keras_params")
        head_cells = (f"| {r['family']} | {r.get('label', r['model'])} | ok ({r.get('export_s', 0):.0f} s) | "
                      f"{_fmt_err(r['ort_max_abs'], r.get('ref_scale'))} |")
        if r.get("torch_error"):
            note = len(notes) + 1
            notes.append(f"{r['family']} {r['model']}: to_torch: {_one_line(r['torch_error'])}"
                         + _gap(gaps, r, "torch"))
            lines.append(f"{head_cells} **no** (note {p}{note}) | – / {'–' if kp is None else f'{kp:,}'} | – | – | – | {_train_parity_cell(r)} | – |")
            continue
        unread = int(r.get("unread_params") or 0)  # Keras trainable values the forward never reads
        same = "" if kp is None else (" ✓" if kp - unread == r["torch_params"] else " ✗")
        params = f"{r['torch_params']:,} / {'–' if kp is None else f'{kp:,}'}{same}"
        if unread:
            params += f" (+{unread:,} never read, note UNREAD)"
        bf = ("ok" if r.get("bf16_ok") else "**no**") + (f" ({r['bf16_rel_err']:.0e})" if "bf16_rel_err" in r else "")
        gb = str(r["graph_breaks"]) if r.get("graph_breaks") is not None else f"**fails** (note {p}{len(notes) + 1})"
        if "compile_max_abs" not in r:
            comp = "not run"
        elif r["compile_max_abs"] is None:
            comp = f"**fails** (note {p}{len(notes) + 1 + bool(r.get('dynamo_error'))})"
        else:
            comp = f"ok ({r.get('compile_backend')}, {r['compile_max_abs']:.0e})"
        lines.append(f"{head_cells} {_fmt_err(r.get('torch_max_abs'), r.get('ref_scale'))} | {params} | {bf} | {gb} | {comp} | "
                     f"{_train_parity_cell(r)} | {_train_step_cell(r)} |")
        if r.get("dynamo_error"):
            notes.append(f"{r['family']} {r['model']}: dynamo.explain failed: {_one_line(r['dynamo_error'], 120)}"
                         + _gap(gaps, r, "dynamo"))
        if r.get("compile_error"):
            notes.append(f"{r['family']} {r['model']}: torch.compile failed: {_one_line(r['compile_error'], 120)}"
                         + _gap(gaps, r, "dynamo"))
        if unread:
            notes.append(f"{r['family']} {r['model']}: {unread:,} Keras trainable values are never read by the "
                         f"forward ({', '.join(r.get('unread') or [])}): no gradient in Keras either, so they are not "
                         f"in the torch module; the export records them (keras_inventory['unread_variables'])")
            lines[-1] = lines[-1].replace("note UNREAD", f"note {p}{len(notes)}", 1)
        if r.get("keras_params") is not None and r.get("torch_params") != r["keras_params"] - unread:
            notes.append(f"{r['family']} {r['model']}: parameter count differs" + _gap(gaps, r, "params"))
            lines[-1] = lines[-1].replace(" ✗ |", f" ✗ (note {p}{len(notes)}) |", 1)
    return lines, notes


def render(rows: list[dict], atol: float, seconds: float, source: str | None = None,
           gaps: dict | None = None, measured_with: str | None = None) -> str:
    """The Markdown page; ``gaps`` maps ``(family, model)`` to the known-gap reasons of its case;
    ``measured_with``: the command(s) that measured ``rows`` (shown under the regeneration commands)."""
    gaps = gaps or {}
    head = [
        "# Model zoo: what exports, and how well",
        "",
        f"Generated by `tools/gen_zoo_table.py` from {source or 'the cases of `tests/export/test_families.py`'} "
        f"({time.strftime('%Y-%m-%d', time.gmtime())}, {seconds:.0f} s on 2 CPU cores). Regenerate with:",
        "",
        f"    {COMMAND}                  # measures every case (about 10 min)",
        f"    {ROWS_COMMAND}",
        "",
        *([f"The rows below were measured with (one run; 1-minute load average {_load_range(rows)} at the rows' starts):",
           "", *[f"    {c}" for c in measured_with.split(" ;; ")], ""] if measured_with else []),
        "Every model is built from a tiny config with random weights (no downloads) and exported with",
        "`mmbridge.export(model, trainable=True)` **without `sample_inputs`**: the parity samples come from the",
        "model (token ids below its vocabularies, segment ids below its segment vocabulary, padding masks 1/0",
        "with a 1 in every row). Columns:",
        "",
        "* **ORT / torch max abs**: largest |difference| to TF's outputs on the export's sample inputs "
        f"(golden.npz); the tests require ≤ {atol:g} and ≤ 1e-4 × the largest |output| (`parity_bound`). In brackets,",
        "  relative to the largest |output| (randomly initialised CNNs without a top give outputs as small as 1e-15,",
        "  where an absolute bound alone says little);",
        "* **params torch / Keras**: `requires_grad` scalars of `art.to_torch()` vs Keras `trainable_weights`"
        " (✓: equal once the values the forward never reads, shown as \"+N never read\", are set apart);",
        "* **bf16**: a forward under `torch.autocast('cpu', bfloat16)` is finite and within 10 % of the output scale"
        " (relative error shown);",
        "* **graph breaks**: `torch._dynamo.explain(module)(*inputs).graph_break_count` (recurrent models: at the",
        "  ONNX `Loop`, which runs in Python);",
        "* **compile**: `torch.compile(module, backend=...)` vs the eager module, largest |difference| over batch 2 / 3",
        "  and, where the input has a dynamic sequence length, length 8 / 11 (`compile_row`; the tests require",
        "  ≤ 1e-05; backend `inductor` with `MMBRIDGE_ZOO=1`, `aot_eager` in the default run, or `MMBRIDGE_COMPILE_BACKEND`);",
        "* **train parity**: the trainable export's check (`mmbridge.export.contract.train_parity`: 3 SGD steps on",
        "  Keras and on torch, every variable compared against a measured float32 noise floor): the worst",
        "  |difference| / tolerance (< 1 passes; the export is refused otherwise), the batch, \"Keras floor\" where",
        "  Keras' own float32 sensitivity had to be measured (a second Keras run from a one-ulp perturbed start),",
        "  and how many variables of all the steps moved by less than their measured noise (\"below noise\": random",
        "  deep CNNs without a top output as little as 1e-20, so many of their variables barely move in 3 steps; there",
        "  the check cannot tell a frozen weight from a trained one, and the audit's exact parameter match is the proof);",
        "* **train step torch / Keras**: one SGD step of `art.to_torch(trainable=True)` vs the Keras model's",
        "  `tf.function` step on the same golden batch, medians of 7 interleaved rounds in one process (ms;",
        "  `train_step_row`, measured with `MMBRIDGE_ZOO=1`; < 1: torch is faster), both on one CPU thread",
        "  (`tools/zoo_rows.sh` sets `TF_NUM_INTRAOP_THREADS` / `OMP_NUM_THREADS`; other counts are shown).",
        "",
        "| family | model | export | ORT max abs | torch max abs | params torch / Keras | bf16 | graph breaks | compile | train parity | train step torch / Keras |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines, notes = table_lines(rows, gaps)
    tail = ["", "A Keras count marked – has no Keras model in this process (a SavedModel directory is exported in",
            "a child process); a torch count marked – has no torch module (see the note).", ""]
    if notes:
        tail += ["## Notes", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] + [""]
    return "\n".join(head + lines + tail)


def _load_range(rows: list[dict]) -> str:
    loads = [r["loadavg_1min"] for r in rows if r.get("loadavg_1min") is not None]
    return f"{min(loads):g}–{max(loads):g}" if loads else "not recorded"


SECTION_BEGIN = "<!-- zoo-section:{name}:begin -->"
SECTION_END = "<!-- zoo-section:{name}:end -->"


def render_section(name: str, rows: list[dict], atol: float, command: str, gaps: dict | None = None) -> str:
    """A self-contained section for ``docs/zoo.md``: a heading, how it was measured (``command``, date,
    the 1-minute load average the rows recorded), the table of ``rows`` (the model cell shows the input
    shape the row was exported at) and its notes, numbered ``<initial>1..`` so they do not collide with
    the main table's. Columns as in the main table."""
    p = "".join(w[0] for w in name.replace(".", " ").split()).upper()[:2] or "S"
    labelled = []
    for r in rows:
        shape = next(iter((r.get("input_shape") or {}).values()), None)
        labelled.append({**r, "label": r["model"] + (f" ({'×'.join(str(d) for d in shape[1:3])})" if shape else "")})
    lines, notes = table_lines(labelled, gaps or {}, note_prefix=p)
    loads = [r["loadavg_1min"] for r in rows if r.get("loadavg_1min") is not None]
    load = f"1-minute load average {min(loads):g}–{max(loads):g} at the rows' starts" if loads else "load not recorded"
    total = sum(r.get("export_s", 0) for r in rows)
    out = [SECTION_BEGIN.format(name=name), f"## {name}", "",
           f"Rendered by `tools/gen_zoo_table.py --rows ... --section {name!r}` on "
           f"{time.strftime('%Y-%m-%d', time.gmtime())} from the rows of a test run ({len(rows)} rows, "
           f"{total:.0f} s of export in all, on 2 CPU cores shared with other jobs, {load}). Measured with:", "",
           f"    {command}", "",
           f"Columns as in the table above; the tests require ORT / torch max abs ≤ {atol:g} and ≤ 1e-4 × the largest",
           "|output|. The export time includes the training contract's checks (audit and train parity).", "",
           "| family | model (input) | export | ORT max abs | torch max abs | params torch / Keras | bf16 | graph breaks | compile | train parity | train step torch / Keras |",
           "|---|---|---|---|---|---|---|---|---|---|---|", *lines, ""]
    if notes:
        out += [f"### Notes ({name})", ""] + [f"{p}{i}. {n}" for i, n in enumerate(notes, 1)] + [""]
    return "\n".join(out + [SECTION_END.format(name=name)]) + "\n"


def existing_sections(page: str) -> list[tuple[str, str]]:
    """The ``(name, text)`` of every section block of ``page`` (between its begin / end markers), in order."""
    found = []
    for m in re.finditer(r"<!-- zoo-section:(.+?):begin -->", page):
        name = m.group(1)
        end = SECTION_END.format(name=name)
        j = page.find(end, m.start())
        if j >= 0:
            found.append((name, page[m.start():j + len(end)] + "\n"))
    return found


def splice_section(page: str, name: str, section: str) -> str:
    """``page`` with the section ``name`` replaced by ``section`` (appended when the page has none)."""
    begin, end = SECTION_BEGIN.format(name=name), SECTION_END.format(name=name)
    if begin in page and end in page:
        i, j = page.index(begin), page.index(end) + len(end)
        return page[:i] + section.rstrip("\n") + page[j:]
    return page.rstrip("\n") + "\n\n" + section


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _gaps(mod) -> dict:
    return {(c.family, c.name): dict(c.gaps) for c in mod.CASES}


def _gap(gaps: dict, row: dict, kind: str) -> str:
    reason = gaps.get((row["family"], row["model"]), {}).get(kind)
    return f". Known gap: {reason}." if reason else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the cases of CI's default run (not slow)")
    ap.add_argument("--only", action="append", default=[], help="substring of a case's model name (repeatable)")
    ap.add_argument("--out", default=str(REPO / "docs" / "zoo.md"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--rows", default=None, metavar="JSONL",
                    help="render the rows a test run wrote (MMBRIDGE_ZOO_ROWS=...) instead of measuring")
    ap.add_argument("--update", default=None, metavar="JSON",
                    help="rows of an earlier run (--json): re-measure only the selected cases, keep the others")
    ap.add_argument("--section", default=None, metavar="NAME",
                    help="with --rows: render the rows as the section NAME of --out (replaced, or appended), "
                         "keeping the rest of the page; the rows are in the cases' order")
    ap.add_argument("--command", default=None, help="with --rows: the command(s) that measured the rows, shown on the "
                                                    "page (separate several with ' ;; ')")
    args = ap.parse_args(argv)
    if args.section and not args.rows:
        ap.error("--section needs --rows (the rows file of a test run)")
    mod = _cases_module()
    if args.rows:
        got = [json.loads(ln) for ln in Path(args.rows).read_text().splitlines() if ln.strip()]
        by_key = {(r["family"], r["model"]): r for r in got}
        rows = [by_key[(c.family, c.name)] for c in mod.CASES if (c.family, c.name) in by_key]
        if args.section:
            out = Path(args.out)
            page = out.read_text() if out.exists() else ""
            section = render_section(args.section, rows, mod.PARITY_ATOL,
                                     args.command or f"MMBRIDGE_ZOO=1 {mod.ROWS_ENV}={args.rows} PYTHONPATH=. "
                                                     "python -m pytest tests/export/test_families.py",
                                     gaps=_gaps(mod))
            _atomic_write(out, splice_section(page, args.section, section))
            print(f"wrote section {args.section!r} of {args.out} ({len(rows)} rows)")
            return 0
        page = render(rows, mod.PARITY_ATOL, sum(r.get("export_s", 0) for r in rows),
                      source="the rows of a `pytest tests/export/test_families.py` run "
                             f"({mod.ROWS_ENV}=...; export time only)",
                      gaps=_gaps(mod), measured_with=args.command)
        out = Path(args.out)
        kept = existing_sections(out.read_text()) if out.exists() else []
        for name, section in kept:  # the --section blocks of the page (rendered from other runs) stay
            page = splice_section(page, name, section)
        _atomic_write(out, page)
        print(f"wrote {args.out} ({len(rows)} rows; kept sections {[n for n, _ in kept]})")
        return 0
    cases = [c for c in mod.CASES if (not args.fast or not c.slow)
             and (not args.only or any(o.lower() in c.name.lower() for o in args.only))]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmbridge-zoo-") as tmp:
        for c in cases:
            t = time.perf_counter()
            row = mod.measure(c, str(Path(tmp) / "cache"), tempfile.mkdtemp(dir=tmp))
            print(f"{c.family:20s} {c.name:32s} {time.perf_counter() - t:6.1f} s  "
                  f"{json.dumps({k: v for k, v in row.items() if k not in ('family', 'model')}, default=str)}",
                  flush=True)
            rows.append(row)
    seconds = time.perf_counter() - t0
    if args.update:
        old = json.loads(Path(args.update).read_text())
        new = {(r["family"], r["model"]): r for r in rows}
        order = [(c.family, c.name) for c in mod.CASES]
        merged = {(r["family"], r["model"]): r for r in old} | new
        rows = [merged[k] for k in order if k in merged]
    text = render(rows, mod.PARITY_ATOL, seconds, gaps=_gaps(mod))
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
