//! Depthwise 3 × 3 (dilation 1, horizontal stride 1 or 2) on one channel's plane with
//! AVX-512, straight from the input rows: masked loads stand in for the zero padding, and
//! stride 2 splits even and odd columns with two-register permutes. No padded copy of the
//! plane is made, so a plane costs its multiply-adds and one pass over its rows; the generic
//! path's phase split and row sums cost as much again on MobileNetV2's 28–112-wide planes.
//! An 8-lane AVX2 form of the same loop serves AVX2-only CPUs at stride 2.
//!
//! Strides (1, 1) and (2, 2) on maps up to 256 wide take [`plane_3x3_strips`] instead: one
//! 16-column strip at a time from the top row to the bottom, each input row's taps loaded once
//! for every output row that reads them, the masks worked out once per layer. Layers alone, 1
//! thread, against the row groups: 384 × 14² 28 → 14.5 µs, 192 × 28² 41.5 → 23, 144 × 56² 106
//! → 77, 32 × 112² 74 → 64; stride 2: 192 × 28² 22.8 → 13.7, 144 × 56² 52.5 → 40 (96 × 112²,
//! which streams its input from L3, unchanged at 117).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::depthwise::DepthwiseShape;
#[cfg(target_arch = "x86_64")]
use super::lanes_in_row as valid;

/// Column blocks of 16 whose masks [`rows_of`] keeps in a table (maps up to 128 wide).
#[cfg(target_arch = "x86_64")]
const MASK_BLOCKS: usize = 8;
/// Whether [`plane_3x3`] covers this shape.
pub(super) fn covers(s: &DepthwiseShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.dilation == (1, 1) && matches!(s.stride.1, 1 | 2) && s.stride.0 >= 1
}

/// [`plane_3x3`] or [`plane_3x3_avx2`].
#[cfg(target_arch = "x86_64")]
pub(super) type PlaneKernel = unsafe fn(
    &DepthwiseShape,
    &[f32],
    &[f32],
    f32,
    Option<&[f32]>,
    &mut [f32],
    (usize, usize),
    (f32, f32),
);

/// `out = clamp(conv3x3(x) + bias (+ residual))` for one plane (`x`: `s.h × s.w`, `out`: `oh ×
/// ow`, both row-major); `lo`/`hi` bound the result (±∞ for none).
///
/// # Safety
/// The CPU must have AVX-512F; `covers(s)`; `x.len() == s.h * s.w`, `out.len() == oh * ow`
/// and `residual` (when given) as long as `out`, with `(oh, ow) = s.out_hw()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn plane_3x3(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    debug_assert!(covers(s) && x.len() == s.h * s.w && out.len() == oh * ow && k.len() == 9);
    let (ohw, bounds) = ((oh, ow), (lo, hi));
    // SAFETY (each arm): the caller's contract.
    match s.stride {
        (1, 1) => unsafe { rows_of::<1, 1>(s, x, k, bias, residual, out, ohw, bounds) },
        (2, 2) => unsafe { rows_of::<2, 2>(s, x, k, bias, residual, out, ohw, bounds) },
        (_, 1) => unsafe { rows_of::<1, 0>(s, x, k, bias, residual, out, ohw, bounds) },
        _ => unsafe { rows_of::<2, 0>(s, x, k, bias, residual, out, ohw, bounds) },
    }
}

/// Output rows at a time: four independent chains of multiply-adds (one chain ran at a
/// quarter of the rate), and each loaded input row serves every output row it reaches.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 4;

