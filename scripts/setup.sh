#!/usr/bin/env bash
# Set up openrlaif in a virtual environment at .venv (repo root). Idempotent: re-running is fast.
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --dev    also the test and lint tools
# torch==2.13.0 is installed first: a plain `torch` requirement would pull several GB of CUDA
# packages on a machine without a local CPU build; with 2.13.0 present, pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# A stamp keyed by what decides the install, so a second run skips pip entirely.
base=".venv/.openrlaif-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp="$base${extras:+-dev}"
if [ -f "$stamp" ] || { [ -z "$extras" ] && [ -f "$base-dev" ]; }; then
  exit 0  # already set up (a --dev set-up covers a plain one)
fi
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras}"
rm -f .venv/.openrlaif-setup-*
touch "$stamp"
echo "openrlaif is set up in .venv"
