#!/usr/bin/env python
"""Run only the ``e2e`` benchmark suite (see mmbridge/bench/suites.py and benchmarks/README.md).

    python benchmarks/bench_e2e.py --quick --out results/e2e

Takes every option of ``mmbridge bench`` except ``--suites``; external scripts are not run.
"""

from __future__ import annotations

import sys

from mmbridge.cli.bench import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--suites", "e2e", "--no-external"]))
