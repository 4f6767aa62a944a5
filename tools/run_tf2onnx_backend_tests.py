"""Run tf2onnx's own backend tests (``tests/test_backend.py``, tag v1.17.0) through mmbridge.

Each selected test method of tf2onnx's ``BackendTests`` is run with its ``run_test_case``
(``Tf2OnnxBackendTestBase`` in ``tests/backend_test_base.py``) intercepted: instead of tf2onnx's
own conversion, every call's TF function, feed dict and tolerance are captured and then run our
way:

1. TF reference: the test function run eagerly on the test's own feed (as tf2onnx does:
   ``tf.random.set_seed(1)``, inputs converted with their numpy dtype).
2. ``mmbridge.export(tf.function(func, input_signature=...), sample_inputs=feed)`` with the
   feed's static shapes (variant ``static``) and, where the function traces with unknown dims,
   again with every dim unknown (variant ``dynamic``; same feed).
3. ``mmbridge.to_ort(art)`` and ``mmbridge.to_torch(art, trainable=False)`` called on the feed,
   each output compared with TF.

Each (call, variant, backend) is classified:

* ``exact`` - same shape and dtype, values bit-equal (NaN equal to NaN);
* ``tolerance`` - same shape and dtype, floats within the test's own rtol/atol or mmbridge's
  parity tolerance (``mmbridge.parity.TOLERANCES``: atol 1e-5, rtol 1e-4 for float32); the max
  abs error is recorded (``mtol`` tests: mismatching fraction within the test's ``mtol``);
* ``refused_export`` - ``mmbridge.export`` raised an :class:`mmbridge.errors.MMBridgeError`
  (its first line is recorded);
* ``refused_ort`` / ``refused_torch`` - ``to_ort`` / ``to_torch`` (or the module call) raised an
  ``MMBridgeError``;
* ``wrong`` - **silently wrong**: a value, shape, dtype or output count differs from TF and
  nothing raised;
* ``crash`` - a raw exception that is not an ``MMBridgeError`` (export, conversion or call);
* ``n/a`` - the case does not apply (see "Selection").

Selection (``SKIP_PATTERNS`` below): every ``test_*`` method of ``BackendTests`` whose name
matches none of the skip patterns - string ops (need onnxruntime-extensions custom ops; no
torch strings), control flow, RNNs, quantization, random ops, hash tables, ragged / sparse /
set ops, NMS, CTC, FFT, linear algebra decompositions and tf2onnx-harness features
(``inputs_as_nchw``, TF1 sessions, large-model format, tflite/tfjs). Calls that pass
tf2onnx-specific harness options (``process_args``, ``as_session``, ``premade_placeholders``,
a separate ``onnx_feed_dict``) or feed string / unsigned inputs are recorded as ``n/a``.
tf2onnx's opset decorators see opset 17 (``TF2ONNX_TEST_OPSET``, mmbridge's default opset).

Getting the tf2onnx sources (they are not in the pip package)::

    git clone --depth 1 --branch v1.17.0 https://github.com/onnx/tensorflow-onnx /tmp/tensorflow-onnx

Usage (repository root)::

    PYTHONPATH=. python tools/run_tf2onnx_backend_tests.py --tf2onnx-src /tmp/tensorflow-onnx
    PYTHONPATH=. python tools/run_tf2onnx_backend_tests.py --tf2onnx-src /tmp/tensorflow-onnx -k floordiv -k onehot
    PYTHONPATH=. python tools/run_tf2onnx_backend_tests.py --tf2onnx-src /tmp/tensorflow-onnx --limit 20 --no-dynamic

Writes ``docs/tf2onnx_backend.json`` and ``docs/tf2onnx_backend.md`` (``--json`` / ``--md`` to
change). Exit status 1 when any case is ``wrong`` (silently wrong) - the issue's done-when is
zero of them on either backend. ``tools/gen_op_table.py`` builds ``docs/ops.md`` from the JSON.

tf2onnx's ``tests/common.py`` imports ``parameterized`` (only for its ms-domain decorator); when
it is not installed a stub is put in ``sys.modules`` that skips those (ms-domain) tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TF2ONNX_TAG = "v1.17.0"
OPSET = 17
COMMAND = ("PYTHONPATH=. python tools/run_tf2onnx_backend_tests.py --tf2onnx-src DIR   "
           "# DIR: git clone --depth 1 --branch v1.17.0 https://github.com/onnx/tensorflow-onnx")

# A test whose name contains one of these is not run (the reason is recorded in the JSON).
SKIP_PATTERNS: dict[str, str] = {
    "string": "string op (onnxruntime-extensions custom ops; torch has no string tensors)",
    "lower": "string op", "upper": "string op", "asstring": "string op",
    "multinomial": "random op", "random": "random op", "sample_distorted": "random op",
    "dropout": "random op in training mode",
    "qdq": "quantization", "quantiz": "quantization", "fakequant": "quantization",
    "matmulinteger": "quantization",
    "hashtable": "hash table", "ragged": "ragged tensors", "sparse": "sparse tensors",
    "test_set_": "set ops", "unique": "unique (data-dependent shapes, not in preprocessing/encoders)",
    "bincount": "bincount", "dynamic_partition": "dynamic partition", "dynamic_stitch": "dynamic stitch",
    "segment": "segment ops", "non_max_suppression": "NMS (detection post-processing)",
    "ctc": "CTC decoder", "fft": "FFT", "determinant": "linear algebra", "inverse": "linear algebra",
    "large_model": "tf2onnx large-model format", "gpu": "GPU-only kernel",
    "nchw_arg": "tf2onnx inputs_as_nchw/outputs_as_nchw harness", "graph_matcher": "tf2onnx internals",
    "placeholder_with_default": "TF1 placeholders", "fold_cond": "control flow",
    "lstm": "RNN", "gru": "RNN", "rnn": "RNN", "maxpoolwithargmax": "argmax pooling (not in encoders)",
    "softmax_cross_entropy": "loss op", "bfloat": "bfloat16 (owned by branch opfix)",
    "tf_div": "TF1 tf.div", "_opset": "tf2onnx opset-specific variant",
}

STATUSES = ("exact", "tolerance", "refused_export", "refused_ort", "refused_torch", "wrong", "crash", "n/a")
LAST: dict[str, float] = {"max_rel": 0.0}
BORING_OPS = {"Placeholder", "Identity", "NoOp", "Const", "_Arg", "_Retval", "IdentityN", "StopGradient"}


class CaseTimeout(Exception):
    """A case ran past ``--timeout``."""


@contextlib.contextmanager
def _alarm(seconds: int):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _first_line(exc: BaseException, n: int = 300) -> str:
    """The error's first line, plus the ``- ...`` bullet lines that follow it (the ops a
    "no converter" error lists), shortened to ``n`` characters."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    line = " ".join([lines[0]] + [ln for ln in lines[1:6] if ln.startswith("- ")])
    return line if len(line) <= n else line[: n - 3] + "..."


