"""The `openrlaif` command line: one entry point, one module per command group.

- `main`: the parser and the dispatcher (loads a group's module only when its command runs);
- `label`: label, align, score; `listing`: judges, datasets; `judge_args`: the judge options;
- `train`, `generate`, `distill`: one command each;
- `evaluate`: eval, human export|import, report; `pipeline`: run, quickstart;
- `output`: what several commands print the same way.

Every command turns its arguments into typed calls of the library and prints the result; no
library module parses arguments. Errors a user can cause end as one line on stderr (exit status
2), never as a traceback.
"""

from openrlaif.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
