"""``python -m broadcast`` is ``broadcast-server``."""

import sys

from broadcast.cli import main

sys.exit(main())
