//! Depthwise 2-D convolution (one filter per channel), the bulk of MobileNet-style models.
//!
//! candle runs a grouped convolution as one convolution per group followed by a `cat`, which
//! for C groups of one channel each is ~70 % of MobileNetV2's time. Here each channel is a
//! direct loop over its own plane, channels spread over rayon's pool, padding handled by
//! clipping the loops rather than by materialising a padded copy.

use std::cell::RefCell;

use rayon::prelude::*;

use super::act::apply_activation;
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
/// `[c, 1, kh, kw]`, bias `[c]`, residual like y, all contiguous row-major; returns y
/// `[n, c, oh, ow]`. Callers check the lengths.
pub fn depthwise_conv2d(
    s: &DepthwiseShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
) -> Vec<f32> {
    let Some((oh, ow)) = s.out_hw() else {
        return Vec::new();
    };
    let plane_in = s.h * s.w;
    let plane_out = oh * ow;
    let mut y = vec![0f32; s.n * s.c * plane_out];
    let one = |(nc, out): (usize, &mut [f32])| {
        let ch = nc % s.c;
        let xin = &x[nc * plane_in..(nc + 1) * plane_in];
        let k = &weight[ch * s.kh * s.kw..(ch + 1) * s.kh * s.kw];
        out.fill(bias.map_or(0.0, |b| b[ch]));
        plane(s, xin, k, out, (oh, ow));
        // The plane is still in cache: finish it here rather than in another pass.
        if let Some(r) = residual {
            out.iter_mut()
                .zip(&r[nc * plane_out..(nc + 1) * plane_out])
                .for_each(|(o, v)| *o += v);
        }
        apply_activation(activation, out);
    };
    if s.n * s.c * plane_out * s.kh * s.kw < PAR_MIN {
        y.chunks_mut(plane_out).enumerate().for_each(one);
    } else {
        y.par_chunks_mut(plane_out).enumerate().for_each(one);
    }
    y
}

/// Below this many multiply-adds a frame runs on one thread.
const PAR_MIN: usize = 1 << 14;

/// Accumulates one channel's plane into `out`, with the widest vectors the CPU has.
fn plane(s: &DepthwiseShape, x: &[f32], k: &[f32], out: &mut [f32], ohw: (usize, usize)) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        // SAFETY: detect() saw these features on this CPU.
        Isa::Avx512 => return unsafe { plane_avx512(s, x, k, out, ohw) },
        Isa::Avx2 => return unsafe { plane_avx2(s, x, k, out, ohw) },
        Isa::Portable => {}
    }
    plane_body(s, x, k, out, ohw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_avx512(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    out: &mut [f32],
    ohw: (usize, usize),
) {
    plane_body(s, x, k, out, ohw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane_avx2(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    out: &mut [f32],
    ohw: (usize, usize),
) {
    plane_body(s, x, k, out, ohw)
}

#[inline(always)]
fn plane_body(s: &DepthwiseShape, x: &[f32], k: &[f32], out: &mut [f32], (oh, ow): (usize, usize)) {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        plane_flat(s, x, k, out, (oh, ow), &mut scratch);
    });
}

thread_local! {
    /// The calling thread's phase planes and row sums, reused across channels and frames.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

const BLOCK: usize = 16;

/// The padded input is split into its stride phases (`P[a][b][i][j] = x_pad[i·sy + a][j·sx + b]`),
/// so every tap of every output reads `P[phase][oy·ws + ox + shift]`: one flat index over the
/// whole plane. Each block of 16 flat positions then sums all taps in registers and the plane
/// needs no border cases; positions with `ox ≥ ow` are computed and dropped (few, for the
/// small planes where this matters).
#[inline(always)]
fn plane_flat(
    s: &DepthwiseShape,
    x: &[f32],
    k: &[f32],
    out: &mut [f32],
    (oh, ow): (usize, usize),
    scratch: &mut Vec<f32>,
) {
    let (sy, sx) = s.stride;
    let (dy, dx) = s.dilation;
    let (pt, pl) = s.pad_begin;
    let hp = s.h + pt + s.pad_end.0;
    let wp = s.w + pl + s.pad_end.1;
    // One slack row absorbs the dropped columns' reads past the last row.
    let (hs, ws) = (hp.div_ceil(sy) + 1, wp.div_ceil(sx));
    let plane_len = hs * ws;
    let phases = sy * sx;
    let ylen = (oh * ws).div_ceil(BLOCK) * BLOCK;
    let p_len = phases * plane_len + ylen + BLOCK;
    scratch.clear();
    scratch.resize(p_len + ylen, 0.0);
    let (p, y) = scratch.split_at_mut(p_len);
    for iy in 0..s.h {
        let (a, i) = ((iy + pt) % sy, (iy + pt) / sy);
        let xrow = &x[iy * s.w..(iy + 1) * s.w];
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
    let taps: Vec<(f32, usize)> = (0..s.kh * s.kw)
        .map(|t| {
            let (ry, rx) = ((t / s.kw) * dy, (t % s.kw) * dx);
            let phase = (ry % sy) * sx + rx % sx;
            (k[t], phase * plane_len + (ry / sy) * ws + rx / sx)
        })
        .collect();
    for (c, yb) in y.chunks_exact_mut(BLOCK).enumerate() {
        let base = c * BLOCK;
        let mut acc = [0f32; BLOCK];
        for &(wv, off) in &taps {
            let v = &p[off + base..off + base + BLOCK];
            for jj in 0..BLOCK {
                acc[jj] += wv * v[jj];
            }
        }
        yb.copy_from_slice(&acc);
    }
    for oy in 0..oh {
        let dst = &mut out[oy * ow..(oy + 1) * ow];
        for (o, v) in dst.iter_mut().zip(&y[oy * ws..oy * ws + ow]) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Compares against candle's grouped conv2d on a padded input (the reference path).
    fn check(s: DepthwiseShape) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (s.n, s.c, s.h, s.w), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (s.c, 1, s.kh, s.kw), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, s.c, &dev).unwrap();
        let got = depthwise_conv2d(
            &s,
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            &w.flatten_all().unwrap().to_vec1().unwrap(),
            Some(&b.to_vec1::<f32>().unwrap()),
            None,
            None,
        );
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
        let want = xp
            .conv2d(&w, 0, s.stride.0, s.dilation.0, s.c)
            .unwrap()
            .broadcast_add(&b.reshape((1, s.c, 1, 1)).unwrap())
            .unwrap();
        let (oh, ow) = s.out_hw().unwrap();
        assert_eq!(want.dims(), &[s.n, s.c, oh, ow], "{s:?}");
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "{s:?}: max abs diff {max}");
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

    #[test]
    fn asymmetric_pads_match() {
        let mut s = shape(3, 9, 3, 2, 0, 1);
        s.pad_begin = (0, 1);
        s.pad_end = (1, 0);
        check(s);
    }
}
