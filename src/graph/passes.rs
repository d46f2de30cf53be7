//! Load-time graph passes: BatchNorm folding, GELU recognition, activation fusion, identity
//! and dead-node removal. They run on the loaded weights, so the file keeps the graph as imported (what
//! `inspect` shows as "before") and f16 storage is folded in f32.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;
use crate::graph::{Activation, BinaryKind, Graph, Node, Op, UnaryKind};

/// What the passes changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// BatchNormalization nodes folded into the preceding convolution.
    pub batchnorm_folded: usize,
    /// Constant bias adds fused into the MatMul before them (linear layers of 3-D inputs).
    pub matmul_biases_fused: usize,
    /// Residual adds fused into the convolution producing one of their inputs.
    pub residuals_fused: usize,
    /// Exact GELUs exported as `x·0.5·(1 + erf(x/√2))` chains of elementwise nodes, replaced
    /// by one GELU activation.
    pub gelu_fused: usize,
    /// Activations fused into their producer.
    pub activations_fused: usize,
    /// Identity nodes removed.
    pub identities_removed: usize,
    /// Nodes removed because nothing used their outputs.
    pub dead_removed: usize,
}

/// Runs every pass. `protected` values (taps the caller wants) are never fused away.
pub fn optimize(
    graph: &mut Graph,
    weights: &mut HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> Result<PassReport> {
    let mut report = PassReport {
        identities_removed: remove_identities(graph, weights, protected),
        ..Default::default()
    };
    report.batchnorm_folded = fold_batchnorm(graph, weights, protected)?;
    report.residuals_fused = fuse_residual_adds(graph, weights, protected);
    report.matmul_biases_fused = fuse_matmul_bias(graph, weights, protected);
    // Again: a linear layer's residual add follows its bias add, fused only just now.
    report.residuals_fused += fuse_residual_adds(graph, weights, protected);
    // Before activation fusion, so the GELU it makes can join the MatMul/Add before it.
    report.gelu_fused = fuse_gelu(graph, weights, protected);
    report.activations_fused = fuse_activations(graph, protected);
    report.dead_removed = remove_dead(graph, protected);
    weights.retain(|name, _| graph.nodes.iter().any(|n| n.inputs.contains(name)));
    Ok(report)
}

/// A two-input `Add` with no fused activation: what the bias and residual fusions absorb.
fn is_plain_add(node: &Node) -> bool {
    matches!(
        node.op,
        Op::Binary {
            kind: BinaryKind::Add,
            activation: None
        }
    ) && node.inputs.len() == 2
        && node.outputs.len() == 1
}

/// Node `i` disappears into its producer `p`: `p` now writes `i`'s outputs, and `x`, the value
/// that ran between them, is gone.
fn absorb(graph: &mut Graph, p: usize, i: usize, x: &str) {
    graph.nodes[p].outputs = graph.nodes[i].outputs.clone();
    graph.values.remove(x);
    graph.nodes.remove(i);
}

fn is_output(graph: &Graph, name: &str) -> bool {
    graph.outputs.iter().any(|o| o.name == name)
}

/// The single consumer of `value`, if exactly one node reads it.
fn sole_consumer(graph: &Graph, value: &str) -> Option<usize> {
    let mut found = None;
    for (i, n) in graph.nodes.iter().enumerate() {
        let uses = n.inputs.iter().filter(|x| *x == value).count();
        if uses > 0 {
            if found.is_some() || uses > 1 {
                return None;
            }
            found = Some(i);
        }
    }
    found
}

fn rename_uses(graph: &mut Graph, from: &str, to: &str) {
    for n in &mut graph.nodes {
        for i in &mut n.inputs {
            if i == from {
                *i = to.to_string();
            }
        }
    }
}

fn remove_identities(
    graph: &mut Graph,
    weights: &HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> usize {
    let mut removed = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let removable = n.op == Op::Identity
            && n.inputs.len() == 1
            && n.outputs.len() == 1
            && !is_output(graph, &n.outputs[0])
            && !protected.contains(&n.outputs[0])
            && (weights.contains_key(&n.inputs[0]) || graph.values.contains_key(&n.inputs[0]));
        if removable {
            let (from, to) = (n.outputs[0].clone(), n.inputs[0].clone());
            graph.nodes.remove(i);
            rename_uses(graph, &from, &to);
            graph.values.remove(&from);
            removed += 1;
        } else {
            i += 1;
        }
    }
    removed
}

fn fold_batchnorm(
    graph: &mut Graph,
    weights: &mut HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> Result<usize> {
    let mut folded = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let Op::BatchNormalization { epsilon } = graph.nodes[i].op else {
            i += 1;
            continue;
        };
        let bn = graph.nodes[i].clone();
        let x = &bn.inputs[0];
        let params: Option<Vec<Tensor>> = bn.inputs[1..]
            .iter()
            .map(|n| weights.get(n).cloned())
            .collect();
        let producer = graph.nodes.iter().position(|n| {
            n.outputs.first() == Some(x)
                && matches!(
                    n.op,
                    Op::Conv {
                        activation: None,
                        residual: false,
                        ..
                    }
                )
        });
        let (Some(params), Some(p)) = (params, producer) else {
            i += 1;
            continue;
        };
        let conv = graph.nodes[p].clone();
        let w = conv.inputs.get(1).and_then(|n| weights.get(n)).cloned();
        let fusable = params.len() == 4
            && sole_consumer(graph, x) == Some(i)
            && !is_output(graph, x)
            && !protected.contains(x);
        let Some(w) = w.filter(|_| fusable) else {
            i += 1;
            continue;
        };
        let (scale, shift, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let m = w.dims()[0];
        let k = (scale / (var + epsilon as f64)?.sqrt()?)?;
        let mut wshape = vec![1usize; w.rank()];
        wshape[0] = m;
        let new_w = w.broadcast_mul(&k.reshape(wshape)?)?;
        let bias = match conv.inputs.get(2).and_then(|n| weights.get(n)) {
            Some(b) => b.clone(),
            None => Tensor::zeros(m, w.dtype(), w.device())?,
        };
        let new_b = ((bias - mean)? * &k)?.add(shift)?;
        let wname = format!("{}::w_bn", conv.name);
        let bname = format!("{}::b_bn", conv.name);
        weights.insert(wname.clone(), new_w);
        weights.insert(bname.clone(), new_b);
        let node = &mut graph.nodes[p];
        node.inputs = vec![conv.inputs[0].clone(), wname, bname];
        node.outputs = bn.outputs.clone();
        graph.values.remove(x);
        graph.nodes.remove(i);
        folded += 1;
    }
    Ok(folded)
}

/// `Add(MatMul(x, W), b)` with `b` a constant over the last axis → `MatMul(x, W, b)`: how
/// exporters write a linear layer on a 3-D input (ViT tokens), so the bias lands in the
/// GEMM's epilogue and a following activation can fuse too.
fn fuse_matmul_bias(
    graph: &mut Graph,
    weights: &HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> usize {
    let mut fused = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        let is_add = is_plain_add(node);
        let found = is_add.then(|| {
            (0..2).find_map(|side| {
                let (x, b) = (&node.inputs[side], &node.inputs[1 - side]);
                let bias = weights.get(b)?;
                let p = graph.nodes[..i].iter().position(|n| {
                    n.outputs.len() == 1
                        && &n.outputs[0] == x
                        && n.inputs.len() == 2
                        && matches!(
                            n.op,
                            Op::MatMul {
                                activation: None,
                                residual: false
                            }
                        )
                })?;
                let out_shape = &graph.values.get(x)?.shape;
                let n = *out_shape.last()?;
                let fits = bias.elem_count() == n
                    && bias.dims().last() == Some(&n)
                    && graph.values.get(&node.outputs[0]).map(|v| &v.shape) == Some(out_shape);
                let ok = fits
                    && sole_consumer(graph, x) == Some(i)
                    && !is_output(graph, x)
                    && !protected.contains(x);
                ok.then(|| (p, x.clone(), b.clone()))
            })
        });
        let Some((p, x, b)) = found.flatten() else {
            i += 1;
            continue;
        };
        graph.nodes[p].inputs.push(b);
        absorb(graph, p, i, &x);
        fused += 1;
    }
    fused
}

/// `Add(Conv(x), r)` → `Conv(x) + r` in the conv's epilogue (a ResNet shortcut), and the same
/// for a linear layer (`MatMul` with constant weights, a transformer's residual stream), when
/// the producer's output feeds only the add, `r` has the output's shape and is ready before
/// the producer runs.
fn fuse_residual_adds(
    graph: &mut Graph,
    weights: &HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> usize {
    let mut fused = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        let is_add = is_plain_add(node);
        if !is_add {
            i += 1;
            continue;
        }
        let shape = |v: &str| graph.values.get(v).map(|info| &info.shape);
        let same_shape = shape(&node.inputs[0]).is_some()
            && shape(&node.inputs[0]) == shape(&node.inputs[1])
            && shape(&node.inputs[0]) == shape(&node.outputs[0]);
        let candidate = (0..2).find_map(|side| {
            let (x, r) = (&node.inputs[side], &node.inputs[1 - side]);
            let p = graph.nodes[..i].iter().position(|n| {
                n.outputs.len() == 1
                    && &n.outputs[0] == x
                    && match n.op {
                        Op::Conv {
                            activation: None,
                            residual: false,
                            ..
                        } => true,
                        // Linear layers (constant weights) only: their kernel has the epilogue.
                        Op::MatMul {
                            activation: None,
                            residual: false,
                        } => n.inputs.get(1).is_some_and(|w| weights.contains_key(w)),
                        _ => false,
                    }
            })?;
            // r must exist before the conv runs: a graph input or an earlier node's output.
            let ready = graph.inputs.iter().any(|inp| &inp.name == r)
                || graph.nodes[..p].iter().any(|n| n.outputs.contains(r));
            let ok = ready
                && sole_consumer(graph, x) == Some(i)
                && !is_output(graph, x)
                && !protected.contains(x);
            ok.then(|| (p, x.clone(), r.clone()))
        });
        let Some((p, x, r)) = candidate.filter(|_| same_shape) else {
            i += 1;
            continue;
        };
        let producer = &mut graph.nodes[p];
        if let Op::Conv { residual, .. } | Op::MatMul { residual, .. } = &mut producer.op {
            *residual = true;
        }
        producer.inputs.push(r);
        absorb(graph, p, i, &x);
        fused += 1;
    }
    fused
}

/// How close a GELU constant must be to its exact value.
const GELU_CONST_TOL: f64 = 1e-6;

/// Replaces exact GELUs that exporters spell out in elementwise nodes (PyTorch's opset-17
/// export of `nn.GELU()`) with one `Gelu { tanh: false }` activation reading `x`:
///
/// ```text
/// d = Div(x, √2) | Mul(x, 1/√2)      e = Erf(d)      a = Add(e, 1)
/// y = Mul(Mul(x, a), 0.5) | Mul(Mul(x, 0.5), a) | Mul(x, Mul(a, 0.5))
/// ```
///
/// Operands of Add and Mul may come in either order. The constants must be single-element
/// float tensors in `weights` within 1e-6 of their exact values. Every intermediate value must
/// feed only the next node of the chain and be neither a graph output nor in `protected`, so
/// nothing else can observe the removed values. Returns how many chains were replaced.
pub fn fuse_gelu(
    graph: &mut Graph,
    weights: &HashMap<String, Tensor>,
    protected: &HashSet<String>,
) -> usize {
    let mut fused = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let Some(chain) = match_gelu(graph, weights, protected, i) else {
            i += 1;
            continue;
        };
        let last = &mut graph.nodes[chain.last];
        last.op = Op::Activation {
            activation: Activation::Gelu { tanh: false },
        };
        last.inputs = vec![chain.x];
        // Every removed node is an ancestor of `last`, hence before it: removing them from
        // the back keeps the remaining indices valid and the order topological.
        let mut removed = chain.removed;
        removed.sort_unstable();
        for &r in removed.iter().rev() {
            graph.nodes.remove(r);
        }
        for v in &chain.intermediates {
            graph.values.remove(v);
        }
        // The chain's first node may precede the Erf; rescan from there.
        i = removed.first().copied().unwrap_or(i);
        fused += 1;
    }
    fused
}

/// A GELU chain found by [`match_gelu`].
struct GeluChain {
    /// The GELU's input.
    x: String,
    /// The node producing the GELU's output, which becomes the activation.
    last: usize,
    /// The other nodes of the chain.
    removed: Vec<usize>,
    /// Values only the chain uses.
    intermediates: Vec<String>,
}

/// The value of a single-element float tensor in `weights`.
fn scalar_weight(weights: &HashMap<String, Tensor>, name: &str) -> Option<f64> {
    let t = weights.get(name)?;
    if t.elem_count() != 1 || !t.dtype().is_float() {
        return None;
    }
    let v = t
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .ok()?;
    v.first().copied()
}

fn is_scalar(weights: &HashMap<String, Tensor>, name: &str, want: f64) -> bool {
    scalar_weight(weights, name).is_some_and(|v| (v - want).abs() <= GELU_CONST_TOL)
}

/// A two-input, one-output `Binary` of `kind` with nothing fused into it.
fn is_plain_binary(node: &Node, kind: BinaryKind) -> bool {
    node.op
        == Op::Binary {
            kind,
            activation: None,
        }
        && node.inputs.len() == 2
        && node.outputs.len() == 1
}

/// The operand of a two-input node other than the scalar constant `want`.
fn operand_beside_scalar<'a>(
    node: &'a Node,
    weights: &HashMap<String, Tensor>,
    want: f64,
) -> Option<&'a String> {
    let [a, b] = node.inputs.as_slice() else {
        return None;
    };
    if is_scalar(weights, b, want) {
        Some(a)
    } else if is_scalar(weights, a, want) {
        Some(b)
    } else {
        None
    }
}

