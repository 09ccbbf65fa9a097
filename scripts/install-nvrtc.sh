#!/usr/bin/env bash
# Installs NVRTC 13.0 (compiler + builtins) from PyPI into a project-local folder so that the
# kernels can be compiled to cubins on machines without a CUDA toolkit.
#
# Pinned to 13.0: NVRTC 13.x newer than the driver (580 = CUDA 13.0) emits a PTX ISA that driver
# rejects, so the compile check must use the same minor version the GPU machines run.
#
# Usage: scripts/install-nvrtc.sh [DIR]   (default: <crate>/.nvrtc)
# Prints the LD_LIBRARY_PATH to export on its last line.
set -euo pipefail

VERSION="13.0.88"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.nvrtc}"
LIB="$DIR/nvidia/cu13/lib"
STAMP="$DIR/.installed-$VERSION"

if [[ ! -f "$STAMP" || ! -e "$LIB/libnvrtc.so.13" ]]; then
    PY="${PYTHON:-python3}"
    mkdir -p "$DIR"
    # --no-deps: the wheel is self-contained (libnvrtc + libnvrtc-builtins); pulling deps would
    # drag in an unpinned CUDA runtime.
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$DIR" "nvidia-cuda-nvrtc==$VERSION" >&2
    if [[ ! -e "$LIB/libnvrtc.so.13" ]]; then
        echo "install-nvrtc: libnvrtc.so.13 not found under $LIB after install" >&2
        exit 1
    fi
    touch "$STAMP"
fi

# libnvrtc.so.13 dlopens libnvrtc-builtins.so.13.0 by bare name, so its folder must be on the
# search path, not only libnvrtc's own absolute path.
echo "LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
