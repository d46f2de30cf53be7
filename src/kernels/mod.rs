//! Our own CPU kernels for the shapes where candle's generic path is slow: a packed GEMM with
//! a fused epilogue (convolutions, linear layers), depthwise convolution, and the activations
//! those epilogues apply. Each is checked against the candle reference in its tests.

pub mod act;
pub mod conv;
pub mod depthwise;
pub mod gemm;
pub mod par;
pub mod pool;
pub mod rowwise;
pub mod winograd;
