//! Size and cost of a graph: parameters, weight bytes, multiply-accumulates, and the peak
//! activation memory of running it in order with values freed after their last use.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::graph::{Graph, Op};
use crate::model::DType;

/// Summary numbers for `inspect` and benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct GraphStats {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Weight and constant elements.
    pub params: usize,
    /// Bytes those take in storage.
    pub weight_bytes: usize,
    /// Multiply-accumulates of convolutions, matmuls and gemms for one frame.
    pub macs: u64,
    /// Largest sum of live activation bytes at any step (f32 compute).
    pub peak_activation_bytes: usize,
    /// Weight elements by storage dtype.
    pub weight_dtypes: BTreeMap<String, usize>,
    /// Nodes per op.
    pub ops: BTreeMap<String, usize>,
}

/// Computes [`GraphStats`]. `weight` gives the shape and storage dtype of a tensor by name.
pub fn stats(graph: &Graph, weight: impl Fn(&str) -> Option<(Vec<usize>, DType)>) -> GraphStats {
    let mut params = 0;
    let mut weight_bytes = 0;
    let mut weight_dtypes = BTreeMap::new();
    let mut shapes: HashMap<&str, Vec<usize>> = HashMap::new();
    for name in graph.tensor_names() {
        if let Some((shape, dtype)) = weight(&name) {
            let n: usize = shape.iter().product();
            params += n;
            weight_bytes += n * dtype.size();
            *weight_dtypes.entry(dtype.as_str().to_string()).or_insert(0) += n;
        }
    }
    for (name, v) in &graph.values {
        shapes.insert(name.as_str(), v.shape.clone());
    }
    let shape_of = |name: &str| -> Option<Vec<usize>> {
        shapes
            .get(name)
            .cloned()
            .or_else(|| weight(name).map(|(s, _)| s))
    };
    let mut macs: u64 = 0;
    for node in &graph.nodes {
        let out: u64 = node
            .outputs
            .first()
            .and_then(|o| shape_of(o))
            .map(|s| s.iter().product::<usize>() as u64)
            .unwrap_or(0);
        let input = |i: usize| node.inputs.get(i).and_then(|n| shape_of(n));
        macs += match &node.op {
            Op::Conv { .. } => input(1)
                .map(|w| out * w[1..].iter().product::<usize>() as u64)
                .unwrap_or(0),
            Op::ConvTranspose { .. } => match (input(0), input(1)) {
                (Some(x), Some(w)) => {
                    x.iter().product::<usize>() as u64 * w[1..].iter().product::<usize>() as u64
                }
                _ => 0,
            },
            Op::MatMul { .. } => input(0)
                .and_then(|a| a.last().copied())
                .map(|k| out * k as u64)
                .unwrap_or(0),
            Op::Gemm { trans_a, .. } => input(0)
                .map(|a| {
                    let k = if *trans_a { a[0] } else { a[a.len() - 1] };
                    out * k as u64
                })
                .unwrap_or(0),
            _ => 0,
        };
    }
    GraphStats {
        nodes: graph.nodes.len(),
        params,
        weight_bytes,
        macs,
        peak_activation_bytes: peak_activation_bytes(graph),
        weight_dtypes,
        ops: graph.op_histogram(),
    }
}

fn value_bytes(graph: &Graph, name: &str) -> usize {
    graph
        .values
        .get(name)
        .map(|v| {
            let size = if v.dtype.is_float() {
                4
            } else {
                v.dtype.size()
            };
            v.shape.iter().product::<usize>() * size
        })
        .unwrap_or(0)
}

/// Simulates the executor's liveness: inputs live from the start, each value until its last use.
pub fn peak_activation_bytes(graph: &Graph) -> usize {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for x in &n.inputs {
            last.insert(x.as_str(), i);
        }
    }
    let keep = |name: &str| graph.outputs.iter().any(|o| o.name == name);
    let mut live: usize = graph
        .inputs
        .iter()
        .map(|i| value_bytes(graph, &i.name))
        .sum();
    let mut peak = live;
    for (i, n) in graph.nodes.iter().enumerate() {
        live += n
            .outputs
            .iter()
            .map(|o| value_bytes(graph, o))
            .sum::<usize>();
        peak = peak.max(live);
        for x in n.inputs.iter().chain(n.outputs.iter()) {
            if last.get(x.as_str()).copied().unwrap_or(i) == i
                && !keep(x)
                && graph.values.contains_key(x)
            {
                live = live.saturating_sub(value_bytes(graph, x));
                last.insert(x.as_str(), usize::MAX);
            }
        }
    }
    peak
}
