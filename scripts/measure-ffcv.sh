#!/usr/bin/env bash
# The FFCV issue's figures: `ffcv` against `torch` at equal storage resolution (the originals, and
# 256 px), loader only and end to end with the small CNN, 2 workers each, on the default generated
# set at 224 px, batch 64, 2 epochs; conversion time and size come from the manifests.
#   bash scripts/measure-ffcv.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/ffcv-cpu}
TRIALS=${2:-2}
B=".venv/bin/bench"
WORK="${LOADERBENCH_CACHE:-$HOME/.cache/loaderbench}/measure-ffcv"  # converted data: not committed
mkdir -p "$OUT" "$WORK"
ORIG=$(.venv/bin/python -c "from bench.data.synth import default_dataset; print(default_dataset())")
[ -f "$WORK/beton-full/val.beton.json" ] || "$B" data convert --to ffcv --data "$ORIG" --out "$WORK/beton-full"
[ -f "$WORK/beton-256/val.beton.json" ] || "$B" data convert --to ffcv --data "$ORIG" --out "$WORK/beton-256" --max-resolution 256
[ -d "$WORK/folder-256" ] || "$B" data convert --to folder --data "$ORIG" --out "$WORK/folder-256" --max-resolution 256
.venv/bin/python - "$WORK" > "$OUT/conversions.md" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
print("| output | samples | size (MB) | seconds |\n|---|---|---|---|")
for name in ("beton-full", "beton-256"):
    for split in ("train", "val"):
        m = json.loads((w / name / f"{split}.beton.json").read_text())
        print(f"| {name}/{split}.beton ({m['storage']}) | {m['samples']} | {m['bytes'] / 1e6:.1f} | {m['seconds']} |")
m = json.loads((w / "folder-256" / "storage.json").read_text())
print(f"| folder-256 (train+val, q{m['jpeg_quality']}) | {m['images']} | {m['mean_bytes'] * m['images'] / 1e6:.1f} | {m['seconds']} |")
PY
COMMON=(--epochs 2 --batch-size 64 --image-size 224 --out "$OUT/runs")
for trial in $(seq "$TRIALS"); do
  for mode in "--loader-only" ""; do
    "$B" run $mode "${COMMON[@]}" --loader ffcv --data "$WORK/beton-full" -o num_workers=2 >/dev/null
    "$B" run $mode "${COMMON[@]}" --loader torch --data "$ORIG" --workers 2 >/dev/null
    "$B" run $mode "${COMMON[@]}" --loader ffcv --data "$WORK/beton-256" -o num_workers=2 >/dev/null
    "$B" run $mode "${COMMON[@]}" --loader torch --data "$WORK/folder-256" --workers 2 >/dev/null
  done
  echo "trial $trial done" >&2
done
.venv/bin/bench report "$OUT" --command "bash $0 $*" --title "Figures: ffcv vs torch at equal storage resolution, 2-core CPU"
cat "$OUT/conversions.md" | tee -a "$OUT/README.md"
