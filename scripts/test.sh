#!/usr/bin/env bash
# Fresh set-up + the whole test suite: Python packages into .venv, Debian's Chromium for the
# real-browser test, then pytest (extra arguments are passed on to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
bash scripts/install_browser.sh
exec .venv/bin/python -m pytest -ra "$@"
