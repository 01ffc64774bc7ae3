#!/usr/bin/env bash
# DALI on the lent GPU machine, for a lease of its own (its wheel is 199 MB: four calls carry it).
# In one command of at most 8 minutes: DALI's CPU pipeline at 12 and 16 threads, mixed decode at
# hw_decoder_load 0, 0.65, 0.9 and 1.0, mixed with 4 threads (--cpus 4), nvJPEG's paddings and
# preallocation hints, resize without antialiasing, loader only and resnet50 end to end (GPU ms per
# step beside images/s), and a torch.profiler summary of 5 steady steps. docs/gpu.md has the calls.
#   bash scripts/gpu-dali.sh --prepare     here: .gpu/part-00..03 (56 MiB each), unpack.sh (../shared/gpu/pack.sh)
#   bash scripts/gpu-dali.sh --rehearse    here: every step on this CPU, tiny sizes (the suite runs it)
#   bash scripts/gpu-dali.sh               on the device, after the parts were copied to /tmp/gpu-parts
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --prepare)
    exec bash ../shared/gpu/pack.sh ;;
  --rehearse)
    shift
    OUT=${OUT:-/tmp/gpu-dali-rehearsal}
    exec "${PYTHON:-.venv/bin/python}" scripts/gpu_steps.py dali --rehearse --out "$OUT" --work "$OUT.work" "$@" ;;
esac
: "${OUT:?on the device OUT names the folder that comes back; here use --rehearse}"
if [ ! -d /tmp/site/nvidia/dali ]; then
  bash .gpu/unpack.sh || { echo "DALI is not unpacked: copy the four parts to /tmp/gpu-parts first (docs/gpu.md)"; exit 1; }
fi
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader
exec python3 scripts/gpu_steps.py dali --out "$OUT" "$@"
