#!/usr/bin/env bash
# The foundation issue's figures: the torch backend with 0/1/2 workers (loader only and end to end
# with the small CNN), the synthetic ceiling, and a 2-rank CPU DDP run, on the default generated
# set at 224 px, batch 64, 2 epochs, TRIALS trials each. Writes JSON results and a summary table.
#   bash scripts/measure-foundation.sh [OUT] [TRIALS]      (ONLY=REGEX re-measures a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/foundation-cpu}
TRIALS=${2:-3}
RUNS="$OUT/runs"
B=".venv/bin/bench"
COMMON=(--epochs 2 --batch-size 64 --image-size 224)
ONLY=${ONLY:-}  # e.g. ONLY=synthetic re-measures only the runs whose label matches
measure() {  # measure LABEL ARGS...: one run, unless ONLY excludes it
  local label=$1; shift
  if [ -z "$ONLY" ] || [[ "$label" =~ $ONLY ]]; then "$B" run "$@" --out "$RUNS" >/dev/null; fi
}
for trial in $(seq "$TRIALS"); do
  for w in 0 1 2; do
    measure "loader-only-torch-w$w" --loader-only "${COMMON[@]}" --workers "$w"
    measure "e2e-torch-w$w" "${COMMON[@]}" --workers "$w"
  done
  measure "e2e-synthetic" --loader synthetic "${COMMON[@]}"
  measure "e2e-torch-ddp2" "${COMMON[@]}" --workers 1 --cpu-ranks 2
  echo "trial $trial done" >&2
done
.venv/bin/bench report "$OUT" --command "bash $0 $*" --title "Figures: the torch backend, the synthetic ceiling, 2-rank CPU DDP"
