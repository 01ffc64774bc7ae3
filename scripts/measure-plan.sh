#!/usr/bin/env bash
# The planner's validation table: for the small CNN and resnet18, `bench plan` measures the per-core
# rates here (loader only at 1 and 2 cores, the model on 1 and 2 cores), then every installed
# backend trains end to end under `bench run --cpus K --workers K` (K = 1, 2; no evaluation), in
# fresh processes, the order of the backends reversed on even trials. scripts/plan-validation.py
# writes the table of prediction against measurement (error of each) and the crossover maps with
# the measured points drawn on them. About 25 minutes for 2 trials on the 2-core box.
#   bash scripts/measure-plan.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-reports/plan-cpu}" && cd "${1:-reports/plan-cpu}" && pwd); TRIALS=${2:-2}
PY="$PWD/.venv/bin/python"
DATA=$("$PY" -c "from bench.data.synth import default_dataset; print(default_dataset())")
LOADERS=$("$PY" -c "from loaders import backends; print(' '.join(b.name for b in backends() if b.installed and not b.is_ceiling))")
declare -A SHAPE=([small]="--batch-size 64 --image-size 224 --steps 30 --warmup-steps 5"
                  [resnet18]="--batch-size 32 --image-size 128 --steps 16 --warmup-steps 4")
for model in small resnet18; do
  # the prediction first, from its own measurements (a CPU target: the model trains on the cores)
  mkdir -p "$OUT/$model"
  "$PY" -m bench.cli plan --data "$DATA" --model "$model" ${SHAPE[$model]%% --steps*} \
    --cores-per-node 2 --out "$OUT/$model" > "$OUT/$model/plan.txt" 2>&1
  for t in $(seq "$TRIALS"); do
    order=($LOADERS); (( t % 2 )) || order=($(printf '%s\n' $LOADERS | tac))
    for k in 1 2; do
      for name in "${order[@]}"; do
        echo "trial $t: $model $name --cpus $k" >&2
        "$PY" -m bench.cli run --data "$DATA" --model "$model" --loader "$name" --cpus "$k" --workers "$k" \
          --no-eval ${SHAPE[$model]} --label "$name" --out "$OUT/$model/runs" > /dev/null 2> "$OUT/.stderr" \
          || { echo "trial $t: $model $name --cpus $k failed:"; tail -n 5 "$OUT/.stderr"; } >> "$OUT/failures.log"
      done
    done
  done
done
rm -f "$OUT/.stderr"
"$PY" scripts/plan-validation.py "$OUT" "bash scripts/measure-plan.sh $*"
