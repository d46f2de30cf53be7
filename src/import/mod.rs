//! ONNX → edgeinfer model file.
//!
//! Import walks the ONNX nodes in order, keeping for every value either its constant tensor or
//! (for values that depend on a graph input) a zero "probe" tensor of its static shape. A node
//! whose inputs are all constant is evaluated and becomes a constant (this folds the Shape /
//! Gather / Concat / Cast / Range ... sub-graphs exporters emit); `Shape` of a dynamic value
//! folds from its static shape. Any other node is kept, and running it on the probes gives the
//! exact output shapes, with the same op code the executor uses. Parameters ONNX passes as
//! constant inputs are moved into the op's attributes.

pub mod onnx;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, Tensor};
use prost::Message;

use crate::error::{Error, Result};
use crate::exec::ops::{broadcast_shape, eval, probe};
use crate::graph::{
    Activation, BinaryKind, ColorOrder, Graph, InputSpec, Node, Op, OutputMeaning, OutputSpec,
    PadMode, PoolKind, Preprocess, ReduceKind, ResizeMode, SliceRange, UnaryKind, ValueInfo,
    VariadicKind, FORMAT_VERSION, META_FORMAT, META_GRAPH, META_LABELS, META_PROVENANCE,
};
use crate::model::{DType, ModelWriter};
use onnx::{elem, AttributeProto, ModelProto, NodeProto, TensorProto};

/// The ONNX op types import understands (README lists the same).
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mul",
    "Pad",
    "Pow",
    "PRelu",
    "Range",
    "ReduceMax",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// Opsets of the default domain import accepts.
pub const OPSET_RANGE: std::ops::RangeInclusive<i64> = 7..=25;

/// Options for [`import_onnx`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Fixed shapes for inputs whose ONNX shape has symbolic dims (batch defaults to 1).
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// Storage dtype for float weights (F32 default, F16 or BF16 halve the file).
    pub weights_dtype: Option<DType>,
    /// Class labels stored in the file.
    pub labels: Option<Vec<String>>,
    /// Image preprocessing for the first input; defaults to the torchvision ImageNet recipe for
    /// 3-channel NCHW float inputs.
    pub preprocess: Option<Preprocess>,
    /// Model name; defaults to the file stem.
    pub name: Option<String>,
    /// Graph inputs fixed to constant values at import (like TensorRT's shape tensors given at
    /// build time): a Resize's scales or a Reshape's shape fed as an input.
    pub frozen_inputs: HashMap<String, Tensor>,
}

/// The result of an import: the graph and the tensors it names.
pub struct Imported {
    /// The graph (un-optimised: passes run at load).
    pub graph: Graph,
    /// Weights and folded constants by name.
    pub tensors: Vec<(String, Tensor)>,
    /// Class labels.
    pub labels: Option<Vec<String>>,
    /// Provenance JSON.
    pub provenance: serde_json::Value,
    /// Nodes folded into constants at import.
    pub folded_nodes: usize,
}

impl Imported {
    /// Serialises into the model file format, storing float tensors as `weights_dtype`.
    pub fn to_writer(&self, weights_dtype: DType) -> Result<ModelWriter> {
        let mut w = ModelWriter::new();
        w.set_metadata(META_FORMAT, FORMAT_VERSION);
        let graph_json = serde_json::to_string(&self.graph).map_err(|e| Error::InvalidGraph {
            file: self.graph.name.clone(),
            reason: e.to_string(),
        })?;
        w.set_metadata(META_GRAPH, graph_json);
        if let Some(labels) = &self.labels {
            w.set_metadata(
                META_LABELS,
                serde_json::to_string(labels).unwrap_or_else(|_| "[]".into()),
            );
        }
        w.set_metadata(META_PROVENANCE, self.provenance.to_string());
        let target = match weights_dtype {
            DType::F16 => Some(CDType::F16),
            DType::BF16 => Some(CDType::BF16),
            _ => None,
        };
        for (name, t) in &self.tensors {
            let t = match target {
                Some(dt) if t.dtype() == CDType::F32 => t.to_dtype(dt)?,
                _ => t.clone(),
            };
            w.add_candle(name.clone(), &t)?;
        }
        Ok(w)
    }
}

