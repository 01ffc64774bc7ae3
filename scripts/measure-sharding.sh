#!/usr/bin/env bash
# Sharded training's memory per rank on a model whose state is big enough to see it: DDP, ZeRO-1
# (--shard-optimizer) and FSDP2 (--fsdp) over 2 ranks (CPU ranks on gloo without CUDA, else GPUs),
# as a short ladder with only those steps. The small CNN of measure-ladder.sh holds under 1 MiB.
#   bash scripts/measure-sharding.sh [OUT] [MODEL] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/sharding-cpu}
MODEL=${2:-resnet50}
TRIALS=${3:-2}
B=".venv/bin/bench"
DEV=$(.venv/bin/python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')
TITLE="Sharded training: $MODEL on 2 ranks, $(nproc) cores, $DEV"
# 112 px, batch 16, 12 steps: resnet50 on 2 CPU cores takes seconds per step at 224 px.
"$B" sweep --out "$OUT" --title "$TITLE" --model "$MODEL" --image-size 112 --batch-size 16 --steps 12 \
    --ranks 2 --trials "$TRIALS" --ceiling-trials 0 --techniques workers,ddp,shard_optimizer,fsdp
"$B" report "$OUT" --title "$TITLE" --command "bash scripts/measure-sharding.sh${*:+ $*}"
