#!/usr/bin/env bash
# The WebDataset issue's figures: `wds` (tar shards, 2 DataLoader workers) against `torch` (the
# same JPEGs as files, 2 workers), and DALI reading the same shards (2 threads), loader only and
# end to end with the small CNN, on the default generated set at 224 px, batch 64, 2 epochs;
# conversion time and shard sizes come from the manifests.
#   bash scripts/measure-wds.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/wds-cpu}
TRIALS=${2:-3}
B=".venv/bin/bench"
WORK="${LOADERBENCH_CACHE:-$HOME/.cache/loaderbench}/measure-wds"  # converted data: not committed
mkdir -p "$OUT" "$WORK"
ORIG=$(.venv/bin/python -c "from bench.data.synth import default_dataset; print(default_dataset())")
[ -f "$WORK/shards/val/manifest.json" ] || { rm -rf "$WORK/shards"; "$B" data convert --to wds --data "$ORIG" --out "$WORK/shards"; }
.venv/bin/python - "$WORK/shards" > "$OUT/conversions.md" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
print("| split | samples | shards | samples per shard | shard MB min - max | total MB | seconds (DALI index included) |")
print("|---|---|---|---|---|---|---|")
for split in ("train", "val"):
    m = json.loads((w / split / "manifest.json").read_text())
    c = [s["samples"] for s in m["shards"]]
    b = [s["bytes"] / 1e6 for s in m["shards"]]
    print(f"| {split} | {m['samples']} | {len(c)} | {min(c)}-{max(c)} | {min(b):.1f} - {max(b):.1f} | {sum(b):.1f} | {m['seconds']} |")
PY
COMMON=(--epochs 2 --batch-size 64 --image-size 224 --out "$OUT/runs")
for trial in $(seq "$TRIALS"); do
  for mode in "--loader-only" ""; do
    "$B" run $mode "${COMMON[@]}" --loader torch --data "$ORIG" --workers 2 >/dev/null
    "$B" run $mode "${COMMON[@]}" --loader wds --data "$WORK/shards" --workers 2 >/dev/null
    "$B" run $mode "${COMMON[@]}" --loader dali --data "$WORK/shards" -o reader=wds -o num_threads=2 >/dev/null
  done
  echo "trial $trial done" >&2
done
.venv/bin/bench report "$OUT" --command "bash $0 $*" --title "Figures: wds (tar shards) vs torch (files), same JPEGs, 2-core CPU"
cat "$OUT/conversions.md" | tee -a "$OUT/README.md"
