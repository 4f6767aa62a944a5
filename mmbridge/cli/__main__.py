"""``python -m mmbridge.cli ...``: the ``mmbridge`` command (what torchrun and SLURM launch)."""

import sys

from mmbridge.cli import main

sys.exit(main())