/// [`plane_3x3`] for horizontal stride `SX` and vertical stride `SY` (0: any, read from the
/// shape). With both known the loop over a group's input rows unrolls and every tap's output
/// row is known at compile time: the four accumulators stay in registers (with a run-time
/// vertical stride they went through the stack, and 192 × 28² ran at a fifth of the rate).
///
/// # Safety
/// As [`plane_3x3`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of<const SX: usize, const SY: usize>(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    let sy = if SY == 0 { s.stride.0 } else { SY };
    let (pt, pl) = (s.pad_begin.0 as isize, s.pad_begin.1 as isize);
    let (h, w) = (s.h as isize, s.w);
    let mut kv = [_mm512_setzero_ps(); 9];
    for (v, &t) in kv.iter_mut().zip(k) {
        *v = _mm512_set1_ps(t);
    }
    let (vlo, vhi, vb) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi), _mm512_set1_ps(bias));
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    // Each 16-column block's load masks (five taps' offsets) and store mask depend on its
    // column only: worked out once per plane, not per group of rows, where on 14- and 28-wide
    // planes they cost as many instructions as the multiply-adds. Layers alone, 1 thread:
    // 384 × 14² 31.4 → 28.1 µs, 192 × 28² 45.3 → 42.3, 32 × 112² 82.6 → 74.6, 96 × 112²
    // stride 2 127.6 → 122.4; MobileNetV2 frames alternating in one process 0.985× (1 thread,
    // twice) and 0.986× (2 threads, twice).
    let masks = |o: usize| {
        let base = (SX * o) as isize - pl;
        [
            valid(base, w),
            valid(base + 1, w),
            valid(base + 2, w),
            valid(base + 16, w),
            valid(base + 18, w),
            valid(o as isize, ow),
        ]
    };
    let blocks = ow.div_ceil(16);
    let mut table = [[0 as __mmask16; 6]; MASK_BLOCKS];
    let tabled = blocks <= MASK_BLOCKS;
    if tabled {
        for (b, t) in table.iter_mut().enumerate().take(blocks) {
            *t = masks(16 * b);
        }
    }
    let mut oy0 = 0;
    while oy0 < oh {
        let nrows = (oh - oy0).min(ROWS);
        // Input rows of this group: iy0 + t for t < (ROWS - 1) · sy + 3.
        let iy0 = (oy0 * sy) as isize - pt;
        // The rows the next group adds, asked for now: wide maps arrive from L3 or memory
        // (MobileNetV2's 112 × 112 layers), faster than the hardware prefetcher brings them.
        // 96 × 112² stride 2, input in L3: 0.66 → 0.22 ms (in L2: 0.19 → 0.16).
        let span = ((ROWS - 1) * sy + 3) as isize;
        for iy in iy0 + span..iy0 + span + (ROWS * sy) as isize {
            if (0..h).contains(&iy) {
                let r = xp.wrapping_add(iy as usize * w);
                for off in (0..w).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(off).cast());
                }
            }
        }
        let mut o = 0;
        while o < ow {
            let mut acc = [vb; ROWS];
            // A second chain per row (the right-hand taps): a chain of nine dependent
            // multiply-adds per row left the FMA units waiting on their latency.
            let mut acc2 = [_mm512_setzero_ps(); ROWS];
            let base = (SX * o) as isize - pl;
            let m = if tabled { table[o / 16] } else { masks(o) };
            let mut t = 0;
            while t < (ROWS - 1) * sy + 3 {
                let iy = iy0 + t as isize;
                if (0..h).contains(&iy) {
                    let r = xp.wrapping_add(iy as usize * w);
                    // The row's three taps for this block. Masked lanes are not read; the
                    // pointers are only formed with wrapping arithmetic.
                    // SAFETY: unmasked lanes lie inside row iy of x.
                    let v = unsafe {
                        if SX == 1 {
                            [
                                _mm512_maskz_loadu_ps(m[0], r.wrapping_offset(base)),
                                _mm512_maskz_loadu_ps(m[1], r.wrapping_offset(base + 1)),
                                _mm512_maskz_loadu_ps(m[2], r.wrapping_offset(base + 2)),
                            ]
                        } else {
                            let a0 = _mm512_maskz_loadu_ps(m[0], r.wrapping_offset(base));
                            let a1 = _mm512_maskz_loadu_ps(m[3], r.wrapping_offset(base + 16));
                            let b0 = _mm512_maskz_loadu_ps(m[2], r.wrapping_offset(base + 2));
                            let b1 = _mm512_maskz_loadu_ps(m[4], r.wrapping_offset(base + 18));
                            [
                                _mm512_permutex2var_ps(a0, even, a1),
                                _mm512_permutex2var_ps(a0, odd, a1),
                                _mm512_permutex2var_ps(b0, even, b1),
                            ]
                        }
                    };
                    for (j, a) in acc.iter_mut().enumerate() {
                        // Output row oy0 + j reads this row as its tap row ky.
                        let ky = t as isize - (j * sy) as isize;
                        if (0..3).contains(&ky) {
                            let ky = ky as usize;
                            *a = _mm512_fmadd_ps(v[0], kv[ky * 3], *a);
                            *a = _mm512_fmadd_ps(v[1], kv[ky * 3 + 1], *a);
                            acc2[j] = _mm512_fmadd_ps(v[2], kv[ky * 3 + 2], acc2[j]);
                        }
                    }
                }
                t += 1;
            }
            let mo = m[5];
            for (j, a) in acc.iter().enumerate().take(nrows) {
                let at = (oy0 + j) * ow + o;
                let mut v = _mm512_add_ps(*a, acc2[j]);
                if let Some(r) = residual {
                    // SAFETY: residual is laid out like out; masked lanes are not read.
                    v = _mm512_add_ps(v, unsafe {
                        _mm512_maskz_loadu_ps(mo, r.as_ptr().wrapping_add(at))
                    });
                }
                // max(lo, v) and min(hi, ·) return v when it is NaN: NaN passes, as in `clip`.
                v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
                // SAFETY: lanes o + j < ow of this row lie inside out.
                unsafe { _mm512_mask_storeu_ps(op.wrapping_add(at), mo, v) };
            }
            o += 16;
        }
        oy0 += ROWS;
    }
}

