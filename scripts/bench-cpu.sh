#!/usr/bin/env bash
# kstyle's CPU backend against candle's CPU backend on the same shapes, in one process
# (benches/candle-baseline, its own workspace: the main build never compiles candle). Prints the
# machine, then the table (markdown) that bench/RESULTS.md records under "CPU (this machine)".
# First build ~5-8 min on 2 cores. Usage: scripts/bench-cpu.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --manifest-path benches/candle-baseline/Cargo.toml
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc $(nproc)"
cargo run --release --quiet --manifest-path benches/candle-baseline/Cargo.toml -- "$@"
