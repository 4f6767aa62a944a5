#!/usr/bin/env python
"""Run only the ``encoders`` benchmark suite (see mmbridge/bench/suites.py and benchmarks/README.md).

    python benchmarks/bench_encoders.py --quick --out results/encoders

Takes every option of ``mmbridge bench`` except ``--suites``; external scripts are not run.
"""

from __future__ import annotations

import sys

from mmbridge.cli.bench import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--suites", "encoders", "--no-external"]))
