#!/usr/bin/env bash
# Runs the aarch64 binary under qemu-aarch64 on the embedded default model and the sample
# photos, and compares it with the x86-64 build: the same top-1 class for every photo (demo
# reports) and logits within 1e-4 on the prepared input tensors (--dump-outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash cross/build-aarch64.sh
cargo build --release --locked
arm=(qemu-aarch64 -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/dist/edgeinfer)
x86=(target/release/edgeinfer)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${x86[@]}" demo --device cpu --out "$tmp/x86" > /dev/null
"${arm[@]}" demo --device cpu --out "$tmp/arm" > /dev/null
for p in chelsea coffee astronaut; do
    for t in x86 arm; do
        if [ $t = x86 ]; then run=("${x86[@]}"); else run=("${arm[@]}"); fi
        "${run[@]}" run --device cpu --model models/mobilenet_v2.safetensors \
            --input-tensor "tests/fixtures/mobilenet_v2/$p.input.safetensors" \
            --dump-outputs "$tmp/$t-$p.safetensors" > /dev/null
    done
done
python3 cross/compare_outputs.py "$tmp"
