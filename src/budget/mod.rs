//! Per-frame deadlines and stage timing, rolling latency estimates, the model-variant ladder,
//! and the end-of-run summary.

pub mod ladder;
pub mod rolling;
pub mod summary;

use std::time::{Duration, Instant};

pub use ladder::{Ladder, LadderOptions, Switch};
pub use rolling::{Histogram, Rolling};
pub use summary::Summary;

use crate::report::{Stages, Verdict};

/// Times the stages of one frame against its budget.
#[derive(Debug)]
pub struct FrameTimer {
    start: Instant,
    last: Instant,
    budget: Duration,
    /// Stage times so far.
    pub stages: Stages,
}

/// The stages a frame goes through.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// Reading and decoding.
    Decode,
    /// Preprocessing.
    Preprocess,
    /// Inference.
    Infer,
    /// Explanation.
    Explain,
    /// Post-processing.
    Post,
}

impl FrameTimer {
    /// Starts timing a frame now.
    pub fn start(budget: Duration) -> Self {
        Self::start_at(Instant::now(), budget)
    }

    /// Starts timing a frame captured at `captured`: its deadline is `captured + budget`, and
    /// the time it waited before now is its `queue` stage.
    pub fn start_at(captured: Instant, budget: Duration) -> Self {
        let now = Instant::now();
        let start = captured.min(now);
        let waited = now.duration_since(start).as_secs_f64() * 1e3;
        FrameTimer {
            start,
            last: now,
            budget,
            stages: Stages {
                queue: (waited > 0.0).then_some(waited),
                ..Stages::default()
            },
        }
    }

    /// Ends `stage` now, charging it the time since the previous mark.
    pub fn mark(&mut self, stage: Stage) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1e3;
        self.last = now;
        match stage {
            Stage::Decode => self.stages.decode += ms,
            Stage::Preprocess => self.stages.preprocess += ms,
            Stage::Infer => self.stages.infer += ms,
            Stage::Explain => *self.stages.explain.get_or_insert(0.0) += ms,
            Stage::Post => self.stages.post += ms,
        }
    }

    /// Time left before the deadline (zero when past it).
    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.start.elapsed())
    }

    /// Total milliseconds so far.
    pub fn total_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// The budget in milliseconds.
    pub fn budget_ms(&self) -> f64 {
        self.budget.as_secs_f64() * 1e3
    }

    /// Ok or over budget, from the total so far.
    pub fn verdict(&self) -> Verdict {
        if self.start.elapsed() <= self.budget {
            Verdict::Ok
        } else {
            Verdict::OverBudget
        }
    }
}

/// Parses "200ms", "0.2s", "200" (milliseconds).
pub fn parse_budget(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        (s, 1e-3)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("invalid budget '{s}' (e.g. 200ms, 0.5s)")),
    }
}
