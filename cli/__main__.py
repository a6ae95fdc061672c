"""``python -m twilight.cli``: the same as the ``twilightc`` console script."""

import sys

from . import main

sys.exit(main())
