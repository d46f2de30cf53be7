//! The `edgeinfer` binary: a thin CLI over the library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use edgeinfer::budget::parse_budget;
use edgeinfer::device::DeviceRequest;
use edgeinfer::exec::{BlockFusion, ChannelLayout, Kernels, Winograd};
use edgeinfer::graph::stats::stats;
use edgeinfer::graph::{ColorOrder, Graph, Preprocess, META_PROVENANCE};
use edgeinfer::import::{import_onnx, ImportOptions, SUPPORTED_OPS};
use edgeinfer::model::{DType, ModelFile, ModelWriter};
use edgeinfer::pipeline::Frame;
use edgeinfer::report::{FrameReport, Verdict};
use edgeinfer::Runtime;

mod cli;
use cli::explain::{ExplainArgs, MapDump, OverlaySink};
use cli::run::{JsonLines, PipelineArgs, Sinks};

/// The embedded default model (MobileNetV2, ImageNet, f16 storage) and sample photos, so `demo`
/// needs no network, no Python and no files next to the binary.
const DEFAULT_MODEL: &[u8] = include_bytes!("../models/mobilenet_v2.safetensors");
const SAMPLES: &[(&str, &[u8])] = &[
    (
        "chelsea.png",
        include_bytes!("../models/samples/chelsea.png"),
    ),
    ("coffee.png", include_bytes!("../models/samples/coffee.png")),
    (
        "astronaut.png",
        include_bytes!("../models/samples/astronaut.png"),
    ),
];

#[derive(Parser)]
#[command(
    name = "edgeinfer",
    version,
    about = "Vision models on edge terminals, inside a per-frame latency budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded MobileNetV2 on the embedded sample photos.
    Demo(DemoArgs),
    /// Convert an ONNX model into an edgeinfer model file.
    Import(ImportArgs),
    /// Summarise a model file: graph, params, MACs, memory, provenance.
    Inspect(InspectArgs),
    /// Run a model (or a ladder of pruned variants) on frames: image files, raw video on
    /// stdin, a synthetic camera or a V4L2 camera, inside a per-frame budget; or once on
    /// prepared tensors.
    Run(Box<RunArgs>),
    /// Structured channel pruning: remove the least important conv channels (every tensor
    /// shrinks); prints params and MACs before and after.
    Prune(PruneArgs),
    /// Fine-tune a model file's weights on an image folder (one sub-folder per class label),
    /// on the CPU with candle's autograd: the recovery step after pruning.
    Finetune(FinetuneArgs),
    /// Convert a model file's weights: f16 / bf16 storage, or int8 weight-only (symmetric,
    /// per output channel); prints sizes and the output error on a calibration image.
    Quantize(QuantizeArgs),
    /// List the supported ONNX op types.
    Ops,
    /// List the shipped board profiles (use one with --board NAME, or --board FILE.toml).
    Boards,
    /// Explain one image: a side-by-side picture (input | heat map | overlay) and the JSON.
    Explain(ExplainCmdArgs),
    /// Benchmarks: latency, memory and accuracy per pruning ratio and dtype (a report with a
    /// plot), or `--explain`: each explain method against one forward pass.
    Bench(BenchCmdArgs),
    /// Measures one model file in a process of its own (used by `bench`).
    #[command(hide = true)]
    BenchVariant(VariantCmdArgs),
    /// Accuracy, and each explain method's localisation (IoU, Dice, pointing game, energy)
    /// against known defect masks.
    Eval(EvalCmdArgs),
}

