//! An inverted residual block (MobileNetV2's bottleneck: pointwise expand → depthwise →
//! pointwise project, plus the residual add) computed in bands of output rows, so the expanded
//! map, six times wider than the block's input, never leaves the core's L2 cache.
//!
//! Run layer by layer, MobileNetV2's 112 × 112 blocks write their expanded map (4.8 MB for
//! 96 × 112 × 112) out of L2 and read it back twice. Here a band of output rows needs only the
//! expanded rows under its depthwise window: the expand product writes them into a per-thread
//! buffer (copying the rows the thread's previous band already expanded), the depthwise reads
//! that buffer and writes its band into a second one, and the project product reads it and
//! writes the block's output rows, bias, residual and activation fused as usual. Each thread
//! takes a run of consecutive bands.
//!
//! Where a large L3 holds the expanded maps (the x86 host we measure on: 32 MB) this measured
//! no faster end to end than the layer-by-layer path, so the executor fuses only on request
//! (`exec::BlockFusion`); it is meant for CPUs with small caches.

use super::conv::PackedConv;
use super::depthwise::{depthwise_conv2d, depthwise_planes, DepthwiseShape};
use super::par::{self, SendPtr};
use super::scratch;
use crate::graph::Activation;

/// One pointwise stage: its convolution and the activation after it.
#[derive(Debug, Clone, Copy)]
pub struct Pointwise<'a> {
    /// A 1 × 1, stride-1, unpadded, single-group convolution: in the direct form
    /// ([`PackedConv::is_pointwise`]) for a [`Bottleneck`], in the transposed form
    /// ([`PackedConv::transposed`]) for a channels-last block.
    pub conv: &'a PackedConv,
    /// Applied after bias (and, for the project stage, the residual).
    pub activation: Option<Activation>,
}

/// The depthwise stage.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseStage<'a> {
    /// `[c, 1, kh, kw]`, row-major.
    pub weight: &'a [f32],
    /// `[c]`.
    pub bias: Option<&'a [f32]>,
    /// Kernel (height, width).
    pub kernel: (usize, usize),
    /// Stride (y, x).
    pub stride: (usize, usize),
    /// Dilation (y, x).
    pub dilation: (usize, usize),
    /// Pads: top, left, bottom, right.
    pub pads: [usize; 4],
    /// Applied after the bias.
    pub activation: Option<Activation>,
}

impl DepthwiseStage<'_> {
    /// Its channels (one filter each).
    pub fn channels(&self) -> usize {
        self.weight.len() / (self.kernel.0 * self.kernel.1).max(1)
    }

    /// Its geometry over one image of `h × w`, with every pad.
    pub fn shape(&self, h: usize, w: usize) -> DepthwiseShape {
        DepthwiseShape {
            n: 1,
            c: self.channels(),
            h,
            w,
            kh: self.kernel.0,
            kw: self.kernel.1,
            stride: self.stride,
            dilation: self.dilation,
            pad_begin: (self.pads[0], self.pads[1]),
            pad_end: (self.pads[2], self.pads[3]),
        }
    }
}

/// Expand (optional: MobileNetV2's first block has none), depthwise, project.
#[derive(Debug, Clone, Copy)]
pub struct Bottleneck<'a> {
    /// `cin → c` pointwise, or `None` when the depthwise reads the block's input.
    pub expand: Option<Pointwise<'a>>,
    /// Depthwise over `c` channels.
    pub depthwise: DepthwiseStage<'a>,
    /// `c → cout` pointwise; the residual is added in its epilogue.
    pub project: Pointwise<'a>,
}

/// Why a block does not fit its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

/// Most bytes of expanded rows per band (a third of a 1 MB L2: the last band's rows, the
/// depthwise band, the packed operands and the project's output rows share the rest).
const BAND_BYTES: usize = 320 << 10;

