//! The CUDA path against the CPU path on the real models, run where a GPU is:
//! `cargo test --release --features cuda --test gpu -- --ignored` (see cross/JETSON.md; CI has
//! no GPU and only compiles these).
#![cfg(feature = "cuda")]

mod common;

use edgeinfer::board::ComputeDtype;
use edgeinfer::device::DeviceRequest;
use edgeinfer::Runtime;

fn logits(device: DeviceRequest, dtype: ComputeDtype, model: &str, photo: &str) -> Vec<f32> {
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
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_the_cpu_within_1e_4() {
    for photo in ["chelsea", "coffee", "astronaut"] {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(DeviceRequest::Cuda(0), ComputeDtype::F32, m, photo);
        let d = max_abs(&cpu, &gpu);
        eprintln!("{photo}: cuda f32 vs cpu max abs {d}");
        // cuDNN/cuBLAS may use TF32 on Ampere+; candle keeps f32 matmuls in f32 unless told.
        assert!(
            d < 1e-4 * cpu.iter().fold(1f32, |m, v| m.max(v.abs())),
            "{photo}: {d}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f16_matches_the_cpu_within_1e_2() {
    for photo in ["chelsea", "coffee", "astronaut"] {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(DeviceRequest::Cuda(0), ComputeDtype::F16, m, photo);
        let d = max_abs(&cpu, &gpu);
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{photo}: cuda f16 vs cpu f32 max abs {d} (largest |logit| {scale})");
        assert!(d < 1e-2 * scale, "{photo}: {d} of {scale}");
    }
}