def _stub_parameterized() -> None:
    try:
        import parameterized  # noqa: F401
    except ImportError:
        import unittest

        mod = types.ModuleType("parameterized")

        class parameterized:  # noqa: N801  (the real package's spelling)
            @staticmethod
            def expand(*args, **kwargs):
                def deco(fn):
                    def skipped(self, *a, **k):
                        raise unittest.SkipTest("ms-domain (parameterized) test: not run")
                    skipped.__name__ = fn.__name__
                    return skipped
                return deco

        mod.parameterized = parameterized
        sys.modules["parameterized"] = mod


def load_backend_tests(src: Path):
    """Import tf2onnx's ``tests/test_backend.py`` from a checkout; returns its ``BackendTests``."""
    tests = src / "tests"
    if not (tests / "test_backend.py").is_file() or not (tests / "backend_test_base.py").is_file():
        raise SystemExit(f"--tf2onnx-src {src}: no tests/test_backend.py / tests/backend_test_base.py there; "
                         f"get them with: git clone --depth 1 --branch {TF2ONNX_TAG} "
                         "https://github.com/onnx/tensorflow-onnx DIR")
    os.environ.setdefault("TF2ONNX_TEST_OPSET", str(OPSET))
    os.environ.setdefault("TF2ONNX_SKIP_TFLITE_TESTS", "TRUE")
    os.environ.setdefault("TF2ONNX_SKIP_TFJS_TESTS", "TRUE")
    _stub_parameterized()
    sys.path.insert(0, str(tests))
    import test_backend  # noqa: PLC0415  (their module; TF is already imported through mmbridge)

    return test_backend.BackendTests


