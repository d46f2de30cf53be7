//! What a graph offers the explain layer, found once at load from the graph as stored (its value
//! names are the ONNX ones users know): a CAM head, the default target layer, the Grad-CAM tail
//! and the attention softmaxes of a ViT.

use std::collections::HashSet;

use crate::graph::{Graph, Node, Op, PoolKind, ReduceKind};
use crate::model::ModelFile;

/// A classifier head `GlobalAveragePool → (Flatten) → Linear`: CAM is exact for it.
#[derive(Debug, Clone)]
pub struct CamHead {
    /// The feature map the pool averages (`[1, C, h, w]`).
    pub feature: String,
    /// C.
    pub channels: usize,
    /// The feature map's rows.
    pub height: usize,
    /// The feature map's columns.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
    /// The linear layer's weight as `classes × channels`, row-major (Gemm's alpha folded in).
    pub weight: Vec<f32>,
}

/// The attention softmaxes of a ViT, for attention rollout.
#[derive(Debug, Clone)]
pub struct AttentionTaps {
    /// Softmax outputs `[1, heads, T, T]`, in execution order.
    pub softmaxes: Vec<String>,
    /// Heads per layer.
    pub heads: usize,
    /// Tokens, the class token first.
    pub tokens: usize,
    /// Patch grid (rows, columns): `rows × columns = tokens − 1`.
    pub grid: (usize, usize),
}

/// Where a graph can be explained from.
#[derive(Debug, Clone, Default)]
pub struct GraphTargets {
    /// The CAM head, when the classifier has one.
    pub cam: Option<CamHead>,
    /// The default target layer for Eigen-CAM / Grad-CAM: the CAM feature map, else the last
    /// spatial (`[1, C, h, w]`, h·w > 1) value in execution order.
    pub feature: Option<String>,
    /// Attention layers, for ViT-style models.
    pub attention: Option<AttentionTaps>,
}

/// `[1, C, h, w]` with h·w > 1.
pub(crate) fn spatial_dims(graph: &Graph, value: &str) -> Option<(usize, usize, usize)> {
    match graph.values.get(value)?.shape.as_slice() {
        &[1, c, h, w] if h * w > 1 => Some((c, h, w)),
        _ => None,
    }
}

fn producer<'g>(graph: &'g Graph, value: &str) -> Option<&'g Node> {
    graph
        .nodes
        .iter()
        .find(|n| n.outputs.iter().any(|o| o == value))
}

/// Follows pass-through nodes (Identity, Reshape/Flatten) back from `value`.
fn skip_passthrough<'g>(graph: &'g Graph, mut value: &'g str) -> &'g str {
    while let Some(n) = producer(graph, value) {
        match n.op {
            Op::Identity | Op::Reshape { .. } => value = &n.inputs[0],
            _ => break,
        }
    }
    value
}

impl GraphTargets {
    /// Analyses `graph` (as stored in `file`, whose tensors hold the classifier weights).
    pub fn find(graph: &Graph, file: &ModelFile) -> Self {
        let cam = find_cam_head(graph, file);
        let feature = cam
            .as_ref()
            .map(|h| h.feature.clone())
            .or_else(|| spatial_values(graph).into_iter().next_back());
        GraphTargets {
            cam,
            feature,
            attention: find_attention(graph),
        }
    }
}

/// Values that are feature maps of the image, in execution order: `[1, C, h, w]` outputs of
/// convolutions and of per-pixel ops (activations, norms, pools, adds, channel concats) over
/// other feature maps. A 4-D value reached through a Reshape, Transpose or MatMul (a ViT's
/// attention heads) is not one.
fn spatial_values(graph: &Graph) -> Vec<String> {
    let mut spatial: HashSet<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
    let mut out = Vec::new();
    for n in &graph.nodes {
        let per_pixel = matches!(
            n.op,
            Op::Conv { .. }
                | Op::Activation { .. }
                | Op::BatchNormalization { .. }
                | Op::PRelu
                | Op::Pool { .. }
                | Op::Binary { .. }
                | Op::Variadic { .. }
                | Op::Concat { axis: 1 }
                | Op::Identity
        );
        if !per_pixel || !n.inputs.iter().any(|i| spatial.contains(i.as_str())) {
            continue;
        }
        for o in &n.outputs {
            if spatial_dims(graph, o).is_some() {
                spatial.insert(o);
                out.push(o.clone());
            }
        }
    }
    out
}

