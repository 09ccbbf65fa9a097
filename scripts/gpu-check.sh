#!/usr/bin/env bash
# The one prepared command for a GPU session (run scripts/gpu-prepare.sh first, here):
#   run(command="bash scripts/gpu-check.sh", carry=["gpu-carry"], timeout_s=580)
# Steps, each under its own timeout, full logs in $OUT (the device tool returns at most 8 files:
# env/parity/verify/bench/torch/candle logs, summary.txt, and bench.jsonl holding every timed row
# of kstyle, PyTorch and candle), a short table last:
#   env     driver, GPU, CUDA libraries
#   parity  kstyle gpu-parity: every CUDA op vs the CPU oracle (KSTYLE_CUDA_SYNC=1: a fault names
#           its kernel)
#   verify  kstyle verify --device cuda tests/fixtures/tiny
#   train   kstyle train --device cuda, 4 steps on the tiny model in f32 and bf16 (micro-batches of
#           both pictures), losses beside the CPU runs'
#   bench   kstyle bench: GEMM, flash attention vs composition, fused LoRA, group norm, rooflines
#   model   kstyle bench --model: the full SDXL UNet (random weights, bf16) at 1024 px: inference
#           b2, LoRA / checkpointed LoRA / gated training micro-batches, then inference and LoRA
#           with float8 weights (--weight-dtype), peak memory, and after each case a profiled
#           run's device time per kernel and cuBLAS call (--profile; folded into bench.log)
#   torch   scripts/bench_torch.py: PyTorch SDPA / GEMM / group norm on the same shapes, then
#           scripts/bench_torch_unet.py: diffusers' UNet on the model shapes (folded into
#           torch.log; needs gpu-carry/diffusers.tar.xz)
#   candle  gpu-carry/candle-cuda-bench.xz (scripts/build-candle-cuda.sh): candle 0.11 on the same
#           shapes; skipped when the binary was not built
# Expected wall time on an H100: ~5-7 minutes (most of it the first cuBLAS/driver warm-ups).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kstyle-gpu-out}
mkdir -p "$OUT"
# The binary travels xz-compressed (see gpu-prepare.sh); unpack it outside the working tree.
BIN=/tmp/kstyle-bin
# python's lzma, since the GPU image may lack the xz tool.
python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' gpu-carry/kstyle.xz "$BIN" &&
    chmod +x "$BIN" || { echo "no gpu-carry/kstyle.xz: run scripts/gpu-prepare.sh here first"; exit 1; }
