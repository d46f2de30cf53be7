//! With the `cuda` feature: compiles our CUDA kernels (src/exec/cuda/*.cu) to PTX with nvcc, for
//! the GPU architecture in CUDA_COMPUTE_CAP (as candle's kernels; default 75, the oldest CUDA 13
//! builds, which newer GPUs JIT-compile). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/exec/cuda/grouped_conv.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = match std::env::var_os("CUDA_HOME") {
        Some(home) if PathBuf::from(&home).join("bin/nvcc").exists() => {
            PathBuf::from(home).join("bin/nvcc")
        }
        _ => PathBuf::from("nvcc"),
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("grouped_conv.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/exec/cuda/grouped_conv.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the cuda feature needs nvcc ({}): {e}; see cross/cuda-env.sh",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on src/exec/cuda/grouped_conv.cu"
    );
}
