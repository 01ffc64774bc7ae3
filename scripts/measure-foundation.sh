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
.venv/bin/python - "$OUT" "$0 $*" <<'PY'
import collections, json, statistics, sys
from pathlib import Path
from bench.result import load
out, command = Path(sys.argv[1]), sys.argv[2]
groups = collections.defaultdict(list)
for p in sorted((out / "runs").glob("*.json")):
    r = load(p)
    c, m = r["config"], r["metrics"]
    what = "loader only" if c.get("loader_only") else f"end to end ({c['model']})"
    key = (what, c["loader"], c["loader_options"].get("num_workers", "-"), c["world_size"])
    groups[key].append(m)
env = r["environment"]
lines = [f"# Foundation figures: torch backend, synthetic ceiling, 2-rank CPU DDP", "",
         f"Machine: {env['cpu']}, {env['cpu_count']} cores, no GPU; torch {env['libraries']['torch']}. "
         f"Data: the default generated set (1600 train / 400 val JPEGs), 224 px, batch 64, 2 epochs, "
         f"throughput after 5 warm-up steps (worker start-up of the 2nd epoch included).", "",
         f"Command: `bash {command.strip()}`", "",
         "| mode | loader | workers | ranks | images/s median | min - max | trials | data-wait share | val acc |",
         "|---|---|---|---|---|---|---|---|---|"]
for (what, loader, workers, ranks), ms in sorted(groups.items()):
    ips = [m["images_per_second"] for m in ms]
    wait = statistics.median(m["data_wait_share"] for m in ms)
    acc = [m["final_val_accuracy"] for m in ms if m["final_val_accuracy"] is not None]
    lines.append(f"| {what} | {loader} | {workers} | {ranks} | {statistics.median(ips):.1f} | "
                 f"{min(ips):.1f} - {max(ips):.1f} | {len(ips)} | {wait:.0%} | "
                 f"{statistics.median(acc):.3f} |" if acc else
                 f"| {what} | {loader} | {workers} | {ranks} | {statistics.median(ips):.1f} | "
                 f"{min(ips):.1f} - {max(ips):.1f} | {len(ips)} | {wait:.0%} | - |")
(out / "README.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