# cuBLAS and NVRTC 13 from the toolkit; torch's wheel copies as a fallback (untested path).
TORCH_CU13=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${TORCH_CU13:+$TORCH_CU13:}${LD_LIBRARY_PATH:-}
# The carried cache holds sm_90a cubins; a miss (another arch, another NVRTC) compiles and adds.
export KSTYLE_CACHE_DIR=/tmp/kstyle-cache/cache
mkdir -p /tmp/kstyle-cache
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    gpu-carry/cache.tar.xz /tmp/kstyle-cache || echo "no gpu-carry/cache.tar.xz: kernels compile on first use"
# The fixtures travel as one archive (scripts/gpu-prepare.sh; the tracked tree is over what a call
# carries): unpack it into this copy of the tree.
# Test for a file, not a folder: the copy of the tree can hold the untracked folders' skeleton
# (the first GPU session found tests/fixtures/tiny/reference there, but no model in it).
if [ ! -f tests/fixtures/tiny/sdxl/model_index.json ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(".", filter="data")' \
        gpu-carry/fixtures.tar.xz ||
        { echo "no tests/fixtures and no gpu-carry/fixtures.tar.xz: run scripts/gpu-prepare.sh here first"; exit 1; }
fi
[ -f tests/fixtures/tiny/sdxl/model_index.json ] ||
    { echo "gpu-carry/fixtures.tar.xz unpacked, but tests/fixtures/tiny/sdxl/model_index.json is missing"; exit 1; }
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# JSON rows are gathered outside $OUT and joined into one file at the end (the 8-file limit).
JSONS=$(mktemp -d)

# One deadline for the whole script (seconds from its start), a little inside the call's
# timeout_s, so that a slow step shortens the ones after it instead of the call's kill cutting
# off the summary and bench.jsonl: each step runs under min(its cap, what is left).
DEADLINE=${KSTYLE_GPU_DEADLINE:-560}

# KSTYLE_GPU_ONLY="parity bench model" runs only the named steps (a short call that measures one
# change); the others report "skipped: not in KSTYLE_GPU_ONLY".
ONLY=${KSTYLE_GPU_ONLY:-}
selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

step() {
    local name=$1 limit=$2
    shift 2
    if ! selected "$name"; then
        printf '%-8s skipped: not in KSTYLE_GPU_ONLY\n' "$name" | tee -a "$SUMMARY"
        : > "$OUT/$name.log"
        return
    fi
    local left=$((DEADLINE - 15 - SECONDS))
    if [ "$left" -lt 10 ]; then
        printf '%-8s skipped: out of time (deadline %ss)\n' "$name" "$DEADLINE" | tee -a "$SUMMARY"
        : > "$OUT/$name.log"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local t0=$SECONDS
    echo "==> $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    local last
    last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-110)
    [ "$rc" = 124 ] && last="TIMEOUT after ${limit}s; $last"
    printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$dt" "$last" | tee -a "$SUMMARY"
    tail -5 "$OUT/$name.log"
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; ls /usr/local/cuda/lib64 | grep -E "libnvrtc.so|libcublas.so|libcublasLt.so" ; ls "$KSTYLE_CACHE_DIR"/nvrtc | wc -l; '"$BIN"' --version'
step parity 150 env KSTYLE_CUDA_SYNC=1 "$BIN" gpu-parity
# 21,384 rows (tiny and extra) on the CPU; the sampler, img2img, inpaint, mask-crop, refiner, EDM and embedding cases are ~95 whole runs
# of the tiny pipeline (about 500 UNet calls).
step verify 150 "$BIN" verify --device cuda tests/fixtures/tiny
# Training end to end on CUDA (AdamW state on the device), 4 steps of the tiny model, and the same
# run on the CPU: the two loss logs side by side. Folded into verify.log (the 8-file limit).
TRAIN_DIR=$(mktemp -d)
mkdir -p "$TRAIN_DIR/data"
cp tests/fixtures/tiny/reference/pipeline.png tests/fixtures/tiny/reference/clip_input.png "$TRAIN_DIR/data/"
train_tiny() { # DEVICE DTYPE: train, then print the CPU run's loss log beside this one's
    "$BIN" train --model tests/fixtures/tiny/sdxl --data "$TRAIN_DIR/data" --out "$TRAIN_DIR/$1-$2/a.safetensors" \
        --method kstyle --clip tests/fixtures/tiny/clip --resolution 64 --caption-template "a [v] x" \
        --max-steps 4 --grad-accum 2 --batch-size 2 --seed 7 --device "$1" --dtype "$2" --memory-budget 100GiB &&
        { echo "== cpu-$2 | $1-$2"; paste -d' ' "$TRAIN_DIR/cpu-$2/a.loss.csv" "$TRAIN_DIR/$1-$2/a.loss.csv" 2>/dev/null; }
}
export -f train_tiny
export BIN TRAIN_DIR
if selected train; then
    timeout 40 bash -c 'train_tiny cpu f32' > /dev/null 2>&1
    timeout 40 bash -c 'train_tiny cpu bf16' > /dev/null 2>&1
fi
step train 60 bash -c 'train_tiny cuda f32 && train_tiny cuda bf16'
cat "$OUT/train.log" >> "$OUT/verify.log" && rm -f "$OUT/train.log"
step bench 150 "$BIN" bench --json "$JSONS/1-kstyle.jsonl"
step model 150 "$BIN" bench --model --profile --json "$JSONS/1b-kstyle-model.jsonl"
# The forward's FLOPs counted at dispatch against the analytic count (every rate divides by it).
grep -h "FLOP" "$OUT/model.log" | cut -c1-110 | tee -a "$SUMMARY"
cat "$OUT/model.log" >> "$OUT/bench.log" && rm -f "$OUT/model.log"
step torch 60 python3 scripts/bench_torch.py --json "$JSONS/2-torch.jsonl"
if [ -f gpu-carry/diffusers.tar.xz ] &&
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        gpu-carry/diffusers.tar.xz /tmp/kstyle-site; then
    step torchunet 75 env PYTHONPATH=/tmp/kstyle-site python3 scripts/bench_torch_unet.py \
        tests/fixtures/tiny/sdxl_base_configs/unet/config.json --json "$JSONS/2b-torch-unet.jsonl"
    cat "$OUT/torchunet.log" >> "$OUT/torch.log" && rm -f "$OUT/torchunet.log"
else
    echo "torchunet skipped: no gpu-carry/diffusers.tar.xz (scripts/gpu-prepare.sh)" | tee -a "$SUMMARY"
fi
# candle's binary travels xz-compressed (48 MiB -> 5 MiB, to fit the 64 MiB the call carries).
CANDLE_BIN=/tmp/candle-cuda-bench
if [ -f gpu-carry/candle-cuda-bench.xz ] &&
    python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
        gpu-carry/candle-cuda-bench.xz "$CANDLE_BIN" && chmod +x "$CANDLE_BIN"; then
    step candle 60 "$CANDLE_BIN" --json "$JSONS/3-candle.jsonl"
else
    echo "candle   skipped: no gpu-carry/candle-cuda-bench.xz (bash scripts/build-candle-cuda.sh)" | tee -a "$SUMMARY"
fi
cat "$JSONS"/*.jsonl > "$OUT/bench.jsonl" 2>/dev/null

echo
echo "---- failing parity rows ----"
grep -E 'FAIL|error' "$OUT/parity.log" | head -30
echo "---- bench ----"
grep -E 'ms ' "$OUT/bench.log" "$OUT/torch.log" "$OUT/candle.log" 2>/dev/null | sed 's/^[^:]*://' | cut -c1-170
echo "---- kstyle vs baselines, same shapes (baseline/kstyle > 1: kstyle faster) ----"
python3 scripts/bench_join.py "$OUT/bench.jsonl" 2>&1 | cut -c1-170
echo "---- summary ----"
cat "$SUMMARY"
