//! The per-frame report: one JSON object per frame, JSON lines on disk.

use serde::{Deserialize, Serialize};

/// The budget verdict of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Answered within the budget.
    Ok,
    /// Answered, but late.
    OverBudget,
    /// Not processed (stale, deadline passed, shutdown).
    Dropped,
    /// Failed (bad frame, bad tensor, engine error); `error` says why.
    Error,
}

/// Milliseconds per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stages {
    /// Waiting between capture and the start of decoding (the scheduler's queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<f64>,
    /// Reading and decoding the frame.
    pub decode: f64,
    /// Resize, crop, normalise, layout.
    pub preprocess: f64,
    /// The model.
    pub infer: f64,
    /// The explanation, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<f64>,
    /// Turning outputs into top-k / summaries.
    pub post: f64,
}

/// One class of a classifier's top-k.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopClass {
    /// Class index.
    pub class: usize,
    /// Label from the model file, when it has labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Softmax probability (or the raw output when the model already outputs probabilities).
    pub score: f32,
}

/// Shape of a non-classifier output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSummary {
    /// Output name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// Everything about one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameReport {
    /// Frame number within the run.
    pub frame: u64,
    /// Where it came from (file path, camera).
    pub source: String,
    /// Model name.
    pub model: String,
    /// Model variant (e.g. `p40-f16`), `base` for the model as imported.
    pub variant: String,
    /// Device that ran it.
    pub device: String,
    /// The frame's budget.
    pub budget_ms: f64,
    /// Wall time from capture (or the call, for frames made on the spot) to the end of the last
    /// stage; the verdict compares it with the budget.
    pub total_ms: f64,
    /// Verdict.
    pub verdict: Verdict,
    /// Time per stage.
    pub stages: Stages,
    /// Top-k classes, for classifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopClass>,
    /// Output shapes, for other models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputSummary>,
    /// The explanation (filled by the explain layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<serde_json::Value>,
    /// What was given up to stay in budget.
    pub degraded: Vec<String>,
    /// Why the frame was dropped (`stale`, `deadline`, `shutdown`), for `dropped` verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the frame failed, for `error` verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