/// The operand of a two-input node other than `value` (which must occur once).
fn other_operand<'a>(node: &'a Node, value: &str) -> Option<&'a String> {
    match node.inputs.as_slice() {
        [a, b] if a == value && b != value => Some(b),
        [a, b] if b == value && a != value => Some(a),
        _ => None,
    }
}

/// The index of the single-output node producing `value`.
fn producer(graph: &Graph, value: &str) -> Option<usize> {
    graph
        .nodes
        .iter()
        .position(|n| n.outputs.len() == 1 && n.outputs[0] == value)
}

/// The GELU chain whose Erf is node `erf`, if the whole chain can be replaced.
fn match_gelu(
    graph: &Graph,
    weights: &HashMap<String, Tensor>,
    protected: &HashSet<String>,
    erf: usize,
) -> Option<GeluChain> {
    use std::f64::consts::{FRAC_1_SQRT_2, SQRT_2};
    let node = &graph.nodes[erf];
    if node.op
        != (Op::Unary {
            kind: UnaryKind::Erf,
        })
        || node.inputs.len() != 1
        || node.outputs.len() != 1
    {
        return None;
    }
    let (d, e) = (&node.inputs[0], &node.outputs[0]);

    let scale_at = producer(graph, d)?;
    let scale = &graph.nodes[scale_at];
    let x = if is_plain_binary(scale, BinaryKind::Div)
        && is_scalar(weights, &scale.inputs[1], SQRT_2)
    {
        &scale.inputs[0]
    } else if is_plain_binary(scale, BinaryKind::Mul) {
        operand_beside_scalar(scale, weights, FRAC_1_SQRT_2)?
    } else {
        return None;
    };

    let add_at = sole_consumer(graph, e)?;
    let add = &graph.nodes[add_at];
    if !is_plain_binary(add, BinaryKind::Add) || operand_beside_scalar(add, weights, 1.0)? != e {
        return None;
    }
    let a = &add.outputs[0];

    let mul_at = sole_consumer(graph, a)?;
    let mul = &graph.nodes[mul_at];
    if !is_plain_binary(mul, BinaryKind::Mul) {
        return None;
    }
    let other = other_operand(mul, a)?;
    let mut removed = vec![scale_at, erf, add_at];
    let mut intermediates = vec![d.clone(), e.clone(), a.clone()];
    let mut consumers = vec![erf, add_at, mul_at];
    let last = if other == x {
        // Mul(Mul(x, a), 0.5)
        let m = &mul.outputs[0];
        let half_at = sole_consumer(graph, m)?;
        let half = &graph.nodes[half_at];
        if !is_plain_binary(half, BinaryKind::Mul)
            || operand_beside_scalar(half, weights, 0.5)? != m
        {
            return None;
        }
        removed.push(mul_at);
        intermediates.push(m.clone());
        consumers.push(half_at);
        half_at
    } else if is_scalar(weights, other, 0.5) {
        // Mul(x, Mul(a, 0.5))
        let h = &mul.outputs[0];
        let outer_at = sole_consumer(graph, h)?;
        if !is_plain_binary(&graph.nodes[outer_at], BinaryKind::Mul)
            || other_operand(&graph.nodes[outer_at], h)? != x
        {
            return None;
        }
        removed.push(mul_at);
        intermediates.push(h.clone());
        consumers.push(outer_at);
        outer_at
    } else {
        // Mul(Mul(x, 0.5), a)
        let half_at = producer(graph, other)?;
        let half = &graph.nodes[half_at];
        if !is_plain_binary(half, BinaryKind::Mul)
            || operand_beside_scalar(half, weights, 0.5)? != x
        {
            return None;
        }
        removed.push(half_at);
        intermediates.push(other.clone());
        consumers.push(mul_at);
        mul_at
    };

    let private = intermediates.iter().zip(&consumers).all(|(v, &c)| {
        sole_consumer(graph, v) == Some(c) && !is_output(graph, v) && !protected.contains(v)
    });
    // A constant of higher rank would broadcast x up; the activation keeps x's shape.
    let y = &graph.nodes[last].outputs[0];
    let same_shape = match (graph.values.get(x), graph.values.get(y)) {
        (Some(xi), Some(yi)) => xi.shape == yi.shape && xi.dtype == yi.dtype && xi.dtype.is_float(),
        _ => false,
    };
    (private && same_shape).then(|| GeluChain {
        x: x.clone(),
        last,
        removed,
        intermediates,
    })
}