/// Imports an ONNX file.
pub fn import_onnx(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let label = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: label.clone(),
        cause: source,
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut opts = opts.clone();
    if opts.name.is_none() {
        opts.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    }
    let mut imported = import_onnx_bytes(&bytes, &label, &base, &opts)?;
    imported.provenance["source_sha256"] = serde_json::Value::String(sha256_hex(&bytes));
    Ok(imported)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Imports ONNX bytes; `base_dir` resolves external data files.
pub fn import_onnx_bytes(
    bytes: &[u8],
    label: &str,
    base_dir: &Path,
    opts: &ImportOptions,
) -> Result<Imported> {
    let model = ModelProto::decode(bytes).map_err(|e| Error::OnnxRead {
        path: label.to_string(),
        reason: format!("not a valid ONNX protobuf: {e}"),
    })?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    if !OPSET_RANGE.contains(&opset) {
        return Err(Error::Unsupported {
            node: "(model)".into(),
            op: "(opset)".into(),
            opset,
            what: format!(
                "default-domain opset {opset} (supported: {}..={})",
                OPSET_RANGE.start(),
                OPSET_RANGE.end()
            ),
        });
    }
    let graph = model.graph.as_ref().ok_or_else(|| Error::OnnxRead {
        path: label.to_string(),
        reason: "the model has no graph".into(),
    })?;
    let mut cx = Importer {
        opset,
        label: label.to_string(),
        base_dir: base_dir.to_path_buf(),
        vals: HashMap::new(),
        nodes: Vec::new(),
        node_names: HashSet::new(),
        tmp: 0,
        folded: 0,
        device: Device::Cpu,
        bools: HashSet::new(),
    };
    for init in &graph.initializer {
        let t = cx.tensor_from_proto(init, &init.name)?;
        cx.vals.insert(init.name.clone(), Val::Const(t));
    }
    let mut inputs = Vec::new();
    for vi in &graph.input {
        if cx.vals.contains_key(&vi.name) {
            continue; // an initializer listed as input (old exporters): a weight, not a feed
        }
        if let Some(t) = opts.frozen_inputs.get(&vi.name) {
            cx.vals
                .insert(vi.name.clone(), Val::Const(t.to_device(&Device::Cpu)?));
            continue;
        }
        let (shape, dtype) = cx.input_type(vi, opts)?;
        if dtype == DType::Bool {
            cx.bools.insert(vi.name.clone());
        }
        let p = probe(&shape, dtype.compute_dtype(), &cx.device)?;
        cx.vals.insert(vi.name.clone(), Val::Dyn(p));
        inputs.push(InputSpec {
            name: vi.name.clone(),
            shape,
            dtype,
            preprocess: None,
        });
    }
    for node in &graph.node {
        cx.convert(node)?;
    }
    let mut outputs = Vec::new();
    for (i, vo) in graph.output.iter().enumerate() {
        match cx.vals.get(&vo.name) {
            Some(Val::Const(t)) => {
                // A graph output that folded to a constant still needs a node to produce it.
                let stored = format!("{}.const", vo.name);
                let t = t.clone();
                cx.vals.insert(stored.clone(), Val::Const(t.clone()));
                cx.vals.insert(vo.name.clone(), Val::Dyn(t));
                cx.nodes.push(Node {
                    name: format!("{}_const_output", vo.name),
                    op: Op::Identity,
                    inputs: vec![stored],
                    outputs: vec![vo.name.clone()],
                });
            }
            Some(Val::Dyn(_)) => {}
            None => {
                return Err(Error::OnnxRead {
                    path: label.to_string(),
                    reason: format!("graph output '{}' is never produced", vo.name),
                })
            }
        }
        let meaning = if i == 0 && graph.output.len() == 1 {
            guess_meaning(&vo.name, cx.vals.get(&vo.name))
        } else {
            OutputMeaning::Tensor
        };
        outputs.push(OutputSpec {
            name: vo.name.clone(),
            meaning,
        });
    }
    // Dead-node removal: keep what the outputs need.
    let mut needed: HashSet<String> = outputs.iter().map(|o| o.name.clone()).collect();
    let mut kept = Vec::new();
    for node in cx.nodes.into_iter().rev() {
        if node.outputs.iter().any(|o| needed.contains(o)) {
            needed.extend(node.inputs.iter().cloned());
            kept.push(node);
        }
    }
    kept.reverse();
    let nodes = kept;

    // Shapes of every value the graph computes, and the tensors it names.
    let mut values = BTreeMap::new();
    let mut tensors = Vec::new();
    let produced: HashSet<&str> = inputs
        .iter()
        .map(|i| i.name.as_str())
        .chain(
            nodes
                .iter()
                .flat_map(|n| n.outputs.iter().map(String::as_str)),
        )
        .collect();
    let mut stored = HashSet::new();
    for n in &nodes {
        for name in n.inputs.iter().chain(n.outputs.iter()) {
            match cx.vals.get(name) {
                Some(Val::Dyn(p)) if produced.contains(name.as_str()) => {
                    let dtype = if cx.bools.contains(name) {
                        DType::Bool
                    } else {
                        from_candle_dtype(p.dtype())
                    };
                    values.insert(
                        name.clone(),
                        ValueInfo {
                            shape: p.dims().to_vec(),
                            dtype,
                        },
                    );
                }
                Some(Val::Const(t))
                    if !produced.contains(name.as_str()) && stored.insert(name.clone()) =>
                {
                    tensors.push((name.clone(), t.clone()));
                }
                _ => {}
            }
        }
    }
    for i in &inputs {
        values.insert(
            i.name.clone(),
            ValueInfo {
                shape: i.shape.clone(),
                dtype: i.dtype,
            },
        );
    }
    if let Some(first) = inputs.first_mut() {
        first.preprocess = opts
            .preprocess
            .clone()
            .or_else(|| default_preprocess(&first.shape, first.dtype));
    }
    let name = opts.name.clone().unwrap_or_else(|| "model".into());
    let provenance = serde_json::json!({
        "source": label,
        "producer": format!("{} {}", model.producer_name, model.producer_version).trim(),
        "opset": opset,
        "importer": format!("edgeinfer {}", env!("CARGO_PKG_VERSION")),
        "folded_nodes": cx.folded,
    });
    Ok(Imported {
        graph: Graph {
            name,
            inputs,
            outputs,
            nodes,
            values,
        },
        tensors,
        labels: opts.labels.clone(),
        provenance,
        folded_nodes: cx.folded,
    })
}

fn guess_meaning(name: &str, val: Option<&Val>) -> OutputMeaning {
    let lname = name.to_ascii_lowercase();
    let rank2 = matches!(val, Some(Val::Dyn(t)) if t.rank() == 2);
    if lname.contains("prob") {
        OutputMeaning::Probabilities
    } else if lname.contains("logit") || (rank2 && !lname.contains("embed")) {
        OutputMeaning::Logits
    } else if lname.contains("embed") {
        OutputMeaning::Embedding
    } else {
        OutputMeaning::Tensor
    }
}

/// torchvision's ImageNet recipe, the most common export: resize shorter side to 256/224 of the
/// input, centre crop, RGB, 0..1, ImageNet mean/std.
fn default_preprocess(shape: &[usize], dtype: DType) -> Option<Preprocess> {
    if shape.len() != 4 || !dtype.is_float() {
        return None;
    }
    let (c, h) = (shape[1], shape[2]);
    let (color, mean, std) = match c {
        3 => (
            ColorOrder::Rgb,
            vec![0.485, 0.456, 0.406],
            vec![0.229, 0.224, 0.225],
        ),
        1 => (ColorOrder::Gray, vec![0.0], vec![1.0]),
        _ => return None,
    };
    Some(Preprocess {
        layout: "NCHW".into(),
        color,
        resize_shorter: Some(((h as f32) * 256.0 / 224.0).round() as u32),
        scale: 1.0 / 255.0,
        mean,
        std,
    })
}

/// A value during import: a constant, or a probe of the right shape for a runtime value.
enum Val {
    Const(Tensor),
    Dyn(Tensor),
}

impl Val {
    fn tensor(&self) -> &Tensor {
        match self {
            Val::Const(t) | Val::Dyn(t) => t,
        }
    }
}

struct Importer {
    opset: i64,
    label: String,
    base_dir: PathBuf,
    vals: HashMap<String, Val>,
    nodes: Vec<Node>,
    node_names: HashSet<String>,
    tmp: usize,
    folded: usize,
    device: Device,
    /// Values of ONNX type bool (candle holds them as u8).
    bools: HashSet<String>,
}

/// Attribute access for one node.
struct Attrs<'a> {
    map: HashMap<&'a str, &'a AttributeProto>,
}

impl<'a> Attrs<'a> {
    fn new(node: &'a NodeProto) -> Self {
        Attrs {
            map: node
                .attribute
                .iter()
                .map(|a| (a.name.as_str(), a))
                .collect(),
        }
    }
    fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }
    fn int(&self, k: &str, default: i64) -> i64 {
        self.map.get(k).map(|a| a.i).unwrap_or(default)
    }
    fn float(&self, k: &str, default: f32) -> f32 {
        self.map.get(k).map(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, k: &str) -> Option<Vec<i64>> {
        self.map.get(k).map(|a| a.ints.clone())
    }
    fn string(&self, k: &str, default: &str) -> String {
        self.map
            .get(k)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_else(|| default.to_string())
    }
}

fn from_candle_dtype(d: CDType) -> DType {
    match d {
        CDType::U8 => DType::U8,
        CDType::I16 => DType::I16,
        CDType::I32 => DType::I32,
        CDType::I64 => DType::I64,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::BF16,
        CDType::F64 => DType::F64,
        _ => DType::F32,
    }
}

fn onnx_dtype(code: i32) -> Option<DType> {
    Some(match code {
        elem::FLOAT => DType::F32,
        elem::UINT8 => DType::U8,
        elem::INT8 => DType::I8,
        elem::INT16 => DType::I16,
        elem::INT32 => DType::I32,
        elem::INT64 => DType::I64,
        elem::BOOL => DType::Bool,
        elem::FLOAT16 => DType::F16,
        elem::DOUBLE => DType::F64,
        elem::BFLOAT16 => DType::BF16,
        _ => return None,
    })
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r.max(1)).contains(&a).then_some(a as usize)
}

impl Importer {
    fn unsupported(&self, node: &NodeProto, what: impl Into<String>) -> Error {
        Error::Unsupported {
            node: node_label(node),
            op: node.op_type.clone(),
            opset: self.opset,
            what: what.into(),
        }
    }

    fn invalid(&self, node: &NodeProto, reason: impl Into<String>) -> Error {
        Error::InvalidNode {
            node: node_label(node),
            op: node.op_type.clone(),
            reason: reason.into(),
        }
    }

