"""The package boundaries of docs/design.md, checked from the source (``ast``; nothing is imported).

* no import circle between mmbridge's modules, counting imports inside functions too;
* every import points down the layer table below (same layer or lower);
* TensorFlow / Keras / tf2onnx only in the export stage, the Keras baselines and the tf.data
  adapter; onnxruntime only in the runtime and export stages (ruff's TID251 bans say the same).
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmbridge"

# lowest first; a module may import modules of its own layer or lower ones
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("mmbridge._version", "mmbridge._callable", "mmbridge.errors", "mmbridge._registry", "mmbridge.specs",
              "mmbridge.info", "mmbridge._torch_stack")),
    ("onnx layer and store", ("mmbridge.graph", "mmbridge.graph.*", "mmbridge.store", "mmbridge.registry")),
    ("backends", ("mmbridge.runtime", "mmbridge.runtime.*", "mmbridge.convert", "mmbridge.convert.*")),
    ("artifact", ("mmbridge.artifact",)),
    ("parity and composition", ("mmbridge.parity", "mmbridge.testing", "mmbridge.composition",
                                "mmbridge.composition.*")),
    ("export", ("mmbridge.export", "mmbridge.export.*")),
    ("data and training", ("mmbridge.data", "mmbridge.data.*", "mmbridge.train", "mmbridge.train.*")),
    ("baselines", ("mmbridge.baselines", "mmbridge.baselines.*")),
    ("applications", ("mmbridge.bench", "mmbridge.bench.*", "mmbridge.demo", "mmbridge.cli", "mmbridge.cli.*",
                      "mmbridge._sample", "mmbridge._sample.*")),
    ("package", ("mmbridge", "mmbridge.__main__")),
]
TF_MODULES = ("tensorflow", "keras", "tf2onnx", "tf_keras")
TF_ALLOWED = ("mmbridge.export.*", "mmbridge.baselines.*", "mmbridge.data.tf_adapter")
ORT_ALLOWED = ("mmbridge.runtime.*", "mmbridge.export.*")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of the module, nested ones too."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    mods = _modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    raw: dict[str, list[tuple[str, int]]] = {}
    for m, p in mods.items():
        raw[m] = _imports(m, p, known)
        for target, _ in raw[m]:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != m and not (target == "mmbridge" and m != "mmbridge"):
                edges[m].add(target)
    return edges, raw


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py::LAYERS; add it where it belongs")


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_no_import_circle():
    edges, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers():
    edges, _ = _graph()
    up = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
          for m, ts in edges.items() for t in ts if _layer(t) > _layer(m)]
    assert not up, "imports that point up the layers of docs/design.md:\n" + "\n".join(sorted(up))


@pytest.mark.parametrize(("banned", "allowed"), [(TF_MODULES, TF_ALLOWED), (("onnxruntime",), ORT_ALLOWED)],
                         ids=["tensorflow-keras-tf2onnx", "onnxruntime"])
def test_third_party_stages_stay_in_their_packages(banned, allowed):
    _, raw = _graph()
    bad = [f"{m}:{line} imports {t}" for m, imps in raw.items() for t, line in imps
           if t.split(".")[0] in banned and not any(fnmatch.fnmatchcase(m, a) for a in allowed)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_circle(tmp_path, monkeypatch):
    """The circle check itself can fail: a two-module circle is reported."""
    pkg = tmp_path / "mmbridge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from mmbridge import specs\n")
    (pkg / "specs.py").write_text("def f():\n    from mmbridge.errors import X\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg, raising=False)
    globals()["ROOT"] = pkg
    try:
        with pytest.raises(pytest.fail.Exception, match="import circle"):
            test_no_import_circle()
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1] / "mmbridge"
