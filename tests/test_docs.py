"""The docs run as written: every code block of README.md and docs/*.md, in order, as a user pastes them.

* ``python`` blocks of one document run in **one** fresh interpreter (state carries from block to
  block), fed one block at a time, so that the ``bash`` blocks between them run in between;
* ``bash`` / ``sh`` / ``shell`` blocks run with ``bash -euo pipefail`` (``mmbridge`` and ``python``
  are this interpreter's);
* every document runs in one shared working directory (a fresh temporary one), as if the user
  pasted everything into one shell at the repository's root: ``examples/`` is linked in, and the
  session's artifact cache is shared, so the guides' repeated exports are cache hits.

A block that cannot run in CI carries a visible marker on the line before its fence::

    <!-- doc-test: skip (needs SLURM) -->           not run; counted and listed with its reason
    <!-- doc-test: file my_project/bridges.py -->  written to that path (the user saves it there);
                                                    a ``test_*.py`` file is then run with pytest

Any other block that fails is a failure of this test, naming the document, the block's line and
the error. Blocks of other languages (``yaml`` snippets, diagrams) are not code and are not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON, SHELL = ("python",), ("bash", "sh", "shell")
MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|file)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    doc: str
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    action: str        # "run", "skip" or "file"
    arg: str           # the skip reason or the file path

    def where(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang})"


def blocks(path: Path) -> list[Block]:
    """The code blocks of a markdown file, with their doc-test markers."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang not in PYTHON + SHELL:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARKER.search(before)
        action, arg = ("run", "") if mark is None else (mark.group(1), mark.group(2))
        if action == "skip":
            arg = arg.strip("() ")
        out.append(Block(path.relative_to(REPO).as_posix(), text.count("\n", 0, m.start()) + 1, lang,
                         m.group(2), action, arg))
    return out


def test_every_skip_marker_says_why_and_every_file_marker_names_a_path():
    skipped = [b for d in DOCS for b in blocks(d) if b.action == "skip"]
    for b in skipped:
        assert b.arg, f"{b.where()}: `<!-- doc-test: skip (REASON) -->` needs a reason"
    for b in (b for d in DOCS for b in blocks(d) if b.action == "file"):
        assert b.arg and not Path(b.arg).is_absolute() and ".." not in Path(b.arg).parts, b.where()
    # the count, for the log (pytest -s): what the docs show but CI does not run
    print(f"\n{len(skipped)} doc block(s) marked skip:")
    for b in skipped:
        print(f"  {b.where()}: {b.arg}")
    assert sum(b.action == "run" for d in DOCS for b in blocks(d)) >= 10  # the guides do run
    assert {d.name for d in RUNNABLE} >= {"README.md", "user-guide.md", "authoring-guide.md"}


# the interpreter that runs one document's python blocks: one request per line (JSON), the block's
# own output goes to stderr, one result line per request on stdout
DRIVER = textwrap.dedent("""
    import json, sys, traceback
    proto, sys.stdout = sys.stdout, sys.stderr
    ns = {"__name__": "__main__"}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            exec(compile(req["code"], req["name"], "exec"), ns)
            res = {"ok": True}
        except BaseException:
            res = {"ok": False, "error": traceback.format_exc(limit=-8)}
        proto.write(json.dumps(res) + "\\n")
        proto.flush()
""")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The user's shell: one working directory for every document (``examples/`` linked in)."""
    wd = tmp_path_factory.mktemp("docs")
    (wd / "examples").symlink_to(REPO / "examples")
    return wd


def _env(wd: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(wd), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MPLBACKEND="Agg")


class _Python:
    """One fresh interpreter per document, fed one block at a time."""

    def __init__(self, wd: Path, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=wd, env=_env(wd), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, b: Block) -> str | None:
        timer = threading.Timer(BLOCK_TIMEOUT_S, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps({"code": b.code, "name": f"<{b.where()}>"}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            return f"the interpreter died (exit {self.proc.wait()}; killed after {BLOCK_TIMEOUT_S} s?)"
        res = json.loads(line)
        return None if res["ok"] else res["error"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


#: the documents with at least one block to run (the others are all skip markers, or no code)
RUNNABLE = [d for d in DOCS if any(b.action != "skip" for b in blocks(d))]


@pytest.mark.parametrize("doc", RUNNABLE, ids=lambda p: p.name)
def test_doc_blocks_run_in_order(doc, workdir):
    todo = blocks(doc)
    log = workdir / f"{doc.stem}.python.log"
    py = None
    try:
        for b in todo:
            if b.action == "skip":
                continue
            if b.action == "file":
                target = workdir / b.arg
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(b.code)
                if not target.name.startswith("test_"):
                    continue
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", b.arg],
                                      cwd=workdir, env=_env(workdir), capture_output=True, text=True,
                                      timeout=BLOCK_TIMEOUT_S)
                assert proc.returncode == 0, f"{b.where()}: pytest {b.arg} failed:\n{proc.stdout[-3000:]}"
            elif b.lang in PYTHON:
                py = py or _Python(workdir, log)
                error = py.run(b)
                assert error is None, f"{b.where()} failed:\n{error}\n--- output ---\n{log.read_text()[-2000:]}"
            else:
                proc = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=workdir, env=_env(workdir),
                                      capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
                assert proc.returncode == 0, (f"{b.where()} failed (exit {proc.returncode}):\n{b.code}\n--- stdout"
                                              f" ---\n{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    finally:
        if py is not None:
            py.close()
