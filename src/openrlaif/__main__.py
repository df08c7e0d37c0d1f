"""`python -m openrlaif ...`: the same as the `openrlaif` command."""

import sys

from openrlaif.cli.main import main

sys.exit(main())