/// Most 16-column strips [`Strips`] plans (output maps up to 256 wide).
#[cfg(target_arch = "x86_64")]
const MAX_STRIPS: usize = 16;

/// A layer's column masks for [`plane_3x3_strips`], worked out once for all its planes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Strips {
    /// Per strip of 16 output columns: the masks of its three loads per input row and of its
    /// store.
    masks: [[__mmask16; 4]; MAX_STRIPS],
    strips: usize,
}

#[cfg(target_arch = "x86_64")]
impl Strips {
    /// The plan for `s`, when [`plane_3x3_strips`] takes it: strides (1, 1) or (2, 2) and an
    /// output at most `16 · MAX_STRIPS` wide.
    pub(super) fn plan(s: &DepthwiseShape) -> Option<Strips> {
        let (_, ow) = s.out_hw()?;
        let strips = ow.div_ceil(16);
        if !covers(s) || !matches!(s.stride, (1, 1) | (2, 2)) || strips > MAX_STRIPS {
            return None;
        }
        let sx = s.stride.1;
        let pl = s.pad_begin.1 as isize;
        let mut masks = [[0; 4]; MAX_STRIPS];
        for (b, m) in masks.iter_mut().enumerate().take(strips) {
            let o = 16 * b;
            let base = (sx * o) as isize - pl;
            // Stride 1 loads the row at three offsets, stride 2 three 16-column runs.
            let step = if sx == 1 { 1 } else { 16 };
            *m = [
                valid(base, s.w),
                valid(base + step, s.w),
                valid(base + 2 * step, s.w),
                valid(o as isize, ow),
            ];
        }
        Some(Strips { masks, strips })
    }
}

/// [`plane_3x3`] for a planned shape, one 16-column strip at a time from the top row to the
/// bottom: an input row's three taps are loaded once and serve the (up to) three output rows
/// that read it, and the masks come from the plan. [`rows_of`]'s groups of four rows across
/// every column block, which look their masks up per block and check each row's taps, ran
/// MobileNetV2's 14- to 56-wide layers 1.3–2× slower (see the module's notes).
///
/// # Safety
/// As [`plane_3x3`], with `plan` made by [`Strips::plan`] for `s`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn plane_3x3_strips(
    s: &DepthwiseShape,
    plan: &Strips,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    debug_assert!(x.len() == s.h * s.w && out.len() == oh * ow && k.len() == 9);
    let (ohw, bounds) = ((oh, ow), (lo, hi));
    // SAFETY: the caller's contract.
    unsafe {
        if s.stride.0 == 1 {
            strips::<1>(s, plan, x, k, bias, residual, out, ohw, bounds)
        } else {
            strips::<2>(s, plan, x, k, bias, residual, out, ohw, bounds)
        }
    }
}

