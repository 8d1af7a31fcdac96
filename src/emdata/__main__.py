"""``python -m emdata``: the ``emdata`` command."""

import sys

from emdata.cli import main

sys.exit(main())
