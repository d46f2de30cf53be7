//! The explain layer against real references: pytorch-grad-cam's Grad-CAM and Eigen-CAM and a
//! NumPy CAM on MobileNetV2 (ImageNet weights), and a NumPy attention rollout on a small ViT.
//! Fixtures: `models/make_explain_fixtures.py` (tests/fixtures/explain/cases.json).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use candle_core::Tensor;
use common::pearson;
use edgeinfer::explain::methods::{rollout, HeadFusion};
use edgeinfer::explain::{Choice, ExplainOptions, HeatMap, Method};
use edgeinfer::model::DType;
use edgeinfer::runtime::Runtime;
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(common::fixture("explain/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn case(id: &str) -> Value {
    cases()
        .into_iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no case {id}"))
}

fn tensors(rel: &str) -> HashMap<String, Tensor> {
    common::read_tensors(&common::root().join(rel))
        .into_iter()
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn runtime(model: &std::path::Path, options: ExplainOptions) -> Runtime {
    Runtime::builder()
        .model(model)
        .device(edgeinfer::device::DeviceRequest::Cpu)
        .explain(options)
        .build()
        .unwrap()
}

/// Runs `method` on the case's input and returns (our raw map, our top-1).
fn explain_case(rt: &Runtime, c: &Value, method: Method) -> (HeatMap, usize) {
    let input = tensors(c["input"].as_str().unwrap())
        .remove("input")
        .unwrap();
    let ex = rt.explainer().unwrap();
    let out = rt
        .run_tensors(&[("input".into(), input)], &ex.taps())
        .unwrap();
    let top1 = common::argmax(&out.outputs[0].1);
    let class = c["target_class"].as_u64().unwrap() as usize;
    let e = ex.run(method, &out.taps, class).unwrap();
    assert_eq!(e.target_layer, c["target_layer"].as_str().unwrap());
    assert_eq!((e.raw.width, e.raw.height), (7, 7));
    (e.raw, top1)
}

fn options(choice: Choice) -> ExplainOptions {
    ExplainOptions {
        choice,
        ..Default::default()
    }
}

#[test]
fn cam_gradcam_and_eigencam_match_pytorch_grad_cam_on_mobilenet_v2() {
    let model = common::root().join("models/mobilenet_v2.safetensors");
    let rt_grad = runtime(&model, options(Choice::Use(Method::GradCam)));
    let rt_eigen = runtime(&model, options(Choice::Use(Method::EigenCam)));
    // The automatic target layer is the one the reference used (features[-1]).
    let head = rt_grad.explainer().unwrap().targets().cam.clone().unwrap();
    for id in [
        "mobilenet_v2.features_18.chelsea",
        "mobilenet_v2.features_18.coffee",
    ] {
        let c = case(id);
        assert_eq!(head.feature, c["target_layer"].as_str().unwrap());
        let refs = tensors(&format!(
            "tests/fixtures/explain/{}",
            c["file"].as_str().unwrap()
        ));
        let (cam, top1) = explain_case(&rt_grad, &c, Method::Cam);
        assert_eq!(top1 as u64, c["target_class"].as_u64().unwrap(), "{id}");
        let (grad, _) = explain_case(&rt_grad, &c, Method::GradCam);
        let (eigen, _) = explain_case(&rt_eigen, &c, Method::EigenCam);
        let r_cam = pearson(&cam.data, &flat(&refs["cam.raw"]));
        let r_cam_vs_grad = pearson(&cam.data, &flat(&refs["gradcam.raw"]));
        let r_grad = pearson(&grad.data, &flat(&refs["gradcam.raw"]));
        // Eigen-CAM: a singular vector's sign is arbitrary; the reference is compared up to it.
        let r_eigen = pearson(&eigen.data, &flat(&refs["eigencam.raw"])).abs();
        eprintln!("{id}: pearson cam {r_cam:.6} cam~gradcam {r_cam_vs_grad:.6} gradcam {r_grad:.6} eigencam {r_eigen:.6}");
        for (what, r) in [
            ("cam", r_cam),
            ("cam vs pytorch-grad-cam's gradcam", r_cam_vs_grad),
            ("gradcam", r_grad),
            ("eigencam", r_eigen),
        ] {
            assert!(r >= 0.99, "{id}: {what} pearson {r}");
        }
        // The raw Grad-CAM values themselves, not just their shape (same weights, same input).
        let want = flat(&refs["gradcam.raw"]);
        let worst = grad
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(worst < 1e-2, "{id}: gradcam relative error {worst}");
    }
}

#[test]
fn gradcam_backward_through_a_conv_tail_matches_the_reference() {
    let c = case("mobilenet_v2.features_17.chelsea");
    let model = common::root().join("models/mobilenet_v2.safetensors");
    let rt = runtime(
        &model,
        ExplainOptions {
            choice: Choice::Use(Method::GradCam),
            target_layer: Some(c["target_layer"].as_str().unwrap().into()),
            ..Default::default()
        },
    );
    let refs = tensors(&format!(
        "tests/fixtures/explain/{}",
        c["file"].as_str().unwrap()
    ));
    let (grad, _) = explain_case(&rt, &c, Method::GradCam);
    let r = pearson(&grad.data, &flat(&refs["gradcam.raw"]));
    eprintln!("features_17 gradcam pearson {r:.6}");
    assert!(r >= 0.99, "pearson {r}");
}

#[test]
fn rollout_matches_the_numpy_reference_on_the_stored_attention() {
    let c = case("vit_tiny.rollout");
    let refs = tensors(&format!(
        "tests/fixtures/explain/{}",
        c["file"].as_str().unwrap()
    ));
    let layers: Vec<Vec<f32>> = (0..4).map(|i| flat(&refs[&format!("attn.{i}")])).collect();
    let refs_l: Vec<&[f32]> = layers.iter().map(Vec::as_slice).collect();
    for (fusion, discard, key) in [
        (HeadFusion::Mean, 0.0, "rollout.mean.d0.0.mask"),
        (HeadFusion::Mean, 0.9, "rollout.mean.d0.9.mask"),
        (HeadFusion::Max, 0.0, "rollout.max.d0.0.mask"),
        (HeadFusion::Min, 0.0, "rollout.min.d0.0.mask"),
    ] {
        let got = rollout(&refs_l, 3, 65, (8, 8), fusion, discard);
        let want = flat(&refs[key]);
        let worst = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{key}: max abs diff {worst}");
    }
}

#[test]
fn rollout_end_to_end_on_our_executor_matches_the_reference() {
    let c = case("vit_tiny.rollout");
    let dir = tempfile::tempdir().unwrap();
    let model = common::import_to(
        dir.path(),
        &common::fixture("vit_tiny/model.onnx"),
        DType::F16,
    );
    let rt = runtime(&model, options(Choice::Auto));
    let ex = rt.explainer().unwrap();
    assert_eq!(
        ex.primary(),
        Method::Rollout,
        "auto picks rollout for a ViT"
    );
    let att = ex.targets().attention.clone().unwrap();
    let names: Vec<&str> = c["target_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(att.softmaxes, names);
    let input = tensors(c["input"].as_str().unwrap())
        .remove("input")
        .unwrap();
    let out = rt
        .run_tensors(&[("input".into(), input)], &ex.taps())
        .unwrap();
    let e = ex.run(Method::Rollout, &out.taps, 0).unwrap();
    let refs = tensors(&format!(
        "tests/fixtures/explain/{}",
        c["file"].as_str().unwrap()
    ));
    let want = flat(&refs["rollout.mean.d0.0.mask"]);
    let worst = e
        .raw
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "max abs diff {worst}");
}

#[test]
fn a_short_budget_falls_back_to_a_cheaper_method_then_skips() {
    let model = common::root().join("models/mobilenet_v2.safetensors");
    let rt = runtime(&model, options(Choice::Use(Method::GradCam)));
    let ex = rt.explainer().unwrap();
    let c = case("mobilenet_v2.features_18.chelsea");
    // Never measured: each method gets its first try.
    assert_eq!(
        ex.choose(Some(Duration::ZERO)),
        (Some(Method::GradCam), vec![])
    );
    explain_case(&rt, &c, Method::GradCam);
    // Grad-CAM's measured cost no longer fits in nothing; CAM is still unmeasured.
    let (m, degraded) = ex.choose(Some(Duration::ZERO));
    assert_eq!(m, Some(Method::Cam));
    assert_eq!(degraded, vec!["explain:gradcam->cam".to_string()]);
    explain_case(&rt, &c, Method::Cam);
    let (m, degraded) = ex.choose(Some(Duration::ZERO));
    assert_eq!(m, None);
    assert_eq!(degraded, vec!["explain_skipped".to_string()]);
    // Plenty of time: the method asked for.
    assert_eq!(
        ex.choose(Some(Duration::from_secs(10))),
        (Some(Method::GradCam), vec![])
    );
}

#[test]
fn methods_the_model_cannot_support_are_refused_with_the_reason() {
    let model = common::root().join("models/mobilenet_v2.safetensors");
    let err = Runtime::builder()
        .model(&model)
        .device(edgeinfer::device::DeviceRequest::Cpu)
        .explain(options(Choice::Use(Method::Rollout)))
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rollout") && err.contains("softmax"), "{err}");
    let err = Runtime::builder()
        .model(&model)
        .device(edgeinfer::device::DeviceRequest::Cpu)
        .explain(ExplainOptions {
            choice: Choice::Use(Method::EigenCam),
            target_layer: Some("no_such_value".into()),
            ..Default::default()
        })
        .build()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no_such_value"), "{err}");
}
