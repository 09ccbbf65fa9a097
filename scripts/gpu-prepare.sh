#!/usr/bin/env bash
# Build everything a GPU session needs, on this (CPU) machine, into gpu-carry/ (git-ignored):
#   gpu-carry/kstyle        the release binary (the GPU machine has no Rust toolchain)
#   gpu-carry/cache/nvrtc/  every kernel family precompiled for sm_90a (H100/H200) with the exact
#                           options the backend uses, so the run loads cubins instead of compiling
# Then, in the GPU session, one call:  run(command="bash scripts/gpu-check.sh", carry=["gpu-carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
mkdir -p gpu-carry/cache
cp target/release/kstyle gpu-carry/kstyle
# NVRTC here must be the 13.0 the GPU machine has: the cache key includes the NVRTC version.
if [ -d .nvrtc/nvidia/cu13/lib ]; then export KSTYLE_NVRTC_DIR="$PWD/.nvrtc/nvidia/cu13/lib"; fi
KSTYLE_CACHE_DIR=gpu-carry/cache ./gpu-carry/kstyle kernels --warm-cache --arch sm_90a
# Binaries built here must not need a newer glibc than the GPU image's (2.34 known good).
need=$(objdump -T gpu-carry/kstyle 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1 || true)
echo "gpu-carry ready: $(du -sh gpu-carry | cut -f1), binary needs ${need:-unknown}"
