#!/usr/bin/env bash
# Builds the CUDA binary (`--features cuda`; the release profile unless --profile is given)
# with the CUDA 13.4 wheels of cross/cuda-env.sh, on a machine with or without a GPU, in
# target/cuda/ so that the CPU build in target/ stays as it is. Prints the build time, the
# binary's size and the shared libraries it needs. GPU architecture: CUDA_COMPUTE_CAP (default
# 87, Jetson Orin; 90 for H100). CUDA release: EDGEINFER_CUDA_RELEASE (13.4, the default, or
# 13.0 for R580 drivers; see cross/cuda-env.sh). Extra arguments go to cargo (e.g. `--profile
# dist`).
#
# The binary needs libcuda.so.1 (the NVIDIA driver) and the CUDA 13 libraries to start, so it
# does not start on a machine without them; run it on a GPU machine after
# `source cross/cuda-env.sh` (which puts the CUDA 13 libraries on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/cuda-env.sh
# A CUDA release other than the default builds apart, so that switching does not rebuild.
case ${EDGEINFER_CUDA_RELEASE:-13.4} in
    13.4) export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} ;;
    *) export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-$EDGEINFER_CUDA_RELEASE} ;;
esac

profile=release
release=(--release)
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --profile) profile=${args[i + 1]:-release} release=() ;;
        --profile=*) profile=${args[i]#--profile=} release=() ;;
    esac
done
if [ "$profile" = dev ]; then profile=debug; fi

start=$(date +%s)
cargo build "${release[@]}" --locked --features cuda "$@"
elapsed=$(($(date +%s) - start))

bin=$CARGO_TARGET_DIR/$profile/edgeinfer
echo "CUDA binary (sm_$CUDA_COMPUTE_CAP): $bin, $(stat -c %s "$bin") bytes, built in $((elapsed / 60)) min $((elapsed % 60)) s"
echo "needs: $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd ' ')"