    fn input_type(
        &self,
        vi: &onnx::ValueInfoProto,
        opts: &ImportOptions,
    ) -> Result<(Vec<usize>, DType)> {
        let bad = |reason: String| Error::BadInput {
            name: vi.name.clone(),
            reason,
        };
        let tt = vi
            .r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .ok_or_else(|| bad("unsupported: only tensor inputs are supported".into()))?;
        let dtype = onnx_dtype(tt.elem_type).ok_or_else(|| {
            bad(format!(
                "unsupported: input element type {} (ONNX code)",
                tt.elem_type
            ))
        })?;
        if let Some(shape) = opts.input_shapes.get(&vi.name) {
            return Ok((shape.clone(), dtype));
        }
        let dims = tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
        let mut shape = Vec::with_capacity(dims.len());
        for (i, d) in dims.iter().enumerate() {
            match (d.dim_value, &d.dim_param) {
                (Some(v), _) if v > 0 => shape.push(v as usize),
                (Some(0), None) | (None, None) if i > 0 => {
                    return Err(bad(format!(
                        "axis {i} has no size; give one with --input-shape {}=...",
                        vi.name
                    )))
                }
                _ if i == 0 => shape.push(1), // symbolic batch: one frame at a time
                (_, Some(p)) => {
                    return Err(bad(format!(
                        "axis {i} is symbolic ('{p}'); fix it with --input-shape {}=d0,d1,...",
                        vi.name
                    )))
                }
                _ => {
                    return Err(bad(format!(
                        "axis {i} has an invalid size; fix it with --input-shape"
                    )))
                }
            }
        }
        Ok((shape, dtype))
    }

