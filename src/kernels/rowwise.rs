//! Softmax and LayerNormalization over the last axis of a contiguous row-major f32 buffer, the
//! two row-wise ops of a vision transformer's attention and MLP blocks.
//!
//! Rows are independent, so large buffers are split over rayon's current pool in bands of
//! whole rows; small ones (a few attention heads' worth) run on the calling thread, where a
//! fork would cost more than it saves. Inner loops run in blocks of [`LANES`] independent
//! values that the compiler turns into SIMD; on x86-64 the same code is also compiled for
//! AVX2+FMA and AVX-512 and picked at run time (`EDGEINFER_ISA=portable` forces the baseline,
//! `EDGEINFER_ISA=avx2` caps it at AVX2, as for the GEMM). Nothing is allocated.

use super::gemm::Isa;
use super::par::par_chunks_mut;
#[cfg(test)]
use rayon::prelude::*;

/// Buffers with more elements than this are split over rayon's pool.
const PAR_MIN_ELEMS: usize = 32 * 1024;
/// Smallest band of rows (in elements) handed to one rayon task.
const PAR_BAND_ELEMS: usize = 8 * 1024;
/// Independent values per block: one AVX-512 register, two AVX2 ones. Partial sums kept per
/// lane also make the reductions pairwise-ish, which is more accurate than one running sum.
const LANES: usize = 16;

/// Softmax of every row of `data`, in place: each run of `cols` values becomes
/// `exp(v - max) / Σ exp(v - max)`, subtracting the row maximum so nothing overflows.
///
/// Matches `candle_nn::ops::softmax_last_dim` within 1e-6 relative error per element: `exp`
/// is a polynomial (Cephes `expf`) accurate to about 2 ulp. Values more than 87 below their
/// row maximum give 0 where libm's `exp` would give a subnormal (< 1.7e-38). A row holding
/// NaN gives NaN, and a row whose maximum is +∞ or −∞ gives NaN, as in the reference.
///
/// Does nothing when `cols` is 0.
///
/// # Panics
///
/// If `data.len()` is not a multiple of `cols`.
pub fn softmax_rows(data: &mut [f32], cols: usize) {
    if cols == 0 || data.is_empty() {
        return;
    }
    assert!(
        data.len().is_multiple_of(cols),
        "softmax_rows: {} values are not whole rows of {cols}",
        data.len()
    );
    let isa = Isa::detect();
    if data.len() <= PAR_MIN_ELEMS {
        softmax_band(isa, data, cols);
    } else {
        par_chunks_mut(data, band_len(cols), |_, band| {
            softmax_band(isa, band, cols)
        });
    }
}

/// ONNX LayerNormalization over the last axis: for each run of `cols` values of `x`, writes
/// `(x - mean) / sqrt(var + eps) * gamma + beta` to the same place in `out`, where `mean` and
/// the biased variance `var` are taken over the row in f32 (two passes, so there is no
/// cancellation). `gamma` and `beta` hold one value per column; `beta` may be absent.
///
/// Matches the candle reference (`exec::ops`, `Op::LayerNormalization`) within 1e-6 of the
/// output's magnitude.
///
/// Does nothing when `cols` is 0.
///
/// # Panics
///
/// If `x.len()` is not a multiple of `cols`, if `out` is not as long as `x`, or if `gamma` or
/// `beta` does not hold `cols` values.
pub fn layer_norm_rows(
    x: &[f32],
    out: &mut [f32],
    cols: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
) {
    if cols == 0 || x.is_empty() {
        return;
    }
    assert!(
        x.len().is_multiple_of(cols),
        "layer_norm_rows: {} values are not whole rows of {cols}",
        x.len()
    );
    assert_eq!(out.len(), x.len(), "layer_norm_rows: output length");
    assert_eq!(gamma.len(), cols, "layer_norm_rows: gamma length");
    if let Some(b) = beta {
        assert_eq!(b.len(), cols, "layer_norm_rows: beta length");
    }
    let isa = Isa::detect();
    if x.len() <= PAR_MIN_ELEMS {
        layer_norm_band(isa, x, out, cols, gamma, beta, eps);
    } else {
        let band = band_len(cols);
        par_chunks_mut(out, band, |i, out| {
            let x = &x[i * band..i * band + out.len()];
            layer_norm_band(isa, x, out, cols, gamma, beta, eps)
        });
    }
}

