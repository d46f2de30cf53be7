//! Convolutions over few input channels (a network's RGB stem: 3 → 64 channels, 7 × 7,
//! stride 2), with output positions as the broadcast operand and output channels along the
//! vector lanes.
//!
//! As a GEMM such a layer has a short, awkward K (3 · 49 = 147 taps) and its column matrix
//! must be gathered at stride 2 from the input: the gathered tiles ran at ~80–94 GMAC/s.
//! Here each tap's weights for 64 output channels are four vectors, and each of 6 output
//! positions broadcasts its input value for the tap straight from a zero-padded copy of the
//! input: 24 multiply-adds per 10 loads, no column matrix at all. A row of outputs is
//! produced position-major into a small buffer and transposed to NCHW with 16 × 16 register
//! transposes while it is still in L1.

use super::act::apply_activation;
use super::conv::NotSupported;
use super::gemm::Isa;
use super::{par, scratch};
use crate::graph::{clamp_bounds, Activation};
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// The most input channels this form takes: beyond an image's few channels the GEMM forms
/// have a deep enough K to run at full speed.
pub const MAX_CIN: usize = 4;

/// Output channels per weight block (four AVX-512 vectors).
const BLOCK: usize = 64;

/// Weights of a few-input-channel convolution, packed per block of up to 64 output channels
/// as `[tap][channel]` (taps in `(ci, ky, kx)` order), channels padded to whole vectors.
#[derive(Debug, Clone)]
pub struct StemWeights {
    /// One packed block per 64 output channels: `taps × width` values.
    blocks: Vec<Vec<f32>>,
    /// Bias per output channel (zeros when the layer has none), padded like the weights.
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    kernel: (usize, usize),
}

impl StemWeights {
    /// Packs `weight` (`[cout, cin, kh, kw]`, row-major), or `None` where this form does not
    /// apply: no AVX-512, more than [`MAX_CIN`] input channels, or output channels that do not
    /// fill whole vectors.
    pub fn pack(weight: &[f32], wshape: &[usize], bias: Option<&[f32]>) -> Option<StemWeights> {
        let &[cout, cin, kh, kw] = wshape else {
            return None;
        };
        if Isa::detect() != Isa::Avx512
            || cin == 0
            || cin > MAX_CIN
            || cout % 16 != 0
            || kh * kw == 0
        {
            return None;
        }
        let taps = cin * kh * kw;
        if weight.len() != cout * taps || bias.is_some_and(|b| b.len() != cout) {
            return None;
        }
        let blocks = (0..cout)
            .step_by(BLOCK)
            .map(|c0| {
                let width = BLOCK.min(cout - c0);
                let mut w = vec![0f32; taps * width];
                for t in 0..taps {
                    for c in 0..width {
                        w[t * width + c] = weight[(c0 + c) * taps + t];
                    }
                }
                w
            })
            .collect();
        Some(StemWeights {
            blocks,
            bias: bias.map_or_else(|| vec![0.0; cout], <[f32]>::to_vec),
            cout,
            cin,
            kernel: (kh, kw),
        })
    }
}

/// The geometry of one call (the output size as the caller computed it from the padding).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Input channels.
    pub cin: usize,
    /// Input rows.
    pub h: usize,
    /// Input columns.
    pub w: usize,
    /// Kernel rows and columns.
    pub kernel: (usize, usize),
    /// Strides (y, x).
    pub stride: (usize, usize),
    /// Padding before (top, left).
    pub pad: (usize, usize),
    /// Output rows and columns.
    pub out: (usize, usize),
}

