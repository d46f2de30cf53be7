//! 2-D max pooling over NCHW planes. The padded plane is split into its stride phases (as in
//! [`super::depthwise`]), so every window cell of every output is one flat offset and the max
//! runs over contiguous, vectorisable runs with no border cases.

use std::cell::RefCell;

use super::par::par_chunks_mut;

use super::depthwise::{
    phase_key, phase_layout, reuse_phase_scratch, split_phases, DepthwiseShape,
};

/// A thread's phase planes, and the geometry whose padding cells they hold at -∞:
/// [`super::depthwise::split_phases`] writes the same cells for every plane of one geometry,
/// so only the first plane (of a layer, per thread, and again after another geometry) fills
/// them. Filling the whole scratch per plane was most of the pooling time (a 112 × 112 plane
/// is 16 K values to fill for 3 K outputs).
struct Scratch {
    buf: Vec<f32>,
    filled_for: Option<[usize; 9]>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            buf: Vec::new(),
            filled_for: None,
        })
    };
}

/// Max pooling of `x` (`[n, c, h, w]`) with the window, strides and pads of `s` (its `c` is the
/// channel count, `dilation` the window dilation); padding never wins (-∞). Writes `y`
/// (`[n, c, oh, ow]`); false, with nothing written, when the window or a length does not fit.
pub fn max_pool2d(s: &DepthwiseShape, x: &[f32], y: &mut [f32]) -> bool {
    let Some((oh, ow)) = s.out_hw() else {
        return false;
    };
    let (plane_in, plane_out) = (s.h * s.w, oh * ow);
    if x.len() != s.n * s.c * plane_in || y.len() != s.n * s.c * plane_out {
        return false;
    }
    let one = |(nc, out): (usize, &mut [f32])| {
        SCRATCH.with(|scr| {
            let mut scr = scr.borrow_mut();
            plane(
                s,
                &x[nc * plane_in..(nc + 1) * plane_in],
                out,
                (oh, ow),
                &mut scr,
            )
        })
    };
    if s.n * s.c * plane_out * s.kh * s.kw < 1 << 15 {
        y.chunks_mut(plane_out).enumerate().for_each(one);
    } else {
        par_chunks_mut(y, plane_out, |t, out| one((t, out)));
    }
    true
}

/// `plane_body` compiled for the widest vectors the CPU has (the max and the NaN test per
/// element vectorise; baseline x86-64 would run them 4 wide).
fn plane(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    hw: (usize, usize),
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    match super::gemm::Isa::detect() {
        // SAFETY: detect() saw these features on this CPU.
        super::gemm::Isa::Avx512 if stem_window(s) => {
            return unsafe { plane_3x3s2_avx512(s, x, out, hw, scratch) }
        }
        // SAFETY: as above.
        super::gemm::Isa::Avx2 if stem_window(s) => {
            return unsafe { plane_3x3s2_avx2(s, x, out, hw, scratch) }
        }
        // SAFETY: as above.
        super::gemm::Isa::Avx512 => return unsafe { plane_avx512(s, x, out, hw, scratch) },
        super::gemm::Isa::Avx2 => return unsafe { plane_avx2(s, x, out, hw, scratch) },
        super::gemm::Isa::Portable => {}
    }
    plane_body(s, x, out, hw, scratch)
}

/// Whether `s` is the window [`plane_3x3s2_avx512`] and [`plane_3x3s2_avx2`] take: 3 × 3,
/// stride 2, undilated, begin pads ≤ 1 (ResNet stems).
#[cfg(target_arch = "x86_64")]
fn stem_window(s: &DepthwiseShape) -> bool {
    (s.kh, s.kw, s.stride, s.dilation) == (3, 3, (2, 2), (1, 1))
        && s.pad_begin.0 <= 1
        && s.pad_begin.1 <= 1
}