/// [`plane_3x3_strips`] for stride `S` in both directions: each 16-column strip (as far as
/// `ow`) of every output row.
///
/// # Safety
/// As [`plane_3x3_strips`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn strips<const S: usize>(
    s: &DepthwiseShape,
    plan: &Strips,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    let mut kv = [_mm512_setzero_ps(); 9];
    for (v, &t) in kv.iter_mut().zip(k) {
        *v = _mm512_set1_ps(t);
    }
    let (vlo, vhi, vb) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi), _mm512_set1_ps(bias));
    let (pt, pl) = (s.pad_begin.0 as isize, s.pad_begin.1 as isize);
    let (h, w) = (s.h as isize, s.w);
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    let next = _mm512_set_epi32(16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    let res = residual.map(|r| r.as_ptr());
    for (i, m) in plan.masks.iter().enumerate().take(plan.strips) {
        let o = 16 * i;
        let base = (S * o) as isize - pl;
        // The three taps for the strip of the input row at `r`.
        // SAFETY (of calls): `r` is a row of x; unmasked lanes lie inside it, masked lanes
        // are not read, and the pointers are only formed with wrapping arithmetic.
        let taps = |r: *const f32| unsafe {
            if S == 1 {
                [
                    _mm512_maskz_loadu_ps(m[0], r.wrapping_offset(base)),
                    _mm512_maskz_loadu_ps(m[1], r.wrapping_offset(base + 1)),
                    _mm512_maskz_loadu_ps(m[2], r.wrapping_offset(base + 2)),
                ]
            } else {
                // Columns base .. base + 33: taps 0 and 1 are the even and odd ones of the
                // first 32, tap 2 the even ones shifted down a lane, with column 32 last.
                let a0 = _mm512_maskz_loadu_ps(m[0], r.wrapping_offset(base));
                let a1 = _mm512_maskz_loadu_ps(m[1], r.wrapping_offset(base + 16));
                let a2 = _mm512_maskz_loadu_ps(m[2] & 1, r.wrapping_offset(base + 32));
                let t0 = _mm512_permutex2var_ps(a0, even, a1);
                [
                    t0,
                    _mm512_permutex2var_ps(a0, odd, a1),
                    _mm512_permutex2var_ps(t0, next, a2),
                ]
            }
        };
        // Row iy's taps, zeros for rows in the padding.
        let row = |iy: isize| {
            if (0..h).contains(&iy) {
                taps(xp.wrapping_add(iy as usize * w))
            } else {
                [_mm512_setzero_ps(); 3]
            }
        };
        let mo = m[3];
        // Output row oy from its three input rows.
        let put = |oy: usize, r0: &[__m512; 3], r1: &[__m512; 3], r2: &[__m512; 3]| {
            // Three chains, one per tap column, so no chain waits on a multiply-add's latency.
            let mut a = _mm512_fmadd_ps(r0[0], kv[0], vb);
            let mut c = _mm512_mul_ps(r0[1], kv[1]);
            let mut d = _mm512_mul_ps(r0[2], kv[2]);
            a = _mm512_fmadd_ps(r1[0], kv[3], a);
            c = _mm512_fmadd_ps(r1[1], kv[4], c);
            d = _mm512_fmadd_ps(r1[2], kv[5], d);
            a = _mm512_fmadd_ps(r2[0], kv[6], a);
            c = _mm512_fmadd_ps(r2[1], kv[7], c);
            d = _mm512_fmadd_ps(r2[2], kv[8], d);
            let mut v = _mm512_add_ps(a, _mm512_add_ps(c, d));
            let at = oy * ow + o;
            if let Some(r) = res {
                // SAFETY: residual is laid out like out; masked lanes are not read.
                v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(mo, r.wrapping_add(at)) });
            }
            // max(lo, v) and min(hi, ·) return v when it is NaN: NaN passes, as in `clip`.
            v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));
            // SAFETY: lanes o + j < ow of this row lie inside out.
            unsafe { _mm512_mask_storeu_ps(op.wrapping_add(at), mo, v) };
        };
        // Rows oy·S - pt + (0, 1, 2); the first is the last one of the row before.
        let mut r0 = row(-pt);
        let mut r1 = if S == 1 { row(1 - pt) } else { r0 };
        for oy in 0..oh {
            let top = (oy * S) as isize - pt;
            if S == 2 {
                r1 = row(top + 1);
            }
            let r2 = row(top + 2);
            put(oy, &r0, &r1, &r2);
            if S == 1 {
                (r0, r1) = (r1, r2);
            } else {
                r0 = r2;
            }
        }
    }
}

