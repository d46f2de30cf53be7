//! The frame scheduler: a capture thread, inference workers on tokio's blocking pool, and a
//! bounded channel of reports.
//!
//! Between capture and inference sits a one-frame slot. A live source overwrites it (the
//! newest frame wins; the one it replaces is reported `dropped`, reason `stale`); other
//! sources wait until it is free. For live sources, a worker that takes a frame whose deadline
//! has passed, or would pass before the variant in use can answer while a fresher frame could
//! still make it, reports it `dropped` (`deadline`) instead of answering late; frames of files
//! (and `every_frame` runs) are all answered, late ones marked `over_budget`. The variant ladder
//! ([`crate::budget::Ladder`]) picks the model for each frame. Every frame that enters gets
//! exactly one report, also when the run is stopped (`shutdown`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_stream::Stream;

use super::source::{FrameSource, SourceItem};
use super::Frame;
use crate::budget::summary::SwitchRecord;
use crate::budget::{Ladder, LadderOptions, Summary};
use crate::error::{Error, Result};
use crate::report::{FrameReport, Verdict};
use crate::runtime::{Explained, Runtime};

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Frames in flight at once (inference workers). Default 1: on a CPU the engine already
    /// uses every core for one frame, and one frame at a time gives the lowest latency.
    pub workers: usize,
    /// Treat a live source like a file: wait for the engine instead of dropping stale frames
    /// (for recorded video that must be processed whole).
    pub every_frame: bool,
    /// The variant ladder's thresholds.
    pub ladder: LadderOptions,
    /// Reports buffered between the workers and the consumer.
    pub channel: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            workers: 1,
            every_frame: false,
            ladder: LadderOptions::default(),
            channel: 256,
        }
    }
}

/// A frame that entered but will not be run: its report says why.
struct Unrun {
    id: u64,
    source: String,
    captured: Instant,
    reason: String,
    failed: bool,
}

#[derive(Default)]
struct Slot {
    pending: Option<Frame>,
    unrun: std::collections::VecDeque<Unrun>,
    /// No frame will be put any more (end of input, or stopped).
    closed: bool,
}

struct Shared {
    variants: Vec<Arc<Runtime>>,
    names: Vec<String>,
    budget: Duration,
    /// Frames come at the source's pace: stale and deadline drops apply.
    live: bool,
    slot: Mutex<Slot>,
    /// Wakes a pull-mode capture thread when the slot frees up (or the run stops).
    freed: Condvar,
    /// Wakes workers when something is in the slot (or it closed).
    filled: Notify,
    stop: AtomicBool,
    ladder: Mutex<Ladder>,
    summary: Mutex<Summary>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking worker must not take the other frames' reports with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a worker does next.
enum Work {
    Frame(Frame),
    Unrun(Unrun),
    Done,
}

impl Shared {
    async fn take(&self) -> Work {
        loop {
            let notified = self.filled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = lock(&self.slot);
                // Oldest first, so reports keep capture order where they can.
                let unrun_first = match (s.unrun.front(), &s.pending) {
                    (Some(u), Some(f)) => u.id < f.id,
                    (Some(_), None) => true,
                    _ => false,
                };
                if unrun_first {
                    if let Some(u) = s.unrun.pop_front() {
                        return Work::Unrun(u);
                    }
                }
                if let Some(f) = s.pending.take() {
                    self.freed.notify_all();
                    return Work::Frame(f);
                }
                if s.closed {
                    // Wake the next worker too: it must see the close as well.
                    self.filled.notify_one();
                    return Work::Done;
                }
            }
            notified.await;
        }
    }

    /// Puts a captured frame in the slot; returns false when the run is closed (the frame
    /// never entered).
    fn put(&self, frame: Frame, live: bool) -> bool {
        let mut s = lock(&self.slot);
        if !live {
            while s.pending.is_some() && !s.closed {
                s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
        if s.closed {
            return false;
        }
        if let Some(old) = s.pending.replace(frame) {
            s.unrun.push_back(Unrun {
                id: old.id,
                source: old.source,
                captured: old.captured,
                reason: "stale".into(),
                failed: false,
            });
        }
        drop(s);
        self.filled.notify_one();
        true
    }

    fn put_unrun(&self, u: Unrun) -> bool {
        let mut s = lock(&self.slot);
        if s.closed {
            return false;
        }
        s.unrun.push_back(u);
        drop(s);
        self.filled.notify_one();
        true
    }

    fn close(&self) {
        lock(&self.slot).closed = true;
        self.freed.notify_all();
        self.filled.notify_one();
    }
}

/// Stops a running pipeline: capture ends, the waiting frame is reported `dropped`
/// (`shutdown`), frames already in the engine finish, then the stream ends.
#[derive(Clone)]
pub struct StopHandle(Arc<Shared>);

impl StopHandle {
    /// Asks the pipeline to stop (idempotent).
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        self.0.close();
    }
}

/// The reports of a running pipeline, in the order they are finished. Ends when the source
/// ends (or after [`StopHandle::stop`]) and every frame has its report.
pub struct ReportStream {
    rx: mpsc::Receiver<Explained>,
    shared: Arc<Shared>,
}

impl ReportStream {
    /// The next report with its explanation and decoded frame (for overlays); `None` at the end.
    pub async fn next_explained(&mut self) -> Option<Explained> {
        self.rx.recv().await
    }