/// The 3 × 3, stride-2 window of ResNet stems, one output row at a time in registers: the
/// max of its (up to) three input rows, then of each output's three columns, read as the
/// even and odd columns of that row (`[-∞ × 16, row, -∞ …]` in scratch stands in for the
/// padding). Against splitting the plane into phases and folding nine shifted copies:
/// 2.8 → 1.4 µs per 112 × 112 plane (1 thread, in isolation).
///
/// # Safety
/// The CPU must have AVX-512F; `s` is 3 × 3, stride 2, dilation 1, begin pads ≤ 1;
/// `x` holds `s.h · s.w` values and `out` `oh · ow`.
/// How many output rows ahead [`plane_3x3s2_avx512`] asks for the input rows it will read.
#[cfg(target_arch = "x86_64")]
const AHEAD_ROWS: usize = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_3x3s2_avx512(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    (oh, ow): (usize, usize),
    scratch: &mut Scratch,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == s.h * s.w && out.len() == oh * ow);
    let (h, w) = (s.h, s.w);
    let (pt, pl) = s.pad_begin;
    // The row at 16.., -∞ before it and after it up to the furthest chunk read.
    let chunks = ow.div_ceil(16);
    let vlen = 16 + w.max(32 * chunks) + 48;
    if scratch.buf.len() < vlen {
        scratch.buf.resize(vlen, f32::NEG_INFINITY);
    }
    scratch.filled_for = None;
    let v = &mut scratch.buf[..vlen];
    v[..16].fill(f32::NEG_INFINITY);
    v[16 + w..].fill(f32::NEG_INFINITY);
    let vp = v.as_mut_ptr().add(16);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // max that keeps a NaN from either side (`_mm512_max_ps` alone returns its second
    // operand when either is NaN), as in candle and PyTorch.
    let nmax = |a: __m512, b: __m512| {
        _mm512_mask_mov_ps(
            _mm512_max_ps(a, b),
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a),
            a,
        )
    };
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    // Output row oy from the window's column maxima in v.
    let horizontal = |oy: usize| {
        let o = op.add(oy * ow);
        for q in 0..chunks {
            // Output ox reads row columns 2·ox − pl + kx (kx < 3), at v index 16 + that.
            let base = vp.add(32 * q).sub(pl);
            let (a, b) = (_mm512_loadu_ps(base), _mm512_loadu_ps(base.add(16)));
            let (c, d) = (_mm512_loadu_ps(base.add(2)), _mm512_loadu_ps(base.add(18)));
            let t0 = _mm512_permutex2var_ps(a, even, b);
            let t1 = _mm512_permutex2var_ps(a, odd, b);
            let t2 = _mm512_permutex2var_ps(c, even, d);
            let y = nmax(t2, nmax(t1, t0));
            _mm512_mask_storeu_ps(o.add(16 * q), mask(ow - 16 * q), y);
        }
    };
    for oy in 0..oh {
        // The window's rows inside the plane; a row in the padding reads another of them
        // instead (a repeated row leaves the max unchanged).
        let r = |ky: usize| (2 * oy + ky).checked_sub(pt).filter(|&r| r < h);
        let Some(any) = r(1).or(r(0)).or(r(2)) else {
            // All three rows in the padding (a bottom pad of 2 or more): -∞, as the general
            // path gives.
            std::slice::from_raw_parts_mut(vp, w).fill(f32::NEG_INFINITY);
            horizontal(oy);
            continue;
        };
        // The two input rows that output row oy + AHEAD_ROWS + 1 will add, asked for now: the
        // map arrives from L3 or memory (a stem's 3.2 MB output), and the hardware prefetcher
        // alone kept this loop waiting on it. 64 × 112², input in L3: 0.28 → 0.16 ms (hot,
        // in L2: 0.10).
        for ky in 3 + 2 * AHEAD_ROWS..5 + 2 * AHEAD_ROWS {
            if let Some(row) = r(ky) {
                for off in (0..w).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(xp.add(row * w + off).cast());
                }
            }
        }
        let (r0, r1, r2) = (
            xp.add(r(0).unwrap_or(any) * w),
            xp.add(r(1).unwrap_or(any) * w),
            xp.add(r(2).unwrap_or(any) * w),
        );
        for ix in (0..w).step_by(16) {
            let m = mask(w - ix);
            let ld = |p: *const f32| _mm512_maskz_loadu_ps(m, p.add(ix));
            _mm512_mask_storeu_ps(vp.add(ix), m, nmax(ld(r2), nmax(ld(r1), ld(r0))));
        }
        horizontal(oy);
    }
}

