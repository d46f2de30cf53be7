//! Bad input gets a clear error naming the problem, never a panic, and never loses other frames.

mod common;

use common::*;
use edgeinfer::device::DeviceRequest;
use edgeinfer::import::onnx::{
    Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto,
};
use edgeinfer::import::{import_onnx_bytes, ImportOptions};
use edgeinfer::model::{DType, ModelWriter};
use edgeinfer::pipeline::Frame;
use edgeinfer::report::Verdict;
use edgeinfer::{Error, Runtime};
use prost::Message;

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

fn one_node_model(op: &str, node_name: &str, opset: i64) -> Vec<u8> {
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                name: node_name.into(),
                op_type: op.into(),
                ..Default::default()
            }],
            name: "g".into(),
            input: vec![value("x", &[1, 4])],
            output: vec![value("y", &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

#[test]
fn unsupported_op_is_an_error_naming_op_node_and_opset() {
    let bytes = one_node_model("NonMaxSuppressionX", "nms_1", 17);
    let err = import_onnx_bytes(
        &bytes,
        "t.onnx",
        std::path::Path::new("."),
        &ImportOptions::default(),
    )
    .err()
    .expect("import must fail");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in ["NonMaxSuppressionX", "nms_1", "17", "unsupported"] {
        assert!(msg.contains(needle), "'{msg}' lacks '{needle}'");
    }
}

#[test]
fn supported_op_imports_and_runs() {
    let bytes = one_node_model("Relu", "relu_1", 17);
    let imported = import_onnx_bytes(
        &bytes,
        "t.onnx",
        std::path::Path::new("."),
        &ImportOptions::default(),
    )
    .unwrap();
    assert_eq!(imported.graph.nodes.len(), 1);
}

#[test]
fn garbage_onnx_is_a_read_error() {
    let err = import_onnx_bytes(
        b"\xff\xff\xff not protobuf",
        "junk.onnx",
        std::path::Path::new("."),
        &ImportOptions::default(),
    )
    .err()
    .expect("must fail");
    assert!(err.to_string().contains("junk.onnx"), "{err}");
}

/// A model file whose graph names a weight the file does not hold.
#[test]
fn missing_weight_is_rejected_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.safetensors");
    let graph = serde_json::json!({
        "name": "m",
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "F32"}],
        "outputs": [{"name": "y", "meaning": "tensor"}],
        "nodes": [{"name": "mm", "op": "MatMul", "inputs": ["x", "w_missing"], "outputs": ["y"]}],
    });
    let mut w = ModelWriter::new();
    w.set_metadata("edgeinfer.format", "1");
    w.set_metadata("edgeinfer.graph", graph.to_string());
    w.add_tensor("other", DType::F32, vec![1], vec![0; 4])
        .unwrap();
    w.write(&path).unwrap();
    let err = Runtime::builder()
        .model(&path)
        .device(DeviceRequest::Cpu)
        .build()
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("w_missing"), "{err}");
}

#[test]
fn truncated_model_file_is_rejected_naming_a_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(root().join("models/mobilenet_v2.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut inside the data section: the header is intact but the last tensors end past the file.
    let cut = &bytes[..8 + header + (bytes.len() - 8 - header) / 2];
    let path = tmp.path().join("cut.safetensors");
    std::fs::write(&path, cut).unwrap();
    let err = Runtime::builder()
        .model(&path)
        .device(DeviceRequest::Cpu)
        .build()
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("cut.safetensors"), "{msg}");
    assert!(
        msg.contains("features") || msg.contains("classifier") || msg.contains("onnx::"),
        "no tensor named: {msg}"
    );
    // Shorter than the length prefix.
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(Runtime::builder().model(&path).build().is_err());
}

#[test]
fn model_file_without_graph_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("plain.safetensors");
    let mut w = ModelWriter::new();
    w.add_tensor("a", DType::F32, vec![2], vec![0; 8]).unwrap();
    w.write(&path).unwrap();
    let err = Runtime::builder()
        .model(&path)
        .build()
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("edgeinfer.format"), "{err}");
}

#[test]
fn corrupt_png_gets_an_error_report_and_the_next_frame_still_runs() {
    let rt = Runtime::builder()
        .model(root().join("models/mobilenet_v2.safetensors"))
        .device(DeviceRequest::Cpu)
        .build()
        .unwrap();
    let mut png = std::fs::read(root().join("models/samples/chelsea.png")).unwrap();
    png.truncate(png.len() / 3);
    let bad = Frame::from_encoded(0, "bad.png", png);
    let r = rt.infer(&bad);
    assert_eq!(r.verdict, Verdict::Error);
    let msg = r.error.unwrap();
    assert!(msg.contains("bad.png") && msg.contains("decode"), "{msg}");
    let good = Frame::from_path(1, root().join("models/samples/coffee.png"));
    let r = rt.infer(&good);
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.top.len(), 5);
}

#[test]
fn wrong_input_shape_is_a_clear_error() {
    let rt = Runtime::builder()
        .model(root().join("models/mobilenet_v2.safetensors"))
        .device(DeviceRequest::Cpu)
        .build()
        .unwrap();
    let t = candle_core::Tensor::zeros(
        (1, 3, 100, 100),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = rt
        .run_tensors(&[("input".into(), t)], &[])
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("input") && msg.contains("[1, 3, 224, 224]"),
        "{msg}"
    );
}

#[test]
fn runtime_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Runtime>();
}
