#!/usr/bin/env bash
# What resuming costs on every backend (scripts/resume-cost.py): loader state size and save time,
# checkpoint save time, process start to first batch fresh against resumed mid-epoch.
#   bash scripts/measure-resume.sh [OUT] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/resume-cpu}
TRIALS=${2:-2}
.venv/bin/python scripts/resume-cost.py "$OUT" "$TRIALS"
