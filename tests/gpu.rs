//! The CUDA path against real references (ONNX Runtime outputs, pytorch-grad-cam heat maps)
//! and against the CPU path, run where a GPU is:
//! `cargo test --release --features cuda --test gpu -- --ignored` (see cross/JETSON.md; CI has
//! no GPU and only compiles these).
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::{argmax, fixture, import_to, max_abs, max_abs_diff, pearson, read_tensors, root};
use edgeinfer::board::ComputeDtype;
use edgeinfer::device::DeviceRequest;
use edgeinfer::exec::ops;
use edgeinfer::explain::{Choice, ExplainOptions, Method};
use edgeinfer::graph::Op;
use edgeinfer::model::DType;
use edgeinfer::pipeline::Frame;
use edgeinfer::report::Verdict;
use edgeinfer::Runtime;

const PHOTOS: [&str; 3] = ["chelsea", "coffee", "astronaut"];

fn cuda() -> DeviceRequest {
    DeviceRequest::Cuda(0)
}

fn to_cpu(t: &Tensor) -> Tensor {
    t.to_device(&candle_core::Device::Cpu).unwrap()
}

fn logits(device: DeviceRequest, dtype: ComputeDtype, model: &str, photo: &str) -> Tensor {
    let rt = Runtime::builder()
        .model(root().join(model))
        .device(device)
        .compute_dtype(dtype)
        .build()
        .unwrap_or_else(|e| panic!("{device} {dtype}: {e}"));
    assert_eq!(
        rt.device().name,
        device.to_string(),
        "{}",
        rt.device().reason
    );
    let feeds = read_tensors(&fixture(&format!("mobilenet_v2/{photo}.input.safetensors")));
    let out = rt.run_tensors(&feeds, &[]).unwrap();
    to_cpu(&out.outputs[0].1)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_the_cpu_within_1e_4() {
    for photo in PHOTOS {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(cuda(), ComputeDtype::F32, m, photo);
        let d = max_abs_diff(&cpu, &gpu);
        eprintln!("{photo}: cuda f32 vs cpu max abs {d}");
        // cuDNN/cuBLAS may use TF32 on Ampere+; candle keeps f32 matmuls in f32 unless told.
        assert!(d < 1e-4 * max_abs(&cpu).max(1.0), "{photo}: {d}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f16_matches_the_cpu_within_1e_2() {
    for photo in PHOTOS {
        let m = "models/mobilenet_v2.safetensors";
        let cpu = logits(DeviceRequest::Cpu, ComputeDtype::F32, m, photo);
        let gpu = logits(cuda(), ComputeDtype::F16, m, photo);
        let d = max_abs_diff(&cpu, &gpu);
        let scale = max_abs(&cpu);
        eprintln!("{photo}: cuda f16 vs cpu f32 max abs {d} (largest |logit| {scale})");
        assert!(d < 1e-2 * scale, "{photo}: {d} of {scale}");
        assert_eq!(argmax(&gpu), argmax(&cpu), "{photo}: f16 top-1");
    }
}

/// Every imported reference model (a pruned ResNet-18, SqueezeNet, a small ViT) and the
/// embedded MobileNetV2 on CUDA against ONNX Runtime's outputs, with the CPU's tolerance.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_onnxruntime_on_every_reference_model() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for dir in ["resnet18_pruned", "squeezenet", "vit_tiny"] {
        let d = tmp.path().join(dir);
        std::fs::create_dir(&d).unwrap();
        let model = import_to(&d, &fixture(&format!("{dir}/model.onnx")), DType::F32);
        cases.push((
            dir.to_string(),
            model,
            fixture(&format!("{dir}/input.safetensors")),
            fixture(&format!("{dir}/expected.safetensors")),
        ));
    }
    for p in PHOTOS {
        cases.push((
            format!("mobilenet_v2 {p}"),
            root().join("models/mobilenet_v2.safetensors"),
            fixture(&format!("mobilenet_v2/{p}.input.safetensors")),
            fixture(&format!("mobilenet_v2/{p}.expected.safetensors")),
        ));
    }
    for (what, model, input, expected) in cases {
        let rt = Runtime::builder()
            .model(&model)
            .device(cuda())
            .build()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let out = rt.run_tensors(&read_tensors(&input), &[]).unwrap();
        for (name, want) in read_tensors(&expected) {
            let got = &out
                .outputs
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{what}: no output '{name}'"))
                .1;
            assert!(got.device().is_cuda(), "{what}: output not on the GPU");
            let got = to_cpu(got);
            let d = max_abs_diff(&got, &want);
            eprintln!("{what}: cuda f32 '{name}' vs ONNX Runtime max abs {d:e}");
            assert!(d <= 1e-3, "{what}: '{name}' differs by {d}");
            assert_eq!(argmax(&got), argmax(&want), "{what}: top-1");
        }
    }
}

/// CAM, Grad-CAM (autograd on the GPU) and Eigen-CAM on CUDA against pytorch-grad-cam's maps
/// (tests/fixtures/explain), with the CPU test's bars.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_heat_maps_match_pytorch_grad_cam() {
    let text = std::fs::read_to_string(fixture("explain/cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = root().join("models/mobilenet_v2.safetensors");
    let build = |m: Method| {
        Runtime::builder()
            .model(&model)
            .device(cuda())
            .explain(ExplainOptions {
                choice: Choice::Use(m),
                ..Default::default()
            })
            .build()
            .unwrap()
    };
    let (rt_grad, rt_eigen) = (build(Method::GradCam), build(Method::EigenCam));
    for id in [
        "mobilenet_v2.features_18.chelsea",
        "mobilenet_v2.features_18.coffee",
    ] {
        let c = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap();
        let refs: HashMap<String, Tensor> = read_tensors(&fixture(&format!(
            "explain/{}",
            c["file"].as_str().unwrap()
        )))
        .into_iter()
        .collect();
        let input: HashMap<String, Tensor> =
            read_tensors(&root().join(c["input"].as_str().unwrap()))
                .into_iter()
                .collect();
        let class = c["target_class"].as_u64().unwrap() as usize;
        let map = |rt: &Runtime, m: Method| {
            let ex = rt.explainer().unwrap();
            let out = rt
                .run_tensors(&[("input".into(), input["input"].clone())], &ex.taps())
                .unwrap();
            ex.run(m, &out.taps, class).unwrap().raw.data
        };
        let flat = |k: &str| refs[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r_cam = pearson(&map(&rt_grad, Method::Cam), &flat("cam.raw"));
        let grad = map(&rt_grad, Method::GradCam);
        let r_grad = pearson(&grad, &flat("gradcam.raw"));
        let r_eigen = pearson(&map(&rt_eigen, Method::EigenCam), &flat("eigencam.raw")).abs();
        let worst = grad
            .iter()
            .zip(flat("gradcam.raw"))
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        eprintln!(
            "{id} on cuda: pearson cam {r_cam:.6} gradcam {r_grad:.6} eigencam {r_eigen:.6}, \
             gradcam worst relative error {worst:e}"
        );
        for (what, r) in [("cam", r_cam), ("gradcam", r_grad), ("eigencam", r_eigen)] {
            assert!(r >= 0.99, "{id}: {what} pearson {r}");
        }
        assert!(worst < 1e-2, "{id}: gradcam relative error {worst}");
    }
}

/// Frames on the GPU as a camera app sends them: photos decoded, a corrupt one answered with an
/// error naming it, and the frames after it still answered with PyTorch's top-1.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_frames_survive_a_corrupt_one_and_match_pytorch_top1() {
    let rt = Runtime::builder()
        .model(root().join("models/mobilenet_v2.safetensors"))
        .device(cuda())
        .build()
        .unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mobilenet_v2/expected.json")).unwrap(),
    )
    .unwrap();
    let mut png = std::fs::read(root().join("models/samples/chelsea.png")).unwrap();
    png.truncate(png.len() / 3);
    let r = rt.infer(&Frame::from_encoded(0, "bad.png", png));
    assert_eq!(r.verdict, Verdict::Error);
    assert!(r.error.as_deref().unwrap_or("").contains("bad.png"));
    for (i, p) in PHOTOS.iter().enumerate() {
        let frame = Frame::from_path(i as u64 + 1, root().join(format!("models/samples/{p}.png")));
        let r = rt.infer(&frame);
        assert!(r.error.is_none(), "{p}: {:?}", r.error);
        assert_eq!(r.device, "cuda:0");
        let want = expected["photos"][p]["torch_top1"]["index"]
            .as_u64()
            .unwrap() as usize;
        assert_eq!(r.top[0].class, want, "{p}: {:?}", r.top[0]);
        eprintln!("{p} on cuda: {:.2} ms, verdict {:?}", r.total_ms, r.verdict);
    }
}

/// Our grouped/depthwise convolution kernel (one launch, padding read as zeros) against
/// candle's per-group convolutions on the CPU: odd sizes, asymmetric pads, strides 1-3,
/// dilation, channel multipliers, ResNeXt-style groups of several channels, 5x5 and 1x7
/// kernels, batch 2, with bias; f32 within 1e-4, f16 and bf16 within their precision.
#[test]
#[ignore = "needs a CUDA GPU"]
fn grouped_conv_kernel_matches_candle_on_the_cpu() {
    let gpu = candle_core::Device::new_cuda(0).unwrap();
    // (n, cin, h, w, cout, group, kh, kw, strides, pads, dilations)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        [usize; 2],
        [usize; 4],
        [usize; 2],
    );
    let cases: &[Case] = &[
        (1, 32, 112, 112, 32, 32, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1]),
        (1, 96, 113, 111, 96, 96, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1]),
        (1, 144, 56, 56, 144, 144, 3, 3, [2, 2], [0, 0, 1, 1], [1, 1]),
        (2, 24, 17, 9, 48, 24, 5, 5, [1, 1], [2, 2, 2, 2], [1, 1]),
        (1, 16, 20, 21, 16, 16, 3, 3, [1, 1], [2, 2, 2, 2], [2, 2]),
        (1, 64, 15, 15, 64, 8, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1]),
        (1, 12, 30, 31, 24, 4, 1, 7, [3, 2], [0, 3, 1, 3], [1, 1]),
        (1, 8, 1, 1, 8, 8, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1]),
    ];
    for (i, &(n, cin, h, w, cout, group, kh, kw, strides, pads, dil)) in cases.iter().enumerate() {
        let cpu = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &cpu).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (cout, cin / group, kh, kw), &cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, cout, &cpu).unwrap();
        let op = Op::Conv {
            strides: strides.to_vec(),
            pads: pads.to_vec(),
            dilations: dil.to_vec(),
            group,
            activation: None,
            residual: false,
        };
        let want = ops::eval(&op, &[x.clone(), wt.clone(), b.clone()])
            .unwrap()
            .remove(0);
        for (dtype, tol) in [
            (candle_core::DType::F32, 1e-4f32),
            (candle_core::DType::F16, 2e-2),
            (candle_core::DType::BF16, 1e-1),
        ] {
            let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let got = ops::eval(&op, &[on_gpu(&x), on_gpu(&wt), on_gpu(&b)])
                .unwrap()
                .remove(0);
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let got = to_cpu(&got).to_dtype(candle_core::DType::F32).unwrap();
            let d = max_abs_diff(&got, &want);
            let scale = max_abs(&want).max(1.0);
            eprintln!("grouped conv case {i} {dtype:?}: max abs {d:e} (largest {scale})");
            assert!(d <= tol * scale, "case {i} {dtype:?}: {d} of {scale}");
        }
    }
}