    fn tensor_from_proto(&self, t: &TensorProto, what: &str) -> Result<Tensor> {
        let bad = |reason: String| Error::OnnxRead {
            path: self.label.clone(),
            reason: format!("tensor '{what}': {reason}"),
        };
        let dtype = onnx_dtype(t.data_type).ok_or_else(|| {
            bad(format!(
                "unsupported: element type {} (ONNX code)",
                t.data_type
            ))
        })?;
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            if d < 0 {
                return Err(bad(format!("negative dimension in {:?}", t.dims)));
            }
            shape.push(d as usize);
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {:?} overflows", t.dims)))?;
        let external;
        let raw: &[u8] = if t.data_location == 1 {
            external = self.read_external(t, what)?;
            &external
        } else {
            &t.raw_data
        };
        let dev = &self.device;
        let need = |len: usize| -> Result<()> {
            if len != n {
                return Err(bad(format!(
                    "holds {len} elements but its shape {shape:?} needs {n}"
                )));
            }
            Ok(())
        };
        let from_raw = |size: usize| -> Result<Vec<&[u8]>> {
            if raw.len() != n * size {
                return Err(bad(format!(
                    "raw data is {} bytes, shape {shape:?} needs {}",
                    raw.len(),
                    n * size
                )));
            }
            Ok(raw.chunks_exact(size).collect())
        };
        let tensor = match dtype {
            DType::F32 => {
                let v: Vec<f32> = if !raw.is_empty() || n == 0 {
                    from_raw(4)?
                        .iter()
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                } else {
                    t.float_data.clone()
                };
                need(v.len())?;
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
            DType::F64 => {
                let v: Vec<f64> = if !raw.is_empty() || n == 0 {
                    from_raw(8)?
                        .iter()
                        .map(|c| {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(c);
                            f64::from_le_bytes(b)
                        })
                        .collect()
                } else {
                    t.double_data.clone()
                };
                need(v.len())?;
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
            DType::F16 | DType::BF16 => {
                let bits: Vec<u16> = if !raw.is_empty() || n == 0 {
                    from_raw(2)?
                        .iter()
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect()
                } else {
                    t.int32_data.iter().map(|&v| v as u16).collect()
                };
                need(bits.len())?;
                if dtype == DType::F16 {
                    let v: Vec<half::f16> = bits.into_iter().map(half::f16::from_bits).collect();
                    Tensor::from_vec(v, shape.as_slice(), dev)?
                } else {
                    let v: Vec<half::bf16> = bits.into_iter().map(half::bf16::from_bits).collect();
                    Tensor::from_vec(v, shape.as_slice(), dev)?
                }
            }
            DType::I64 => {
                let v: Vec<i64> = if !raw.is_empty() || n == 0 {
                    from_raw(8)?
                        .iter()
                        .map(|c| {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(c);
                            i64::from_le_bytes(b)
                        })
                        .collect()
                } else {
                    t.int64_data.clone()
                };
                need(v.len())?;
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
            DType::I32 => {
                let v: Vec<i32> = if !raw.is_empty() || n == 0 {
                    from_raw(4)?
                        .iter()
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                } else {
                    t.int32_data.clone()
                };
                need(v.len())?;
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
            DType::I16 | DType::I8 => {
                let v: Vec<i16> = if !raw.is_empty() || n == 0 {
                    if dtype == DType::I8 {
                        from_raw(1)?.iter().map(|c| c[0] as i8 as i16).collect()
                    } else {
                        from_raw(2)?
                            .iter()
                            .map(|c| i16::from_le_bytes([c[0], c[1]]))
                            .collect()
                    }
                } else {
                    t.int32_data.iter().map(|&v| v as i16).collect()
                };
                need(v.len())?;
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
            DType::U8 | DType::Bool => {
                let v: Vec<u8> = if !raw.is_empty() || n == 0 {
                    from_raw(1)?.iter().map(|c| c[0]).collect()
                } else {
                    t.int32_data.iter().map(|&v| v as u8).collect()
                };
                need(v.len())?;
                let v = if dtype == DType::Bool {
                    v.into_iter().map(|b| (b != 0) as u8).collect()
                } else {
                    v
                };
                Tensor::from_vec(v, shape.as_slice(), dev)?
            }
        };
        Ok(tensor)
    }

    fn read_external(&self, t: &TensorProto, what: &str) -> Result<Vec<u8>> {
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let bad = |reason: String| Error::OnnxRead {
            path: self.label.clone(),
            reason: format!("tensor '{what}': external data: {reason}"),
        };
        let location = get("location").ok_or_else(|| bad("no 'location'".into()))?;
        if Path::new(&location).is_absolute() || location.contains("..") {
            return Err(bad(format!(
                "location '{location}' must be a relative path inside the model's folder"
            )));
        }
        let path = self.base_dir.join(&location);
        let data = std::fs::read(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let offset: usize = get("offset").and_then(|s| s.parse().ok()).unwrap_or(0);
        let length: usize = match get("length").and_then(|s| s.parse().ok()) {
            Some(l) => l,
            None => data.len().saturating_sub(offset),
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                bad(format!(
                    "offset {offset} + length {length} is past the end of {} ({} bytes)",
                    path.display(),
                    data.len()
                ))
            })?;
        Ok(data[offset..end].to_vec())
    }

    fn val(&self, node: &NodeProto, name: &str) -> Result<&Val> {
        self.vals.get(name).ok_or_else(|| {
            self.invalid(
                node,
                format!("input '{name}' is not produced by any earlier node, input or initializer"),
            )
        })
    }

    /// The i-th input's name, if present and non-empty.
    fn opt_input<'n>(&self, node: &'n NodeProto, i: usize) -> Option<&'n str> {
        node.input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn req_input<'n>(&self, node: &'n NodeProto, i: usize) -> Result<&'n str> {
        self.opt_input(node, i)
            .ok_or_else(|| self.invalid(node, format!("input {i} is required")))
    }

    fn shape_of(&self, node: &NodeProto, i: usize) -> Result<Vec<usize>> {
        let name = self.req_input(node, i)?;
        Ok(self.val(node, name)?.tensor().dims().to_vec())
    }

    /// A constant input read as i64 values (shapes, axes, pads ...).
    fn const_ints(&self, node: &NodeProto, i: usize) -> Result<Option<Vec<i64>>> {
        let Some(name) = self.opt_input(node, i) else {
            return Ok(None);
        };
        match self.val(node, name)? {
            Val::Const(t) => Ok(Some(
                t.flatten_all()?.to_dtype(CDType::I64)?.to_vec1::<i64>()?,
            )),
            Val::Dyn(_) => Err(self.unsupported(
                node,
                format!("input {i} ('{name}') must be constant (it depends on a graph input; freeze graph inputs with --freeze)"),
            )),
        }
    }

    fn const_floats(&self, node: &NodeProto, i: usize) -> Result<Option<Vec<f64>>> {
        let Some(name) = self.opt_input(node, i) else {
            return Ok(None);
        };
        match self.val(node, name)? {
            Val::Const(t) => Ok(Some(
                t.flatten_all()?.to_dtype(CDType::F64)?.to_vec1::<f64>()?,
            )),
            Val::Dyn(_) => Err(self.unsupported(
                node,
                format!("input {i} ('{name}') must be constant (it depends on a graph input; freeze graph inputs with --freeze)"),
            )),
        }
    }

    fn fresh(&mut self, base: &str) -> String {
        self.tmp += 1;
        format!("{base}::tmp{}", self.tmp)
    }

    fn node_name(&mut self, node: &NodeProto, suffix: &str) -> String {
        let base = if node.name.is_empty() {
            format!(
                "{}_{}",
                node.op_type,
                node.output.first().cloned().unwrap_or_default()
            )
        } else {
            node.name.clone()
        };
        let mut name = format!("{base}{suffix}");
        let mut k = 1;
        while !self.node_names.insert(name.clone()) {
            k += 1;
            name = format!("{base}{suffix}_{k}");
        }
        name
    }

    /// Adds `op` over `inputs` producing `outputs`: folded when every input is constant, else a
    /// node whose output shapes come from running the op on the probes.
    fn emit(
        &mut self,
        node: &NodeProto,
        op: Op,
        inputs: Vec<String>,
        outputs: Vec<String>,
        suffix: &str,
    ) -> Result<()> {
        let mut tensors = Vec::with_capacity(inputs.len());
        let mut all_const = true;
        for name in &inputs {
            let v = self.val(node, name)?;
            all_const &= matches!(v, Val::Const(_));
            tensors.push(v.tensor().clone());
        }
        let results = eval(&op, &tensors).map_err(|e| match e {
            candle_core::Error::Msg(m) if m.starts_with("unsupported") => {
                self.unsupported(node, m.trim_start_matches("unsupported: ").to_string())
            }
            other => self.invalid(node, other.to_string()),
        })?;
        // Bool-ness survives data movement; comparisons and casts create it.
        let makes_bool = match &op {
            Op::Binary {
                kind: BinaryKind::Equal,
                ..
            } => true,
            Op::Cast { to } => *to == DType::Bool,
            Op::Reshape { .. }
            | Op::Identity
            | Op::Transpose { .. }
            | Op::Concat { .. }
            | Op::Split { .. }
            | Op::Slice { .. }
            | Op::Gather { .. }
            | Op::Expand { .. }
            | Op::Pad { .. } => inputs.first().is_some_and(|i| self.bools.contains(i)),
            Op::Where => inputs.get(1).is_some_and(|i| self.bools.contains(i)),
            _ => false,
        };
        if makes_bool {
            self.bools
                .extend(outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
        if results.len() < outputs.iter().filter(|o| !o.is_empty()).count() {
            return Err(self.invalid(
                node,
                format!(
                    "{} outputs requested, {} produced",
                    outputs.len(),
                    results.len()
                ),
            ));
        }
        for (name, t) in outputs.iter().zip(results) {
            if name.is_empty() {
                continue;
            }
            let v = if all_const {
                Val::Const(t)
            } else {
                Val::Dyn(t)
            };
            self.vals.insert(name.clone(), v);
        }
        if all_const {
            self.folded += 1;
        } else {
            let name = self.node_name(node, suffix);
            self.nodes.push(Node {
                name,
                op,
                inputs,
                outputs: outputs.into_iter().filter(|o| !o.is_empty()).collect(),
            });
        }
        Ok(())
    }

    fn set_const(&mut self, name: &str, t: Tensor) {
        self.vals.insert(name.to_string(), Val::Const(t));
        self.folded += 1;
    }

    fn convert(&mut self, node: &NodeProto) -> Result<()> {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            return Err(self.unsupported(node, format!("op domain '{}'", node.domain)));
        }
        let a = Attrs::new(node);
        let out0 = node
            .output
            .first()
            .cloned()
            .ok_or_else(|| self.invalid(node, "no outputs"))?;
        let data_inputs = |n: usize| -> Vec<String> {
            node.input
                .iter()
                .take(n)
                .filter(|s| !s.is_empty())
                .cloned()
                .collect()
        };
        let simple = |op: Op| (op, data_inputs(usize::MAX));
        let act = |activation: Activation| Op::Activation { activation };
        let (op, inputs): (Op, Vec<String>) = match node.op_type.as_str() {
            "Constant" => {
                let t = self.constant_value(node, &a)?;
                self.set_const(&out0, t);
                return Ok(());
            }
            "Conv" => (self.conv_op(node, &a)?, data_inputs(3)),
            "ConvTranspose" => (self.conv_transpose_op(node, &a)?, data_inputs(3)),
            "BatchNormalization" => {
                if a.int("training_mode", 0) != 0
                    || node.output.iter().skip(1).any(|o| !o.is_empty())
                {
                    return Err(self.unsupported(node, "training-mode BatchNormalization"));
                }
                (
                    Op::BatchNormalization {
                        epsilon: a.float("epsilon", 1e-5),
                    },
                    data_inputs(5),
                )
            }
            "Relu" => simple(act(Activation::Relu)),
            "Sigmoid" => simple(act(Activation::Sigmoid)),
            "Tanh" => simple(act(Activation::Tanh)),
            "HardSwish" => simple(act(Activation::HardSwish)),
            "LeakyRelu" => simple(act(Activation::LeakyRelu {
                alpha: a.float("alpha", 0.01),
            })),
            "HardSigmoid" => simple(act(Activation::HardSigmoid {
                alpha: a.float("alpha", 0.2),
                beta: a.float("beta", 0.5),
            })),
            "Gelu" => {
                let approx = a.string("approximate", "none");
                let tanh = match approx.as_str() {
                    "none" => false,
                    "tanh" => true,
                    other => return Err(self.unsupported(node, format!("approximate='{other}'"))),
                };
                simple(act(Activation::Gelu { tanh }))
            }
            "Clip" => {
                let (min, max) = if self.opset < 11 {
                    (
                        a.has("min").then(|| a.float("min", f32::MIN)),
                        a.has("max").then(|| a.float("max", f32::MAX)),
                    )
                } else {
                    let first = |v: Option<Vec<f64>>| v.and_then(|v| v.first().map(|&x| x as f32));
                    (
                        first(self.const_floats(node, 1)?),
                        first(self.const_floats(node, 2)?),
                    )
                };
                (act(Activation::Clip { min, max }), data_inputs(1))
            }
            "PRelu" => simple(Op::PRelu),
            "Erf" => simple(Op::Unary {
                kind: UnaryKind::Erf,
            }),
            "Sqrt" => simple(Op::Unary {
                kind: UnaryKind::Sqrt,
            }),
            "Exp" => simple(Op::Unary {
                kind: UnaryKind::Exp,
            }),
            "Log" => simple(Op::Unary {
                kind: UnaryKind::Log,
            }),
            "Softmax" => return self.softmax(node, &a, &out0),
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" => {
                if self.opset < 7 && a.has("broadcast") {
                    return Err(self.unsupported(node, "legacy broadcast attribute"));
                }
                let kind = match node.op_type.as_str() {
                    "Add" => BinaryKind::Add,
                    "Sub" => BinaryKind::Sub,
                    "Mul" => BinaryKind::Mul,
                    "Div" => BinaryKind::Div,
                    "Pow" => BinaryKind::Pow,
                    _ => BinaryKind::Equal,
                };
                (
                    Op::Binary {
                        kind,
                        activation: None,
                    },
                    data_inputs(2),
                )
            }
            "Max" | "Min" | "Sum" => {
                let kind = match node.op_type.as_str() {
                    "Max" => VariadicKind::Max,
                    "Min" => VariadicKind::Min,
                    _ => VariadicKind::Sum,
                };
                let ins = data_inputs(usize::MAX);
                if ins.len() == 1 {
                    (Op::Identity, ins)
                } else {
                    (Op::Variadic { kind }, ins)
                }
            }
            "MatMul" => (
                Op::MatMul {
                    activation: None,
                    residual: false,
                },
                data_inputs(2),
            ),
            "Gemm" => (
                Op::Gemm {
                    alpha: a.float("alpha", 1.0),
                    beta: a.float("beta", 1.0),
                    trans_a: a.int("transA", 0) != 0,
                    trans_b: a.int("transB", 0) != 0,
                    activation: None,
                },
                data_inputs(3),
            ),
            "MaxPool" | "AveragePool" => {
                if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(self.unsupported(node, "MaxPool's Indices output"));
                }
                (self.pool_op(node, &a)?, data_inputs(1))
            }
            "GlobalAveragePool" => simple(Op::GlobalPool {
                kind: PoolKind::Avg,
            }),
            "GlobalMaxPool" => simple(Op::GlobalPool {
                kind: PoolKind::Max,
            }),
            "Flatten" => {
                let shape = self.shape_of(node, 0)?;
                // Flatten's axis lies in [-r, r]: a negative one counts from r, not r + 1.
                let r = shape.len() as i64;
                let axis = a.int("axis", 1);
                let axis = if axis < 0 { axis + r } else { axis };
                if !(0..=r).contains(&axis) {
                    return Err(self.invalid(node, "axis out of range"));
                }
                let axis = axis as usize;
                let outer: usize = shape[..axis].iter().product();
                let inner: usize = shape[axis..].iter().product();
                (
                    Op::Reshape {
                        shape: vec![outer, inner],
                    },
                    data_inputs(1),
                )
            }
            "Reshape" => {
                let shape = self.shape_of(node, 0)?;
                let target = if self.opset < 5 {
                    a.ints("shape").unwrap_or_default()
                } else {
                    self.const_ints(node, 1)?
                        .ok_or_else(|| self.invalid(node, "no shape input"))?
                };
                let out = resolve_reshape(&shape, &target, a.int("allowzero", 0) != 0)
                    .map_err(|e| self.invalid(node, e))?;
                (Op::Reshape { shape: out }, data_inputs(1))
            }
            "Transpose" => {
                let rank = self.shape_of(node, 0)?.len();
                let perm: Vec<usize> = match a.ints("perm") {
                    Some(p) => p
                        .iter()
                        .map(|&x| normalize_axis(x, rank))
                        .collect::<Option<_>>()
                        .ok_or_else(|| self.invalid(node, "perm out of range"))?,
                    None => (0..rank).rev().collect(),
                };
                (Op::Transpose { perm }, data_inputs(1))
            }
            "Concat" => {
                let rank = self.shape_of(node, 0)?.len();
                let axis = normalize_axis(a.int("axis", 0), rank)
                    .ok_or_else(|| self.invalid(node, "axis out of range"))?;
                simple(Op::Concat { axis })
            }
            "Split" => (self.split_op(node, &a)?, data_inputs(1)),
            "Slice" => (self.slice_op(node, &a)?, data_inputs(1)),
            "Squeeze" => {
                let shape = self.shape_of(node, 0)?;
                let axes = if self.opset < 13 {
                    a.ints("axes")
                } else {
                    self.const_ints(node, 1)?
                };
                let axes: Vec<usize> = match axes {
                    Some(ax) => ax
                        .iter()
                        .map(|&x| normalize_axis(x, shape.len()))
                        .collect::<Option<_>>()
                        .ok_or_else(|| self.invalid(node, "axes out of range"))?,
                    None => (0..shape.len()).filter(|&i| shape[i] == 1).collect(),
                };
                let out: Vec<usize> = shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect();
                (Op::Reshape { shape: out }, data_inputs(1))
            }
            "Unsqueeze" => {
                let shape = self.shape_of(node, 0)?;
                let axes = if self.opset < 13 {
                    a.ints("axes")
                } else {
                    self.const_ints(node, 1)?
                }
                .ok_or_else(|| self.invalid(node, "no axes"))?;
                let rank = shape.len() + axes.len();
                let mut axes: Vec<usize> = axes
                    .iter()
                    .map(|&x| normalize_axis(x, rank))
                    .collect::<Option<_>>()
                    .ok_or_else(|| self.invalid(node, "axes out of range"))?;
                axes.sort_unstable();
                let mut out = Vec::with_capacity(rank);
                let mut it = shape.iter();
                for i in 0..rank {
                    if axes.contains(&i) {
                        out.push(1);
                    } else {
                        out.push(
                            *it.next()
                                .ok_or_else(|| self.invalid(node, "duplicate axes"))?,
                        );
                    }
                }
                (Op::Reshape { shape: out }, data_inputs(1))
            }
            "Resize" => (self.resize_op(node, &a)?, data_inputs(1)),
            "Pad" => (self.pad_op(node, &a)?, data_inputs(1)),
            "ReduceMean" | "ReduceMax" => {
                let kind = if node.op_type == "ReduceMean" {
                    ReduceKind::Mean
                } else {
                    ReduceKind::Max
                };
                let shape = self.shape_of(node, 0)?;
                let axes = if self.opset < 18 {
                    a.ints("axes")
                } else {
                    self.const_ints(node, 1)?
                };
                let keepdims = a.int("keepdims", 1) != 0;
                let axes: Vec<usize> = match axes {
                    Some(ax) if !ax.is_empty() => {
                        let mut v: Vec<usize> = ax
                            .iter()
                            .map(|&x| normalize_axis(x, shape.len()))
                            .collect::<Option<_>>()
                            .ok_or_else(|| self.invalid(node, "axes out of range"))?;
                        v.sort_unstable();
                        v.dedup();
                        v
                    }
                    _ if a.int("noop_with_empty_axes", 0) != 0 => {
                        return self.emit(node, Op::Identity, data_inputs(1), vec![out0], "")
                    }
                    _ => (0..shape.len()).collect(),
                };
                (
                    Op::Reduce {
                        kind,
                        axes,
                        keepdims,
                    },
                    data_inputs(1),
                )
            }
            "LayerNormalization" => {
                let rank = self.shape_of(node, 0)?.len();
                let axis = normalize_axis(a.int("axis", -1), rank)
                    .ok_or_else(|| self.invalid(node, "axis out of range"))?;
                (
                    Op::LayerNormalization {
                        axis,
                        epsilon: a.float("epsilon", 1e-5),
                    },
                    data_inputs(3),
                )
            }
            "Identity" => (Op::Identity, data_inputs(1)),
            "Dropout" => {
                if node.output.iter().skip(1).any(|o| !o.is_empty()) {
                    return Err(self.unsupported(node, "Dropout's mask output"));
                }
                if let Some(v) = self.const_ints(node, 2)? {
                    if v.first().copied().unwrap_or(0) != 0 {
                        return Err(self.unsupported(node, "training-mode Dropout"));
                    }
                }
                (Op::Identity, data_inputs(1))
            }
            "Shape" => {
                // Always static: every shape is fixed at import.
                let shape = self.shape_of(node, 0)?;
                let r = shape.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clampi(a.int("start", 0));
                let end = clampi(a.int("end", r));
                let dims: Vec<i64> = shape
                    .get(start..end.max(start))
                    .unwrap_or(&[])
                    .iter()
                    .map(|&d| d as i64)
                    .collect();
                let n = dims.len();
                self.set_const(&out0, Tensor::from_vec(dims, n, &self.device)?);
                return Ok(());
            }
            "Gather" => {
                let rank = self.shape_of(node, 0)?.len();
                let axis = normalize_axis(a.int("axis", 0), rank)
                    .ok_or_else(|| self.invalid(node, "axis out of range"))?;
                (Op::Gather { axis }, data_inputs(2))
            }
            "Cast" => {
                let code = a.int("to", 0) as i32;
                let to = onnx_dtype(code)
                    .ok_or_else(|| self.unsupported(node, format!("Cast to ONNX type {code}")))?;
                (Op::Cast { to }, data_inputs(1))
            }
            "ConstantOfShape" => {
                let shape: Vec<usize> = self
                    .const_ints(node, 0)?
                    .unwrap_or_default()
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .collect();
                let value = match a.map.get("value").and_then(|v| v.t.as_ref()) {
                    Some(t) => self.tensor_from_proto(t, &out0)?,
                    None => Tensor::zeros(1, CDType::F32, &self.device)?,
                };
                let t = value
                    .flatten_all()?
                    .narrow(0, 0, 1)?
                    .reshape(vec![1usize; shape.len()])?
                    .broadcast_as(shape.as_slice())?
                    .contiguous()?;
                self.set_const(&out0, t);
                return Ok(());
            }
            "Range" => {
                let get = |i| -> Result<f64> {
                    self.const_floats(node, i)?
                        .and_then(|v| v.first().copied())
                        .ok_or_else(|| self.invalid(node, format!("input {i} is required")))
                };
                let (start, limit, delta) = (get(0)?, get(1)?, get(2)?);
                if delta == 0.0 {
                    return Err(self.invalid(node, "delta is 0"));
                }
                let n = ((limit - start) / delta).ceil().max(0.0) as usize;
                let dtype = self.val(node, self.req_input(node, 0)?)?.tensor().dtype();
                let v: Vec<f64> = (0..n).map(|i| start + i as f64 * delta).collect();
                let t = Tensor::from_vec(v, n, &self.device)?.to_dtype(dtype)?;
                self.set_const(&out0, t);
                return Ok(());
            }
            "Expand" => {
                let shape = self.shape_of(node, 0)?;
                let target: Vec<usize> = self
                    .const_ints(node, 1)?
                    .ok_or_else(|| self.invalid(node, "no shape input"))?
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .collect();
                let out = broadcast_shape(&[&shape, &target])
                    .map_err(|e| self.invalid(node, e.to_string()))?;
                (Op::Expand { shape: out }, data_inputs(1))
            }
            "Where" => (Op::Where, data_inputs(3)),
            other => {
                return Err(self.unsupported(
                    node,
                    format!("op '{other}' (supported ops: run `edgeinfer ops`; README lists them)"),
                ))
            }
        };
        self.emit(node, op, inputs, node.output.clone(), "")
    }

    fn constant_value(&self, node: &NodeProto, a: &Attrs) -> Result<Tensor> {
        let dev = &self.device;
        if let Some(t) = a.map.get("value").and_then(|v| v.t.as_ref()) {
            return self.tensor_from_proto(t, &node_label(node));
        }
        if let Some(v) = a.map.get("value_float") {
            return Ok(Tensor::new(v.f, dev)?);
        }
        if let Some(v) = a.map.get("value_floats") {
            return Ok(Tensor::from_vec(v.floats.clone(), v.floats.len(), dev)?);
        }
        if let Some(v) = a.map.get("value_int") {
            return Ok(Tensor::new(v.i, dev)?);
        }
        if let Some(v) = a.map.get("value_ints") {
            return Ok(Tensor::from_vec(v.ints.clone(), v.ints.len(), dev)?);
        }
        Err(self.unsupported(node, "Constant without a tensor, float(s) or int(s) value"))
    }

    fn spatial_attrs(
        &self,
        node: &NodeProto,
        a: &Attrs,
        spatial: usize,
    ) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        let get = |k: &str, default: usize, len: usize| -> Result<Vec<usize>> {
            match a.ints(k) {
                Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => {
                    Ok(v.iter().map(|&x| x as usize).collect())
                }
                Some(v) => Err(self.invalid(
                    node,
                    format!("{k}={v:?} does not fit {spatial} spatial axes"),
                )),
                None => Ok(vec![default; len]),
            }
        };
        Ok((
            get("strides", 1, spatial)?,
            get("pads", 0, spatial * 2)?,
            get("dilations", 1, spatial)?,
        ))
    }

