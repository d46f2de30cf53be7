//! Structured channel pruning of a model file.
//!
//! Every value with a channel axis (axis 1) belongs to a *channel space*; the graph decides
//! which spaces must lose the same channels: a residual Add joins its operands' spaces, a
//! depthwise conv and a BatchNorm keep their input's space, GAP → Flatten → Linear carries it
//! into the linear layer's input columns. A Concat's output is a *composite* of its inputs'
//! spaces. Spaces touching a graph input or output, or an op we cannot follow, are frozen.
//! Each free space keeps its most important channels (L1 / L2 norm of the filters producing
//! it, or BatchNorm scale), and every tensor axis in that space is sliced: the file shrinks.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{Error, Result};
use crate::graph::{derived_provenance, BinaryKind, Graph, Op, META_GRAPH, META_PROVENANCE};
use crate::model::{DType, ModelFile, ModelWriter};

/// How channels are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// Sum of |w| of each output filter (summed over every conv producing the space).
    L1,
    /// Euclidean norm of each output filter.
    L2,
    /// |γ| of the BatchNorm on the space (L1 where there is none, e.g. BN folded at export).
    BnScale,
}

impl std::str::FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "l1" => Ok(Criterion::L1),
            "l2" => Ok(Criterion::L2),
            "bn-scale" => Ok(Criterion::BnScale),
            _ => Err(format!("unknown criterion '{s}' (l1, l2, bn-scale)")),
        }
    }
}

/// How the ratio is spread over spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every space loses the same fraction.
    Uniform,
    /// Channels of all spaces are ranked together (importance relative to their space's mean).
    Global,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uniform" => Ok(Scope::Uniform),
            "global" => Ok(Scope::Global),
            _ => Err(format!("unknown scope '{s}' (global, uniform)")),
        }
    }
}

/// Pruning settings.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Fraction of the prunable channels removed (0 ≤ ratio < 1).
    pub ratio: f32,
    /// Ranking.
    pub criterion: Criterion,
    /// Spread.
    pub scope: Scope,
    /// Each pruned width is a multiple of this (1: any width).
    pub round_to: usize,
    /// Spaces kept whole: `first` (the first conv's output), `last` (the last conv's), or
    /// value names.
    pub keep: Vec<String>,
}

/// One channel space's widths, for the provenance and the CLI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Width {
    /// A value in the space (the first one met).
    pub value: String,
    /// Channels before.
    pub before: usize,
    /// Channels after.
    pub after: usize,
}

/// A pruning decision over a graph: which channels each space keeps.
#[derive(Debug)]
pub struct Plan {
    /// Tensor → (axis, kept indices) slices.
    slices: HashMap<String, Vec<(usize, Vec<usize>)>>,
    /// Value → its new channel count.
    widths: HashMap<String, usize>,
    /// Per pruned space.
    pub spaces: Vec<Width>,
    /// Bias tensor → what to add to it (original length) before slicing: the removed input
    /// channels' mean contribution (see [`compensate`]).
    bias_delta: HashMap<String, Vec<f32>>,
}

#[derive(Default)]
struct Spaces {
    parent: Vec<usize>,
    size: Vec<usize>,
    frozen: Vec<bool>,
    composite: HashMap<usize, Vec<usize>>,
}

impl Spaces {
    fn new_space(&mut self, size: usize) -> usize {
        self.parent.push(self.parent.len());
        self.size.push(size);
        self.frozen.push(false);
        self.parent.len() - 1
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn freeze(&mut self, i: usize) {
        let r = self.find(i);
        if self.frozen[r] {
            return;
        }
        self.frozen[r] = true;
        if let Some(members) = self.composite.get(&r).cloned() {
            for m in members {
                self.freeze(m);
            }
        }
    }

    fn union(&mut self, a: usize, b: usize) -> usize {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return ra;
        }
        // A composite's channels are its members'; joining it to another space is beyond us.
        if self.composite.contains_key(&ra)
            || self.composite.contains_key(&rb)
            || self.size[ra] != self.size[rb]
        {
            self.freeze(ra);
            self.freeze(rb);
            return ra;
        }
        let frozen = self.frozen[ra] || self.frozen[rb];
        self.parent[rb] = ra;
        self.frozen[ra] = frozen;
        ra
    }
}

