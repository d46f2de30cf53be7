//! The channel-blocked layout NCHWc8 (`[n][c / 8][h][w][8]`: eight channels of one position
//! side by side) and the kernels that read and write it: pointwise (1 × 1) and depthwise
//! convolution, global pooling, and the reorders to and from NCHW.
//!
//! In NCHW a pointwise layer's product reads one row stream per input channel (32 of them for
//! MobileNetV2's 32 → 16 layer at 112 × 112), and a depthwise layer's channels must be
//! transposed into vector lanes and back. Blocked, a pointwise tile of six positions reads
//! 6 · 8 contiguous values per input block and broadcasts them against 16 output channels'
//! weights; a depthwise layer multiplies 8 channels of a position by 8 taps' weights, whatever
//! its stride, with no transposes. Measured per layer in MobileNetV2 on the AVX2 host (see
//! README), this is where ONNX Runtime's lead came from.
//!
//! Every kernel is written once over [`V8`], an 8-lane vector: AVX2 registers on x86-64, plain
//! arrays elsewhere (which LLVM vectorises for NEON's pairs of 4-lane registers).

use super::act::apply_activation;
use super::par::{par_for, SendPtr};
use crate::graph::Activation;

/// Channels per block.
pub const LANES: usize = 8;

/// Positions per pointwise register tile (6 × 2 accumulators + 2 weights + 1 broadcast fill
/// AVX2's 16 registers).
const ROWS: usize = 6;
/// Positions per pointwise task: a multiple of [`ROWS`], small enough that a task's input
/// blocks stay in L1/L2 while every output panel passes over them.
const CHUNK: usize = 96;
/// Below this many multiply-adds a call runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// An 8-lane f32 vector.
trait V8: Copy {
    /// # Safety
    /// `p` addresses 8 readable values.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` addresses 8 writable values.
    unsafe fn store(self, p: *mut f32);
    fn splat(v: f32) -> Self;
    /// `self + a · b`
    fn fma(self, a: Self, b: Self) -> Self;
    fn add(self, o: Self) -> Self;
    /// Bounded below by `lo` and above by `hi`; NaN stays NaN (as the reference's Clip).
    fn clamp(self, lo: Self, hi: Self) -> Self;
}

#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl V8 for Portable {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract.
        Portable(unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], self.0) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Portable([v; 8])
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], self.0[i])))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    #[inline(always)]
    fn clamp(self, lo: Self, hi: Self) -> Self {
        Portable(std::array::from_fn(|i| {
            let t = if self.0[i] < lo.0[i] {
                lo.0[i]
            } else {
                self.0[i]
            };
            if t > hi.0[i] {
                hi.0[i]
            } else {
                t
            }
        }))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// An AVX2 register. Only built inside `#[target_feature(enable = "avx2,fma")]` functions,
    /// whose callers checked the CPU.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256);

    impl super::V8 for Avx2 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract; AVX is enabled in every function that inlines this.
            Avx2(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: as for load.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX is enabled wherever this is inlined (see the type's doc).
            Avx2(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: as for splat.
            Avx2(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: as for splat.
            Avx2(unsafe { _mm256_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn clamp(self, lo: Self, hi: Self) -> Self {
            // SAFETY: as for splat. MAXPS/MINPS return the second operand (here the value)
            // when either is NaN, so NaN passes through.
            Avx2(unsafe { _mm256_min_ps(hi.0, _mm256_max_ps(lo.0, self.0)) })
        }
    }
}

/// Whether the AVX2 forms run (else the portable ones).
#[cfg(target_arch = "x86_64")]
fn use_avx2() -> bool {
    use super::gemm::Isa;
    matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512)
}

/// ReLU and Clip as bounds applied in the store (unbounded for anything else), and any other
/// activation for a pass afterwards: depthwise's split, with "no clamp" as infinite bounds.
fn split_activation(a: Option<Activation>) -> ((f32, f32), Option<Activation>) {
    let (clamp, rest) = super::depthwise::split_activation(a);
    (clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY)), rest)
}

/// Elements of an `[n, c, hw]` map, when `c` fills whole blocks.
fn blocked_len(n: usize, c: usize, hw: usize) -> Option<usize> {
    c.is_multiple_of(LANES).then_some(n * c * hw)
}

/// NCHW `[n, c, hw]` → NCHWc8. False, with nothing written, when `c` is not a multiple of 8
/// or a length does not fit.
pub fn to_blocked(x: &[f32], dims: (usize, usize, usize), y: &mut [f32]) -> bool {
    reorder_all::<true>(x, dims, y)
}

/// NCHWc8 `[n, c / 8, hw, 8]` → NCHW `[n, c, hw]`; as [`to_blocked`] otherwise.
pub fn to_planar(x: &[f32], dims: (usize, usize, usize), y: &mut [f32]) -> bool {
    reorder_all::<false>(x, dims, y)
}

/// [`to_blocked`] (`TO_BLOCKED`) or [`to_planar`], a task per block of 8 channels.
fn reorder_all<const TO_BLOCKED: bool>(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    y: &mut [f32],
) -> bool {
    if blocked_len(n, c, hw) != Some(x.len()) || y.len() != x.len() {
        return false;
    }
    let plane = LANES * hw;
    let yp = SendPtr(y.as_mut_ptr());
    let one = |b: usize| {
        let src = &x[b * plane..(b + 1) * plane];
        // SAFETY: block `b` owns y[b·plane .. (b+1)·plane]; blocks are disjoint.
        let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(b * plane), plane) };
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            // SAFETY: AVX2 was detected; `src` and `dst` hold one block of `hw` positions.
            return unsafe { reorder_avx2::<TO_BLOCKED>(src, dst, hw) };
        }
        reorder::<TO_BLOCKED>(src, dst, hw, 0);
    };
    run_tasks(n * c / LANES, x.len(), one);
    true
}