/// `out = act(conv(x) + bias + residual)` for one image: `x` is `[cin, h, w]`, `out` and
/// `residual` `[cout, oh, ow]`.
pub fn run(
    wts: &StemWeights,
    x: &[f32],
    s: Shape,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
    out: &mut [f32],
) -> Result<(), NotSupported> {
    let (kh, kw) = s.kernel;
    let (sy, sx) = s.stride;
    let (oh, ow) = s.out;
    let plane = oh * ow;
    if (s.cin, s.kernel) != (wts.cin, wts.kernel)
        || x.len() != s.cin * s.h * s.w
        || out.len() != wts.cout * plane
        || residual.is_some_and(|r| r.len() != out.len())
    {
        return Err(NotSupported(format!(
            "stem convolution of {} channels, kernel {:?}: input {:?}, kernel {:?}, or output \
             of the wrong size",
            wts.cin,
            wts.kernel,
            (s.cin, s.h, s.w),
            s.kernel
        )));
    }
    if plane == 0 {
        return Ok(());
    }
    // Zero-padded input covering every tap of every output position.
    let (hp, wp) = ((oh - 1) * sy + kh, (ow - 1) * sx + kw);
    let mut xp = scratch::take(s.cin * hp * wp);
    xp.fill(0.0);
    for c in 0..s.cin {
        for y in 0..s.h {
            let py = y + s.pad.0;
            if py >= hp {
                break;
            }
            let cols = s.w.min(wp.saturating_sub(s.pad.1));
            let dst = (c * hp + py) * wp + s.pad.1;
            xp[dst..dst + cols].copy_from_slice(&x[(c * s.h + y) * s.w..][..cols]);
        }
    }
    // In-register epilogue: bias, and the activation when it is a clamp and nothing is added
    // after it.
    let bounds = clamp_bounds(activation.as_ref()).filter(|_| residual.is_none());
    let (lo, hi) = bounds.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let after = residual.is_some() || bounds.is_none();
    let optr = par::SendPtr(out.as_mut_ptr());
    let geo = Geo {
        cin: s.cin,
        hp,
        wp,
        kh,
        kw,
        sx,
        ow,
    };
    let xp_ref: &[f32] = &xp;
    // The output's lines are cold (written last a frame ago): a task asks for its row's
    // lines before computing it, so the misses overlap the products instead of stalling the
    // stores (in-frame, ResNet's stem 1.43 → 1.30 ms, MobileNetV2's 0.32 → 0.22 ms).
    let prefetch_row = |oy: usize| {
        for c in 0..wts.cout {
            let row = optr.get().wrapping_add(c * plane + oy * ow);
            for at in (0..ow).step_by(16).chain([ow - 1]) {
                // SAFETY: a prefetch never faults; the address lies inside `out`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at).cast()) };
            }
        }
    };
    par::par_for(oh, |oy| {
        scratch::with(ow * BLOCK, |rb| {
            prefetch_row(oy);
            let mut c0 = 0;
            for w in &wts.blocks {
                let width = w.len() / (s.cin * kh * kw);
                // SAFETY: AVX-512F was present when the weights were packed (`pack`); the
                // block's taps and the row's padded input lie in `w` and `xp` (sizes
                // checked above), `rb` holds `ow` rows of `width` ≤ 64 values; row `oy` of
                // the output channels c0 .. c0 + width is written by this task only.
                unsafe {
                    row_block(
                        &geo,
                        xp_ref,
                        oy * sy,
                        w,
                        &wts.bias[c0..c0 + width],
                        (lo, hi),
                        rb,
                    );
                    for co in (0..width).step_by(16) {
                        let dst = optr.get().add((c0 + co) * plane + oy * ow);
                        super::conv::transpose_to(rb, ow, width, co, dst, plane);
                        if after {
                            for c in 0..16 {
                                let row = std::slice::from_raw_parts_mut(dst.add(c * plane), ow);
                                if let Some(r) = residual {
                                    let at = (c0 + co + c) * plane + oy * ow;
                                    row.iter_mut()
                                        .zip(&r[at..at + ow])
                                        .for_each(|(v, x)| *v += x);
                                }
                                apply_activation(activation, row);
                            }
                        }
                    }
                }
                c0 += width;
            }
        })
    });
    scratch::give(xp);
    Ok(())
}

