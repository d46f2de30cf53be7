//! Depthwise 2-D convolution (one filter per channel), the bulk of MobileNet-style models.
//!
//! candle runs a grouped convolution as one convolution per group followed by a `cat`, which
//! for C groups of one channel each is ~70 % of MobileNetV2's time. Here each channel is a
//! direct loop over its own plane, channels spread over rayon's pool, padding handled by
//! clipping the loops rather than by materialising a padded copy.

use std::cell::RefCell;

use super::par::par_chunks_mut;

use super::act::apply_activation;
#[cfg(target_arch = "x86_64")]
use super::gemm::Isa;
use crate::graph::Activation;

/// Geometry of one depthwise convolution over an NCHW tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseShape {
    /// Batch.
    pub n: usize,
    /// Channels (= groups = output channels).
    pub c: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (y, x).
    pub stride: (usize, usize),
    /// Dilations (y, x).
    pub dilation: (usize, usize),
    /// Leading pads (top, left); trailing pads only widen the output, see `out_hw`.
    pub pad_begin: (usize, usize),
    /// Trailing pads (bottom, right).
    pub pad_end: (usize, usize),
}

impl DepthwiseShape {
    /// Output height and width, `None` when the (padded) input is smaller than the kernel.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let oh = (self.h + self.pad_begin.0 + self.pad_end.0)
            .checked_sub(span(self.kh, self.dilation.0))?
            / self.stride.0
            + 1;
        let ow = (self.w + self.pad_begin.1 + self.pad_end.1)
            .checked_sub(span(self.kw, self.dilation.1))?
            / self.stride.1
            + 1;
        Some((oh, ow))
    }
}

/// `y = act(depthwise_conv(x, weight) + bias + residual)`, x `[n, c, h, w]`, weight
/// `[c, 1, kh, kw]`, bias `[c]`, residual like y, all contiguous row-major, into y
/// `[n, c, oh, ow]` (every element written). False, with nothing written, when a length does
/// not fit the shape.
pub fn depthwise_conv2d(
    s: &DepthwiseShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
    y: &mut [f32],
) -> bool {
    depthwise_any(s, x, weight, bias, residual, activation, y, true)
}

/// [`depthwise_conv2d`] plane by plane, never channel-blocked: for bands of a few rows of a
/// wide map (a fused block's), where the per-plane 3 × 3 kernel reads the rows in place.
pub(super) fn depthwise_planes(
    s: &DepthwiseShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Option<Activation>,
    y: &mut [f32],
) -> bool {
    depthwise_any(s, x, weight, bias, None, activation, y, false)
}

#[allow(clippy::too_many_arguments)]
fn depthwise_any(
    s: &DepthwiseShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
    y: &mut [f32],
    may_block: bool,
) -> bool {
    let Some((oh, ow)) = s.out_hw() else {
        return false;
    };
    let plane_out = oh * ow;
    if x.len() != s.n * s.c * s.h * s.w
        || weight.len() != s.c * s.kh * s.kw
        || bias.is_some_and(|b| b.len() != s.c)
        || y.len() != s.n * s.c * plane_out
        || residual.is_some_and(|r| r.len() != y.len())
    {
        return false;
    }
    let job = Job {
        s,
        x,
        weight,
        bias,
        residual,
        activation,
        oh,
        ow,
        #[cfg(target_arch = "x86_64")]
        strips: match Isa::detect() {
            Isa::Avx512 => super::dw3x3::Strips::plan(s),
            _ => None,
        },
    };
    // The in-place 3 × 3 kernels beat the blocked path from 14 × 14 outputs on (measured,
    // 1 thread: 384 × 14² 34 vs 55 µs, 576 × 14² stride 2 39 vs 46 µs), and the strips
    // ([`super::dw3x3::plane_3x3_strips`]) on 7 × 7 too (960 channels: 24 vs 46 µs; 8 × 8:
    // 26 vs 62 µs for 1024).
    #[cfg(target_arch = "x86_64")]
    let block_max = if job.strips.is_some() {
        0
    } else if super::dw3x3::covers(s) && Isa::detect() == Isa::Avx512 {
        BLOCKED_BESIDE_3X3
    } else {
        SMALL_PLANE
    };
    #[cfg(not(target_arch = "x86_64"))]
    let block_max = SMALL_PLANE;
    if may_block && plane_out <= block_max && s.c >= LANES {
        blocked(&job, y, false);
        return true;
    }
    // Four tasks a thread, each a run of consecutive planes (at least PAR_MIN multiply-adds):
    // against tasks of PAR_MIN, which gave a 14 × 14 layer about twenty a thread, 2 threads,
    // alone: 384 × 14² 7.7 → 7.2 µs, 576 × 14² 11.5 → 10.4, 192 × 28² 11.3 → 11.0, 144 × 56²
    // 39.2 → 37.3.
    let threads = super::par::current_threads().max(1);
    let per_task = (s.n * s.c)
        .div_ceil(4 * threads)
        .max(PAR_MIN / (plane_out * s.kh * s.kw).max(1))
        .max(1);
    let one = |(t, out): (usize, &mut [f32])| {
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            let first = t * per_task;
            #[cfg(target_arch = "x86_64")]
            match Isa::detect() {
                // SAFETY: detect() saw these features on this CPU.
                Isa::Avx512 => return unsafe { planes_avx512(&job, first, out, scratch) },
                Isa::Avx2 => return unsafe { planes_avx2(&job, first, out, scratch) },
                Isa::Portable => {}
            }
            planes(&job, first, out, scratch)
        })
    };
    if s.n * s.c * plane_out * s.kh * s.kw < PAR_MIN {
        y.chunks_mut(per_task * plane_out).enumerate().for_each(one);
    } else {
        par_chunks_mut(y, per_task * plane_out, |t, out| one((t, out)));
    }
    true
}

