//! The scheduler as a camera app embeds it: behaviour, not timing thresholds. Slowness is
//! made on purpose with the runtime's test hook, so the outcomes do not depend on how fast
//! this machine is.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use edgeinfer::budget::LadderOptions;
use edgeinfer::device::DeviceRequest;
use edgeinfer::pipeline::{FileSource, Pipeline, PipelineOptions, SyntheticSource};
use edgeinfer::report::{FrameReport, Verdict};
use edgeinfer::Runtime;
use tokio_stream::StreamExt;

fn runtime(model: &str, budget: Duration, variant: &str) -> Arc<Runtime> {
    Arc::new(
        Runtime::builder()
            .model(common::root().join(model))
            .device(DeviceRequest::Cpu)
            .budget(budget)
            .variant(variant)
            .build()
            .unwrap(),
    )
}

fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_camera_faster_than_the_engine_gets_one_report_per_frame_and_the_newest_frame_wins() {
    // 100 fps into an engine made to take >= 40 ms a frame; a budget long enough that no
    // deadline is missed, so every drop is a superseded (stale) frame.
    let rt = runtime(
        "models/fashion_resnet.safetensors",
        Duration::from_secs(10),
        "base",
    );
    rt.set_test_delay(Duration::from_millis(40));
    let reports: Vec<FrameReport> = tokio().block_on(async {
        let stream = rt
            .stream(SyntheticSource::new(64, 48, 100.0, Some(60)))
            .unwrap();
        stream.collect().await
    });
    assert_eq!(reports.len(), 60, "one report per frame");
    let ids: BTreeSet<u64> = reports.iter().map(|r| r.frame).collect();
    assert_eq!(ids, (0..60).collect(), "every frame exactly once");
    let processed: Vec<u64> = reports
        .iter()
        .filter(|r| r.verdict != Verdict::Dropped)
        .map(|r| r.frame)
        .collect();
    let dropped: Vec<&FrameReport> = reports
        .iter()
        .filter(|r| r.verdict == Verdict::Dropped)
        .collect();
    assert!(
        dropped.len() >= 30,
        "{} dropped of 60 at 100 fps into a 40 ms engine",
        dropped.len()
    );
    for r in &dropped {
        assert_eq!(r.reason.as_deref(), Some("stale"), "{r:?}");
    }
    // No processed frame waited behind an older one: answers come in capture order, and each
    // dropped frame is older than a frame that was answered after it was captured.
    assert!(
        processed.windows(2).all(|w| w[0] < w[1]),
        "processed out of order: {processed:?}"
    );
    for r in &dropped {
        assert!(
            processed.iter().any(|&p| p > r.frame),
            "frame {} was dropped for nothing newer",
            r.frame
        );
    }
    // Each answered frame waited at most about one engine time in the slot.
    for r in reports.iter().filter(|r| r.verdict != Verdict::Dropped) {
        let q = r.stages.queue.unwrap_or(0.0);
        assert!(q < 1000.0, "frame {} queued {q} ms", r.frame);
    }
}

#[test]
fn files_are_all_answered_in_order_even_when_late() {
    let rt = runtime(
        "models/mobilenet_v2.safetensors",
        Duration::from_micros(1),
        "base",
    );
    let src = FileSource::new(&[common::root().join("models/samples/*.png")]).unwrap();
    assert_eq!(src.len(), 3);
    let reports: Vec<FrameReport> =
        tokio().block_on(async { rt.stream(src).unwrap().collect().await });
    let got: Vec<(u64, Verdict)> = reports.iter().map(|r| (r.frame, r.verdict)).collect();
    assert_eq!(
        got,
        vec![
            (0, Verdict::OverBudget),
            (1, Verdict::OverBudget),
            (2, Verdict::OverBudget)
        ]
    );
    assert!(reports[0].source.ends_with("astronaut.png"), "sorted glob");
}

