//! Depthwise 2-D convolution (one filter per channel), the bulk of MobileNet-style models.
//!
//! candle runs a grouped convolution as one convolution per group followed by a `cat`, which
//! for C groups of one channel each is ~70 % of MobileNetV2's time. Here each channel is a
//! direct loop over its own plane, channels spread over rayon's pool, padding handled by
//! clipping the loops rather than by materialising a padded copy.

use rayon::prelude::*;

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

/// `y = depthwise_conv(x, weight) + bias`, x `[n, c, h, w]`, weight `[c, 1, kh, kw]`, bias `[c]`,
/// all contiguous row-major; returns y `[n, c, oh, ow]`. Callers check the lengths.
pub fn depthwise_conv2d(
    s: &DepthwiseShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let Some((oh, ow)) = s.out_hw() else {
        return Vec::new();
    };
    let plane_in = s.h * s.w;
    let plane_out = oh * ow;
    let mut y = vec![0f32; s.n * s.c * plane_out];
    y.par_chunks_mut(plane_out)
        .enumerate()
        .for_each(|(nc, out)| {
            let ch = nc % s.c;
            let xin = &x[nc * plane_in..(nc + 1) * plane_in];
            let k = &weight[ch * s.kh * s.kw..(ch + 1) * s.kh * s.kw];
            out.fill(bias.map_or(0.0, |b| b[ch]));
            plane(s, xin, k, out, (oh, ow));
        });
    y
}

/// Accumulates one channel's plane into `out`.
fn plane(s: &DepthwiseShape, x: &[f32], k: &[f32], out: &mut [f32], (oh, ow): (usize, usize)) {
    let (sy, sx) = s.stride;
    let (dy, dx) = s.dilation;
    let (py, px) = (s.pad_begin.0 as isize, s.pad_begin.1 as isize);
    // For each kernel column, the output columns whose input column lies inside the row: a
    // contiguous range, so the inner loop has no bounds tests and vectorises.
    let ranges: Vec<(usize, usize)> = (0..s.kw)
        .map(|kx| {
            let off = (kx * dx) as isize - px;
            // ix = ox * sx + off must lie in [0, w).
            let lo = if off >= 0 {
                0
            } else {
                ((-off) as usize).div_ceil(sx)
            };
            let hi = if (s.w as isize) > off {
                (((s.w as isize - off - 1) as usize) / sx + 1).min(ow)
            } else {
                0
            };
            (lo.min(hi), hi)
        })
        .collect();
    for oy in 0..oh {
        let row = &mut out[oy * ow..(oy + 1) * ow];
        for ky in 0..s.kh {
            let iy = (oy * sy + ky * dy) as isize - py;
            if iy < 0 || iy >= s.h as isize {
                continue;
            }
            let xrow = &x[iy as usize * s.w..(iy as usize + 1) * s.w];
            for (kx, &(lo, hi)) in ranges.iter().enumerate() {
                let wv = k[ky * s.kw + kx];
                let base = (kx * dx) as isize - px;
                if sx == 1 {
                    let start = (lo as isize + base) as usize;
                    let src = &xrow[start..start + (hi - lo)];
                    for (o, &v) in row[lo..hi].iter_mut().zip(src) {
                        *o += wv * v;
                    }
                } else {
                    for (ox, o) in row.iter_mut().enumerate().take(hi).skip(lo) {
                        *o += wv * xrow[(ox as isize * sx as isize + base) as usize];
                    }
                }
            }
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
