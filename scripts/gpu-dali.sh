#!/usr/bin/env bash
# DALI on the lent GPU machine, for a lease of its own (DALI and its wheels are 268 MB: four calls carry most of it).
# In one command of at most 8 minutes: DALI's CPU pipeline at 12 and 16 threads, mixed decode at
# hw_decoder_load 0, 0.65, 0.9 and 1.0, mixed with 4 threads (--cpus 4), nvJPEG's paddings and
# preallocation hints, resize without antialiasing, loader only and resnet50 end to end (GPU ms per
# step beside images/s), and a torch.profiler summary of 5 steady steps. docs/gpu.md has the calls.
#   bash scripts/gpu-dali.sh --prepare     here: .gpu/part-00..04 (4 x 56 MiB + 32 MiB), unpack.sh (../shared/gpu/pack.sh)
#   bash scripts/gpu-dali.sh --rehearse    here: every step on this CPU, tiny sizes (the suite runs it)
#   bash scripts/gpu-dali.sh --stash       on the device: keep the carried parts in /tmp/gpu-parts (calls 1-4)
#   bash scripts/gpu-dali.sh               on the device, carrying the last part, unpack.sh and SHA256SUMS
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --prepare)  # pack.sh starts .gpu/ afresh: keep the evidence carry
    keep=$(mktemp -d); [ -d .gpu/evidence ] && mv .gpu/evidence "$keep/"
    bash ../shared/gpu/pack.sh; rc=$?
    [ -d "$keep/evidence" ] && mv "$keep/evidence" .gpu/; rmdir "$keep" 2>/dev/null
    exit $rc ;;
  --stash)  # the warm machine keeps /tmp between calls; the next call's carry replaces .gpu/
    mkdir -p /tmp/gpu-parts && cp .gpu/part-* /tmp/gpu-parts/ && ls -l /tmp/gpu-parts
    exit $? ;;
  --rehearse)
    shift
    OUT=${OUT:-/tmp/gpu-dali-rehearsal}
    exec "${PYTHON:-.venv/bin/python}" scripts/gpu_steps.py dali --rehearse --out "$OUT" --work "$OUT.work" "$@" ;;
esac
: "${OUT:?on the device OUT names the folder that comes back; here use --rehearse}"
if [ ! -d /tmp/site/nvidia/dali ]; then
  mkdir -p /tmp/gpu-parts && cp .gpu/part-* /tmp/gpu-parts/ 2>/dev/null  # the last part, carried with this call
  bash .gpu/unpack.sh || { echo "DALI is not unpacked: stash the parts first (docs/gpu.md)"; exit 1; }
fi
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader
exec python3 scripts/gpu_steps.py dali --out "$OUT" "$@"
