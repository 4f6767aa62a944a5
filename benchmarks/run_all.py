#!/usr/bin/env python
"""Run every mmbridge benchmark suite and write bench.json, bench.md and bench.png.

    python benchmarks/run_all.py --quick                  # CPU, CI-sized (< 10 min on 2 cores)
    python benchmarks/run_all.py --device cuda --out gpu-results
    python benchmarks/run_all.py --suites preprocess,encoders --repeats 11

The same as ``mmbridge bench``; every option is listed by ``--help``. Each case is a time ratio
against its baseline measured in the same run (see benchmarks/README.md).
"""

from __future__ import annotations

import sys

from mmbridge.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
