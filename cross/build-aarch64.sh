#!/usr/bin/env bash
# Builds the CPU release binary for aarch64-unknown-linux-gnu (Jetson's CPU, Raspberry Pi 5)
# with Debian's cross gcc as the linker (.cargo/config.toml). Prints its size and build time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cross/setup-aarch64.sh
start=$(date +%s)
cargo build --release --locked --target aarch64-unknown-linux-gnu
bin=target/aarch64-unknown-linux-gnu/release/edgeinfer
echo "aarch64 binary: $bin, $(stat -c %s "$bin") bytes, built in $(( $(date +%s) - start )) s"
