//! The graph IR stored in a model file's `edgeinfer.graph` metadata, and the passes over it.
//!
//! Values are named by strings (the ONNX names, so `--dump-outputs` keys match other runtimes).
//! A node input names either a graph input, another node's output, or a tensor in the model
//! file (a weight or a folded constant). Every shape is static: dynamic dimensions are fixed at
//! import, and `values` records the inferred shape of every value.

pub mod passes;
pub mod stats;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{Error, Result};
use crate::model::{DType, ModelFile};

/// Current version of the model file format (`edgeinfer.format`).
pub const FORMAT_VERSION: &str = "1";
/// Metadata key of the format version.
pub const META_FORMAT: &str = "edgeinfer.format";
/// Metadata key of the graph JSON.
pub const META_GRAPH: &str = "edgeinfer.graph";
/// Metadata key of the class labels JSON array.
pub const META_LABELS: &str = "edgeinfer.labels";
/// Metadata key of the provenance JSON.
pub const META_PROVENANCE: &str = "edgeinfer.provenance";

/// The provenance JSON of a model file derived from `file` (pruned, quantised, fine-tuned):
/// the parent's provenance with `record` under `key` (the parent's sha256 added to it) and the
/// variant extended by `suffix` (`p40` then `int8` gives `p40-int8`; a `base` parent gives
/// just the suffix).
pub fn derived_provenance(
    file: &ModelFile,
    suffix: &str,
    key: &str,
    mut record: serde_json::Value,
) -> String {
    let mut prov: serde_json::Value = file
        .metadata()
        .get(META_PROVENANCE)
        .and_then(|p| serde_json::from_str(p).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(r) = record.as_object_mut() {
        r.insert("parent_sha256".into(), file.sha256_hex().into());
    }
    if let Some(obj) = prov.as_object_mut() {
        let variant = match obj.get("variant").and_then(|v| v.as_str()) {
            Some(v) if v != "base" => format!("{v}-{suffix}"),
            _ => suffix.to_string(),
        };
        obj.insert("variant".into(), variant.into());
        obj.insert(key.into(), record);
    }
    prov.to_string()
}

/// An activation that can run on its own or be fused into the node producing its input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Activation {
    /// max(x, 0)
    Relu,
    /// clamp(x, min, max); ReLU6 is `Clip{0,6}`.
    Clip {
        /// Lower bound (none: unbounded).
        min: Option<f32>,
        /// Upper bound (none: unbounded).
        max: Option<f32>,
    },
    /// x if x ≥ 0 else alpha·x
    LeakyRelu {
        /// Slope for negative inputs.
        alpha: f32,
    },
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// clamp(alpha·x + beta, 0, 1)
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// x · clamp(x/6 + 1/2, 0, 1)
    HardSwish,
    /// tanh(x)
    Tanh,
    /// GELU, exact (erf) or the tanh approximation.
    Gelu {
        /// Use the tanh approximation.
        tanh: bool,
    },
}

/// Resize interpolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Nearest neighbour.
    Nearest,
    /// (Bi)linear, separable per axis.
    Linear,
}

/// Padding mode of `Pad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PadMode {
    /// Fill with a value.
    Constant,
    /// Mirror without repeating the edge.
    Reflect,
    /// Repeat the edge.
    Edge,
    /// Wrap around.
    Wrap,
}

