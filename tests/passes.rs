//! Load-time passes on real exported models: what they recognise and that the optimised graph
//! still matches ONNX Runtime.

mod common;

use common::*;
use edgeinfer::device::DeviceRequest;
use edgeinfer::graph::{Activation, Graph, Op, UnaryKind};
use edgeinfer::model::DType;
use edgeinfer::Runtime;

const TOL: f32 = 1e-3;

/// timm's ViT exports each MLP's `nn.GELU()` as Div, Erf, Add, Mul, Mul; the passes must turn
/// every one into a GELU activation without changing the logits.
#[test]
fn vit_tiny_gelu_chains_become_one_activation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = import_to(tmp.path(), &fixture("vit_tiny/model.onnx"), DType::F32);
    let rt = Runtime::builder()
        .model(&model)
        .device(DeviceRequest::Cpu)
        .build()
        .unwrap();
    let passes = &rt.model().passes;
    assert!(passes.gelu_fused > 0, "no GELU recognised: {passes:?}");
    let erfs = |graph: &Graph| {
        graph
            .nodes
            .iter()
            .filter(|n| {
                n.op == Op::Unary {
                    kind: UnaryKind::Erf,
                }
            })
            .count()
    };
    assert_eq!(
        passes.gelu_fused,
        erfs(&rt.model().stored),
        "one GELU per exported Erf"
    );
    let graph = rt.model().exec.graph();
    assert_eq!(erfs(graph), 0, "Erf nodes left after the passes");
    let gelu = Some(Activation::Gelu { tanh: false });
    let gelus = graph
        .nodes
        .iter()
        .filter(|n| match &n.op {
            Op::Activation { activation } => Some(*activation) == gelu,
            Op::Binary { activation, .. }
            | Op::MatMul { activation, .. }
            | Op::Gemm { activation, .. }
            | Op::Conv { activation, .. } => *activation == gelu,
            _ => false,
        })
        .count();
    assert_eq!(gelus, passes.gelu_fused, "every recognised GELU runs once");
    // The transformer's residual stream: each block's two adds join the linear layer before.
    let residual_matmuls = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::MatMul { residual: true, .. }))
        .count();
    assert!(residual_matmuls > 0, "no residual add fused into a MatMul");
    assert_eq!(residual_matmuls, passes.residuals_fused);

    let inputs = read_tensors(&fixture("vit_tiny/input.safetensors"));
    let expected = read_tensors(&fixture("vit_tiny/expected.safetensors"));
    let out = rt.run_tensors(&inputs, &[]).unwrap();
    for (name, want) in &expected {
        let got = &out
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no output '{name}'"))
            .1;
        let d = max_abs_diff(got, want);
        eprintln!(
            "vit_tiny '{name}' max |diff| = {d:e} with {} GELUs fused",
            passes.gelu_fused
        );
        assert!(
            d <= TOL,
            "output '{name}' differs from ONNX Runtime by {d} (> {TOL})"
        );
        assert_eq!(argmax(got), argmax(want), "top-1 differs from ONNX Runtime");
    }
}
