#!/usr/bin/env bash
# Set up openrlaif in a virtual environment at .venv (repo root). Idempotent: re-running is fast.
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --dev    also the test and lint tools, and headless Chromium (Debian's
#                             `chromium`, which the report's render test opens the HTML in)
# torch==2.13.0 is installed first: a plain `torch` requirement would pull several GB of CUDA
# packages on a machine without a local CPU build; with 2.13.0 present, pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python="${PYTHON:-python3}"

# The report's render test needs a browser; checked on every --dev run (cheap when present).
install_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  local packages="chromium fonts-liberation"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: headless Chromium is needed by the report test (tests/test_report.py) and there is no" \
      "apt-get here: install Chromium and put \`chromium\` on PATH" >&2
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: headless Chromium is needed by the report test; as root run:" \
        "apt-get install -y --no-install-recommends $packages" >&2
      return 0
    fi
    sudo="sudo"
  fi
  echo "setup: installing headless Chromium ($packages) for the report test"
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get"
  # shellcheck disable=SC2086  # word splitting of $apt and $packages is meant
  $apt install -y -qq --no-install-recommends $packages >/dev/null \
    || { $apt update -qq && $apt install -y -qq --no-install-recommends $packages >/dev/null; } \
    || echo "setup: could not install Chromium; the report test fails until \`chromium\` is on PATH" >&2
}
if [ -n "$extras" ]; then
  install_chromium
fi

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