/// What the walk over the graph found.
struct Analysis {
    spaces: Spaces,
    /// value → space.
    of_value: HashMap<String, usize>,
    /// (tensor, axis, space): every tensor axis that lives in a space.
    slots: Vec<(String, usize, usize)>,
    /// (weight, output axis, space): the filters whose norms rank a space.
    producers: Vec<(String, usize, usize)>,
    /// (BatchNorm scale tensor, space).
    bn_scales: Vec<(String, usize)>,
    /// Output spaces of convs in execution order (for `first` / `last`).
    conv_outputs: Vec<usize>,
}

fn shape_of(file: &ModelFile, name: &str) -> Option<Vec<usize>> {
    file.get(name).map(|v| v.info.shape.clone())
}

fn analyse(graph: &Graph, file: &ModelFile) -> Analysis {
    let mut a = Analysis {
        spaces: Spaces::default(),
        of_value: HashMap::new(),
        slots: Vec::new(),
        producers: Vec::new(),
        bn_scales: Vec::new(),
        conv_outputs: Vec::new(),
    };
    let channels = |v: &str| -> Option<usize> {
        let s = &graph.values.get(v)?.shape;
        (s.len() >= 2).then(|| s[1])
    };
    for i in &graph.inputs {
        if i.shape.len() >= 2 {
            let s = a.spaces.new_space(i.shape[1]);
            a.spaces.freeze(s);
            a.of_value.insert(i.name.clone(), s);
        }
    }
    for n in &graph.nodes {
        let x = n.inputs.first().map(String::as_str).unwrap_or("");
        let sx = a.of_value.get(x).copied();
        let out = n.outputs.first().cloned().unwrap_or_default();
        // A node we cannot follow freezes what it touches.
        let mut unknown = false;
        match (&n.op, sx) {
            (Op::Conv { group, .. }, Some(si)) if n.outputs.len() == 1 => {
                let w = &n.inputs[1];
                let ws = shape_of(file, w).unwrap_or_default();
                let cin = a.spaces.size[si];
                if ws.len() < 3 {
                    unknown = true;
                } else if *group == 1 {
                    a.slots.push((w.clone(), 1, si));
                    let so = a.spaces.new_space(ws[0]);
                    a.slots.push((w.clone(), 0, so));
                    if let Some(b) = n.inputs.get(2).filter(|b| !b.is_empty()) {
                        a.slots.push((b.clone(), 0, so));
                    }
                    a.producers.push((w.clone(), 0, so));
                    a.conv_outputs.push(so);
                    a.of_value.insert(out, so);
                } else if *group == cin && ws[0] == cin && ws[1] == 1 {
                    // Depthwise: one filter per input channel, so it keeps the input's space.
                    a.slots.push((w.clone(), 0, si));
                    if let Some(b) = n.inputs.get(2).filter(|b| !b.is_empty()) {
                        a.slots.push((b.clone(), 0, si));
                    }
                    a.conv_outputs.push(si);
                    a.of_value.insert(out, si);
                } else {
                    unknown = true;
                }
            }
            (Op::BatchNormalization { .. }, Some(si)) => {
                for p in &n.inputs[1..] {
                    a.slots.push((p.clone(), 0, si));
                }
                if let Some(scale) = n.inputs.get(1) {
                    a.bn_scales.push((scale.clone(), si));
                }
                a.of_value.insert(out, si);
            }
            (
                Op::Activation { .. }
                | Op::Identity
                | Op::Pool { .. }
                | Op::GlobalPool { .. }
                | Op::Unary { .. },
                Some(si),
            ) if n.outputs.len() == 1 => {
                a.of_value.insert(out, si);
            }
            (Op::Binary { kind, .. }, _) if n.inputs.len() == 2 => {
                let spaces: Vec<Option<usize>> = n
                    .inputs
                    .iter()
                    .map(|i| a.of_value.get(i).copied())
                    .collect();
                let same_shape = graph.values.get(&n.inputs[0]).map(|v| &v.shape)
                    == graph.values.get(&n.inputs[1]).map(|v| &v.shape);
                let scalar_const =
                    |i: &str| shape_of(file, i).is_some_and(|s| s.iter().product::<usize>() == 1);
                match (spaces[0], spaces[1]) {
                    (Some(p), Some(q)) if same_shape => {
                        let r = a.spaces.union(p, q);
                        a.of_value.insert(out, r);
                    }
                    (Some(p), None) if scalar_const(&n.inputs[1]) => {
                        a.of_value.insert(out, p);
                    }
                    (None, Some(q))
                        if scalar_const(&n.inputs[0])
                            && matches!(kind, BinaryKind::Add | BinaryKind::Mul) =>
                    {
                        a.of_value.insert(out, q);
                    }
                    _ => unknown = true,
                }
            }
            (Op::Concat { axis: 1 }, _) => {
                let members: Option<Vec<usize>> = n
                    .inputs
                    .iter()
                    .map(|i| a.of_value.get(i).copied())
                    .collect();
                match members {
                    Some(m) => {
                        let size = m.iter().map(|&s| a.spaces.size[s]).sum();
                        let c = a.spaces.new_space(size);
                        a.spaces.composite.insert(c, m);
                        a.of_value.insert(out, c);
                    }
                    None => unknown = true,
                }
            }
            (
                Op::Resize {
                    sizes,
                    pre,
                    div,
                    post,
                    ..
                },
                Some(si),
            ) => {
                // A spatial resize (an upsampled branch before a Mul or Add with another)
                // keeps the channel axis when it leaves N and C as they are.
                let from = graph
                    .values
                    .get(x)
                    .map(|v| v.shape.clone())
                    .unwrap_or_default();
                let unit = |ax: usize| {
                    div.get(ax) == Some(&1.0)
                        && pre
                            .get(ax)
                            .zip(post.get(ax))
                            .is_some_and(|(p, q)| p + q == 0.0)
                };
                let channels_kept = sizes.len() == 4
                    && from.len() == 4
                    && sizes[..2] == from[..2]
                    && unit(0)
                    && unit(1);
                if channels_kept {
                    a.of_value.insert(out, si);
                } else {
                    unknown = true;
                }
            }
            (Op::Reshape { shape }, Some(si)) => {
                // Flatten after global pooling: [1, C, 1, 1] -> [1, C] keeps the channel axis.
                let from = graph
                    .values
                    .get(x)
                    .map(|v| v.shape.clone())
                    .unwrap_or_default();
                let flat = from.len() >= 2
                    && shape.len() >= 2
                    && from[0] == 1
                    && shape[0] == 1
                    && from[2..].iter().all(|&d| d == 1)
                    && shape[2..].iter().all(|&d| d == 1)
                    && from[1] == shape[1];
                if flat {
                    a.of_value.insert(out, si);
                } else {
                    unknown = true;
                }
            }
            (
                Op::Gemm {
                    trans_a: false,
                    trans_b,
                    ..
                },
                Some(si),
            ) => {
                let w = &n.inputs[1];
                match shape_of(file, w) {
                    Some(ws) if ws.len() == 2 => {
                        let (cin_axis, out_axis) = if *trans_b { (1, 0) } else { (0, 1) };
                        a.slots.push((w.clone(), cin_axis, si));
                        let so = a.spaces.new_space(ws[out_axis]);
                        a.slots.push((w.clone(), out_axis, so));
                        if let Some(b) = n.inputs.get(2).filter(|b| !b.is_empty()) {
                            if shape_of(file, b).is_some_and(|s| s.len() == 1) {
                                a.slots.push((b.clone(), 0, so));
                            } else {
                                a.spaces.freeze(so);
                            }
                        }
                        a.producers.push((w.clone(), out_axis, so));
                        a.of_value.insert(out, so);
                    }
                    _ => unknown = true,
                }
            }
            _ => unknown = true,
        }
        if unknown {
            for i in &n.inputs {
                if let Some(&s) = a.of_value.get(i) {
                    a.spaces.freeze(s);
                }
            }
            for o in &n.outputs {
                if let Some(c) = channels(o) {
                    let s = a.spaces.new_space(c);
                    a.spaces.freeze(s);
                    a.of_value.insert(o.clone(), s);
                }
            }
        }
    }
    for o in &graph.outputs {
        if let Some(&s) = a.of_value.get(&o.name) {
            a.spaces.freeze(s);
        }
    }
    a
}

