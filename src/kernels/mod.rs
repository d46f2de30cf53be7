//! Our own CPU kernels for the shapes where candle's generic path is slow: a packed GEMM with
//! a fused epilogue (convolutions, linear layers), Winograd and depthwise convolution, pooling, resizing,
//! row-wise softmax and LayerNorm, the layout and elementwise ops between them, and the
//! activations the epilogues apply. They read and write plain slices (the executor's arena),
//! take temporaries from per-thread [`scratch`] pools, and split work over [`par`]'s threads.
//! Each is checked against the candle reference in its tests.

pub mod act;
pub mod ahead;
pub mod bottleneck;
pub mod channels_last;
pub mod conv;
pub mod depthwise;
#[cfg(target_arch = "x86_64")]
mod dw3x3;
pub mod gemm;
pub mod layout;
pub mod nchwc;
pub mod pages;
pub mod par;
pub mod pool;
pub mod resize;
pub mod rowwise;
pub mod scratch;
#[cfg(target_arch = "x86_64")]
pub mod taps;
pub mod winograd;

/// The lanes `j` of a 16-lane load at column `base` of a row of `w` values that fall inside
/// the row (`0 ≤ base + j < w`): masked loads with it stand in for zero padding, and the
/// lanes outside are not read.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes_in_row(base: isize, w: usize) -> std::arch::x86_64::__mmask16 {
    let start = (-base).clamp(0, 16) as u32;
    let end = (w as isize - base).clamp(0, 16) as u32;
    if end <= start {
        return 0;
    }
    (((1u32 << end) - 1) & !((1u32 << start) - 1)) as std::arch::x86_64::__mmask16
}

/// Seeded pseudo-random data for the kernels' tests (reproducible failures, no dependency).
#[cfg(test)]
pub(crate) mod testutil {
    /// `n` values in [-1, 1) from an LCG seeded with `seed`.
    pub fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A xorshift generator of integers below its argument.
    pub fn below(seed: u64) -> impl FnMut(usize) -> usize {
        let mut state = seed;
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        }
    }
}