/// One block of 8 channels, positions `from ..`: `[8][hw]` → `[hw][8]` (`TO_BLOCKED`) or
/// back.
fn reorder<const TO_BLOCKED: bool>(src: &[f32], dst: &mut [f32], hw: usize, from: usize) {
    for p in from..hw {
        for j in 0..LANES {
            if TO_BLOCKED {
                dst[p * LANES + j] = src[j * hw + p];
            } else {
                dst[j * hw + p] = src[p * LANES + j];
            }
        }
    }
}

/// [`reorder`] eight positions at a time, each 8 × 8 square transposed in registers (one
/// value at a time this took 0.3 ms for MobileNetV2's 32 × 112² stem output, 1 thread).
///
/// # Safety
/// The CPU has AVX2; `src` and `dst` hold `8 · hw` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn reorder_avx2<const TO_BLOCKED: bool>(src: &[f32], dst: &mut [f32], hw: usize) {
    use std::arch::x86_64::*;
    assert!(src.len() == LANES * hw && dst.len() == LANES * hw);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut p = 0;
    while p + LANES <= hw {
        // SAFETY: rows j < 8 of positions p .. p + 8 lie inside both blocks (asserted).
        unsafe {
            let rows: [__m256; 8] = std::array::from_fn(|j| {
                _mm256_loadu_ps(if TO_BLOCKED {
                    s.add(j * hw + p)
                } else {
                    s.add((p + j) * LANES)
                })
            });
            let t = super::gemm::transpose8x8(rows);
            for (j, v) in t.into_iter().enumerate() {
                let at = if TO_BLOCKED {
                    (p + j) * LANES
                } else {
                    j * hw + p
                };
                _mm256_storeu_ps(d.add(at), v);
            }
        }
        p += LANES;
    }
    reorder::<TO_BLOCKED>(src, dst, hw, p);
}

/// `f(i)` for `i < n`, in parallel when `work` (multiply-adds or values) is worth it.
fn run_tasks(n: usize, work: usize, f: impl Fn(usize) + Sync) {
    if work < PAR_MIN || n == 1 {
        (0..n).for_each(f);
    } else {
        par_for(n, f);
    }
}

/// Global average (or maximum) over the positions of an NCHWc8 map, into `[n, c]` (the same
/// elements as NCHW `[n, c, 1, 1]`).
pub fn global_pool(x: &[f32], (n, c, hw): (usize, usize, usize), max: bool, y: &mut [f32]) -> bool {
    if blocked_len(n, c, hw) != Some(x.len()) || y.len() != n * c || hw == 0 {
        return false;
    }
    for (src, dst) in x.chunks_exact(LANES * hw).zip(y.chunks_exact_mut(LANES)) {
        let mut acc = if max {
            [f32::NEG_INFINITY; LANES]
        } else {
            [0f32; LANES]
        };
        for s in src.chunks_exact(LANES) {
            for (a, v) in acc.iter_mut().zip(s) {
                *a = if max {
                    if *v > *a || v.is_nan() {
                        *v
                    } else {
                        *a
                    }
                } else {
                    *a + *v
                };
            }
        }
        if !max {
            acc.iter_mut().for_each(|a| *a /= hw as f32);
        }
        dst.copy_from_slice(&acc);
    }
    true
}

/// A 1 × 1, stride-1, unpadded, single-group convolution between NCHWc8 maps, with its weights
/// packed in panels of 16 output channels (`[panel][cin][16]`; a last panel of 8 channels is
/// `[cin][8]`).
#[derive(Debug, Clone)]
pub struct Pointwise {
    cin: usize,
    cout: usize,
    /// (y, x); the input is sampled at every `stride`-th row and column (no padding).
    stride: (usize, usize),
    w: Vec<f32>,
    /// `cout` values (zeros without a bias).
    bias: Vec<f32>,
}

