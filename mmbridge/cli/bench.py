"""``mmbridge bench``: run the benchmark suites and write ``bench.json``, ``bench.md``, ``bench.png``.

    mmbridge bench --quick                        # CI-sized, CPU: a few minutes on 2 cores
    mmbridge bench --device cuda --out results/   # full sizes on a GPU
    mmbridge bench --suites preprocess,cache --repeats 11
    python -m mmbridge.cli.bench --size tiny      # seconds per suite (the CI test)

The backend owners' scripts ``benchmarks/bench_ort.py`` and ``benchmarks/bench_torch.py`` are
run as child processes when they exist (``--no-external`` skips them) and their JSON is stored
in the report; rows in this package's schema are merged into the tables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SUITES = ("preprocess", "encoders", "cache", "amp", "ddp", "e2e")


def _repo_benchmarks_dir() -> Path | None:
    """``benchmarks/`` of a source checkout (next to the ``mmbridge`` package), if present."""
    d = Path(__file__).resolve().parents[2] / "benchmarks"
    return d if d.is_dir() else None


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on ``subparsers``; ``args.func(args) -> int`` runs it."""
    p = subparsers.add_parser(
        "bench", help="measure what the bridge costs (ratios vs TF / ORT / native torch); JSON + Markdown + PNG",
        description="Benchmark suites, each case a time ratio against its baseline measured in the same run.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CI-sized inputs and fewer repetitions (same as --size quick)")
    p.add_argument("--size", choices=("tiny", "quick", "full"), default=None,
                   help="input sizes: tiny (tests), quick (CPU, minutes), full (default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch and ORT run (TF stays on CPU)")
    p.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                   help=f"comma-separated suites (default: all: {','.join(DEFAULT_SUITES)})")
    p.add_argument("--out", default="bench-results", help="output directory (bench.json, bench.md, bench.png)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per case (default 5 quick, 7 full)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 1 quick, 2 full)")
    p.add_argument("--min-rep-ms", type=float, default=None, help="minimum time of one repetition, in ms")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for torch, onnxruntime and TF alike; 0 = each framework's default "
                        "(default: 1 with --quick on CPU, robust on shared machines; 0 otherwise)")
    p.add_argument("--cache-dir", default=None, help="artifact cache for the suites' exports (default OUT/cache)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call per variant")
    p.add_argument("--no-external", action="store_true", help="do not run benchmarks/bench_ort.py, bench_torch.py")
    p.add_argument("--external-timeout", type=float, default=None,
                   help="seconds per external script (default 150 with --quick, 900 otherwise)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run in s; external scripts get what the suites left "
                        "(default 480 with --quick, so that it ends within 10 minutes; none otherwise)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for and write the report.

    Returns:
        0 when at least one row was measured; 1 when none was; 2 on a usage error (unknown
        suite, ``--device cuda`` without CUDA), with the message on stderr.
    """
    import mmbridge
    from mmbridge.bench import report
    from mmbridge.bench.harness import BenchRun, HarnessConfig, environment
    from mmbridge.bench.suites import SUITES, SuiteContext, run_external, run_suites

    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        print(f"mmbridge bench: error: unknown suite(s) {unknown or names}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    mmbridge.preload_torch_stack()  # before any TensorFlow import (mmbridge._torch_stack)
    size = args.size or ("quick" if args.quick else "full")
    quick = size in ("quick", "tiny")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("mmbridge bench: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    threads = args.threads if args.threads is not None else (1 if quick and args.device == "cpu" else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = HarnessConfig.quick(args.device) if quick else HarnessConfig(device=args.device)
    if size == "tiny":
        cfg.repeats, cfg.min_rep_s, cfg.max_case_s = 2, 0.002, 5.0
    if args.repeats is not None:
        cfg.repeats = max(1, args.repeats)
    if args.warmup is not None:
        cfg.warmup = max(1, args.warmup)
    if args.min_rep_ms is not None:
        cfg.min_rep_s = args.min_rep_ms / 1e3
    cfg.memory = not args.no_memory
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = "mmbridge bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or _argv_guess(args))

    run = BenchRun(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run.environment = environment(args.device)
    run.config = {"command": command, "size": size, "suites": names, "harness": cfg.to_dict(), "cache_dir": str(cache_dir)}
    t0 = time.perf_counter()
    run.config["threads"] = threads or "framework defaults"
    ctx = SuiteContext(size=size, device=args.device, config=cfg, cache_dir=cache_dir, log=lambda s: print(s, flush=True),
                       threads=threads or None)
    rows, notes = run_suites(names, ctx)
    run.results += rows
    run.notes += notes
    bench_dir = _repo_benchmarks_dir()
    if not args.no_external and bench_dir is not None and size != "tiny":
        timeout = args.external_timeout or (150.0 if quick else 900.0)
        budget = args.budget_s if args.budget_s is not None else (480.0 if quick else None)
        if budget is not None:
            from mmbridge.bench.suites import EXTERNAL_SCRIPTS

            present = [s for s in EXTERNAL_SCRIPTS if (bench_dir / s).is_file()]
            left = budget - (time.perf_counter() - t0)
            timeout = min(timeout, max(30.0, left / max(1, len(present))))
        run.external = run_external(bench_dir, out / "external", device=args.device, quick=quick, timeout_s=timeout,
                                    threads=threads or None, log=lambda s: print(s, flush=True))
        for script, info in run.external.items():
            for doc in info.get("json", []):
                if isinstance(doc, dict) and isinstance(doc.get("results"), list):
                    report.merge_results(run, doc["results"], source=script)
    run.wall_s = round(time.perf_counter() - t0, 1)
    run.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env_end = environment(args.device)
    run.environment["loadavg_1m_end"] = env_end.get("loadavg_1m")
    run.environment["ru_maxrss_mib"] = env_end.get("ru_maxrss_mib")
    run.environment.update({k: env_end[k] for k in ("torch_threads", "onnxruntime_providers", "versions") if k in env_end})
    paths = report.write_all(run, out, command=command)
    ok = sum(r.status == "ok" for r in run.results)
    print(f"mmbridge bench: {ok}/{len(run.results)} rows measured in {run.wall_s:.0f} s; "
          + ", ".join(f"{k}: {v}" for k, v in paths.items() if v))
    return 0 if ok else 1


def _argv_guess(args: argparse.Namespace) -> list[str]:
    parts: list[str] = []
    if args.size:
        parts += ["--size", args.size]
    elif args.quick:
        parts.append("--quick")
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.suites != ",".join(DEFAULT_SUITES):
        parts += ["--suites", args.suites]
    parts += ["--out", args.out]
    for flag in ("repeats", "warmup", "threads"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmbridge.cli.bench [options]`` (the same options as ``mmbridge bench``)."""
    p = argparse.ArgumentParser(prog="mmbridge bench", description="mmbridge benchmark suites")
    _add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