def skip_reason(name: str) -> str | None:
    for pat, why in SKIP_PATTERNS.items():
        if pat in name:
            return why
    return None


def capture_calls(cls, method: str, on_call) -> tuple[int, str | None]:
    """Run one test method with ``run_test_case`` intercepted: each call is handed to
    ``on_call(index, call)`` at once, inside the test's own loop (test functions close over loop
    variables, so a call run later would see the last iteration's op). Returns the number of
    calls and the reason the method was skipped or failed before any call (or ``None``)."""
    import unittest

    n = [0]

    def fake_run_test_case(self, func, feed_dict, input_names_with_port, output_names_with_port, **kw):
        call = {"func": func, "feed": dict(feed_dict), "outputs": list(output_names_with_port), "kw": kw}
        on_call(n[0], call)
        n[0] += 1
        return None

    case = cls(method)
    case.run_test_case = types.MethodType(fake_run_test_case, case)
    note = None
    try:
        case.setUp()
        getattr(case, method)()
    except unittest.SkipTest as e:
        note = f"skipped by tf2onnx: {e}"
    except Exception as e:  # the method used run_test_case's return value, or asserted on its graph
        if not n[0]:
            note = f"test method failed before any run_test_case: {_first_line(e)}"
    return n[0], note


def _na_reason(call: dict) -> str | None:
    kw = call["kw"]
    for opt in ("process_args", "onnx_feed_dict", "graph_validator_only"):
        if kw.get(opt):
            return f"uses tf2onnx harness option {opt}"
    if kw.get("as_session") or kw.get("premade_placeholders"):
        return "TF1 session graph"
    if kw.get("use_custom_ops"):
        return "needs onnxruntime-extensions custom ops"
    import numpy as np

    for k, v in call["feed"].items():
        v = np.asarray(v)
        if v.dtype.kind in "OSU":
            return f"string input {k}"
        if v.dtype in (np.uint16, np.uint32, np.uint64):
            return f"input {k} is {v.dtype} (torch has no such tensors)"
    return None


def _tf_ops(concrete) -> list[str]:
    gd = concrete.graph.as_graph_def()
    ops = {n.op for n in gd.node}
    for f in gd.library.function:
        ops |= {n.op for n in f.node_def}
    return sorted(ops - BORING_OPS)


def compare(want: list, got: list, rtol: float, atol: float, mtol: float | None, check_value: bool,
            check_shape: bool, check_dtype: bool) -> tuple[str, float | None, str]:
    """Compare backend outputs with TF's: ``(status, max_abs, detail)``; status is one of
    ``exact``, ``tolerance``, ``wrong``. The largest relative error of the last call is left in
    ``LAST["max_rel"]`` (``|got - tf| / max(|tf|, 1)`` over finite elements)."""
    LAST["max_rel"] = 0.0
    import numpy as np

    if len(got) != len(want):
        return "wrong", None, f"{len(got)} outputs, TF gives {len(want)}"
    status, worst, notes = "exact", 0.0, []
    for i, (w, g) in enumerate(zip(want, got)):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape and (check_shape or w.size != g.size):
            return "wrong", None, f"output {i}: shape {list(g.shape)}, TF {list(w.shape)}"
        g = g.reshape(w.shape)
        if w.dtype != g.dtype:
            if check_dtype:
                return "wrong", None, f"output {i}: dtype {g.dtype}, TF {w.dtype}"
            g = g.astype(w.dtype)
        if not check_value:
            notes.append(f"output {i}: values not compared (the test sets check_value=False)")
            status = "tolerance" if status == "exact" else status
            continue
        if w.dtype.kind in "fc":
            if np.array_equal(w, g, equal_nan=True):
                continue
            same_nan = np.array_equal(np.isnan(w), np.isnan(g)) and np.array_equal(np.isinf(w), np.isinf(g))
            finite = np.isfinite(w) & np.isfinite(g)
            inf_ok = np.array_equal(w[np.isinf(w)], g[np.isinf(g)]) if same_nan else False
            diff = np.abs(w[finite].astype(np.float64) - g[finite].astype(np.float64))
            err = float(diff.max()) if diff.size else 0.0
            worst = max(worst, err)
            if diff.size:
                LAST["max_rel"] = max(LAST["max_rel"], float((diff / np.maximum(np.abs(w[finite].astype(np.float64)), 1.0)).max()))
            mm_tol = (1e-10, 1e-9) if w.dtype == np.float64 else ((1e-2, 1e-2) if w.dtype == np.float16 else (1e-5, 1e-4))
            ok = same_nan and inf_ok and any(
                np.allclose(w[finite], g[finite], rtol=r, atol=a) for a, r in ((atol, rtol), mm_tol))
            if not ok and same_nan and inf_ok and mtol is not None:
                bad = ~np.isclose(w[finite], g[finite], rtol=rtol, atol=atol)
                if bad.mean() <= mtol:
                    ok = True
                    notes.append(f"output {i}: {bad.mean():.1%} of elements beyond tolerance (test mtol {mtol})")
            if not ok:
                where = "NaN/Inf positions differ" if not (same_nan and inf_ok) else f"max abs {err:.3g}"
                return "wrong", err, f"output {i}: {where} (test rtol {rtol:g} atol {atol:g})"
            status = "tolerance"
        elif not np.array_equal(w, g):
            n = int((w != g).sum())
            return "wrong", None, f"output {i}: {n} of {w.size} values differ"
    return status, (worst if status == "tolerance" else 0.0), "; ".join(notes)