/// [`plane_3x3`] with AVX2 and FMA, 8 lanes: masked loads (`vmaskmovps`, which does not read
/// masked lanes) only for blocks that reach past a row's ends, and stride 2 split into even
/// and odd columns by a shuffle and a lane permute. The depthwise driver sends it stride-2
/// layers only (see `depthwise::planes`); it covers every stride `covers` takes.
///
/// # Safety
/// The CPU must have AVX2 and FMA; otherwise as [`plane_3x3`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn plane_3x3_avx2(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    assert!(covers(s) && x.len() == s.h * s.w && out.len() == oh * ow && k.len() == 9);
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    let (ohw, bounds) = ((oh, ow), (lo, hi));
    // SAFETY (each arm): the caller's contract, and the lengths checked above.
    match s.stride {
        (1, 1) => unsafe { rows_of_avx2::<1, 1>(s, x, k, bias, residual, out, ohw, bounds) },
        (2, 2) => unsafe { rows_of_avx2::<2, 2>(s, x, k, bias, residual, out, ohw, bounds) },
        (_, 1) => unsafe { rows_of_avx2::<1, 0>(s, x, k, bias, residual, out, ohw, bounds) },
        _ => unsafe { rows_of_avx2::<2, 0>(s, x, k, bias, residual, out, ohw, bounds) },
    }
}

/// The lanes `j < 8` with `0 ≤ base + j < w`, as a `vmaskmovps` mask.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn lanes8(base: isize, w: usize) -> __m256i {
    let idx = _mm256_add_epi32(
        _mm256_set1_epi32(base.clamp(-64, w as isize + 64) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    _mm256_and_si256(
        _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1)),
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), idx),
    )
}

