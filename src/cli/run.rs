//! `run` on a stream of frames: the source flags, the scheduler, the sinks (JSON lines,
//! overlays, raw maps), the live status line and the end-of-run summary.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use edgeinfer::budget::LadderOptions;
use edgeinfer::pipeline::raw::parse_size;
use edgeinfer::pipeline::source::parse_fps;
use edgeinfer::pipeline::{
    FileSource, FrameSource, Pipeline, PipelineOptions, PixelFormat, RawSource, SyntheticSource,
};
use edgeinfer::report::{FrameReport, Verdict};
use edgeinfer::Runtime;

use super::explain::{MapDump, OverlaySink};

/// Where frames come from and how they are scheduled.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Image files, folders of images, or glob patterns (quoted), in order.
    #[arg(long, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Raw video frames of this size on stdin (e.g. 1280x720), as `ffmpeg -f rawvideo -` or
    /// GStreamer's `fdsink` write them.
    #[arg(long, value_name = "WxH", conflicts_with_all = ["input", "synthetic"])]
    pub raw: Option<String>,
    /// Pixel format of --raw frames: rgb24, bgr24, gray8, nv12.
    #[arg(long, default_value = "rgb24")]
    pub pix: PixelFormat,
    /// With --raw: release frames at this rate (replaying a recording as a camera would send
    /// it); without, frames are taken as fast as they arrive.
    #[arg(long, value_parser = parse_fps)]
    pub fps: Option<f64>,
    /// A synthetic camera: WxH@FPS[:N] (N frames, endless without), a deterministic moving
    /// pattern, for soak tests and benchmarks without a camera.
    #[arg(long, value_name = "WxH@FPS[:N]", conflicts_with = "input")]
    pub synthetic: Option<String>,
    /// A V4L2 camera (/dev/videoN or N); needs the `v4l2` build feature.
    #[arg(long, conflicts_with_all = ["input", "raw", "synthetic"])]
    pub v4l2: Option<String>,
    /// With --v4l2: capture size WxH (default: the camera's current one).
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,
    /// Process every frame of a live source (wait instead of dropping stale frames): for
    /// recorded video that must be processed whole.
    #[arg(long)]
    pub every_frame: bool,
    /// Frames in the engine at once.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Variant ladder: switch to the next lighter model when the current one's rolling p95
    /// exceeds this fraction of the budget.
    #[arg(long, default_value_t = 0.9)]
    pub switch_at: f64,
    /// Variant ladder: switch back when the heavier model's p95 × (1 + this) fits.
    #[arg(long, default_value_t = 0.2)]
    pub hysteresis: f64,
    /// Variant ladder: while on a lighter model, run one frame in N on the next heavier one
    /// to see whether it fits again (0: never).
    #[arg(long, default_value_t = 30)]
    pub probe_every: u64,
    /// Write the end-of-run summary here as JSON (it is always printed to stderr).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// No live status line (it is off anyway when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

impl PipelineArgs {
    /// True when a frame source is given.
    pub fn has_source(&self) -> bool {
        !self.input.is_empty()
            || self.raw.is_some()
            || self.synthetic.is_some()
            || self.v4l2.is_some()
    }

    fn options(&self) -> Result<PipelineOptions> {
        if !(self.switch_at > 0.0 && self.switch_at.is_finite()) {
            bail!(
                "--switch-at {}: expected a positive fraction of the budget",
                self.switch_at
            );
        }
        if !(self.hysteresis >= 0.0 && self.hysteresis.is_finite()) {
            bail!("--hysteresis {}: expected a fraction >= 0", self.hysteresis);
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        Ok(PipelineOptions {
            workers: self.workers,
            every_frame: self.every_frame,
            ladder: LadderOptions {
                switch_at: self.switch_at,
                hysteresis: self.hysteresis,
                probe_every: self.probe_every,
                ..LadderOptions::default()
            },
            ..PipelineOptions::default()
        })
    }

    fn source(&self) -> Result<Box<dyn FrameSource>> {
        if let Some(spec) = &self.synthetic {
            let s = SyntheticSource::parse(spec).map_err(anyhow::Error::msg)?;
            return Ok(Box::new(s));
        }
        if let Some(size) = &self.raw {
            let size = parse_size(size).map_err(anyhow::Error::msg)?;
            let s = RawSource::new(std::io::stdin(), "stdin", size, self.pix, self.fps)
                .map_err(anyhow::Error::msg)?;
            return Ok(Box::new(s));
        }
        if let Some(dev) = &self.v4l2 {
            return v4l2_source(dev, self.size.as_deref(), self.fps);
        }
        let files = FileSource::new(&self.input)?;
        if files.is_empty() {
            bail!("no images found in {:?}", self.input);
        }
        Ok(Box::new(files))
    }
}

#[cfg(all(feature = "v4l2", target_os = "linux"))]
fn v4l2_source(dev: &str, size: Option<&str>, fps: Option<f64>) -> Result<Box<dyn FrameSource>> {
    let size = size
        .map(parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    Ok(Box::new(edgeinfer::pipeline::v4l2::V4l2Source::open(
        dev, size, fps,
    )?))
}

#[cfg(not(all(feature = "v4l2", target_os = "linux")))]
fn v4l2_source(dev: &str, _: Option<&str>, _: Option<f64>) -> Result<Box<dyn FrameSource>> {
    bail!("--v4l2 {dev}: this binary was built without V4L2 support (build with --features v4l2, Linux only)")
}

/// Writes one JSON object per line, to a file or stdout. Each line is flushed as it is
/// written, so an interrupted run leaves whole lines only.
pub struct JsonLines {
    out: Box<dyn Write>,
}

impl JsonLines {
    /// To `path`, or stdout.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let out: Box<dyn Write> = match path {
            Some(p) => Box::new(BufWriter::new(
                File::create(p).with_context(|| format!("creating {}", p.display()))?,
            )),
            None => Box::new(BufWriter::new(std::io::stdout())),
        };
        Ok(JsonLines { out })
    }