/// Whole Conv nodes on CUDA (our 1×1 product, grouped kernel or candle's dense path, then our
/// one-pass bias + residual + ReLU/clip epilogue) against the CPU's ops: with and without
/// residual, every activation the epilogue takes and one it does not (HardSwish, unfused), f32
/// and f16, batch 1 and 3.
#[test]
#[ignore = "needs a CUDA GPU"]
fn conv_nodes_with_fused_epilogues_match_the_cpu() {
    use edgeinfer::graph::Activation;
    let gpu = candle_core::Device::new_cuda(0).unwrap();
    let cpu = candle_core::Device::Cpu;
    // (n, cin, h, w, cout, group, k, stride, pad)
    let shapes = [
        (1, 64, 28, 28, 96, 1, 1, 1, 0),
        (3, 40, 7, 9, 24, 1, 1, 1, 0),
        (1, 32, 28, 28, 32, 1, 3, 1, 1),
        (1, 32, 15, 15, 64, 1, 1, 2, 0),
        (1, 48, 14, 14, 48, 48, 3, 1, 1),
        (2, 16, 13, 11, 32, 1, 3, 2, 1),
    ];
    let acts = [
        None,
        Some(Activation::Relu),
        Some(Activation::Clip {
            min: Some(0.0),
            max: Some(6.0),
        }),
        Some(Activation::Clip {
            min: None,
            max: Some(0.5),
        }),
        Some(Activation::HardSwish),
    ];
    for (i, &(n, cin, h, w, cout, group, k, s, p)) in shapes.iter().enumerate() {
        let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &cpu).unwrap();
        let wt = Tensor::randn(0f32, 0.3, (cout, cin / group, k, k), &cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, cout, &cpu).unwrap();
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let r = Tensor::randn(0f32, 1.0, (n, cout, oh, ow), &cpu).unwrap();
        for act in &acts {
            for residual in [false, true] {
                let op = Op::Conv {
                    strides: vec![s, s],
                    pads: vec![p; 4],
                    dilations: vec![1, 1],
                    group,
                    activation: *act,
                    residual,
                };
                let mut ins = vec![x.clone(), wt.clone(), b.clone()];
                if residual {
                    ins.push(r.clone());
                }
                let want = ops::eval(&op, &ins).unwrap().remove(0);
                for (dtype, tol) in [
                    (candle_core::DType::F32, 1e-4f32),
                    (candle_core::DType::F16, 2e-2),
                ] {
                    let g: Vec<Tensor> = ins
                        .iter()
                        .map(|t| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap())
                        .collect();
                    let got = ops::eval(&op, &g).unwrap().remove(0);
                    assert_eq!(got.dims(), want.dims(), "shape {i}");
                    let got = to_cpu(&got).to_dtype(candle_core::DType::F32).unwrap();
                    let d = max_abs_diff(&got, &want);
                    let scale = max_abs(&want).max(1.0);
                    assert!(
                        d <= tol * scale,
                        "shape {i} {act:?} residual {residual} {dtype:?}: {d} of {scale}"
                    );
                }
            }
        }
        eprintln!("conv node shape {i}: every epilogue within bounds");
    }
}
