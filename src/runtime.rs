//! The runtime a camera app embeds: a loaded, optimised model on a chosen device that turns
//! frames into [`FrameReport`]s. `Runtime` is `Send + Sync`; one instance serves many threads.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType as CDType, Tensor};

use crate::board::{Board, ComputeDtype};
use crate::budget::{FrameTimer, Stage};
use crate::device::{self, DeviceChoice, DeviceRequest};
use crate::error::{Error, Result};
use crate::exec::{
    load_weights, BlockFusion, ChannelLayout, ExecOptions, Executor, Kernels, RunOutputs, Winograd,
};
use crate::explain::{Choice, ExplainOptions, Explainer, Explanation};
use crate::graph::passes::{optimize, PassReport};
use crate::graph::stats::stats;
use crate::graph::{Graph, OutputMeaning, META_LABELS, META_PROVENANCE};
use crate::model::ModelFile;
use crate::pipeline::preprocess::{image_to_tensor, InputGeometry};
use crate::pipeline::Frame;
use crate::report::{FrameReport, OutputSummary, TopClass, Verdict};

/// Where the model comes from.
#[derive(Debug, Clone)]
enum ModelSource {
    Path(PathBuf),
    Static(&'static [u8], String),
}

/// Builds a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    source: Option<ModelSource>,
    /// Devices in order of preference (one, unless a board profile lists several).
    devices: Vec<DeviceRequest>,
    board: Option<Board>,
    budget: Duration,
    top_k: usize,
    taps: Vec<String>,
    optimize: bool,
    exec: ExecOptions,
    explain: ExplainOptions,
    variant: Option<String>,
    /// Asked for explicitly (applies on any device).
    compute: Option<ComputeDtype>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        RuntimeBuilder {
            source: None,
            devices: vec![DeviceRequest::Auto],
            board: None,
            budget: Duration::from_millis(200),
            top_k: 5,
            taps: Vec::new(),
            optimize: true,
            exec: ExecOptions::default(),
            explain: ExplainOptions::default(),
            variant: None,
            compute: None,
        }
    }
}