/// One operation. Parameters that ONNX passes as constant inputs (Reshape's shape, Slice's
/// starts, Clip's bounds, ...) are resolved at import and stored here, so the executor never
/// looks at constant shape tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Op {
    /// N-d convolution (1-D and 2-D run). Inputs: X, W, optional B.
    Conv {
        /// Stride per spatial axis.
        strides: Vec<usize>,
        /// Padding: begins for every spatial axis, then ends.
        pads: Vec<usize>,
        /// Dilation per spatial axis.
        dilations: Vec<usize>,
        /// Number of groups (== channels for depthwise).
        group: usize,
        /// Fused activation applied to the output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activation: Option<Activation>,
        /// A fused residual add: the last input, shaped like the output, is added before the
        /// activation (set by the load-time passes, never stored by import).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        residual: bool,
    },
    /// Transposed 2-D convolution. Inputs: X, W, optional B.
    ConvTranspose {
        /// Stride per spatial axis.
        strides: Vec<usize>,
        /// Padding: begins, then ends.
        pads: Vec<usize>,
        /// Dilation per spatial axis.
        dilations: Vec<usize>,
        /// Extra size added to one side of the output.
        output_padding: Vec<usize>,
        /// Number of groups.
        group: usize,
    },
    /// Inference batch norm. Inputs: X, scale, B, mean, var.
    BatchNormalization {
        /// Added to the variance.
        epsilon: f32,
    },
    /// A standalone activation.
    Activation {
        /// Which one.
        activation: Activation,
    },
    /// x if x ≥ 0 else slope·x, slope broadcast. Inputs: X, slope.
    PRelu,
    /// Softmax along one axis.
    Softmax {
        /// The axis (non-negative after import).
        axis: usize,
    },
    /// Elementwise binary op with numpy broadcasting.
    Binary {
        /// Which one.
        kind: BinaryKind,
        /// Fused activation applied to the output (Add + ReLU in residual blocks).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activation: Option<Activation>,
    },
    /// Variadic Max / Min / Sum with broadcasting.
    Variadic {
        /// Which one.
        kind: VariadicKind,
    },
    /// Elementwise unary math.
    Unary {
        /// Which one.
        kind: UnaryKind,
    },
    /// numpy matmul. Inputs: A, B, then (set by the load-time passes) an optional bias over
    /// the last axis and, with `residual`, a value shaped like the output.
    MatMul {
        /// Fused activation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activation: Option<Activation>,
        /// A fused residual add: the last input is added before the activation (load-time
        /// passes only, never stored by import).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        residual: bool,
    },
    /// alpha·A'·B' + beta·C. Inputs: A, B, optional C.
    Gemm {
        /// Scale of the product.
        alpha: f32,
        /// Scale of C.
        beta: f32,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
        /// Fused activation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activation: Option<Activation>,
    },
    /// Max or average pooling over the spatial axes.
    Pool {
        /// Max or average.
        kind: PoolKind,
        /// Window per spatial axis.
        kernel: Vec<usize>,
        /// Stride per spatial axis.
        strides: Vec<usize>,
        /// Padding: begins, then ends.
        pads: Vec<usize>,
        /// Extra end cells ceil_mode adds (never counted in an average's divisor).
        #[serde(default)]
        ceil_pads: Vec<usize>,
        /// Average: count explicitly padded cells in the divisor.
        count_include_pad: bool,
    },
    /// Global average or max over all spatial axes (keeps them as size 1).
    GlobalPool {
        /// Max or average.
        kind: PoolKind,
    },
    /// Reshape to a static shape (all dimensions resolved at import).
    Reshape {
        /// The output shape.
        shape: Vec<usize>,
    },
    /// Permute axes.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// Concatenate along an axis.
    Concat {
        /// The axis (non-negative).
        axis: usize,
    },
    /// Split along an axis into pieces of the given sizes.
    Split {
        /// The axis (non-negative).
        axis: usize,
        /// Size of each output along the axis.
        sizes: Vec<usize>,
    },
    /// Strided slice, all parameters resolved against the static input shape.
    Slice {
        /// Per sliced axis: (axis, start, step, count).
        #[serde(rename = "ranges")]
        ranges: Vec<SliceRange>,
    },
    /// Resize the trailing axes to static output sizes.
    Resize {
        /// Interpolation.
        mode: ResizeMode,
        /// Output shape (all axes).
        sizes: Vec<usize>,
        /// Per axis: source coordinate = (out + pre) / div + post (coordinate transform resolved).
        pre: Vec<f64>,
        /// Per axis divisor, see `pre`.
        div: Vec<f64>,
        /// Per axis offset, see `pre`.
        post: Vec<f64>,
        /// Nearest rounding: "round_prefer_floor", "round_prefer_ceil", "floor", "ceil".
        #[serde(default)]
        nearest_mode: String,
        /// Clamp (true) or extrapolate linear source coordinates (tf_crop_and_resize uses a value).
        #[serde(default)]
        exclude_outside: bool,
    },
    /// Pad with a mode; pads are begins then ends for every axis.
    Pad {
        /// Constant, reflect, edge, wrap.
        mode: PadMode,
        /// Begins for every axis, then ends (negative crops).
        pads: Vec<i64>,
        /// Fill value for constant mode.
        value: f32,
    },
    /// Reduce along axes.
    Reduce {
        /// Mean, max, ...
        kind: ReduceKind,
        /// Axes (non-negative, sorted).
        axes: Vec<usize>,
        /// Keep reduced axes as size 1.
        keepdims: bool,
    },
    /// LayerNormalization over the trailing axes from `axis`. Inputs: X, scale, optional B.
    LayerNormalization {
        /// First normalised axis (non-negative).
        axis: usize,
        /// Added to the variance.
        epsilon: f32,
    },
    /// Pass-through (Identity, Dropout in inference, Flatten/Squeeze/Unsqueeze become Reshape).
    Identity,
    /// The shape of the input as an int64 tensor (only when it could not be folded).
    Shape {
        /// First axis kept.
        start: usize,
        /// One past the last axis kept.
        end: usize,
    },
    /// numpy take along an axis. Inputs: data, indices.
    Gather {
        /// The axis (non-negative).
        axis: usize,
    },
    /// Convert the element type.
    Cast {
        /// Target dtype.
        to: DType,
    },
    /// Broadcast to a static shape.
    Expand {
        /// The output shape.
        shape: Vec<usize>,
    },
    /// cond ? X : Y with broadcasting. Inputs: cond, X, Y.
    Where,
}