impl Pointwise {
    /// Packs `w` (`[cout, cin]`, row-major) and `bias`; `None` unless both channel counts are
    /// multiples of 8 and the lengths fit.
    pub fn new(w: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize) -> Option<Pointwise> {
        if cout == 0
            || cin == 0
            || !cout.is_multiple_of(LANES)
            || !cin.is_multiple_of(LANES)
            || w.len() != cout * cin
            || bias.is_some_and(|b| b.len() != cout)
        {
            return None;
        }
        let mut packed = Vec::with_capacity(cout * cin);
        for p0 in (0..cout).step_by(2 * LANES) {
            let width = (2 * LANES).min(cout - p0);
            for ci in 0..cin {
                packed.extend((p0..p0 + width).map(|co| w[co * cin + ci]));
            }
        }
        Some(Pointwise {
            cin,
            cout,
            stride: (1, 1),
            w: packed,
            bias: bias.map_or_else(|| vec![0.0; cout], <[f32]>::to_vec),
        })
    }

    /// The same convolution sampling its input at every `stride`-th row and column (a
    /// ResNet's downsampling shortcut); `None` for a zero stride.
    pub fn with_stride(mut self, stride: (usize, usize)) -> Option<Pointwise> {
        (stride.0 > 0 && stride.1 > 0).then(|| {
            self.stride = stride;
            self
        })
    }

    /// Output height and width for an `h × w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            h.saturating_sub(1) / self.stride.0 + usize::from(h > 0),
            w.saturating_sub(1) / self.stride.1 + usize::from(w > 0),
        )
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// `y = act(W · x + bias (+ residual))` for `n` images of `h × w` positions, all NCHWc8
    /// (`y` and `residual` of [`Pointwise::out_hw`]). False, with nothing written, when a
    /// length does not fit.
    pub fn run(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        y: &mut [f32],
    ) -> bool {
        let (oh, ow) = self.out_hw(h, w);
        if x.len() != n * self.cin * h * w
            || y.len() != n * self.cout * oh * ow
            || residual.is_some_and(|r| r.len() != y.len())
        {
            return false;
        }
        if y.is_empty() {
            return true;
        }
        // A strided layer's input is subsampled into a compact map first: reading every
        // other position in place wasted half of each cache line and measured 1.16–1.38×
        // the subsample-then-multiply time on ResNet-50's shortcuts (1 thread, AVX2).
        if self.stride != (1, 1) {
            let mut compact = super::scratch::take(n * self.cin * oh * ow);
            subsample(
                x,
                (n * self.cin / LANES, h, w),
                self.stride,
                (oh, ow),
                &mut compact,
            );
            self.run_unit(&compact, (n, oh * ow), residual, activation, y);
            super::scratch::give(compact);
        } else {
            self.run_unit(x, (n, oh * ow), residual, activation, y);
        }
        true
    }

    /// [`Pointwise::run`] at stride 1 on `n` images of `hw` positions, the lengths checked.
    fn run_unit(
        &self,
        x: &[f32],
        (n, hw): (usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        y: &mut [f32],
    ) {
        let (bounds, rest) = split_activation(activation);
        let panels = self.cout.div_ceil(2 * LANES);
        let chunks = hw.div_ceil(CHUNK);
        // Few chunks (small maps): split the panels too, so both cores get work.
        let groups = if chunks >= 4 { 1 } else { panels.min(4) };
        let per_group = panels.div_ceil(groups);
        let tasks = n * chunks * groups;
        let yp = SendPtr(y.as_mut_ptr());
        let job = PointwiseJob {
            k: self,
            x,
            hw,
            residual,
            bounds,
        };
        let one = |t: usize| {
            let (img, rest_t) = (t / (chunks * groups), t % (chunks * groups));
            let (c, g) = (rest_t / groups, rest_t % groups);
            let panels = g * per_group..((g + 1) * per_group).min(panels);
            // SAFETY: task (img, c, g) writes only image img's positions of chunk c in the
            // output blocks of its panels; tasks cover disjoint (positions, blocks) pairs.
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                return unsafe { pointwise_avx2(&job, img, c, panels, yp.get()) };
            }
            unsafe { pointwise_task::<Portable>(&job, img, c, panels, yp.get()) }
        };
        run_tasks(tasks, n * hw * self.cin * self.cout, one);
        apply_activation(rest, y);
    }
}

/// Every `stride`-th row and column of `blocks` NCHWc8 planes of `h × w` positions, into
/// `out` (`blocks` planes of `oh × ow`).
fn subsample(
    x: &[f32],
    (blocks, h, w): (usize, usize, usize),
    (sy, sx): (usize, usize),
    (oh, ow): (usize, usize),
    out: &mut [f32],
) {
    let (plane, oplane) = (LANES * h * w, LANES * oh * ow);
    let op = SendPtr(out.as_mut_ptr());
    run_tasks(blocks, out.len(), |b| {
        // SAFETY: block b owns out[b·oplane .. (b+1)·oplane]; blocks are disjoint.
        let dst = unsafe { std::slice::from_raw_parts_mut(op.get().add(b * oplane), oplane) };
        let src = &x[b * plane..(b + 1) * plane];
        for oy in 0..oh {
            let row = &src[oy * sy * w * LANES..];
            for ox in 0..ow {
                let at = (oy * ow + ox) * LANES;
                dst[at..at + LANES].copy_from_slice(&row[ox * sx * LANES..][..LANES]);
            }
        }
    });
}

