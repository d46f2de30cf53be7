//! `edgeinfer bench --explain`: what each explain method costs next to one forward pass.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgeinfer::bench::Row as SweepRow;
use edgeinfer::model::{ModelFile, ModelWriter};

use edgeinfer::explain::{Choice, ExplainOptions, Method};
use edgeinfer::runtime::RuntimeBuilder;

/// Benchmarks.
#[derive(Args)]
pub struct BenchCmd {
    /// Explain-method cost against one forward pass, instead of the pruning / dtype sweep.
    #[arg(long)]
    pub explain: bool,
    /// Model files (default: the embedded MobileNetV2; the sweep takes the first).
    #[arg(long, num_args = 1..)]
    pub model: Vec<PathBuf>,
    /// Sweep: pruning ratios (0 = the model as it is).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.4,0.55,0.63")]
    pub ratios: Vec<f32>,
    /// Sweep: weight dtypes (f32, f16, bf16, int8).
    #[arg(long, value_delimiter = ',', default_value = "f16,int8")]
    pub dtypes: Vec<edgeinfer::quant::Target>,
    /// Sweep: pruned widths are multiples of this.
    #[arg(long, default_value_t = 8)]
    pub round_to: usize,
    /// Sweep: top-1 accuracy on this image folder (one sub-folder per class, named by label).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Sweep: fine-tune every pruned variant this many epochs on --train before converting it.
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Sweep: training images for --finetune-epochs (DIR/<label>/...).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Sweep: prune with mean replacement measured on these images (256, spread over the
    /// folder and its sub-folders; see `prune --calibration`).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Sweep: folder for the variants, report.md, report.json and latency_vs_ratio.svg.
    #[arg(long, default_value = "bench-report")]
    pub report: PathBuf,
    /// The image every run uses (default: the embedded cat photo).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Timed runs per measurement (after warm-up); medians are reported.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Sweep: measure the variants in this many interleaved rounds (each round runs every
    /// variant once, in a fresh process, for its share of --runs, alternating the order), and
    /// pool the timings, so a burst of load on a shared host hits every variant alike instead
    /// of one row.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also write the table as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..runs.clamp(1, 5) {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

/// One row of the table.
#[derive(serde::Serialize)]
struct Row {
    model: String,
    method: Method,
    forward_ms: f64,
    forward_with_taps_ms: f64,
    map_ms: f64,
    explain_ms: f64,
    map_fraction: f64,
    explain_fraction: f64,
}

/// Runs the benchmark; `builder` carries the target settings, `default_model` and
/// `default_image` are the embedded ones.
/// `child_args` repeat the target flags (threads, kernels, board) for the measuring processes.
pub fn bench_cmd(
    a: &BenchCmd,
    builder: RuntimeBuilder,
    child_args: &[String],
    default_model: &'static [u8],
    default_image: &'static [u8],
) -> Result<()> {
    if !a.explain {
        return sweep(a, builder, child_args, default_model, default_image);
    }
    let img = match &a.input {
        Some(p) => image::open(p).with_context(|| format!("reading {}", p.display()))?,
        None => image::load_from_memory(default_image)?,
    };
    let models: Vec<Option<&PathBuf>> = if a.model.is_empty() {
        vec![None]
    } else {
        a.model.iter().map(Some).collect()
    };
    let mut rows = Vec::new();
    println!(
        "{:<22} {:<9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "model", "method", "forward", "+taps", "map", "explain", "map/fwd", "expl/fwd"
    );
    for model in models {
        let name = model
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded:mobilenet_v2".into());
        for method in [
            Method::Cam,
            Method::EigenCam,
            Method::GradCam,
            Method::Rollout,
        ] {
            let opts = ExplainOptions {
                choice: Choice::Use(method),
                budget_aware: false,
                ..Default::default()
            };
            let b = builder.clone().explain(opts);
            let b = match model {
                Some(p) => b.model(p),
                None => b.model_bytes(default_model, "embedded:mobilenet_v2.safetensors"),
            };
            let rt = match b.build() {
                Ok(rt) => rt,
                Err(edgeinfer::Error::Explain { .. }) => continue,
                Err(e) => return Err(e).with_context(|| format!("loading {name}")),
            };
            let ex = rt.explainer().context("no explainer")?;
            let feeds = [rt.image_tensor(&img)?];
            let taps = ex.taps();
            let sync = |o: &edgeinfer::exec::RunOutputs| -> Result<()> {
                for (_, t) in &o.outputs {
                    t.to_device(&candle_core::Device::Cpu)?;
                }
                Ok(())
            };
            let forward = time(a.runs, || sync(&rt.run_tensors(&feeds, &[])?))?;
            let with_taps = time(a.runs, || sync(&rt.run_tensors(&feeds, &taps)?))?;
            let out = rt.run_tensors(&feeds, &taps)?;
            let (logits, _) = rt.explain_tensors(&feeds, method, None)?;
            let class = edgeinfer::runtime::argmax(&logits)?;
            let map = time(a.runs, || {
                ex.raw_map(method, &out.taps, class)?;
                Ok(())
            })?;
            let explain = time(a.runs, || {
                ex.run(method, &out.taps, class)?;
                Ok(())
            })?;
            let row = Row {
                model: name.clone(),
                method,
                forward_ms: forward,
                forward_with_taps_ms: with_taps,
                map_ms: map,
                explain_ms: explain,
                map_fraction: map / forward,
                explain_fraction: explain / forward,
            };
            println!(
                "{:<22} {:<9} {:>7.2} ms {:>7.2} ms {:>6.3} ms {:>6.3} ms {:>8.1}% {:>8.1}%",
                truncate(&row.model, 22),
                method.name(),
                row.forward_ms,
                row.forward_with_taps_ms,
                row.map_ms,
                row.explain_ms,
                100.0 * row.map_fraction,
                100.0 * row.explain_fraction
            );
            rows.push(row);
        }
    }
    eprintln!(
        "medians of {} runs; map = the method's raw map, explain = map + resize to the input, \
         threshold, mask and box (what a frame pays)",
        a.runs
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        let tail: String = s.chars().skip(count - (n - 1)).collect();
        format!("…{tail}")
    }
}

/// `bench-variant` (hidden): measures one model file in a process of its own, so its peak RSS
/// is its own, and prints one JSON line.
#[derive(Args)]
pub struct VariantCmd {
    /// The model file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prepared input.
    #[arg(long)]
    pub input_tensor: PathBuf,
    /// Timed frames.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Peak resident set of this process (Linux `VmHWM`), MB; 0 elsewhere.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs `bench-variant`.
pub fn variant_cmd(a: &VariantCmd, builder: RuntimeBuilder) -> Result<()> {
    let t0 = Instant::now();
    let rt = builder
        .model(&a.model)
        .build()
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let file = ModelFile::open(&a.input_tensor)?;
    let mut feeds = Vec::new();
    for t in file.tensors() {
        let v = file.get(&t.name).context("tensor vanished")?;
        feeds.push((t.name.clone(), v.to_candle(&candle_core::Device::Cpu)?));
    }
    let run = || -> Result<()> {
        for (_, t) in &rt.run_tensors(&feeds, &[])?.outputs {
            t.to_device(&candle_core::Device::Cpu)?;
        }
        Ok(())
    };
    for _ in 0..5 {
        run()?;
    }
    let mut ms = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let t = Instant::now();
        run()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{}",
        serde_json::json!({
            "load_ms": load_ms,
            "ms": ms,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

/// Top-1 accuracy of `rt` over a folder with one sub-folder per class label.
fn accuracy(rt: &edgeinfer::Runtime, dir: &std::path::Path) -> Result<f64> {
    let labels = rt
        .model()
        .labels
        .clone()
        .context("--eval needs a model file with labels")?;
    let samples = edgeinfer::finetune::labelled_images(dir, &labels)?;
    if samples.is_empty() {
        bail!("no images under {}", dir.display());
    }
    let mut correct = 0usize;
    for (f, class) in &samples {
        let img = image::open(f).with_context(|| format!("reading {}", f.display()))?;
        let out = rt.run_tensors(&[rt.image_tensor(&img)?], &[])?;
        correct += usize::from(edgeinfer::runtime::argmax(&out.outputs[0].1)? == *class);
    }
    Ok(correct as f64 / samples.len() as f64)
}

/// The pruning × dtype sweep.
fn sweep(
    a: &BenchCmd,
    builder: RuntimeBuilder,
    child_args: &[String],
    default_model: &'static [u8],
    default_image: &'static [u8],
) -> Result<()> {
    let vdir = a.report.join("variants");
    std::fs::create_dir_all(&vdir).with_context(|| format!("creating {}", vdir.display()))?;
    let base_path = match a.model.first() {
        Some(p) => p.clone(),
        None => {
            let p = vdir.join("base.safetensors");
            std::fs::write(&p, default_model)
                .with_context(|| format!("writing {}", p.display()))?;
            p
        }
    };
    let base = ModelFile::open(&base_path)?;
    let probe = builder.clone().model(&base_path).build()?;
    let budget_ms = probe.budget().as_secs_f64() * 1e3;
    let img = match &a.input {
        Some(p) => image::open(p).with_context(|| format!("reading {}", p.display()))?,
        None => image::load_from_memory(default_image)?,
    };
    let (name, t) = probe.image_tensor(&img)?;
    // The children time on the device this process resolved (`auto` once, here), so every
    // variant runs where the report says it ran.
    let device = probe.device().name.clone();
    let input = a.report.join("input.safetensors");
    let mut w = ModelWriter::new();
    w.add_candle(name, &t.to_device(&candle_core::Device::Cpu)?)?;
    w.write(&input)?;
    drop(probe);
    let total = (a.ratios.len() * a.dtypes.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let exe = std::env::current_exe().context("locating this binary")?;
    let calibration = match &a.calibration {
        Some(dir) => edgeinfer::prune::calibration_images(&base, dir, 256)?,
        None => Vec::new(),
    };
    let mut rows = Vec::new();
    let mut paths = Vec::new();
    for &ratio in &a.ratios {
        let pruned_path = if ratio == 0.0 {
            base_path.clone()
        } else {
            let opts = edgeinfer::prune::PruneOptions {
                ratio,
                criterion: edgeinfer::prune::Criterion::L1,
                scope: edgeinfer::prune::Scope::Global,
                round_to: a.round_to,
                keep: Vec::new(),
            };
            let (w, _) = edgeinfer::prune::prune_calibrated(&base, &opts, &calibration)?;
            let p = vdir.join(format!("p{:.0}.safetensors", ratio * 100.0));
            w.write(&p)?;
            if a.finetune_epochs > 0 {
                let train = a
                    .train
                    .as_ref()
                    .context("--finetune-epochs needs --train DIR")?;
                bar.set_message(format!("fine-tuning p{:.0}", ratio * 100.0));
                let ft = edgeinfer::finetune::FinetuneOptions {
                    epochs: a.finetune_epochs,
                    lr: 1e-3,
                    batch: 16,
                    seed: 0,
                    ..Default::default()
                };
                let (w, _) = edgeinfer::finetune::finetune(
                    &ModelFile::open(&p)?,
                    train,
                    &ft,
                    |_, _, _, _| {},
                )?;
                w.write(&p)?;
            }
            p
        };
        let pruned = ModelFile::open(&pruned_path)?;
        for &dtype in &a.dtypes {
            let variant = format!("p{:.0}-{}", ratio * 100.0, dtype.name());
            bar.set_message(variant.clone());
            let (w, _) = edgeinfer::quant::quantize(&pruned, dtype)?;
            let path = vdir.join(format!("{variant}.safetensors"));
            w.write(&path)?;
            let file = ModelFile::open(&path)?;
            let graph = edgeinfer::graph::Graph::from_model_file(&file)?;
            let st = edgeinfer::graph::stats::stats(&graph, |n| {
                file.get(n).map(|v| (v.info.shape.clone(), v.info.dtype))
            });
            let acc = match &a.eval {
                Some(dir) => {
                    let rt = builder.clone().model(&path).build()?;
                    Some(accuracy(&rt, dir)?)
                }
                None => None,
            };
            rows.push(SweepRow {
                variant,
                ratio: ratio as f64,
                dtype: dtype.name().into(),
                params: st.params,
                macs: st.macs as u64,
                file_bytes: file.file_size() as u64,
                load_ms: 0.0,
                p50_ms: 0.0,
                p95_ms: 0.0,
                p99_ms: 0.0,
                peak_rss_mb: 0.0,
                accuracy: acc,
            });
            paths.push(path);
            bar.inc(1);
        }
    }
    // Timing, in interleaved rounds: variant i's samples pooled over the rounds.
    let rounds = a.rounds.clamp(1, a.runs.max(1));
    let per_round = a.runs.div_ceil(rounds);
    bar.set_position(0);
    bar.set_length((rounds * paths.len()) as u64);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut loads: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut rss = vec![0f64; paths.len()];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..paths.len()).collect()
        } else {
            (0..paths.len()).rev().collect()
        };
        for i in order {
            let variant = &rows[i].variant;
            bar.set_message(format!("timing {variant} (round {}/{rounds})", round + 1));
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("bench-variant")
                .arg("--model")
                .arg(&paths[i])
                .arg("--input-tensor")
                .arg(&input)
                .arg("--runs")
                .arg(per_round.to_string())
                .args(["--device", &device]);
            cmd.args(child_args);
            let out = cmd.output().context("running bench-variant")?;
            if !out.status.success() {
                bail!(
                    "measuring {variant}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let m: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bench-variant output for {variant}"))?;
            let ms = m["ms"]
                .as_array()
                .with_context(|| format!("bench-variant output for {variant} has no timings"))?;
            samples[i].extend(ms.iter().filter_map(|v| v.as_f64()));
            loads[i].push(m["load_ms"].as_f64().unwrap_or(0.0));
            rss[i] = rss[i].max(m["peak_rss_mb"].as_f64().unwrap_or(0.0));
            bar.inc(1);
        }
    }
    for (i, row) in rows.iter_mut().enumerate() {
        let ms = &mut samples[i];
        ms.sort_by(f64::total_cmp);
        row.p50_ms = percentile(ms, 0.5);
        row.p95_ms = percentile(ms, 0.95);
        row.p99_ms = percentile(ms, 0.99);
        row.load_ms = median(std::mem::take(&mut loads[i]));
        row.peak_rss_mb = rss[i];
    }
    bar.finish_and_clear();
    let title = format!("{} on {device} of this machine", base.label());
    edgeinfer::bench::write_report(&a.report, &title, &rows, budget_ms)?;
    print!(
        "{}",
        std::fs::read_to_string(a.report.join("report.md")).unwrap_or_default()
    );
    eprintln!(
        "report: {}/report.md, report.json, latency_vs_ratio.svg",
        a.report.display()
    );
    Ok(())
}
