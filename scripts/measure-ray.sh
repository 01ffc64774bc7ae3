#!/usr/bin/env bash
# The Ray Data issue's figures, on the default generated set at 224 px, batch 64, 2 epochs, loader
# only and end to end with the small CNN, fresh processes, alternating, TRIALS times:
#   - equal total cores: `torch` (2 DataLoader workers) against `ray` (a local Ray instance of 2
#     CPUs), both on the box's 2 cores (--cpus 2);
#   - disaggregated: the trainer held to core 0 (--cpus 1) with its pool on core 1 (a Ray cluster on
#     loopback: a head with no CPUs on core 0, one 1-CPU worker node under taskset -c 1), against
#     local only at the same 1 core (`torch`, 1 worker; `ray`, a local instance of 1 CPU);
#   - then `bench plan --cpu-nodes 1 --cores-per-cpu-node 1` measures the rates and the pool's costs per
#     image itself, and scripts/ray-table.py writes OUT/README.md: the table, Ray's overhead per image,
#     the costs, and the planner's predictions of every configuration against the runs.
# About 15 minutes for 3 trials on the 2-core box.
# Stops every Ray process on the machine at the end (`ray stop --force`): run it on a quiet box.
#   bash scripts/measure-ray.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/ray-cpu}
TRIALS=${2:-3}
B=".venv/bin/bench"
RAY=".venv/bin/ray"
export RAY_AUTH_MODE=disabled  # a loopback cluster of this script's own
unset RAY_ADDRESS
PORT=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT
taskset -c 0 "$RAY" start --head --num-cpus 0 --port "$PORT" --node-ip-address 127.0.0.1 \
  --include-dashboard false --disable-usage-stats >/dev/null
taskset -c 1 "$RAY" start --address "127.0.0.1:$PORT" --num-cpus 1 --node-ip-address 127.0.0.1 \
  --disable-usage-stats >/dev/null
ORIG=$(.venv/bin/python -c "from bench.data.synth import default_dataset; print(default_dataset())")
COMMON=(--epochs 2 --batch-size 64 --image-size 224 --data "$ORIG" --out "$OUT/runs")
for trial in $(seq "$TRIALS"); do
  for mode in "--loader-only" ""; do
    "$B" run $mode "${COMMON[@]}" --quiet --cpus 2 --loader torch --workers 2 --label "torch 2 workers, 2 cores" >/dev/null
    "$B" run $mode "${COMMON[@]}" --quiet --cpus 2 --loader ray -o ray_cpus=2 --label "ray local 2 CPUs, 2 cores" >/dev/null
    "$B" run $mode "${COMMON[@]}" --quiet --cpus 1 --loader torch --workers 1 --label "torch 1 worker, 1 core" >/dev/null
    "$B" run $mode "${COMMON[@]}" --quiet --cpus 1 --loader ray -o ray_cpus=1 --label "ray local 1 CPU, 1 core" >/dev/null
    "$B" run $mode "${COMMON[@]}" --quiet --cpus 1 --loader ray --ray-address "127.0.0.1:$PORT" \
      --label "ray pool on core 1, trainer on core 0" >/dev/null
  done
  echo "trial $trial done" >&2
done
"$RAY" stop --force >/dev/null 2>&1 || true  # the plan measures local instances on a quiet box
mkdir -p "$OUT/plan"
env -u RAY_ADDRESS "$B" plan --data "$ORIG" --model small --batch-size 64 --image-size 224 --steps 24 \
  --cores-per-node 1 --cpu-nodes 1 --cores-per-cpu-node 1 --loaders torch,ray --out "$OUT/plan" > "$OUT/plan/plan.txt"
.venv/bin/python scripts/ray-table.py "$OUT" "bash $0 $*"
"$B" report "$OUT" --html >/dev/null
