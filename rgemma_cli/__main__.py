"""`python -m rgemma_cli`: the `rgemma` command."""

import sys

from .entry import main

sys.exit(main())