struct PointwiseJob<'a> {
    k: &'a Pointwise,
    x: &'a [f32],
    hw: usize,
    residual: Option<&'a [f32]>,
    bounds: (f32, f32),
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pointwise_avx2(
    job: &PointwiseJob,
    img: usize,
    chunk: usize,
    panels: std::ops::Range<usize>,
    y: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe { pointwise_task::<avx2::Avx2>(job, img, chunk, panels, y) }
}

/// One task of [`Pointwise::run`]: chunk `chunk` of image `img`'s positions, for the output
/// `panels`.
///
/// # Safety
/// `y` addresses the whole output; no other thread touches this task's part of it.
#[inline(always)]
unsafe fn pointwise_task<T: V8>(
    job: &PointwiseJob,
    img: usize,
    chunk: usize,
    panels: std::ops::Range<usize>,
    y: *mut f32,
) {
    let k = job.k;
    let hw = job.hw;
    let plane = LANES * hw;
    let x = job.x[img * k.cin * hw..].as_ptr();
    let out = img * k.cout * hw;
    let (lo, hi) = (T::splat(job.bounds.0), T::splat(job.bounds.1));
    let positions = chunk * CHUNK..((chunk + 1) * CHUNK).min(hw);
    for panel in panels {
        let c0 = panel * 2 * LANES;
        let wide = k.cout - c0 >= 2 * LANES;
        let w = k.w[c0 * k.cin..].as_ptr();
        let bias = &k.bias[c0..];
        let mut p = positions.start;
        while p < positions.end {
            let r = ROWS.min(positions.end - p);
            let at = out + c0 * hw + p * LANES;
            let tile = Tile {
                x: x.wrapping_add(p * LANES),
                plane,
                blocks: k.cin / LANES,
                w,
                bias: bias.as_ptr(),
                residual: job.residual.map(|res| res[at..].as_ptr()),
                y: y.wrapping_add(at),
                lo,
                hi,
            };
            // SAFETY: the tile's positions p .. p + r lie inside the map, its weights inside
            // the panel, its outputs inside this task's part (the caller's contract).
            unsafe {
                match (wide, r) {
                    (true, 6) => tile.run::<6, 2>(),
                    (true, 5) => tile.run::<5, 2>(),
                    (true, 4) => tile.run::<4, 2>(),
                    (true, 3) => tile.run::<3, 2>(),
                    (true, 2) => tile.run::<2, 2>(),
                    (true, _) => tile.run::<1, 2>(),
                    (false, 6) => tile.run::<6, 1>(),
                    (false, 5) => tile.run::<5, 1>(),
                    (false, 4) => tile.run::<4, 1>(),
                    (false, 3) => tile.run::<3, 1>(),
                    (false, 2) => tile.run::<2, 1>(),
                    (false, _) => tile.run::<1, 1>(),
                }
            }
            p += r;
        }
    }
}

/// One register tile: `R` positions × `V` blocks of output channels.
struct Tile<T> {
    /// The first position's first input block.
    x: *const f32,
    /// Distance between input (and output) blocks.
    plane: usize,
    blocks: usize,
    /// The panel's packed weights, `[cin][8 · V]`.
    w: *const f32,
    bias: *const f32,
    residual: Option<*const f32>,
    y: *mut f32,
    lo: T,
    hi: T,
}

impl<T: V8> Tile<T> {
    /// `R` positions × `V` blocks of output channels.
    ///
    /// # Safety
    /// Every pointer addresses what its field's doc says, for `R` positions and `V` blocks.
    #[inline(always)]
    unsafe fn run<const R: usize, const V: usize>(&self) {
        // SAFETY (the loads and stores below): the caller's contract.
        unsafe {
            let mut acc = [[T::splat(0.0); V]; R];
            for v in 0..V {
                let b = T::load(self.bias.add(v * LANES));
                acc.iter_mut().for_each(|a| a[v] = b);
            }
            let mut w = self.w;
            for blk in 0..self.blocks {
                let xb = self.x.add(blk * self.plane);
                for j in 0..LANES {
                    let mut wv = [T::splat(0.0); V];
                    for (v, wv) in wv.iter_mut().enumerate() {
                        *wv = T::load(w.add(v * LANES));
                    }
                    w = w.add(V * LANES);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = T::splat(*xb.add(r * LANES + j));
                        for v in 0..V {
                            a[v] = a[v].fma(b, wv[v]);
                        }
                    }
                }
            }
            for v in 0..V {
                for (r, a) in acc.iter().enumerate() {
                    let off = v * self.plane + r * LANES;
                    let mut s = a[v];
                    if let Some(res) = self.residual {
                        s = s.add(T::load(res.add(off)));
                    }
                    s.clamp(self.lo, self.hi).store(self.y.add(off));
                }
            }
        }
    }
}

