#!/usr/bin/env bash
# The techniques ladder on a lent GPU machine (see ../shared/gpu/README.md for carrying DALI,
# webdataset and FFCV there). Generates a larger set (10 classes x 1000 + 100 images; the default
# 1600 images are a dozen steps of an H100 epoch), then runs `bench sweep` for MODEL.
#   bash scripts/gpu-ladder.sh MODEL OUTDIR [extra bench sweep args]
# A lease ends after 10 minutes a command and keeps nothing once idle: put OUTDIR under $OUT, carry
# it back in the next call, and run the same command again: a folder that holds a sweep.json is
# finished with `bench sweep --resume` (trials already measured are not run again).
# torch.compile is measured apart (one run of the final stack): in the ladder every later step
# would pay its compilation again, more than a lease allows.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; OUTDIR=$2; shift 2
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=${LOADERBENCH_CACHE:-/tmp/lbcache}
DATA=${DATA:-/tmp/big}
[ -d "$DATA" ] || python3 -m bench.cli data synth --out "$DATA" --train-per-class 1000 --val-per-class 100
if [ -f "$OUTDIR/sweep.json" ]; then
  python3 -m bench.cli sweep --resume "$OUTDIR" || exit $?
else
  python3 -m bench.cli sweep --data "$DATA" --model "$MODEL" --batch-size 128 --steps 30 --trials 2 \
    --techniques workers,pin_memory,persistent,device_normalize,amp,channels_last,inference_eval,dali,ffcv,wds,ddp,early_stop \
    --trial-timeout 150 --out "$OUTDIR" "$@" || exit $?
fi
# torch.compile on the ladder's final stack, one run in the same folder (label compile-final)
python3 - "$OUTDIR" <<'PY'
import dataclasses, json, sys
from pathlib import Path
from bench.harness.launch import run_trial
from bench.harness.spec import RunSpec
out = Path(sys.argv[1])
steps = json.loads((out / "sweep.json").read_text())["steps"]
final = [s for s in steps if s["key"] == "early_stop" and s["argv"]]
done = any('"compile-final"' in p.read_text() for p in (out / "runs").glob("*.json"))
if final and not done:
    spec = dataclasses.replace(RunSpec.from_argv(final[0]["argv"]), epochs=None, steps=30, compile=True,
                               label="compile-final")
    t = run_trial(spec, out / "runs", timeout=300)
    print("compile-final:", t.error or f"{t.result.ips:.1f} img/s")
PY
python3 -m bench.cli report "$OUTDIR" --title "Techniques ladder: $MODEL on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