def _flatten(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x]


def run_call(call: dict, variant: str, tf, cache: str, name: str, timeout: int) -> dict:
    """Export one captured call (``static`` or ``dynamic`` input signature) and run both backends."""
    import numpy as np
    import torch

    import mmbridge
    from mmbridge.errors import MMBridgeError

    feed = {k.split(":")[0]: np.array(v, order="C") for k, v in call["feed"].items()}  # keeps 0-d arrays 0-d
    kw = call["kw"]
    rec: dict = {"variant": variant, "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in feed.items()},
                 "status": {}, "max_abs": {}, "detail": {}}
    sig = [tf.TensorSpec(v.shape if variant == "static" else [None] * v.ndim, tf.as_dtype(v.dtype), name=k)
           for k, v in feed.items()]
    func = call["func"]
    try:
        concrete = tf.function(func, input_signature=sig).get_concrete_function()
    except Exception as e:
        rec["status"] = {"ort": "n/a", "torch": "n/a"}
        rec["detail"] = {"ort": f"the test function does not trace with this signature: {_first_line(e)}"}
        rec["detail"]["torch"] = rec["detail"]["ort"]
        return rec
    rec["tf_ops"] = _tf_ops(concrete)
    np.random.seed(1)
    tf.random.set_seed(1)
    want = [np.asarray(t) for t in _flatten(func(*[tf.convert_to_tensor(v, dtype=tf.as_dtype(v.dtype)) for v in feed.values()]))]
    cmp_args = (kw.get("rtol", 1e-7), kw.get("atol", 1e-5), kw.get("mtol"), kw.get("check_value", True),
                kw.get("check_shape", True), kw.get("check_dtype", True))
    t0 = time.perf_counter()
    try:
        with _alarm(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # dynamic: a distinct symbolic name per input and axis (mmbridge ties same-named dims)
            specs = None if variant == "static" else [
                mmbridge.TensorSpec(k, tuple(f"{k}_d{j}" for j in range(v.ndim)), str(v.dtype)) for k, v in feed.items()]
            art = mmbridge.export(tf.function(func, input_signature=sig), input_specs=specs, sample_inputs=feed,
                                  cache_dir=cache, name=name, opset=OPSET)
    except MMBridgeError as e:
        rec["status"] = {"ort": "refused_export", "torch": "refused_export"}
        rec["detail"] = {"ort": _first_line(e), "torch": _first_line(e)}
        rec["export_s"] = round(time.perf_counter() - t0, 2)
        return rec
    except Exception as e:
        rec["status"] = {"ort": "crash", "torch": "crash"}
        rec["detail"] = {"ort": f"export: {_first_line(e)}", "torch": f"export: {_first_line(e)}"}
        return rec
    rec["export_s"] = round(time.perf_counter() - t0, 2)
    rec["onnx_ops"] = sorted({n.op_type for n in art.model.graph.node})
    rec["torch_backend_claimed"] = bool(art.meta.get("backend", {}).get("torch_backend"))
    ins = [torch.from_numpy(v.copy()) for v in feed.values()]
    for backend in ("ort", "torch"):
        stage = "convert"
        try:
            with _alarm(timeout), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mod = mmbridge.to_ort(art) if backend == "ort" else mmbridge.to_torch(art, trainable=False)
                stage = "call"
                with torch.no_grad():
                    out = mod(*ins)
            got = [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in _flatten(out)]
            st, err, detail = compare(want, got, *cmp_args)
            msgs = sorted({str(w.message).splitlines()[0][:200] for w in caught
                           if not issubclass(w.category, DeprecationWarning)})
            if msgs:
                detail = (detail + "; " if detail else "") + "warnings: " + " | ".join(msgs)
            rec["status"][backend], rec["max_abs"][backend], rec["detail"][backend] = st, err, detail
            if st == "tolerance":
                rec.setdefault("max_rel", {})[backend] = LAST["max_rel"]
        except MMBridgeError as e:
            rec["status"][backend] = f"refused_{backend}"
            rec["detail"][backend] = f"{stage}: {_first_line(e)}"
        except Exception as e:
            rec["status"][backend] = "crash"
            rec["detail"][backend] = f"{stage}: {_first_line(e)}"
    return rec


def render_md(doc: dict) -> str:
    """Markdown summary of the JSON written by :func:`main`."""
    cases = [c for c in doc["cases"] if "status" in c]
    lines = ["# tf2onnx's backend tests through mmbridge (generated)", "",
             "<!-- generated by tools/run_tf2onnx_backend_tests.py; do not edit by hand -->", "",
             f"tf2onnx {doc['meta']['tf2onnx_tag']} `tests/test_backend.py`: each selected test's TF function and "
             "feed, exported with `mmbridge.export` (static shapes, and every dim unknown where the function "
             "traces that way), run with `to_ort()` and `to_torch(trainable=False)` on the test's own feed and "
             "compared with TF. Statuses are defined in the script's docstring; **wrong** means a value, shape, "
             "dtype or output count differs from TF with no error.", "",
             f"Command: `{doc['meta']['command']}`", "",
             f"Test methods: {doc['meta']['methods_selected']} selected of {doc['meta']['methods_total']} "
             f"({doc['meta']['methods_skipped']} skipped by pattern, {doc['meta']['methods_no_calls']} ran no case); "
             f"{len(cases)} (call, variant) cases; {doc['meta']['seconds']:.0f} s.", "",
             "| variant | backend | " + " | ".join(STATUSES) + " |", "|---|---|" + "---|" * len(STATUSES)]
    for variant in ("static", "dynamic"):
        for backend in ("ort", "torch"):
            row = [c for c in cases if c["variant"] == variant]
            counts = {s: sum(1 for c in row if c["status"].get(backend) == s) for s in STATUSES}
            lines.append(f"| {variant} | {backend} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    for title, states in (("Silently wrong", {"wrong"}), ("Crashes (raw, non-mmbridge exceptions)", {"crash"})):
        rows = [(c, b) for c in cases for b in ("ort", "torch") if c["status"].get(b) in states]
        lines += ["", f"## {title}: {len(rows)}", ""]
        if not rows:
            lines.append("None.")
            continue
        lines += ["| case | variant | backend | status | TF ops | detail |", "|---|---|---|---|---|---|"]
        for c, b in rows:
            detail = c["detail"].get(b, "").replace("|", "\\|")
            owner = f" **(owner: {c['owner']})**" if c.get("owner") and c["status"].get(b) == "wrong" else ""
            lines.append(f"| `{c['id']}` | {c['variant']} | {b} | {c['status'][b]}{owner} | "
                         f"{', '.join(c.get('tf_ops', [])[:6])} | {detail[:300]} |")
    groups: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        for b in ("ort", "torch"):
            st = c["status"].get(b, "")
            if st.startswith("refused") and not (b == "torch" and st == "refused_export"):  # export refusals once
                why = re.sub(r"'test_[A-Za-z0-9_#]+'", "'<case>'", c["detail"].get(b, ""))
                why = re.sub(r"(__|_)\d+\b", r"\1N", why)[:220].replace("|", "\\|")
                groups.setdefault((st if st == "refused_export" else f"{st}", why), []).append(f"{c['id']} [{c['variant']}]")
    lines += ["", f"## Refused (clear mmbridge errors): {sum(len(v) for v in groups.values())} (export refusals "
              "counted once for both backends)", "", "| status | n | reason (first line) | cases |", "|---|---|---|---|"]
    for (st, why), ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        more = f" and {len(ids) - 4} more" if len(ids) > 4 else ""
        lines.append(f"| {st} | {len(ids)} | {why} | {', '.join(f'`{i}`' for i in ids[:4])}{more} |")
    na = {}
    for c in doc["cases"]:
        if c["status"].get("ort") == "n/a":
            na.setdefault(re.sub(r"\{\{.*?\}\}", "", c["detail"].get("ort", ""))[:160], []).append(c["id"])
    lines += ["", f"## Not applicable: {sum(len(v) for v in na.values())}", "", "| n | why | cases |", "|---|---|---|"]
    for why, ids in sorted(na.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {len(ids)} | {why.replace('|', '/')} | {', '.join(f'`{i}`' for i in ids[:4])} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["meta"]["versions"].items()), ""]
    return "\n".join(lines)


# Known wrong cases owned by another branch (classified, not fixed here): id substring -> owner.
OWNED_ELSEWHERE = {
    "adjust_saturation": "opfix", "crop_and_resize_nearest": "opfix", "bfloat": "opfix",
}


def _merged(full: dict, rerun: dict, methods: list[str], argv: list[str]) -> dict:
    """``full`` with the cases (and no-call entries) of ``methods`` replaced by ``rerun``'s, in place of
    the first replaced case; ``full["meta"]["reruns"]`` gains one entry (argv, methods, versions, seconds)."""
    chosen = set(methods)
    kept = [c for c in full["cases"] if c["test"] not in chosen]
    at = next((i for i, c in enumerate(full["cases"]) if c["test"] in chosen), len(kept))
    full["cases"] = kept[:at] + rerun["cases"] + kept[at:]
    full["no_calls"] = {**{m: r for m, r in full["no_calls"].items() if m not in chosen}, **rerun["no_calls"]}
    meta = rerun["meta"]
    full["meta"].setdefault("reruns", []).append({"argv": argv, "methods": sorted(chosen), "seconds": meta["seconds"],
                                                  "versions": meta["versions"]})
    return full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf2onnx-src", type=Path,
                        help=f"a checkout of github.com/onnx/tensorflow-onnx at {TF2ONNX_TAG}")
    parser.add_argument("-k", action="append", default=[], help="only test methods whose name contains this (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test methods")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the all-dims-unknown variant")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per export / backend call")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "tf2onnx_backend.json")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "tf2onnx_backend.md")
    parser.add_argument("--render-only", action="store_true", help="only re-write --md from an existing --json")
    parser.add_argument("--merge", action="store_true",
                        help="re-run only the methods chosen with -k and replace their cases in the existing --json "
                             "(the rest of the record, and its meta, are kept; the re-run is listed in meta.reruns)")
    args = parser.parse_args(argv)
    if args.merge and not args.k:
        parser.error("--merge needs -k (the methods to re-run)")
    if args.render_only:
        args.md.write_text(render_md(json.loads(args.json.read_text(encoding="utf-8"))), encoding="utf-8")
        return 0
    our_argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = sys.argv[:1]  # tf2onnx's tests/common.py parses sys.argv for its own options
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import mmbridge

    mmbridge.preload_torch_stack()
    import mmbridge.export.handlers  # noqa: F401  (onnxruntime-extensions before TF)
    from mmbridge.export._tf import import_tensorflow

    tf = import_tensorflow()
    import logging

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    if args.tf2onnx_src is None:
        parser.error("--tf2onnx-src DIR is required (git clone --depth 1 --branch v1.17.0 "
                     "https://github.com/onnx/tensorflow-onnx DIR)")
    cls = load_backend_tests(args.tf2onnx_src.resolve())
    methods = sorted(m for m in dir(cls) if m.startswith("test_") and callable(getattr(cls, m)))
    skipped = {m: skip_reason(m) for m in methods if skip_reason(m)}
    chosen = [m for m in methods if m not in skipped and (not args.k or any(k in m for k in args.k))]
    if args.limit is not None:
        chosen = chosen[: args.limit]
    t0 = time.perf_counter()
    cases: list[dict] = []
    no_calls: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mmbridge-tf2onnx-") as cache:
        for m in chosen:
            first = len(cases)

            def on_call(i: int, call: dict, m: str = m) -> None:
                cid = f"{m}#{i}"
                na = _na_reason(call)
                for variant in ("static",) if args.no_dynamic else ("static", "dynamic"):
                    if na:
                        rec = {"variant": variant, "status": {"ort": "n/a", "torch": "n/a"},
                               "detail": {"ort": na, "torch": na}, "max_abs": {}}
                    elif variant == "dynamic" and all(np_ndim(v) == 0 for v in call["feed"].values()):
                        continue
                    else:
                        name = re.sub(r"[^A-Za-z0-9_]", "_", f"{cid}_{variant}")
                        try:
                            rec = run_call(call, variant, tf, cache, name, args.timeout)
                        except Exception as e:  # the TF reference itself failed
                            rec = {"variant": variant, "status": {"ort": "n/a", "torch": "n/a"},
                                   "detail": {"ort": f"TF reference failed: {_first_line(e)}",
                                              "torch": f"TF reference failed: {_first_line(e)}"}, "max_abs": {}}
                    rec = {"id": cid, "test": m, **rec}
                    owner = next((o for pat, o in OWNED_ELSEWHERE.items() if pat in cid), None)
                    if owner:
                        rec["owner"] = owner
                    cases.append(rec)
                    print(f"{rec['status']['ort']:>14s} {rec['status']['torch']:>14s}  {cid} [{variant}]  "
                          f"{rec['detail'].get('torch', '')[:120] if rec['status']['torch'] != 'exact' else ''}",
                          flush=True)
                    if na:
                        break

            n_calls, note = capture_calls(cls, m, on_call)
            if not n_calls:
                no_calls[m] = note or "no run_test_case call"
                print(f"--        {m}: {no_calls[m]}", flush=True)
            elif n_calls == 1:
                for rec in cases[first:]:
                    rec["id"] = m  # one call: the id is the test's name
    from mmbridge import info

    versions = {k: v for k, v in info.versions().items() if v and k in
                ("mmbridge", "tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime", "onnx2torch", "torch")}
    doc = {"meta": {"tf2onnx_tag": TF2ONNX_TAG, "opset": OPSET, "command": COMMAND, "argv": our_argv,
                    "methods_total": len(methods), "methods_selected": len(chosen),
                    "methods_skipped": len(skipped), "methods_no_calls": len(no_calls),
                    "seconds": round(time.perf_counter() - t0, 1), "versions": versions,
                    "skip_patterns": SKIP_PATTERNS},
           "skipped_methods": skipped, "no_calls": no_calls, "cases": cases}
    if args.merge:
        doc = _merged(json.loads(args.json.read_text(encoding="utf-8")), doc, chosen, our_argv)
        cases = doc["cases"]
    for c in cases:
        c["detail"] = {b: d for b, d in c.get("detail", {}).items() if d}
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1)[:-2]
    body = ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)
    text_json = head + ',\n "cases": [\n' + body + "\n]}\n"  # one case per line: small diffs
    json.loads(text_json)
    for path, text in ((args.json, text_json), (args.md, render_md(doc))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # atomic
        print(f"wrote {path}")
    wrong = [c["id"] + f" [{c['variant']}]" for c in cases if "wrong" in c["status"].values()]
    if wrong:
        print("SILENTLY WRONG:\n  " + "\n  ".join(wrong), file=sys.stderr)
    return 1 if wrong else 0


def np_ndim(v) -> int:
    import numpy as np

    return np.asarray(v).ndim


if __name__ == "__main__":
    sys.exit(main())