/// A depthwise convolution (one `kh × kw` filter per channel) between NCHWc8 maps, with its
/// weights as `[c / 8][tap][8]`.
#[derive(Debug, Clone)]
pub struct Depthwise {
    c: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    /// Top, left.
    pad_begin: (usize, usize),
    /// Bottom, right.
    pad_end: (usize, usize),
    w: Vec<f32>,
    bias: Vec<f32>,
}

impl Depthwise {
    /// Packs `w` (`[c, 1, kh, kw]`) and `bias`; `pads` are top, left, bottom, right. `None`
    /// unless `c` is a multiple of 8, the geometry is not degenerate and the lengths fit.
    pub fn new(
        w: &[f32],
        bias: Option<&[f32]>,
        c: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        dilation: (usize, usize),
        pads: [usize; 4],
    ) -> Option<Depthwise> {
        let taps = kernel.0 * kernel.1;
        if c == 0
            || !c.is_multiple_of(LANES)
            || taps == 0
            || stride.0 == 0
            || stride.1 == 0
            || dilation.0 == 0
            || dilation.1 == 0
            || w.len() != c * taps
            || bias.is_some_and(|b| b.len() != c)
        {
            return None;
        }
        let mut packed = vec![0f32; c * taps];
        for ch in 0..c {
            for t in 0..taps {
                packed[(ch / LANES * taps + t) * LANES + ch % LANES] = w[ch * taps + t];
            }
        }
        Some(Depthwise {
            c,
            kernel,
            stride,
            dilation,
            pad_begin: (pads[0], pads[1]),
            pad_end: (pads[2], pads[3]),
            w: packed,
            bias: bias.map_or_else(|| vec![0.0; c], <[f32]>::to_vec),
        })
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.c
    }

    /// Output height and width for an `h × w` input, `None` when the kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let axis = |n: usize, k: usize, s: usize, d: usize, pb: usize, pe: usize| {
            let span = d * (k - 1) + 1;
            (n + pb + pe).checked_sub(span).map(|e| e / s + 1)
        };
        Some((
            axis(
                h,
                self.kernel.0,
                self.stride.0,
                self.dilation.0,
                self.pad_begin.0,
                self.pad_end.0,
            )?,
            axis(
                w,
                self.kernel.1,
                self.stride.1,
                self.dilation.1,
                self.pad_begin.1,
                self.pad_end.1,
            )?,
        ))
    }

    /// `y = act(depthwise(x) + bias (+ residual))` for `n` images of `h × w`, all NCHWc8.
    /// False, with nothing written, when the kernel does not fit or a length is wrong.
    pub fn run(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        y: &mut [f32],
    ) -> bool {
        let Some((oh, ow)) = self.out_hw(h, w) else {
            return false;
        };
        if x.len() != n * self.c * h * w
            || y.len() != n * self.c * oh * ow
            || residual.is_some_and(|r| r.len() != y.len())
        {
            return false;
        }
        if y.is_empty() {
            return true;
        }
        let (bounds, rest) = split_activation(activation);
        let blocks = n * self.c / LANES;
        // Few blocks (a fat map of few channels): bands of output rows as well, so the work
        // still splits over the cores.
        let bands = if blocks >= 8 { 1 } else { oh.min(8 / blocks) };
        let band = oh.div_ceil(bands);
        let bands = oh.div_ceil(band);
        let job = DepthwiseJob {
            k: self,
            x,
            hw: (h, w),
            ohw: (oh, ow),
            residual,
            bounds,
        };
        let yp = SendPtr(y.as_mut_ptr());
        let one = |t: usize| {
            let (b, r) = (t / bands, t % bands);
            let rows = r * band..((r + 1) * band).min(oh);
            // SAFETY: task (b, r) writes only block b's output rows `rows`; tasks are
            // disjoint.
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                return unsafe { depthwise_avx2(&job, b, rows, yp.get()) };
            }
            unsafe { depthwise_task::<Portable>(&job, b, rows, yp.get()) }
        };
        run_tasks(blocks * bands, y.len() * self.kernel.0 * self.kernel.1, one);
        apply_activation(rest, y);
        true
    }
}

struct DepthwiseJob<'a> {
    k: &'a Depthwise,
    x: &'a [f32],
    hw: (usize, usize),
    ohw: (usize, usize),
    residual: Option<&'a [f32]>,
    bounds: (f32, f32),
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_avx2(job: &DepthwiseJob, b: usize, rows: std::ops::Range<usize>, y: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { depthwise_task::<avx2::Avx2>(job, b, rows, y) }
}