#[derive(Args)]
struct ExplainCmdArgs {
    #[command(flatten)]
    cmd: cli::explain::ExplainCmd,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct BenchCmdArgs {
    #[command(flatten)]
    cmd: cli::bench::BenchCmd,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct VariantCmdArgs {
    #[command(flatten)]
    cmd: cli::bench::VariantCmd,
    #[command(flatten)]
    target: TargetArgs,
}

#[derive(Args)]
struct EvalCmdArgs {
    #[command(flatten)]
    cmd: cli::explain::EvalCmd,
    #[command(flatten)]
    target: TargetArgs,
}

/// Where a model runs: a board profile, and explicit settings that override it.
#[derive(Args, Debug, Clone)]
struct TargetArgs {
    /// A board profile: a shipped name (see `edgeinfer boards`) or a .toml file. Sets the
    /// device preference, CPU threads, frame budget and memory budget; the flags below
    /// override it.
    #[arg(long)]
    board: Option<String>,
    /// auto, cpu or cuda:N (default: the board's preference, else auto).
    #[arg(long)]
    device: Option<DeviceRequest>,
    /// Per-frame budget, e.g. 200ms (default: the board's, else 200ms).
    #[arg(long, value_parser = parse_budget)]
    budget: Option<Duration>,
    #[command(flatten)]
    cpu: CpuArgs,
}

impl TargetArgs {
    /// The flags again, for a child process of ours that must run the same way.
    fn child_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(b) = &self.board {
            v.extend(["--board".to_string(), b.clone()]);
        }
        if let Some(n) = self.cpu.threads {
            v.extend(["--threads".to_string(), n.to_string()]);
        }
        if let Some(c) = self.cpu.compute_dtype {
            v.extend(["--compute-dtype".to_string(), c.to_string()]);
        }
        v.extend([
            "--kernels".to_string(),
            self.cpu.kernels.to_string(),
            "--winograd".to_string(),
            self.cpu.winograd.to_string(),
            "--fuse-blocks".to_string(),
            self.cpu.fuse_blocks.to_string(),
            "--layout".to_string(),
            self.cpu.layout.to_string(),
        ]);
        v
    }

    /// A runtime builder with the board applied first, then the explicit flags.
    fn builder(&self) -> Result<edgeinfer::runtime::RuntimeBuilder> {
        let mut b = Runtime::builder();
        if let Some(name) = &self.board {
            b = b.board(edgeinfer::board::Board::load(name)?);
        }
        b = self.cpu.apply(b);
        if let Some(d) = self.device {
            b = b.device(d);
        }
        if let Some(budget) = self.budget {
            b = b.budget(budget);
        }
        Ok(b)
    }
}

/// How the CPU runs a frame.
#[derive(Args, Debug, Clone)]
struct CpuArgs {
    /// CPU kernels: native (ours, default) or candle (the reference ops).
    #[arg(long, default_value = "native")]
    kernels: Kernels,
    /// Threads per frame (default: the board's, else RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Winograd F(2x2,3x3) for 3x3 stride-1 convolutions: auto (measured per layer at load),
    /// always, never.
    #[arg(long, default_value = "auto")]
    winograd: Winograd,
    /// Inverted residual blocks (expand, depthwise, project) as one kernel: small (default:
    /// blocks ending on maps of at most 7 × 7, channels-last), auto (also blocks whose expanded
    /// map outgrows the L2 cache, in bands of rows), always, never.
    #[arg(long, default_value = "small")]
    fuse_blocks: BlockFusion,
    /// Channel layout between pointwise and depthwise convolutions: auto (default: blocked
    /// NCHWc8 on AVX2-only x86 hosts, where it measured faster; NCHW elsewhere), blocked,
    /// planar.
    #[arg(long, default_value = "auto")]
    layout: ChannelLayout,
    /// Compute in f32, f16 or bf16 on any device (default: the board's compute_dtype on a GPU,
    /// f32 on the CPU; f16 on the CPU runs candle's reference ops, for checking the GPU path).
    #[arg(long)]
    compute_dtype: Option<edgeinfer::board::ComputeDtype>,
}

impl CpuArgs {
    fn apply(&self, b: edgeinfer::runtime::RuntimeBuilder) -> edgeinfer::runtime::RuntimeBuilder {
        let mut b = b
            .kernels(self.kernels)
            .winograd(self.winograd)
            .fusion(self.fuse_blocks)
            .layout(self.layout);
        if let Some(c) = self.compute_dtype {
            b = b.compute_dtype(c);
        }
        match self.threads {
            Some(n) => b.threads(n),
            None => b,
        }
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Folder for the JSON lines report and the heat-map overlays.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    explain: ExplainArgs,
}

#[derive(Args)]
struct ImportArgs {
    /// The ONNX file.
    onnx: PathBuf,
    /// Output model file (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// Class labels, one per line.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Storage dtype of float weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    weights_dtype: String,
    /// Fix an input's shape: NAME=d0,d1,... (repeatable). Symbolic batch dims default to 1.
    #[arg(long = "input-shape")]
    input_shapes: Vec<String>,
    /// Model name (default: file stem).
    #[arg(long)]
    name: Option<String>,
    /// Fix graph inputs to constants (e.g. a Resize's scales fed as an input): NAME=FILE takes
    /// tensor NAME from the safetensors FILE (repeatable).
    #[arg(long = "freeze")]
    freeze: Vec<String>,
    /// Per-channel mean after scaling to 0..1 (default ImageNet for 3-channel inputs).
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel std (default ImageNet for 3-channel inputs).
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Resize the shorter side to N before the centre crop; 0 stretches to the input size.
    #[arg(long)]
    resize_shorter: Option<u32>,
    /// Channel order: rgb, bgr or gray.
    #[arg(long)]
    color: Option<String>,
    /// Tensor layout of the image input: NCHW or NHWC.
    #[arg(long)]
    layout: Option<String>,
}

#[derive(Args)]
struct PruneArgs {
    /// The model file.
    model: PathBuf,
    /// Fraction of the prunable channels to remove, 0 <= ratio < 1.
    #[arg(long)]
    ratio: f32,
    /// l1, l2 or bn-scale.
    #[arg(long, default_value = "l1")]
    criterion: edgeinfer::prune::Criterion,
    /// global (rank all channels together) or uniform (the same fraction per layer).
    #[arg(long, default_value = "global")]
    scope: edgeinfer::prune::Scope,
    /// Keep every pruned width a multiple of N (SIMD lanes, tensor-core tiles).
    #[arg(long, default_value_t = 1)]
    round_to: usize,
    /// Channel spaces to keep whole: first, last, or value names (comma-separated).
    #[arg(long, value_delimiter = ',')]
    keep: Vec<String>,
    /// Images (a folder, or a folder of class folders) on which to measure the mean activation
    /// of every removed channel; each layer that read it gets that mean folded into its bias
    /// (mean replacement) instead of losing the channel's contribution.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// How many calibration images (spread over the folder).
    #[arg(long, default_value_t = 256)]
    calibration_images: usize,
    /// Output model file.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
struct FinetuneArgs {
    /// The model file.
    model: PathBuf,
    /// Training images: DIR/<label>/*.png|jpg.
    #[arg(long)]
    data: PathBuf,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Shuffling and augmentation seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Learning-rate schedule: cosine (decays to zero at the last step) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: edgeinfer::finetune::Schedule,
    /// Mirror training images left-right at random (only where a mirror keeps the class).
    #[arg(long)]
    hflip: bool,
    /// Output model file.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
struct QuantizeArgs {
    /// The model file.
    model: PathBuf,
    /// f16, bf16 or int8.
    #[arg(long)]
    to: edgeinfer::quant::Target,
    /// Output model file.
    #[arg(short, long)]
    output: PathBuf,
    /// Image the output error is measured on (default: the embedded cat photo).
    #[arg(long)]
    calibration: Option<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    /// The model file.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// List every node of the optimised graph.
    #[arg(long)]
    nodes: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The model file, or a ladder of variants, most accurate first
    /// (`a.safetensors,a-p40.safetensors,a-p63.safetensors`): when the one in use does not
    /// fit the budget, frames go to the next lighter one (default: the embedded MobileNetV2).
    #[arg(long, value_delimiter = ',')]
    model: Vec<PathBuf>,
    #[command(flatten)]
    pipe: PipelineArgs,
    /// A safetensors file with one tensor per graph input, keyed by input name.
    #[arg(long)]
    input_tensor: Option<PathBuf>,
    /// Write every graph output, keyed by output name, to this safetensors file.
    #[arg(long)]
    dump_outputs: Option<PathBuf>,
    /// Write one FrameReport JSON line per frame here (default: stdout).
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Classes per report.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Run the graph as imported, without the load-time passes.
    #[arg(long)]
    no_optimize: bool,
    /// With --input-tensor: run this many timed inferences after the warm-up ones and print
    /// the median, p95 and min latency.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// With --repeat: untimed inferences first (per-thread scratch buffers grow to the frame's
    /// needs during the first few: MobileNetV2's first timed frames ran 5.9, 5.0, 4.8 ms
    /// against 4.4 after one warm-up). 5 matches benches/compare_ort.py's ONNX Runtime side.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Folder for heat-map overlays of explained frames (`<frame>-<name>.png`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write a Chrome trace (one span per frame and stage) here; open it in a trace viewer
    /// such as Perfetto or chrome://tracing.
    #[arg(long)]
    trace_chrome: Option<PathBuf>,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    explain: ExplainArgs,
}

fn main() {
    // `edgeinfer inspect m | head` should end quietly, like other Unix tools, instead of
    // panicking on the closed pipe.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: restoring the default disposition of one signal at start-up, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let chrome = match &cli.command {
        Command::Run(a) => a.trace_chrome.clone(),
        _ => None,
    };
    let _trace_guard = init_tracing(chrome.as_deref());
    let result = match cli.command {
        Command::Demo(a) => demo(a),
        Command::Import(a) => import(a),
        Command::Inspect(a) => inspect(a),
        Command::Run(a) => run(*a),
        Command::Quantize(a) => quantize(a),
        Command::Prune(a) => prune(a),
        Command::Finetune(a) => finetune(a),
        Command::Ops => {
            for op in SUPPORTED_OPS {
                println!("{op}");
            }
            Ok(())
        }
        Command::Boards => boards(),
        Command::Explain(a) => a
            .target
            .builder()
            .and_then(|b| cli::explain::explain_cmd(&a.cmd, b)),
        Command::Bench(a) => a.target.builder().and_then(|b| {
            let child = a.target.child_args();
            cli::bench::bench_cmd(&a.cmd, b, &child, DEFAULT_MODEL, SAMPLES[0].1)
        }),
        Command::BenchVariant(a) => a
            .target
            .builder()
            .and_then(|b| cli::bench::variant_cmd(&a.cmd, b)),
        Command::Eval(a) => a
            .target
            .builder()
            .and_then(|b| cli::explain::eval_cmd(&a.cmd, b)),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Logs to stderr filtered by `RUST_LOG` (default `warn`); with a path, also every span at
/// info level and below into a Chrome trace file (flushed when the guard drops).
fn init_tracing(chrome: Option<&Path>) -> Option<tracing_chrome::FlushGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    match chrome {
        Some(path) => {
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                .file(path)
                .include_args(true)
                .build();
            let spans = layer.with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            tracing_subscriber::registry().with(fmt).with(spans).init();
            Some(guard)
        }
        None => {
            tracing_subscriber::registry().with(fmt).init();
            None
        }
    }
}

fn boards() -> Result<()> {
    println!(
        "{:<22} {:<26} {:<14} {:>7} {:>10} {:>9}  description",
        "board", "target", "devices", "threads", "memory", "budget"
    );
    for b in edgeinfer::board::Board::builtin()? {
        println!(
            "{:<22} {:<26} {:<14} {:>7} {:>7} MB {:>6} ms  {}",
            b.name,
            b.target,
            b.devices.join(","),
            b.cpu_threads,
            b.memory_mb,
            b.budget_ms,
            b.description
        );
    }
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    let choice = a
        .explain
        .explain
        .unwrap_or(edgeinfer::explain::Choice::Auto);
    let rt = a
        .explain
        .apply(a.target.builder()?, choice)?
        .model_bytes(DEFAULT_MODEL, "embedded:mobilenet_v2.safetensors")
        .top_k(3)
        .build()
        .context("loading the embedded model")?;
    eprintln!(
        "model {} on {} ({}), budget {:.0} ms",
        rt.model().stored.name,
        rt.device().name,
        rt.device().reason,
        rt.budget().as_secs_f64() * 1e3
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let path = a.out.join("demo.jsonl");
    let mut sink = JsonLines::create(Some(&path))?;
    let overlays = OverlaySink::create(&a.out)?;
    let mut dump = a.explain.dump_maps.as_ref().map(|_| MapDump::default());
    // A warm-up frame so the first report is not dominated by one-time page faults.
    let warm = Frame::from_encoded(u64::MAX, "warm-up", SAMPLES[0].1);
    let _ = rt.infer(&warm);
    println!(
        "{:<14} {:<40} {:>7} {:>7} {:>7} {:>7} {:>7}  verdict",
        "image", "top-3 (score)", "decode", "prep", "infer", "explain", "total"
    );
    let mut reports = Vec::new();
    for (i, (name, bytes)) in SAMPLES.iter().enumerate() {
        let frame = Frame::from_encoded(i as u64, *name, *bytes);
        let mut x = rt.infer_explained(&frame);
        overlays.write(&rt, &mut x)?;
        if let (Some(d), Some(e)) = (dump.as_mut(), &x.explanation) {
            d.add(frame.id, e)?;
        }
        let r = x.report;
        let tops: Vec<String> = r
            .top
            .iter()
            .map(|t| format!("{} ({:.2})", t.label.as_deref().unwrap_or("?"), t.score))
            .collect();
        let mut lines = tops.into_iter();
        let explain = match (r.stages.explain, &r.explain) {
            (Some(ms), Some(_)) => format!("{ms:.1}"),
            _ => "-".into(),
        };
        println!(
            "{:<14} {:<40} {:>7.1} {:>7.1} {:>7.1} {:>7} {:>7.1}  {}",
            name,
            truncate(&lines.next().unwrap_or_default(), 40),
            r.stages.decode,
            r.stages.preprocess,
            r.stages.infer,
            explain,
            r.total_ms,
            verdict_text(&r)
        );
        for l in lines {
            println!("{:<14} {}", "", truncate(&l, 40));
        }
        sink.write(&r)?;
        reports.push(r);
    }
    sink.finish()?;
    if let (Some(d), Some(p)) = (dump, &a.explain.dump_maps) {
        d.finish(p)?;
    }
    let explained: Vec<&str> = reports
        .iter()
        .filter_map(|r| r.explain.as_ref()?.get("map")?.as_str())
        .collect();
    eprintln!("{} frames, reports in {}", reports.len(), path.display());
    if !explained.is_empty() {
        eprintln!("heat-map overlays: {}", explained.join(", "));
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn verdict_text(r: &FrameReport) -> String {
    match r.verdict {
        Verdict::Ok => "ok".into(),
        Verdict::OverBudget => "over_budget".into(),
        Verdict::Dropped => "dropped".into(),
        Verdict::Error => format!("error: {}", r.error.as_deref().unwrap_or("")),
    }
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown weights dtype '{other}' (f32, f16, bf16)"),
    })
}

fn import(a: ImportArgs) -> Result<()> {
    let mut opts = ImportOptions {
        weights_dtype: Some(parse_dtype(&a.weights_dtype)?),
        name: a.name.clone(),
        ..Default::default()
    };
    for spec in &a.input_shapes {
        let (name, dims) = spec
            .split_once('=')
            .with_context(|| format!("--input-shape '{spec}': expected NAME=d0,d1,..."))?;
        let dims: Vec<usize> = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!("--input-shape '{spec}': dimensions must be positive integers")
            })?;
        opts.input_shapes.insert(name.to_string(), dims);
    }
    for spec in &a.freeze {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--freeze '{spec}': expected NAME=FILE.safetensors"))?;
        let file = ModelFile::open(path).with_context(|| format!("--freeze {spec}"))?;
        let view = file
            .get(name)
            .with_context(|| format!("--freeze {spec}: {path} has no tensor '{name}'"))?;
        opts.frozen_inputs
            .insert(name.to_string(), view.to_candle(&candle_core::Device::Cpu)?);
    }
    if let Some(p) = &a.labels {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("reading labels {}", p.display()))?;
        opts.labels = Some(
            text.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        );
    }
    let custom_pre = a.mean.is_some()
        || a.std.is_some()
        || a.resize_shorter.is_some()
        || a.color.is_some()
        || a.layout.is_some();
    let mut imported =
        import_onnx(&a.onnx, &opts).with_context(|| format!("importing {}", a.onnx.display()))?;
    if custom_pre {
        let input = imported
            .graph
            .inputs
            .first_mut()
            .context("the model has no inputs to preprocess")?;
        let base = input.preprocess.clone().unwrap_or(Preprocess {
            layout: "NCHW".into(),
            color: ColorOrder::Rgb,
            resize_shorter: None,
            scale: 1.0 / 255.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        });
        let color = match a.color.as_deref() {
            None => base.color,
            Some("rgb") => ColorOrder::Rgb,
            Some("bgr") => ColorOrder::Bgr,
            Some("gray") => ColorOrder::Gray,
            Some(other) => bail!("--color '{other}': expected rgb, bgr or gray"),
        };
        input.preprocess = Some(Preprocess {
            layout: a.layout.clone().unwrap_or(base.layout),
            color,
            resize_shorter: match a.resize_shorter {
                Some(0) => None,
                Some(n) => Some(n),
                None => base.resize_shorter,
            },
            scale: base.scale,
            mean: a.mean.clone().unwrap_or(base.mean),
            std: a.std.clone().unwrap_or(base.std),
        });
    }
    let dtype = opts.weights_dtype.unwrap_or(DType::F32);
    let writer = imported.to_writer(dtype)?;
    writer
        .write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let file = ModelFile::open(&a.output)?;
    let s = stats(&imported.graph, |n| {
        file.get(n).map(|v| (v.info.shape.clone(), v.info.dtype))
    });
    eprintln!(
        "imported {} -> {}: {} nodes ({} folded at import), {} params, {:.1} MB, {:.3} GMACs",
        a.onnx.display(),
        a.output.display(),
        s.nodes,
        imported.folded_nodes,
        s.params,
        s.weight_bytes as f64 / 1e6,
        s.macs as f64 / 1e9
    );
    Ok(())
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    let file = ModelFile::open(&a.model)?;
    let opts = edgeinfer::finetune::FinetuneOptions {
        epochs: a.epochs,
        lr: a.lr,
        batch: a.batch,
        seed: a.seed,
        schedule: a.schedule,
        hflip: a.hflip,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("epoch {msg} {bar:30} {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (writer, stats) =
        edgeinfer::finetune::finetune(&file, &a.data, &opts, |epoch, done, total, loss| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("{}/{} loss {loss:.4}", epoch + 1, a.epochs));
        })
        .with_context(|| format!("fine-tuning {}", a.model.display()))?;
    bar.finish_and_clear();
    for (i, s) in stats.iter().enumerate() {
        eprintln!(
            "epoch {}: loss {:.4}, train accuracy {:.1} %",
            i + 1,
            s.loss,
            100.0 * s.accuracy
        );
    }
    writer
        .write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("{} -> {}", a.model.display(), a.output.display());
    Ok(())
}

fn prune(a: PruneArgs) -> Result<()> {
    let file = ModelFile::open(&a.model)?;
    let opts = edgeinfer::prune::PruneOptions {
        ratio: a.ratio,
        criterion: a.criterion,
        scope: a.scope,
        round_to: a.round_to,
        keep: a.keep.clone(),
    };
    let images = match &a.calibration {
        Some(dir) => edgeinfer::prune::calibration_images(&file, dir, a.calibration_images)?,
        None => Vec::new(),
    };
    let (writer, plan) = edgeinfer::prune::prune_calibrated(&file, &opts, &images)
        .with_context(|| format!("pruning {}", a.model.display()))?;
    writer
        .write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let after = ModelFile::open(&a.output)?;
    let st = |f: &ModelFile| -> Result<edgeinfer::graph::stats::GraphStats> {
        let g = Graph::from_model_file(f)?;
        Ok(stats(&g, |n| {
            f.get(n).map(|v| (v.info.shape.clone(), v.info.dtype))
        }))
    };
    let (s0, s1) = (st(&file)?, st(&after)?);
    for w in &plan.spaces {
        println!(
            "{:<60} {:>5} -> {:>5}",
            truncate(&w.value, 60),
            w.before,
            w.after
        );
    }
    eprintln!(
        "{} -> {}: {} channel groups pruned; params {} -> {} ({:.1} %), MACs {:.3} G -> {:.3} G ({:.1} %), file {:.2} MB -> {:.2} MB",
        a.model.display(),
        a.output.display(),
        plan.spaces.len(),
        s0.params,
        s1.params,
        100.0 * s1.params as f64 / s0.params.max(1) as f64,
        s0.macs as f64 / 1e9,
        s1.macs as f64 / 1e9,
        100.0 * s1.macs as f64 / s0.macs.max(1) as f64,
        file.file_size() as f64 / 1e6,
        after.file_size() as f64 / 1e6,
    );
    Ok(())
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let file = ModelFile::open(&a.model)?;
    let (writer, report) = edgeinfer::quant::quantize(&file, a.to)
        .with_context(|| format!("quantizing {}", a.model.display()))?;
    writer
        .write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let after = ModelFile::open(&a.output)?;
    eprintln!(
        "{} -> {} ({}): {} tensors converted, {} kept; file {:.2} MB -> {:.2} MB ({:.1} %)",
        a.model.display(),
        a.output.display(),
        a.to.name(),
        report.converted,
        report.kept,
        file.file_size() as f64 / 1e6,
        after.file_size() as f64 / 1e6,
        100.0 * after.file_size() as f64 / file.file_size() as f64
    );
    // The error the conversion costs, on one real input through both files.
    let img = match &a.calibration {
        Some(p) => image::open(p).with_context(|| format!("reading {}", p.display()))?,
        None => image::load_from_memory(SAMPLES[0].1)?,
    };
    let load = |p: &Path| {
        Runtime::builder()
            .model(p)
            .device(DeviceRequest::Cpu)
            .build()
            .with_context(|| format!("loading {}", p.display()))
    };
    let (rt0, rt1) = (load(&a.model)?, load(&a.output)?);
    let feeds = [rt0.image_tensor(&img).context("the calibration input")?];
    let out0 = rt0.run_tensors(&feeds, &[])?;
    let out1 = rt1.run_tensors(&feeds, &[])?;
    for ((name, t0), (_, t1)) in out0.outputs.iter().zip(&out1.outputs) {
        let v0 = t0
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let v1 = t1
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let diffs: Vec<f32> = v0.iter().zip(&v1).map(|(x, y)| (x - y).abs()).collect();
        let max = diffs.iter().cloned().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len().max(1) as f32;
        let range = v0.iter().fold(0f32, |m, x| m.max(x.abs()));
        let top = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i)
        };
        println!(
            "{name}: max |diff| {max:.3e}, mean |diff| {mean:.3e} (|x| <= {range:.3}); top-1 {:?} -> {:?}",
            top(&v0),
            top(&v1)
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let file = ModelFile::open(&a.model)?;
    let stored = Graph::from_model_file(&file)?;
    let weight = |n: &str| file.get(n).map(|v| (v.info.shape.clone(), v.info.dtype));
    let before = stats(&stored, weight);
    let rt = Runtime::builder()
        .model(&a.model)
        .device(DeviceRequest::Cpu)
        .build()?;
    let planned = rt.model().exec.graph();
    let after = stats(planned, |n| {
        weight(n).or_else(|| {
            // Folded weights are not in the file; their shape is that of the conv weight they
            // replace, stored as f32.
            let base = n.rsplit_once("::").map(|(b, _)| b)?;
            let node = planned.nodes.iter().find(|x| x.name == base)?;
            let idx = node.inputs.iter().position(|i| i == n)?;
            let orig = stored
                .nodes
                .iter()
                .find(|x| x.name == base)?
                .inputs
                .get(idx)?;
            weight(orig).or_else(|| {
                let w = stored
                    .nodes
                    .iter()
                    .find(|x| x.name == base)?
                    .inputs
                    .get(1)?;
                weight(w).map(|(s, d)| (vec![s[0]], d))
            })
        })
    });
    let provenance: serde_json::Value = file
        .metadata()
        .get(META_PROVENANCE)
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or(serde_json::Value::Null);
    let io = serde_json::json!({
        "inputs": stored.inputs,
        "outputs": stored.outputs,
    });
    let targets = edgeinfer::explain::plan::GraphTargets::find(&stored, &file);
    let explain = serde_json::json!({
        "cam_feature": targets.cam.as_ref().map(|h| &h.feature),
        "target_layer": targets.feature,
        "attention_layers": targets.attention.as_ref().map(|a| a.softmaxes.len()),
    });
    if a.json {
        let j = serde_json::json!({
            "file": a.model.display().to_string(),
            "file_bytes": file.file_size(),
            "name": stored.name,
            "params": before.params,
            "macs": before.macs,
            "weight_bytes": before.weight_bytes,
            "peak_activation_bytes": after.peak_activation_bytes,
            "weight_dtypes": before.weight_dtypes,
            "inputs": io["inputs"],
            "outputs": io["outputs"],
            "labels": rt.model().labels.as_ref().map(|l| l.len()),
            "provenance": provenance,
            "stored": before,
            "optimized": after,
            "passes": rt.model().passes,
            "explain": explain,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("model        {} ({})", stored.name, a.model.display());
    let methods: Vec<&str> = [
        targets.cam.as_ref().map(|_| "cam"),
        targets.feature.as_ref().map(|_| "eigencam, gradcam"),
        targets.attention.as_ref().map(|_| "rollout"),
    ]
    .into_iter()
    .flatten()
    .collect();
    println!(
        "explain      {} (target layer {})",
        if methods.is_empty() {
            "none".to_string()
        } else {
            methods.join(", ")
        },
        targets.feature.as_deref().unwrap_or("-")
    );
    println!(
        "file         {:.2} MB, {} tensors",
        file.file_size() as f64 / 1e6,
        file.len()
    );
    for i in &stored.inputs {
        println!("input        {} {:?} {}", i.name, i.shape, i.dtype.as_str());
        if let Some(p) = &i.preprocess {
            println!(
                "  preprocess {} {:?}, resize shorter side {:?}, mean {:?}, std {:?}",
                p.layout, p.color, p.resize_shorter, p.mean, p.std
            );
        }
    }
    for o in &stored.outputs {
        let shape = stored
            .values
            .get(&o.name)
            .map(|v| v.shape.clone())
            .unwrap_or_default();
        println!("output       {} {:?} ({:?})", o.name, shape, o.meaning);
    }
    if let Some(l) = &rt.model().labels {
        println!("labels       {}", l.len());
    }
    println!("params       {}", before.params);
    println!(
        "weights      {:.2} MB {:?}",
        before.weight_bytes as f64 / 1e6,
        before.weight_dtypes
    );
    println!("MACs         {:.3} G", before.macs as f64 / 1e9);
    println!(
        "peak activations {:.2} MB (stored graph) -> {:.2} MB (optimised)",
        before.peak_activation_bytes as f64 / 1e6,
        after.peak_activation_bytes as f64 / 1e6
    );
    println!("provenance   {provenance}");
    println!("graph as stored ({} nodes):", before.nodes);
    print_hist(&before.ops);
    let p = &rt.model().passes;
    println!(
        "graph optimised ({} nodes; {} BatchNorm folded, {} activations fused, {} identities and {} dead nodes removed):",
        after.nodes, p.batchnorm_folded, p.activations_fused, p.identities_removed, p.dead_removed
    );
    print_hist(&after.ops);
    if a.nodes {
        for n in &planned.nodes {
            let shape = n
                .outputs
                .first()
                .and_then(|o| planned.values.get(o))
                .map(|v| format!("{:?}", v.shape))
                .unwrap_or_default();
            println!(
                "  {:<40} {:<22} {}",
                truncate(&n.name, 40),
                n.op.name(),
                shape
            );
        }
    }
    Ok(())
}

fn print_hist(h: &std::collections::BTreeMap<String, usize>) {
    let parts: Vec<String> = h.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("  {}", parts.join("  "));
}

fn run(a: RunArgs) -> Result<()> {
    if !a.pipe.has_source() && a.input_tensor.is_none() {
        bail!("give frames (--input, --raw, --synthetic, --v4l2) or --input-tensor");
    }
    if a.input_tensor.is_some() && a.model.len() > 1 {
        bail!("--input-tensor runs one model; give one --model");
    }
    let choice = a.explain.explain.unwrap_or_default();
    let builder = a
        .explain
        .apply(a.target.builder()?, choice)?
        .top_k(a.top_k)
        .optimize(!a.no_optimize);
    let mut variants = Vec::new();
    if a.model.is_empty() {
        variants.push(
            builder
                .clone()
                .model_bytes(DEFAULT_MODEL, "embedded:mobilenet_v2.safetensors")
                .build()
                .context("loading the embedded model")?,
        );
    }
    let mut seen = std::collections::HashSet::new();
    for path in &a.model {
        let mut b = builder.clone().model(path);
        // Two variants with one provenance name (e.g. two unpruned files) are told apart by
        // their file names.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if a.model.len() > 1 {
            b = b.variant(stem.clone());
        }
        if !seen.insert(stem) {
            bail!("--model lists {} twice", path.display());
        }
        variants.push(
            b.build()
                .with_context(|| format!("loading {}", path.display()))?,
        );
    }
    for rt in &variants {
        let exec = &rt.model().exec;
        tracing::info!(
            variant = rt.variant(),
            device = %rt.device().name,
            reason = %rt.device().reason,
            native_nodes = exec.native_nodes(),
            nodes = exec.node_count(),
            arena_mb = format!("{:.2}", exec.arena_bytes() as f64 / 1e6),
            blocked_values = exec.blocked_values(),
            fused_blocks = exec.fused_blocks(),
            "loaded"
        );
    }
    if let Some(path) = &a.input_tensor {
        return run_tensors(
            &variants[0],
            path,
            a.dump_outputs.as_deref(),
            (a.repeat, a.warmup),
        );
    }
    if a.dump_outputs.is_some() {
        bail!("--dump-outputs needs --input-tensor (frame runs write reports, not tensors)");
    }
    cli::run::run_pipeline(
        &a.pipe,
        variants,
        Sinks {
            jsonl: a.jsonl.as_deref(),
            out: a.out.as_deref(),
            dump_maps: a.explain.dump_maps.as_deref(),
        },
    )
}

fn run_tensors(
    rt: &Runtime,
    path: &Path,
    dump: Option<&Path>,
    (repeat, warmup): (usize, usize),
) -> Result<()> {
    let file = ModelFile::open(path)
        .with_context(|| format!("reading input tensors {}", path.display()))?;
    let graph = rt.model().exec.graph();
    let mut feeds = Vec::new();
    let by_name: HashMap<&str, _> = file.tensors().map(|t| (t.name.as_str(), t)).collect();
    for input in &graph.inputs {
        let info = by_name.get(input.name.as_str()).with_context(|| {
            format!(
                "{} has no tensor '{}' (it holds: {})",
                path.display(),
                input.name,
                by_name.keys().copied().collect::<Vec<_>>().join(", ")
            )
        })?;
        let view = file.get(&info.name).context("tensor vanished")?;
        if view.info.dtype != input.dtype {
            bail!(
                "input '{}': {} holds {}, the model expects {}",
                input.name,
                path.display(),
                view.info.dtype,
                input.dtype
            );
        }
        // The file's element type is the graph's; candle may hold it wider (I8 as I16).
        let t = view
            .to_candle(&candle_core::Device::Cpu)?
            .to_dtype(input.dtype.compute_dtype())?;
        feeds.push((input.name.clone(), t));
    }
    if repeat > 1 {
        let sync = |out: &edgeinfer::exec::RunOutputs| -> Result<()> {
            for (_, t) in &out.outputs {
                t.to_device(&candle_core::Device::Cpu)?;
            }
            Ok(())
        };
        for _ in 0..warmup.max(1) {
            sync(&rt.run_tensors(&feeds, &[])?)?;
        }
        let mut ms = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            let t0 = std::time::Instant::now();
            sync(&rt.run_tensors(&feeds, &[])?)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        println!(
            "latency over {repeat} runs on {}: median {:.2} ms, p95 {:.2} ms, min {:.2} ms",
            rt.device().name,
            pick(0.5),
            pick(0.95),
            ms[0]
        );
    }
    let started = std::time::Instant::now();
    let out = rt.run_tensors(&feeds, &[])?;
    let mut w = ModelWriter::new();
    for (name, t) in &out.outputs {
        let host = t.to_device(&candle_core::Device::Cpu)?;
        // candle holds bools as u8; keep ONNX's element type in the dump.
        match graph.values.get(name).map(|v| v.dtype) {
            Some(DType::Bool) => {
                let bytes = host
                    .flatten_all()?
                    .to_dtype(candle_core::DType::U8)?
                    .to_vec1::<u8>()?;
                w.add_tensor(name.clone(), DType::Bool, host.dims().to_vec(), bytes)?;
            }
            _ => w.add_candle(name.clone(), &host)?,
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "ran {} outputs in {ms:.1} ms on {}",
        out.outputs.len(),
        rt.device().name
    );
    match dump {
        Some(p) => w
            .write(p)
            .with_context(|| format!("writing {}", p.display()))?,
        None => {
            for (name, t) in &out.outputs {
                println!("{name}: {:?} {:?}", t.dims(), t.dtype());
            }
        }
    }
    Ok(())
}