/// Per-channel norms of `w` along `axis`.
fn filter_norms(file: &ModelFile, w: &str, axis: usize, l2: bool) -> Option<Vec<f64>> {
    let view = file.get(w)?;
    let shape = view.info.shape.clone();
    let vals = view.to_f32_vec().ok()?;
    let n = *shape.get(axis)?;
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![0f64; n];
    for (i, &v) in vals.iter().enumerate() {
        let c = (i / inner.max(1)) % n.max(1);
        out[c] += if l2 {
            (v as f64) * (v as f64)
        } else {
            (v as f64).abs()
        };
    }
    if l2 {
        out.iter_mut().for_each(|x| *x = x.sqrt());
    }
    Some(out)
}

fn round_up(n: usize, to: usize, max: usize) -> usize {
    let to = to.max(1);
    (n.div_ceil(to) * to).clamp(1, max)
}

/// Decides which channels each space keeps.
pub fn plan(graph: &Graph, file: &ModelFile, opts: &PruneOptions) -> Result<Plan> {
    if !(0.0..1.0).contains(&opts.ratio) {
        return Err(Error::InvalidGraph {
            file: file.label().to_string(),
            reason: format!("pruning ratio {} is not in [0, 1)", opts.ratio),
        });
    }
    let mut a = analyse(graph, file);
    for k in &opts.keep {
        let s = match k.as_str() {
            "first" => a.conv_outputs.first().copied(),
            "last" => a.conv_outputs.last().copied(),
            v => Some(*a.of_value.get(v).ok_or_else(|| Error::InvalidGraph {
                file: file.label().to_string(),
                reason: format!("--keep '{v}' is not a value of the graph"),
            })?),
        };
        if let Some(s) = s {
            a.spaces.freeze(s);
        }
    }
    // Importance per free root space.
    let mut importance: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let l2 = opts.criterion == Criterion::L2;
    for (w, axis, s) in a.producers.clone() {
        let r = a.spaces.find(s);
        if a.spaces.frozen[r] || a.spaces.composite.contains_key(&r) {
            continue;
        }
        if let Some(norms) = filter_norms(file, &w, axis, l2) {
            let acc = importance
                .entry(r)
                .or_insert_with(|| vec![0.0; norms.len()]);
            if acc.len() == norms.len() {
                acc.iter_mut().zip(&norms).for_each(|(x, y)| *x += y);
            }
        }
    }
    if opts.criterion == Criterion::BnScale {
        for (scale, s) in a.bn_scales.clone() {
            let r = a.spaces.find(s);
            if let (Some(acc), Some(v)) = (
                importance.get_mut(&r),
                file.get(&scale).and_then(|v| v.to_f32_vec().ok()),
            ) {
                if v.len() == acc.len() {
                    acc.iter_mut()
                        .zip(&v)
                        .for_each(|(x, g)| *x = (*g as f64).abs());
                }
            }
        }
    }
    // How many channels each space keeps.
    let mut keep_n: BTreeMap<usize, usize> = BTreeMap::new();
    match opts.scope {
        Scope::Uniform => {
            for (&r, imp) in &importance {
                let n = imp.len();
                let k = n - ((n as f64 * opts.ratio as f64).floor() as usize).min(n - 1);
                keep_n.insert(r, round_up(k, opts.round_to, n));
            }
        }
        Scope::Global => {
            let mut all: Vec<(f64, usize)> = Vec::new();
            for (&r, imp) in &importance {
                let mean = imp.iter().sum::<f64>() / imp.len().max(1) as f64;
                all.extend(imp.iter().map(|&v| (v / mean.max(1e-30), r)));
            }
            all.sort_by(|x, y| x.0.total_cmp(&y.0));
            let cut = (all.len() as f64 * opts.ratio as f64).floor() as usize;
            let mut removed: BTreeMap<usize, usize> = BTreeMap::new();
            for &(_, r) in &all[..cut] {
                *removed.entry(r).or_default() += 1;
            }
            for (&r, imp) in &importance {
                let n = imp.len();
                let k = n - removed.get(&r).copied().unwrap_or(0).min(n - 1);
                keep_n.insert(r, round_up(k, opts.round_to, n));
            }
        }
    }
    // Kept indices: the most important, in their original order.
    let mut keep: HashMap<usize, Vec<usize>> = HashMap::new();
    for (&r, imp) in &importance {
        let mut order: Vec<usize> = (0..imp.len()).collect();
        order.sort_by(|&x, &y| imp[y].total_cmp(&imp[x]).then(x.cmp(&y)));
        let mut k: Vec<usize> = order[..keep_n[&r]].to_vec();
        k.sort_unstable();
        keep.insert(r, k);
    }
    let mut memo: HashMap<usize, Option<Vec<usize>>> = HashMap::new();
    let mut kept = |s: usize, a: &mut Analysis| kept_of(s, a, &keep, &mut memo);
    let mut slices: HashMap<String, Vec<(usize, Vec<usize>)>> = HashMap::new();
    for (t, axis, s) in a.slots.clone() {
        if let Some(k) = kept(s, &mut a) {
            slices.entry(t).or_default().push((axis, k));
        }
    }
    let mut widths = HashMap::new();
    let mut spaces: BTreeMap<usize, Width> = BTreeMap::new();
    let mut values: Vec<(String, usize)> =
        a.of_value.iter().map(|(v, &s)| (v.clone(), s)).collect();
    values.sort();
    for (v, s) in values {
        if let Some(k) = kept(s, &mut a) {
            let r = a.spaces.find(s);
            widths.insert(v.clone(), k.len());
            if !a.spaces.composite.contains_key(&r) {
                spaces.entry(r).or_insert(Width {
                    value: v,
                    before: a.spaces.size[r],
                    after: k.len(),
                });
            }
        }
    }
    Ok(Plan {
        slices,
        widths,
        spaces: spaces.into_values().collect(),
        bias_delta: HashMap::new(),
    })
}

