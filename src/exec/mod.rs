//! Runs a planned [`Graph`] on a candle [`Device`].
//!
//! The plan resolves every value name to a slot index once, so a frame only indexes vectors.
//! On the CPU with our kernels, every f32 value has a region of one activation arena planned
//! from the values' lifetimes (`arena.rs`): kernels write into it and a frame allocates nothing
//! for its activations. Elsewhere (candle's ops, CUDA, values whose shape the file does not
//! record) values are tensors dropped right after their last consumer, so peak memory follows
//! the graph's liveness either way. Named values can be kept ("taps") for the explain layer.

/// `Display` and `FromStr` for an option enum from its variants' command-line names; a wrong
/// name is an error naming it and the accepted ones.
macro_rules! named_choices {
    ($ty:ident, $what:literal, $expected:literal, { $($v:ident => $name:literal),+ $(,)? }) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $($ty::$v => $name,)+
                })
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($name => Ok($ty::$v),)+
                    other => Err(format!(
                        concat!("unknown ", $what, " '{}' (expected ", $expected, ")"),
                        other
                    )),
                }
            }
        }
    };
}

mod arena;
mod blocked;
#[cfg(feature = "cuda")]
mod cuda;
mod fuse;
pub mod native;
pub mod ops;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::{CpuStorage, DType as CDType, Device, Storage, Tensor};

use arena::ArenaPlan;
pub use blocked::ChannelLayout;
pub use fuse::BlockFusion;
use native::{In, Out, Prepared};
pub use native::{Kernels, Winograd};

use crate::error::{Error, Result};
use crate::graph::{Graph, Op};
use crate::model::{DType, ModelFile};

#[derive(Debug, Clone, Copy)]
enum Ref {
    Slot(usize),
    Weight(usize),
}

struct Step {
    node: usize,
    inputs: Vec<Ref>,
    outputs: Vec<usize>,
    /// Slots whose last use is this step.
    free_after: Vec<usize>,
}

/// How the executor runs on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Our kernels or candle's ops.
    pub kernels: Kernels,
    /// Threads for one frame; `None`: rayon's default (`RAYON_NUM_THREADS`, else one per core).
    pub threads: Option<usize>,
    /// Winograd policy for 3 × 3 stride-1 convolutions (native kernels only).
    pub winograd: Winograd,
    /// Whether inverted residual blocks run as one fused kernel (native kernels only).
    pub fusion: BlockFusion,
    /// Where maps are kept channel-blocked (NCHWc8) between steps (native kernels only).
    pub layout: ChannelLayout,
    /// Element type of float weights and activations. Our CPU kernels compute in f32; f16 and
    /// bf16 run candle's ops (the GPU path, and the CPU reference path that tests it).
    pub compute: crate::board::ComputeDtype,
}

/// A graph planned for one device, with its weights resident there.
pub struct Executor {
    device: Device,
    /// Per step: the node prepared for a native kernel (CPU only).
    prepared: Vec<Option<Prepared>>,
    /// Per step: the fused block that starts there.
    fused: Vec<Option<fuse::Fused>>,
    /// Which values are channel-blocked, and the blocked kernels of the steps that touch them.
    layout: blocked::Plan,
    /// rayon's pool for candle's own ops, when `threads` was given.
    pool: Option<rayon::ThreadPool>,
    /// Our kernels' workers.
    spin: std::sync::Arc<crate::kernels::par::SpinPool>,
    /// Per step: candle's copy of one of its weights was dropped (packed only), so candle's
    /// op cannot stand in for the kernel.
    released: Vec<bool>,
    options: ExecOptions,
    /// Where each f32 value lives in a frame's activation arena (native CPU path).
    arena: ArenaPlan,
    /// Per slot: the planned shape (empty when unknown).
    dims: Vec<Vec<usize>>,
    /// Per slot: shares its producer's input region (a Reshape's output).
    aliased: Vec<bool>,
    /// Arenas of finished frames, for the next ones (one per concurrent frame).
    workspaces: Mutex<Vec<Vec<f32>>>,
    graph: Graph,
    weights: Vec<Tensor>,
    steps: Vec<Step>,
    slots: HashMap<String, usize>,
    inputs: Vec<(String, usize)>,
    outputs: Vec<(String, Ref)>,
}

/// What one run returns.
#[derive(Debug, Default)]
pub struct RunOutputs {
    /// Graph outputs in graph order, by ONNX name.
    pub outputs: Vec<(String, Tensor)>,
    /// Tapped intermediate values by name.
    pub taps: HashMap<String, Tensor>,
}

/// Runs `nodes` in order on candle's ops, which autograd can differentiate (Grad-CAM's tail,
/// fine-tuning), starting from the value `start`; every other input comes from `constant`.
/// Returns the value `output`; `err` turns the name of a missing value into the caller's error.
pub fn run_nodes(
    nodes: &[crate::graph::Node],
    start: (&str, Tensor),
    constant: impl Fn(&str) -> Option<Tensor>,
    output: &str,
    err: impl Fn(String) -> Error,
) -> Result<Tensor> {
    let mut values = eval_nodes(nodes, start, constant, &err)?;
    values
        .remove(output)
        .ok_or_else(|| err(format!("the graph did not produce '{output}'")))
}

/// [`run_nodes`], returning every value computed, by name (for measuring intermediate
/// activations, e.g. pruning's mean replacement).
pub fn eval_nodes<'a>(
    nodes: &'a [crate::graph::Node],
    start: (&'a str, Tensor),
    constant: impl Fn(&str) -> Option<Tensor>,
    err: impl Fn(String) -> Error,
) -> Result<HashMap<&'a str, Tensor>> {
    let mut values: HashMap<&str, Tensor> = HashMap::from([start]);
    for n in nodes {
        let ins = n
            .inputs
            .iter()
            .map(|i| {
                values
                    .get(i.as_str())
                    .cloned()
                    .or_else(|| constant(i))
                    .ok_or_else(|| err(format!("'{i}' is missing")))
            })
            .collect::<Result<Vec<_>>>()?;
        for (name, t) in n.outputs.iter().zip(ops::eval(&n.op, &ins)?) {
            values.insert(name.as_str(), t);
        }
    }
    Ok(values)
}