/// Elements per rayon task: whole rows, at least [`PAR_BAND_ELEMS`] of them.
fn band_len(cols: usize) -> usize {
    PAR_BAND_ELEMS.div_ceil(cols).max(1) * cols
}

fn softmax_band(isa: Isa, data: &mut [f32], cols: usize) {
    match isa {
        Isa::Portable => softmax_band_generic(data, cols),
        // SAFETY: `detect` and `available` only name an ISA the CPU reports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::softmax_band_avx2(data, cols) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::softmax_band_avx512(data, cols) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => softmax_band_generic(data, cols),
    }
}

fn layer_norm_band(
    isa: Isa,
    x: &[f32],
    out: &mut [f32],
    cols: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
) {
    match isa {
        Isa::Portable => layer_norm_band_generic(x, out, cols, gamma, beta, eps),
        // SAFETY: `detect` and `available` only name an ISA the CPU reports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::layer_norm_band_avx2(x, out, cols, gamma, beta, eps) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::layer_norm_band_avx512(x, out, cols, gamma, beta, eps) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => layer_norm_band_generic(x, out, cols, gamma, beta, eps),
    }
}

/// The bodies are `inline(always)` so that each `target_feature` wrapper gets its own copy
/// compiled for its instruction set.
#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_band_avx2(data: &mut [f32], cols: usize) {
        super::softmax_band_generic(data, cols)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_band_avx512(data: &mut [f32], cols: usize) {
        super::softmax_band_generic(data, cols)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn layer_norm_band_avx2(
        x: &[f32],
        out: &mut [f32],
        cols: usize,
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) {
        super::layer_norm_band_generic(x, out, cols, gamma, beta, eps)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn layer_norm_band_avx512(
        x: &[f32],
        out: &mut [f32],
        cols: usize,
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) {
        super::layer_norm_band_generic(x, out, cols, gamma, beta, eps)
    }
}

#[inline(always)]
fn softmax_band_generic(data: &mut [f32], cols: usize) {
    for row in data.chunks_exact_mut(cols) {
        softmax_row(row);
    }
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = row_max(row);
    let mut sums = [0f32; LANES];
    let mut blocks = row.chunks_exact_mut(LANES);
    for block in &mut blocks {
        for (v, s) in block.iter_mut().zip(&mut sums) {
            *v = exp_nonpositive(*v - max);
            *s += *v;
        }
    }
    // The tail as one more (padded) block: scalar exps for the last few values of a
    // 197-wide attention row cost almost as much as the 12 vector blocks before them.
    // Padding is −∞, whose exp is 0.
    let tail = blocks.into_remainder();
    let mut block = [f32::NEG_INFINITY; LANES];
    block[..tail.len()].copy_from_slice(tail);
    for (v, s) in block.iter_mut().zip(&mut sums) {
        *v = exp_nonpositive(*v - max);
        *s += *v;
    }
    let n = tail.len();
    tail.copy_from_slice(&block[..n]);
    let sum = sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The largest value of a non-empty row (NaN only if the row holds NaN in a way the lanes
/// see; a NaN element makes its own softmax NaN either way).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut blocks = row.chunks_exact(LANES);
    for block in &mut blocks {
        for (m, &v) in lanes.iter_mut().zip(block) {
            // A compare-and-select, unlike f32::max, maps to one SIMD max instruction.
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(blocks.remainder()) {
        max = if v > max { v } else { max };
    }
    max
}

/// e^x for x ≤ 0 (Cephes `expf`: x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-7 polynomial,
/// 2^n assembled in the exponent bits). Below −87 it returns 0, where 2^n would leave the
/// normal range; NaN stays NaN. Written without branches so blocks of it vectorise.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.0;
    // mul_add: one FMA per step where the caller is compiled with FMA (the AVX-512 and
    // AVX2 paths, aarch64); Rust does not contract a·b + c by itself.
    let t = x.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = (p * r).mul_add(r, r + 1.0);
    // n = low bits of t's mantissa minus the 0x400000 that 1.5·2^23 put there.
    let pow2n = f32::from_bits(
        (t.to_bits().wrapping_sub(0x4B40_0000) as i32)
            .wrapping_add(127)
            .wrapping_shl(23) as u32,
    );
    if x < LOW {
        0.0
    } else {
        er * pow2n
    }
}

#[inline(always)]
fn layer_norm_band_generic(
    x: &[f32],
    out: &mut [f32],
    cols: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
) {
    let n = cols as f32;
    for (x, out) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        match beta {
            Some(beta) => {
                for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *o = (v - mean) * inv_std * g + b;
                }
            }
            None => {
                for ((o, &v), &g) in out.iter_mut().zip(x).zip(gamma) {
                    *o = (v - mean) * inv_std * g;
                }
            }
        }
    }
}

/// Σ f(v) over a row, in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut blocks = row.chunks_exact(LANES);
    for block in &mut blocks {
        for (s, &v) in lanes.iter_mut().zip(block) {
            *s += f(v);
        }
    }
    let tail: f32 = blocks.remainder().iter().map(|&v| f(v)).sum();
    tail + lanes.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ops;
    use crate::graph::Op;
    use candle_core::{Device, Tensor};

    /// Deterministic values in [-scale, scale).
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        crate::kernels::testutil::rand(n, seed)
            .into_iter()
            .map(|v| v * scale)
            .collect()
    }

    fn tensor(v: &[f32], rows: usize, cols: usize) -> Tensor {
        Tensor::from_slice(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Shapes with odd column counts, single rows and columns, and ViT-Tiny's own: attention
    /// scores (3 heads × 197 tokens of 197) and token rows of 192 and 768.
    const SHAPES: &[(usize, usize)] = &[
        (1, 1),
        (5, 1),
        (3, 7),
        (1, 15),
        (2, 16),
        (4, 17),
        (13, 33),
        (197, 192),
        (591, 197),
        (197, 768),
        (64, 1000),
    ];

    fn softmax_with(isa: Isa, data: &mut [f32], cols: usize) {
        if data.len() <= PAR_MIN_ELEMS {
            softmax_band(isa, data, cols);
        } else {
            data.par_chunks_mut(band_len(cols))
                .for_each(|band| softmax_band(isa, band, cols));
        }
    }

    #[test]
    fn softmax_matches_candle_on_every_isa() {
        for isa in Isa::available() {
            for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
                for scale in [1.0, 8.0, 40.0] {
                    let x = random(rows * cols, i as u64 * 31 + scale as u64, scale);
                    let t = tensor(&x, rows, cols);
                    let want = values(&candle_nn::ops::softmax_last_dim(&t).unwrap());
                    let generic = values(&ops::eval(&Op::Softmax { axis: 1 }, &[t]).unwrap()[0]);
                    let mut got = x.clone();
                    softmax_with(isa, &mut got, cols);
                    for (name, want) in [("softmax_last_dim", &want), ("softmax", &generic)] {
                        let worst = got
                            .iter()
                            .zip(want.iter())
                            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-30))
                            .fold(0f32, f32::max);
                        assert!(
                            worst <= 1e-5,
                            "{isa:?} {rows}x{cols} scale {scale}: relative error {worst:e} vs {name}"
                        );
                    }
                    for row in got.chunks(cols) {
                        let s: f32 = row.iter().sum();
                        assert!((s - 1.0).abs() < 1e-5, "{isa:?} row sums to {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_public_entry_point_splits_large_buffers_identically() {
        for &(rows, cols) in &[(591, 197), (3, 7), (1, 40_000)] {
            let x = random(rows * cols, 7, 6.0);
            let mut whole = x.clone();
            softmax_rows(&mut whole, cols);
            let mut serial = x.clone();
            softmax_band(Isa::detect(), &mut serial, cols);
            assert_eq!(whole, serial, "{rows}x{cols}");
        }
    }

    #[test]
    fn softmax_edge_values() {
        // Masked scores and huge ranges: exp underflows to exactly 0, never to NaN.
        let x = [0.0, f32::NEG_INFINITY, -1e30, -100.0, 3.0, -86.0];
        let want = values(&candle_nn::ops::softmax_last_dim(&tensor(&x, 1, 6)).unwrap());
        let mut v = x.to_vec();
        softmax_rows(&mut v, 6);
        for (g, w) in v.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs() + 1e-36, "{v:?} vs {want:?}");
        }
        assert_eq!(v[1], 0.0);
        // One huge value takes everything; shifting by the max keeps it finite.
        let mut v = vec![1e30, 0.0, -1e30];
        softmax_rows(&mut v, 3);
        assert_eq!(v, [1.0, 0.0, 0.0]);
        // NaN poisons its row only.
        let mut v = vec![1.0, f32::NAN, 2.0, 1.0, 2.0, 3.0];
        softmax_rows(&mut v, 3);
        assert!(v[..3].iter().all(|x| x.is_nan()), "{v:?}");
        assert!(v[3..].iter().all(|x| x.is_finite()), "{v:?}");
        // Nothing to do.
        softmax_rows(&mut [], 0);
        softmax_rows(&mut [], 5);
    }

    #[test]
    #[should_panic(expected = "not whole rows")]
    fn softmax_rejects_partial_rows() {
        softmax_rows(&mut [1.0, 2.0, 3.0], 2);
    }

    #[test]
    fn exp_is_within_2e7_relative_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    fn layer_norm_with(
        isa: Isa,
        x: &[f32],
        out: &mut [f32],
        cols: usize,
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) {
        if x.len() <= PAR_MIN_ELEMS {
            layer_norm_band(isa, x, out, cols, gamma, beta, eps);
        } else {
            let band = band_len(cols);
            x.par_chunks(band)
                .zip(out.par_chunks_mut(band))
                .for_each(|(x, out)| layer_norm_band(isa, x, out, cols, gamma, beta, eps));
        }
    }

    #[test]
    fn layer_norm_matches_candle_reference_on_every_isa() {
        for isa in Isa::available() {
            for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
                for with_beta in [true, false] {
                    let seed = i as u64 * 17 + with_beta as u64;
                    // An offset well away from zero tests the centring; a small spread tests eps.
                    let x: Vec<f32> = random(rows * cols, seed, 3.0)
                        .iter()
                        .map(|v| v + 5.0)
                        .collect();
                    let gamma = random(cols, seed + 1, 2.0);
                    let beta = random(cols, seed + 2, 1.0);
                    let eps = 1e-6;
                    let mut inputs = vec![
                        tensor(&x, rows, cols),
                        Tensor::from_slice(&gamma, cols, &Device::Cpu).unwrap(),
                    ];
                    if with_beta {
                        inputs.push(Tensor::from_slice(&beta, cols, &Device::Cpu).unwrap());
                    }
                    let op = Op::LayerNormalization {
                        axis: 1,
                        epsilon: eps,
                    };
                    let want = values(&ops::eval(&op, &inputs).unwrap()[0]);
                    let mut got = vec![f32::NAN; x.len()];
                    let b = with_beta.then_some(beta.as_slice());
                    layer_norm_with(isa, &x, &mut got, cols, &gamma, b, eps);
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0f32, f32::max)
                        / scale;
                    assert!(
                        worst <= 1e-5,
                        "{isa:?} {rows}x{cols} beta {with_beta}: relative error {worst:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn layer_norm_public_entry_point_splits_large_buffers_identically() {
        let (rows, cols) = (197, 768);
        let x = random(rows * cols, 3, 4.0);
        let gamma = random(cols, 4, 1.0);
        let beta = random(cols, 5, 1.0);
        let mut whole = vec![0.0; x.len()];
        layer_norm_rows(&x, &mut whole, cols, &gamma, Some(&beta), 1e-5);
        let mut serial = vec![0.0; x.len()];
        layer_norm_band(
            Isa::detect(),
            &x,
            &mut serial,
            cols,
            &gamma,
            Some(&beta),
            1e-5,
        );
        assert_eq!(whole, serial);
    }

    #[test]
    fn layer_norm_of_a_constant_row_is_beta() {
        // Zero variance: eps keeps it finite.
        let x = [2.5f32; 7];
        let mut out = [f32::NAN; 7];
        let gamma = [3.0f32; 7];
        let beta = [0.25f32, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0];
        layer_norm_rows(&x, &mut out, 7, &gamma, Some(&beta), 1e-5);
        assert_eq!(out, beta);
        // Nothing to do.
        layer_norm_rows(&[], &mut [], 0, &[], None, 1e-5);
    }

    #[test]
    #[should_panic(expected = "gamma length")]
    fn layer_norm_rejects_short_gamma() {
        let mut out = [0.0; 4];
        layer_norm_rows(&[1.0, 2.0, 3.0, 4.0], &mut out, 2, &[1.0], None, 1e-5);
    }
}
