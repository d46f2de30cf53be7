#!/usr/bin/env bash
# Builds the library's tests for aarch64-unknown-linux-gnu and runs them under qemu-aarch64:
# every kernel test (the portable micro-kernel, depthwise, Winograd, layout ops, ... against
# candle's reference ops) as the Jetson and Raspberry Pi CPUs would run them. A clean build of
# the dependencies for aarch64 takes ~10 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cross/setup-aarch64.sh
start=$(date +%s)
cargo test --release --locked --target aarch64-unknown-linux-gnu --lib "$@"
echo "aarch64 library tests under qemu: $(( $(date +%s) - start )) s (build included)"
