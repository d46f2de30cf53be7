//! The end-of-run summary: every frame accounted for, latency per stage, time per variant.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use serde_json::{json, Value};

use super::Histogram;
use crate::report::{FrameReport, Verdict};

/// Stage names in report order; `total` is capture to the end of the last stage.
const STAGES: [&str; 7] = [
    "queue",
    "decode",
    "preprocess",
    "infer",
    "explain",
    "post",
    "total",
];

/// A variant switch as the summary lists it.
#[derive(Debug, Clone)]
pub struct SwitchRecord {
    /// The frame whose latency caused it.
    pub frame: u64,
    /// Variant name before.
    pub from: String,
    /// Variant name after.
    pub to: String,
    /// The p95 that decided it.
    pub p95_ms: f64,
}

/// Counts and latency distributions of a run, fed one report at a time.
#[derive(Debug, Clone)]
pub struct Summary {
    started: Instant,
    budget_ms: f64,
    frames_in: u64,
    ok: u64,
    over_budget: u64,
    errors: u64,
    dropped: BTreeMap<String, u64>,
    stages: BTreeMap<&'static str, Histogram>,
    variants: BTreeMap<String, (u64, f64)>,
    explain: BTreeMap<String, u64>,
    degraded: BTreeMap<String, u64>,
    switches: Vec<SwitchRecord>,
    probes: u64,
}

impl Summary {
    /// An empty summary for a run with this budget, its clock started now.
    pub fn new(budget_ms: f64) -> Self {
        Summary {
            started: Instant::now(),
            budget_ms,
            frames_in: 0,
            ok: 0,
            over_budget: 0,
            errors: 0,
            dropped: BTreeMap::new(),
            stages: STAGES.iter().map(|&s| (s, Histogram::default())).collect(),
            variants: BTreeMap::new(),
            explain: BTreeMap::new(),
            degraded: BTreeMap::new(),
            switches: Vec::new(),
            probes: 0,
        }
    }

    /// Counts one frame's report.
    pub fn add(&mut self, r: &FrameReport) {
        self.frames_in += 1;
        match r.verdict {
            Verdict::Ok => self.ok += 1,
            Verdict::OverBudget => self.over_budget += 1,
            Verdict::Error => self.errors += 1,
            Verdict::Dropped => {
                let why = r.reason.clone().unwrap_or_else(|| "unknown".into());
                *self.dropped.entry(why).or_default() += 1;
            }
        }
        for d in &r.degraded {
            *self.degraded.entry(d.clone()).or_default() += 1;
        }
        if !matches!(r.verdict, Verdict::Ok | Verdict::OverBudget) {
            return;
        }
        let s = &r.stages;
        let values = [
            s.queue,
            Some(s.decode),
            Some(s.preprocess),
            Some(s.infer),
            s.explain,
            Some(s.post),
            Some(r.total_ms),
        ];
        for (name, v) in STAGES.iter().zip(values) {
            if let (Some(h), Some(v)) = (self.stages.get_mut(name), v) {
                h.add(v);
            }
        }
        let v = self.variants.entry(r.variant.clone()).or_default();
        v.0 += 1;
        v.1 += r.total_ms - s.queue.unwrap_or(0.0);
        if let Some(m) = r
            .explain
            .as_ref()
            .and_then(|e| e.get("method"))
            .and_then(|m| m.as_str())
        {
            *self.explain.entry(m.to_string()).or_default() += 1;
        }
    }

    /// Records a variant switch.
    pub fn switch(&mut self, record: SwitchRecord) {
        self.switches.push(record);
    }

    /// Counts a probe of a heavier variant.
    pub fn probe(&mut self) {
        self.probes += 1;
    }

    /// Frames that entered (each has exactly one report).
    pub fn frames_in(&self) -> u64 {
        self.frames_in
    }

    /// Frames answered (ok or over budget).
    pub fn processed(&self) -> u64 {
        self.ok + self.over_budget
    }

