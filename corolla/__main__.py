"""`python -m corolla ...`: the same as the `corolla` command."""

import sys

from corolla.cli import main

sys.exit(main())
