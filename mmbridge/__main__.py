"""``python -m mmbridge`` == the ``mmbridge`` console script."""

import sys

from mmbridge.cli import main

sys.exit(main())
