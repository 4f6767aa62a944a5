"""``tools/gen_zoo_table.py``: rendering a section of rows into an existing page (no export, no TF)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("gen_zoo_table", REPO / "tools" / "gen_zoo_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ROWS = [
    {"family": "keras.applications", "model": "InceptionV3", "export": True, "export_s": 12.3, "ort_max_abs": 2e-6,
     "ref_scale": 1.0, "torch_max_abs": 3e-6, "keras_params": 10, "torch_params": 10, "unread_params": 0,
     "bf16_ok": True, "bf16_rel_err": 1e-3, "graph_breaks": 0, "compile_max_abs": 0.0, "compile_backend": "aot_eager",
     "input_shape": {"input": ["batch", 75, 75, 3]}, "loadavg_1min": 3.5},
    {"family": "keras.applications", "model": "Xception", "export": False, "error": "ExportError: boom",
     "loadavg_1min": 5.0},
    {"family": "keras.applications", "model": "NASNetLarge", "export": False, "not_run": "past the 600 s limit"},
]


def test_section_is_spliced_in_place_and_keeps_the_page(tool):
    page = "# Zoo\n\n| main table |\n\n## Notes\n\n1. a main note\n"
    sec = tool.render_section("keras.applications", ROWS, 1e-4, "CMD")
    once = tool.splice_section(page, "keras.applications", sec)
    assert once.startswith(page.rstrip("\n")) and "1. a main note" in once
    assert "| keras.applications | InceptionV3 (75×75) | ok (12 s) |" in once
    assert "| Xception | **no** (note KA1) |" in once and "KA1. keras.applications Xception: ExportError: boom" in once
    assert "| NASNetLarge | not run here (note KA2) |" in once and "KA2. keras.applications NASNetLarge: past" in once
    assert "load average 3.5–5" in once and "    CMD" in once
    # a second render replaces the section instead of appending another
    twice = tool.splice_section(once, "keras.applications", sec.replace("CMD", "CMD2"))
    assert twice.count("## keras.applications") == 1 and "CMD2" in twice and "    CMD\n" not in twice
    assert twice.startswith(page.rstrip("\n"))


def test_cli_section_needs_rows(tool, tmp_path):
    with pytest.raises(SystemExit):
        tool.main(["--section", "x", "--out", str(tmp_path / "z.md")])


def test_cli_renders_a_rows_file_as_a_section(tool, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:1]))
    out = tmp_path / "zoo.md"
    out.write_text("# Zoo\n\nkept\n")
    assert tool.main(["--rows", str(rows), "--section", "keras.applications", "--out", str(out), "--command", "C"]) == 0
    text = out.read_text()
    assert text.startswith("# Zoo\n\nkept\n") and "InceptionV3 (75×75)" in text and "<!-- zoo-section:keras.applications:end -->" in text


def test_train_parity_and_train_step_cells(tool):
    row = dict(ROWS[0], train_parity_worst_ratio=0.1234, train_parity_batch=4, train_parity_keras_floor=True,
               train_parity_inconclusive=7, train_parity_variables=20, train_step_ratio=1.234,
               torch_train_step_ms=12.3, keras_train_step_ms=9.97, train_step_batch=2, torch_threads=1,
               tf_intra_op_threads="1")
    lines, _ = tool.table_lines([row, ROWS[1], dict(ROWS[0], train_parity_skipped="no trainable variables"),
                                 dict(ROWS[0], trainable_export=False)], {})
    assert "| frozen export (trainable=False) |" in lines[3]
    unpinned, _ = tool.table_lines([dict(row, torch_threads=2, tf_intra_op_threads="default", train_parity_passed=False)], {})
    assert unpinned[0].endswith("| **no** (0.12, b4, Keras floor, 7/20 below noise) | 1.23× (12.3 / 9.97 ms, b2, "
                                "threads torch 2 / TF default) |")
    assert lines[0].endswith("| ok (0.12, b4, Keras floor, 7/20 below noise) | 1.23× (12.3 / 9.97 ms, b2) |")
    assert lines[1].count("| – ") == 8  # a refused export: the 8 measured columns empty, the table stays 11 wide
    assert lines[2].endswith("| skipped | not run |")
    assert all(ln.count("|") == 12 for ln in lines)


def test_rendering_the_main_table_keeps_the_page_sections(tool, tmp_path):
    sec = tool.render_section("keras.applications", ROWS, 1e-4, "CMD")
    page = tool.splice_section("# old main table\n", "keras.applications", sec)
    kept = tool.existing_sections(page)
    assert [n for n, _ in kept] == ["keras.applications"] and kept[0][1].strip() == sec.strip()
    fresh = tool.splice_section("# new main table\n", *kept[0])
    assert fresh.startswith("# new main table") and "InceptionV3 (75×75)" in fresh and "old main" not in fresh
