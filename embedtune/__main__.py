"""``python -m embedtune ...``: the same as the ``embedtune`` console script."""

import sys

from embedtune.cli import main

sys.exit(main())