impl RuntimeBuilder {
    /// Loads the model from a file (memory-mapped).
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.source = Some(ModelSource::Path(path.into()));
        self
    }

    /// Loads the model from bytes compiled into the binary.
    pub fn model_bytes(mut self, bytes: &'static [u8], label: impl Into<String>) -> Self {
        self.source = Some(ModelSource::Static(bytes, label.into()));
        self
    }

    /// Device preference (overrides a board profile's list when called after [`Self::board`]).
    pub fn device(mut self, device: DeviceRequest) -> Self {
        self.devices = vec![device];
        self
    }

    /// Applies a board profile: its device preference, CPU threads and frame budget (calls
    /// after this one override them), and its memory budget, which `build` checks the model
    /// against before loading it.
    pub fn board(mut self, board: Board) -> Self {
        self.devices = board.device_requests();
        self.exec.threads = Some(board.cpu_threads);
        self.budget = Duration::from_secs_f64(board.budget_ms / 1e3);
        self.board = Some(board);
        self
    }

    /// Element type to compute in, on any device (f16/bf16 on the CPU run candle's reference
    /// ops, much slower than our f32 kernels: for checking the GPU path, not for speed).
    /// Without it, a board profile's `compute_dtype` applies on GPUs and the CPU computes f32.
    pub fn compute_dtype(mut self, dtype: ComputeDtype) -> Self {
        self.compute = Some(dtype);
        self
    }

    /// Per-frame latency budget.
    pub fn budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// How many classes reports list.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Intermediate values to keep available (they survive fusion).
    pub fn taps(mut self, taps: impl IntoIterator<Item = String>) -> Self {
        self.taps.extend(taps);
        self
    }

    /// Explain every frame (method, target class / layer, threshold); off by default.
    pub fn explain(mut self, options: ExplainOptions) -> Self {
        self.explain = options;
        self
    }

    /// The variant name reports carry (default: the file's provenance `variant`, else `base`).
    pub fn variant(mut self, name: impl Into<String>) -> Self {
        self.variant = Some(name.into());
        self
    }

    /// Run the load-time graph passes (on by default; off runs the graph as imported).
    pub fn optimize(mut self, on: bool) -> Self {
        self.optimize = on;
        self
    }

    /// CPU kernels: our own (default) or candle's reference ops.
    pub fn kernels(mut self, kernels: Kernels) -> Self {
        self.exec.kernels = kernels;
        self
    }

    /// Winograd policy for 3 × 3 stride-1 convolutions (default: measured per layer at load).
    pub fn winograd(mut self, policy: Winograd) -> Self {
        self.exec.winograd = policy;
        self
    }

    /// Whether inverted residual blocks run fused (default: small maps, channels-last; see
    /// [`BlockFusion`]).
    pub fn fusion(mut self, policy: BlockFusion) -> Self {
        self.exec.fusion = policy;
        self
    }

    /// Where maps are kept channel-blocked (default: [`ChannelLayout::Auto`]).
    pub fn layout(mut self, policy: ChannelLayout) -> Self {
        self.exec.layout = policy;
        self
    }

    /// Threads per frame (default: rayon's, i.e. `RAYON_NUM_THREADS` or one per core).
    pub fn threads(mut self, threads: usize) -> Self {
        self.exec.threads = Some(threads);
        self
    }

    /// Opens the model, picks the device, loads weights and plans the graph.
    pub fn build(self) -> Result<Runtime> {
        let file = match self.source {
            Some(ModelSource::Path(p)) => ModelFile::open(&p)?,
            Some(ModelSource::Static(b, label)) => ModelFile::from_static(b, label)?,
            None => {
                return Err(Error::InvalidGraph {
                    file: "(none)".into(),
                    reason: "no model given to the runtime builder".into(),
                })
            }
        };
        if let Some(board) = &self.board {
            check_memory(&file, board)?;
        }
        let choice = device::select_first(&self.devices)?;
        let mut exec = self.exec;
        exec.compute = match (self.compute, &self.board) {
            (Some(c), _) => c,
            (None, Some(b)) if !choice.device.is_cpu() => b.compute_dtype,
            _ => ComputeDtype::F32,
        };
        let mut taps = self.taps;
        let explainer = match self.explain.choice {
            Choice::Off => None,
            _ => {
                let stored = Graph::from_model_file(&file)?;
                let e = Explainer::new(&stored, &file, self.explain)?;
                taps.extend(e.taps());
                Some(e)
            }
        };
        let mut model = LoadedModel::load(Arc::new(file), &choice, &taps, self.optimize, exec)?;
        if let Some(v) = self.variant {
            model.variant = v;
        }
        let frame_taps = explainer.as_ref().map(Explainer::taps).unwrap_or_default();
        Ok(Runtime {
            model,
            device: choice,
            budget: self.budget,
            top_k: self.top_k,
            explainer,
            frame_taps,
            test_delay_us: AtomicU64::new(0),
        })
    }
}

/// Runtime memory beyond weights and activations (thread stacks, kernel scratch, the binary):
/// the allowance measured on the four benchmark models (see README, "Memory").
const WORKSPACE_BYTES: u64 = 20 << 20;

/// Refuses a model whose weights (as computed, f32) + activation peak + workspace exceed the
/// board's memory budget, before anything is loaded.
fn check_memory(file: &ModelFile, board: &Board) -> Result<()> {
    let graph = Graph::from_model_file(file)?;
    let st = stats(&graph, |n| {
        file.get(n).map(|v| (v.info.shape.clone(), v.info.dtype))
    });
    // Float weights are computed in f32 whatever their storage (f16 halves only the file).
    let weights = st.params as u64 * 4;
    // The stored graph's peak bounds the planned one (the passes only remove values).
    let activations = st.peak_activation_bytes as u64;
    let need = weights + activations + WORKSPACE_BYTES;
    if need > board.memory_bytes() {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        return Err(Error::OverMemory {
            model: file.label().to_string(),
            board: board.name.clone(),
            need_mb: mb(need),
            weights_mb: mb(weights),
            activations_mb: mb(activations),
            workspace_mb: mb(WORKSPACE_BYTES),
            budget_mb: board.memory_mb,
        });
    }
    Ok(())
}

/// A model file loaded for one device: the graph as stored, the planned executor, labels.
pub struct LoadedModel {
    /// The mapped file.
    pub file: Arc<ModelFile>,
    /// The graph as stored in the file.
    pub stored: Graph,
    /// The planned executor (graph after passes).
    pub exec: Executor,
    /// What the passes did.
    pub passes: PassReport,
    /// Class labels, when the file has them.
    pub labels: Option<Vec<String>>,
    /// Variant name from the provenance (`base` when none).
    pub variant: String,
}

