//! Our own CPU kernels for the shapes where candle's generic path is slow. Each one is checked
//! against the candle reference in its tests.

pub mod depthwise;
