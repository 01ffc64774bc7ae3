#!/usr/bin/env bash
# GPU evidence in one command of at most 8 minutes on the lent machine (one H200, 16 cores; no DALI:
# that is scripts/gpu-dali.sh). resnet50 bf16 channels_last at 16 cores for synthetic, tuned torch,
# torch decode=gpu, ffcv, wds, spdl; the same at 4 cores (--cpus 4); resnet18 at 16 cores. Each
# result is packed into $OUT/evidence.tar.gz and $OUT/README.md as it is made. docs/gpu.md has the calls.
#   bash scripts/gpu-evidence.sh --prepare     here: build the carry, .gpu/evidence (FFCV's wheel, webdataset)
#   bash scripts/gpu-evidence.sh --rehearse    here: every step on this CPU, tiny sizes (the suite runs it)
#   bash scripts/gpu-evidence.sh               on the device, carrying .gpu/evidence (and .gpu/back to resume)
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --prepare)
    set -e
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    bash ../shared/gpu/ffcv-wheel.sh >/dev/null  # FFCV for Python 3.12, OpenCV linked in (into .gpu/ffcv)
    rm -rf .gpu/evidence && mkdir -p .gpu/evidence && cp .gpu/ffcv/ffcv-*.whl .gpu/evidence/  # not its tqdm: the machine has one
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d .gpu/evidence webdataset==1.0.2 braceexpand==0.1.7
    # spdl is not carried: its wheels fit (13 MB) but the FFmpeg it loads (libavcodec, libavfilter,
    # libavdevice and what they link) is 243 MB in 212 libraries here, over one call's 64 MiB
    du -sh .gpu/evidence && ls .gpu/evidence
    exit 0 ;;
  --rehearse)
    shift
    OUT=${OUT:-/tmp/gpu-evidence-rehearsal}
    exec "${PYTHON:-.venv/bin/python}" scripts/gpu_steps.py evidence --rehearse --out "$OUT" --work "$OUT.work" "$@" ;;
esac
: "${OUT:?on the device OUT names the folder that comes back; here use --rehearse}"
if ls .gpu/evidence/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/evidence/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=/tmp/lbcache NUMBA_THREADING_LAYER=omp
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader
exec python3 scripts/gpu_steps.py evidence --out "$OUT" "$@"
