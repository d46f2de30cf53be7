#!/usr/bin/env bash
# Installs what the aarch64 cross build and its qemu test runs need (Debian/Ubuntu, as root or
# with sudo): the cross gcc and libc (the linker, see .cargo/config.toml), qemu-user (the test
# runner) and Rust's aarch64 standard library. Safe to run again.
set -euo pipefail
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo=sudo; fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi
rustup target add aarch64-unknown-linux-gnu
