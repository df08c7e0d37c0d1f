"""`python -m openrlaif.cli ...` (what `accelerate launch -m openrlaif.cli` runs)."""

import sys

from openrlaif.cli.main import main

sys.exit(main())
