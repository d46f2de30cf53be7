//! Depthwise 3 × 3 (dilation 1, horizontal stride 1 or 2) on one channel's plane with
//! AVX-512, straight from the input rows: masked loads stand in for the zero padding, and
//! stride 2 splits even and odd columns with two-register permutes. No padded copy of the
//! plane is made, so a plane costs its multiply-adds and one pass over its rows; the generic
//! path's phase split and row sums cost as much again on MobileNetV2's 28–112-wide planes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::depthwise::DepthwiseShape;
#[cfg(target_arch = "x86_64")]
use super::lanes_in_row as valid;

/// Whether [`plane_3x3`] covers this shape.
pub(super) fn covers(s: &DepthwiseShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.dilation == (1, 1) && matches!(s.stride.1, 1 | 2) && s.stride.0 >= 1
}

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
            let m = [
                valid(base, w),
                valid(base + 1, w),
                valid(base + 2, w),
                valid(base + 16, w),
                valid(base + 18, w),
            ];
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
            let mo = valid(o as isize, ow);
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
