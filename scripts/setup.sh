#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv with torch, this project,
# its test tools and the optional backends (so that CI tests every backend). The README's two
# commands start with it; a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
quiet_pip() {  # pip's local-index warnings are noise, as is its list of mosaicml-streaming's own pins
  # (installed without them on purpose, below); keep its errors
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v -e "is ignored: it is neither" \
    -e "^mosaicml-streaming .* requires " -e "dependency resolver does not currently take into account" >&2)
}
# A fresh install needs about 7 GiB (torch's CUDA build is 5.5 GiB of it): say so before pip half-fills
# the disk and stops with "No space left on device" inside a torch half installed.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  NEED_GIB=7
  for dir in . "${TMPDIR:-/tmp}"; do
    free_kib=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
    if [ -n "$free_kib" ] && [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
      echo "setup: $((free_kib / 1024)) MiB free on $(cd "$dir" && pwd)'s filesystem; installing torch," \
           "torchvision and the backends into .venv needs about $NEED_GIB GiB: free some space and run again" >&2
      exit 1
    fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so that a machine with its own CUDA torch keeps it.
  "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 + torchvision 0.29.1 (about a minute from local disk)" >&2
  quiet_pip "torch==2.14.1" "torchvision==0.29.1"
fi
# Backends whose libraries install from PyPI alone: dali (CPU pipeline without CUDA, ~600 MB), wds;
# s3: boto3 and moto's loopback S3 server for --storage s3; lightning for loaders.lightning;
# ray: Ray Data (about 200 MB with pyarrow) for the ray backend.
# litdata and mosaic: the streaming formats (LitData chunks, Mosaic MDS shards).
quiet_pip -e ".[dev,dali,wds,s3,spdl,lightning,ray,litdata,mosaic]"
# mosaicml-streaming 0.13.0 pins numpy<2.2 (and pulls cloud SDKs it imports only on use): installed
# without its dependencies; the ones it imports come from the mosaic extra above.
if ! .venv/bin/python -c "import streaming" 2>/dev/null; then
  quiet_pip --no-deps "mosaicml-streaming==0.13.0"
fi
# spdl.io decodes with the system's FFmpeg (libavcodec 4-9 + libavfilter, libavdevice): Debian's ffmpeg.
apt_install() {
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! .venv/bin/python -c "import spdl.io; spdl.io.demux_config()" 2>/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing ffmpeg's libraries for spdl (apt, about a minute)" >&2
    apt_install ffmpeg
  else
    echo "setup: spdl needs FFmpeg 4-9's shared libraries; its tests are skipped without them" >&2
  fi
fi
# ffcv compiles against libturbojpeg and OpenCV found through pkg-config: Debian/Ubuntu packages.
ffcv_deps() { pkg-config --exists libturbojpeg opencv4 2>/dev/null; }
if ! .venv/bin/python -c "import ffcv" 2>/dev/null; then
  if ! ffcv_deps && command -v apt-get >/dev/null; then
    echo "setup: installing libturbojpeg0-dev, libopencv-dev, pkg-config for ffcv (apt, about a minute)" >&2
    apt_install libturbojpeg0-dev libopencv-dev pkg-config
  fi
  if ffcv_deps; then
    quiet_pip -e ".[ffcv]"
  else
    echo "setup: ffcv skipped: needs libturbojpeg and OpenCV development files (pkg-config libturbojpeg opencv4);" \
         "the other backends are installed and its tests are skipped" >&2
  fi
fi
# The HTML report's browser test (tests/test_html.py) drives Debian's headless Chromium through
# selenium (a dev dependency); without a browser that test is skipped and says why.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  echo "setup: installing chromium and chromium-driver for the HTML report's browser test (apt, under a minute)" >&2
  apt_install chromium chromium-driver fonts-dejavu-core
fi