/// Output rows `rows` of block `b` (image and channel block together).
///
/// # Safety
/// `y` addresses the whole output; no other thread touches these rows of this block.
#[inline(always)]
unsafe fn depthwise_task<T: V8>(
    job: &DepthwiseJob,
    b: usize,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let k = job.k;
    match k.kernel {
        // SAFETY (each arm): the caller's contract.
        (3, 3) => unsafe { depthwise_rows::<T, 3, 3>(job, b, rows, y) },
        (5, 5) => unsafe { depthwise_rows::<T, 5, 5>(job, b, rows, y) },
        _ => unsafe { depthwise_rows::<T, 0, 0>(job, b, rows, y) },
    }
}

/// The rows of [`depthwise_task`] for a `KH × KW` kernel (0 × 0: any size, read from the
/// kernel). Positions whose window lies inside the input run four at a time without bounds
/// checks; the border positions check each tap. (Plain functions rather than closures: a
/// closure does not take on its enclosing function's target features.)
#[inline(always)]
unsafe fn depthwise_rows<T: V8, const KH: usize, const KW: usize>(
    job: &DepthwiseJob,
    b: usize,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let k = job.k;
    let (kh, kw) = if KH == 0 { k.kernel } else { (KH, KW) };
    let taps = kh * kw;
    let (h, w) = job.hw;
    let (oh, ow) = job.ohw;
    let (sy, sx) = k.stride;
    let (dy, dx) = k.dilation;
    let (pt, pl) = k.pad_begin;
    let cb = b % (k.c / LANES);
    let x = &job.x[b * LANES * h * w..(b + 1) * LANES * h * w];
    let wts = &k.w[cb * taps * LANES..(cb + 1) * taps * LANES];
    // SAFETY: the block's 8 bias values lie inside the bias.
    let bias = unsafe { T::load(k.bias[cb * LANES..].as_ptr()) };
    let (lo, hi) = (T::splat(job.bounds.0), T::splat(job.bounds.1));
    let out0 = b * LANES * oh * ow;
    // Output columns whose whole window lies inside the row: ox·sx ≥ pl and
    // ox·sx − pl + (kw − 1)·dx < w.
    let ox_lo = pl.div_ceil(sx).min(ow);
    let ox_hi = (w + pl)
        .checked_sub((kw - 1) * dx + 1)
        .map_or(0, |e| e / sx + 1)
        .clamp(ox_lo, ow);
    let xp = x.as_ptr();
    let wp = wts.as_ptr();
    let g = Geometry {
        kh,
        kw,
        h,
        w,
        sx,
        dy,
        dx,
        pl,
    };
    for oy in rows {
        let iy0 = (oy * sy) as isize - pt as isize;
        let row_out = out0 + oy * ow * LANES;
        let res = job
            .residual
            .map(|r| r[row_out..row_out + ow * LANES].as_ptr());
        let out = Row {
            y: y.wrapping_add(row_out),
            res,
            lo,
            hi,
        };
        let full_rows = iy0 >= 0 && iy0 as usize + (kh - 1) * dy < h;
        // SAFETY (the calls below): `out` addresses this output row (and its residual),
        // `xp`/`wp` the block's plane and taps; `checked` bounds every tap itself.
        unsafe {
            if !full_rows {
                for ox in 0..ow {
                    out.put(ox, checked(&g, xp, wp, bias, iy0, ox));
                }
                continue;
            }
            for ox in 0..ox_lo {
                out.put(ox, checked(&g, xp, wp, bias, iy0, ox));
            }
            let mut ox = ox_lo;
            let row0 = iy0 as usize;
            while ox + 4 <= ox_hi {
                let mut acc = [bias; 4];
                for ky in 0..kh {
                    let row = (row0 + ky * dy) * w;
                    for kx in 0..kw {
                        // Every window of ox .. ox + 4 is inside the plane (ox_lo ≤ ox,
                        // ox + 3 < ox_hi, full rows).
                        let wv = T::load(wp.add((ky * kw + kx) * LANES));
                        let base = row + ox * sx + kx * dx - pl;
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = a.fma(T::load(xp.add((base + i * sx) * LANES)), wv);
                        }
                    }
                }
                for (i, a) in acc.into_iter().enumerate() {
                    out.put(ox + i, a);
                }
                ox += 4;
            }
            for ox in ox..ow {
                out.put(ox, checked(&g, xp, wp, bias, iy0, ox));
            }
        }
    }
}

/// What [`checked`] needs of a depthwise layer's geometry.
struct Geometry {
    kh: usize,
    kw: usize,
    h: usize,
    w: usize,
    sx: usize,
    dy: usize,
    dx: usize,
    pl: usize,
}

/// One output row of a depthwise block: where it goes, its residual, the bounds.
struct Row<T> {
    y: *mut f32,
    res: Option<*const f32>,
    lo: T,
    hi: T,
}

impl<T: V8> Row<T> {
    /// Stores position `ox`'s sums (plus the residual, bounded).
    ///
    /// # Safety
    /// `ox` lies inside the row.
    #[inline(always)]
    unsafe fn put(&self, ox: usize, acc: T) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut s = acc;
            if let Some(res) = self.res {
                s = s.add(T::load(res.add(ox * LANES)));
            }
            s.clamp(self.lo, self.hi).store(self.y.add(ox * LANES));
        }
    }
}