/// [`plane_3x3s2_avx512`] in 8-lane AVX2: each output row's three input rows folded into the
/// scratch row, then each output's three columns, its even columns picked by a shuffle and a
/// lane permute. Against the phase-split path on ResNet-50's stem pooling (64 × 112², Zen 3,
/// frames alternating in one process): 1.78 → 0.30 ms at 1 thread, 0.89 → 0.21 ms at 2
/// (ONNX Runtime's own profile: 0.44 ms at 1 thread).
///
/// # Safety
/// The CPU must have AVX2; `s` passes [`stem_window`]; `x` holds `s.h · s.w` values and `out`
/// `oh · ow`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn plane_3x3s2_avx2(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    (oh, ow): (usize, usize),
    scratch: &mut Scratch,
) {
    use std::arch::x86_64::*;
    assert!(x.len() == s.h * s.w && out.len() == oh * ow);
    let (h, w) = (s.h, s.w);
    let (pt, pl) = s.pad_begin;
    // The row at 16.., -∞ before it and after it up to the furthest value read: chunk q reads
    // row columns up to 16·q + 16 (v index 16·q + 32 − pl + 1).
    let chunks = ow.div_ceil(8);
    let vlen = 16 + w.max(16 * chunks) + 32;
    if scratch.buf.len() < vlen {
        scratch.buf.resize(vlen, f32::NEG_INFINITY);
    }
    scratch.filled_for = None;
    let v = &mut scratch.buf[..vlen];
    v[..16].fill(f32::NEG_INFINITY);
    v[16 + w..].fill(f32::NEG_INFINITY);
    let vp = v.as_mut_ptr().add(16);
    // max that keeps a NaN from either side (`_mm256_max_ps` returns its second operand when
    // either is NaN), as in candle and PyTorch.
    let nmax = |a: __m256, b: __m256| {
        _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
    };
    let smax = |a: f32, b: f32| if a.is_nan() || a > b { a } else { b };
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    let horizontal = |oy: usize| {
        let o = op.add(oy * ow);
        for q in 0..chunks {
            // Output ox = 8q + j reads row columns 2·ox − pl + kx (kx < 3): the max over three
            // shifted loads at every column, then its even ones.
            let base = vp.add(16 * q).sub(pl);
            let m3 = |p: *const f32| {
                let (a, b, c) = (
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(1)),
                    _mm256_loadu_ps(p.add(2)),
                );
                nmax(c, nmax(b, a))
            };
            let (lo, hi) = (m3(base), m3(base.add(8)));
            // [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6] → [lo0 lo2 lo4 lo6 hi0 hi2 hi4 hi6].
            let even = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
            let y = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                even,
            )));
            let left = ow - 8 * q;
            if left >= 8 {
                _mm256_storeu_ps(o.add(8 * q), y);
            } else {
                let mut t = [0f32; 8];
                _mm256_storeu_ps(t.as_mut_ptr(), y);
                std::ptr::copy_nonoverlapping(t.as_ptr(), o.add(8 * q), left);
            }
        }
    };
    for oy in 0..oh {
        // The window's rows inside the plane; a row in the padding reads another of them
        // instead (a repeated row leaves the max unchanged).
        let r = |ky: usize| (2 * oy + ky).checked_sub(pt).filter(|&r| r < h);
        let Some(any) = r(1).or(r(0)).or(r(2)) else {
            std::slice::from_raw_parts_mut(vp, w).fill(f32::NEG_INFINITY);
            horizontal(oy);
            continue;
        };
        // As in the AVX-512 form: the rows a later output row adds, asked for now.
        for ky in 3 + 2 * AHEAD_ROWS..5 + 2 * AHEAD_ROWS {
            if let Some(row) = r(ky) {
                for off in (0..w).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(xp.add(row * w + off).cast());
                }
            }
        }
        let (r0, r1, r2) = (
            xp.add(r(0).unwrap_or(any) * w),
            xp.add(r(1).unwrap_or(any) * w),
            xp.add(r(2).unwrap_or(any) * w),
        );
        let whole = w / 8 * 8;
        for ix in (0..whole).step_by(8) {
            let ld = |p: *const f32| _mm256_loadu_ps(p.add(ix));
            _mm256_storeu_ps(vp.add(ix), nmax(ld(r2), nmax(ld(r1), ld(r0))));
        }
        for ix in whole..w {
            *vp.add(ix) = smax(*r2.add(ix), smax(*r1.add(ix), *r0.add(ix)));
        }
        horizontal(oy);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_avx512(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    hw: (usize, usize),
    scratch: &mut Scratch,
) {
    plane_body(s, x, out, hw, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn plane_avx2(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    hw: (usize, usize),
    scratch: &mut Scratch,
) {
    plane_body(s, x, out, hw, scratch)
}

#[inline(always)]
fn plane_body(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    (oh, ow): (usize, usize),
    scratch: &mut Scratch,
) {
    let (sy, sx) = s.stride;
    let (dy, dx) = s.dilation;
    let (ws, plane_len) = phase_layout(s);
    let ylen = oh * ws;
    let p_len = sy * sx * plane_len;
    reuse_phase_scratch(
        &mut scratch.buf,
        &mut scratch.filled_for,
        phase_key(s, ws, plane_len, p_len),
        p_len + ylen,
        f32::NEG_INFINITY,
    );
    let (p, y) = scratch.buf[..p_len + ylen].split_at_mut(p_len);
    split_phases(s, x, p, ws, plane_len);
    // Tap 0 is copied, the others folded in: y needs no -∞ fill either.
    for t in 0..s.kh * s.kw {
        let (ry, rx) = ((t / s.kw) * dy, (t % s.kw) * dx);
        let off = ((ry % sy) * sx + rx % sx) * plane_len + (ry / sy) * ws + rx / sx;
        // Reads past the phase's end fall in the next phase or the slack row: only the
        // dropped columns (ox ≥ ow) see them.
        let src = &p[off..off + ylen.min(p.len() - off)];
        if t == 0 {
            y[..src.len()].copy_from_slice(src);
            y[src.len()..].fill(f32::NEG_INFINITY);
            continue;
        }
        for (o, &v) in y.iter_mut().zip(src) {
            // NaN propagates, as in candle and PyTorch.
            *o = if v > *o || v.is_nan() { v } else { *o };
        }
    }
    for oy in 0..oh {
        out[oy * ow..(oy + 1) * ow].copy_from_slice(&y[oy * ws..oy * ws + ow]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A window holding a NaN gives NaN, wherever the NaN sits among its taps and rows,
    /// against a plain loop.
    #[test]
    fn nan_in_a_window_propagates() {
        for &(stride, pad, h, w) in &[(2, 1, 13, 37), (1, 1, 9, 20), (2, 0, 11, 33)] {
            let mut x: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            for &i in &[0, 5, w + 3, 3 * w + w - 1, (h - 1) * w + 7] {
                x[i] = f32::NAN;
            }
            let s = DepthwiseShape {
                n: 1,
                c: 1,
                h,
                w,
                kh: 3,
                kw: 3,
                stride: (stride, stride),
                dilation: (1, 1),
                pad_begin: (pad, pad),
                pad_end: (pad, pad),
            };
            let (oh, ow) = s.out_hw().unwrap();
            let mut got = vec![0f32; oh * ow];
            assert!(max_pool2d(&s, &x, &mut got));
            let at =
                |o: usize, k: usize, n: usize| (o * stride + k).checked_sub(pad).filter(|&i| i < n);
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut m, mut nan) = (f32::NEG_INFINITY, false);
                    for ky in 0..3 {
                        for kx in 0..3 {
                            if let (Some(iy), Some(ix)) = (at(oy, ky, h), at(ox, kx, w)) {
                                let v = x[iy * w + ix];
                                nan |= v.is_nan();
                                m = m.max(v);
                            }
                        }
                    }
                    let g = got[oy * ow + ox];
                    if nan {
                        assert!(g.is_nan(), "s{stride} p{pad} ({oy}, {ox}): {g}, want NaN");
                    } else {
                        assert_eq!(g, m, "s{stride} p{pad} ({oy}, {ox})");
                    }
                }
            }
        }
    }

    /// The 3 × 3 stride-2 fast path against the general phase-split path, over begin pads
    /// 0 and 1, asymmetric end pads (2: whole rows and columns of padding), odd and wide
    /// widths, and NaN and -∞ inputs.
    #[test]
    fn stride_2_window_matches_the_general_path() {
        for &(h, w) in &[(1, 1), (2, 3), (7, 7), (13, 37), (6, 112), (5, 70)] {
            for pads in [
                [0, 0, 0, 0],
                [1, 1, 1, 1],
                [1, 0, 2, 1],
                [0, 1, 1, 2],
                [1, 1, 2, 2],
            ] {
                let s = DepthwiseShape {
                    n: 1,
                    c: 1,
                    h,
                    w,
                    kh: 3,
                    kw: 3,
                    stride: (2, 2),
                    dilation: (1, 1),
                    pad_begin: (pads[0], pads[1]),
                    pad_end: (pads[2], pads[3]),
                };
                let Some((oh, ow)) = s.out_hw() else { continue };
                let mut x: Vec<f32> = (0..h * w).map(|i| ((i * 53) % 97) as f32 - 48.0).collect();
                if h * w > 20 {
                    x[h * w / 3] = f32::NAN;
                    x[h * w / 2] = f32::NEG_INFINITY;
                }
                let mut want = vec![0f32; oh * ow];
                let mut got = vec![1f32; oh * ow];
                let mut scr = Scratch {
                    buf: Vec::new(),
                    filled_for: None,
                };
                plane_body(&s, &x, &mut want, (oh, ow), &mut scr);
                plane(&s, &x, &mut got, (oh, ow), &mut scr);
                let check = |got: &[f32], form: &str| {
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g == e || (g.is_nan() && e.is_nan()),
                            "{form}: {h}x{w} pads {pads:?} at {i}: {g} vs {e}"
                        );
                    }
                };
                check(&got, "detected");
                // The AVX2 form on an AVX-512 machine too (detect() picks the wider one there).
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    let mut got = vec![1f32; oh * ow];
                    // SAFETY: the CPU has AVX2; the window is 3 × 3 stride 2 with begin pads ≤ 1.
                    unsafe { plane_3x3s2_avx2(&s, &x, &mut got, (oh, ow), &mut scr) };
                    check(&got, "avx2");
                }
            }
        }
    }

    #[test]
    fn matches_candle_max_pool() {
        let dev = Device::Cpu;
        for &(k, stride, pad, hw) in &[
            (3, 2, 1, 112),
            (3, 2, 1, 7),
            (2, 2, 0, 8),
            (3, 1, 1, 5),
            (3, 2, 0, 9),
            (5, 3, 2, 11),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, hw, hw + 1), &dev).unwrap();
            let s = DepthwiseShape {
                n: 2,
                c: 3,
                h: hw,
                w: hw + 1,
                kh: k,
                kw: k,
                stride: (stride, stride),
                dilation: (1, 1),
                pad_begin: (pad, pad),
                pad_end: (pad, pad),
            };
            let (oh, ow) = s.out_hw().unwrap();
            let mut got = vec![f32::NAN; 2 * 3 * oh * ow];
            assert!(max_pool2d(
                &s,
                &x.flatten_all().unwrap().to_vec1().unwrap(),
                &mut got
            ));
            let neg = f64::NEG_INFINITY;
            let xp = Tensor::cat(
                &[
                    Tensor::full(neg as f32, (2, 3, hw, pad), &dev).unwrap(),
                    x.clone(),
                    Tensor::full(neg as f32, (2, 3, hw, pad), &dev).unwrap(),
                ],
                3,
            )
            .unwrap();
            let w2 = hw + 1 + 2 * pad;
            let xp = Tensor::cat(
                &[
                    Tensor::full(neg as f32, (2, 3, pad, w2), &dev).unwrap(),
                    xp,
                    Tensor::full(neg as f32, (2, 3, pad, w2), &dev).unwrap(),
                ],
                2,
            )
            .unwrap();
            let want = xp.max_pool2d_with_stride((k, k), (stride, stride)).unwrap();
            assert_eq!(want.elem_count(), got.len(), "k{k} s{stride} p{pad} {hw}");
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "k{k} s{stride} p{pad} {hw}");
        }
    }
}
