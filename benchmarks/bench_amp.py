#!/usr/bin/env python
"""Run only the ``amp`` benchmark suite (see mmbridge/bench/suites.py and benchmarks/README.md).

    python benchmarks/bench_amp.py --quick --out results/amp

Takes every option of ``mmbridge bench`` except ``--suites``; external scripts are not run.
"""

from __future__ import annotations

import sys

from mmbridge.cli.bench import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--suites", "amp", "--no-external"]))
