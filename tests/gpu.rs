//! The CUDA path against the CPU path on the real models, run where a GPU is:
//! `cargo test --release --features cuda --test gpu -- --ignored` (see cross/JETSON.md; CI has
//! no GPU and only compiles these).
#![cfg(feature = "cuda")]

mod common;

use candle_core::Tensor;
use common::{max_abs, max_abs_diff};
use edgeinfer::board::ComputeDtype;
use edgeinfer::device::DeviceRequest;
use edgeinfer::Runtime;

fn logits(device: DeviceRequest, dtype: ComputeDtype, model: &str, photo: &str) -> Tensor {
    let rt = Runtime::builder()
        .model(common::root().join(model))
        .device(device)
        .compute_dtype(dtype)
        .build()
        .unwrap_or_else(|e| panic!("{device} {dtype}: {e}"));
    let feeds = common::read_tensors(&common::fixture(&format!(
        "mobilenet_v2/{photo}.input.safetensors"
    )));
    let out = rt.run_tensors(&feeds, &[]).unwrap();
    out.outputs[0]
        .1
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_the_cpu_within_1e_4() {
    for photo in ["chelsea", "coffee", "astronaut"] {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(DeviceRequest::Cuda(0), ComputeDtype::F32, m, photo);
        let d = max_abs_diff(&cpu, &gpu);
        eprintln!("{photo}: cuda f32 vs cpu max abs {d}");
        // cuDNN/cuBLAS may use TF32 on Ampere+; candle keeps f32 matmuls in f32 unless told.
        assert!(d < 1e-4 * max_abs(&cpu).max(1.0), "{photo}: {d}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f16_matches_the_cpu_within_1e_2() {
    for photo in ["chelsea", "coffee", "astronaut"] {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(DeviceRequest::Cuda(0), ComputeDtype::F16, m, photo);
        let d = max_abs_diff(&cpu, &gpu);
        let scale = max_abs(&cpu);
        eprintln!("{photo}: cuda f16 vs cpu f32 max abs {d} (largest |logit| {scale})");
        assert!(d < 1e-2 * scale, "{photo}: {d} of {scale}");
    }
}
