//! Load-time graph passes: BatchNorm folding, activation fusion, identity and dead-node
//! removal. They run on the loaded weights, so the file keeps the graph as imported (what
//! `inspect` shows as "before") and f16 storage is folded in f32.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;
use crate::graph::{BinaryKind, Graph, Op};

/// What the passes changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    /// BatchNormalization nodes folded into the preceding convolution.
    pub batchnorm_folded: usize,
    /// Residual adds fused into the convolution producing one of their inputs.
    pub residuals_fused: usize,
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
    report.residuals_fused = fuse_residual_adds(graph, protected);
    report.activations_fused = fuse_activations(graph, protected);
    report.dead_removed = remove_dead(graph, protected);
    weights.retain(|name, _| graph.nodes.iter().any(|n| n.inputs.contains(name)));
    Ok(report)
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

/// `Add(Conv(x), r)` → `Conv(x) + r` in the conv's epilogue, when the conv output feeds only
/// the add, `r` has the output's shape and is ready before the conv runs (a ResNet shortcut).
fn fuse_residual_adds(graph: &mut Graph, protected: &HashSet<String>) -> usize {
    let mut fused = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        let is_add = matches!(
            node.op,
            Op::Binary {
                kind: BinaryKind::Add,
                activation: None
            }
        ) && node.inputs.len() == 2
            && node.outputs.len() == 1;
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
                    && matches!(
                        n.op,
                        Op::Conv {
                            activation: None,
                            residual: false,
                            ..
                        }
                    )
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
        let out = graph.nodes[i].outputs.clone();
        let conv = &mut graph.nodes[p];
        if let Op::Conv { residual, .. } = &mut conv.op {
            *residual = true;
        }
        conv.inputs.push(r);
        conv.outputs = out;
        graph.values.remove(&x);
        graph.nodes.remove(i);
        fused += 1;
    }
    fused
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
            | Op::MatMul { activation: a }
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
        graph.nodes[p].outputs = graph.nodes[i].outputs.clone();
        graph.values.remove(&x);
        graph.nodes.remove(i);
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