impl Bottleneck<'_> {
    /// Channels of the depthwise stage.
    fn mid(&self) -> usize {
        self.depthwise.channels()
    }

    /// The depthwise shape of one channel over input rows `rows` of width `w`, with the given
    /// top and bottom pads.
    fn band_shape(&self, rows: usize, w: usize, top: usize, bottom: usize) -> DepthwiseShape {
        let d = &self.depthwise;
        DepthwiseShape {
            n: 1,
            c: 1,
            h: rows,
            w,
            kh: d.kernel.0,
            kw: d.kernel.1,
            stride: d.stride,
            dilation: d.dilation,
            pad_begin: (top, d.pads[1]),
            pad_end: (bottom, d.pads[3]),
        }
    }

    /// Output height and width for an `h × w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.depthwise.shape(h, w).out_hw()
    }

    /// Checks every stage against an input of `cin` channels, `h × w`.
    fn check(&self, cin: usize, h: usize, w: usize) -> Result<(usize, usize), Mismatch> {
        let bad = |s: String| Err(Mismatch(s));
        let d = &self.depthwise;
        let mid = self.mid();
        let taps = d.kernel.0 * d.kernel.1;
        if taps == 0 || d.weight.len() != mid * taps || d.bias.is_some_and(|b| b.len() != mid) {
            return bad("depthwise weights do not match its channels".into());
        }
        if d.stride.0 == 0 || d.stride.1 == 0 || d.dilation.0 == 0 || d.dilation.1 == 0 {
            return bad("zero stride or dilation".into());
        }
        match self.expand {
            Some(e) if !e.conv.is_pointwise() || e.conv.cin() != cin || e.conv.cout() != mid => {
                return bad(format!(
                    "expand stage is not a {cin} → {mid} pointwise convolution"
                ))
            }
            None if cin != mid => {
                return bad(format!("{cin} channels into a {mid}-channel depthwise"))
            }
            _ => {}
        }
        let p = self.project.conv;
        if !p.is_pointwise() || p.cin() != mid {
            return bad(format!(
                "project stage is not a pointwise convolution of {mid} channels"
            ));
        }
        // A padded row band wider than the kernel's reach would leave bands without input rows.
        let reach = d.dilation.0 * (d.kernel.0 - 1);
        if d.pads[0] > reach || d.pads[2] > reach {
            return bad("vertical padding as tall as the kernel".into());
        }
        self.out_hw(h, w)
            .ok_or_else(|| Mismatch(format!("input {h}×{w} is smaller than the kernel")))
    }

    /// Output rows per band for `oh` output rows of a `w`-wide input: as many as keep the
    /// expanded rows under a band within `BAND_BYTES`, and at least one band per thread.
    pub fn band_rows(&self, w: usize, oh: usize) -> usize {
        let d = &self.depthwise;
        let row_bytes = self.mid() * w * 4;
        let in_rows = (BAND_BYTES / row_bytes.max(1)).max(d.kernel.0);
        // in_rows = (r - 1) · sy + span.
        let span = d.dilation.0 * (d.kernel.0 - 1) + 1;
        let r = (in_rows.saturating_sub(span) / d.stride.0 + 1).max(1);
        let threads = par::current_threads().max(1);
        r.min(oh.div_ceil(threads)).max(1)
    }

    /// Runs the block on `x` (`[1, cin, h, w]`) into `out` (`[1, cout, oh, ow]`), adding
    /// `residual` (laid out like `out`) before the project's activation.
    pub fn run(
        &self,
        x: &[f32],
        (cin, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), Mismatch> {
        let (oh, ow) = self.check(cin, h, w)?;
        let cout = self.project.conv.cout();
        if x.len() != cin * h * w
            || out.len() != cout * oh * ow
            || residual.is_some_and(|r| r.len() != out.len())
        {
            return Err(Mismatch(format!(
                "input of {} values for [{cin}, {h}, {w}], output of {} for [{cout}, {oh}, {ow}]",
                x.len(),
                out.len()
            )));
        }
        let rows = self.band_rows(w, oh);
        let bands = oh.div_ceil(rows);
        // Each thread takes a run of consecutive bands, so a band reuses the expanded rows it
        // shares with the one before instead of expanding them again.
        let threads = par::current_threads().max(1).min(bands);
        let optr = SendPtr(out.as_mut_ptr());
        let part = |t: usize| {
            let (b0, b1) = (t * bands / threads, (t + 1) * bands / threads);
            let mut carry = Band::default();
            for b in b0..b1 {
                let oy0 = b * rows;
                let oy1 = (oy0 + rows).min(oh);
                // SAFETY: band b writes output rows oy0..oy1 of every channel, which no other
                // band touches; `out` is borrowed mutably for the whole call.
                unsafe {
                    self.band(
                        x,
                        (h, w),
                        (oy0, oy1),
                        (oh, ow),
                        residual,
                        optr.get(),
                        &mut carry,
                    )
                };
            }
            carry.release();
        };
        if threads > 1 {
            par::par_for(threads, part);
        } else {
            part(0);
        }
        Ok(())
    }

    /// Output rows `oy0..oy1` of every output channel. `carry` holds the previous band's
    /// expanded rows (if any) and receives this band's.
    ///
    /// # Safety
    /// `out` addresses `[cout, oh, ow]`, and no other code touches rows `oy0..oy1` of it
    /// during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn band(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        (oy0, oy1): (usize, usize),
        (oh, ow): (usize, usize),
        residual: Option<&[f32]>,
        out: *mut f32,
        carry: &mut Band,
    ) {
        let d = &self.depthwise;
        let mid = self.mid();
        let span = d.dilation.0 * (d.kernel.0 - 1) + 1;
        // Input rows under the band's windows, in padded coordinates [top, bottom).
        let top = oy0 * d.stride.0;
        let bottom = (oy1 - 1) * d.stride.0 + span;
        let (pt, hp) = (d.pads[0], h + d.pads[0]);
        let ia = top.max(pt) - pt;
        let ib = bottom.min(hp).max(top.max(pt)) - pt;
        let (pad_top, pad_bottom) = (pt.saturating_sub(top), bottom.saturating_sub(hp));
        let rows = ib - ia;
        let orows = oy1 - oy0;
        let mut dw = scratch::take(mid * orows * ow);
        match self.expand {
            Some(e) => {
                // Rows ia..ib of the expanded map, channel after channel: the ones the last
                // band already expanded are copied, the rest computed.
                let mut buf = scratch::take(mid * rows * w);
                let (pa, pb) = carry.rows;
                let kept = match &carry.buf {
                    Some(prev) if pa <= ia && ia < pb && pb <= ib => {
                        let (from, n) = ((ia - pa) * w, (pb - ia) * w);
                        for (c, dst) in buf.chunks_exact_mut(rows * w).enumerate() {
                            let src = c * (pb - pa) * w + from;
                            dst[..n].copy_from_slice(&prev[src..src + n]);
                        }
                        pb - ia
                    }
                    _ => 0,
                };
                if kept < rows {
                    // SAFETY: buf holds mid rows of `rows · w`, of which this writes the
                    // last `rows - kept` of each; it is this call's own.
                    unsafe {
                        e.conv.pointwise_into(
                            &x[(ia + kept) * w..],
                            h * w,
                            (rows - kept) * w,
                            buf.as_mut_ptr().add(kept * w),
                            rows * w,
                            None,
                            e.activation,
                        )
                    };
                }
                let mut shape = self.band_shape(rows, w, pad_top, pad_bottom);
                shape.c = mid;
                let ok = depthwise_planes(&shape, &buf, d.weight, d.bias, d.activation, &mut dw);
                // The band's shape was derived from a checked block: it always fits.
                assert!(
                    ok,
                    "bottleneck band {oy0}..{oy1}: depthwise shape {shape:?}"
                );
                if let Some(old) = carry.buf.replace(buf) {
                    scratch::give(old);
                }
                carry.rows = (ia, ib);
            }
            None => {
                // The block's input rows ia..ib of each channel are already contiguous.
                let shape = self.band_shape(rows, w, pad_top, pad_bottom);
                let taps = d.kernel.0 * d.kernel.1;
                for (c, dst) in dw.chunks_exact_mut(orows * ow).enumerate() {
                    let ok = depthwise_conv2d(
                        &shape,
                        &x[(c * h + ia) * w..(c * h + ib) * w],
                        &d.weight[c * taps..(c + 1) * taps],
                        d.bias.map(|b| &b[c..c + 1]),
                        None,
                        d.activation,
                        dst,
                    );
                    assert!(
                        ok,
                        "bottleneck band {oy0}..{oy1}: depthwise shape {shape:?}"
                    );
                }
            }
        }
        // SAFETY: rows oy0..oy1 of every output channel are this band's (caller's contract);
        // the residual is laid out like `out`.
        unsafe {
            self.project.conv.pointwise_into(
                &dw,
                orows * ow,
                orows * ow,
                out.add(oy0 * ow),
                oh * ow,
                residual.map(|r| &r[oy0 * ow..]),
                self.project.activation,
            )
        };
        scratch::give(dw);
    }
}

