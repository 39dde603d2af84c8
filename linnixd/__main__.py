"""`python3 -m linnixd` runs the daemon."""

import sys

from .daemon import main

sys.exit(main())