/// Reads the model file's tensors as candle tensors on `device`. Float weights become f32 (the
/// compute dtype; f16/bf16 storage only halves the file), f64 stays f64, integers keep their type.
pub fn load_weights(
    file: &ModelFile,
    names: &[String],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(names.len());
    for name in names {
        let view = file.get(name).ok_or_else(|| Error::InvalidGraph {
            file: file.label().to_string(),
            reason: format!("missing weight '{name}'"),
        })?;
        if let Some(w) = crate::quant::dequantize(file, &view)? {
            let t = Tensor::from_vec(w, view.info.shape.as_slice(), &Device::Cpu)?;
            out.insert(name.clone(), t.to_device(device)?);
            file.release_tensor(name);
            continue;
        }
        let t = view.to_candle(&Device::Cpu)?;
        let t = match view.info.dtype {
            DType::F16 | DType::BF16 => t.to_dtype(CDType::F32)?,
            _ => t,
        };
        out.insert(name.clone(), t.to_device(device)?);
        // Copied: the mapped bytes need not stay resident beside the copy.
        file.release_tensor(name);
    }
    Ok(out)
}

/// glibc's allocator, tuned for the two phases of a model's life (process-wide; other
/// allocators are untouched).
///
/// Loading allocates and frees each weight's copies once: served by `mmap` (threshold 256 KiB),
/// they go back to the kernel as soon as they are freed, so load never holds two copies of
/// every weight. Frames allocate and free the same activation buffers over and over: by
/// default glibc keeps moving its self-adjusting threshold and a frame's outputs page-fault
/// anew (measured: twice the faults and ~16 % of ViT-Tiny's time), so for frames the heap
/// keeps freed blocks below 64 MiB for reuse.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AllocPhase {
    Load,
    Frames,
}

pub(crate) fn tune_allocator(phase: AllocPhase) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (mmap, trim) = match phase {
            AllocPhase::Load => (256 << 10, 1 << 20),
            AllocPhase::Frames => (64 << 20, 128 << 20),
        };
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = phase;
}

/// Per-op timing of every run, logged at info level, when `EDGEINFER_PROFILE=1`. Each op is
/// timed as it returns, so on a GPU the numbers are launch times, not kernel times.
/// `EDGEINFER_PROFILE=nodes` logs every node's time (with its output shape) instead.
fn profiling() -> bool {
    profile_level() > 0
}

fn profile_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("EDGEINFER_PROFILE").as_deref() {
        Ok("1") => 1,
        Ok("nodes") => 2,
        _ => 0,
    })
}

