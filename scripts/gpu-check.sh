#!/usr/bin/env bash
# On a lent GPU machine (see ../shared/gpu/README.md for carrying DALI, webdataset and FFCV there):
# the CUDA-marked tests of every backend and the trainer, then one short `bench run` per backend on
# CUDA (resnet50, bf16, channels_last). Logs and results go to ${OUT:-/tmp/gpu-check}.
#   bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LOADERBENCH_CACHE=${LOADERBENCH_CACHE:-/tmp/lbcache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m bench.cli backends
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_dali.py -p no:cacheprovider --timeout 300 -x \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -40
W=$(nproc)
run() { python3 -m bench.cli run --model resnet50 --amp bf16 --channels-last --batch-size 128 --steps 40 \
          --out "$OUT/runs" "$@" 2>&1 | tail -14; }
run --loader synthetic
run --loader torch --workers "$W" --pin-memory --device-normalize
run --loader dali
run --loader ffcv
run --loader wds --workers "$W" --pin-memory --device-normalize
