//! `edgeinfer bench --explain`: what each explain method costs next to one forward pass.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use edgeinfer::explain::{Choice, ExplainOptions, Method};
use edgeinfer::runtime::RuntimeBuilder;

/// Benchmarks.
#[derive(Args)]
pub struct BenchCmd {
    /// Explain-method cost against one forward pass (the only benchmark so far).
    #[arg(long)]
    pub explain: bool,
    /// Model files (default: the embedded MobileNetV2).
    #[arg(long, num_args = 1..)]
    pub model: Vec<PathBuf>,
    /// The image every run uses (default: the embedded cat photo).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Timed runs per measurement (after warm-up); medians are reported.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
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
pub fn bench_cmd(
    a: &BenchCmd,
    builder: RuntimeBuilder,
    default_model: &'static [u8],
    default_image: &'static [u8],
) -> Result<()> {
    if !a.explain {
        bail!("nothing to benchmark: give --explain (pruning and dtype sweeps are not built yet)");
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
