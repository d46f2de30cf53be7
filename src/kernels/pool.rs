//! 2-D max pooling over NCHW planes. The padded plane is split into its stride phases (as in
//! [`super::depthwise`]), so every window cell of every output is one flat offset and the max
//! runs over contiguous, vectorisable runs with no border cases.

use std::cell::RefCell;

use super::par::par_chunks_mut;

use super::depthwise::{phase_layout, split_phases, DepthwiseShape};

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    match super::gemm::Isa::detect() {
        // SAFETY: detect() saw these features on this CPU.
        super::gemm::Isa::Avx512 => return unsafe { plane_avx512(s, x, out, hw, scratch) },
        super::gemm::Isa::Avx2 => return unsafe { plane_avx2(s, x, out, hw, scratch) },
        super::gemm::Isa::Portable => {}
    }
    plane_body(s, x, out, hw, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_avx512(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    hw: (usize, usize),
    scratch: &mut Vec<f32>,
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
    scratch: &mut Vec<f32>,
) {
    plane_body(s, x, out, hw, scratch)
}

#[inline(always)]
fn plane_body(
    s: &DepthwiseShape,
    x: &[f32],
    out: &mut [f32],
    (oh, ow): (usize, usize),
    scratch: &mut Vec<f32>,
) {
    let (sy, sx) = s.stride;
    let (dy, dx) = s.dilation;
    let (ws, plane_len) = phase_layout(s);
    let ylen = oh * ws;
    scratch.clear();
    scratch.resize(sy * sx * plane_len + ylen, f32::NEG_INFINITY);
    let (p, y) = scratch.split_at_mut(sy * sx * plane_len);
    split_phases(s, x, p, ws, plane_len);
    for t in 0..s.kh * s.kw {
        let (ry, rx) = ((t / s.kw) * dy, (t % s.kw) * dx);
        let off = ((ry % sy) * sx + rx % sx) * plane_len + (ry / sy) * ws + rx / sx;
        // Reads past the phase's end fall in the next phase or the slack row: only the
        // dropped columns (ox ≥ ow) see them.
        let src = &p[off..off + ylen.min(p.len() - off)];
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
