# shellcheck shell=bash
# The CUDA toolkit for `cargo build --features cuda` on a machine without one (and without a GPU):
#
#     source cross/cuda-env.sh
#
# Installs NVIDIA's CUDA 13.4 wheels from PyPI (nvcc, cudart, nvrtc, cuBLAS, cuRAND, CCCL) into a
# venv at .venv-cuda/ in the repository root when they are missing or pinned differently
# (EDGEINFER_CUDA_RELEASE=13.0: the CUDA 13.0 wheels, in .venv-cuda-13.0/, for R580 drivers), makes
# the unversioned .so links the linker asks for and a link-time stub of the driver's libcuda.so
# (the driver is not a wheel) in .venv-cuda/cuda-stubs/, and exports:
#   CUDA_HOME         the wheels' nvidia/cu13 (candle's kernel build and cudarc read it)
#   PATH              + $CUDA_HOME/bin (nvcc; cudarc reads the CUDA version from `nvcc --version`)
#   CUDA_COMPUTE_CAP  the GPU architecture to compile for; default 87 (Jetson Orin), e.g. 90 for
#                     H100: `CUDA_COMPUTE_CAP=90 source cross/cuda-env.sh`. CUDA 13 builds 75+.
#   LIBRARY_PATH      + cuda-stubs (where gcc, as rustc's linker, finds -lcuda -lcudart ...)
#   LD_LIBRARY_PATH   + $CUDA_HOME/lib (the real cudart/cuBLAS/nvrtc, to run on a GPU machine;
#                     the stub is never on it: libcuda.so.1 must come from the NVIDIA driver)
# Safe to source again. Override the venv with EDGEINFER_CUDA_VENV and the Python with PYTHON.
# A binary built this way needs, where it runs, the CUDA 13 libraries (these wheels' lib/, or a
# CUDA 13 toolkit) and a driver that supports CUDA 13.4 (the driver JIT-compiles the kernels' PTX
# made by nvcc 13.4). It does not run on JetPack 5/6 (CUDA 11.4/12.x): see cross/JETSON.md.

_edgeinfer_cuda_env() {
    local root venv stubs site lib f base pins stamp release
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    # One CUDA release: the components of its `cuda-toolkit` metapackage. The kernels ship as
    # PTX that the driver JIT-compiles, and a driver refuses PTX newer than its own CUDA
    # release: build for the oldest driver the binary must run on (R580 drivers are CUDA 13.0).
    # cudarc 0.19.10 (Cargo.lock) knows CUDA up to 13.4; 13.5 fails its build script.
    release=${EDGEINFER_CUDA_RELEASE:-13.4}
    case $release in
        13.4) # cuda-toolkit==13.4.3 (CUDA 13.4 Update 3)
            pins="nvidia-cuda-nvcc==13.4.92
nvidia-nvvm==13.4.92
nvidia-cuda-crt==13.4.92
nvidia-cuda-runtime==13.4.92
nvidia-cuda-nvrtc==13.4.92
nvidia-cuda-cccl==13.3.4.3.1
nvidia-cublas==13.8.0.4
nvidia-curand==10.4.4.72" ;;
        13.0) # cuda-toolkit==13.0.2 (CUDA 13.0 Update 2; R580 drivers)
            pins="nvidia-cuda-nvcc==13.0.88
nvidia-nvvm==13.0.88
nvidia-cuda-crt==13.0.88
nvidia-cuda-runtime==13.0.96
nvidia-cuda-nvrtc==13.0.88
nvidia-cuda-cccl==13.0.85
nvidia-cublas==13.1.0.3
nvidia-curand==10.4.0.35" ;;
        *)
            echo "cuda-env: EDGEINFER_CUDA_RELEASE=$release: known releases are 13.4 and 13.0" >&2
            return 1 ;;
    esac
    if [ "$release" = 13.4 ]; then
        venv=${EDGEINFER_CUDA_VENV:-$root/.venv-cuda}
    else
        venv=${EDGEINFER_CUDA_VENV:-$root/.venv-cuda-$release}
    fi
    stubs=$venv/cuda-stubs
    stamp=$venv/.cuda-pins

    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$pins" ]; then
        echo "cuda-env: installing the CUDA $release wheels into $venv (about 1.2 GB)" >&2
        if [ ! -x "$venv/bin/python" ]; then
            "${PYTHON:-python3}" -m venv "$venv" || return 1
        fi
        # shellcheck disable=SC2086
        "$venv/bin/pip" install -q --disable-pip-version-check $pins || return 1
        rm -rf "$stubs"
        printf '%s' "$pins" >"$stamp"
    fi

    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    export CUDA_HOME=$site/nvidia/cu13
    if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        echo "cuda-env: no nvcc in $CUDA_HOME/bin; remove $venv and source again" >&2
        return 1
    fi

    # Unversioned names for the linker (-lcudart -> libcudart.so -> libcudart.so.13 ...).
    lib=$CUDA_HOME/lib
    mkdir -p "$stubs" || return 1
    for f in "$lib"/lib*.so.*; do
        [ -e "$f" ] || continue
        base=$(basename "$f")
        ln -sfn "$f" "$stubs/${base%%.so.*}.so"
    done
    # The driver library: a stub with every driver API name, soname libcuda.so.1.
    # Made again when the script or Cargo.lock (cudarc's bindings) is newer than it.
    if [ ! -f "$stubs/libcuda.so" ] || [ "$root/cross/make-libcuda-stub.py" -nt "$stubs/libcuda.so" ] ||
        [ "$root/Cargo.lock" -nt "$stubs/libcuda.so" ]; then
        "$venv/bin/python" "$root/cross/make-libcuda-stub.py" \
            --cuda-home "$CUDA_HOME" --out "$stubs" || return 1
    fi

    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-87}
    case ":$PATH:" in *":$CUDA_HOME/bin:"*) ;; *) export PATH=$CUDA_HOME/bin:$PATH ;; esac
    case ":${LIBRARY_PATH:-}:" in
        *":$stubs:"*) ;;
        *) export LIBRARY_PATH=$stubs${LIBRARY_PATH:+:$LIBRARY_PATH} ;;
    esac
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$lib:"*) ;;
        *) export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
    esac
    echo "cuda-env: CUDA_HOME=$CUDA_HOME ($(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "cross/cuda-env.sh sets variables in your shell: source it (source cross/cuda-env.sh)" >&2
    exit 2
fi
if _edgeinfer_cuda_env; then
    unset -f _edgeinfer_cuda_env
else
    unset -f _edgeinfer_cuda_env
    return 1
fi
