"""A/B of the per-call overhead on a microsecond graph (issue 16, item 4), in one process.

Run::

    git worktree add /tmp/before main    # the tree to compare against (any commit)
    python benchmarks/ab_us_graph.py --before /tmp/before      # ~1 min on 2 loaded cores

The graph is what tf2onnx writes for ``tf.clip_by_value((x - mu) / sd, -5, 5)`` on float32
``[64, 6]`` (``Sub``, ``Mul`` by ``1 / sd``, ``Min``, ``Max``; ``mu``, ``sd`` from a seeded
generator), built with ``onnx.helper`` so that no TensorFlow is needed. Variants, timed in
interleaved rounds (``--rounds`` x ``--calls`` calls each, after a warm-up), one ORT thread and
one torch thread:

* ``ort_floor``: the pybind ``run_with_iobinding`` on OrtValues bound once (``bare_runners``'s
  ``run_bare.floor``); ``ort_bare_public``: the same through the public ``InferenceSession``
  wrapper;
* ``ort_module``: this tree's ``to_ort()`` module, a plain call; ``ort_module_before``: the
  ``--before`` tree's ``mmbridge/runtime/module.py`` loaded next to it (same session options);
  with ``--parts``, where the module's time goes: ``ort_module_closure`` (its fast-path closure
  called directly: without ``ORTModule.__call__``'s frame and hook checks) and
  ``ort_module_no_pool_check`` (a second module whose fast path was built with
  ``_pool_free`` answering True: without the pool-reuse condition; unsafe, timing only);
* ``torch_native``: ``((x - mu) * (1 / sd)).clamp_(-5, 5)`` under ``torch.no_grad()``;
* ``torch_converted``: this tree's ``to_torch()`` under ``torch.no_grad()``;
  ``torch_converted_stock_calls``: the same module with fx's and ``nn.Module``'s stock
  ``__call__`` (the call wrappers this tree skips), ``torch_converted_unfused``: the fusions off.

The clock is the thread's CPU time (``time.thread_time``; ``--clock wall`` for
``perf_counter``): on a shared machine it leaves out the time the process waits for a core,
which wall time adds to whichever variant happened to run then. Printed: per variant the
median per-call time (IQR) in us, and the median (IQR) of the per-round ratios of the pairs
the issue's goals name, with the load average.

Call form (``--form``): ``held`` (default) times ``out = fn()``, so the previous result is alive
while the next call runs, as in a user's ``y = module(x)`` loop and in the bench's 100-call
blocks (``mmbridge.bench.suites._us_block``); ``dropped`` times ``fn()`` with the result
dropped at once (this script's form before: it hid the ``bind_output`` per call that main's
module paid when the caller held the last result; docs/benchmarks.md has both forms).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmbridge  # noqa: E402,F401  (the tree under test)


def numeric_model(mu: np.ndarray, sd: np.ndarray) -> Any:
    """ONNX ``y = max(min((x - mu) * (1 / sd), 5), -5)``, ``x`` float32 ``[B, F]``."""
    from onnx import TensorProto, helper, numpy_helper

    f = len(mu)
    c = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
         (("mu", mu), ("rsd", 1 / sd), ("hi", 5.0), ("lo", -5.0))]
    nodes = [helper.make_node("Sub", ["x", "mu"], ["a"]), helper.make_node("Mul", ["a", "rsd"], ["b"]),
             helper.make_node("Min", ["b", "hi"], ["c"]), helper.make_node("Max", ["c", "lo"], ["y"])]
    g = helper.make_graph(nodes, "numeric", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", f])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", f])], c)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    s = sorted(v)
    n = len(s)
    return s[n // 4], statistics.median(s), s[(3 * n) // 4]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="a checkout whose mmbridge/runtime/module.py is the 'before'")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--features", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("--parts", action="store_true", help="add the ort_module_closure / ort_module_no_pool_check variants")
    ap.add_argument("--form", choices=("held", "dropped"), default="held",
                    help="held: out = fn() (the last result alive during the next call); dropped: fn()")
    args = ap.parse_args(argv)

    import onnx

    from mmbridge.convert import core, fusions
    from mmbridge.runtime.module import to_ort
    from mmbridge.runtime.session import bare_runners

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    mu = rng.normal(3.0, 0.1, args.features).astype(np.float32)
    sd = rng.uniform(1.5, 2.5, args.features).astype(np.float32)
    x_np = rng.normal(3.0, 2.0, (args.batch, args.features)).astype(np.float32)
    x = torch.from_numpy(x_np)
    tmp = Path(tempfile.mkdtemp(prefix="ab_us_graph_"))
    path = tmp / "numeric.onnx"
    onnx.save(numeric_model(mu, sd), str(path))

    variants: dict[str, Any] = {}
    _, bare, _ = bare_runners(str(path), {"x": x_np}, threads=1)
    variants["ort_floor"] = bare.floor
    variants["ort_bare_public"] = bare
    mod = to_ort(str(path), intra_op_threads=1)
    variants["ort_module"] = lambda: mod(x)
    if args.parts:
        from mmbridge.runtime import module as ort_module

        mod(x)
        closure, args_x = mod._fast, (x,)
        variants["ort_module_closure"] = lambda: closure(args_x)
        saved_free = ort_module._pool_free
        ort_module._pool_free = lambda entry, shape: True  # timing only: never do this outside a benchmark
        try:
            unchecked = to_ort(str(path), intra_op_threads=1)
            unchecked(x)
            unchecked(x)  # the fast path is built here, with the patched helper bound in it
        finally:
            ort_module._pool_free = saved_free
        variants["ort_module_no_pool_check"] = lambda: unchecked(x)  # overwrites held results: timing only
    if args.before is not None:
        spec = importlib.util.spec_from_file_location("_before_module", args.before / "mmbridge/runtime/module.py")
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        mod_before = before.to_ort(str(path), intra_op_threads=1)
        variants["ort_module_before"] = lambda: mod_before(x)
        assert torch.equal(mod(x), mod_before(x))

    mu_t, rsd_t = torch.from_numpy(mu), torch.from_numpy(1 / sd)
    conv = core.to_torch(numeric_model(mu, sd)).eval()
    stock = core.to_torch(numeric_model(mu, sd)).eval()
    stock.recompile()  # fx's stock __call__ again

    class _StockCall(fusions.ConstantElementwise):
        __call__ = torch.nn.Module.__call__

    for m in stock.modules():
        if type(m) is fusions.ConstantElementwise:
            m.__class__ = _StockCall
    saved = fusions.run_all
    fusions.run_all = lambda gm: {}
    try:
        unfused = core.to_torch(numeric_model(mu, sd)).eval()
    finally:
        fusions.run_all = saved

    def in_no_grad(fn: Any) -> Any:
        def run() -> Any:
            with torch.no_grad():
                return fn()
        return run

    variants["torch_native"] = in_no_grad(lambda: ((x - mu_t) * rsd_t).clamp_(-5.0, 5.0))
    variants["torch_converted"] = in_no_grad(lambda: conv(x))
    variants["torch_converted_stock_calls"] = in_no_grad(lambda: stock(x))
    variants["torch_converted_unfused"] = in_no_grad(lambda: unfused(x))
    ref = variants["torch_converted_unfused"]()
    for name in ("torch_converted", "torch_converted_stock_calls"):
        torch.testing.assert_close(variants[name](), ref, rtol=0, atol=0)  # bit-equal to the unfused module

    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    for fn in variants.values():
        for _ in range(300):
            fn()
    res: dict[str, list[float]] = {k: [] for k in variants}
    held = args.form == "held"
    for _ in range(args.rounds):
        for k, fn in variants.items():
            out = None
            t0 = clock()
            if held:
                for _ in range(args.calls):
                    out = fn()
            else:
                for _ in range(args.calls):
                    fn()
            res[k].append((clock() - t0) / args.calls * 1e6)
            del out
    print(f"clock={args.clock} form={args.form} rounds={args.rounds} calls={args.calls} batch={args.batch} "
          f"features={args.features} torch={torch.__version__}")
    for k, v in res.items():
        lo, med, hi = _quartiles(v)
        print(f"  {k:28s} {med:7.2f} us  (IQR {lo:.2f}-{hi:.2f})")
    pairs = [("ort_module", "ort_floor"), ("ort_module", "ort_bare_public"), ("ort_bare_public", "ort_floor"),
             ("ort_module_closure", "ort_floor"), ("ort_module_no_pool_check", "ort_floor"),
             ("ort_module_before", "ort_floor"), ("ort_module_before", "ort_bare_public"),
             ("torch_converted", "torch_native"), ("torch_converted_stock_calls", "torch_native"),
             ("torch_converted_unfused", "torch_native")]
    for a, b in pairs:
        if a in res and b in res:
            lo, med, hi = _quartiles([p / q for p, q in zip(res[a], res[b])])
            print(f"  {a} / {b}: {med:.2f}x (IQR {lo:.2f}-{hi:.2f})")
    print("  load average (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
