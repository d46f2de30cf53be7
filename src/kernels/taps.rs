//! Convolution by taps: for each kernel tap, the weights of 64 output channels are four
//! vectors, and each of a group of output positions broadcasts its input value for that tap
//! from a zero-padded copy of the input. 6 positions × 64 channels take 24 multiply-adds per
//! 10 loads, with no column matrix at all, at any stride. On AVX2 (16 YMM registers) a block
//! is 16 channels, two vectors: 6 positions take 12 multiply-adds per 8 loads.
//!
//! As a GEMM (im2col) a strided layer gathers its column matrix at stride 2 from a
//! phase-split input, and an RGB stem has a short, awkward K (3 · 49 = 147 taps). Per node,
//! in-frame, alternating frames between the two forms in one process (1 thread): ResNet-50's
//! stride-2 3 × 3 layers 1.34 → 1.10, 1.41 → 1.13 and 1.59 → 1.34 ms, its 7 × 7 3 × 3 layers
//! 1.46 → 1.34 ms, ViT-Tiny's 16 × 16 patch embedding 0.55 → 0.35 ms; whole frames of
//! ResNet-18 −5 %, ResNet-50 −3 %. On AVX2 (Zen 3), per node against the GEMM forms, node
//! times divided by the drift of all nodes between the two builds' processes: the stems
//! 0.74–0.87, stride-2 3 × 3 layers 0.81–0.92, 3 × 3 at 7 × 7 0.78–0.97 (2 and 1 threads),
//! ViT-Tiny's patch embedding 0.83.
//!
//! Output positions are flat over the map (a 7 × 7 map wastes no lanes), in runs of up to
//! 192 per task, position-major in a small buffer that is transposed to NCHW with 16 × 16
//! (AVX2: 8 × 8) register transposes while it is still in L1. Deep inputs are taken 128
//! channels per pass, so a pass's weights stay in L2 while the run's positions reuse them.

use super::act::apply_activation;
use super::ahead::{Ahead, Drip};
use super::conv::NotSupported;
use super::gemm::Isa;
use super::{par, scratch};
use crate::graph::{clamp_bounds, Activation};
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// Output channels per weight block on AVX-512: four vectors.
const BLOCK: usize = 64;

/// Output channels per weight block on AVX2: two vectors, so that 6 positions × 16
/// channels (12 accumulators, 12 multiply-adds per 8 loads) leave registers for the
/// weights and a broadcast in 16 YMM registers.
const BLOCK_AVX2: usize = 16;

/// `(lanes, block)`: output channels per vector and per weight block of the by-taps kernel
/// for `isa`, `None` where there is none.
fn widths(isa: Isa) -> Option<(usize, usize)> {
    match isa {
        Isa::Avx512 => Some((16, BLOCK)),
        Isa::Avx2 => Some((8, BLOCK_AVX2)),
        Isa::Portable => None,
    }
}

/// Weights of a single-group convolution, packed per block of up to 64 (AVX-512) or 16
/// (AVX2) output channels as `[tap][channel]` (taps in `(ci, ky, kx)` order).
#[derive(Debug, Clone)]
pub struct TapWeights {
    /// One packed block per `block` output channels: `taps × width` values.
    blocks: Vec<Vec<f32>>,
    /// The micro-kernel the blocks were packed for (`Avx512` or `Avx2`); it sets the block
    /// and vector widths (see [`widths`]).
    isa: Isa,
    /// Bias per output channel (zeros when the layer has none).
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    kernel: (usize, usize),
}

