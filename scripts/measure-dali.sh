#!/usr/bin/env bash
# The DALI issue's figures: `dali` (CPU pipeline, 2 threads) against `torch` (2 workers), loader only
# and end to end with the small CNN, on the default generated set at 224 px, batch 64, 2 epochs.
#   bash scripts/measure-dali.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/dali-cpu}
TRIALS=${2:-3}
B=".venv/bin/bench"
COMMON=(--epochs 2 --batch-size 64 --image-size 224 --out "$OUT/runs")
for trial in $(seq "$TRIALS"); do
  "$B" run --loader-only "${COMMON[@]}" --loader dali -o num_threads=2 >/dev/null
  "$B" run --loader-only "${COMMON[@]}" --loader torch --workers 2 >/dev/null
  "$B" run "${COMMON[@]}" --loader dali -o num_threads=2 >/dev/null
  "$B" run "${COMMON[@]}" --loader torch --workers 2 >/dev/null
  echo "trial $trial done" >&2
done
.venv/bin/bench report "$OUT" --command "bash $0 $*" --title "Figures: dali (CPU pipeline) vs torch, 2-core CPU"
