"""``python -m mmbridge`` == the ``mmbridge`` console script."""

import sys

from .cli import main

sys.exit(main())
