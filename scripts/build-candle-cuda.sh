#!/usr/bin/env bash
# Builds benches/candle-cuda (candle 0.11 with its `cuda` feature) on this CPU machine, with no GPU
# and no CUDA toolkit, and puts the binary, xz-compressed, at gpu-carry/candle-cuda-bench.xz, where
# scripts/gpu-check.sh unpacks and runs it beside `kstyle bench` (skipped when absent).
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
# Takes 8-13 minutes on 2 cores (7.6 min measured with the CPU crates already built); everything lands in ignored folders (.candle-cuda/,
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

# The driver stub: one function per `pub unsafe fn cu*` in cudarc's driver bindings, each returning
# CUDA_ERROR_NO_DEVICE (100), so the binary run here against the stub says SKIPPED and exits 2.
mkdir -p "$CUDA/lib/stubs"
CUDARC=$(cargo metadata --quiet --format-version 1 --manifest-path "$MANIFEST" |
    "${PYTHON:-python3}" -c 'import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
    awk '{print "int " $1 "(void) { return 100; }"}' > "$DIR/libcuda_stub.c"
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

BIN=$CARGO_TARGET_DIR/release/candle-cuda-bench
need=$(objdump -T "$BIN" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -1 || true)
echo "build-candle-cuda: $BIN $(du -m "$BIN" | cut -f1) MiB, needs ${need:-unknown}; it links:" >&2
readelf -d "$BIN" | grep NEEDED >&2 || true
# The device tool sends the whole working tree (tracked files: ~54 MiB, mostly tests/fixtures)
# plus the carried paths, 64 MiB at most. The binary is ~48 MiB, mostly candle's PTX text, so it
# travels xz-compressed (~5 MiB) and scripts/gpu-check.sh unpacks it to /tmp.
mkdir -p gpu-carry
rm -f gpu-carry/candle-cuda-bench
xz -9 -T0 -c "$BIN" > gpu-carry/candle-cuda-bench.xz
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -sb gpu-carry | cut -f1)
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
echo "build-candle-cuda: gpu-carry/candle-cuda-bench.xz $(mib "$(stat -c %s gpu-carry/candle-cuda-bench.xz)") MiB;" \
    "working tree $(mib "$tree") MiB + gpu-carry $(mib "$carry") MiB = $(mib $((tree + carry))) MiB (device limit 64)" >&2
if (( tree + carry > 64 * 1048576 )); then
    echo "build-candle-cuda: WARNING: over the device tool's 64 MiB; the run call will be refused" >&2
fi
