#!/usr/bin/env bash
# The harness issue's figures on this machine: the default techniques ladder (small CNN, default
# generated set), bench tune for the torch loader (its runs land in the same folder, so the report
# plots throughput against workers), then bench doctor on the default set-up. Renders the report.
#   bash scripts/measure-ladder.sh [OUT] [DOCTOR_OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/ladder-cpu}
DOCTOR=${2:-reports/doctor-cpu}
B=".venv/bin/bench"
TITLE="Techniques ladder: small CNN, $(nproc) cores, $(.venv/bin/python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
"$B" sweep --out "$OUT" --title "$TITLE"
"$B" tune --loader torch --out "$OUT"
"$B" doctor --out "$DOCTOR"
"$B" report "$OUT" --title "$TITLE" --command "bash scripts/measure-ladder.sh${*:+ $*}"
"$B" report "$DOCTOR" --title "bench doctor on the default set-up" --command "bash scripts/measure-ladder.sh${*:+ $*}"