fn fuse_activations(graph: &mut Graph, protected: &HashSet<String>) -> usize {
    let mut fused = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let Op::Activation { activation } = graph.nodes[i].op else {
            i += 1;
            continue;
        };
        let x = graph.nodes[i].inputs[0].clone();
        let producer = graph
            .nodes
            .iter()
            .position(|n| n.outputs.len() == 1 && n.outputs[0] == x);
        let ok = producer.is_some()
            && sole_consumer(graph, &x) == Some(i)
            && !is_output(graph, &x)
            && !protected.contains(&x);
        let Some(p) = producer.filter(|_| ok) else {
            i += 1;
            continue;
        };
        let slot = match &mut graph.nodes[p].op {
            Op::Conv { activation: a, .. }
            | Op::Binary { activation: a, .. }
            | Op::MatMul { activation: a, .. }
            | Op::Gemm { activation: a, .. }
                if a.is_none() =>
            {
                a
            }
            _ => {
                i += 1;
                continue;
            }
        };
        *slot = Some(activation);
        absorb(graph, p, i, &x);
        fused += 1;
    }
    fused
}

fn remove_dead(graph: &mut Graph, protected: &HashSet<String>) -> usize {
    let mut removed = 0;
    loop {
        let used: HashSet<String> = graph
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(graph.outputs.iter().map(|o| o.name.clone()))
            .chain(protected.iter().cloned())
            .collect();
        let before = graph.nodes.len();
        graph
            .nodes
            .retain(|n| n.outputs.iter().any(|o| used.contains(o)));
        let now = graph.nodes.len();
        if now == before {
            return removed;
        }
        removed += before - now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{InputSpec, OutputMeaning, OutputSpec, ValueInfo};
    use crate::model::DType;
    use candle_core::Device;
    use std::collections::BTreeMap;

    /// How PyTorch's exporter may order the final multiplications.
    #[derive(Clone, Copy, Debug)]
    enum Shape {
        /// Mul(Mul(x, a), 0.5)
        HalfLast,
        /// Mul(Mul(x, 0.5), a)
        HalfOfX,
        /// Mul(x, Mul(a, 0.5))
        HalfOfA,
    }

    fn bin(name: &str, kind: BinaryKind, a: &str, b: &str, out: &str) -> Node {
        Node {
            name: name.into(),
            op: Op::Binary {
                kind,
                activation: None,
            },
            inputs: vec![a.into(), b.into()],
            outputs: vec![out.into()],
        }
    }

    fn scalar(v: f32) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// `h = MatMul(in, w)`, then a GELU of `h` written as PyTorch exports it, into `out`.
    /// `div` picks Div(x, √2) over Mul(x, 1/√2); `swap` flips every commutative operand pair.
    fn gelu_graph(shape: Shape, div: bool, swap: bool) -> (Graph, HashMap<String, Tensor>) {
        let mut weights = HashMap::new();
        weights.insert(
            "w".to_string(),
            Tensor::arange(0f32, 12.0, &Device::Cpu)
                .unwrap()
                .affine(0.1, -0.6)
                .unwrap()
                .reshape((4, 3))
                .unwrap(),
        );
        weights.insert("sqrt2".into(), scalar(std::f32::consts::SQRT_2));
        weights.insert("inv_sqrt2".into(), scalar(std::f32::consts::FRAC_1_SQRT_2));
        weights.insert("one".into(), scalar(1.0));
        weights.insert("half".into(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
        let c = |a: &str, b: &str| -> (String, String) {
            if swap {
                (b.into(), a.into())
            } else {
                (a.into(), b.into())
            }
        };
        let mut nodes = vec![Node {
            name: "mm".into(),
            op: Op::MatMul {
                activation: None,
                residual: false,
            },
            inputs: vec!["in".into(), "w".into()],
            outputs: vec!["h".into()],
        }];
        nodes.push(if div {
            bin("div", BinaryKind::Div, "h", "sqrt2", "d")
        } else {
            let (a, b) = c("h", "inv_sqrt2");
            bin("scale", BinaryKind::Mul, &a, &b, "d")
        });
        nodes.push(Node {
            name: "erf".into(),
            op: Op::Unary {
                kind: UnaryKind::Erf,
            },
            inputs: vec!["d".into()],
            outputs: vec!["e".into()],
        });
        let (a, b) = c("e", "one");
        nodes.push(bin("add", BinaryKind::Add, &a, &b, "a"));
        match shape {
            Shape::HalfLast => {
                let (a, b) = c("h", "a");
                nodes.push(bin("mul", BinaryKind::Mul, &a, &b, "m"));
                let (a, b) = c("m", "half");
                nodes.push(bin("mul_1", BinaryKind::Mul, &a, &b, "out"));
            }
            Shape::HalfOfX => {
                let (a, b) = c("h", "half");
                nodes.insert(1, bin("hx", BinaryKind::Mul, &a, &b, "hx"));
                let (a, b) = c("hx", "a");
                nodes.push(bin("mul", BinaryKind::Mul, &a, &b, "out"));
            }
            Shape::HalfOfA => {
                let (a, b) = c("a", "half");
                nodes.push(bin("ha", BinaryKind::Mul, &a, &b, "ha"));
                let (a, b) = c("h", "ha");
                nodes.push(bin("mul", BinaryKind::Mul, &a, &b, "out"));
            }
        }
        let info = |shape: Vec<usize>| ValueInfo {
            shape,
            dtype: DType::F32,
        };
        let mut values = BTreeMap::new();
        values.insert("in".to_string(), info(vec![2, 4]));
        for n in &nodes[1..] {
            values.insert(n.outputs[0].clone(), info(vec![2, 3]));
        }
        values.insert("h".to_string(), info(vec![2, 3]));
        let graph = Graph {
            name: "gelu".into(),
            inputs: vec![InputSpec {
                name: "in".into(),
                shape: vec![2, 4],
                dtype: DType::F32,
                preprocess: None,
            }],
            outputs: vec![OutputSpec {
                name: "out".into(),
                meaning: OutputMeaning::Tensor,
            }],
            nodes,
            values,
        };
        (graph, weights)
    }

    /// Runs `graph` node by node on the candle reference ops.
    fn run(graph: &Graph, weights: &HashMap<String, Tensor>, input: &Tensor) -> Tensor {
        let mut env = weights.clone();
        env.insert("in".into(), input.clone());
        for n in &graph.nodes {
            let args: Vec<Tensor> = n.inputs.iter().map(|i| env[i].clone()).collect();
            let outs = crate::exec::ops::eval(&n.op, &args).unwrap();
            for (name, t) in n.outputs.iter().zip(outs) {
                env.insert(name.clone(), t);
            }
        }
        env["out"].clone()
    }

    fn input() -> Tensor {
        Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .affine(0.9, -3.3)
            .unwrap()
            .reshape((2, 4))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn every_export_variant_becomes_one_gelu_fused_into_the_matmul() {
        for shape in [Shape::HalfLast, Shape::HalfOfX, Shape::HalfOfA] {
            for div in [true, false] {
                for swap in [false, true] {
                    let case = format!("{shape:?} div={div} swap={swap}");
                    let (mut graph, mut weights) = gelu_graph(shape, div, swap);
                    let want = run(&graph, &weights, &input());
                    let report = optimize(&mut graph, &mut weights, &HashSet::new()).unwrap();
                    assert_eq!(report.gelu_fused, 1, "{case}");
                    assert_eq!(report.activations_fused, 1, "{case}");
                    assert_eq!(graph.nodes.len(), 1, "{case}: {:?}", graph.nodes);
                    assert_eq!(
                        graph.nodes[0].op,
                        Op::MatMul {
                            activation: Some(Activation::Gelu { tanh: false }),
                            residual: false,
                        },
                        "{case}"
                    );
                    assert_eq!(graph.nodes[0].outputs, vec!["out".to_string()], "{case}");
                    assert_eq!(
                        graph.values.keys().collect::<Vec<_>>(),
                        ["in", "out"],
                        "{case}"
                    );
                    assert_eq!(weights.len(), 1, "{case}: constants kept");
                    graph.validate(|n| weights.contains_key(n)).unwrap();
                    let got = run(&graph, &weights, &input());
                    let d = max_diff(&got, &want);
                    assert!(d < 1e-6, "{case}: differs by {d}");
                }
            }
        }
    }

    fn erf_remains(graph: &Graph) -> bool {
        graph.nodes.iter().any(|n| {
            n.op == Op::Unary {
                kind: UnaryKind::Erf,
            }
        })
    }

    #[test]
    fn observed_intermediates_block_the_fusion() {
        for shape in [Shape::HalfLast, Shape::HalfOfX, Shape::HalfOfA] {
            let (graph, weights) = gelu_graph(shape, true, false);
            let intermediates: Vec<String> = graph.nodes[1..graph.nodes.len() - 1]
                .iter()
                .map(|n| n.outputs[0].clone())
                .collect();
            for v in &intermediates {
                // Protected (a tap).
                let mut g = graph.clone();
                let protected = HashSet::from([v.clone()]);
                assert_eq!(fuse_gelu(&mut g, &weights, &protected), 0, "{shape:?} {v}");
                assert!(erf_remains(&g));
                // A graph output.
                let mut g = graph.clone();
                g.outputs.push(OutputSpec {
                    name: v.clone(),
                    meaning: OutputMeaning::Tensor,
                });
                assert_eq!(
                    fuse_gelu(&mut g, &weights, &HashSet::new()),
                    0,
                    "{shape:?} {v}"
                );
                // Read by another node.
                let mut g = graph.clone();
                g.nodes.push(bin("spy", BinaryKind::Add, v, v, "spy"));
                assert_eq!(
                    fuse_gelu(&mut g, &weights, &HashSet::new()),
                    0,
                    "{shape:?} {v}"
                );
            }
        }
    }

    #[test]
    fn wrong_constants_block_the_fusion() {
        for (name, value) in [
            ("sqrt2", 1.4143f32),
            ("one", 1.0001),
            ("half", 0.5 + 1e-5),
            ("half", 0.25),
        ] {
            let (mut graph, mut weights) = gelu_graph(Shape::HalfLast, true, false);
            weights.insert(name.into(), scalar(value));
            assert_eq!(
                fuse_gelu(&mut graph, &weights, &HashSet::new()),
                0,
                "{name} = {value}"
            );
        }
        // Not a single element: the Div would broadcast.
        let (mut graph, mut weights) = gelu_graph(Shape::HalfLast, true, false);
        weights.insert(
            "sqrt2".into(),
            Tensor::new(&[std::f32::consts::SQRT_2; 3], &Device::Cpu).unwrap(),
        );
        assert_eq!(fuse_gelu(&mut graph, &weights, &HashSet::new()), 0);
        // Div(√2, x) is not x/√2.
        let (mut graph, weights) = gelu_graph(Shape::HalfLast, true, false);
        graph.nodes[1].inputs.swap(0, 1);
        assert_eq!(fuse_gelu(&mut graph, &weights, &HashSet::new()), 0);
    }

    #[test]
    fn a_protected_gelu_input_stays_unfused_but_the_gelu_is_still_recognised() {
        let (mut graph, mut weights) = gelu_graph(Shape::HalfLast, true, false);
        let protected = HashSet::from(["h".to_string()]);
        let report = optimize(&mut graph, &mut weights, &protected).unwrap();
        assert_eq!((report.gelu_fused, report.activations_fused), (1, 0));
        assert_eq!(
            graph.nodes[1].op,
            Op::Activation {
                activation: Activation::Gelu { tanh: false }
            }
        );
        assert_eq!(graph.nodes[1].inputs, vec!["h".to_string()]);
    }
}