/// One axis of a [`Op::Slice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceRange {
    /// The axis.
    pub axis: usize,
    /// First index taken.
    pub start: usize,
    /// Step between taken indices (negative walks backwards).
    pub step: i64,
    /// How many indices are taken.
    pub count: usize,
}

/// Elementwise binary ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryKind {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
    /// a ^ b
    Pow,
    /// a == b (bool as u8)
    Equal,
}

/// Variadic ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VariadicKind {
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
    /// Elementwise sum.
    Sum,
}

/// Elementwise unary math (activations are [`Activation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryKind {
    /// Square root.
    Sqrt,
    /// e^x
    Exp,
    /// Natural log.
    Log,
    /// Error function.
    Erf,
}

/// Pooling kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolKind {
    /// Maximum.
    Max,
    /// Average.
    Avg,
}

/// Reduction kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceKind {
    /// Mean.
    Mean,
    /// Maximum.
    Max,
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node name (the ONNX name, or derived from the first output).
    pub name: String,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
    /// Input value names (graph inputs, node outputs or tensors in the file).
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
}

/// Colour order of image inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (OpenCV-trained models).
    Bgr,
    /// One grey channel.
    Gray,
}

/// How a frame becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Memory layout of the tensor: "NCHW" or "NHWC".
    pub layout: String,
    /// Channel order.
    pub color: ColorOrder,
    /// Resize the shorter side to this many pixels before the centre crop; `None`: stretch the
    /// frame straight to the input size.
    pub resize_shorter: Option<u32>,
    /// Pixel values are multiplied by this first (1/255 maps bytes to 0..1).
    pub scale: f32,
    /// Per-channel mean subtracted after scaling.
    pub mean: Vec<f32>,
    /// Per-channel std dividing after the mean.
    pub std: Vec<f32>,
}

/// A graph input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// ONNX input name.
    pub name: String,
    /// Static shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Image preprocessing, for image inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
}

/// What a graph output means, so reports can summarise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMeaning {
    /// Class scores before softmax.
    Logits,
    /// Class probabilities.
    Probabilities,
    /// Detection boxes.
    Boxes,
    /// Segmentation mask.
    Mask,
    /// Feature embedding.
    Embedding,
    /// Anything else.
    Tensor,
}

/// A graph output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// ONNX output name.
    pub name: String,
    /// What it means.
    pub meaning: OutputMeaning,
}

/// Static type of a value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueInfo {
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

/// The whole graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Model name (file stem of the import source).
    pub name: String,
    /// Inputs fed per frame.
    pub inputs: Vec<InputSpec>,
    /// Outputs.
    pub outputs: Vec<OutputSpec>,
    /// Nodes in execution (topological) order.
    pub nodes: Vec<Node>,
    /// Inferred type of every value produced by a node or fed as input.
    #[serde(default)]
    pub values: BTreeMap<String, ValueInfo>,
}

