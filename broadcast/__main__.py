"""``python -m broadcast`` is ``broadcast-server``."""

import sys

from broadcast.runtime.cli import main

sys.exit(main())