/// Up to `n` images from `dir` and its sub-folders (e.g. one per class), spread evenly over
/// them in name order, preprocessed for `file`'s input: the data [`compensate`] measures on.
pub fn calibration_images(
    file: &ModelFile,
    dir: &std::path::Path,
    n: usize,
) -> Result<Vec<candle_core::Tensor>> {
    let io = |cause: std::io::Error| Error::Io {
        path: dir.display().to_string(),
        cause,
    };
    let mut inputs = vec![dir.to_path_buf()];
    let mut subdirs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    inputs.extend(subdirs);
    let paths = crate::pipeline::image_paths(&inputs)?;
    let none = |reason: &str| Error::BadInput {
        name: dir.display().to_string(),
        reason: reason.into(),
    };
    if paths.is_empty() || n == 0 {
        return Err(none(
            "no calibration images (png, jpg) in it or its sub-folders",
        ));
    }
    let graph = Graph::from_model_file(file)?;
    let input = match graph.inputs.as_slice() {
        [i] => i,
        _ => return Err(none("calibration feeds single-input models")),
    };
    let n = n.min(paths.len());
    (0..n)
        .map(|i| {
            let p = &paths[i * paths.len() / n];
            let bad = |reason: String| Error::BadInput {
                name: p.display().to_string(),
                reason,
            };
            let img = image::open(p).map_err(|e| bad(e.to_string()))?;
            crate::pipeline::preprocess::image_to_tensor(&img, input, &candle_core::Device::Cpu)
                .map_err(bad)
        })
        .collect()
}

