//! edgeinfer: runs pruned and quantized vision models from one memory-mapped safetensors file,
//! on CUDA or CPU, and reports every frame against its latency budget.
//!
//! The flow is `import` (ONNX → model file) → [`model::ModelFile`] (mmap) → [`graph::Graph`]
//! (passes) → [`exec::Executor`] → [`runtime::Runtime`] which turns frames into
//! [`report::FrameReport`]s.

#![warn(missing_docs)]

pub mod bench;
pub mod board;
pub mod budget;
pub mod device;
pub mod error;
pub mod exec;
pub mod explain;
pub mod finetune;
pub mod graph;
pub mod import;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod prune;
pub mod quant;
pub mod report;
pub mod runtime;

pub use error::{Error, Result};
pub use runtime::{Runtime, RuntimeBuilder};
