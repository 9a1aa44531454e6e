#!/usr/bin/env bash
# The first hour in one command: install into .venv (what is missing), make the synthetic demo set (once),
# train the CPU recipe briefly, predict the held-out demo patients and say where the report is.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet -r requirements.txt  # every time: quick when satisfied, and a reused .venv may lack some
python=.venv/bin/python
if [ ! -d data/demo ]; then
  "$python" prepare_data.py demo --out data/demo
fi
"$python" train.py --data-root data/demo --recipe cpu --epochs 8
"$python" test.py --data-root data/demo --subset test
# test.py writes PREDICTION_ROOT/<run name>/; the newest report.html is this run's.
report=$(ls -t predictions/*/report.html 2>/dev/null | head -n 1 || true)
if [ -n "$report" ]; then
  echo "report: $report (open it in a browser)"
else
  echo "no report.html found under predictions/" >&2
  exit 1
fi