    fn conv_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let x = self.shape_of(node, 0)?;
        let w = self.shape_of(node, 1)?;
        let spatial = w.len().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return Err(
                self.unsupported(node, format!("{spatial}-D convolution (1-D and 2-D run)"))
            );
        }
        let (strides, pads, dilations) = self.spatial_attrs(node, a, spatial)?;
        let pads = auto_pads(a, &x[2..], &w[2..], &strides, &dilations, pads)
            .map_err(|e| self.invalid(node, e))?;
        Ok(Op::Conv {
            strides,
            pads,
            dilations,
            group: a.int("group", 1).max(1) as usize,
            activation: None,
            residual: false,
        })
    }

    fn conv_transpose_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let x = self.shape_of(node, 0)?;
        let w = self.shape_of(node, 1)?;
        let spatial = w.len().saturating_sub(2);
        if spatial != 2 {
            return Err(self.unsupported(node, format!("{spatial}-D ConvTranspose (2-D runs)")));
        }
        let (strides, mut pads, dilations) = self.spatial_attrs(node, a, spatial)?;
        let mut output_padding: Vec<usize> = a
            .ints("output_padding")
            .map(|v| v.iter().map(|&x| x.max(0) as usize).collect())
            .unwrap_or_else(|| vec![0; spatial]);
        let auto = a.string("auto_pad", "NOTSET");
        let target: Option<Vec<usize>> = match a.ints("output_shape") {
            Some(s) => Some(
                s[s.len().saturating_sub(spatial)..]
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .collect(),
            ),
            None if auto.starts_with("SAME") => {
                Some((0..spatial).map(|i| x[2 + i] * strides[i]).collect())
            }
            None => None,
        };
        if auto == "VALID" {
            pads = vec![0; 2 * spatial];
        }
        if let Some(target) = target {
            for i in 0..spatial {
                let full = strides[i] * (x[2 + i] - 1)
                    + output_padding[i]
                    + (w[2 + i] - 1) * dilations[i]
                    + 1;
                if full < target[i] {
                    // The missing cells are zero-extension at the end, like output_padding.
                    output_padding[i] += target[i] - full;
                    pads[i] = 0;
                    pads[i + spatial] = 0;
                    continue;
                }
                let total = full - target[i];
                let (b, e) = if auto == "SAME_UPPER" {
                    (total / 2, total - total / 2)
                } else {
                    (total - total / 2, total / 2)
                };
                pads[i] = b;
                pads[i + spatial] = e;
            }
        }
        Ok(Op::ConvTranspose {
            strides,
            pads,
            dilations,
            output_padding,
            group: a.int("group", 1).max(1) as usize,
        })
    }

    fn pool_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let x = self.shape_of(node, 0)?;
        let kernel: Vec<usize> = a
            .ints("kernel_shape")
            .ok_or_else(|| self.invalid(node, "no kernel_shape"))?
            .iter()
            .map(|&k| k.max(1) as usize)
            .collect();
        let n = kernel.len();
        if !(1..=2).contains(&n) || x.len() != n + 2 {
            return Err(self.unsupported(node, format!("{n}-D pooling (1-D and 2-D run)")));
        }
        let (strides, pads, dilations) = self.spatial_attrs(node, a, n)?;
        if dilations.iter().any(|&d| d != 1) {
            return Err(self.unsupported(node, format!("pooling dilations {dilations:?}")));
        }
        if a.int("storage_order", 0) != 0 {
            return Err(self.unsupported(node, "storage_order=1"));
        }
        let mut pads = auto_pads(a, &x[2..], &kernel, &strides, &dilations, pads)
            .map_err(|e| self.invalid(node, e))?;
        let mut ceil_pads = vec![0; n];
        if a.int("ceil_mode", 0) != 0 {
            for i in 0..n {
                let padded = x[2 + i] + pads[i] + pads[i + n];
                if padded < kernel[i] {
                    continue;
                }
                let mut out = (padded - kernel[i]).div_ceil(strides[i]) + 1;
                // The last window must start inside the input or its begin padding.
                if (out - 1) * strides[i] >= x[2 + i] + pads[i] {
                    out -= 1;
                }
                let need = (out - 1) * strides[i] + kernel[i];
                ceil_pads[i] = need.saturating_sub(padded);
            }
        }
        let kind = if node.op_type == "MaxPool" {
            PoolKind::Max
        } else {
            PoolKind::Avg
        };
        if kind == PoolKind::Max {
            // -inf padding: ceil cells and explicit pads behave alike.
            for i in 0..n {
                pads[i + n] += ceil_pads[i];
                ceil_pads[i] = 0;
            }
        }
        Ok(Op::Pool {
            kind,
            kernel,
            strides,
            pads,
            ceil_pads,
            count_include_pad: a.int("count_include_pad", 0) != 0,
        })
    }

    fn split_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let shape = self.shape_of(node, 0)?;
        let axis = normalize_axis(a.int("axis", 0), shape.len())
            .ok_or_else(|| self.invalid(node, "axis out of range"))?;
        let dim = shape[axis];
        let split = if self.opset < 13 {
            a.ints("split")
        } else {
            self.const_ints(node, 1)?
        };
        let sizes: Vec<usize> = match split {
            Some(s) if !s.is_empty() => s.iter().map(|&x| x.max(0) as usize).collect(),
            _ => {
                let parts = a.int("num_outputs", node.output.len() as i64).max(1) as usize;
                let chunk = dim.div_ceil(parts);
                (0..parts)
                    .map(|i| chunk.min(dim.saturating_sub(i * chunk)))
                    .collect()
            }
        };
        if sizes.iter().sum::<usize>() != dim {
            return Err(self.invalid(
                node,
                format!("split sizes {sizes:?} do not add up to {dim}"),
            ));
        }
        Ok(Op::Split { axis, sizes })
    }

    fn slice_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let shape = self.shape_of(node, 0)?;
        let (starts, ends, axes, steps) = if self.opset < 10 {
            (a.ints("starts"), a.ints("ends"), a.ints("axes"), None)
        } else {
            (
                self.const_ints(node, 1)?,
                self.const_ints(node, 2)?,
                self.const_ints(node, 3)?,
                self.const_ints(node, 4)?,
            )
        };
        let starts = starts.ok_or_else(|| self.invalid(node, "no starts"))?;
        let ends = ends.ok_or_else(|| self.invalid(node, "no ends"))?;
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(self.invalid(node, "starts, ends, axes and steps differ in length"));
        }
        let mut ranges = Vec::new();
        for i in 0..starts.len() {
            let axis = normalize_axis(axes[i], shape.len())
                .ok_or_else(|| self.invalid(node, "axis out of range"))?;
            let n = shape[axis] as i64;
            let step = steps[i];
            if step == 0 {
                return Err(self.invalid(node, "step 0"));
            }
            let fix = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
            let (mut s, mut e) = (fix(starts[i]), fix(ends[i]));
            let count = if step > 0 {
                s = s.clamp(0, n);
                e = e.clamp(0, n);
                if e > s {
                    (e - s + step - 1) / step
                } else {
                    0
                }
            } else {
                s = s.clamp(0, n - 1);
                e = e.clamp(-1, n - 1);
                if s > e {
                    (s - e + (-step) - 1) / (-step)
                } else {
                    0
                }
            };
            ranges.push(SliceRange {
                axis,
                start: s.max(0) as usize,
                step,
                count: count as usize,
            });
        }
        Ok(Op::Slice { ranges })
    }

    fn resize_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let shape = self.shape_of(node, 0)?;
        let rank = shape.len();
        let mode = match a.string("mode", "nearest").as_str() {
            "nearest" => ResizeMode::Nearest,
            "linear" | "bilinear" => ResizeMode::Linear,
            other => return Err(self.unsupported(node, format!("Resize mode '{other}'"))),
        };
        if a.int("antialias", 0) != 0 {
            return Err(self.unsupported(node, "Resize antialias=1"));
        }
        let policy = a.string("keep_aspect_ratio_policy", "stretch");
        if policy != "stretch" {
            return Err(self.unsupported(node, format!("keep_aspect_ratio_policy '{policy}'")));
        }
        let coord = a.string(
            "coordinate_transformation_mode",
            if self.opset < 11 {
                "asymmetric"
            } else {
                "half_pixel"
            },
        );
        let axes: Vec<usize> = match a.ints("axes") {
            Some(ax) => ax
                .iter()
                .map(|&x| normalize_axis(x, rank))
                .collect::<Option<_>>()
                .ok_or_else(|| self.invalid(node, "axes out of range"))?,
            None => (0..rank).collect(),
        };
        let (scales_in, sizes_in) = if self.opset < 11 {
            (self.const_floats(node, 1)?, None)
        } else {
            (self.const_floats(node, 2)?, self.const_ints(node, 3)?)
        };
        let mut sizes = shape.clone();
        let mut factor = vec![1f64; rank];
        match (
            scales_in.filter(|v| !v.is_empty()),
            sizes_in.filter(|v| !v.is_empty()),
        ) {
            (Some(sc), _) => {
                if sc.len() != axes.len() {
                    return Err(self.invalid(node, "scales do not match the axes"));
                }
                for (k, &ax) in axes.iter().enumerate() {
                    factor[ax] = sc[k];
                    sizes[ax] = (shape[ax] as f64 * sc[k]).floor() as usize;
                }
            }
            (None, Some(sz)) => {
                if sz.len() != axes.len() {
                    return Err(self.invalid(node, "sizes do not match the axes"));
                }
                for (k, &ax) in axes.iter().enumerate() {
                    sizes[ax] = sz[k].max(0) as usize;
                    factor[ax] = sizes[ax] as f64 / shape[ax] as f64;
                }
            }
            (None, None) => return Err(self.invalid(node, "neither scales nor sizes")),
        }
        // Source coordinate = (out + pre) / div + post, kept in f64 and in this divided form so
        // that exact halves (e.g. (3 + 0.5) / 3.5 - 0.5) stay exact and round as ONNX rounds them.
        let mut pre = vec![0f64; rank];
        let mut div = vec![1f64; rank];
        let mut post = vec![0f64; rank];
        for ax in 0..rank {
            let (n_in, r) = (shape[ax] as f64, factor[ax]);
            if sizes[ax] == shape[ax] && r == 1.0 {
                continue;
            }
            // ONNX measures the resized length as n_in · scale, fractional when scales are given.
            let len = n_in * r;
            let (p, d, q) = match coord.as_str() {
                "half_pixel" => (0.5, r, -0.5),
                "pytorch_half_pixel" if sizes[ax] > 1 => (0.5, r, -0.5),
                "pytorch_half_pixel" => (0.0, 1.0, 0.0),
                "align_corners" if len > 1.0 && n_in > 1.0 => {
                    (0.0, (len - 1.0) / (n_in - 1.0), 0.0)
                }
                "align_corners" => (0.0, 1.0, 0.0),
                "asymmetric" => (0.0, r, 0.0),
                "tf_half_pixel_for_nn" => (0.5, r, 0.0),
                "half_pixel_symmetric" => {
                    let adj = sizes[ax] as f64 / len;
                    (0.5, r, n_in / 2.0 * (1.0 - adj) - 0.5)
                }
                other => {
                    return Err(
                        self.unsupported(node, format!("coordinate_transformation_mode '{other}'"))
                    )
                }
            };
            pre[ax] = p;
            div[ax] = d;
            post[ax] = q;
        }
        Ok(Op::Resize {
            mode,
            sizes,
            pre,
            div,
            post,
            nearest_mode: a.string("nearest_mode", "round_prefer_floor"),
            exclude_outside: a.int("exclude_outside", 0) != 0,
        })
    }

    fn pad_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        let rank = self.shape_of(node, 0)?.len();
        let mode = match a.string("mode", "constant").as_str() {
            "constant" => PadMode::Constant,
            "reflect" => PadMode::Reflect,
            "edge" => PadMode::Edge,
            "wrap" => PadMode::Wrap,
            other => return Err(self.unsupported(node, format!("Pad mode '{other}'"))),
        };
        let (raw, value, axes) = if self.opset < 11 {
            (
                a.ints("pads").or_else(|| a.ints("paddings")),
                a.float("value", 0.0),
                None,
            )
        } else {
            let value = self
                .const_floats(node, 2)?
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0) as f32;
            (self.const_ints(node, 1)?, value, self.const_ints(node, 3)?)
        };
        let raw = raw.ok_or_else(|| self.invalid(node, "no pads"))?;
        let pads = match axes {
            Some(ax) => {
                let k = ax.len();
                if raw.len() != 2 * k {
                    return Err(self.invalid(node, "pads do not match axes"));
                }
                let mut p = vec![0i64; 2 * rank];
                for (i, &x) in ax.iter().enumerate() {
                    let axis = normalize_axis(x, rank)
                        .ok_or_else(|| self.invalid(node, "axis out of range"))?;
                    p[axis] = raw[i];
                    p[axis + rank] = raw[i + k];
                }
                p
            }
            None => raw,
        };
        if pads.len() != 2 * rank {
            return Err(self.invalid(node, format!("{} pads for rank {rank}", pads.len())));
        }
        Ok(Op::Pad { mode, pads, value })
    }

    fn softmax(&mut self, node: &NodeProto, a: &Attrs, out0: &str) -> Result<()> {
        let shape = self.shape_of(node, 0)?;
        let rank = shape.len();
        let default = if self.opset < 13 { 1 } else { -1 };
        let axis = normalize_axis(a.int("axis", default), rank)
            .ok_or_else(|| self.invalid(node, "axis out of range"))?;
        let x = self.req_input(node, 0)?.to_string();
        if self.opset >= 13 || axis + 1 == rank {
            return self.emit(
                node,
                Op::Softmax { axis },
                vec![x],
                vec![out0.to_string()],
                "",
            );
        }
        // Before opset 13 Softmax normalises the flattened [outer, inner] matrix.
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis..].iter().product();
        let flat = self.fresh(out0);
        let soft = self.fresh(out0);
        self.emit(
            node,
            Op::Reshape {
                shape: vec![outer, inner],
            },
            vec![x],
            vec![flat.clone()],
            "/flatten",
        )?;
        self.emit(
            node,
            Op::Softmax { axis: 1 },
            vec![flat],
            vec![soft.clone()],
            "",
        )?;
        self.emit(
            node,
            Op::Reshape { shape },
            vec![soft],
            vec![out0.to_string()],
            "/unflatten",
        )
    }
}