    /// A handle that stops the run (e.g. from a Ctrl-C handler).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// The summary so far (complete once the stream has ended).
    pub fn summary(&self) -> Summary {
        lock(&self.shared.summary).clone()
    }

    /// The variant in use now (0 = the most accurate) and its name.
    pub fn current_variant(&self) -> (usize, String) {
        let i = lock(&self.shared.ladder).current();
        (i, self.shared.names[i].clone())
    }
}

impl Stream for ReportStream {
    type Item = FrameReport;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameReport>> {
        self.rx.poll_recv(cx).map(|x| x.map(|x| x.report))
    }
}

/// Loaded model variants (most accurate first) and how to schedule frames onto them.
pub struct Pipeline {
    variants: Vec<Arc<Runtime>>,
    options: PipelineOptions,
}

impl Pipeline {
    /// A pipeline over `variants`, most accurate first; all keep their weights loaded, so a
    /// switch costs nothing. They must share one budget. Each variant answers one blank frame
    /// here (blocking), so the first real frame does not pay for first-touch page faults.
    pub fn new(variants: Vec<Arc<Runtime>>, options: PipelineOptions) -> Result<Self> {
        let first = variants.first().ok_or_else(|| Error::InvalidGraph {
            file: "(pipeline)".into(),
            reason: "a pipeline needs at least one model".into(),
        })?;
        if let Some(v) = variants.iter().find(|v| v.budget() != first.budget()) {
            return Err(Error::InvalidGraph {
                file: v.model().file.label().to_string(),
                reason: format!(
                    "variant budget {:?} differs from the first variant's {:?}",
                    v.budget(),
                    first.budget()
                ),
            });
        }
        for v in &variants {
            let blank = warm_up_image(v);
            let r = v.infer(&Frame::from_image(u64::MAX, "warm-up", blank));
            if r.verdict == Verdict::Error {
                return Err(Error::InvalidGraph {
                    file: v.model().file.label().to_string(),
                    reason: format!("cannot answer a frame: {}", r.error.unwrap_or_default()),
                });
            }
        }
        Ok(Pipeline { variants, options })
    }

    /// Variant names, as reports carry them (unique: a repeated name gets `#<index>`).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (i, v) in self.variants.iter().enumerate() {
            let n = v.variant().to_string();
            names.push(if names.contains(&n) {
                format!("{n}#{i}")
            } else {
                n
            });
        }
        names
    }

    /// Starts capture and inference; must be called inside a tokio runtime (multi-threaded:
    /// inference runs on its blocking pool).
    pub fn stream(self, mut source: impl FrameSource) -> ReportStream {
        let budget = self.variants[0].budget();
        let budget_ms = budget.as_secs_f64() * 1e3;
        let names = self.names();
        let live = source.is_live() && !self.options.every_frame;
        let shared = Arc::new(Shared {
            ladder: Mutex::new(Ladder::new(
                self.variants.len(),
                budget_ms,
                self.options.ladder.clone(),
            )),
            variants: self.variants,
            names,
            budget,
            live,
            slot: Mutex::new(Slot::default()),
            freed: Condvar::new(),
            filled: Notify::new(),
            stop: AtomicBool::new(false),
            summary: Mutex::new(Summary::new(budget_ms)),
        });
        let (tx, rx) = mpsc::channel(self.options.channel.max(1));
        // A plain thread, not the blocking pool: a source blocked in a read (stdin, a camera)
        // must not keep the runtime from shutting down.
        let cap = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("edgeinfer-capture".into())
            .spawn(move || {
                while !cap.stop.load(Ordering::SeqCst) {
                    let entered = match source.next_item() {
                        None => break,
                        Some(SourceItem::Frame(f)) => {
                            tracing::trace!(frame = f.id, "captured");
                            cap.put(f, live)
                        }
                        Some(SourceItem::Failed {
                            id,
                            source,
                            captured,
                            reason,
                        }) => cap.put_unrun(Unrun {
                            id,
                            source,
                            captured,
                            reason,
                            failed: true,
                        }),
                    };
                    if !entered {
                        break;
                    }
                }
                cap.close();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the capture thread: {e}");
            shared.close();
        }
        for _ in 0..self.options.workers.max(1) {
            tokio::spawn(worker(shared.clone(), tx.clone()));
        }
        ReportStream { rx, shared }
    }
}

