"""Benchmarks of what the bridge costs: ``mmbridge bench`` and ``benchmarks/``.

Every case is a group of *variants* of the same computation (TF, ORT, converted torch, native
torch...) timed **interleaved in the same run** and reported as a time ratio against the
group's baseline variant, because the machines these run on are shared and noisy: absolute
times mean something only on a dedicated machine, ratios measured side by side do.

* :mod:`mmbridge.bench.harness`: warm-up, repeated interleaved timing, median and IQR, peak
  memory, the :class:`~mmbridge.bench.harness.Result` records and the environment.
* :mod:`mmbridge.bench.suites`: the suites (``preprocess``, ``encoders``, ``amp``, ``ddp``,
  ``cache``, ``e2e``); a backend that is missing skips its variants with a note.
* :mod:`mmbridge.bench.report`: JSON, a Markdown table and a PNG plot.
* :mod:`mmbridge.cli.bench`: the ``mmbridge bench`` subcommand.

Importing this package imports neither TensorFlow nor onnxruntime.
"""

from __future__ import annotations

from mmbridge.bench.harness import BenchRun, HarnessConfig, Result, Timing, Variant, environment, measure_case

__all__ = ["BenchRun", "HarnessConfig", "Result", "Timing", "Variant", "environment", "measure_case"]
