"""Print the resident memory of one export, stage by stage (issue 13: what a large trainable export holds).

A diagnostic: it wraps the export's stages (freeze, tf2onnx, optimiser, onnxruntime checks, the
torch conversion and its checks, probes, the training contract, train parity, the artifact write)
(and tf2onnx's own steps inside them: freezing variables, grappler, ``import_graph_def``,
``process_tf_graph``, its optimiser, ``make_model``) with timers, samples this process's resident set size (``VmRSS`` of ``/proc/self/status``) every
20 ms in a thread, and prints, for each stage, the RSS when it started and ended and the peak
while it was the innermost stage running, in MiB (2**20 bytes). The last line is the process's
peak (``VmHWM``). It exports ``keras.applications.ARCH(weights=None, include_top=False,
pooling="avg", input_shape=(SIZE, SIZE, 3))`` into a scratch cache (``--inference`` for
``trainable=False``).

Linux only (``/proc/self/status``). Usage (repository root)::

    PYTHONPATH=. python tools/export_memory.py ConvNeXtBase 32
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from typing import Any

import mmbridge

_MIB = 2**20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mib() -> float:
    """This process's resident set size now, MiB."""
    return _status_kib("VmRSS") / 1024


class StageMemory:
    """Samples RSS every ``period`` s and attributes each sample to the innermost open stage."""

    def __init__(self, period: float = 0.02) -> None:
        self.stack: list[str] = []
        self.rows: dict[str, dict[str, float]] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period,), daemon=True)

    def _sample(self, period: float) -> None:
        while not self._stop.wait(period):
            top = self.stack[-1:]  # one read: the main thread may pop the last stage meanwhile
            if top:
                row = self.rows[top[0]]
                row["peak"] = max(row["peak"], rss_mib())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, owner: Any, attr: str, label: str | None = None) -> None:
        """Replace ``owner.attr`` (a function) with a timed, sampled one."""
        fn = getattr(owner, attr)
        label = label or attr

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = label
            n = 2
            while key in self.rows and key in self.stack:
                key, n = f"{label}#{n}", n + 1
            if key not in self.rows:
                self.rows[key] = {"calls": 0, "start": rss_mib(), "end": 0.0, "peak": 0.0, "seconds": 0.0}
                self.order.append(key)
            row = self.rows[key]
            row["calls"] += 1
            row["peak"] = max(row["peak"], rss_mib())
            self.stack.append(key)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                row["seconds"] += time.perf_counter() - t0
                row["end"] = rss_mib()
                row["peak"] = max(row["peak"], row["end"])

        setattr(owner, attr, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", help="a keras.applications constructor, e.g. ConvNeXtBase")
    ap.add_argument("size", type=int, help="square input size in px")
    ap.add_argument("--inference", action="store_true", help="trainable=False (default: trainable=True)")
    args = ap.parse_args(argv)
    mmbridge.preload_torch_stack()
    from mmbridge import artifact, store
    from mmbridge.export import _tf, backends, contract, exporter

    _tf.import_tensorflow()
    import keras

    mem = StageMemory()
    for owner, attr in ((exporter, "_freeze"), (exporter, "_convert"), (exporter, "check_model"),
                        (exporter, "optimize_model"), (exporter, "run_ort"), (backends, "convert_torch"),
                        (backends, "check_backends"), (exporter, "_probe_check"), (exporter, "_training_contract"),
                        (contract, "train_parity"), (store, "write_dir")):
        mem.wrap(owner, attr)
    artifact.write_dir = store.write_dir  # artifact imported the name
    # inside the two big stages: tf2onnx's own steps (tf_loader.from_function, tf2onnx.convert.from_graph_def)
    import tensorflow as tf
    import tf2onnx.convert
    import tf2onnx.graph
    import tf2onnx.optimizer
    import tf2onnx.tf_loader
    from tensorflow.python.framework import convert_to_constants

    for owner, attr, label in ((convert_to_constants, "convert_variables_to_constants_v2", "tf.freeze_variables"),
                               (tf2onnx.tf_loader, "tf_optimize", "tf.grappler"),
                               (tf2onnx.tf_loader, "freeze_session", "tf.freeze_session"),  # inside from_graph_def
                               (tf, "import_graph_def", "tf.import_graph_def"),
                               (tf2onnx.convert, "process_tf_graph", "tf2onnx.process_tf_graph"),
                               (tf2onnx.optimizer, "optimize_graph", "tf2onnx.optimize_graph"),
                               (tf2onnx.graph.Graph, "make_model", "tf2onnx.make_model")):
        mem.wrap(owner, attr, label)
    keras.utils.set_random_seed(0)
    before_model = rss_mib()
    build = getattr(keras.applications, args.arch, None)
    if not callable(build):
        ap.error(f"ARCH {args.arch!r} is not a keras.applications constructor (e.g. ConvNeXtBase, ResNet50)")
    m = build(weights=None, include_top=False, pooling="avg", input_shape=(args.size, args.size, 3))
    n_params = sum(int(v.numpy().size) for v in m.weights)
    print(f"{args.arch} {args.size} px: {n_params:,} values ({n_params * 4 / _MIB:.0f} MiB float32); "
          f"RSS {before_model:.0f} MiB before the model, {rss_mib():.0f} MiB after", flush=True)
    mem.start()
    t0 = time.perf_counter()
    try:  # a failing export (the case most worth measuring) still prints its table
        with tempfile.TemporaryDirectory() as tmp:
            mmbridge.export(m, trainable=not args.inference, cache_dir=tmp, name=f"{args.arch}_{args.size}")
    finally:
        mem.stop()
        print(f"export {time.perf_counter() - t0:.0f} s")
        _print_table(mem)
    return 0


def _print_table(mem: StageMemory) -> None:
    print(f"{'stage':24s} {'calls':>5s} {'start MiB':>10s} {'peak MiB':>10s} {'end MiB':>10s} {'seconds':>8s}")
    for key in mem.order:
        r = mem.rows[key]
        print(f"{key:24s} {r['calls']:5d} {r['start']:10.0f} {r['peak']:10.0f} {r['end']:10.0f} {r['seconds']:8.1f}")
    print(f"process peak (VmHWM) {_status_kib('VmHWM') / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
