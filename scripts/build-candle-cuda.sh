#!/usr/bin/env bash
# Builds benches/candle-cuda (candle 0.11 with its `cuda` feature) on this CPU machine, with no GPU
# and no CUDA toolkit, and copies the binary to gpu-carry/candle-cuda-bench, where
# scripts/gpu-check.sh runs it beside `kstyle bench` (skipped when absent).
#
# What candle's CUDA build needs, and where it comes from here (see the GPU.md "candle as a
# baseline" notes):
#   nvcc + cudafe/ptxas + NVVM   PyPI nvidia-cuda-nvcc / nvidia-cuda-crt / nvidia-nvvm 13.0.88
#                                (pinned together: an unpinned crt/nvvm pulls 13.5, whose PTX a
#                                13.0 driver rejects); candle-kernels compiles its .cu files to PTX
#                                and its MoE/GGUF kernels into a static library (most of the time)
#   headers, libcudart           nvidia-cuda-runtime 13.0.96
#   <nv/target> and the rest of  nvidia-cuda-cccl 13.0.85 (cuda_fp16.h includes it; the toolkit
#   libcu++ (include/cccl)       has it, the nvcc wheel does not)
#   -lcublas -lcublasLt -lcurand nvidia-cublas 13.0.2.14, nvidia-curand 10.4.0.35, nvidia-cuda-nvrtc
#   -lnvrtc                      13.0.88: the wheels ship only versioned names (libcublas.so.13),
#                                so the unversioned link names are symlinked next to them
#   -lcuda                       a stub with every driver symbol cudarc's bindings name, soname
#                                libcuda.so.1 so the binary asks for the real driver there
#   the GPU's compute capability CUDA_COMPUTE_CAP=90 (H100/H200); no nvidia-smi here to ask
# cudarc's own `cuda-version-from-build-system` reads `nvcc --version`: 13.0 -> cuda-13000.
#
# Takes about 13 minutes on 2 cores; everything lands in ignored folders (.candle-cuda/,
# benches/candle-cuda/target/). Usage: scripts/build-candle-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$ROOT/.candle-cuda
CUDA=$DIR/py/nvidia/cu13
MANIFEST=benches/candle-cuda/Cargo.toml
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35"
STAMP=$DIR/.installed-$(echo $WHEELS | sha1sum | cut -c1-12)

if [[ ! -f "$STAMP" ]]; then
    mkdir -p "$DIR"
    # All wheels in one call: they share nvidia/cu13/, and `pip --target` skips (with only a
    # warning) a package whose top folder already exists unless --upgrade replaces the whole
    # folder. --no-deps: each wheel is pinned here; resolving would pull newer 13.x pieces.
    rm -rf "$DIR/py"
    # shellcheck disable=SC2086
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$DIR/py" $WHEELS >&2
    touch "$STAMP"
fi
[[ -e "$CUDA/include/cccl/nv/target" ]] || { echo "build-candle-cuda: no <nv/target> under $CUDA/include/cccl" >&2; exit 1; }
[[ -x "$CUDA/bin/nvcc" ]] || { echo "build-candle-cuda: no nvcc under $CUDA/bin" >&2; exit 1; }

# Unversioned link names for the linker (the loader on the GPU machine uses the sonames).
for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    ln -sf "$so" "$CUDA/lib/${so%%.so.*}.so"
done

# The driver stub: one empty function per `pub unsafe fn cu*` in cudarc's driver bindings.
mkdir -p "$CUDA/lib/stubs"
CUDARC=$(cargo metadata --quiet --format-version 1 --manifest-path "$MANIFEST" |
    "${PYTHON:-python3}" -c 'import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
    awk '{print "void " $1 "(void) {}"}' > "$DIR/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$DIR/libcuda_stub.c"
echo "build-candle-cuda: stub libcuda.so with $(wc -l < "$DIR/libcuda_stub.c") symbols" >&2

export CUDA_HOME=$CUDA
export PATH=$CUDA/bin:$PATH
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR=$ROOT/benches/candle-cuda/target
# The build scripts run nvcc, which finds libnvvm and friends through these.
export LD_LIBRARY_PATH=$CUDA/lib:$CUDA/nvvm/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
t0=$SECONDS
cargo build --release --manifest-path "$MANIFEST"
echo "build-candle-cuda: built in $((SECONDS - t0)) s" >&2

mkdir -p gpu-carry
cp "$CARGO_TARGET_DIR/release/candle-cuda-bench" gpu-carry/candle-cuda-bench
need=$(objdump -T gpu-carry/candle-cuda-bench 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1 || true)
echo "build-candle-cuda: gpu-carry/candle-cuda-bench $(du -m gpu-carry/candle-cuda-bench | cut -f1) MiB," \
    "needs ${need:-unknown}; libraries it links:" >&2
readelf -d gpu-carry/candle-cuda-bench | grep NEEDED >&2 || true
# The device tool carries at most 64 MiB in all.
total=$(du -sm gpu-carry | cut -f1)
echo "gpu-carry: $total MiB in all (limit 64)" >&2
if (( total > 63 )); then
    echo "build-candle-cuda: gpu-carry is over the 64 MiB carry limit" >&2
    exit 1
fi
