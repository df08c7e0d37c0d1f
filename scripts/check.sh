#!/usr/bin/env bash
# The whole check, as CI runs it: lint, format, types, then the test suite (extra pytest
# arguments pass through, e.g. `scripts/check.sh -x tests/test_lock.py`). Needs `scripts/setup.sh --dev`.
#   scripts/check.sh --fast   the same without the tests marked `slow` (several processes, llama.cpp's
#                             server, Gemma 3 270M, whole pipelines): the quick loop while working
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m "not slow")
fi
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy src
.venv/bin/python -m pytest -q ${select[@]+"${select[@]}"} "$@"
