"""`python -m soco` runs the command line."""

import sys

from soco.cli.main import main

sys.exit(main())