impl Graph {
    /// Parses the graph stored in `file`'s metadata and checks it against the file's tensors:
    /// every node input must be a graph input, an earlier node's output, or a tensor.
    pub fn from_model_file(file: &ModelFile) -> Result<Graph> {
        let bad = |reason: String| Error::InvalidGraph {
            file: file.label().to_string(),
            reason,
        };
        let meta = file.metadata();
        match meta.get(META_FORMAT) {
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version '{v}' is not supported (this build reads '{FORMAT_VERSION}')"
                )))
            }
            None => {
                return Err(bad(format!(
                    "no '{META_FORMAT}' metadata: not an edgeinfer model (import ONNX files with `edgeinfer import`)"
                )))
            }
        }
        let json = meta
            .get(META_GRAPH)
            .ok_or_else(|| bad(format!("no '{META_GRAPH}' metadata")))?;
        let graph: Graph = serde_json::from_str(json)
            .map_err(|e| bad(format!("'{META_GRAPH}' is not a valid graph: {e}")))?;
        graph.validate(|name| file.contains(name)).map_err(bad)?;
        Ok(graph)
    }

    /// Checks that values are defined before use and produced once. `is_tensor` says whether a
    /// name is a stored tensor.
    pub fn validate(&self, is_tensor: impl Fn(&str) -> bool) -> std::result::Result<(), String> {
        let mut defined: HashSet<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        for node in &self.nodes {
            for input in &node.inputs {
                if !defined.contains(input.as_str()) && !is_tensor(input) {
                    return Err(format!(
                        "node '{}' uses '{}', which is neither a graph input, an earlier node's output, nor a tensor in the file (missing weight)",
                        node.name, input
                    ));
                }
            }
            for output in &node.outputs {
                if !defined.insert(output.as_str()) {
                    return Err(format!(
                        "value '{}' is produced twice (node '{}')",
                        output, node.name
                    ));
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(output.name.as_str()) {
                return Err(format!("graph output '{}' is never produced", output.name));
            }
        }
        Ok(())
    }

    /// Names of stored tensors the nodes use (weights and folded constants), in first-use order.
    pub fn tensor_names(&self) -> Vec<String> {
        let produced: HashSet<&str> = self
            .inputs
            .iter()
            .map(|i| i.name.as_str())
            .chain(
                self.nodes
                    .iter()
                    .flat_map(|n| n.outputs.iter().map(|s| s.as_str())),
            )
            .collect();
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        for node in &self.nodes {
            for input in &node.inputs {
                if !produced.contains(input.as_str()) && seen.insert(input.as_str()) {
                    names.push(input.clone());
                }
            }
        }
        names
    }

    /// How many nodes consume each value.
    pub fn consumers(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for node in &self.nodes {
            for input in &node.inputs {
                *counts.entry(input.as_str()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Counts of each op name, for summaries.
    pub fn op_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for node in &self.nodes {
            *h.entry(node.op.name()).or_insert(0) += 1;
        }
        h
    }
}

impl Op {
    /// A short display name ("Conv+Relu", "Add", ...).
    pub fn name(&self) -> String {
        let act = |base: &str, a: &Option<Activation>| match a {
            Some(a) => format!("{base}+{}", a.name()),
            None => base.to_string(),
        };
        match self {
            Op::Conv {
                activation,
                residual,
                ..
            } => act(if *residual { "Conv+Add" } else { "Conv" }, activation),
            Op::ConvTranspose { .. } => "ConvTranspose".into(),
            Op::BatchNormalization { .. } => "BatchNormalization".into(),
            Op::Activation { activation } => activation.name().into(),
            Op::PRelu => "PRelu".into(),
            Op::Softmax { .. } => "Softmax".into(),
            Op::Binary { kind, activation } => act(&format!("{kind:?}"), activation),
            Op::Variadic { kind } => format!("{kind:?}"),
            Op::Unary { kind } => format!("{kind:?}"),
            Op::MatMul {
                activation,
                residual,
            } => act(if *residual { "MatMul+Add" } else { "MatMul" }, activation),
            Op::Gemm { activation, .. } => act("Gemm", activation),
            Op::Pool { kind, .. } => format!("{kind:?}Pool"),
            Op::GlobalPool { kind } => format!("Global{kind:?}Pool"),
            Op::Reshape { .. } => "Reshape".into(),
            Op::Transpose { .. } => "Transpose".into(),
            Op::Concat { .. } => "Concat".into(),
            Op::Split { .. } => "Split".into(),
            Op::Slice { .. } => "Slice".into(),
            Op::Resize { .. } => "Resize".into(),
            Op::Pad { .. } => "Pad".into(),
            Op::Reduce { kind, .. } => format!("Reduce{kind:?}"),
            Op::LayerNormalization { .. } => "LayerNormalization".into(),
            Op::Identity => "Identity".into(),
            Op::Shape { .. } => "Shape".into(),
            Op::Gather { .. } => "Gather".into(),
            Op::Cast { .. } => "Cast".into(),
            Op::Expand { .. } => "Expand".into(),
            Op::Where => "Where".into(),
        }
    }
}

/// `[lo, hi]` of an activation that is a clamp (`None`: the identity, unbounded; ReLU: `[0, ∞)`;
/// Clip), `None` for any other: what fused epilogues apply with a min and a max.
pub fn clamp_bounds(act: Option<&Activation>) -> Option<(f32, f32)> {
    let (ninf, inf) = (f32::NEG_INFINITY, f32::INFINITY);
    match act {
        None => Some((ninf, inf)),
        Some(Activation::Relu) => Some((0.0, inf)),
        Some(Activation::Clip { min, max }) => Some((min.unwrap_or(ninf), max.unwrap_or(inf))),
        Some(_) => None,
    }
}

impl Activation {
    /// The ONNX name of the activation.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "Relu",
            Activation::Clip { .. } => "Clip",
            Activation::LeakyRelu { .. } => "LeakyRelu",
            Activation::Sigmoid => "Sigmoid",
            Activation::HardSigmoid { .. } => "HardSigmoid",
            Activation::HardSwish => "HardSwish",
            Activation::Tanh => "Tanh",
            Activation::Gelu { .. } => "Gelu",
        }
    }
}