fn find_cam_head(graph: &Graph, file: &ModelFile) -> Option<CamHead> {
    let out = graph.outputs.first()?;
    // Logits, possibly behind a softmax or pass-throughs.
    let mut logits = skip_passthrough(graph, &out.name);
    if let Some(n) = producer(graph, logits) {
        if matches!(n.op, Op::Softmax { .. }) {
            logits = skip_passthrough(graph, &n.inputs[0]);
        }
    }
    let linear = producer(graph, logits)?;
    // (weight name, weight is [classes, channels], scale)
    let (pooled, w_name, transposed, scale) = match &linear.op {
        Op::Gemm {
            alpha,
            trans_a: false,
            trans_b,
            activation: None,
            ..
        } => (&linear.inputs[0], &linear.inputs[1], *trans_b, *alpha),
        Op::MatMul {
            activation: None,
            residual: false,
        } => (&linear.inputs[0], &linear.inputs[1], false, 1.0),
        _ => return None,
    };
    let pooled = skip_passthrough(graph, pooled);
    let pool = producer(graph, pooled)?;
    let is_gap = match &pool.op {
        Op::GlobalPool {
            kind: PoolKind::Avg,
        } => true,
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes,
            ..
        } => axes == &[2, 3],
        _ => false,
    };
    if !is_gap {
        return None;
    }
    let feature = pool.inputs[0].clone();
    let (channels, height, width) = spatial_dims(graph, &feature)?;
    let view = file.get(w_name)?;
    let w = match crate::quant::dequantize(file, &view).ok()? {
        Some(w) => w,
        None => view.to_f32_vec().ok()?,
    };
    let shape = view.info.shape.clone();
    let (rows, cols) = match shape.as_slice() {
        &[r, c] => (r, c),
        _ => return None,
    };
    let (classes, c) = if transposed {
        (rows, cols)
    } else {
        (cols, rows)
    };
    if c != channels {
        return None;
    }
    let mut weight = vec![0f32; classes * channels];
    for k in 0..classes {
        for ch in 0..channels {
            let v = if transposed {
                w[k * channels + ch]
            } else {
                w[ch * classes + k]
            };
            weight[k * channels + ch] = v * scale;
        }
    }
    Some(CamHead {
        feature,
        channels,
        height,
        width,
        classes,
        weight,
    })
}

fn find_attention(graph: &Graph) -> Option<AttentionTaps> {
    let mut softmaxes = Vec::new();
    let mut dims = None;
    for n in &graph.nodes {
        let Op::Softmax { axis } = n.op else {
            continue;
        };
        let Some(info) = graph.values.get(&n.outputs[0]) else {
            continue;
        };
        if let &[1, heads, t, t2] = info.shape.as_slice() {
            if t == t2 && axis == 3 && t > 1 {
                if dims.is_some_and(|d| d != (heads, t)) {
                    return None;
                }
                dims = Some((heads, t));
                softmaxes.push(n.outputs[0].clone());
            }
        }
    }
    let (heads, tokens) = dims?;
    let grid = square_grid(tokens - 1)?;
    Some(AttentionTaps {
        softmaxes,
        heads,
        tokens,
        grid,
    })
}

fn square_grid(n: usize) -> Option<(usize, usize)> {
    let side = (n as f64).sqrt().round() as usize;
    (side > 0 && side * side == n).then_some((side, side))
}

/// The nodes that turn `feature` into the first graph output, in execution order, for
/// Grad-CAM's backward pass; `Err` names what stops it.
pub fn gradient_tail(graph: &Graph, feature: &str) -> Result<Vec<Node>, String> {
    let out = graph
        .outputs
        .first()
        .ok_or("the model has no outputs")?
        .name
        .clone();
    let mut depends: HashSet<&str> = HashSet::from([feature]);
    let mut tail = Vec::new();
    for n in &graph.nodes {
        if n.inputs.iter().any(|i| depends.contains(i.as_str())) {
            depends.extend(n.outputs.iter().map(String::as_str));
            tail.push(n.clone());
            if n.outputs.contains(&out) {
                break;
            }
        }
    }
    if !depends.contains(out.as_str()) {
        return Err(format!(
            "the output '{out}' does not depend on the target layer '{feature}'"
        ));
    }
    // Anything else the tail reads must be a weight; values beside the tap are not kept.
    let produced: HashSet<&str> = tail
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .chain([feature])
        .collect();
    let computed: HashSet<&str> = graph
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .chain(graph.inputs.iter().map(|i| i.name.as_str()))
        .collect();
    for n in &tail {
        for i in &n.inputs {
            if !produced.contains(i.as_str()) && computed.contains(i.as_str()) {
                return Err(format!(
                    "node '{}' after the target layer also reads '{i}', which does not come from \
                     it (pick a later --target-layer)",
                    n.name
                ));
            }
        }
    }
    Ok(tail)
}