impl LoadedModel {
    /// Loads `file` on `choice`'s device; `taps` are protected from fusion.
    pub fn load(
        file: Arc<ModelFile>,
        choice: &DeviceChoice,
        taps: &[String],
        run_passes: bool,
        exec: ExecOptions,
    ) -> Result<Self> {
        let stored = Graph::from_model_file(&file)?;
        if choice.device.is_cpu() {
            crate::exec::tune_allocator(crate::exec::AllocPhase::Load);
        }
        let mut weights = load_weights(&file, &stored.tensor_names(), &choice.device)?;
        let mut graph = stored.clone();
        let passes = if run_passes {
            let protected: HashSet<String> = taps.iter().cloned().collect();
            optimize(&mut graph, &mut weights, &protected)?
        } else {
            PassReport::default()
        };
        let exec = Executor::new(graph, weights, choice.device.clone(), exec)?;
        // Every weight now lives in a candle tensor or a packed kernel buffer.
        file.release_pages();
        let labels = match file.metadata().get(META_LABELS) {
            Some(json) => Some(serde_json::from_str::<Vec<String>>(json).map_err(|e| {
                Error::InvalidGraph {
                    file: file.label().to_string(),
                    reason: format!("'{META_LABELS}' is not a JSON array of strings: {e}"),
                }
            })?),
            None => None,
        };
        let variant = file
            .metadata()
            .get(META_PROVENANCE)
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|p| p.get("variant").and_then(|v| v.as_str()).map(String::from))
            .unwrap_or_else(|| "base".into());
        Ok(LoadedModel {
            file,
            stored,
            exec,
            passes,
            labels,
            variant,
        })
    }
}

/// A loaded model ready to answer frames.
pub struct Runtime {
    model: LoadedModel,
    device: DeviceChoice,
    budget: Duration,
    top_k: usize,
    explainer: Option<Explainer>,
    /// Values each frame keeps for the explainer.
    frame_taps: Vec<String>,
    /// Extra time added to the infer stage (a test hook for the variant ladder).
    test_delay_us: AtomicU64,
}

/// A frame's report with what the explain layer made of it.
pub struct Explained {
    /// The report (its `explain` object already filled).
    pub report: FrameReport,
    /// The explanation, when one ran.
    pub explanation: Option<Explanation>,
    /// The decoded frame, when an explanation ran (for overlays).
    pub image: Option<Arc<image::DynamicImage>>,
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// The loaded model.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The device in use and why it was chosen.
    pub fn device(&self) -> &DeviceChoice {
        &self.device
    }

