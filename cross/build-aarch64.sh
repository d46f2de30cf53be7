#!/usr/bin/env bash
# Builds the CPU binary for aarch64-unknown-linux-gnu (Jetson's CPU, Raspberry Pi 5) in the
# `dist` profile, with Debian's cross gcc as the linker (.cargo/config.toml). Prints its size
# and build time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cross/setup-aarch64.sh
start=$(date +%s)
# The `dist` profile: release + thin LTO + stripped (Cargo.toml).
cargo build --profile dist --locked --target aarch64-unknown-linux-gnu
bin=target/aarch64-unknown-linux-gnu/dist/edgeinfer
echo "aarch64 binary: $bin, $(stat -c %s "$bin") bytes, built in $(( $(date +%s) - start )) s"