impl TapWeights {
    /// Packs `weight` (`[cout, cin, kh, kw]`, row-major), or `None` where this form does not
    /// apply: neither AVX-512 nor AVX2, or output channels that do not fill whole vectors (a
    /// pruned layer's odd count keeps the GEMM forms).
    pub fn pack(weight: &[f32], wshape: &[usize], bias: Option<&[f32]>) -> Option<TapWeights> {
        let &[cout, cin, kh, kw] = wshape else {
            return None;
        };
        let isa = Isa::detect();
        let (lanes, block) = widths(isa)?;
        if cin == 0 || cout % lanes != 0 || kh * kw == 0 {
            return None;
        }
        let taps = cin * kh * kw;
        if weight.len() != cout * taps || bias.is_some_and(|b| b.len() != cout) {
            return None;
        }
        let blocks = (0..cout)
            .step_by(block)
            .map(|c0| {
                let width = block.min(cout - c0);
                let mut w = vec![0f32; taps * width];
                for t in 0..taps {
                    for c in 0..width {
                        w[t * width + c] = weight[(c0 + c) * taps + t];
                    }
                }
                w
            })
            .collect();
        Some(TapWeights {
            blocks,
            isa,
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
/// `residual` `[cout, oh, ow]`, or with `blocked` both NCHWc8 (`[cout / 8][oh · ow][8]`,
/// see [`super::nchwc`]): a run's position-major sums are then copied out eight channels at
/// a time instead of transposed.
pub fn run(
    wts: &TapWeights,
    x: &[f32],
    s: Shape,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
    out: &mut [f32],
    blocked: bool,
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
            "convolution by taps of {} channels, kernel {:?}: input {:?}, kernel {:?}, or output \
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
    // A zero-padded input covering every tap of every output position; an unpadded layer
    // whose taps all lie in the input (ViT's 16 × 16 patch embedding) reads it in place.
    let (hp, wp) = ((oh - 1) * sy + kh, (ow - 1) * sx + kw);
    let in_place = s.pad == (0, 0) && hp <= s.h && wp <= s.w;
    let xp = (!in_place).then(|| {
        let mut xp = scratch::take(s.cin * hp * wp);
        pad_into(x, &s, (hp, wp), &mut xp);
        xp
    });
    let (xp_ref, hp, wp): (&[f32], _, _) = match &xp {
        Some(v) => (v, hp, wp),
        None => (x, s.h, s.w),
    };
    // In-register epilogue: bias, and the activation when it is a clamp and nothing is added
    // after it.
    let bounds = clamp_bounds(activation.as_ref()).filter(|_| residual.is_none());
    let (lo, hi) = bounds.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let after = residual.is_some() || bounds.is_none();
    let optr = par::SendPtr(out.as_mut_ptr());
    let geo = Geo {
        plane_in: hp * wp,
        wp,
        kh,
        kw,
        sy,
        sx,
        ow,
    };
    let taps = kh * kw;
    // Input channels per pass over the positions: a pass's weights (≤ 128 · 9 taps · 64
    // channels, 288 KB) stay in L2 while the task's positions reuse them.
    let chunk = (CHUNK_TAPS / taps).max(1);
    // Tasks: runs of positions × weight blocks, enough of them for every thread.
    // Packed weights exist only for an ISA with a kernel (`pack`).
    let (lanes, block) = widths(wts.isa).unwrap_or((16, BLOCK));
    let nb = wts.blocks.len();
    let threads = par::current_threads().max(1);
    let want = (4 * threads).div_ceil(nb);
    let run_len = plane.div_ceil(want).div_ceil(R_MAX).max(1) * R_MAX;
    // Short runs where a pass's weights (for a block of 64 channels) nearly fill L1 by
    // themselves, so a run's buffer does not push them out: ResNet's 7 × 7 stem (3 · 49 taps,
    // 37.6 KB). Per node, in frame (1 thread), runs of 48 positions took it 1.24 → 1.15 ms
    // (ResNet-50) and 1.28 → 1.20 ms (ResNet-18) against 192; 72 and 96 gained less, 24 lost.
    // Smaller weights (MobileNetV2's stem, 3.4 KB) share L1 with a whole run, and measured
    // slower in short ones; larger ones stream from L2 either way.
    let pass_bytes = chunk.min(s.cin) * taps * block * std::mem::size_of::<f32>();
    let max_run = if (16 << 10..=40 << 10).contains(&pass_bytes) {
        SHORT_RUN
    } else {
        MAX_RUN
    };
    let run_len = run_len.min(max_run);
    let runs = plane.div_ceil(run_len);
    // Each tap's offset from a position's first, for a pass (the same for every pass). Taken
    // out of its thread-local home while the tasks run, so a call nested in them (rayon
    // steals) finds an empty one instead of a borrowed one.
    let mut offs = OFFSETS.with(|o| std::mem::take(&mut *o.borrow_mut()));
    offs.clear();
    for c in 0..chunk.min(s.cin) {
        for ky in 0..kh {
            offs.extend((0..kw).map(|kx| c * geo.plane_in + ky * wp + kx));
        }
    }
    {
        let offs = &offs[..];
        par::par_for(runs * nb, |item| {
            let (run, blk) = (item / nb, item % nb);
            let (p0, p1) = (run * run_len, ((run + 1) * run_len).min(plane));
            let w = &wts.blocks[blk];
            let width = w.len() / (s.cin * taps);
            let c0 = blk * block;
            // The output's lines are cold (written last a frame ago): ask for them before
            // computing, so the misses overlap the products instead of stalling the stores (in
            // frame, ResNet's stem 1.43 → 1.30 ms, MobileNetV2's 0.32 → 0.22 ms).
            for c in (c0..c0 + width).filter(|_| !blocked) {
                let row = optr.get().wrapping_add(c * plane);
                for at in (p0..p1).step_by(16).chain([p1 - 1]) {
                    // SAFETY: a prefetch never faults; the address lies inside `out`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at).cast()) };
                }
            }
            scratch::with(MAX_RUN * BLOCK, |rb| {
                for ci0 in (0..s.cin).step_by(chunk) {
                    let chans = chunk.min(s.cin - ci0);
                    // A pass reads its weights against few positions (49 on a 7 × 7 map),
                    // faster than memory delivers them: the next pass's are asked for while
                    // this one computes (see `super::ahead`). Per node, in frame, 1 thread:
                    // ResNet-18's 3 × 3 layers at 7 × 7 1.25 → 1.03 ms.
                    let ahead = if ci0 + chans < s.cin {
                        let next = chunk.min(s.cin - ci0 - chans);
                        let at = (ci0 + chans) * taps * width;
                        Ahead::far(&w[at..at + next * taps * width])
                    } else if nb > 1 || ci0 > 0 {
                        let nw = &wts.blocks[(blk + 1) % nb];
                        Ahead::far(&nw[..(chunk.min(s.cin) * taps * width).min(nw.len())])
                    } else {
                        // The next task reads this very pass again (one block, one pass: a
                        // stem), already in cache.
                        Ahead::NONE
                    };
                    let pass = Pass {
                        ahead,
                        x: &xp_ref[ci0 * geo.plane_in..],
                        chans,
                        offs: &offs[..chans * taps],
                        w: &w[ci0 * taps * width..(ci0 + chans) * taps * width],
                        first: ci0 == 0,
                        last: ci0 + chans == s.cin,
                        bias: &wts.bias[c0..c0 + width],
                        clamp: (lo, hi),
                    };
                    // SAFETY: the ISA the weights were packed for was present (`pack`); the
                    // pass's taps lie in `w`, every tap of positions p0 .. p1 in the padded
                    // input (sized for all outputs), and `rb` holds MAX_RUN ≥ p1 − p0 rows of
                    // `width` ≤ 64 values.
                    unsafe {
                        if wts.isa == Isa::Avx512 {
                            run_block(&geo, &pass, p0, p1, rb)
                        } else {
                            run_block_avx2(&geo, &pass, p0, p1, rb)
                        }
                    };
                }
                let n = p1 - p0;
                for b in (0..width).step_by(8).filter(|_| blocked) {
                    // Block (c0 + b) / 8 starts at (c0 + b) · plane (c0 + b is a multiple of
                    // 8); this task alone writes its positions p0 .. p1.
                    let at = (c0 + b) * plane + p0 * 8;
                    // SAFETY: as above, positions p0 .. p1 of that block lie inside `out`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(optr.get().add(at), n * 8) };
                    for (p, d) in dst.chunks_exact_mut(8).enumerate() {
                        d.copy_from_slice(&rb[p * width + b..p * width + b + 8]);
                    }
                    if after {
                        if let Some(r) = residual {
                            dst.iter_mut()
                                .zip(&r[at..at + n * 8])
                                .for_each(|(v, x)| *v += x);
                        }
                        apply_activation(activation, dst);
                    }
                }
                for co in (0..width).step_by(lanes).filter(|_| !blocked) {
                    // SAFETY: the ISA as above; rows c0 + co .. + lanes of the output,
                    // positions p0 .. p1, are written by this task only.
                    unsafe {
                        let dst = optr.get().add((c0 + co) * plane + p0);
                        let rows = &rb[..(p1 - p0) * width];
                        if wts.isa == Isa::Avx512 {
                            super::conv::transpose_to(rows, p1 - p0, width, co, dst, plane);
                        } else {
                            super::conv::transpose8_to(rows, p1 - p0, width, co, dst, plane);
                        }
                        if after {
                            for c in 0..lanes {
                                let row =
                                    std::slice::from_raw_parts_mut(dst.add(c * plane), p1 - p0);
                                if let Some(r) = residual {
                                    let at = (c0 + co + c) * plane + p0;
                                    row.iter_mut()
                                        .zip(&r[at..at + p1 - p0])
                                        .for_each(|(v, x)| *v += x);
                                }
                                apply_activation(activation, row);
                            }
                        }
                    }
                }
            })
        });
    }
    OFFSETS.with(|o| *o.borrow_mut() = offs);
    if let Some(v) = xp {
        scratch::give(v);
    }
    Ok(())
}

thread_local! {
    /// The calling thread's table of tap offsets (kept, so frames after the first allocate
    /// nothing).
    static OFFSETS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes the zero-padded copy of `x` (`[cin, h, w]`, pads `s.pad` before, the rest after up
/// to `hp × wp`) into `xp`, every value once, in bands of rows across the threads. Filled with
/// zeros and copied by the calling thread, it held the other waiting: per node, in frame (2
/// threads), MobileNetV2's stem 0.178 → 0.156 ms, ResNet-18's 0.734 → 0.706, ResNet-50's
/// stride-2 3 × 3 layers 0.02–0.03 ms faster each.
fn pad_into(x: &[f32], s: &Shape, (hp, wp): (usize, usize), xp: &mut [f32]) {
    let (pt, pl) = (s.pad.0, s.pad.1.min(wp));
    let cols = s.w.min(wp - pl);
    let rows = s.cin * hp;
    let threads = par::current_threads().max(1);
    let band = rows.div_ceil(4 * threads).max(1);
    par::par_chunks_mut(&mut xp[..rows * wp], band * wp, |i, dst| {
        for (r, line) in dst.chunks_exact_mut(wp).enumerate() {
            let row = i * band + r;
            let (c, py) = (row / hp, row % hp);
            match py.checked_sub(pt).filter(|&y| y < s.h) {
                Some(y) => {
                    line[..pl].fill(0.0);
                    line[pl..pl + cols].copy_from_slice(&x[(c * s.h + y) * s.w..][..cols]);
                    line[pl + cols..].fill(0.0);
                }
                None => line.fill(0.0),
            }
        }
    });
}

/// Taps per pass over a task's positions (input channels × kernel taps).
const CHUNK_TAPS: usize = 128 * 9;

/// The most positions per task (its position-major buffer: 192 × 64 values, 48 KB).
const MAX_RUN: usize = 192;

/// The positions per task where a pass's weights nearly fill L1 (see `run`).
const SHORT_RUN: usize = 48;

/// Runs of positions are a multiple of this (of every group size: 6, 8 and 12).
const R_MAX: usize = 24;

/// Sizes of the padded input and the output.
struct Geo {
    /// Values per padded input channel.
    plane_in: usize,
    wp: usize,
    kh: usize,
    kw: usize,
    sy: usize,
    sx: usize,
    ow: usize,
}

/// One pass over a run of positions: a chunk of input channels.
struct Pass<'a> {
    /// The padded input from the chunk's first channel on.
    x: &'a [f32],
    chans: usize,
    /// The chunk's taps, `width` values each.
    w: &'a [f32],
    /// Each tap's offset in `x` from a position's first tap, in the order of `w`.
    offs: &'a [usize],
    /// Whether this pass starts the sums (else adds to the buffer) and ends them (bias and
    /// clamp applied).
    first: bool,
    last: bool,
    bias: &'a [f32],
    clamp: (f32, f32),
    /// Weights read after this pass (the next pass's, or the next weight block's first),
    /// asked for while this one computes, a share per group of positions.
    ahead: Ahead<'a>,
}

/// Positions `p0 .. p1` (flat over the output) of one weight block and one pass, into `rb`
/// (`[p − p0][width]`): groups of `R`, then single positions.
///
/// # Safety
/// The CPU must have AVX-512F; `pass.w` holds `chans · kh · kw` taps of `width` (= bias
/// length, a multiple of 16, at most 64) values; every tap of every position lies in `pass.x`;
/// `rb` holds at least `(p1 − p0) · width` values.
#[target_feature(enable = "avx512f")]
unsafe fn run_block(g: &Geo, pass: &Pass, p0: usize, p1: usize, rb: &mut [f32]) {
    let width = pass.bias.len();
    debug_assert!(
        pass.w.len() == pass.chans * g.kh * g.kw * width
            && pass.offs.len() == pass.chans * g.kh * g.kw
            && rb.len() >= (p1 - p0) * width
    );
    match width / 16 {
        1 => groups::<12, 1, true>(g, pass, p0, p1, rb),
        2 => groups::<12, 2, true>(g, pass, p0, p1, rb),
        3 => groups::<8, 3, true>(g, pass, p0, p1, rb),
        _ => groups::<6, 4, true>(g, pass, p0, p1, rb),
    }
}

/// [`run_block`] on AVX2: `width` is 8 or 16.
///
/// # Safety
/// As [`run_block`], with AVX2 and FMA for AVX-512F and 8 for 16.
#[target_feature(enable = "avx2,fma")]
unsafe fn run_block_avx2(g: &Geo, pass: &Pass, p0: usize, p1: usize, rb: &mut [f32]) {
    let width = pass.bias.len();
    debug_assert!(
        pass.w.len() == pass.chans * g.kh * g.kw * width
            && pass.offs.len() == pass.chans * g.kh * g.kw
            && rb.len() >= (p1 - p0) * width
    );
    match width / 8 {
        1 => groups::<12, 1, false>(g, pass, p0, p1, rb),
        _ => groups::<6, 2, false>(g, pass, p0, p1, rb),
    }
}

/// [`run_block`] for `NB` vectors of channels, `R` positions per group; `WIDE`: AVX-512
/// vectors, else AVX2 ones (inlined into the entry point that enables the ISA).
#[inline(always)]
unsafe fn groups<const R: usize, const NB: usize, const WIDE: bool>(
    g: &Geo,
    pass: &Pass,
    p0: usize,
    p1: usize,
    rb: &mut [f32],
) {
    let base = |p: usize| (p / g.ow) * g.sy * g.wp + (p % g.ow) * g.sx;
    let mut p = p0;
    let full = (p1 - p0) / R;
    while p + R <= p1 {
        let bases: [usize; R] = std::array::from_fn(|i| base(p + i));
        let ahead = pass.ahead.share((p - p0) / R, full);
        if WIDE {
            positions::<R, NB>(
                g,
                pass,
                bases,
                rb.as_mut_ptr().add((p - p0) * NB * 16),
                ahead,
            );
        } else {
            positions8::<R, NB>(pass, bases, rb.as_mut_ptr().add((p - p0) * NB * 8), ahead);
        }
        p += R;
    }
    while p < p1 {
        let (at, no) = (base(p), Ahead::NONE);
        if WIDE {
            positions::<1, NB>(g, pass, [at], rb.as_mut_ptr().add((p - p0) * NB * 16), no);
        } else {
            positions8::<1, NB>(pass, [at], rb.as_mut_ptr().add((p - p0) * NB * 8), no);
        }
        p += 1;
    }
}

/// `R` output positions (padded-input offsets `bases`) × `NB · 16` channels for one pass,
/// at `dst` (`R` rows of `NB · 16`): started, or added to what is there.
#[inline(always)]
unsafe fn positions<const R: usize, const NB: usize>(
    g: &Geo,
    pass: &Pass,
    bases: [usize; R],
    dst: *mut f32,
    ahead: Ahead,
) {
    use std::arch::x86_64::*;
    let mut drip = Drip::new(ahead, pass.offs.len());
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    if !pass.first {
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(dst.add(i * NB * 16 + 16 * j));
            }
        }
    }
    let mut wp = pass.w.as_ptr();
    let x = pass.x.as_ptr();
    let pts: [*const f32; R] = std::array::from_fn(|i| x.add(bases[i]));
    if NB == 4 && g.kw <= 3 {
        // Rows of at most three taps at 64 channels (6 positions): one loop over the table of
        // tap offsets. Nested loops over channels and rows set up a pointer per position for
        // every row of three taps; per node, in frame (1 thread), the table took ResNet-50's
        // stride-2 3 × 3 layers 1.05 → 0.99 and 1.09 → 1.04 ms and its 7 × 7 ones 1.28 →
        // 1.25 ms. Wider rows (the stems, ViT's patches) and fewer channels (8 or 12
        // positions, whose pointers then spill) measured slower with it: ViT's patch
        // embedding by 15 %, MobileNetV2's stem 2×.
        for (t, &off) in pass.offs.iter().enumerate() {
            drip.tick(t);
            let mut wv = [_mm512_setzero_ps(); NB];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(wp.add(16 * j));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*pts[i].add(off));
                for j in 0..NB {
                    a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                }
            }
            wp = wp.add(NB * 16);
        }
    } else {
        let mut t = 0;
        for c in 0..pass.chans {
            let cbase = c * g.plane_in;
            for ky in 0..g.kh {
                let rbase = cbase + ky * g.wp;
                for kx in 0..g.kw {
                    drip.tick(t);
                    t += 1;
                    let off = rbase + kx;
                    let mut wv = [_mm512_setzero_ps(); NB];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(wp.add(16 * j));
                    }
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_set1_ps(*pts[i].add(off));
                        for j in 0..NB {
                            a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                        }
                    }
                    wp = wp.add(NB * 16);
                }
            }
        }
    }
    let (vlo, vhi) = (_mm512_set1_ps(pass.clamp.0), _mm512_set1_ps(pass.clamp.1));
    for (i, a) in acc.iter().enumerate() {
        for (j, &v) in a.iter().enumerate() {
            let v = if pass.last {
                let v = _mm512_add_ps(v, _mm512_loadu_ps(pass.bias.as_ptr().add(16 * j)));
                // max(lo, x) and min(hi, x) return x when x is NaN, as the reference does.
                _mm512_min_ps(vhi, _mm512_max_ps(vlo, v))
            } else {
                v
            };
            _mm512_storeu_ps(dst.add(i * NB * 16 + 16 * j), v);
        }
    }
}

