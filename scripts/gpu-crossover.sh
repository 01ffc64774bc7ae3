#!/usr/bin/env bash
# The crossover map on a lent GPU machine (16 cores for one GPU): every installed backend trains
# MODEL end to end confined to 2, 4, 8 and 16 cores (`bench run --cpus K --workers K`), then
# `bench plan` measures the loaders' per-core rates on the same machine, takes the GPU's rate from
# the synthetic ceiling measured here, and draws its predicted lines with those measured points on
# them (OUTDIR/plan.png, plan.json). A folder carried back from an earlier, cut-off call keeps its
# runs: a (backend, K) already measured TRIALS times is not run again.
#   bash scripts/gpu-crossover.sh MODEL OUTDIR [TRIALS]    (not verified on GPU yet)
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; OUTDIR=$2; TRIALS=${3:-1}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=${LOADERBENCH_CACHE:-/tmp/lbcache}
DATA=${DATA:-/tmp/big}
[ -d "$DATA" ] || python3 -m bench.cli data synth --out "$DATA" --train-per-class 1000 --val-per-class 100
SHAPE="--model $MODEL --batch-size 128 --amp bf16 --channels-last --steps 40 --no-eval"
declare -A TUNED=([torch]="--pin-memory --persistent-workers --prefetch-factor 4 --device-normalize"
                  [wds]="--pin-memory --prefetch-factor 4 --device-normalize")  # the ladder's stack (wds: no persistent workers)
have() {  # results already in OUTDIR/runs for this label
  grep -l "\"label\": \"$1\"" "$OUTDIR"/runs/*.json 2>/dev/null | wc -l
}
[ "$(have ceiling)" -ge 1 ] || python3 -m bench.cli run --data "$DATA" --loader synthetic $SHAPE --label ceiling --out "$OUTDIR/runs"
LOADERS=$(python3 -c "from loaders import backends; print(' '.join(b.name for b in backends() if b.installed and not b.is_ceiling))")
for k in 2 4 8 16; do
  for name in $LOADERS; do
    while [ "$(have "$name-$k")" -lt "$TRIALS" ]; do
      python3 -m bench.cli run --data "$DATA" --loader "$name" --cpus "$k" --workers "$k" $SHAPE ${TUNED[$name]:-} \
        --label "$name-$k" --out "$OUTDIR/runs" || break
    done
  done
done
RATE=$(python3 -c "
import sys; from bench.harness.report import results_in
print(max(r.ips for r in results_in(__import__('pathlib').Path(sys.argv[1])).values() if r.config['label'] == 'ceiling'))" "$OUTDIR/runs")
python3 -m bench.cli plan --data "$DATA" --model "$MODEL" --batch-size 128 --gpus 1 --cores-per-node 16 \
  --gpu-rate "$RATE" --measured "$OUTDIR/runs" --out "$OUTDIR"