/// A layer that reads a pruned space through its weights' input axis.
struct Consumer {
    input: String,
    weight: String,
    bias: String,
    /// The weight's input-channel axis.
    axis: usize,
    /// Bias delta = `scale` × Σ W·mean (Gemm's alpha ÷ beta; 1 for Conv).
    scale: f32,
}

fn consumers(graph: &Graph, plan: &Plan) -> Vec<Consumer> {
    let mut out = Vec::new();
    for n in &graph.nodes {
        let (axis, scale) = match n.op {
            Op::Conv { group: 1, .. } => (1, 1.0),
            Op::Gemm {
                alpha,
                beta,
                trans_b,
                ..
            } if beta != 0.0 => (usize::from(trans_b), alpha / beta),
            _ => continue,
        };
        let (Some(input), Some(weight), Some(bias)) =
            (n.inputs.first(), n.inputs.get(1), n.inputs.get(2))
        else {
            continue;
        };
        let cut = plan
            .slices
            .get(weight)
            .is_some_and(|c| c.iter().any(|(a, _)| *a == axis));
        if cut {
            out.push(Consumer {
                input: input.clone(),
                weight: weight.clone(),
                bias: bias.clone(),
                axis,
                scale,
            });
        }
    }
    out
}

/// Mean replacement: instead of dropping a removed channel's contribution to the layers that
/// read it, keep its average. Runs the stored graph on `images` (preprocessed input tensors),
/// takes each pruned input channel's mean activation at every Conv / Gemm that reads it, and
/// folds Σ weight × mean into that layer's bias. With BatchNorm folded into the convolutions
/// (as ONNX exports do) a ReLU channel's mean is far from zero, so zeroing it shifts every
/// later layer; this removes the shift. Returns how many layers were compensated.
pub fn compensate(
    plan: &mut Plan,
    graph: &Graph,
    file: &ModelFile,
    images: &[candle_core::Tensor],
) -> Result<usize> {
    let cons = consumers(graph, plan);
    if cons.is_empty() || images.is_empty() {
        return Ok(0);
    }
    let bad = |reason: String| Error::InvalidGraph {
        file: file.label().to_string(),
        reason,
    };
    let input = graph
        .inputs
        .first()
        .map(|i| i.name.clone())
        .ok_or_else(|| bad("the model has no inputs".into()))?;
    let needed: HashSet<&str> = cons.iter().map(|c| c.input.as_str()).collect();
    let weights =
        crate::exec::load_weights(file, &graph.tensor_names(), &candle_core::Device::Cpu)?;
    // Σ over images of each needed value's per-channel mean.
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    for x in images {
        let values = crate::exec::eval_nodes(
            &graph.nodes,
            (input.as_str(), x.clone()),
            |i| weights.get(i).cloned(),
            bad,
        )?;
        for v in &needed {
            let t = values
                .get(v)
                .ok_or_else(|| bad(format!("value '{v}' was not computed")))?;
            if t.rank() < 2 {
                return Err(bad(format!("value '{v}' has shape {:?}", t.dims())));
            }
            let c = t.dim(1)?;
            let m = t
                .to_dtype(candle_core::DType::F32)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((c, ()))?
                .mean(1)?
                .to_vec1::<f32>()?;
            let acc = sums.entry(v.to_string()).or_insert_with(|| vec![0.0; c]);
            acc.iter_mut().zip(&m).for_each(|(a, &b)| *a += b as f64);
        }
    }
    let count = images.len() as f64;
    let mut done = 0;
    for c in &cons {
        let (Some(mean), Some(view)) = (sums.get(&c.input), file.get(&c.weight)) else {
            continue;
        };
        let shape = view.info.shape.clone();
        let w = view.to_f32_vec()?;
        let kept: HashSet<usize> = plan.slices[&c.weight]
            .iter()
            .filter(|(a, _)| *a == c.axis)
            .flat_map(|(_, k)| k.iter().copied())
            .collect();
        let cin = shape.get(c.axis).copied().unwrap_or(0);
        if cin != mean.len() || shape.len() < 2 {
            return Err(bad(format!(
                "'{}' {:?} reads {} channels of '{}'",
                c.weight,
                shape,
                mean.len(),
                c.input
            )));
        }
        // Output channels lie on the other of the first two axes; the rest is the kernel.
        let out_axis = 1 - c.axis;
        let cout = shape[out_axis];
        let inner: usize = shape[2..].iter().product();
        let mut delta = vec![0f32; cout];
        for ci in (0..cin).filter(|i| !kept.contains(i)) {
            let mu = mean[ci] / count;
            for (co, d) in delta.iter_mut().enumerate() {
                let (o, i) = if c.axis == 1 { (co, ci) } else { (ci, co) };
                let base = (o * shape[1] + i) * inner;
                let s: f64 = w[base..base + inner].iter().map(|&v| v as f64).sum();
                *d += (c.scale as f64 * s * mu) as f32;
            }
        }
        let acc = plan
            .bias_delta
            .entry(c.bias.clone())
            .or_insert_with(|| vec![0.0; cout]);
        if acc.len() == cout {
            acc.iter_mut().zip(&delta).for_each(|(a, d)| *a += d);
            done += 1;
        }
    }
    Ok(done)
}