/// Below this many multiply-adds a call runs on one thread; also the least work per task.
const PAR_MIN: usize = 1 << 14;

/// Output planes up to this size (14 × 14) run channel-blocked: 16 channels interleaved, so
/// each tap is one 16-lane multiply-add per output position with no per-plane setup. Per
/// plane, the flat path's fixed costs (phase split, tap table, row copies) outweigh a few
/// hundred multiply-adds; the transposes in and out cost less. Measured on MobileNetV2's
/// layers (1 thread, AVX-512): 7 × 7 planes 2.1× faster blocked, 14 × 14 ones 1.1–1.5×, 28 × 28
/// ones 1.5× slower.
const SMALL_PLANE: usize = 196;
/// ... and up to this size (7 × 7 and a little more) where the AVX-512 3 × 3 kernel applies.
#[cfg(target_arch = "x86_64")]
const BLOCKED_BESIDE_3X3: usize = 64;
const LANES: usize = 16;

/// The channel-blocked path: per image, tasks of 16 channels. `portable` forces the
/// portable code (for its tests on x86).
fn blocked(job: &Job, y: &mut [f32], portable: bool) {
    let s = job.s;
    let plane_out = job.oh * job.ow;
    for n in 0..s.n {
        let yn = &mut y[n * s.c * plane_out..(n + 1) * s.c * plane_out];
        let one = |b: usize, out: &mut [f32]| {
            SCRATCH.with(|scratch| {
                let scratch = &mut *scratch.borrow_mut();
                #[cfg(target_arch = "x86_64")]
                match Isa::detect() {
                    _ if portable => {}
                    // SAFETY: detect() saw these features on this CPU.
                    Isa::Avx512 => return unsafe { block_avx512(job, n, b * LANES, out, scratch) },
                    Isa::Avx2 => return unsafe { block_avx2(job, n, b * LANES, out, scratch) },
                    Isa::Portable => {}
                }
                let _ = portable;
                block_body::<PortableTile>(job, n, b * LANES, out, scratch)
            })
        };
        if s.c * plane_out * s.kh * s.kw < PAR_MIN {
            yn.chunks_mut(LANES * plane_out)
                .enumerate()
                .for_each(|(b, o)| one(b, o));
        } else {
            par_chunks_mut(yn, LANES * plane_out, one);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(job: &Job, n: usize, c0: usize, out: &mut [f32], scratch: &mut Scratch) {
    block_body::<AvxTile>(job, n, c0, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(job: &Job, n: usize, c0: usize, out: &mut [f32], scratch: &mut Scratch) {
    block_body::<AvxTile>(job, n, c0, out, scratch)
}

/// Channels `c0 .. c0 + lanes` of image `n` (`out` holds their planes), interleaved 16
/// channels per position: the padded input is transposed in (8 × 8 tiles), every output
/// position is a 16-lane sum over the taps, and the sums are transposed back out with the
/// residual and ReLU/Clip applied on the way. The padding cells of the interleaved copy are
/// zeroed once per geometry (the transposes only write the interior).
#[inline(always)]
fn block_body<T: Tile>(job: &Job, n: usize, c0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let s = job.s;
    let (oh, ow) = (job.oh, job.ow);
    let plane_out = oh * ow;
    let plane_in = s.h * s.w;
    let lanes = out.len() / plane_out;
    let (pt, pl) = s.pad_begin;
    let hp = s.h + pt + s.pad_end.0;
    let wp = s.w + pl + s.pad_end.1;
    let taps = s.kh * s.kw;
    let p_len = hp * wp * LANES;
    let a_len = plane_out * LANES;
    let total = p_len + a_len + taps * LANES;
    // `usize::MAX` tells this layout from the phase planes of `plane_flat`.
    let geometry = [s.h, s.w, pt, pl, hp, wp, plane_out, taps, usize::MAX];
    if scratch.zeroed_for != Some(geometry) || scratch.buf.len() < total {
        scratch.buf.clear();
        scratch.buf.resize(total, 0.0);
        scratch.zeroed_for = Some(geometry);
    }
    let (p, rest) = scratch.buf[..total].split_at_mut(p_len);
    let (acc, w) = rest.split_at_mut(a_len);
    let x = &job.x[(n * s.c + c0) * plane_in..(n * s.c + c0 + lanes) * plane_in];
    // The plane's positions in runs of 8, whatever the row width: position `q` of the plane
    // lands at padded cell `(q / w + pt) · wp + q % w + pl`.
    for l0 in (0..lanes).step_by(8) {
        let nl = (lanes - l0).min(8);
        let (mut iy, mut ix) = (0, 0);
        for q in (0..plane_in).step_by(8) {
            let cnt = (plane_in - q).min(8);
            // No closures here (`array::from_fn`): they are compiled without the caller's
            // target features, and the vector loads in them would not inline.
            let mut rows = [T::load(&[0.0; 8]); 8];
            for (l, r) in rows[..nl].iter_mut().enumerate() {
                let at = (l0 + l) * plane_in + q;
                *r = if at + 8 <= x.len() {
                    T::load(as8(&x[at..at + 8]))
                } else {
                    let mut t = [0f32; 8];
                    t[..cnt].copy_from_slice(&x[at..at + cnt]);
                    T::load(&t)
                };
            }
            for v in &T::transpose(rows)[..cnt] {
                let at = ((iy + pt) * wp + ix + pl) * LANES + l0;
                T::store(as8_mut(&mut p[at..at + 8]), *v);
                ix += 1;
                if ix == s.w {
                    ix = 0;
                    iy += 1;
                }
            }
        }
    }
    for l in 0..lanes {
        for t in 0..taps {
            w[t * LANES + l] = job.weight[(c0 + l) * taps + t];
        }
    }
    let mut bias = [0f32; LANES];
    if let Some(b) = job.bias {
        bias[..lanes].copy_from_slice(&b[c0..c0 + lanes]);
    }
    let (p16, _) = p.as_chunks::<LANES>();
    let (w16, _) = w.as_chunks::<LANES>();
    let (acc16, _) = acc.as_chunks_mut::<LANES>();
    let g = Geometry {
        wp,
        oh,
        ow,
        stride: s.stride,
        dilation: s.dilation,
    };
    match (s.kh, s.kw) {
        (3, 3) => sums_fixed::<3, 3>(&g, p16, w16, bias, acc16),
        (5, 5) => sums_fixed::<5, 5>(&g, p16, w16, bias, acc16),
        _ => sums_any(&g, (s.kh, s.kw), p16, w16, bias, acc16),
    }
    let (clamp, other) = split_activation(job.activation);
    for l0 in (0..lanes).step_by(8) {
        let nl = (lanes - l0).min(8);
        for q in (0..plane_out).step_by(8) {
            let cnt = (plane_out - q).min(8);
            let mut rows = [T::load(&[0.0; 8]); 8];
            for (j, r) in rows[..cnt].iter_mut().enumerate() {
                let at = (q + j) * LANES + l0;
                *r = T::load(as8(&acc[at..at + 8]));
            }
            for (l, &v) in T::transpose(rows)[..nl].iter().enumerate() {
                let at = (l0 + l) * plane_out + q;
                let rat = (n * s.c + c0 + l0 + l) * plane_out + q;
                if cnt == 8 {
                    let mut v = v;
                    if let Some(r) = job.residual {
                        v = T::add(v, T::load(as8(&r[rat..rat + 8])));
                    }
                    if let Some(c) = clamp {
                        v = T::clamp(v, c);
                    }
                    T::store(as8_mut(&mut out[at..at + 8]), v);
                } else {
                    let mut t = [0f32; 8];
                    T::store(&mut t, v);
                    for (j, o) in out[at..at + cnt].iter_mut().enumerate() {
                        let mut y = t[j];
                        if let Some(r) = job.residual {
                            y += r[rat + j];
                        }
                        *o = clamp.map_or(y, |c| clip(y, c));
                    }
                }
            }
        }
    }
    apply_activation(other, out);
}

/// An 8-long slice as an array (callers slice exactly 8).
#[inline(always)]
fn as8(s: &[f32]) -> &[f32; 8] {
    s.first_chunk().expect("an 8-value slice")
}

/// [`as8`], mutable.
#[inline(always)]
fn as8_mut(s: &mut [f32]) -> &mut [f32; 8] {
    s.first_chunk_mut().expect("an 8-value slice")
}

/// The interleaved plane's geometry, for the sums.
struct Geometry {
    wp: usize,
    oh: usize,
    ow: usize,
    stride: (usize, usize),
    dilation: (usize, usize),
}

/// `acc[q] = bias + Σ_taps w[t] · p[at(q, t)]` over 16 lanes, for a kernel of `KH × KW`
/// known at compile time: the weights stay in registers and the taps unroll.
#[inline(always)]
fn sums_fixed<const KH: usize, const KW: usize>(
    g: &Geometry,
    p: &[[f32; LANES]],
    w: &[[f32; LANES]],
    bias: [f32; LANES],
    acc: &mut [[f32; LANES]],
) {
    let (sy, sx) = g.stride;
    let (dy, dx) = g.dilation;
    let wt: [[[f32; LANES]; KW]; KH] =
        std::array::from_fn(|ky| std::array::from_fn(|kx| w[ky * KW + kx]));
    for oy in 0..g.oh {
        let rows: [&[[f32; LANES]]; KH] =
            std::array::from_fn(|ky| &p[(oy * sy + ky * dy) * g.wp..]);
        let out = &mut acc[oy * g.ow..(oy + 1) * g.ow];
        // Four positions at a time: independent sums, so the multiply-adds overlap.
        let mut quads = out.chunks_exact_mut(4);
        let mut ox = 0;
        for o4 in &mut quads {
            let (mut a0, mut a1, mut a2, mut a3) = (bias, bias, bias, bias);
            for (r, wrow) in rows.iter().zip(&wt) {
                for (kx, wv) in wrow.iter().enumerate() {
                    let b = ox * sx + kx * dx;
                    fma16(&mut a0, wv, &r[b]);
                    fma16(&mut a1, wv, &r[b + sx]);
                    fma16(&mut a2, wv, &r[b + 2 * sx]);
                    fma16(&mut a3, wv, &r[b + 3 * sx]);
                }
            }
            o4[0] = a0;
            o4[1] = a1;
            o4[2] = a2;
            o4[3] = a3;
            ox += 4;
        }
        for o in quads.into_remainder() {
            let mut a = bias;
            for (r, wrow) in rows.iter().zip(&wt) {
                for (kx, wv) in wrow.iter().enumerate() {
                    fma16(&mut a, wv, &r[ox * sx + kx * dx]);
                }
            }
            *o = a;
            ox += 1;
        }
    }
}

/// `a += w · x`, lane by lane (one FMA instruction per vector in the AVX builds: `mul_add`
/// is not left to contraction).
#[inline(always)]
fn fma16(a: &mut [f32; LANES], w: &[f32; LANES], x: &[f32; LANES]) {
    for j in 0..LANES {
        a[j] = w[j].mul_add(x[j], a[j]);
    }
}

/// [`sums_fixed`] for any kernel size (inlined, like it, into the AVX entry points).
#[inline(always)]
fn sums_any(
    g: &Geometry,
    (kh, kw): (usize, usize),
    p: &[[f32; LANES]],
    w: &[[f32; LANES]],
    bias: [f32; LANES],
    acc: &mut [[f32; LANES]],
) {
    let (sy, sx) = g.stride;
    let (dy, dx) = g.dilation;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut a = bias;
            for ky in 0..kh {
                let row = (oy * sy + ky * dy) * g.wp + ox * sx;
                for kx in 0..kw {
                    fma16(&mut a, &w[ky * kw + kx], &p[row + kx * dx]);
                }
            }
            acc[oy * g.ow + ox] = a;
        }
    }
}

/// ReLU and Clip as a clamp that runs in a copy out; any other activation for a pass of its own.
pub(super) fn split_activation(a: Option<Activation>) -> (Option<(f32, f32)>, Option<Activation>) {
    match a {
        Some(Activation::Relu) => (Some((0.0, f32::INFINITY)), None),
        Some(Activation::Clip { min, max }) => (
            Some((
                min.unwrap_or(f32::NEG_INFINITY),
                max.unwrap_or(f32::INFINITY),
            )),
            None,
        ),
        other => (None, other),
    }
}

/// Clamps by comparisons, as in act.rs: NaN stays NaN and loops of it vectorise.
#[inline(always)]
fn clip(v: f32, (lo, hi): (f32, f32)) -> f32 {
    let t = if v < lo { lo } else { v };
    if t > hi {
        hi
    } else {
        t
    }
}

/// Eight-lane vectors for one instruction set: just what the blocked path's transposes and
/// copy-out need.
trait Tile {
    /// Eight `f32`s.
    type V: Copy;
    /// Reads `v[..8]`.
    fn load(v: &[f32; 8]) -> Self::V;
    /// Writes `v` into `dst[..8]`.
    fn store(dst: &mut [f32; 8], v: Self::V);
    /// `out[j][i] = rows[i][j]`.
    fn transpose(rows: [Self::V; 8]) -> [Self::V; 8];
    /// `a + b`, lane by lane.
    fn add(a: Self::V, b: Self::V) -> Self::V;
    /// [`clip`] lane by lane.
    fn clamp(v: Self::V, c: (f32, f32)) -> Self::V;
}

/// Any CPU.
struct PortableTile;

impl Tile for PortableTile {
    type V = [f32; 8];
    #[inline(always)]
    fn load(v: &[f32; 8]) -> [f32; 8] {
        *v
    }
    #[inline(always)]
    fn store(dst: &mut [f32; 8], v: [f32; 8]) {
        *dst = v;
    }
    #[inline(always)]
    fn transpose(rows: [[f32; 8]; 8]) -> [[f32; 8]; 8] {
        std::array::from_fn(|j| std::array::from_fn(|i| rows[i][j]))
    }
    #[inline(always)]
    fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn clamp(v: [f32; 8], c: (f32, f32)) -> [f32; 8] {
        v.map(|x| clip(x, c))
    }
}

/// AVX (instantiated only inside the AVX2 / AVX-512 entry points, whose features include
/// AVX): a transpose is 24 shuffles in registers instead of 64 scalar moves.
#[cfg(target_arch = "x86_64")]
struct AvxTile;

#[cfg(target_arch = "x86_64")]
impl Tile for AvxTile {
    type V = std::arch::x86_64::__m256;
    #[inline(always)]
    fn load(v: &[f32; 8]) -> Self::V {
        // SAFETY: eight readable values; AVX is enabled where this type is used (see above).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(v.as_ptr()) }
    }
    #[inline(always)]
    fn store(dst: &mut [f32; 8], v: Self::V) {
        // SAFETY: eight writable values; AVX as above.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(dst.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn transpose(r: [Self::V; 8]) -> [Self::V; 8] {
        // SAFETY: register shuffles only; AVX as above.
        unsafe { super::gemm::transpose8x8(r) }
    }
    #[inline(always)]
    fn add(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: AVX as above.
        unsafe { std::arch::x86_64::_mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn clamp(v: Self::V, (lo, hi): (f32, f32)) -> Self::V {
        use std::arch::x86_64::*;
        // max(lo, v) returns v when either is NaN, min(hi, ·) likewise: NaN passes, as in clip.
        // SAFETY: AVX as above.
        unsafe { _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v)) }
    }
}

/// One call's operands.
struct Job<'a> {
    s: &'a DepthwiseShape,
    x: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    activation: Option<Activation>,
    oh: usize,
    ow: usize,
    /// The AVX-512 3 × 3 strip kernel's plan, where it applies (made once per call).
    #[cfg(target_arch = "x86_64")]
    strips: Option<super::dw3x3::Strips>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn planes_avx512(job: &Job, first: usize, out: &mut [f32], scratch: &mut Scratch) {
    planes(job, first, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn planes_avx2(job: &Job, first: usize, out: &mut [f32], scratch: &mut Scratch) {
    planes(job, first, out, scratch)
}

/// The planes (image · channel) `first ..` that `out` holds, one after another.
#[inline(always)]
fn planes(job: &Job, first: usize, out: &mut [f32], scratch: &mut Scratch) {
    let s = job.s;
    // ReLU and Clip run in the copy out of the row sums; anything else in a pass per plane.
    let (clamp, rest) = split_activation(job.activation);
    let (plane_in, plane_out) = (s.h * s.w, job.oh * job.ow);
    // The in-place 3 × 3 kernel for this ISA, where it applies. With AVX2 only the stride-2
    // layers take it: the phase split costs them as much as the products, and in place
    // measured 0.75–0.87× on MobileNetV2's 144 × 56² and 96 × 112² (1 thread, Zen 3). At
    // stride 1 the phase-split path stayed ahead (192 × 28²: 1.29× in place; 16 registers
    // hold the four rows' sums or the taps, not both).
    #[cfg(target_arch = "x86_64")]
    let direct: Option<super::dw3x3::PlaneKernel> = match Isa::detect() {
        _ if !super::dw3x3::covers(s) => None,
        Isa::Avx512 => Some(super::dw3x3::plane_3x3),
        Isa::Avx2 if s.stride.1 == 2 => Some(super::dw3x3::plane_3x3_avx2),
        _ => None,
    };
    for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
        let nc = first + i;
        let ch = nc % s.c;
        let taps = s.kh * s.kw;
        let x = &job.x[nc * plane_in..(nc + 1) * plane_in];
        let k = &job.weight[ch * taps..(ch + 1) * taps];
        let bias = job.bias.map_or(0.0, |b| b[ch]);
        let residual = job
            .residual
            .map(|r| &r[nc * plane_out..(nc + 1) * plane_out]);
        let ohw = (job.oh, job.ow);
        #[cfg(target_arch = "x86_64")]
        {
            let bounds = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            let ran = if let Some(plan) = &job.strips {
                // SAFETY: AVX-512 detected, the plan was made for `s`; the lengths follow
                // from the shape checked by depthwise_conv2d.
                unsafe {
                    super::dw3x3::plane_3x3_strips(s, plan, x, k, bias, residual, o, ohw, bounds)
                };
                true
            } else if let Some(direct) = direct {
                // SAFETY: the kernel was picked for the detected ISA and `covers(s)`; the
                // plane, taps, residual and output lengths follow from the shape checked by
                // depthwise_conv2d.
                unsafe { direct(s, x, k, bias, residual, o, ohw, bounds) };
                true
            } else {
                false
            };
            if ran {
                if rest.is_some() {
                    apply_activation(rest, o);
                }
                continue;
            }
        }
        plane_flat(s, x, k, bias, residual, o, ohw, clamp, scratch);
        // Still in cache: the activation runs here rather than in another pass.
        apply_activation(rest, o);
    }
}

thread_local! {
    /// The calling thread's phase planes and row sums, reused across channels and frames.
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            buf: Vec::new(),
            zeroed_for: None,
        })
    };
}

/// A thread's buffer, and the plane geometry whose padding cells in it are known to be zero.
/// [`split_phases`] writes the same cells for every plane of one geometry and the sums never
/// write the phase planes, so consecutive planes of a layer (and the same layer next frame)
/// skip re-zeroing, which took an eighth of the depthwise time.
struct Scratch {
    buf: Vec<f32>,
    zeroed_for: Option<[usize; 9]>,
}

const BLOCK: usize = 16;
/// Kernels up to 7 × 7 keep their tap table on the stack.
const MAX_STACK_TAPS: usize = 49;

/// Width of one stride phase of the padded plane and the length of a phase (with one slack
/// row, which absorbs reads past the last row by the dropped columns `ox ≥ ow`).
pub(super) fn phase_layout(s: &DepthwiseShape) -> (usize, usize) {
    let hp = s.h + s.pad_begin.0 + s.pad_end.0;
    let wp = s.w + s.pad_begin.1 + s.pad_end.1;
    let (hs, ws) = (hp.div_ceil(s.stride.0) + 1, wp.div_ceil(s.stride.1));
    (ws, hs * ws)
}

/// Everything that decides which cells of a phase-split scratch [`split_phases`] writes (and
/// where what follows the `p_len` phase cells starts).
pub(super) fn phase_key(
    s: &DepthwiseShape,
    ws: usize,
    plane_len: usize,
    p_len: usize,
) -> [usize; 9] {
    let (sy, sx) = s.stride;
    let (pt, pl) = s.pad_begin;
    [s.h, s.w, sy, sx, pt, pl, ws, plane_len, p_len]
}

/// Makes `buf` `len` long and filled with `fill`, unless it already holds the layout `key`
/// (`held`): split_phases writes the same cells for every plane of one layout, so the padding
/// cells keep their fill across planes, layers of the same geometry and frames.
pub(super) fn reuse_phase_scratch(
    buf: &mut Vec<f32>,
    held: &mut Option<[usize; 9]>,
    key: [usize; 9],
    len: usize,
    fill: f32,
) {
    if *held != Some(key) || buf.len() < len {
        buf.clear();
        buf.resize(len, fill);
        *held = Some(key);
    }
}

/// Scatters the plane `x` into its stride phases in `p` (`P[a][b][i][j] =
/// x_pad[i·sy + a][j·sx + b]`, each phase `plane_len` long, rows `ws` wide); the padding
/// cells keep whatever `p` was filled with (0 for convolution, -∞ for max pooling).
#[inline(always)]
pub(super) fn split_phases(
    s: &DepthwiseShape,
    x: &[f32],
    p: &mut [f32],
    ws: usize,
    plane_len: usize,
) {
    let (sy, sx) = s.stride;
    let (pt, pl) = s.pad_begin;
    for iy in 0..s.h {
        let (a, i) = ((iy + pt) % sy, (iy + pt) / sy);
        let xrow = &x[iy * s.w..(iy + 1) * s.w];
        if sx == 1 {
            // Stride 1 has one phase: a plain (vectorised) row copy.
            let at = a * plane_len + i * ws + pl;
            p[at..at + s.w].copy_from_slice(xrow);
            continue;
        }
        if sx == 2 {
            // Deinterleave pairs: input column ix goes to phase (ix + pl) % 2, index
            // (ix + pl) / 2. Written pairwise so it vectorises.
            let (first, j0) = if pl % 2 == 0 {
                (0, pl / 2)
            } else {
                (1, pl.div_ceil(2))
            };
            let base = a * 2 * plane_len + i * ws;
            let (ph0, ph1) = p[base..].split_at_mut(plane_len);
            // Column `first + 2m` lands in phase 0 at j0 + m, column `first + 2m + 1` in
            // phase 1 at j0' + m, where j0' = (first + 1 + pl) / 2.
            let j1 = (first + 1 + pl) / 2;
            if first == 1 {
                ph1[pl / 2] = xrow[0];
            }
            let pairs = xrow[first..].chunks_exact(2);
            let tail = pairs.remainder();
            let m = pairs.len();
            for ((e, o), pr) in ph0[j0..j0 + m]
                .iter_mut()
                .zip(&mut ph1[j1..j1 + m])
                .zip(pairs)
            {
                *e = pr[0];
                *o = pr[1];
            }
            if let [t] = tail {
                ph0[j0 + m] = *t;
            }
            continue;
        }
        for b in 0..sx {
            // Input columns ix with (ix + pl) % sx == b land at j = (ix + pl) / sx.
            let first = (b + sx - pl % sx) % sx;
            if first >= s.w {
                continue;
            }
            let j0 = (first + pl) / sx;
            let dst = &mut p[(a * sx + b) * plane_len + i * ws + j0..];
            for (d, &v) in dst.iter_mut().zip(xrow[first..].iter().step_by(sx)) {
                *d = v;
            }
        }
    }
}

/// The padded input is split into its stride phases (`P[a][b][i][j] = x_pad[i·sy + a][j·sx + b]`),
/// so every tap of every output reads `P[phase][oy·ws + ox + shift]`: one flat index over the
/// whole plane. Each block of 16 flat positions then sums all taps in registers and the plane
/// needs no border cases; positions with `ox ≥ ow` are computed and dropped (few, for the
/// small planes where this matters). Writes `out = conv + bias (+ residual)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn plane_flat(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    clamp: Option<(f32, f32)>,
    scratch: &mut Scratch,
) {
    let (sy, sx) = s.stride;
    let (dy, dx) = s.dilation;
    let (ws, plane_len) = phase_layout(s);
    let phases = sy * sx;
    let ylen = (oh * ws).div_ceil(BLOCK) * BLOCK;
    let p_len = phases * plane_len + ylen + BLOCK;
    reuse_phase_scratch(
        &mut scratch.buf,
        &mut scratch.zeroed_for,
        phase_key(s, ws, plane_len, p_len),
        p_len + ylen,
        0.0,
    );
    // y is written whole by the sums below: it needs no zeroing.
    let (p, y) = scratch.buf[..p_len + ylen].split_at_mut(p_len);
    split_phases(s, x, p, ws, plane_len);
    let n_taps = s.kh * s.kw;
    let mut stack = [(0f32, 0usize); MAX_STACK_TAPS];
    let mut heap = Vec::new();
    let taps: &mut [(f32, usize)] = if n_taps <= MAX_STACK_TAPS {
        &mut stack[..n_taps]
    } else {
        heap.resize(n_taps, (0f32, 0usize));
        &mut heap
    };
    for (t, tap) in taps.iter_mut().enumerate() {
        let (ry, rx) = ((t / s.kw) * dy, (t % s.kw) * dx);
        let phase = (ry % sy) * sx + rx % sx;
        *tap = (k[t], phase * plane_len + (ry / sy) * ws + rx / sx);
    }
    // Four blocks at a time: four independent sums, so the multiply-adds overlap instead of
    // waiting on each other's latency (one chain per block ran at a quarter of the FMA rate).
    const GROUP: usize = 4 * BLOCK;
    let grouped = y.len() / GROUP * GROUP;
    let (head, tail) = y.split_at_mut(grouped);
    for (c, yb) in head.chunks_exact_mut(GROUP).enumerate() {
        let base = c * GROUP;
        let mut acc = [[bias; BLOCK]; 4];
        for &(wv, off) in taps.iter() {
            let v = &p[off + base..off + base + GROUP];
            for (g, a) in acc.iter_mut().enumerate() {
                for jj in 0..BLOCK {
                    // mul_add: one FMA per lane in the AVX builds (a·b + c is not contracted).
                    a[jj] = wv.mul_add(v[g * BLOCK + jj], a[jj]);
                }
            }
        }
        for (dst, a) in yb.chunks_exact_mut(BLOCK).zip(&acc) {
            dst.copy_from_slice(a);
        }
    }
    for (c, yb) in tail.chunks_exact_mut(BLOCK).enumerate() {
        let base = grouped + c * BLOCK;
        let mut acc = [bias; BLOCK];
        for &(wv, off) in taps.iter() {
            let v = &p[off + base..off + base + BLOCK];
            for jj in 0..BLOCK {
                acc[jj] = wv.mul_add(v[jj], acc[jj]);
            }
        }
        yb.copy_from_slice(&acc);
    }
    for oy in 0..oh {
        let dst = &mut out[oy * ow..(oy + 1) * ow];
        let src = &y[oy * ws..oy * ws + ow];
        match (residual, clamp) {
            (Some(r), c) => {
                for ((o, v), rv) in dst.iter_mut().zip(src).zip(&r[oy * ow..(oy + 1) * ow]) {
                    *o = match c {
                        Some(c) => clip(v + rv, c),
                        None => v + rv,
                    };
                }
            }
            (None, Some(c)) => {
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = clip(v, c);
                }
            }
            (None, None) => dst.copy_from_slice(src),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Compares against candle's grouped conv2d on a padded input (the reference path).
    fn check(s: DepthwiseShape) {
        // Plain, and with the epilogues that run fused in the copy out (residual, ReLU, Clip)
        // or in a pass of their own (LeakyReLU).
        for (residual, act) in [
            (false, None),
            (true, Some(Activation::Relu)),
            (
                false,
                Some(Activation::Clip {
                    min: Some(-0.5),
                    max: Some(0.5),
                }),
            ),
            (true, Some(Activation::LeakyRelu { alpha: 0.1 })),
        ] {
            check_with(s, residual, act);
        }
    }

    fn check_with(s: DepthwiseShape, residual: bool, act: Option<Activation>) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (s.n, s.c, s.h, s.w), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (s.c, 1, s.kh, s.kw), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, s.c, &dev).unwrap();
        let (oh, ow) = s.out_hw().unwrap();
        let r = Tensor::randn(0f32, 1.0, (s.n, s.c, oh, ow), &dev).unwrap();
        let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        // NaN-filled: every output element must be written.
        let mut got = vec![f32::NAN; s.n * s.c * oh * ow];
        assert!(depthwise_conv2d(
            &s,
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            &w.flatten_all().unwrap().to_vec1().unwrap(),
            Some(&b.to_vec1::<f32>().unwrap()),
            residual.then_some(rv.as_slice()),
            act,
            &mut got,
        ));
        let xp = x
            .pad_with_zeros(2, s.pad_begin.0, s.pad_end.0)
            .unwrap()
            .pad_with_zeros(3, s.pad_begin.1, s.pad_end.1)
            .unwrap();
        assert_eq!(
            s.stride.0, s.stride.1,
            "reference supports square strides only"
        );
        assert_eq!(s.dilation.0, s.dilation.1);
        let mut want = xp
            .conv2d(&w, 0, s.stride.0, s.dilation.0, s.c)
            .unwrap()
            .broadcast_add(&b.reshape((1, s.c, 1, 1)).unwrap())
            .unwrap();
        if residual {
            want = (want + &r).unwrap();
        }
        let want = crate::exec::ops::apply_activation(want, act.as_ref()).unwrap();
        assert_eq!(want.dims(), &[s.n, s.c, oh, ow], "{s:?}");
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "{s:?} {act:?}: max abs diff {max}");
    }

    fn shape(
        c: usize,
        hw: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dil: usize,
    ) -> DepthwiseShape {
        DepthwiseShape {
            n: 2,
            c,
            h: hw,
            w: hw + 3,
            kh: k,
            kw: k,
            stride: (stride, stride),
            dilation: (dil, dil),
            pad_begin: (pad, pad),
            pad_end: (pad, pad),
        }
    }

    #[test]
    fn matches_candle_grouped_conv() {
        for (k, stride, pad, dil) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (5, 1, 2, 1),
            (5, 2, 2, 1),
            (3, 1, 0, 1),
            (3, 1, 2, 2),
            (1, 1, 0, 1),
            (3, 3, 1, 1),
        ] {
            for hw in [1, 4, 7, 12] {
                if hw + 2 * pad > dil * (k - 1) {
                    check(shape(5, hw, k, stride, pad, dil));
                }
            }
        }
    }

    /// Checks `count` seeded random shapes that `accept` takes: `c_min + [0, c_spread)`
    /// channels, planes up to `max_hw`, rectangular kernels up to 5, strides up to
    /// `max_stride`, dilations 1–2, asymmetric pads 0–2.
    fn sweep(
        seed: u64,
        count: usize,
        (c_min, c_spread): (usize, usize),
        max_hw: usize,
        max_stride: usize,
        accept: impl Fn(&DepthwiseShape) -> bool,
    ) {
        let mut next = crate::kernels::testutil::below(seed);
        let mut done = 0;
        while done < count {
            let (kh, kw) = (1 + next(5), 1 + next(5));
            let st = 1 + next(max_stride);
            let dil = 1 + next(2);
            let s = DepthwiseShape {
                n: 1 + next(2),
                c: c_min + next(c_spread),
                h: 1 + next(max_hw),
                w: 1 + next(max_hw),
                kh,
                kw,
                stride: (st, st),
                dilation: (dil, dil),
                pad_begin: (next(3), next(3)),
                pad_end: (next(3), next(3)),
            };
            if s.out_hw().is_some() && accept(&s) {
                check(s);
                done += 1;
            }
        }
    }

    /// Random shapes (seeded): odd channel counts, rectangular planes and kernels, asymmetric
    /// pads, strides 1–3, dilations 1–2.
    #[test]
    fn random_shapes_match_candle() {
        sweep(0x9e37_79b9_7f4a_7c15, 60, (1, 11), 20, 3, |_| true);
    }

    #[test]
    fn wide_3x3_planes_match_candle() {
        // Rows of several 64-column groups and ragged tails (the AVX-512 3 × 3 path).
        for (stride, pad) in [(1, 1), (2, 1), (1, 0), (2, 0), (1, 2), (2, 2)] {
            for hw in [17, 33, 70, 113] {
                check(shape(3, hw, 3, stride, pad, 1));
            }
        }
    }

    /// Small planes with at least 16 channels take the channel-blocked path (partial blocks
    /// included).
    #[test]
    fn channel_blocked_small_planes_match_candle() {
        sweep(0x51ed_270b_2b8e_a6c1, 30, (16, 40), 14, 2, |s| {
            s.out_hw().is_some_and(|(oh, ow)| oh * ow <= SMALL_PLANE)
        });
    }

    /// The portable transposes of the blocked path (what aarch64 runs) give what the
    /// dispatched path gives, which the tests above hold to candle's.
    #[test]
    fn portable_blocked_path_matches() {
        let mut next = crate::kernels::testutil::below(0x2545_f491_4f6c_dd1d);
        for _ in 0..12 {
            let st = 1 + next(2);
            let s = DepthwiseShape {
                n: 1 + next(2),
                c: 16 + next(30),
                h: 3 + next(12),
                w: 3 + next(12),
                kh: 3,
                kw: 3,
                stride: (st, st),
                dilation: (1, 1),
                pad_begin: (next(2), next(2)),
                pad_end: (next(2), next(2)),
            };
            let (oh, ow) = s.out_hw().unwrap();
            let x = crate::kernels::testutil::rand(s.n * s.c * s.h * s.w, 1);
            let w = crate::kernels::testutil::rand(s.c * 9, 2);
            let b = crate::kernels::testutil::rand(s.c, 3);
            let r = crate::kernels::testutil::rand(s.n * s.c * oh * ow, 4);
            let act = Some(Activation::Clip {
                min: Some(-0.5),
                max: Some(0.5),
            });
            let mut want = vec![f32::NAN; r.len()];
            assert!(depthwise_conv2d(
                &s,
                &x,
                &w,
                Some(&b),
                Some(&r),
                act,
                &mut want
            ));
            let job = Job {
                s: &s,
                x: &x,
                weight: &w,
                bias: Some(&b),
                residual: Some(&r),
                activation: act,
                oh,
                ow,
                #[cfg(target_arch = "x86_64")]
                strips: None,
            };
            let mut got = vec![f32::NAN; r.len()];
            blocked(&job, &mut got, true);
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "{s:?}: max abs diff {max}");
        }
    }

    #[test]
    fn asymmetric_pads_match() {
        let mut s = shape(3, 9, 3, 2, 0, 1);
        s.pad_begin = (0, 1);
        s.pad_end = (1, 0);
        check(s);
    }
}
