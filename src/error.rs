//! The crate's error type. Every variant names the input that caused it (file, tensor, node,
//! frame) so a user can act on the message without a debugger.

use crate::model::ModelError;

/// Errors from loading, importing, planning and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file itself is malformed (truncated, lying header, ...).
    #[error(transparent)]
    Model(#[from] ModelError),

    /// The ONNX file could not be read or decoded.
    #[error("{path}: cannot read ONNX model: {reason}")]
    OnnxRead {
        /// The ONNX file.
        path: String,
        /// What went wrong.
        reason: String,
    },

    /// An op, attribute value, dtype or shape we do not run. `unsupported` stays in the
    /// message: scripts (the conformance runner) classify on it.
    #[error("unsupported: {what} (node '{node}', op {op}, opset {opset})")]
    Unsupported {
        /// The node's name (or its first output when unnamed).
        node: String,
        /// The ONNX op type.
        op: String,
        /// The model's default-domain opset.
        opset: i64,
        /// What exactly is not supported.
        what: String,
    },

    /// The ONNX graph is inconsistent (missing value, bad attribute type, ...).
    #[error("invalid model: node '{node}' ({op}): {reason}")]
    InvalidNode {
        /// The node's name.
        node: String,
        /// The op type.
        op: String,
        /// What is wrong.
        reason: String,
    },

    /// The graph stored in a model file's metadata is missing or inconsistent with its tensors.
    #[error("{file}: invalid graph: {reason}")]
    InvalidGraph {
        /// The model file.
        file: String,
        /// What is wrong.
        reason: String,
    },

    /// A tensor given to the runtime has the wrong name, shape or dtype.
    #[error("input '{name}': {reason}")]
    BadInput {
        /// The graph input (or tensor) name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A node failed while running.
    #[error("node '{node}' ({op}) failed: {source}")]
    Exec {
        /// The node's name.
        node: String,
        /// Its op.
        op: String,
        /// The tensor engine's error (boxed: it is large and errors are rare).
        #[source]
        source: Box<candle_core::Error>,
    },

    /// A frame could not be decoded or preprocessed.
    #[error("frame {frame} ({source_name}): {reason}")]
    Frame {
        /// The frame number.
        frame: u64,
        /// Where it came from (file name, camera).
        source_name: String,
        /// What went wrong.
        reason: String,
    },

    /// The requested device cannot be used.
    #[error("device {requested}: {reason}")]
    Device {
        /// What was asked for (`cuda:0`, ...).
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A board profile that cannot be used (unknown name, bad key or value).
    #[error("board {board}: {reason}")]
    Board {
        /// The board's name or file.
        board: String,
        /// What is wrong, naming the key.
        reason: String,
    },

    /// The model does not fit the board's memory budget.
    #[error(
        "model {model} needs about {need_mb:.0} MB (weights {weights_mb:.0} MB + activations \
         {activations_mb:.0} MB + workspace {workspace_mb:.0} MB), board {board} allows {budget_mb} MB"
    )]
    OverMemory {
        /// The model.
        model: String,
        /// The board.
        board: String,
        /// The estimate in MB.
        need_mb: f64,
        /// Its weights part.
        weights_mb: f64,
        /// Its activations part.
        activations_mb: f64,
        /// Its workspace part.
        workspace_mb: f64,
        /// The board's memory budget.
        budget_mb: u64,
    },

    /// File system errors outside the model file reader. The OS error is part of the message
    /// (not a chained source), so it is printed once however the error is displayed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },

    /// An explanation could not be made (no suitable layer, bad target class, ...).
    #[error("explain ({method}): {reason}")]
    Explain {
        /// The method asked for.
        method: String,
        /// Why it cannot run.
        reason: String,
    },

    /// Tensor engine errors outside a node (loading weights, moving tensors).
    #[error("tensor engine: {0}")]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(Box::new(e))
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
