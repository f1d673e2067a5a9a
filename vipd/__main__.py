"""``python -m vipd`` is the ``vipd`` command."""

import sys

from .cli import main

sys.exit(main())