/// One output position's sums, checking every tap against the plane (the border positions).
///
/// # Safety
/// `xp` addresses the block's `h × w` plane, `wp` its `kh · kw` taps.
#[inline(always)]
unsafe fn checked<T: V8>(
    g: &Geometry,
    xp: *const f32,
    wp: *const f32,
    bias: T,
    iy0: isize,
    ox: usize,
) -> T {
    let ix0 = (ox * g.sx) as isize - g.pl as isize;
    let mut acc = bias;
    for ky in 0..g.kh {
        let iy = iy0 + (ky * g.dy) as isize;
        if iy < 0 || iy as usize >= g.h {
            continue;
        }
        for kx in 0..g.kw {
            let ix = ix0 + (kx * g.dx) as isize;
            if ix < 0 || ix as usize >= g.w {
                continue;
            }
            // SAFETY: (iy, ix) is inside the plane, the tap inside the weights.
            unsafe {
                let xv = T::load(xp.add((iy as usize * g.w + ix as usize) * LANES));
                acc = acc.fma(xv, T::load(wp.add((ky * g.kw + kx) * LANES)));
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::depthwise::{depthwise_conv2d, DepthwiseShape};
    use crate::kernels::testutil::{below, rand};

    fn blocked(x: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        assert!(to_blocked(x, dims, &mut y));
        y
    }

    fn planar(x: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        assert!(to_planar(x, dims, &mut y));
        y
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn reorders_round_trip_and_place_channels_in_lanes() {
        // 21 positions: two 8 × 8 squares in registers and a tail of 5.
        for hw in [5, 21] {
            let dims = (2, 16, hw);
            let x = rand(2 * 16 * hw, 1);
            let b = blocked(&x, dims);
            for p in 0..hw {
                // Image 1, channel 11, position p → block 1 of image 1, lane 3.
                assert_eq!(b[(2 + 1) * 8 * hw + p * 8 + 3], x[(16 + 11) * hw + p]);
            }
            assert_eq!(planar(&b, dims), x);
        }
        let x = rand(2 * 16 * 5, 1);
        let mut y = vec![0.0; x.len()];
        assert!(!to_blocked(&x[1..], (2, 16, 5), &mut y));
        assert!(!to_blocked(&x[..12 * 5], (1, 12, 5), &mut y[..60]));
    }

    /// Pointwise against a plain loop in NCHW (f64 sums), over random channel counts, map
    /// sizes (tails of every length), strides 1–3, residuals and activations.
    #[test]
    fn pointwise_matches_a_direct_product() {
        let mut pick = below(7);
        for case in 0..40u64 {
            let cin = 8 * (1 + pick(6));
            let cout = 8 * (1 + pick(7));
            let (h, w) = (1 + pick(13), 1 + pick(15));
            let stride = if case % 4 == 3 {
                (1 + pick(3), 1 + pick(3))
            } else {
                (1, 1)
            };
            let (oh, ow) = ((h - 1) / stride.0 + 1, (w - 1) / stride.1 + 1);
            let n = 1 + pick(2);
            let wt = rand(cout * cin, case * 3 + 1);
            let bias = rand(cout, case * 3 + 2);
            let x = rand(n * cin * h * w, case * 3 + 3);
            let res = rand(n * cout * oh * ow, case * 3 + 4);
            let act = match case % 3 {
                0 => None,
                1 => Some(Activation::Clip {
                    min: Some(0.0),
                    max: Some(0.5),
                }),
                _ => Some(Activation::Sigmoid),
            };
            let with_res = case % 2 == 0;
            let mut want = vec![0f32; res.len()];
            for i in 0..n {
                for co in 0..cout {
                    for (oy, ox) in (0..oh).flat_map(|oy| (0..ow).map(move |ox| (oy, ox))) {
                        let p = oy * stride.0 * w + ox * stride.1;
                        let mut s = bias[co] as f64;
                        for ci in 0..cin {
                            s += wt[co * cin + ci] as f64 * x[(i * cin + ci) * h * w + p] as f64;
                        }
                        let at = (i * cout + co) * oh * ow + oy * ow + ox;
                        if with_res {
                            s += res[at] as f64;
                        }
                        want[at] = s as f32;
                    }
                }
            }
            crate::kernels::act::apply_activation(act, &mut want);
            let k = Pointwise::new(&wt, Some(&bias), cout, cin)
                .and_then(|k| k.with_stride(stride))
                .unwrap();
            assert_eq!(k.out_hw(h, w), (oh, ow));
            let mut y = vec![f32::NAN; want.len()];
            let rb = blocked(&res, (n, cout, oh * ow));
            assert!(k.run(
                &blocked(&x, (n, cin, h * w)),
                (n, h, w),
                with_res.then_some(rb.as_slice()),
                act,
                &mut y
            ));
            close(
                &planar(&y, (n, cout, oh * ow)),
                &want,
                &format!("{n}×{cin}→{cout} at {h}×{w}, stride {stride:?}"),
            );
        }
        // A map larger than one chunk, unstrided and strided (several tasks).
        for (h, w, stride) in [(20, 30, (1, 1)), (28, 28, (2, 2))] {
            let (cin, cout) = (16, 24);
            let wt = rand(cout * cin, 7);
            let x = rand(cin * h * w, 8);
            let k = Pointwise::new(&wt, None, cout, cin)
                .and_then(|k| k.with_stride(stride))
                .unwrap();
            let (oh, ow) = k.out_hw(h, w);
            let mut y = vec![f32::NAN; cout * oh * ow];
            assert!(k.run(&blocked(&x, (1, cin, h * w)), (1, h, w), None, None, &mut y));
            let y = planar(&y, (1, cout, oh * ow));
            for (co, oy, ox) in [(0, 0, 0), (23, oh - 1, ow - 1), (5, oh / 2, 3)] {
                let p = oy * stride.0 * w + ox * stride.1;
                let want: f32 = (0..cin)
                    .map(|ci| wt[co * cin + ci] * x[ci * h * w + p])
                    .sum();
                let got = y[co * oh * ow + oy * ow + ox];
                assert!(
                    (got - want).abs() < 1e-4,
                    "{h}×{w} {stride:?}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn pointwise_refuses_what_it_cannot_hold() {
        assert!(Pointwise::new(&[0.0; 12 * 8], None, 12, 8).is_none());
        assert!(Pointwise::new(&[0.0; 8 * 8], None, 8, 9).is_none());
        let k = Pointwise::new(&[0.0; 8 * 8], None, 8, 8).unwrap();
        let mut y = vec![0.0; 8 * 3];
        assert!(!k.run(&[0.0; 8 * 2], (1, 1, 3), None, None, &mut y));
    }

    /// Depthwise against the NCHW kernel (itself tested against candle) over random
    /// geometries: kernels 1–5 (3 × 3 and 5 × 5 take their own paths), strides, dilations,
    /// asymmetric pads, residuals and both fused and separate activations.
    #[test]
    fn depthwise_matches_the_planar_kernel() {
        let mut pick = below(11);
        for case in 0..60u64 {
            let c = 8 * (1 + pick(3));
            let k = [1, 3, 3, 5, 2][pick(5)];
            let (h, w) = (k + pick(20), k + pick(20));
            let stride = (1 + pick(2), 1 + pick(2));
            let dilation = if case % 5 == 4 { (2, 1) } else { (1, 1) };
            let pads = [pick(k), pick(k), pick(k), pick(k)];
            let n = 1 + pick(2);
            let s = DepthwiseShape {
                n,
                c,
                h,
                w,
                kh: k,
                kw: k,
                stride,
                dilation,
                pad_begin: (pads[0], pads[1]),
                pad_end: (pads[2], pads[3]),
            };
            let Some((oh, ow)) = s.out_hw() else { continue };
            let wt = rand(c * k * k, case * 5 + 1);
            let bias = rand(c, case * 5 + 2);
            let x = rand(n * c * h * w, case * 5 + 3);
            let res = rand(n * c * oh * ow, case * 5 + 4);
            let with_res = case % 2 == 1;
            let act = match case % 3 {
                0 => None,
                1 => Some(Activation::Relu),
                _ => Some(Activation::HardSwish),
            };
            let mut want = vec![0f32; res.len()];
            assert!(depthwise_conv2d(
                &s,
                &x,
                &wt,
                Some(&bias),
                with_res.then_some(res.as_slice()),
                act,
                &mut want
            ));
            let kern = Depthwise::new(&wt, Some(&bias), c, (k, k), stride, dilation, pads).unwrap();
            assert_eq!(kern.out_hw(h, w), Some((oh, ow)));
            let rb = blocked(&res, (n, c, oh * ow));
            let mut y = vec![f32::NAN; want.len()];
            assert!(kern.run(
                &blocked(&x, (n, c, h * w)),
                (n, h, w),
                with_res.then_some(rb.as_slice()),
                act,
                &mut y
            ));
            close(&planar(&y, (n, c, oh * ow)), &want, &format!("{s:?}"));
        }
    }

    #[test]
    fn global_pool_matches_a_plain_mean_and_max() {
        let (n, c, hw) = (2, 16, 13);
        let x = rand(n * c * hw, 9);
        let b = blocked(&x, (n, c, hw));
        for max in [false, true] {
            let mut y = vec![0.0; n * c];
            assert!(global_pool(&b, (n, c, hw), max, &mut y));
            for (i, plane) in x.chunks_exact(hw).enumerate() {
                let want = if max {
                    plane.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                } else {
                    plane.iter().sum::<f32>() / hw as f32
                };
                assert!((y[i] - want).abs() < 1e-5, "{max} {i}");
            }
        }
    }
}