/// A thread's expanded rows from its last band.
#[derive(Default)]
struct Band {
    /// `[mid][rows.1 - rows.0][w]`.
    buf: Option<scratch::Scratch>,
    /// Which input rows it holds.
    rows: (usize, usize),
}

impl Band {
    fn release(self) {
        if let Some(b) = self.buf {
            scratch::give(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::ConvPacking;
    use candle_core::{Device, Tensor};

    /// A pointwise convolution `ci → co` with weights `wt` (`[co, ci]`).
    fn pw(wt: &[f32], co: usize, ci: usize, b: Option<&[f32]>) -> PackedConv {
        PackedConv::new(
            wt,
            &[co, ci, 1, 1],
            b,
            &[1, 1],
            &[0, 0, 0, 0],
            &[1, 1],
            1,
            ConvPacking::Direct,
        )
        .unwrap()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn clip6(t: &Tensor) -> Tensor {
        t.clamp(0f32, 6f32).unwrap()
    }

    /// The block against candle's convolutions, stage by stage (the reference path).
    #[allow(clippy::too_many_arguments)]
    fn check(
        cin: usize,
        mid: Option<usize>,
        cout: usize,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
        residual: bool,
        threads: usize,
    ) {
        let mut rng = Rng((cin * 31 + h * 7 + w + stride * 1000 + k * 13) as u64);
        let c = mid.unwrap_or(cin);
        let x = rng.vec(cin * h * w);
        let we = rng.vec(c * cin);
        let be = rng.vec(c);
        let wd = rng.vec(c * k * k);
        let bd = rng.vec(c);
        let wp = rng.vec(cout * c);
        let bp = rng.vec(cout);
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &dev).unwrap();
        let bias4 = |b: &[f32]| t(b, &[1, b.len(), 1, 1]);
        let mut r = t(&x, &[1, cin, h, w]);
        if mid.is_some() {
            r = clip6(
                &r.conv2d(&t(&we, &[c, cin, 1, 1]), 0, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias4(&be))
                    .unwrap(),
            );
        }
        r = clip6(
            &r.conv2d(&t(&wd, &[c, 1, k, k]), pad, stride, 1, c)
                .unwrap()
                .broadcast_add(&bias4(&bd))
                .unwrap(),
        );
        r = r
            .conv2d(&t(&wp, &[cout, c, 1, 1]), 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias4(&bp))
            .unwrap();
        let (oh, ow) = (r.dims()[2], r.dims()[3]);
        let res = residual.then(|| rng.vec(cout * oh * ow));
        if let Some(v) = &res {
            r = (r + t(v, &[1, cout, oh, ow])).unwrap();
        }
        let want = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let relu6 = Some(Activation::Clip {
            min: Some(0.0),
            max: Some(6.0),
        });
        let ec = pw(&we, c, cin, Some(&be));
        let pc = pw(&wp, cout, c, Some(&bp));
        let block = Bottleneck {
            expand: mid.map(|_| Pointwise {
                conv: &ec,
                activation: relu6,
            }),
            depthwise: DepthwiseStage {
                weight: &wd,
                bias: Some(&bd),
                kernel: (k, k),
                stride: (stride, stride),
                dilation: (1, 1),
                pads: [pad; 4],
                activation: relu6,
            },
            project: Pointwise {
                conv: &pc,
                activation: None,
            },
        };
        assert_eq!(block.out_hw(h, w), Some((oh, ow)));
        let mut got = vec![f32::NAN; cout * oh * ow];
        let pool = std::sync::Arc::new(par::SpinPool::new(threads).unwrap());
        pool.install(|| {
            block
                .run(&x, (cin, h, w), res.as_deref(), &mut got)
                .unwrap()
        });
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 * scale,
                "cin {cin} mid {mid:?} cout {cout} {h}x{w} k{k} s{stride} p{pad}: \
                 element {i}: {g} vs {e}"
            );
        }
    }

    #[test]
    fn matches_candle_stage_by_stage() {
        for threads in [1, 2] {
            // MobileNetV2's shapes (scaled down in width), then odd ones: pruned widths, maps
            // of one row, rows that do not divide into bands, 5 × 5 kernels.
            check(16, Some(96), 24, (56, 56), 3, 2, 1, false, threads);
            check(24, Some(144), 24, (28, 28), 3, 1, 1, true, threads);
            check(32, None, 16, (40, 40), 3, 1, 1, false, threads);
            check(13, Some(37), 11, (23, 17), 3, 2, 1, false, threads);
            check(7, Some(45), 7, (9, 31), 5, 1, 2, true, threads);
            check(5, Some(30), 6, (1, 19), 3, 1, 1, false, threads);
            check(8, Some(48), 8, (2, 2), 3, 2, 1, false, threads);
            check(9, None, 9, (15, 6), 5, 2, 2, true, threads);
            check(6, Some(600), 6, (300, 3), 3, 1, 0, true, threads);
        }
    }

    #[test]
    fn rejects_a_mismatched_input() {
        let w = vec![0.5f32; 8 * 4];
        let e = pw(&w, 8, 4, None);
        let p = pw(&w, 4, 8, None);
        let dw = vec![0.1f32; 8 * 9];
        let block = Bottleneck {
            expand: Some(Pointwise {
                conv: &e,
                activation: None,
            }),
            depthwise: DepthwiseStage {
                weight: &dw,
                bias: None,
                kernel: (3, 3),
                stride: (1, 1),
                dilation: (1, 1),
                pads: [1; 4],
                activation: None,
            },
            project: Pointwise {
                conv: &p,
                activation: None,
            },
        };
        let mut out = vec![0f32; 4 * 5 * 5];
        assert!(block
            .run(&[0.0; 5 * 5 * 5], (5, 5, 5), None, &mut out)
            .is_err());
        assert!(block
            .run(&[0.0; 4 * 5 * 5], (4, 5, 5), None, &mut out[1..])
            .is_err());
        assert!(block
            .run(&[0.0; 4 * 5 * 5], (4, 5, 5), None, &mut out)
            .is_ok());
    }
}