/// A mid-grey image of the model's input size.
fn warm_up_image(rt: &Runtime) -> image::DynamicImage {
    let (w, h) = match rt
        .model()
        .exec
        .graph()
        .inputs
        .first()
        .map(|i| i.shape.as_slice())
    {
        Some(&[_, _, h, w]) if h > 0 && w > 0 => (w as u32, h as u32),
        _ => (224, 224),
    };
    image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([128; 3])))
}

async fn worker(shared: Arc<Shared>, tx: mpsc::Sender<Explained>) {
    loop {
        let frame = match shared.take().await {
            Work::Done => break,
            Work::Unrun(u) => {
                let rt = &shared.variants[lock(&shared.ladder).current()];
                let r = rt.unprocessed_report(u.id, &u.source, u.captured, &u.reason, u.failed);
                if !emit(&shared, &tx, bare(r)).await {
                    break;
                }
                continue;
            }
            Work::Frame(f) => f,
        };
        let (current, estimate) = {
            let l = lock(&shared.ladder);
            let c = l.current();
            (c, l.median(c).map(|ms| Duration::from_secs_f64(ms / 1e3)))
        };
        let unrun = |reason: &str| {
            shared.variants[current].unprocessed_report(
                frame.id,
                &frame.source,
                frame.captured,
                reason,
                false,
            )
        };
        if shared.stop.load(Ordering::SeqCst) {
            if !emit(&shared, &tx, bare(unrun("shutdown"))).await {
                break;
            }
            continue;
        }
        let age = frame.captured.elapsed();
        // Answering after the deadline is answering wrong; when the variant could answer a
        // fresher frame in time, skip this one and wait for it.
        let late = shared.live
            && (age >= shared.budget
                || estimate.is_some_and(|e| e < shared.budget && age + e > shared.budget));
        if late {
            if !emit(&shared, &tx, bare(unrun("deadline"))).await {
                break;
            }
            continue;
        }
        // Picked only for a frame that will run, so a probe is never spent on a dropped one.
        let pick = lock(&shared.ladder).pick();
        let rt = shared.variants[pick.variant].clone();
        let runner = rt.clone();
        let id = frame.id;
        let source = frame.source.clone();
        let captured = frame.captured;
        let mut x = match tokio::task::spawn_blocking(move || runner.infer_explained(&frame)).await
        {
            Ok(x) => x,
            Err(e) => bare(rt.unprocessed_report(
                id,
                &source,
                captured,
                &format!("the inference task failed: {e}"),
                true,
            )),
        };
        if x.report.verdict != Verdict::Error {
            let busy = x.report.total_ms - x.report.stages.queue.unwrap_or(0.0);
            let switched = lock(&shared.ladder).record(pick.variant, busy);
            let mut summary = lock(&shared.summary);
            if pick.probe {
                summary.probe();
            }
            if let Some(s) = switched {
                tracing::info!(
                    frame = id,
                    from = %shared.names[s.from],
                    to = %shared.names[s.to],
                    p95_ms = s.p95_ms,
                    "variant switch"
                );
                summary.switch(SwitchRecord {
                    frame: id,
                    from: shared.names[s.from].clone(),
                    to: shared.names[s.to].clone(),
                    p95_ms: s.p95_ms,
                });
            }
        }
        x.report.variant = shared.names[pick.variant].clone();
        if pick.variant > 0 {
            x.report
                .degraded
                .insert(0, format!("variant:{}", shared.names[pick.variant]));
        }
        if !emit(&shared, &tx, x).await {
            break;
        }
    }
}

fn bare(report: FrameReport) -> Explained {
    Explained {
        report,
        explanation: None,
        image: None,
    }
}

/// Counts the report and hands it on; false when the consumer has gone.
async fn emit(shared: &Shared, tx: &mpsc::Sender<Explained>, x: Explained) -> bool {
    lock(&shared.summary).add(&x.report);
    if tx.send(x).await.is_err() {
        // Nobody listens any more: stop capturing so the run ends.
        shared.stop.store(true, Ordering::SeqCst);
        shared.close();
        return false;
    }
    true
}
