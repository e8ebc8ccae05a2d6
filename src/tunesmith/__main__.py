"""``python -m tunesmith`` runs the command-line tool."""

import sys

from tunesmith.cli import main

sys.exit(main())
