#!/usr/bin/env bash
# Build everything a GPU session needs, on this (CPU) machine, into gpu-carry/ (git-ignored):
#   gpu-carry/kstyle.xz     the release binary, xz-compressed (the GPU machine has no Rust
#                           toolchain; everything carried travels compressed, as a call carries
#                           64 MiB in all)
#   gpu-carry/cache.tar.xz  every kernel family precompiled for sm_90a (H100/H200) with the exact
#                           options the backend uses, so the run loads cubins instead of compiling
#   gpu-carry/diffusers.tar.xz  diffusers 0.42.1 (the fixtures' version) without its pipelines,
#                           for scripts/bench_torch_unet.py (the GPU image has torch and peft
#                           but not diffusers; the whole wheel would not fit the 64 MiB)
#   gpu-carry/fixtures.tar.xz  tests/fixtures/tiny and tests/fixtures/extra (~80 MiB as files,
#                           ~45 MiB as one xz stream, whose window also folds the single-file
#                           checkpoint onto the folder's weights and the tokenizers' copies)
#   gpu-carry/candle-cuda-bench.xz  only with --candle (or KSTYLE_CANDLE_CUDA=1): candle 0.11 on the
#                           same shapes, via scripts/build-candle-cuda.sh (~13 min on 2 cores)
# The tracked tree is ~83 MiB, over the 64 MiB a device call carries, so it ends by untracking the
# fixtures (scripts/gpu-travel.sh shrink: the files stay, commits are refused until restore).
# Then, in the GPU session, one call:  run(command="bash scripts/gpu-check.sh", carry=["gpu-carry"])
# and afterwards:  bash scripts/gpu-travel.sh restore
set -euo pipefail
cd "$(dirname "$0")/.."
CANDLE=${KSTYLE_CANDLE_CUDA:-0}
for arg in "$@"; do
    case $arg in
        --candle) CANDLE=1 ;;
        *) echo "usage: scripts/gpu-prepare.sh [--candle]" >&2; exit 2 ;;
    esac
done
cargo build --release
rm -rf gpu-carry/kstyle gpu-carry/kstyle.xz
# Only the current kernels travel: cubins of earlier sources would eat into the 64 MiB call.
rm -rf gpu-carry/cache gpu-carry/cache.tar.xz
mkdir -p gpu-carry/cache
cp target/release/kstyle gpu-carry/kstyle
# NVRTC here must be the 13.0 the GPU machine has: the cache key includes the NVRTC version.
# A fresh checkout has none: install it (scripts/install-nvrtc.sh, a pinned PyPI wheel).
[ -e .nvrtc/nvidia/cu13/lib/libnvrtc.so.13 ] || bash scripts/install-nvrtc.sh > /dev/null
export KSTYLE_NVRTC_DIR="$PWD/.nvrtc/nvidia/cu13/lib"
KSTYLE_CACHE_DIR=gpu-carry/cache ./gpu-carry/kstyle kernels --warm-cache --arch sm_90a
# Cubins compress ~13x (4.5 MB -> 0.34 MB): they travel as one archive.
tar cf - -C gpu-carry cache | xz -9e -T0 > gpu-carry/cache.tar.xz
rm -rf gpu-carry/cache
rm -f gpu-carry/diffusers.tar.xz
whl=$(mktemp -d)
if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$whl" diffusers==0.42.1; then
    (cd "$whl" && unzip -q diffusers-*.whl && tar cf - --exclude='diffusers/pipelines' \
        --exclude='diffusers/modular_pipelines' --exclude='__pycache__' diffusers diffusers-*.dist-info |
        xz -9e -T0) > gpu-carry/diffusers.tar.xz
else
    echo "WARNING: no diffusers wheel (offline?): the GPU run will skip the PyTorch UNet baseline" >&2
fi
rm -rf "$whl"
if [ "$CANDLE" = 1 ]; then
    bash scripts/build-candle-cuda.sh
fi
# Binaries built here must not need a newer glibc than the GPU image's (2.34 known good).
need=$(objdump -T gpu-carry/kstyle 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1 || true)
xz -T0 -9 gpu-carry/kstyle
# One stream (-T1), so that xz's 64 MiB window sees the duplicated bytes across files.
rm -f gpu-carry/fixtures.tar.xz
tar cf - --hard-dereference tests/fixtures/tiny tests/fixtures/extra | xz -9 -T1 > gpu-carry/fixtures.tar.xz
bash scripts/gpu-travel.sh shrink
echo "gpu-carry ready: $(du -sh gpu-carry | cut -f1), binary needs ${need:-unknown}"
if ! bash scripts/gpu-travel.sh size gpu-carry; then
    echo "WARNING: over the 64 MiB one device call carries." >&2
    echo "         Move gpu-carry/candle-cuda-bench.xz out and run the candle step in a call of its own." >&2
fi
echo "next: run(command=\"bash scripts/gpu-check.sh\", carry=[\"gpu-carry\"], timeout_s=580)"
echo "then: bash scripts/gpu-travel.sh restore"
