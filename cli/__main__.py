"""``python -m cli``: the same as the ``greenroute`` script."""

import sys

from cli.main import main

sys.exit(main())