/// Sizes of the padded input and the output row.
struct Geo {
    cin: usize,
    hp: usize,
    wp: usize,
    kh: usize,
    kw: usize,
    sx: usize,
    ow: usize,
}

/// One output row of one weight block into `rb` (`[ow][width]`), positions taken `R` at a
/// time; a last short group is computed overlapping the one before it (same values).
///
/// # Safety
/// The CPU must have AVX-512F; `w` holds `cin · kh · kw` taps of `width` (a multiple of 16,
/// at most 64) values; `xp` the padded input with row `y0 + kh − 1` inside it; `rb` at least
/// `ow · width` values.
#[target_feature(enable = "avx512f")]
unsafe fn row_block(
    g: &Geo,
    xp: &[f32],
    y0: usize,
    w: &[f32],
    bias: &[f32],
    clamp: (f32, f32),
    rb: &mut [f32],
) {
    let width = bias.len();
    debug_assert!(w.len() == g.cin * g.kh * g.kw * width && rb.len() >= g.ow * width);
    debug_assert!(y0 + g.kh <= g.hp);
    match width / 16 {
        1 => row_n::<12, 1>(g, xp, y0, w, bias, clamp, rb),
        2 => row_n::<12, 2>(g, xp, y0, w, bias, clamp, rb),
        3 => row_n::<8, 3>(g, xp, y0, w, bias, clamp, rb),
        _ => row_n::<6, 4>(g, xp, y0, w, bias, clamp, rb),
    }
}

/// [`row_block`] for `NB` vectors of channels, `R` positions per group.
#[target_feature(enable = "avx512f")]
unsafe fn row_n<const R: usize, const NB: usize>(
    g: &Geo,
    xp: &[f32],
    y0: usize,
    w: &[f32],
    bias: &[f32],
    clamp: (f32, f32),
    rb: &mut [f32],
) {
    let width = NB * 16;
    let mut ox = 0;
    while ox < g.ow {
        if g.ow - ox >= R {
            positions::<R, NB>(
                g,
                xp,
                y0,
                ox,
                w,
                bias,
                clamp,
                rb.as_mut_ptr().add(ox * width),
            );
            ox += R;
        } else if g.ow >= R {
            // Overlap the last full group with the one before: recomputes a few positions.
            let at = g.ow - R;
            positions::<R, NB>(
                g,
                xp,
                y0,
                at,
                w,
                bias,
                clamp,
                rb.as_mut_ptr().add(at * width),
            );
            ox = g.ow;
        } else {
            positions::<1, NB>(
                g,
                xp,
                y0,
                ox,
                w,
                bias,
                clamp,
                rb.as_mut_ptr().add(ox * width),
            );
            ox += 1;
        }
    }
}

/// Outputs `ox .. ox + R` of the row starting at padded input row `y0`, `NB · 16` channels,
/// stored position-major at `dst` (`R` rows of `NB · 16`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn positions<const R: usize, const NB: usize>(
    g: &Geo,
    xp: &[f32],
    y0: usize,
    ox: usize,
    w: &[f32],
    bias: &[f32],
    (lo, hi): (f32, f32),
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    let mut wp = w.as_ptr();
    let x = xp.as_ptr();
    for c in 0..g.cin {
        for ky in 0..g.kh {
            let row = x.add((c * g.hp + y0 + ky) * g.wp + ox * g.sx);
            for kx in 0..g.kw {
                let mut wv = [_mm512_setzero_ps(); NB];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add(16 * j));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*row.add(i * g.sx + kx));
                    for j in 0..NB {
                        a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                    }
                }
                wp = wp.add(NB * 16);
            }
        }
    }
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    for (i, a) in acc.iter().enumerate() {
        for (j, &v) in a.iter().enumerate() {
            let v = _mm512_add_ps(v, _mm512_loadu_ps(bias.as_ptr().add(16 * j)));
            // max(lo, x) and min(hi, x) return x when x is NaN, as the reference does.
            let v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
            _mm512_storeu_ps(dst.add(i * NB * 16 + 16 * j), v);
        }
    }
}