    /// One report, as one line.
    pub fn write(&mut self, r: &FrameReport) -> Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }

    /// Flushes.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// What the run writes besides the summary.
pub struct Sinks<'a> {
    /// JSON lines file (stdout when `None`).
    pub jsonl: Option<&'a Path>,
    /// Overlay folder.
    pub out: Option<&'a Path>,
    /// Raw-map dump file.
    pub dump_maps: Option<&'a Path>,
}

/// Runs `variants` (most accurate first) over the frames `args` names; writes reports, prints
/// the summary. Ctrl-C stops capture and drains: every frame that entered gets its report.
pub fn run_pipeline(args: &PipelineArgs, variants: Vec<Runtime>, sinks: Sinks) -> Result<()> {
    let options = args.options()?;
    let source = args.source()?;
    let variants: Vec<Arc<Runtime>> = variants.into_iter().map(Arc::new).collect();
    let runtimes = variants.clone();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(options.workers + 1)
        .enable_all()
        .build()
        .context("starting the scheduler")?;
    let pipeline = Pipeline::new(variants, options)?;
    let names = pipeline.names();
    let mut sink = JsonLines::create(sinks.jsonl)?;
    let overlays = sinks.out.map(OverlaySink::create).transpose()?;
    let mut dump = sinks.dump_maps.map(|_| MapDump::default());
    let status = status_line(args.quiet);
    let (summary, interrupted) = tokio.block_on(async {
        let mut stream = pipeline.stream(source);
        let stop = stream.stop_handle();
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = interrupted.clone();
        tokio::spawn(async move {
            if stop_signal().await {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                eprintln!("interrupted: finishing the frames in flight (Ctrl-C again quits now)");
                stop.stop();
                if stop_signal().await {
                    std::process::exit(130);
                }
            }
        });
        let mut last_status = Instant::now();
        while let Some(mut x) = stream.next_explained().await {
            if let Some(o) = &overlays {
                let rt = names
                    .iter()
                    .position(|n| *n == x.report.variant)
                    .and_then(|i| runtimes.get(i))
                    .unwrap_or(&runtimes[0]);
                // A picture that cannot be written is that frame's problem, not the run's.
                if let Err(e) = o.write(rt, &mut x) {
                    eprintln!("frame {}: overlay not written: {e:#}", x.report.frame);
                }
            }
            if let (Some(d), Some(e)) = (dump.as_mut(), &x.explanation) {
                d.add(x.report.frame, e)?;
            }
            let r = &x.report;
            if r.verdict == Verdict::Error {
                let msg = r.error.as_deref().unwrap_or("");
                status.suspend(|| eprintln!("frame {} ({}): {msg}", r.frame, r.source));
            }
            sink.write(r)?;
            if !status.is_hidden() && last_status.elapsed() > Duration::from_millis(250) {
                last_status = Instant::now();
                let s = stream.summary();
                status.set_message(format!(
                    "{} frames · {:.1} fps · p95 {} ms · dropped {} · errors {} · variant {}",
                    s.frames_in(),
                    s.fps(),
                    s.stage_quantile("total", 0.95)
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    s.dropped(),
                    s.errors(),
                    stream.current_variant().1
                ));
            }
        }
        anyhow::Ok((
            stream.summary(),
            interrupted.load(std::sync::atomic::Ordering::SeqCst),
        ))
    })?;
    status.finish_and_clear();
    // The capture thread may sit in a read (stdin, a camera); it ends with the process.
    tokio.shutdown_background();
    sink.finish()?;
    if let (Some(d), Some(p)) = (dump, sinks.dump_maps) {
        d.finish(p)?;
    }
    let device = &runtimes[0].device();
    eprintln!(
        "{}on {} ({}); variants: {}",
        if interrupted { "interrupted · " } else { "" },
        device.name,
        device.reason,
        names.join(", ")
    );
    eprint!("{}", summary.table());
    if let Some(p) = &args.summary {
        let json = serde_json::to_string_pretty(&summary.to_json())?;
        std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Waits for Ctrl-C (SIGINT) or, on Unix, SIGTERM (what `systemctl stop` and `docker stop`
/// send); false when no handler could be installed.
async fn stop_signal() -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                r = tokio::signal::ctrl_c() => r.is_ok(),
                _ = term.recv() => true,
            };
        }
    }
    tokio::signal::ctrl_c().await.is_ok()
}

fn status_line(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