    /// Dropped frames, all reasons.
    pub fn dropped(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Failed frames.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Switches so far.
    pub fn switches(&self) -> &[SwitchRecord] {
        &self.switches
    }

    /// The `q` quantile of a stage (`queue`, `decode`, `preprocess`, `infer`, `explain`,
    /// `post`, `total`) over processed frames.
    pub fn stage_quantile(&self, stage: &str, q: f64) -> Option<f64> {
        self.stages.get(stage)?.quantile(q)
    }

    /// Processed frames per second since the summary was made.
    pub fn fps(&self) -> f64 {
        let s = self.started.elapsed().as_secs_f64();
        if s > 0.0 {
            self.processed() as f64 / s
        } else {
            0.0
        }
    }

    /// The summary as JSON (the `--summary` file).
    pub fn to_json(&self) -> Value {
        let stages: serde_json::Map<String, Value> = STAGES
            .iter()
            .filter_map(|&name| {
                let h = self.stages.get(name)?;
                (h.count() > 0).then(|| {
                    (
                        name.to_string(),
                        json!({
                            "n": h.count(),
                            "mean": h.mean(),
                            "p50": h.quantile(0.5),
                            "p95": h.quantile(0.95),
                            "p99": h.quantile(0.99),
                        }),
                    )
                })
            })
            .collect();
        let variants: serde_json::Map<String, Value> = self
            .variants
            .iter()
            .map(|(k, (n, ms))| (k.clone(), json!({"frames": n, "busy_ms": ms})))
            .collect();
        json!({
            "wall_s": self.started.elapsed().as_secs_f64(),
            "budget_ms": self.budget_ms,
            "frames_in": self.frames_in,
            "processed": self.processed(),
            "ok": self.ok,
            "over_budget": self.over_budget,
            "errors": self.errors,
            "dropped": self.dropped,
            "fps": self.fps(),
            "stages_ms": stages,
            "variants": variants,
            "switches": self.switches.iter().map(|s| json!({
                "frame": s.frame, "from": s.from, "to": s.to, "p95_ms": s.p95_ms
            })).collect::<Vec<_>>(),
            "probes": self.probes,
            "explain_methods": self.explain,
            "degraded": self.degraded,
        })
    }

    /// The summary as a table for a terminal.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let dropped: Vec<String> = self
            .dropped
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let _ = writeln!(
            t,
            "frames in {} · processed {} ({} ok, {} over budget) · dropped {}{} · errors {} · {:.1} s, {:.1} fps",
            self.frames_in,
            self.processed(),
            self.ok,
            self.over_budget,
            self.dropped(),
            if dropped.is_empty() { String::new() } else { format!(" ({})", dropped.join(", ")) },
            self.errors,
            self.started.elapsed().as_secs_f64(),
            self.fps()
        );
        let _ = writeln!(
            t,
            "{:<11} {:>8} {:>8} {:>8} {:>8}   (ms, processed frames; budget {:.0} ms)",
            "stage", "p50", "p95", "p99", "mean", self.budget_ms
        );
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        for name in STAGES {
            if let Some(h) = self.stages.get(name).filter(|h| h.count() > 0) {
                let _ = writeln!(
                    t,
                    "{:<11} {:>8} {:>8} {:>8} {:>8}",
                    name,
                    f(h.quantile(0.5)),
                    f(h.quantile(0.95)),
                    f(h.quantile(0.99)),
                    f(h.mean())
                );
            }
        }
        for (k, (n, ms)) in &self.variants {
            let _ = writeln!(t, "variant {k:<14} {n:>6} frames, {:>9.1} ms busy", ms);
        }
        if !self.switches.is_empty() || self.probes > 0 {
            let list: Vec<String> = self
                .switches
                .iter()
                .take(8)
                .map(|s| format!("#{} {}→{} (p95 {:.1})", s.frame, s.from, s.to, s.p95_ms))
                .collect();
            let _ = writeln!(
                t,
                "switches {}{}{} · probes {}",
                self.switches.len(),
                if list.is_empty() { "" } else { ": " },
                list.join(", ") + if self.switches.len() > 8 { ", …" } else { "" },
                self.probes
            );
        }
        if !self.explain.is_empty() || !self.degraded.is_empty() {
            let e: Vec<String> = self
                .explain
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let d: Vec<String> = self
                .degraded
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(
                t,
                "explain: {} · degraded: {}",
                if e.is_empty() {
                    "-".into()
                } else {
                    e.join(", ")
                },
                if d.is_empty() {
                    "-".into()
                } else {
                    d.join(", ")
                }
            );
        }
        t
    }
}
