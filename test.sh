#!/usr/bin/env bash
# The test suite in one command: install the test requirements into .venv (when missing), run pytest.
# Extra arguments go to pytest, e.g. ./test.sh tests/test_metrics.py
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Every time, not only for a new .venv: demo.sh's .venv lacks the test requirements (quick when satisfied).
.venv/bin/pip install --quiet -r requirements-test.txt
.venv/bin/python -m pytest -q "$@"