/// Resolves auto_pad for a window op: SAME gives output = ceil(in / stride), VALID no pads.
fn auto_pads(
    a: &Attrs,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: Vec<usize>,
) -> std::result::Result<Vec<usize>, String> {
    let mode = a.string("auto_pad", "NOTSET");
    let n = kernel.len();
    match mode.as_str() {
        "NOTSET" | "" => Ok(pads),
        "VALID" => Ok(vec![0; 2 * n]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut p = vec![0; 2 * n];
            for i in 0..n {
                let out = input[i].div_ceil(strides[i]);
                let eff = (kernel[i] - 1) * dilations[i] + 1;
                let total = ((out - 1) * strides[i] + eff).saturating_sub(input[i]);
                let small = total / 2;
                let (b, e) = if mode == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                p[i] = b;
                p[i + n] = e;
            }
            Ok(p)
        }
        other => Err(format!("auto_pad '{other}'")),
    }
}

fn node_label(node: &NodeProto) -> String {
    if node.name.is_empty() {
        format!(
            "{} -> {}",
            node.op_type,
            node.output.first().cloned().unwrap_or_default()
        )
    } else {
        node.name.clone()
    }
}

/// Resolves ONNX Reshape's 0 (copy) and -1 (infer) against the input shape.
fn resolve_reshape(
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> std::result::Result<Vec<usize>, String> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(format!("more than one -1 in shape {target:?}"));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(
                *input
                    .get(i)
                    .ok_or_else(|| format!("0 at axis {i} copies a dimension the input lacks"))?,
            ),
            d if d >= 0 => out.push(d as usize),
            d => return Err(format!("invalid dimension {d} in shape {target:?}")),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(format!(
            "cannot reshape {input:?} ({total} elements) to {target:?}"
        ));
    }
    Ok(out)
}
