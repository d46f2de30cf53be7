//! Correctness against real references: outputs of ONNX Runtime (and PyTorch's top-1) on real
//! models, computed by `models/make_fixtures.py` and committed under tests/fixtures.

mod common;

use common::*;
use edgeinfer::device::DeviceRequest;
use edgeinfer::model::DType;
use edgeinfer::pipeline::Frame;
use edgeinfer::Runtime;

const TOL: f32 = 1e-3;

fn check_fixture(dir: &str, optimize: bool) -> f32 {
    let tmp = tempfile::tempdir().unwrap();
    let model = import_to(
        tmp.path(),
        &fixture(&format!("{dir}/model.onnx")),
        DType::F32,
    );
    let rt = Runtime::builder()
        .model(&model)
        .device(DeviceRequest::Cpu)
        .optimize(optimize)
        .build()
        .unwrap();
    let inputs = read_tensors(&fixture(&format!("{dir}/input.safetensors")));
    let expected = read_tensors(&fixture(&format!("{dir}/expected.safetensors")));
    let out = rt.run_tensors(&inputs, &[]).unwrap();
    let mut worst = 0f32;
    for (name, want) in &expected {
        let got = &out
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{dir}: no output '{name}'"))
            .1;
        let d = max_abs_diff(got, want);
        assert!(
            d <= TOL,
            "{dir}: output '{name}' differs from ONNX Runtime by {d} (> {TOL})"
        );
        assert_eq!(
            argmax(got),
            argmax(want),
            "{dir}: top-1 differs from ONNX Runtime"
        );
        worst = worst.max(d);
    }
    worst
}

#[test]
fn resnet18_pruned_matches_onnxruntime() {
    let d = check_fixture("resnet18_pruned", true);
    eprintln!("resnet18_pruned max |diff| = {d:e}");
}

#[test]
fn resnet18_pruned_matches_onnxruntime_without_passes() {
    check_fixture("resnet18_pruned", false);
}

#[test]
fn vit_tiny_matches_onnxruntime() {
    let d = check_fixture("vit_tiny", true);
    eprintln!("vit_tiny max |diff| = {d:e}");
}

#[test]
fn squeezenet_matches_onnxruntime() {
    let d = check_fixture("squeezenet", true);
    eprintln!("squeezenet max |diff| = {d:e}");
}

fn mobilenet() -> Runtime {
    Runtime::builder()
        .model(root().join("models/mobilenet_v2.safetensors"))
        .device(DeviceRequest::Cpu)
        .build()
        .unwrap()
}

const PHOTOS: &[&str] = &["chelsea", "coffee", "astronaut"];

#[test]
fn embedded_mobilenet_v2_matches_onnxruntime_logits() {
    let rt = mobilenet();
    for p in PHOTOS {
        let input = read_tensors(&fixture(&format!("mobilenet_v2/{p}.input.safetensors")));
        let expected = read_tensors(&fixture(&format!("mobilenet_v2/{p}.expected.safetensors")));
        let out = rt.run_tensors(&input, &[]).unwrap();
        let (name, got) = &out.outputs[0];
        let want = &expected
            .iter()
            .find(|(n, _)| n == name)
            .expect("logits in fixture")
            .1;
        let d = max_abs_diff(got, want);
        eprintln!("mobilenet_v2 {p}: max |diff| = {d:e}");
        assert!(d <= TOL, "{p}: logits differ from ONNX Runtime by {d}");
        assert_eq!(argmax(got), argmax(want), "{p}: top-1 differs");
    }
}

#[test]
fn embedded_mobilenet_v2_top1_from_photos_equals_pytorch() {
    let rt = mobilenet();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mobilenet_v2/expected.json")).unwrap(),
    )
    .unwrap();
    for (i, p) in PHOTOS.iter().enumerate() {
        let frame = Frame::from_path(i as u64, root().join(format!("models/samples/{p}.png")));
        let report = rt.infer(&frame);
        assert!(report.error.is_none(), "{p}: {:?}", report.error);
        let torch_top1 = expected["photos"][p]["torch_top1"]["index"]
            .as_u64()
            .expect("photos.<name>.torch_top1.index in expected.json")
            as usize;
        assert_eq!(
            report.top[0].class, torch_top1,
            "{p}: our top-1 {:?}",
            report.top[0]
        );
    }
}
