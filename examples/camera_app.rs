//! A camera app that embeds edgeinfer: a synthetic camera at 30 fps into a two-variant ladder
//! (the embedded MobileNetV2 and a 40 %-pruned copy made here), inside a 50 ms budget, with
//! CAM heat maps. Stops after 150 frames and prints the summary.
//!
//! `cargo run --release --example camera_app`

use std::sync::Arc;
use std::time::Duration;

use edgeinfer::explain::{Choice, ExplainOptions, Method};
use edgeinfer::model::ModelFile;
use edgeinfer::pipeline::{Frame, Pipeline, PipelineOptions, SyntheticSource};
use edgeinfer::prune::{prune, Criterion, PruneOptions, Scope};
use edgeinfer::report::Verdict;
use edgeinfer::Runtime;
use tokio_stream::StreamExt;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/mobilenet_v2.safetensors"
);

fn main() -> anyhow::Result<()> {
    let budget = Duration::from_millis(50);
    let explain = ExplainOptions {
        choice: Choice::Use(Method::Cam),
        ..Default::default()
    };
    let build = |path: &std::path::Path, name: &str| {
        Runtime::builder()
            .model(path)
            .budget(budget)
            .explain(explain.clone())
            .variant(name)
            .build()
    };
    // The lighter variant: the same file format, 40 % of the conv channels removed.
    let dir = tempfile_dir()?;
    let light_path = dir.join("mobilenet_v2-p40.safetensors");
    let (pruned, _plan) = prune(
        &ModelFile::open(MODEL)?,
        &PruneOptions {
            ratio: 0.4,
            criterion: Criterion::L1,
            scope: Scope::Global,
            round_to: 8,
            keep: Vec::new(),
        },
    )?;
    pruned.write(&light_path)?;
    let heavy = Arc::new(build(std::path::Path::new(MODEL), "full")?);
    let light = Arc::new(build(&light_path, "p40")?);

    // The sync API: one frame, one report.
    let frame = Frame::from_image(
        0,
        "still",
        SyntheticSource::new(640, 480, 30.0, None).picture(0),
    );
    let report = heavy.infer(&frame);
    println!(
        "one frame: {} in {:.1} ms",
        report.top[0].class, report.total_ms
    );

    // The async API: a stream of reports from a camera.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pipeline = Pipeline::new(vec![heavy, light], PipelineOptions::default())?;
    let summary = tokio.block_on(async {
        let mut reports = pipeline.stream(SyntheticSource::new(640, 480, 30.0, Some(150)));
        while let Some(r) = reports.next().await {
            if r.verdict == Verdict::Dropped {
                continue;
            }
            let hot = r.explain.as_ref().and_then(|e| e.get("bbox").cloned());
            if r.frame % 30 == 0 {
                println!(
                    "frame {:>3} {:<5} {:>5.1} ms  class {:>4}  hot box {}",
                    r.frame,
                    r.variant,
                    r.total_ms,
                    r.top.first().map(|t| t.class).unwrap_or(0),
                    hot.map(|b| b.to_string()).unwrap_or_else(|| "-".into())
                );
            }
        }
        reports.summary()
    });
    print!("{}", summary.table());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A scratch folder under the system's temp dir for the pruned copy.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("edgeinfer-camera-app-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
