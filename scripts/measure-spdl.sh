#!/usr/bin/env bash
# SPDL at its best: the spdl backend with each decode stage on its threads (ffmpeg: FFmpeg's filter
# graph; cpu: torchvision.io's libjpeg-turbo + tensor crop; pil: PIL + tensor crop) beside torch's
# worker processes, loader only and end to end (small CNN, no evaluation) under `bench run --cpus K
# --workers K` for K = 1, 2, fresh processes, the order reversed on even trials; `synthetic` end to end
# is the model's ceiling; the per-core limit (scripts/decode-limit.py) and how much of each stage holds
# the GIL (scripts/gil-scaling.py). scripts/limit-table.py writes OUT/README.md.
# About 20 minutes for 3 trials on the 2-core box.
#   bash scripts/measure-spdl.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-reports/spdl-cpu}" && cd "${1:-reports/spdl-cpu}" && pwd); TRIALS=${2:-3}
PY="$PWD/.venv/bin/python"
DATA=$("$PY" -c "from bench.data.synth import default_dataset; print(default_dataset())")
"$PY" scripts/decode-limit.py --data "$DATA/train" --trials "$TRIALS" --decoders cpu,pil,spdl --out "$OUT" 2> "$OUT/decode-limit.log"
"$PY" scripts/gil-scaling.py --data "$DATA/train" --trials "$TRIALS" --out "$OUT/gil.json" 2> "$OUT/gil-scaling.log"
SHAPE="--batch-size 64 --image-size 224 --steps 30 --warmup-steps 5 --no-eval"
CONFIGS=("torch|--loader torch" "spdl decode=ffmpeg|--loader spdl -o decode=ffmpeg"
         "spdl decode=cpu|--loader spdl -o decode=cpu" "spdl decode=pil|--loader spdl -o decode=pil")
run() {  # run LABEL K ARGS...
  local label=$1 k=$2; shift 2
  "$PY" -m bench.cli run --data "$DATA" --cpus "$k" $SHAPE "$@" --label "$label" \
    --out "$OUT/runs" > /dev/null 2> "$OUT/.stderr" || { echo "$label --cpus $k $*: failed:"; tail -n 5 "$OUT/.stderr"; } >> "$OUT/failures.log"
}
for t in $(seq "$TRIALS"); do
  order=("${CONFIGS[@]}"); (( t % 2 )) || order=("${CONFIGS[3]}" "${CONFIGS[2]}" "${CONFIGS[1]}" "${CONFIGS[0]}")
  for k in 1 2; do
    echo "trial $t, $k core(s)" >&2
    for c in "${order[@]}"; do
      label=${c%%|*}; args=${c#*|}
      run "$label" "$k" $args --workers "$k" --loader-only
      run "$label" "$k" $args --workers "$k" --model small
    done
    run synthetic "$k" --loader synthetic --model small
  done
done
rm -f "$OUT/.stderr"
"$PY" scripts/limit-table.py "$OUT" "bash scripts/measure-spdl.sh $*" "SPDL's decode stages against torch and the per-core limit"