impl Executor {
    /// Plans `graph` with `weights` (every tensor the graph names) on `device`.
    pub fn new(
        graph: Graph,
        mut weights: HashMap<String, Tensor>,
        device: Device,
        options: ExecOptions,
    ) -> Result<Self> {
        let bad = |reason: String| Error::InvalidGraph {
            file: graph.name.clone(),
            reason,
        };
        let compute = options.compute.candle();
        if compute != CDType::F32 {
            // After the passes: BatchNorm folding and friends ran in f32.
            for t in weights.values_mut() {
                if t.dtype() == CDType::F32 {
                    *t = t.to_dtype(compute)?;
                }
            }
        }
        let mut slots: HashMap<String, usize> = HashMap::new();
        let mut inputs = Vec::new();
        for i in &graph.inputs {
            let id = slots.len();
            slots.insert(i.name.clone(), id);
            inputs.push((i.name.clone(), id));
        }
        let mut weight_ids: HashMap<String, usize> = HashMap::new();
        let mut weight_vec = Vec::new();
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for (n, node) in graph.nodes.iter().enumerate() {
            let mut refs = Vec::with_capacity(node.inputs.len());
            for name in &node.inputs {
                if let Some(&s) = slots.get(name) {
                    refs.push(Ref::Slot(s));
                } else if let Some(&w) = weight_ids.get(name) {
                    refs.push(Ref::Weight(w));
                } else if let Some(t) = weights.remove(name) {
                    let w = weight_vec.len();
                    weight_vec.push(t);
                    weight_ids.insert(name.clone(), w);
                    refs.push(Ref::Weight(w));
                } else {
                    return Err(bad(format!(
                        "node '{}' uses '{}', which is not defined before it",
                        node.name, name
                    )));
                }
            }
            let mut outs = Vec::with_capacity(node.outputs.len());
            for name in &node.outputs {
                let id = slots.len();
                if slots.insert(name.clone(), id).is_some() {
                    return Err(bad(format!("value '{name}' is produced twice")));
                }
                outs.push(id);
            }
            steps.push(Step {
                node: n,
                inputs: refs,
                outputs: outs,
                free_after: Vec::new(),
            });
        }
        let mut outputs = Vec::new();
        for o in &graph.outputs {
            let r = match slots.get(&o.name) {
                Some(&s) => Ref::Slot(s),
                None => return Err(bad(format!("graph output '{}' is never produced", o.name))),
            };
            outputs.push((o.name.clone(), r));
        }
        let pool = match options.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .build()
                    .map_err(|e| bad(format!("cannot start {n} threads: {e}")))?,
            ),
            None => None,
        };
        let spin_threads = match &pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        };
        let spin = std::sync::Arc::new(
            crate::kernels::par::SpinPool::new(spin_threads)
                .map_err(|e| bad(format!("cannot start {spin_threads} threads: {e}")))?,
        );
        let native = device.is_cpu()
            && options.kernels == Kernels::Native
            && options.compute == crate::board::ComputeDtype::F32;

        // Prepared inside the pool: some choices are timed, and must be timed as they will run.
        // Weights that only native kernels read live on packed in `prepared`: candle's copy is
        // dropped as soon as its last user is packed, so load never holds both whole.
        let mut users = vec![0usize; weight_vec.len()];
        for step in &steps {
            for r in &step.inputs {
                if let Ref::Weight(w) = r {
                    users[*w] += 1;
                }
            }
        }
        let mut candle_needs = vec![false; weight_vec.len()];
        let mut released_w = vec![false; weight_vec.len()];
        let prepare = || -> Result<Vec<Option<Prepared>>> {
            let mut prepared = Vec::with_capacity(steps.len());
            for step in &steps {
                let node = &graph.nodes[step.node];
                let info = |i: usize| node.inputs.get(i).and_then(|v| graph.values.get(v));
                let prep = native
                    .then(|| {
                        let constant = |i: usize| match step.inputs.get(i) {
                            Some(Ref::Weight(w)) => weight_vec.get(*w),
                            _ => None,
                        };
                        native::prepare(
                            &node.op,
                            (step.inputs.len(), step.outputs.len()),
                            info,
                            options.winograd,
                            constant,
                        )
                    })
                    .flatten();
                for r in &step.inputs {
                    if let Ref::Weight(w) = r {
                        candle_needs[*w] |= !prep.as_ref().is_some_and(Prepared::owns_weights);
                        users[*w] -= 1;
                        if users[*w] == 0 && !candle_needs[*w] {
                            weight_vec[*w] = Tensor::zeros(0, CDType::F32, &Device::Cpu)?;
                            released_w[*w] = true;
                        }
                    }
                }
                prepared.push(prep);
            }
            Ok(prepared)
        };
        let mut prepared = match &pool {
            Some(p) => p.install(|| spin.install(prepare))?,
            None => spin.install(prepare)?,
        };
        if device.is_cpu() {
            tune_allocator(AllocPhase::Frames);
        }
        let released = steps
            .iter()
            .map(|step| {
                step.inputs
                    .iter()
                    .any(|r| matches!(r, Ref::Weight(w) if released_w[*w]))
            })
            .collect();
        // Every f32 value of known shape computed by a step gets an arena region, alive from
        // its step to its last reader (graph outputs: to the end, they are copied out last).
        let mut dims = vec![Vec::new(); slots.len()];
        let mut sizes = vec![None; slots.len()];
        let mut live = vec![(0, 0); slots.len()];
        for (i, step) in steps.iter().enumerate() {
            let node = &graph.nodes[step.node];
            for (&o, name) in step.outputs.iter().zip(&node.outputs) {
                if let Some(info) = graph.values.get(name) {
                    dims[o] = info.shape.clone();
                    if native && info.dtype == DType::F32 {
                        sizes[o] = Some(info.shape.iter().product());
                    }
                }
                live[o] = (i, i);
            }
            for r in &step.inputs {
                if let Ref::Slot(s) = r {
                    live[*s].1 = i;
                }
            }
        }
        for (_, r) in &outputs {
            if let Ref::Slot(s) = r {
                live[*s].1 = steps.len();
            }
        }
        for (name, s) in &inputs {
            if let Some(info) = graph.values.get(name) {
                dims[*s] = info.shape.clone();
            }
        }
        // A Reshape (or Identity) only renames its input's elements: its output shares the
        // input's region (the pair planned as one value alive as long as either), and the step
        // is skipped while the input is in the arena.
        let mut alias: Vec<Option<usize>> = vec![None; slots.len()];
        for (i, step) in steps.iter().enumerate() {
            let node = &graph.nodes[step.node];
            let renames = matches!(node.op, Op::Reshape { .. } | Op::Identity);
            let (Some(Ref::Slot(src)), [out]) = (step.inputs.first(), step.outputs.as_slice())
            else {
                continue;
            };
            if !renames || step.inputs.len() != 1 || prepared[i].is_none() {
                continue;
            }
            let root = alias[*src].unwrap_or(*src);
            if sizes[root].is_some() && sizes[root] == sizes[*out] {
                alias[*out] = Some(root);
                sizes[*out] = None;
                live[root].1 = live[root].1.max(live[*out].1);
            }
        }
        let outs: HashSet<usize> = outputs
            .iter()
            .filter_map(|(_, r)| match r {
                Ref::Slot(s) => Some(*s),
                Ref::Weight(_) => None,
            })
            .collect();
        let in_arena: Vec<bool> = sizes.iter().map(Option::is_some).collect();
        let no_blocks = vec![None; steps.len()];
        // Channel-blocked steps are planned first and fused blocks only among the others: at
        // 7 × 7 MobileNetV2's blocks ran 0.85–0.90× their channels-last fused time blocked
        // (1 thread, AVX2). Under `BlockFusion::Always` the fused blocks come first instead.
        let blocked_first = native && options.fusion != BlockFusion::Always;
        let mut layout = if blocked_first {
            blocked::plan(
                options.layout,
                &steps,
                &prepared,
                &no_blocks,
                &dims,
                &in_arena,
                &outs,
            )
        } else {
            blocked::Plan::none(slots.len(), steps.len())
        };
        // Fused blocks read their input until their last step writes the output: the two must
        // not share memory.
        let fused = if native {
            let mut uses = vec![0usize; slots.len()];
            for step in &steps {
                for r in &step.inputs {
                    if let Ref::Slot(s) = r {
                        uses[*s] += 1;
                    }
                }
            }
            let taken: Vec<bool> = layout.steps.iter().map(Option::is_some).collect();
            let plan = fuse::plan(
                options.fusion,
                &steps,
                &taken,
                &prepared,
                &dims,
                &uses,
                &outs,
            );
            fuse::make_transposed(&plan, &mut prepared);
            plan
        } else {
            no_blocks
        };
        if native && !blocked_first {
            layout = blocked::plan(
                options.layout,
                &steps,
                &prepared,
                &fused,
                &dims,
                &in_arena,
                &outs,
            );
        }
        for (head, f) in fused.iter().enumerate() {
            if let Some(f) = f {
                let root = alias[f.input].unwrap_or(f.input);
                live[root].1 = live[root].1.max(head + f.len - 1);
            }
        }
        let mut arena = ArenaPlan::new(&sizes, &live);
        for (s, root) in alias.iter().enumerate() {
            if let Some(r) = root {
                arena.regions[s] = arena.regions[*r];
            }
        }
        let mut exec = Executor {
            aliased: alias.iter().map(Option::is_some).collect(),
            arena,
            dims,
            workspaces: Mutex::new(Vec::new()),
            released,
            device,
            prepared,
            fused,
            layout,
            pool,
            spin,
            options,
            graph,
            weights: weight_vec,
            steps,
            slots,
            inputs,
            outputs,
        };
        exec.plan_frees(&HashSet::new());
        Ok(exec)
    }

    /// Recomputes when each slot can be dropped; `keep` slots (outputs, taps) never are.
    fn plan_frees(&mut self, keep: &HashSet<usize>) {
        let mut last: HashMap<usize, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            for r in &step.inputs {
                if let Ref::Slot(s) = r {
                    last.insert(*s, i);
                }
            }
            // An unused output is freed right after it is made.
            for &o in &step.outputs {
                last.entry(o).or_insert(i);
            }
        }
        let outs: HashSet<usize> = self
            .outputs
            .iter()
            .filter_map(|(_, r)| match r {
                Ref::Slot(s) => Some(*s),
                Ref::Weight(_) => None,
            })
            .collect();
        for step in &mut self.steps {
            step.free_after.clear();
        }
        for (slot, i) in last {
            if !outs.contains(&slot) && !keep.contains(&slot) {
                self.steps[i].free_after.push(slot);
            }
        }
    }

    /// The planned graph (after passes).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a value with this name exists in the planned graph (fusion removes some).
    pub fn has_value(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// The options it was planned with.
    pub fn options(&self) -> ExecOptions {
        self.options
    }

    /// How many nodes each native kernel runs ("gemm-conv", "winograd", "depthwise",
    /// "pointwise-c8", ...).
    pub fn kernel_counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        // A step with a blocked kernel runs that one, not its NCHW preparation.
        let names = self
            .prepared
            .iter()
            .zip(&self.layout.steps)
            .filter_map(|(p, b)| {
                b.as_ref()
                    .map(|b| b.kernel_name())
                    .or_else(|| p.as_ref().map(|p| p.kernel_name()))
            });
        for name in names {
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some(c) => c.1 += 1,
                None => counts.push((name, 1)),
            }
        }
        counts
    }

    /// Bytes of one frame's activation arena (0 on candle's path, where values are tensors).
    pub fn arena_bytes(&self) -> usize {
        self.arena.len * std::mem::size_of::<f32>()
    }

    /// How many values have an arena region.
    pub fn arena_values(&self) -> usize {
        self.arena.regions.iter().flatten().count()
    }

    /// How many fused blocks run (each in place of 2 or 3 nodes).
    pub fn fused_blocks(&self) -> usize {
        self.fused.iter().flatten().count()
    }

    /// Values kept channel-blocked (NCHWc8) in the arena.
    pub fn blocked_values(&self) -> usize {
        self.layout.slots.iter().filter(|&&b| b).count()
    }

    /// Steps that run a channel-blocked kernel (they read or write a blocked value).
    pub fn blocked_steps(&self) -> usize {
        self.layout.steps.iter().filter(|s| s.is_some()).count()
    }

    /// How many nodes run on our own kernels (the rest run candle's ops).
    pub fn native_nodes(&self) -> usize {
        self.prepared.iter().filter(|p| p.is_some()).count()
    }

    /// Runs one inference. `feeds` holds one tensor per graph input, by name; `taps` names
    /// intermediate values to return.
    pub fn run(&self, feeds: &[(String, Tensor)], taps: &[String]) -> Result<RunOutputs> {
        let run = || self.spin.install(|| self.run_here(feeds, taps));
        match &self.pool {
            // With our kernels the frame runs on the caller's thread and the spin pool, and
            // candle's ops (the fallbacks) enter rayon's pool one at a time (`eval_op`). A
            // frame run wholly inside rayon's pool left its idle worker searching for work,
            // taking 15–40 % of a core from the spin pool's worker (2 threads, per-thread CPU
            // time sampled over a second).
            Some(pool) if !self.native_cpu() => pool.install(run),
            _ => run(),
        }
    }

    /// Whether frames run our CPU kernels (else candle's ops throughout).
    fn native_cpu(&self) -> bool {
        self.device.is_cpu() && self.options.kernels == Kernels::Native
    }

    /// candle's op for `op`, on this executor's rayon pool when it has one.
    fn eval_op(&self, op: &Op, args: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        match &self.pool {
            Some(pool) if self.native_cpu() => pool.install(|| ops::eval(op, args)),
            _ => ops::eval(op, args),
        }
    }

    fn run_here(&self, feeds: &[(String, Tensor)], taps: &[String]) -> Result<RunOutputs> {
        let mut values: Vec<Option<Tensor>> = vec![None; self.slots.len()];
        for (name, slot) in &self.inputs {
            let t = feeds
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::BadInput {
                    name: name.clone(),
                    reason: "no tensor was given for this graph input".into(),
                })?;
            let spec = self.graph.inputs.iter().find(|i| &i.name == name);
            if let Some(spec) = spec {
                if t.dims() != spec.shape.as_slice() {
                    return Err(Error::BadInput {
                        name: name.clone(),
                        reason: format!("shape {:?}, the model expects {:?}", t.dims(), spec.shape),
                    });
                }
            }
            let compute = self.options.compute.candle();
            let t = if t.dtype() == CDType::F32 && compute != CDType::F32 {
                // On a GPU, upload then cast: one launch there instead of candle's host loop.
                if self.device.is_cpu() {
                    t.to_dtype(compute)?.to_device(&self.device)?
                } else {
                    t.to_device(&self.device)?.to_dtype(compute)?
                }
            } else {
                t.to_device(&self.device)?
            };
            values[*slot] = Some(t);
        }
        for (name, _) in feeds {
            if !self.inputs.iter().any(|(n, _)| n == name) {
                return Err(Error::BadInput {
                    name: name.clone(),
                    reason: format!(
                        "not a graph input (inputs: {})",
                        self.inputs
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        let mut tap_slots = Vec::with_capacity(taps.len());
        for t in taps {
            match self.slots.get(t) {
                Some(&s) => tap_slots.push((t.clone(), s)),
                None => {
                    return Err(Error::BadInput {
                        name: t.clone(),
                        reason: "no value of this name in the planned graph".into(),
                    })
                }
            }
        }
        // The arena of an earlier frame when one is free (frames may run concurrently).
        let mut arena = self
            .workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .filter(|a| a.len() == self.arena.len)
            .unwrap_or_else(|| crate::kernels::pages::zeroed(self.arena.len));
        let result = self.run_steps(&mut arena, values, &tap_slots);
        self.workspaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(arena);
        result
    }

    /// Runs every step with `values` holding the graph inputs. Values with an arena region
    /// live in `arena` while they are `resident`; the others (and any value whose computed
    /// shape or type is not the planned one) live in `values` as tensors.
    fn run_steps(
        &self,
        arena: &mut [f32],
        mut values: Vec<Option<Tensor>>,
        tap_slots: &[(String, usize)],
    ) -> Result<RunOutputs> {
        let n_slots = self.slots.len();
        let mut resident = vec![false; n_slots];
        let base = arena.as_mut_ptr();
        let region = |s: usize| self.arena.regions.get(s).copied().flatten();
        // SAFETY (for `view` and `view_mut` below): regions lie inside the arena (checked by
        // the plan), and values alive at the same step never share memory (`ArenaPlan` checks
        // this pairwise). A step reads its inputs and writes its outputs, all alive at that
        // step, so the slices handed out for one step never alias. No reference into the
        // arena outlives the step that created it.
        let view = |(off, len): (usize, usize)| -> &[f32] {
            unsafe { std::slice::from_raw_parts(base.add(off), len) }
        };
        #[allow(clippy::mut_from_ref)]
        let view_mut = |(off, len): (usize, usize)| -> &mut [f32] {
            unsafe { std::slice::from_raw_parts_mut(base.add(off), len) }
        };
        // Graph inputs are read where the caller's tensors hold them.
        let fed: Vec<(usize, Tensor)> = self
            .inputs
            .iter()
            .filter_map(|(_, s)| Some((*s, values[*s].clone()?)))
            .collect();
        let guards: Vec<(usize, candle_core::StorageRef<'_>, usize, usize)> = fed
            .iter()
            .filter_map(|(s, t)| {
                let (storage, layout) = t.storage_and_layout();
                let (a, b) = layout.contiguous_offsets()?;
                Some((*s, storage, a, b))
            })
            .collect();
        let mut feed: Vec<Option<&[f32]>> = vec![None; n_slots];
        for (s, storage, a, b) in &guards {
            if let Storage::Cpu(CpuStorage::F32(v)) = &**storage {
                feed[*s] = v.get(*a..*b);
            }
        }
        let mut tapped = HashMap::new();
        let mut args: Vec<Tensor> = Vec::new();
        let profile = profiling();
        let mut spent: Vec<(String, f64)> = Vec::new();
        // Per-node lines are logged after the frame: writing them between nodes cost each
        // following node a cold cache (the sum of nodes came out ~15 % above the frame).
        let mut node_lines: Vec<String> = Vec::new();
        // A value as a tensor (copied out of the arena when resident there).
        let materialize =
            |s: usize, values: &[Option<Tensor>], resident: &[bool]| match (resident[s], region(s))
            {
                (true, Some(r)) if self.layout.slots[s] => {
                    let mut v = vec![0f32; r.1];
                    blocked::planar_copy(view(r), &self.dims[s], &mut v)
                        .then(|| Tensor::from_vec(v, self.dims[s].as_slice(), &Device::Cpu).ok())
                        .flatten()
                }
                (true, Some(r)) => {
                    Tensor::from_slice(view(r), self.dims[s].as_slice(), &Device::Cpu).ok()
                }
                _ => values[s].clone(),
            };
        // Blocks with a tapped value inside run step by step.
        let fusable =
            |f: &fuse::Fused| !f.inner.iter().any(|s| tap_slots.iter().any(|t| t.1 == *s));
        // Steps up to here were computed by a fused block.
        let mut fused_until = 0;
        for (si, step) in self.steps.iter().enumerate() {
            let node = &self.graph.nodes[step.node];
            let started = profile.then(std::time::Instant::now);
            // The fused block's length, for the profile.
            let mut fused_len = None;
            let exec_err = |source| Error::Exec {
                node: node.name.clone(),
                op: node.op.name(),
                source: Box::new(source),
            };
            let mut done = si < fused_until;
            if let Some(f) = self.fused[si].as_ref().filter(|f| !done && fusable(f)) {
                let data = |s: usize| match (resident[s], region(s)) {
                    (true, Some(reg)) => Some(view(reg)),
                    _ => feed[s],
                };
                let x = data(f.input);
                let res = f.residual.map(data);
                let steps = &self.prepared[si..si + f.len];
                let ran = match (x, region(f.output), res.is_some_and(|r| r.is_none())) {
                    (Some(x), Some(oreg), false) => {
                        let d = &self.dims[f.input];
                        let (dims, res) = ((d[1], d[2], d[3]), res.flatten());
                        if f.channels_last {
                            fuse::channels_last_block(steps)
                                .map(|b| b.run(x, dims, res, view_mut(oreg)))
                        } else {
                            fuse::block(steps).map(|b| b.run(x, dims, res, view_mut(oreg)))
                        }
                    }
                    _ => None,
                };
                if let Some(ran) = ran {
                    ran.map_err(|e| {
                        exec_err(candle_core::Error::Msg(format!("fused block: {}", e.0)))
                    })?;
                    resident[f.output] = true;
                    values[f.output] = None;
                    fused_until = si + f.len;
                    done = true;
                    fused_len = Some(f.len);
                }
            }
            if let ([Ref::Slot(src)], [out]) = (step.inputs.as_slice(), step.outputs.as_slice()) {
                if self.aliased[*out] && resident[*src] {
                    // The elements are already where the output lives.
                    resident[*out] = true;
                    values[*out] = None;
                    done = true;
                }
            }
            // A step that touches a blocked value runs its blocked kernel or candle's op (on
            // NCHW copies), never the NCHW kernel, which would misread a blocked input.
            let blocked_step = self.layout.steps[si].as_ref();
            if let Some(b) = blocked_step.filter(|_| !done) {
                let data = |s: usize| match (resident[s], region(s)) {
                    (true, Some(reg)) => Some(view(reg)),
                    _ => feed[s].filter(|_| !self.layout.slots[s]),
                };
                let input = |r: Option<&Ref>| match r {
                    Some(&Ref::Slot(s)) => data(s).map(|d| blocked::Input {
                        data: d,
                        dims: &self.dims[s],
                        blocked: self.layout.slots[s],
                    }),
                    _ => None,
                };
                let x = input(step.inputs.first());
                let res = b.residual().then(|| input(step.inputs.last()));
                if let (Some(x), false, [o]) = (
                    x,
                    res.as_ref().is_some_and(Option::is_none),
                    step.outputs.as_slice(),
                ) {
                    if let Some(oreg) = region(*o) {
                        if blocked::run(
                            b,
                            self.prepared[si].as_ref(),
                            x,
                            res.flatten(),
                            view_mut(oreg),
                            &self.dims[*o],
                            self.layout.slots[*o],
                        ) {
                            resident[*o] = true;
                            values[*o] = None;
                            done = true;
                        }
                    }
                }
            }
            if let Some(p) = self.prepared[si]
                .as_ref()
                .filter(|_| !done && blocked_step.is_none())
            {
                // Computed inputs from the arena (or the caller's input), outputs into it.
                let mut ins = [In {
                    data: &[],
                    dims: &[],
                }; 16];
                let mut n_in = 0;
                let mut ready =
                    step.outputs.len() <= 16 && step.outputs.iter().all(|&o| region(o).is_some());
                for r in &step.inputs {
                    let Ref::Slot(s) = *r else { continue };
                    let data = match (resident[s], region(s)) {
                        (true, Some(reg)) => Some(view(reg)),
                        _ => feed[s],
                    };
                    match data {
                        Some(data) if n_in < ins.len() => {
                            ins[n_in] = In {
                                data,
                                dims: &self.dims[s],
                            };
                            n_in += 1;
                        }
                        _ => ready = false,
                    }
                }
                if ready {
                    let mut outs: [Out; 16] = Default::default();
                    for (o, &slot) in outs.iter_mut().zip(&step.outputs) {
                        if let Some(reg) = region(slot) {
                            *o = Out {
                                data: view_mut(reg),
                                dims: &self.dims[slot],
                            };
                        }
                    }
                    let n_out = step.outputs.len();
                    done =
                        native::run_into(p, &ins[..n_in], &mut outs[..n_out]).map_err(exec_err)?;
                    if done {
                        for &o in &step.outputs {
                            resident[o] = true;
                            values[o] = None;
                        }
                    }
                }
            }
            if !done {
                args.clear();
                for r in &step.inputs {
                    let t = match *r {
                        Ref::Weight(w) => Some(self.weights[w].clone()),
                        Ref::Slot(s) => materialize(s, &values, &resident),
                    };
                    args.push(t.ok_or_else(|| Error::InvalidGraph {
                        file: self.graph.name.clone(),
                        reason: format!("node '{}' runs before its input is ready", node.name),
                    })?);
                }
                let results = if self.released[si] {
                    // The packed weights are the only copy left: candle cannot take over, so
                    // the kernel runs on copies of the inputs, or the node fails.
                    self.run_prepared_on_tensors(si, step, &args)
                        .map_err(exec_err)?
                        .ok_or_else(|| Error::Exec {
                            node: node.name.clone(),
                            op: node.op.name(),
                            source: Box::new(candle_core::Error::Msg(format!(
                                "the kernel cannot make the recorded output shape{} {:?} from \
                                 inputs {:?}: the model file's value shapes disagree with its \
                                 weights",
                                if step.outputs.len() > 1 { "s" } else { "" },
                                step.outputs
                                    .iter()
                                    .map(|&o| self.dims[o].clone())
                                    .collect::<Vec<_>>(),
                                args.iter().map(|a| a.dims().to_vec()).collect::<Vec<_>>()
                            ))),
                        })?
                } else {
                    self.eval_op(&node.op, &args).map_err(exec_err)?
                };
                for (&slot, t) in step.outputs.iter().zip(results) {
                    // Into the arena when it is what the plan expected, else kept as is.
                    let fits = region(slot).filter(|_| {
                        t.dtype() == CDType::F32 && t.dims() == self.dims[slot].as_slice()
                    });
                    let copied = match fits {
                        Some(reg) => {
                            let dst = view_mut(reg);
                            native::copy_f32(&t, dst).map_err(exec_err)?
                                && (!self.layout.slots[slot]
                                    || blocked::block_in_place(dst, &self.dims[slot]))
                        }
                        None => false,
                    };
                    resident[slot] = copied;
                    values[slot] = (!copied).then_some(t);
                }
            }
            if let Some(t0) = started {
                let kind = match (fused_len, &self.prepared[si], done) {
                    (Some(len), ..) => format!("Bottleneck[{len}] [fused]"),
                    _ if si < fused_until => "(in a fused block)".to_string(),
                    (None, _, true) if blocked_step.is_some() => format!(
                        "{} [{}]",
                        node.op.name(),
                        blocked_step.map_or("", |b| b.kernel_name())
                    ),
                    (None, Some(p), true) => format!("{} [{}]", node.op.name(), p.kernel_name()),
                    _ => node.op.name(),
                };
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                if profile_level() == 2 {
                    let shape = step
                        .outputs
                        .first()
                        .map(|&o| self.dims[o].clone())
                        .unwrap_or_default();
                    node_lines.push(format!(
                        "node {} {kind} -> {shape:?}: {ms:.3} ms",
                        node.name
                    ));
                }
                match spent.iter_mut().find(|(k, _)| *k == kind) {
                    Some(e) => e.1 += ms,
                    None => spent.push((kind, ms)),
                }
            }
            for (name, s) in tap_slots {
                if step.outputs.contains(s) {
                    if let Some(t) = materialize(*s, &values, &resident) {
                        tapped.insert(name.clone(), t);
                    }
                }
            }
            for &s in &step.free_after {
                values[s] = None;
                resident[s] = false;
            }
        }
        for (name, s) in tap_slots {
            if !tapped.contains_key(name) {
                // Graph inputs: never produced by a step.
                if let Some(t) = materialize(*s, &values, &resident) {
                    tapped.insert(name.clone(), t);
                }
            }
        }
        for line in &node_lines {
            tracing::info!("{line}");
        }
        if profile {
            spent.sort_by(|a, b| b.1.total_cmp(&a.1));
            let total: f64 = spent.iter().map(|(_, ms)| ms).sum();
            let parts: Vec<String> = spent.iter().map(|(k, ms)| format!("{k} {ms:.2}")).collect();
            tracing::info!("profile: {total:.2} ms: {}", parts.join(", "));
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (name, r) in &self.outputs {
            let t = match r {
                Ref::Slot(s) => materialize(*s, &values, &resident),
                Ref::Weight(w) => Some(self.weights[*w].clone()),
            }
            .ok_or_else(|| Error::InvalidGraph {
                file: self.graph.name.clone(),
                reason: format!("output '{name}' was not computed"),
            })?;
            outputs.push((name.clone(), t.to_device(&self.device)?));
        }
        drop(guards);
        Ok(RunOutputs {
            outputs,
            taps: tapped,
        })
    }

    /// A prepared node's kernel on copies of its inputs, into new tensors of the planned
    /// output shapes; `Ok(None)` when the kernel does not take them.
    fn run_prepared_on_tensors(
        &self,
        si: usize,
        step: &Step,
        args: &[Tensor],
    ) -> candle_core::Result<Option<Vec<Tensor>>> {
        let Some(p) = &self.prepared[si] else {
            return Ok(None);
        };
        let mut data = Vec::new();
        let mut dims = Vec::new();
        for (r, t) in step.inputs.iter().zip(args) {
            if let Ref::Slot(_) = r {
                if t.dtype() != CDType::F32 {
                    return Ok(None);
                }
                data.push(t.flatten_all()?.to_vec1::<f32>()?);
                dims.push(t.dims().to_vec());
            }
        }
        let ins: Vec<In> = data
            .iter()
            .zip(&dims)
            .map(|(d, s)| In { data: d, dims: s })
            .collect();
        let mut bufs: Vec<Vec<f32>> = step
            .outputs
            .iter()
            .map(|&o| vec![0f32; self.dims[o].iter().product()])
            .collect();
        if step.outputs.iter().any(|&o| self.dims[o].is_empty()) {
            return Ok(None);
        }
        let mut outs: Vec<Out> = bufs
            .iter_mut()
            .zip(&step.outputs)
            .map(|(b, &o)| Out {
                data: b,
                dims: &self.dims[o],
            })
            .collect();
        if !native::run_into(p, &ins, &mut outs)? {
            return Ok(None);
        }
        drop(outs);
        bufs.into_iter()
            .zip(&step.outputs)
            .map(|(b, &o)| Tensor::from_vec(b, self.dims[o].as_slice(), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }

    /// Number of nodes of each kind that will run.
    pub fn node_count(&self) -> usize {
        self.graph.nodes.len()
    }

    /// True when a node of this op kind is in the plan (used by tests of the passes).
    pub fn contains_op(&self, pred: impl Fn(&Op) -> bool) -> bool {
        self.graph.nodes.iter().any(|n| pred(&n.op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BinaryKind, InputSpec, Node, OutputMeaning, OutputSpec, ValueInfo};

    fn node(name: &str, op: Op, inputs: &[&str], output: &str) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.into()],
        }
    }

    /// A graph with one f32 input `in`, the given nodes, f32 values of the given shapes (the
    /// input's first) and outputs.
    fn graph(nodes: Vec<Node>, values: &[(&str, Vec<usize>)], outputs: &[&str]) -> Graph {
        Graph {
            name: "test".into(),
            inputs: vec![InputSpec {
                name: "in".into(),
                shape: values[0].1.clone(),
                dtype: DType::F32,
                preprocess: None,
            }],
            outputs: outputs
                .iter()
                .map(|n| OutputSpec {
                    name: n.to_string(),
                    meaning: OutputMeaning::Tensor,
                })
                .collect(),
            nodes,
            values: values
                .iter()
                .map(|(n, shape)| {
                    let info = ValueInfo {
                        shape: shape.clone(),
                        dtype: DType::F32,
                    };
                    (n.to_string(), info)
                })
                .collect(),
        }
    }

    fn binary(kind: BinaryKind) -> Op {
        Op::Binary {
            kind,
            activation: None,
        }
    }

    fn two() -> HashMap<String, Tensor> {
        [(
            "two".to_string(),
            Tensor::new(&[2f32], &Device::Cpu).unwrap(),
        )]
        .into()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Reshapes share their input's arena region: values read after the reshape (its input,
    /// a reshape of a transpose, a reshape that is a graph output or a tap) keep their
    /// contents, on our kernels exactly as on candle's.
    #[test]
    fn reshapes_alias_their_input_and_nothing_is_overwritten() {
        let nodes = vec![
            node("a", binary(BinaryKind::Mul), &["in", "two"], "a"),
            node("b", Op::Reshape { shape: vec![3, 4] }, &["a"], "b"),
            node("c", Op::Transpose { perm: vec![1, 0] }, &["b"], "c"),
            node("d", Op::Reshape { shape: vec![2, 6] }, &["c"], "d"),
            node("e", binary(BinaryKind::Add), &["d", "a"], "out"),
        ];
        let values = [
            ("in", vec![2, 6]),
            ("a", vec![2, 6]),
            ("b", vec![3, 4]),
            ("c", vec![4, 3]),
            ("d", vec![2, 6]),
            ("out", vec![2, 6]),
        ];
        let graph = graph(nodes, &values, &["out", "b"]);
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 6))
            .unwrap();
        let mut results = Vec::new();
        for kernels in [Kernels::Native, Kernels::Candle] {
            let options = ExecOptions {
                kernels,
                ..Default::default()
            };
            let exec = Executor::new(graph.clone(), two(), Device::Cpu, options).unwrap();
            if kernels == Kernels::Native {
                assert_eq!(exec.native_nodes(), 5);
                assert_eq!(
                    exec.arena_values(),
                    5,
                    "every value but the input is planned"
                );
            }
            let run = exec
                .run(&[("in".into(), x.clone())], &["b".into(), "c".into()])
                .unwrap();
            let mut got: Vec<Vec<f32>> = run.outputs.iter().map(|(_, t)| flat(t)).collect();
            got.push(flat(&run.taps["b"]));
            got.push(flat(&run.taps["c"]));
            results.push(got);
        }
        // By hand: a = 2x; d = reshape(transpose(reshape(a, 3×4)), 2×6); out = d + a.
        let a: Vec<f32> = (0..12).map(|i| 2.0 * i as f32).collect();
        let c: Vec<f32> = (0..12).map(|i| a[(i % 3) * 4 + i / 3]).collect();
        let out: Vec<f32> = (0..12).map(|i| c[i] + a[i]).collect();
        let want = vec![out, a.clone(), a, c];
        assert_eq!(results[0], want, "native");
        assert_eq!(results[1], want, "candle");
    }

    /// A file whose recorded value shapes are wrong must not corrupt the arena: kernels that
    /// see a different shape decline, candle's op runs, and its result stays a tensor.
    #[test]
    fn a_wrong_recorded_shape_falls_back_and_still_answers() {
        for lie in [vec![2, 7], vec![3, 4], vec![100]] {
            let nodes = vec![
                node("a", binary(BinaryKind::Mul), &["in", "two"], "a"),
                node("b", binary(BinaryKind::Mul), &["a", "two"], "out"),
            ];
            let values = [("in", vec![2, 6]), ("a", lie.clone()), ("out", vec![2, 6])];
            let graph = graph(nodes, &values, &["out"]);
            let exec = Executor::new(graph, two(), Device::Cpu, ExecOptions::default()).unwrap();
            let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 6))
                .unwrap();
            let out = exec.run(&[("in".into(), x)], &[]).unwrap();
            let want: Vec<f32> = (0..12).map(|i| 4.0 * i as f32).collect();
            assert_eq!(flat(&out.outputs[0].1), want, "recorded shape {lie:?}");
        }
    }

    /// Seeded random weights of the given names and shapes.
    fn random_weights(shapes: &[(&str, &[usize])], seed: u64) -> HashMap<String, Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (n, shape))| {
                let v = crate::kernels::testutil::rand(shape.iter().product(), seed + i as u64);
                let t = Tensor::from_vec(v, *shape, &Device::Cpu).unwrap();
                (n.to_string(), t)
            })
            .collect()
    }

    /// A downsampling bottleneck (1 × 1 reduce, depthwise and dense 3 × 3 at stride 2, 1 × 1
    /// expand, a strided 1 × 1 shortcut with the residual add, global pooling): with the
    /// blocked layout forced, the pointwise, depthwise and pooling steps pass blocked maps,
    /// the dense 3 × 3 reads and writes NCHW between them, and the output and a tap inside
    /// the blocked region match candle's ops.
    #[test]
    fn blocked_regions_match_candle_around_a_planar_convolution() {
        let conv = |stride: usize, pad: usize, group: usize, residual: bool| Op::Conv {
            strides: vec![stride; 2],
            pads: vec![pad; 4],
            dilations: vec![1, 1],
            group,
            activation: Some(crate::graph::Activation::Relu),
            residual,
        };
        let nodes = vec![
            node("reduce", conv(1, 0, 1, false), &["in", "w1", "b1"], "r"),
            node("dw", conv(1, 1, 16, false), &["r", "wd", "bd"], "d"),
            node("c3x3", conv(2, 1, 1, false), &["d", "w2"], "m"),
            node("expand", conv(1, 0, 1, false), &["m", "w3", "b3"], "e"),
            node("short", conv(2, 0, 1, true), &["in", "w4", "b4", "e"], "s"),
            node(
                "pool",
                Op::GlobalPool {
                    kind: crate::graph::PoolKind::Avg,
                },
                &["s"],
                "out",
            ),
        ];
        let values = [
            ("in", vec![1, 24, 11, 9]),
            ("r", vec![1, 16, 11, 9]),
            ("d", vec![1, 16, 11, 9]),
            ("m", vec![1, 16, 6, 5]),
            ("e", vec![1, 40, 6, 5]),
            ("s", vec![1, 40, 6, 5]),
            ("out", vec![1, 40, 1, 1]),
        ];
        let weights = || {
            random_weights(
                &[
                    ("w1", &[16, 24, 1, 1]),
                    ("b1", &[16]),
                    ("wd", &[16, 1, 3, 3]),
                    ("bd", &[16]),
                    ("w2", &[16, 16, 3, 3]),
                    ("w3", &[40, 16, 1, 1]),
                    ("b3", &[40]),
                    ("w4", &[40, 24, 1, 1]),
                    ("b4", &[40]),
                ],
                40,
            )
        };
        let run = |kernels: Kernels| {
            let options = ExecOptions {
                kernels,
                layout: ChannelLayout::Blocked,
                ..ExecOptions::default()
            };
            let g = graph(nodes.clone(), &values, &["out"]);
            let exec = Executor::new(g, weights(), Device::Cpu, options).unwrap();
            let x = Tensor::from_vec(
                crate::kernels::testutil::rand(24 * 11 * 9, 3),
                (1, 24, 11, 9),
                &Device::Cpu,
            )
            .unwrap();
            let out = exec.run(&[("in".into(), x)], &["e".to_string()]).unwrap();
            (exec, flat(&out.outputs[0].1), flat(&out.taps["e"]))
        };
        let (native, got, got_tap) = run(Kernels::Native);
        let (_, want, want_tap) = run(Kernels::Candle);
        // r (reduce → depthwise), e (expand → the shortcut's residual) and s (→ pooling); d
        // feeds the dense 3 × 3 and stays NCHW, as does the input. Where the 3 × 3 runs by
        // taps (x86 with AVX2) it writes m blocked too.
        let dense = native
            .kernel_counts()
            .iter()
            .any(|(k, n)| *k == "taps-c8" && *n == 1);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            dense,
            crate::kernels::gemm::Isa::detect() != crate::kernels::gemm::Isa::Portable
        );
        assert_eq!(native.blocked_values(), 3 + usize::from(dense));
        assert_eq!(native.blocked_steps(), 5 + usize::from(dense));
        for (g, w) in got.iter().zip(&want).chain(got_tap.iter().zip(&want_tap)) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// A dense 3 × 3 convolution (by taps on x86) that adds a blocked residual and writes a
    /// blocked output, against candle's ops.
    #[test]
    fn a_dense_step_adds_a_blocked_residual() {
        let conv = |k: usize, residual: bool| Op::Conv {
            strides: vec![1, 1],
            pads: vec![k / 2; 4],
            dilations: vec![1, 1],
            group: 1,
            activation: Some(crate::graph::Activation::Relu),
            residual,
        };
        // 32 output channels: whole vectors of the by-taps kernel on AVX-512 (16 lanes) and
        // AVX2 (8), which alone writes blocked.
        let nodes = vec![
            node("pw", conv(1, false), &["in", "w1"], "p"),
            node("dense", conv(3, true), &["in", "w2", "b2", "p"], "q"),
            node(
                "pool",
                Op::GlobalPool {
                    kind: crate::graph::PoolKind::Max,
                },
                &["q"],
                "out",
            ),
        ];
        let values = [
            ("in", vec![1, 16, 7, 9]),
            ("p", vec![1, 32, 7, 9]),
            ("q", vec![1, 32, 7, 9]),
            ("out", vec![1, 32, 1, 1]),
        ];
        let weights = || {
            random_weights(
                &[
                    ("w1", &[32, 16, 1, 1]),
                    ("w2", &[32, 16, 3, 3]),
                    ("b2", &[32]),
                ],
                70,
            )
        };
        let x = Tensor::from_vec(
            crate::kernels::testutil::rand(16 * 7 * 9, 5),
            (1, 16, 7, 9),
            &Device::Cpu,
        )
        .unwrap();
        let run = |kernels: Kernels| {
            let options = ExecOptions {
                kernels,
                layout: ChannelLayout::Blocked,
                ..ExecOptions::default()
            };
            let g = graph(nodes.clone(), &values, &["out"]);
            let exec = Executor::new(g, weights(), Device::Cpu, options).unwrap();
            let out = exec.run(&[("in".into(), x.clone())], &[]).unwrap();
            (exec.blocked_values(), flat(&out.outputs[0].1))
        };
        let (blocked, got) = run(Kernels::Native);
        let (_, want) = run(Kernels::Candle);
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::gemm::Isa::detect() != crate::kernels::gemm::Isa::Portable {
            assert_eq!(blocked, 2, "p and q");
        }
        let _ = blocked;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// A convolution keeps only its packed weights, so candle cannot stand in: a recorded
    /// output shape the kernel cannot make is an error saying so, not a panic.
    #[test]
    fn a_wrong_recorded_conv_shape_is_a_clear_error() {
        let conv = Op::Conv {
            strides: vec![1, 1],
            pads: vec![1; 4],
            dilations: vec![1, 1],
            group: 1,
            activation: None,
            residual: false,
        };
        let nodes = vec![node("conv", conv, &["in", "w"], "out")];
        let values = [("in", vec![1, 2, 5, 5]), ("out", vec![1, 3, 4, 4])];
        let graph = graph(nodes, &values, &["out"]);
        let w = Tensor::ones((3, 2, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let weights = [("w".to_string(), w)].into();
        let exec = Executor::new(graph, weights, Device::Cpu, ExecOptions::default()).unwrap();
        let x = Tensor::ones((1, 2, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = exec.run(&[("in".into(), x)], &[]).unwrap_err().to_string();
        assert!(err.contains("conv") && err.contains("disagree"), "{err}");
    }
}