/// The kept indices of space `s`, `None` when it keeps everything.
fn kept_of(
    s: usize,
    a: &mut Analysis,
    keep: &HashMap<usize, Vec<usize>>,
    memo: &mut HashMap<usize, Option<Vec<usize>>>,
) -> Option<Vec<usize>> {
    let r = a.spaces.find(s);
    if let Some(m) = memo.get(&r) {
        return m.clone();
    }
    let result = if let Some(members) = a.spaces.composite.get(&r).cloned() {
        let mut out = Vec::new();
        let mut offset = 0;
        let mut changed = false;
        for m in members {
            let size = a.spaces.size[m];
            match kept_of(m, a, keep, memo) {
                Some(k) => {
                    changed = true;
                    out.extend(k.iter().map(|i| i + offset));
                }
                None => out.extend(offset..offset + size),
            }
            offset += size;
        }
        changed.then_some(out)
    } else {
        keep.get(&r).filter(|k| k.len() < a.spaces.size[r]).cloned()
    };
    memo.insert(r, result.clone());
    result
}

/// Applies `plan`: `zero == false` slices every tensor (the pruned model); `zero == true`
/// keeps every shape and zeroes the removed channels instead (the masked model the pruned
/// one must equal).
pub fn apply(
    graph: &Graph,
    file: &ModelFile,
    plan: &Plan,
    zero: bool,
    provenance: Option<String>,
) -> Result<ModelWriter> {
    let mut g = graph.clone();
    if !zero {
        for (v, info) in g.values.iter_mut() {
            if let Some(&c) = plan.widths.get(v) {
                if info.shape.len() >= 2 {
                    info.shape[1] = c;
                }
            }
        }
        for n in &mut g.nodes {
            let out = n.outputs.first().cloned().unwrap_or_default();
            match &mut n.op {
                Op::Reshape { shape } => {
                    if let Some(&c) = plan.widths.get(&out) {
                        shape[1] = c;
                    }
                }
                Op::Resize { sizes, .. } => {
                    if let Some(&c) = plan.widths.get(&out) {
                        sizes[1] = c;
                    }
                }
                Op::Conv { group, .. } if *group > 1 => {
                    if let Some(&c) = plan.widths.get(&out) {
                        *group = c;
                    }
                }
                _ => {}
            }
        }
    }
    let mut w = ModelWriter::new();
    for (k, v) in file.metadata() {
        w.set_metadata(k.clone(), v.clone());
    }
    let json = serde_json::to_string(&g).map_err(|e| Error::InvalidGraph {
        file: file.label().to_string(),
        reason: e.to_string(),
    })?;
    w.set_metadata(META_GRAPH, json);
    if let Some(p) = provenance {
        w.set_metadata(META_PROVENANCE, p);
    }
    let infos: Vec<_> = file.tensors().cloned().collect();
    for info in infos {
        let view = file.get(&info.name).ok_or_else(|| Error::InvalidGraph {
            file: file.label().to_string(),
            reason: format!("tensor '{}' vanished", info.name),
        })?;
        let delta = plan.bias_delta.get(&info.name);
        let cuts: &[(usize, Vec<usize>)] = match plan.slices.get(&info.name) {
            Some(c) => c,
            None if delta.is_some() => &[],
            None => {
                w.add_tensor(
                    info.name.clone(),
                    info.dtype,
                    info.shape.clone(),
                    view.data.to_vec(),
                )?;
                continue;
            }
        };
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidGraph {
                file: file.label().to_string(),
                reason: format!(
                    "tensor '{}' is {}; prune float models (quantize after pruning)",
                    info.name, info.dtype
                ),
            });
        }
        let mut vals = view.to_f32_vec()?;
        if let Some(d) = delta.filter(|d| d.len() == vals.len()) {
            vals.iter_mut().zip(d).for_each(|(v, d)| *v += d);
        }
        let mut shape = info.shape.clone();
        for (axis, k) in cuts {
            // The graph's channel counts come from the file's header like the tensor's shape;
            // a file where they disagree is refused here, not indexed out of range.
            if *axis >= shape.len() || k.iter().any(|&i| i >= shape[*axis]) {
                return Err(Error::InvalidGraph {
                    file: file.label().to_string(),
                    reason: format!(
                        "tensor '{}' {:?} has fewer channels on axis {axis} than the graph gives its channel group",
                        info.name, shape
                    ),
                });
            }
            (vals, shape) = if zero {
                (zero_axis(&vals, &shape, *axis, k), shape)
            } else {
                slice_axis(&vals, &shape, *axis, k)
            };
        }
        let (_, bytes) = info.dtype.encode_floats(&vals);
        w.add_tensor(info.name.clone(), info.dtype, shape, bytes)?;
    }
    Ok(w)
}

