#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv with torch, this project,
# its test tools and the optional backends (so that CI tests every backend). The README's two
# commands start with it; a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
quiet_pip() {  # pip's local-index warnings are noise; keep its errors
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so that a machine with its own CUDA torch keeps it.
  "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 + torchvision 0.29.1 (about a minute from local disk)" >&2
  quiet_pip "torch==2.14.1" "torchvision==0.29.1"
fi
# Backends whose libraries install from PyPI alone: dali (CPU pipeline without CUDA, ~600 MB).
quiet_pip -e ".[dev,dali]"
