"""``python -m osteo ...``: the ``osteo`` command, for an environment whose scripts are not on PATH."""

import sys

from osteo.cli import main

sys.exit(main())