fn slice_axis(
    vals: &[f32],
    shape: &[usize],
    axis: usize,
    keep: &[usize],
) -> (Vec<f32>, Vec<usize>) {
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let start = (o * n + k) * inner;
            out.extend_from_slice(&vals[start..start + inner]);
        }
    }
    let mut s = shape.to_vec();
    s[axis] = keep.len();
    (out, s)
}

fn zero_axis(vals: &[f32], shape: &[usize], axis: usize, keep: &[usize]) -> Vec<f32> {
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut kept = vec![false; n];
    keep.iter().for_each(|&k| kept[k] = true);
    vals.iter()
        .enumerate()
        .map(|(i, &v)| {
            if kept[(i / inner.max(1)) % n.max(1)] {
                v
            } else {
                0.0
            }
        })
        .collect()
}

/// Prunes `file` and returns the new file's writer and the plan (widths per space). The
/// provenance records the parent's hash, the settings and the widths.
pub fn prune(file: &ModelFile, opts: &PruneOptions) -> Result<(ModelWriter, Plan)> {
    prune_calibrated(file, opts, &[])
}

/// [`prune`] with mean replacement ([`compensate`]) measured on `images` (preprocessed input
/// tensors; none: plain pruning).
pub fn prune_calibrated(
    file: &ModelFile,
    opts: &PruneOptions,
    images: &[candle_core::Tensor],
) -> Result<(ModelWriter, Plan)> {
    let graph = Graph::from_model_file(file)?;
    let mut plan = plan(&graph, file, opts)?;
    let compensated = compensate(&mut plan, &graph, file, images)?;
    let record = serde_json::json!({
        "mean_replacement": {"images": images.len(), "layers": compensated},
        // Through f64 from the f32 flag: 0.4, not 0.4000000059604645.
        "ratio": (opts.ratio as f64 * 1e6).round() / 1e6,
        "criterion": format!("{:?}", opts.criterion).to_lowercase(),
        "scope": format!("{:?}", opts.scope).to_lowercase(),
        "round_to": opts.round_to,
        "keep": opts.keep,
        "widths": plan.spaces,
    });
    let prov = derived_provenance(
        file,
        &format!("p{:.0}", opts.ratio * 100.0),
        "pruning",
        record,
    );
    let w = apply(&graph, file, &plan, false, Some(prov))?;
    Ok((w, plan))
}