/// [`positions`] on AVX2: `NB · 8` channels, every tap through the table of offsets (with 6
/// positions × 2 vectors the pointers and the table fit the general registers).
#[inline(always)]
unsafe fn positions8<const R: usize, const NB: usize>(
    pass: &Pass,
    bases: [usize; R],
    dst: *mut f32,
    ahead: Ahead,
) {
    use std::arch::x86_64::*;
    let mut drip = Drip::new(ahead, pass.offs.len());
    let mut acc = [[_mm256_setzero_ps(); NB]; R];
    if !pass.first {
        for (i, a) in acc.iter_mut().enumerate() {
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(dst.add(i * NB * 8 + 8 * j));
            }
        }
    }
    let mut wp = pass.w.as_ptr();
    let x = pass.x.as_ptr();
    let pts: [*const f32; R] = std::array::from_fn(|i| x.add(bases[i]));
    for (t, &off) in pass.offs.iter().enumerate() {
        drip.tick(t);
        let wv: [__m256; NB] = std::array::from_fn(|j| _mm256_loadu_ps(wp.add(8 * j)));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*pts[i].add(off));
            for j in 0..NB {
                a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
            }
        }
        wp = wp.add(NB * 8);
    }
    let (vlo, vhi) = (_mm256_set1_ps(pass.clamp.0), _mm256_set1_ps(pass.clamp.1));
    for (i, a) in acc.iter().enumerate() {
        for (j, &v) in a.iter().enumerate() {
            let v = if pass.last {
                let v = _mm256_add_ps(v, _mm256_loadu_ps(pass.bias.as_ptr().add(8 * j)));
                // max(lo, x) and min(hi, x) return x when x is NaN, as the reference does.
                _mm256_min_ps(vhi, _mm256_max_ps(vlo, v))
            } else {
                v
            };
            _mm256_storeu_ps(dst.add(i * NB * 8 + 8 * j), v);
        }
    }
}