    /// The per-frame budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The element type the model computes in.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.model.exec.options().compute
    }

    /// The variant name reports carry.
    pub fn variant(&self) -> &str {
        &self.model.variant
    }

    /// Test hook: adds `delay` to every frame's infer stage from now on (zero removes it), to
    /// make a variant slow on purpose in tests of the degrade policy.
    #[doc(hidden)]
    pub fn set_test_delay(&self, delay: Duration) {
        self.test_delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// A report for a frame that never reached the engine: `dropped` with `reason` (`stale`,
    /// `deadline`, `shutdown`), or `error` with `reason` as the error when `failed`.
    pub fn unprocessed_report(
        &self,
        frame: u64,
        source: &str,
        captured: Instant,
        reason: &str,
        failed: bool,
    ) -> FrameReport {
        let mut r = self.blank_report(frame, source);
        r.total_ms = captured.elapsed().as_secs_f64() * 1e3;
        if failed {
            r.verdict = Verdict::Error;
            r.error = Some(format!("frame {frame} ({source}): {reason}"));
        } else {
            r.verdict = Verdict::Dropped;
            r.reason = Some(reason.to_string());
        }
        r
    }

    fn blank_report(&self, frame: u64, source: &str) -> FrameReport {
        FrameReport {
            frame,
            source: source.to_string(),
            model: self.model.stored.name.clone(),
            variant: self.model.variant.clone(),
            device: self.device.name.clone(),
            budget_ms: self.budget.as_secs_f64() * 1e3,
            total_ms: 0.0,
            verdict: Verdict::Ok,
            stages: Default::default(),
            top: Vec::new(),
            outputs: Vec::new(),
            explain: None,
            degraded: Vec::new(),
            reason: None,
            error: None,
        }
    }

    /// Runs frames from `source` through the scheduler (newest frame wins for live sources,
    /// deadline drops; see [`crate::pipeline::scheduler`]) and returns the stream of reports.
    /// Call inside a multi-threaded tokio runtime. For a variant ladder, build a
    /// [`crate::pipeline::Pipeline`] from several runtimes.
    pub fn stream(
        self: &Arc<Self>,
        source: impl crate::pipeline::FrameSource,
    ) -> Result<crate::pipeline::ReportStream> {
        let p = crate::pipeline::Pipeline::new(vec![self.clone()], Default::default())?;
        Ok(p.stream(source))
    }

    /// Runs already-prepared tensors (one per graph input, by name).
    pub fn run_tensors(&self, feeds: &[(String, Tensor)], taps: &[String]) -> Result<RunOutputs> {
        self.model.exec.run(feeds, taps)
    }

    /// The explainer, when explanations are on.
    pub fn explainer(&self) -> Option<&Explainer> {
        self.explainer.as_ref()
    }

    /// Preprocesses a decoded image into the model's (single) input tensor.
    pub fn image_tensor(&self, img: &image::DynamicImage) -> Result<(String, Tensor)> {
        let input = self.single_input()?;
        let t =
            image_to_tensor(img, input, &self.device.device).map_err(|reason| Error::BadInput {
                name: input.name.clone(),
                reason,
            })?;
        Ok((input.name.clone(), t))
    }

    fn single_input(&self) -> Result<&crate::graph::InputSpec> {
        let graph = self.model.exec.graph();
        match graph.inputs.as_slice() {
            [input] => Ok(input),
            inputs => Err(Error::InvalidGraph {
                file: self.model.file.label().to_string(),
                reason: format!(
                    "the model has {} inputs; frames feed single-input models",
                    inputs.len()
                ),
            }),
        }
    }

    /// Runs `feeds` and explains the result with `method` (no budget check, no fallback):
    /// for evaluations and single-image explanations. `class` defaults to the top-1. Returns
    /// the first output (on the host) and the explanation.
    pub fn explain_tensors(
        &self,
        feeds: &[(String, Tensor)],
        method: crate::explain::Method,
        class: Option<usize>,
    ) -> Result<(Tensor, Explanation)> {
        let explainer = self.explainer.as_ref().ok_or_else(|| Error::Explain {
            method: method.name().into(),
            reason: "the runtime was built without explanations".into(),
        })?;
        let out = self.model.exec.run(feeds, &self.frame_taps)?;
        let first = out
            .outputs
            .first()
            .map(|(_, t)| t.to_device(&candle_core::Device::Cpu))
            .transpose()?
            .ok_or_else(|| Error::Explain {
                method: method.name().into(),
                reason: "the model has no outputs".into(),
            })?;
        let class = class.unwrap_or(argmax(&first)?);
        let e = explainer.run(method, &out.taps, class)?;
        Ok((first, e))
    }

    /// Decodes, preprocesses and runs one frame. Always returns a report: a frame that fails
    /// gets verdict `error` with the reason, so a bad frame never loses the others.
    pub fn infer(&self, frame: &Frame) -> FrameReport {
        self.infer_explained(frame).report
    }

    /// [`Self::infer`], also returning the explanation and the decoded frame (for overlays).
    pub fn infer_explained(&self, frame: &Frame) -> Explained {
        let _span =
            tracing::info_span!("frame", id = frame.id, variant = %self.model.variant).entered();
        let mut timer = FrameTimer::start_at(frame.captured, self.budget);
        let mut report = self.blank_report(frame.id, &frame.source);
        let mut explained = (None, None);
        if let Err(e) = self.infer_into(frame, &mut timer, &mut report, &mut explained) {
            report.verdict = Verdict::Error;
            report.error = Some(e.to_string());
            report.stages = timer.stages.clone();
            report.total_ms = timer.total_ms();
            return Explained {
                report,
                explanation: None,
                image: None,
            };
        }
        report.stages = timer.stages.clone();
        report.total_ms = timer.total_ms();
        report.verdict = timer.verdict();
        Explained {
            report,
            explanation: explained.0,
            image: explained.1,
        }
    }

    fn infer_into(
        &self,
        frame: &Frame,
        timer: &mut FrameTimer,
        report: &mut FrameReport,
        explained: &mut (Option<Explanation>, Option<Arc<image::DynamicImage>>),
    ) -> Result<()> {
        let img = tracing::info_span!("decode").in_scope(|| frame.decode())?;
        timer.mark(Stage::Decode);
        let graph = self.model.exec.graph();
        let input = graph.inputs.first().ok_or_else(|| Error::InvalidGraph {
            file: self.model.file.label().to_string(),
            reason: "the model has no inputs".into(),
        })?;
        if graph.inputs.len() != 1 {
            return Err(Error::BadInput {
                name: input.name.clone(),
                reason: format!(
                    "the model has {} inputs; frames feed single-input models (use --input-tensor)",
                    graph.inputs.len()
                ),
            });
        }
        let tensor = tracing::info_span!("preprocess")
            .in_scope(|| image_to_tensor(&img, input, &self.device.device))
            .map_err(|reason| Error::Frame {
                frame: frame.id,
                source_name: frame.source.clone(),
                reason,
            })?;
        timer.mark(Stage::Preprocess);
        let infer_span = tracing::info_span!("infer").entered();
        let out = self
            .model
            .exec
            .run(&[(input.name.clone(), tensor)], &self.frame_taps)?;
        // Reading results back synchronises the device, so inference time is real time.
        let first = out.outputs.first().map(|(_, t)| t.clone());
        let host = match &first {
            Some(t) => Some(t.to_device(&candle_core::Device::Cpu)?),
            None => None,
        };
        let delay = self.test_delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        drop(infer_span);
        timer.mark(Stage::Infer);
        let post_span = tracing::info_span!("post").entered();
        let meaning = graph.outputs.first().map(|o| o.meaning);
        match (meaning, host) {
            (Some(m @ (OutputMeaning::Logits | OutputMeaning::Probabilities)), Some(t)) => {
                report.top = self.top_k(&t, m == OutputMeaning::Logits)?;
            }
            _ => {
                report.outputs = out
                    .outputs
                    .iter()
                    .map(|(name, t)| OutputSummary {
                        name: name.clone(),
                        shape: t.dims().to_vec(),
                    })
                    .collect();
            }
        }
        drop(post_span);
        timer.mark(Stage::Post);
        if let Some(explainer) = &self.explainer {
            let top1 = match report.top.first() {
                Some(t) => t.class,
                None => match &first {
                    Some(t) => argmax(t)?,
                    None => 0,
                },
            };
            let _span = tracing::info_span!("explain").entered();
            let (method, degraded) = explainer.choose(Some(timer.remaining()));
            report.degraded.extend(degraded);
            if let Some(m) = method {
                let e = explainer.run(m, &out.taps, explainer.target_class(top1))?;
                let frame_bbox = match (e.bbox, InputGeometry::of(img.width(), img.height(), input))
                {
                    (Some(b), Some(g)) => {
                        let [x0, y0, x1, y1] =
                            g.to_frame([b.x0, b.y0, b.x1, b.y1], img.width(), img.height());
                        Some(crate::explain::mask::BBox { x0, y0, x1, y1 })
                    }
                    _ => None,
                };
                report.explain = Some(explainer.report_json(&e, frame_bbox));
                explained.0 = Some(e);
                explained.1 = Some(img);
            }
            timer.mark(Stage::Explain);
        }
        Ok(())
    }

    fn top_k(&self, t: &Tensor, logits: bool) -> Result<Vec<TopClass>> {
        let flat = t.flatten_all()?.to_dtype(CDType::F32)?;
        let scores = if logits {
            candle_nn::ops::softmax(&flat, 0)?
        } else {
            flat
        };
        let v = scores.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        Ok(idx
            .into_iter()
            .take(self.top_k)
            .map(|class| TopClass {
                class,
                label: self
                    .model
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(class).cloned()),
                score: v[class],
            })
            .collect())
    }
}

/// Index of the largest element of `t` (flattened).
pub fn argmax(t: &Tensor) -> Result<usize> {
    let v = t.flatten_all()?.to_dtype(CDType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0))
}
