"""``python -m dynabound.experiments``: the same as the ``dynabound`` command."""

import sys

from .cli import main

sys.exit(main())
