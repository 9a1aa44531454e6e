#!/usr/bin/env bash
# GPU check, for a CUDA machine: the test suite, then bench.py at 256 px with the seed's 31 M-parameter
# U-Net (--recipe seed) in every AMP / channels_last / compile combination, at each batch size.
# Writes OUT_DIR/ (default gpu-check/): nvidia-smi.txt, tests.txt, bench-bs<N>.txt and summary.json.
#
#   scripts/gpu_check.sh [OUT_DIR]
#
# Environment (all optional):
#   PYTHON       interpreter (default .venv/bin/python when present, else python3)
#   DATA_ROOT    data to time on (default: a synthetic 256 px demo set made in OUT_DIR, no download)
#   TESTS        pytest arguments (default: the whole suite); TESTS=skip runs no tests
#   BATCH_SIZES  batch sizes to time (default "16 64"; 16 is the seed's)
#   STEPS        timed steps per combination (default 20, after 5 warm-up steps)
#   BENCH_ARGS   more bench.py flags, e.g. "--compile false" to leave compilation out of the grid
#   WORKERS      DataLoader workers (default 8: one process cannot augment 3000 images/s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 1; }
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: $PY's PyTorch sees no CUDA GPU; run this on a CUDA machine" >&2; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

tests_rc=null
if [ "${TESTS:-}" != "skip" ]; then
  echo "tests: pytest ${TESTS:-(whole suite)} -> $OUT/tests.txt"
  # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
  "$PY" -m pytest -q ${TESTS:-} > "$OUT/tests.txt" 2>&1
  tests_rc=$?
  tail -n 3 "$OUT/tests.txt"
fi

DATA=${DATA_ROOT:-$OUT/demo-256}
if [ ! -d "$DATA" ]; then
  "$PY" prepare_data.py demo --out "$DATA" --count 2048 --size 256 --seed 0 > /dev/null || exit 1
fi
for batch in ${BATCH_SIZES:-16 64}; do
  echo "bench: batch $batch -> $OUT/bench-bs$batch.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "$PY" bench.py --data-root "$DATA" --recipe seed --batch-size "$batch" --num-workers "${WORKERS:-8}" \
    --steps "${STEPS:-20}" --warmup 5 --compare ${BENCH_ARGS:-} > "$OUT/bench-bs$batch.txt" 2> "$OUT/bench-bs$batch.err"
  head -n -1 "$OUT/bench-bs$batch.txt"
done

"$PY" - "$OUT" "$tests_rc" <<'PY'
"""summary.json: every timed combination, the best bf16 figure and whether it meets 3000 images/s."""
import json
import sys
from pathlib import Path

from tumorseg.files import save_json

out, tests_rc = Path(sys.argv[1]), json.loads(sys.argv[2])
runs = []
for path in sorted(out.glob("bench-bs*.txt")):
    lines = path.read_text().strip().splitlines()
    if lines and lines[-1].startswith("{"):
        report = json.loads(lines[-1])
        runs += [{"batch_size": report["batch_size"], **r} for r in report["results"]]
bf16 = [r for r in runs if r["amp"] == "bf16"]
best = max(bf16, key=lambda r: r["train_images_per_second"], default=None)
summary = {"tests_exit_code": tests_rc, "target_bf16_images_per_second": 3000, "best_bf16": best,
           "target_met": bool(best and best["train_images_per_second"] >= 3000), "runs": runs}
save_json(out / "summary.json", summary)
print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
PY