#[test]
fn the_ladder_switches_to_the_lighter_variant_and_back_when_the_heavy_one_recovers() {
    let budget = Duration::from_millis(60);
    let heavy = runtime("models/fashion_resnet.safetensors", budget, "heavy");
    let light = runtime("models/fashion_resnet.safetensors", budget, "light");
    heavy.set_test_delay(Duration::from_millis(80));
    let options = PipelineOptions {
        ladder: LadderOptions {
            probe_every: 4,
            ..LadderOptions::default()
        },
        ..PipelineOptions::default()
    };
    let pipeline = Pipeline::new(vec![heavy.clone(), light], options).unwrap();
    let (variants, summary) = tokio().block_on(async {
        let mut stream = pipeline.stream(SyntheticSource::new(32, 32, 50.0, None));
        let stop = stream.stop_handle();
        let mut variants = Vec::new();
        let mut recovered = false;
        while let Some(r) = stream.next().await {
            if r.verdict == Verdict::Dropped {
                continue;
            }
            variants.push((r.variant.clone(), r.degraded.clone()));
            if r.variant == "light" && !recovered {
                // The heavy variant's trouble passes: its probes now fit.
                heavy.set_test_delay(Duration::ZERO);
                recovered = true;
            }
            let back = stream.summary().switches().len() >= 2;
            if back || variants.len() > 400 {
                stop.stop();
            }
        }
        (variants, stream.summary())
    });
    let switches: Vec<(String, String)> = summary
        .switches()
        .iter()
        .map(|s| (s.from.clone(), s.to.clone()))
        .collect();
    assert_eq!(
        &switches[..2.min(switches.len())],
        &[
            ("heavy".to_string(), "light".to_string()),
            ("light".to_string(), "heavy".to_string())
        ],
        "frames: {variants:?}"
    );
    // The first answers come from the heavy variant; frames on the light one say so.
    assert_eq!(variants[0].0, "heavy");
    for (v, degraded) in &variants {
        assert_eq!(
            v == "light",
            degraded.contains(&"variant:light".to_string()),
            "{v} {degraded:?}"
        );
    }
    assert_eq!(summary.frames_in(), summary.processed() + summary.dropped());
}

#[test]
fn stopping_reports_every_frame_that_entered() {
    let rt = runtime(
        "models/fashion_resnet.safetensors",
        Duration::from_secs(10),
        "base",
    );
    rt.set_test_delay(Duration::from_millis(20));
    let (reports, summary) = tokio().block_on(async {
        let mut stream = rt
            .stream(SyntheticSource::new(32, 32, 200.0, None))
            .unwrap();
        let stop = stream.stop_handle();
        let mut reports = Vec::new();
        while let Some(r) = stream.next().await {
            reports.push(r);
            if reports.len() == 20 {
                stop.stop();
            }
        }
        (reports, stream.summary())
    });
    assert!(reports.len() >= 20);
    assert_eq!(reports.len() as u64, summary.frames_in());
    let ids: BTreeSet<u64> = reports.iter().map(|r| r.frame).collect();
    assert_eq!(ids.len(), reports.len(), "a frame reported twice");
    // Frames are numbered as captured: none that entered is missing.
    assert_eq!(ids, (0..reports.len() as u64).collect());
}

#[test]
fn a_frame_whose_deadline_passed_in_the_slot_is_dropped_not_answered_late() {
    // A 5 ms budget, frames every 10 ms, an engine of >= 40 ms: the frame waiting when the
    // engine frees up is often older than its budget already.
    let rt = runtime(
        "models/fashion_resnet.safetensors",
        Duration::from_millis(5),
        "base",
    );
    rt.set_test_delay(Duration::from_millis(40));
    let reports: Vec<FrameReport> = tokio().block_on(async {
        rt.stream(SyntheticSource::new(32, 32, 100.0, Some(80)))
            .unwrap()
            .collect()
            .await
    });
    assert_eq!(reports.len(), 80);
    let deadline: Vec<&FrameReport> = reports
        .iter()
        .filter(|r| r.reason.as_deref() == Some("deadline"))
        .collect();
    assert!(!deadline.is_empty(), "no deadline drop in {reports:?}");
    for r in deadline {
        assert_eq!(r.verdict, Verdict::Dropped);
        assert!(
            r.total_ms >= 5.0,
            "dropped at {} ms, before its deadline",
            r.total_ms
        );
    }
}
