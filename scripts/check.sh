#!/usr/bin/env bash
# The whole check, as CI runs it: lint, format, types, then the test suite (extra pytest
# arguments pass through, e.g. `scripts/check.sh -x tests/test_lock.py`). Needs `scripts/setup.sh --dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy src
.venv/bin/python -m pytest -q "$@"