/// [`rows_of`] in 8 lanes (see there for the row groups, the second chain and the prefetch).
///
/// # Safety
/// As [`plane_3x3_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of_avx2<const SX: usize, const SY: usize>(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (lo, hi): (f32, f32),
) {
    let sy = if SY == 0 { s.stride.0 } else { SY };
    let (pt, pl) = (s.pad_begin.0 as isize, s.pad_begin.1 as isize);
    let (h, w) = (s.h as isize, s.w);
    let mut kv = [_mm256_setzero_ps(); 9];
    for (v, &t) in kv.iter_mut().zip(k) {
        *v = _mm256_set1_ps(t);
    }
    let (vlo, vhi, vb) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi), _mm256_set1_ps(bias));
    // [a0 a2 b0 b2 | a4 a6 b4 b6] (or the odd ones) → [a0 a2 a4 a6 b0 b2 b4 b6].
    let pick =
        |t: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(t)));
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    // The furthest column a block reads past its base.
    let reach = if SX == 1 { 10 } else { 18 } as isize;
    let mut oy0 = 0;
    while oy0 < oh {
        let nrows = (oh - oy0).min(ROWS);
        let iy0 = (oy0 * sy) as isize - pt;
        let span = ((ROWS - 1) * sy + 3) as isize;
        for iy in iy0 + span..iy0 + span + (ROWS * sy) as isize {
            if (0..h).contains(&iy) {
                let r = xp.wrapping_add(iy as usize * w);
                for off in (0..w).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(off).cast());
                }
            }
        }
        let mut o = 0;
        while o < ow {
            let mut acc = [vb; ROWS];
            let mut acc2 = [_mm256_setzero_ps(); ROWS];
            let base = (SX * o) as isize - pl;
            // Blocks inside the row read plainly; the others through masks.
            let inside = base >= 0 && base + reach <= w as isize;
            let m = if inside {
                [_mm256_setzero_si256(); 5]
            } else {
                [
                    lanes8(base, w),
                    lanes8(base + 1, w),
                    lanes8(base + 2, w),
                    lanes8(base + 8, w),
                    lanes8(base + 10, w),
                ]
            };
            let mut t = 0;
            while t < (ROWS - 1) * sy + 3 {
                let iy = iy0 + t as isize;
                if (0..h).contains(&iy) {
                    let r = xp.wrapping_add(iy as usize * w);
                    // SAFETY: plain loads lie inside row iy (`inside`); masked lanes are not
                    // read and unmasked ones lie inside the row.
                    let ld = |off: isize, mask: __m256i| unsafe {
                        if inside {
                            _mm256_loadu_ps(r.wrapping_offset(base + off))
                        } else {
                            _mm256_maskload_ps(r.wrapping_offset(base + off), mask)
                        }
                    };
                    let v = if SX == 1 {
                        [ld(0, m[0]), ld(1, m[1]), ld(2, m[2])]
                    } else {
                        let (a0, a1) = (ld(0, m[0]), ld(8, m[3]));
                        let (b0, b1) = (ld(2, m[2]), ld(10, m[4]));
                        [
                            pick(_mm256_shuffle_ps::<0b10_00_10_00>(a0, a1)),
                            pick(_mm256_shuffle_ps::<0b11_01_11_01>(a0, a1)),
                            pick(_mm256_shuffle_ps::<0b10_00_10_00>(b0, b1)),
                        ]
                    };
                    for (j, a) in acc.iter_mut().enumerate() {
                        let ky = t as isize - (j * sy) as isize;
                        if (0..3).contains(&ky) {
                            let ky = ky as usize;
                            *a = _mm256_fmadd_ps(v[0], kv[ky * 3], *a);
                            *a = _mm256_fmadd_ps(v[1], kv[ky * 3 + 1], *a);
                            acc2[j] = _mm256_fmadd_ps(v[2], kv[ky * 3 + 2], acc2[j]);
                        }
                    }
                }
                t += 1;
            }
            let left = ow - o;
            for (j, a) in acc.iter().enumerate().take(nrows) {
                let at = (oy0 + j) * ow + o;
                let mut v = _mm256_add_ps(*a, acc2[j]);
                if left >= 8 {
                    if let Some(r) = residual {
                        // SAFETY: residual is laid out like out; lanes o.. o + 8 ≤ ow.
                        v = _mm256_add_ps(v, unsafe { _mm256_loadu_ps(r.as_ptr().add(at)) });
                    }
                    v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
                    // SAFETY: lanes o .. o + 8 ≤ ow of this row lie inside out.
                    unsafe { _mm256_storeu_ps(op.add(at), v) };
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                    for (l, &t) in tmp.iter().enumerate().take(left) {
                        let y = t + residual.map_or(0.0, |r| r[at + l]);
                        // As `clip`: NaN passes.
                        // SAFETY: lane l < left of this row lies inside out.
                        unsafe {
                            *op.add(at + l) = if y < lo {
                                lo
                            } else if y > hi {
                                hi
                            } else {
                                y
                            }
                        };
                    }
                }
            }
            o += 8;
        }
        oy0 += ROWS;
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::testutil::rand;

    /// `clamp(conv3x3(x) + bias + residual)` by the definition (zero padding).
    fn naive(
        s: &DepthwiseShape,
        x: &[f32],
        k: &[f32],
        bias: f32,
        residual: Option<&[f32]>,
        (lo, hi): (f32, f32),
    ) -> Vec<f32> {
        let (oh, ow) = s.out_hw().unwrap();
        let mut out = vec![0f32; oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = bias as f64;
                for ky in 0..3 {
                    for kx in 0..3 {
                        let iy = (oy * s.stride.0 + ky) as isize - s.pad_begin.0 as isize;
                        let ix = (ox * s.stride.1 + kx) as isize - s.pad_begin.1 as isize;
                        if (0..s.h as isize).contains(&iy) && (0..s.w as isize).contains(&ix) {
                            acc += (x[iy as usize * s.w + ix as usize] * k[ky * 3 + kx]) as f64;
                        }
                    }
                }
                let v = acc as f32 + residual.map_or(0.0, |r| r[oy * ow + ox]);
                out[oy * ow + ox] = v.max(lo).min(hi);
            }
        }
        out
    }

    /// Both forms (each where the CPU has it) against the definition over strides (1, 1),
    /// (2, 2), (3, 1) and (1, 2), pads 0–2 on each side, widths around the 8- and 16-lane
    /// blocks and their masked edges, residual and clamp.
    #[test]
    fn matches_the_definition() {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = is_x86_feature_detected!("avx512f");
        let (mut case, mut strips) = (0u64, 0);
        for stride in [(1, 1), (2, 2), (3, 1), (1, 2)] {
            for (h, w) in [
                (1, 1),
                (3, 5),
                (7, 8),
                (6, 9),
                (5, 17),
                (9, 26),
                (4, 33),
                (3, 70),
                (14, 14),
                (11, 129),
            ] {
                for pads in [[1, 1, 1, 1], [0, 0, 0, 0], [2, 1, 0, 2], [0, 2, 2, 0]] {
                    let s = DepthwiseShape {
                        n: 1,
                        c: 1,
                        h,
                        w,
                        kh: 3,
                        kw: 3,
                        stride,
                        dilation: (1, 1),
                        pad_begin: (pads[0], pads[1]),
                        pad_end: (pads[2], pads[3]),
                    };
                    let Some((oh, ow)) = s.out_hw() else { continue };
                    case += 1;
                    let x = rand(h * w, case);
                    let k = rand(9, case + 1000);
                    let r = rand(oh * ow, case + 2000);
                    let res = case.is_multiple_of(2).then_some(&r[..]);
                    let bounds = if case.is_multiple_of(3) {
                        (-0.3, 0.4)
                    } else {
                        (f32::NEG_INFINITY, f32::INFINITY)
                    };
                    let want = naive(&s, &x, &k, 0.25, res, bounds);
                    let mut forms: Vec<(&str, Vec<f32>)> = Vec::new();
                    if avx2 {
                        let mut got = vec![f32::NAN; oh * ow];
                        // SAFETY: AVX2 and FMA detected; the lengths follow the shape.
                        unsafe {
                            plane_3x3_avx2(&s, &x, &k, 0.25, res, &mut got, (oh, ow), bounds)
                        };
                        forms.push(("avx2", got));
                    }
                    if avx512 {
                        let mut got = vec![f32::NAN; oh * ow];
                        // SAFETY: AVX-512F detected; the lengths follow the shape.
                        unsafe { plane_3x3(&s, &x, &k, 0.25, res, &mut got, (oh, ow), bounds) };
                        forms.push(("avx512", got));
                        if let Some(plan) = Strips::plan(&s) {
                            strips += 1;
                            let mut got = vec![f32::NAN; oh * ow];
                            // SAFETY: AVX-512F detected; the plan is for `s`; the lengths
                            // follow the shape.
                            unsafe {
                                plane_3x3_strips(
                                    &s,
                                    &plan,
                                    &x,
                                    &k,
                                    0.25,
                                    res,
                                    &mut got,
                                    (oh, ow),
                                    bounds,
                                )
                            };
                            forms.push(("avx512 strips", got));
                        }
                    }
                    for (form, got) in forms {
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!((g - e).abs() <= 1e-5, "{form} {s:?} at {i}: {g} vs {e}");
                        }
                    }
                }
            }
        }
        assert!(case > 60, "{case} shapes");
        assert!(!avx512 || strips > 40, "{strips} shapes through the strips");
    }
}
