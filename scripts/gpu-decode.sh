#!/usr/bin/env bash
# On a lent GPU machine (DALI carried as ../shared/gpu/README.md says): where JPEGs are decoded, on
# one GPU with every core. torch with CPU decode (workers = cores, pinned, normalised on the GPU),
# torch decode=gpu (workers read bytes; nvJPEG in the main process), DALI's mixed decode; loader
# only and resnet50 end to end (bf16, channels_last); synthetic is the model's ceiling. Fresh
# processes, the order reversed on even trials. Results and OUT/README.md under ${OUT:-/tmp/gpu-decode}.
#   bash scripts/gpu-decode.sh [TRIALS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-decode}; TRIALS=${1:-2}; W=$(nproc); mkdir -p "$OUT"
export DATA=${DATA:-} STEPS=${STEPS:-60} PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=${LOADERBENCH_CACHE:-/tmp/lbcache}
# DATA: an ImageFolder root (default: the generated set; 1,600 images are 12 batches, so epoch starts
# would dominate: `bench data synth --out /tmp/big --train-per-class 1000` gives 10,000).
COMMON="${DATA:+--data $DATA} --batch-size 128 --steps ${STEPS:-60} --warmup-steps 10 --no-eval --out $OUT/runs"
declare -A ARGS=([torch-cpu]="--loader torch --workers $W --pin-memory --device-normalize"
                 [torch-gpu]="--loader torch --workers $W -o decode=gpu"
                 [dali-gpu]="--loader dali -o decode=gpu")
NAMES=${NAMES:-"torch-cpu torch-gpu dali-gpu"}
python3 -c "import nvidia.dali" 2>/dev/null || NAMES=${NAMES/dali-gpu/}
for t in $(seq "$TRIALS"); do
  order=($NAMES); (( t % 2 )) || order=($(printf '%s\n' $NAMES | tac))
  for mode in "--loader-only" "--model resnet50 --amp bf16 --channels-last"; do
    for name in "${order[@]}"; do
      echo "trial $t: $name $mode" >&2
      python3 -m bench.cli run ${ARGS[$name]} $mode $COMMON --label "$name" > /dev/null 2> "$OUT/err.log" \
        || { echo "$name $mode failed:"; tail -5 "$OUT/err.log"; } | tee -a "$OUT/failures.log"
    done
  done
  python3 -m bench.cli run --loader synthetic --model resnet50 --amp bf16 --channels-last $COMMON \
    --label synthetic > /dev/null 2> "$OUT/err.log" || tail -5 "$OUT/err.log" | tee -a "$OUT/failures.log"
done
python3 - "$OUT" "bash scripts/gpu-decode.sh $*" <<'PY'
import os, statistics, sys
from pathlib import Path
from bench.harness.report import results_in
out, runs, env = Path(sys.argv[1]), {}, None
for r in results_in(out / "runs").values():
    env = env or r.environment
    runs.setdefault((r.label, "loader only" if r.loader_only else "resnet50"), []).append(r.ips)
gpu = env["gpus"][0]["name"] if env.get("gpus") else "?"
lines = [f"# Where JPEGs are decoded: {gpu}, {env['cpu_count']} cores", "", f"Produced by: `{sys.argv[2]}` "
         f"(torch {env['libraries']['torch']}, commit {env['git_commit'][:10]}). Batch 128, {os.environ.get('STEPS', '60')} steps, 10 warm-up, data {os.environ.get('DATA') or 'the generated default'}; "
         "images/s median (min-max, trials).", "", "| loader | loader only | resnet50 bf16 channels_last |", "|---|---|---|"]
for name in sorted({n for n, _ in runs}):
    cells = [runs.get((name, m), []) for m in ("loader only", "resnet50")]
    lines.append(f"| {name} | " + " | ".join(f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f}, {len(v)})" if v else "-" for v in cells) + " |")
(out / "README.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
