//! An inverted residual block (pointwise expand → depthwise → pointwise project, plus the
//! residual) on a small map, computed channels-last: positions are the rows of both products and
//! the depthwise sums run along the channels.
//!
//! Layer by layer on a 7 × 7 or 14 × 14 map, every stage fits the NCHW layout badly: the
//! pointwise products have 49 or 196 columns for 32-wide tiles, and the depthwise kernel
//! transposes 16 channels into vector lanes and back around every layer (960 channels at 7 × 7:
//! 49 µs in a MobileNetV2 frame, against ONNX Runtime's 18 µs in its blocked layout). Here the
//! expand product writes its map as `[position][channel]` (the transposed GEMM form, no
//! transpose back), the depthwise reads and writes whole channel rows (contiguous multiply-adds,
//! no transposes), and only the project's product, `cout` channels of `oh · ow` positions, is
//! transposed back to NCHW, with the residual and activation on the way.
//!
//! Both pointwise stages must be packed in the transposed form
//! ([`PackedConv::transposed`](super::conv::PackedConv::transposed)).

use super::act::apply_activation;
use super::bottleneck::{DepthwiseStage, Mismatch, Pointwise};
use super::conv::positions_to_channels;
#[cfg(target_arch = "x86_64")]
use super::gemm::Isa;
use super::gemm::{gemm, Epilogue, Layout, PackedA};
use super::par::{par_chunks_mut, par_for, SendPtr};
use super::scratch;

/// Largest output map (positions) the executor runs channels-last: 7 × 7, MobileNetV2's last
/// four blocks, which measured 0.77–0.91 × their layer-by-layer time (1 thread, hot and with
/// cold caches). 14 × 14 blocks measured 0.96–1.14 ×: there the NCHW kernels fill their tiles.
pub const MAX_POSITIONS: usize = 49;

/// Expand, depthwise, project.
#[derive(Debug, Clone, Copy)]
pub struct ChannelsLast<'a> {
    /// `cin → mid` pointwise, with [`transposed`](super::conv::PackedConv::transposed) weights.
    pub expand: Pointwise<'a>,
    /// Depthwise over `mid` channels.
    pub depthwise: DepthwiseStage<'a>,
    /// The depthwise weights as `[tap][channel]` ([`weights_by_tap`], made once at load), so
    /// each tap is one contiguous row.
    pub by_tap: &'a [f32],
    /// `mid → cout` pointwise; the residual is added before its activation.
    pub project: Pointwise<'a>,
}

impl ChannelsLast<'_> {
    /// Output height and width for an `h × w` input, `None` when the kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.depthwise.shape(h, w).out_hw()
    }

    /// Runs the block on `x` (`[1, cin, h, w]`) into `out` (`[1, cout, oh, ow]`); `residual`,
    /// laid out like `out`, is added before the project's activation.
    pub fn run(
        &self,
        x: &[f32],
        (cin, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), Mismatch> {
        let bad = |s: String| Err(Mismatch(s));
        let (Some(we), Some(wp)) = (
            self.expand.conv.transposed(),
            self.project.conv.transposed(),
        ) else {
            return bad("a pointwise stage is not packed in the transposed form".into());
        };
        let d = &self.depthwise;
        let taps = d.kernel.0 * d.kernel.1;
        let mid = we.n();
        let cout = wp.n();
        if we.k() != cin || wp.k() != mid {
            return bad(format!(
                "stages of {} → {mid} and {} → {cout} channels for {cin} input channels",
                we.k(),
                wp.k()
            ));
        }
        if taps == 0
            || d.weight.len() != mid * taps
            || self.by_tap.len() != mid * taps
            || d.bias.is_some_and(|b| b.len() != mid)
        {
            return bad("depthwise weights do not match its channels".into());
        }
        if d.stride.0 == 0 || d.stride.1 == 0 || d.dilation.0 == 0 || d.dilation.1 == 0 {
            return bad("zero stride or dilation".into());
        }
        let Some((oh, ow)) = self.out_hw(h, w) else {
            return bad(format!("input {h}×{w} is smaller than the kernel"));
        };
        let (p, q) = (h * w, oh * ow);
        if x.len() != cin * p
            || out.len() != cout * q
            || residual.is_some_and(|r| r.len() != out.len())
            || p == 0
            || q == 0
        {
            return bad(format!(
                "input of {} values for [{cin}, {h}, {w}], output of {} for [{cout}, {oh}, {ow}]",
                x.len(),
                out.len()
            ));
        }
        // Expand: e[position][channel], its activation applied in the GEMM's epilogue.
        let a = PackedA::pack_scratch(x, p, cin, 1, p);
        let mut e = scratch::take(p * mid);
        let epi = Epilogue {
            col_bias: self.expand.conv.bias(),
            activation: self.expand.activation,
            ..Default::default()
        };
        gemm(&a, we, mid, &mut e, Layout { rs: mid, cs: 1 }, &epi);
        a.recycle();
        // Depthwise, channel rows in and out.
        let mut dwo = scratch::take(q * mid);
        depthwise_rows(d, self.by_tap, &e, (h, w, mid), (oh, ow), &mut dwo);
        scratch::give(e);
        // Project: t[position][channel], then channel-major with the residual.
        let a = PackedA::pack_scratch(&dwo, q, mid, mid, 1);
        scratch::give(dwo);
        let mut t = scratch::take(q * cout);
        let epi = Epilogue {
            col_bias: self.project.conv.bias(),
            ..Default::default()
        };
        gemm(&a, wp, cout, &mut t, Layout { rs: cout, cs: 1 }, &epi);
        a.recycle();
        positions_to_channels(&t, q, cout, residual, self.project.activation, out);
        scratch::give(t);
        Ok(())
    }
}

/// `out[oq][c] = act(bias[c] + Σ_taps w[c][tap] · e[iq(oq, tap)][c])` for channels-last `e`
/// (`h · w` rows of `c`) into `out` (`oh · ow` rows of `c`): padding taps are skipped, every
/// multiply-add runs along a contiguous channel row.
fn depthwise_rows(
    d: &DepthwiseStage,
    wt: &[f32],
    e: &[f32],
    (h, w, c): (usize, usize, usize),
    (oh, ow): (usize, usize),
    out: &mut [f32],
) {
    let taps = d.kernel.0 * d.kernel.1;
    let wt_ref = &wt[..taps * c];
    let out = &mut out[..oh * ow * c];
    // SAFETY (of calls): `dst` addresses row `oy` of `out` (`ow · c` values), and nothing
    // else accesses its channels c0 .. c1 meanwhile.
    let span = |oy: usize, (c0, c1): (usize, usize), dst: *mut f32| unsafe {
        let hwc = (h, w, c);
        #[cfg(target_arch = "x86_64")]
        match Isa::detect() {
            // SAFETY: detect() saw these features on this CPU.
            Isa::Avx512 => return span_avx512(d, e, wt_ref, hwc, (c0, c1), (oy, ow), dst),
            Isa::Avx2 => return span_avx2(d, e, wt_ref, hwc, (c0, c1), (oy, ow), dst),
            Isa::Portable => {}
        }
        span_body::<false>(d, e, wt_ref, hwc, (c0, c1), (oy, ow), dst)
    };
    if oh * ow * c * taps < 1 << 16 {
        for (oy, dst) in out.chunks_exact_mut(ow * c).enumerate() {
            span(oy, (0, c), dst.as_mut_ptr());
        }
    } else if super::par::current_threads() > 1 {
        // Each output row in two halves of its channels: 7 rows over 2 threads left one
        // waiting a row (a seventh of the layer) at the end. 2 threads, frames alternating in
        // one process against whole rows: MobileNetV2 0.992–0.999× (six runs).
        let half = (c / 2).next_multiple_of(16).min(c);
        let base = SendPtr(out.as_mut_ptr());
        par_for(oh * 2, |i| {
            let (oy, upper) = (i / 2, i % 2 == 1);
            let cs = if upper { (half, c) } else { (0, half) };
            if cs.0 < cs.1 {
                span(oy, cs, base.get().wrapping_add(oy * ow * c));
            }
        });
    } else {
        par_chunks_mut(out, ow * c, |oy, dst| span(oy, (0, c), dst.as_mut_ptr()));
    }
}

/// [`span_body`] with the sums in registers: per position, runs of 64 channels (four
/// vectors, four chains) take every valid tap before one store, where `span_body` loads and
/// stores its sums once per tap. MobileNetV2 frames alternating in one process: 0.988–0.994×
/// (1 thread), 0.984–0.985× (2).
///
/// # Safety
/// As [`span_body`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn span_avx512(
    d: &DepthwiseStage,
    e: &[f32],
    wt: &[f32],
    (h, w, c): (usize, usize, usize),
    (c0, c1): (usize, usize),
    (oy, ow): (usize, usize),
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    let (kh, kw) = d.kernel;
    let (sy, sx) = d.stride;
    let (dy, dx) = d.dilation;
    let (pt, pl) = (d.pads[0], d.pads[1]);
    let (clamp, rest) = super::depthwise::split_activation(d.activation);
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    // The taps inside the map for one position: (offset of its input row in e, tap index).
    const MAX_TAPS: usize = 64;
    if kh * kw > MAX_TAPS {
        // SAFETY: the caller's contract.
        return unsafe { span_body::<true>(d, e, wt, (h, w, c), (c0, c1), (oy, ow), dst) };
    }
    let mut taps = [(0usize, 0usize); MAX_TAPS];
    let ep = e.as_ptr();
    let wp = wt.as_ptr();
    let bias = d.bias.map(|b| b.as_ptr());
    for ox in 0..ow {
        let mut n = 0;
        for ky in 0..kh {
            let Some(iy) = (oy * sy + ky * dy).checked_sub(pt).filter(|&y| y < h) else {
                continue;
            };
            for kx in 0..kw {
                let Some(ix) = (ox * sx + kx * dx).checked_sub(pl).filter(|&x| x < w) else {
                    continue;
                };
                taps[n] = ((iy * w + ix) * c, ky * kw + kx);
                n += 1;
            }
        }
        let taps = &taps[..n];
        let out = dst.wrapping_add(ox * c);
        // Channels ch .. ch + 16 · V (masked by `m` in the last vector).
        // SAFETY (of calls): the channels lie in c0 .. c1 ≤ c, so every read lies in e's
        // input rows, wt's tap rows and the bias, and every write in this position's
        // channels c0 .. c1 of dst, which are ours alone; masked lanes are not accessed.
        let run = |ch: usize, m: __mmask16, vs: usize| unsafe {
            let mut acc = [_mm512_setzero_ps(); 4];
            if let Some(b) = bias {
                for (v, a) in acc.iter_mut().enumerate().take(vs) {
                    let mv = if v + 1 == vs { m } else { !0 };
                    *a = _mm512_maskz_loadu_ps(mv, b.add(ch + 16 * v));
                }
            }
            for &(at, t) in taps {
                for (v, a) in acc.iter_mut().enumerate().take(vs) {
                    let mv = if v + 1 == vs { m } else { !0 };
                    let x = _mm512_maskz_loadu_ps(mv, ep.add(at + ch + 16 * v));
                    let k = _mm512_maskz_loadu_ps(mv, wp.add(t * c + ch + 16 * v));
                    *a = _mm512_fmadd_ps(x, k, *a);
                }
            }
            for (v, a) in acc.iter().enumerate().take(vs) {
                let mv = if v + 1 == vs { m } else { !0 };
                // max(lo, x) and min(hi, ·) return x when it is NaN: NaN passes, as in `clip`.
                let y = _mm512_min_ps(vhi, _mm512_max_ps(vlo, *a));
                _mm512_mask_storeu_ps(out.add(ch + 16 * v), mv, y);
            }
        };
        let mut ch = c0;
        while ch + 64 <= c1 {
            run(ch, !0, 4);
            ch += 64;
        }
        while ch < c1 {
            let left = c1 - ch;
            let vs = left.div_ceil(16).min(4);
            let tail = left - 16 * (vs - 1);
            let m = if tail >= 16 {
                !0
            } else {
                ((1u32 << tail) - 1) as __mmask16
            };
            run(ch, m, vs);
            ch += 16 * vs;
        }
        if rest.is_some() {
            // SAFETY: this position's channels c0 .. c1 lie in dst and are ours alone.
            let acc = unsafe { std::slice::from_raw_parts_mut(out.add(c0), c1 - c0) };
            apply_activation(rest, acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn span_avx2(
    d: &DepthwiseStage,
    e: &[f32],
    wt: &[f32],
    hwc: (usize, usize, usize),
    cs: (usize, usize),
    row: (usize, usize),
    dst: *mut f32,
) {
    span_body::<true>(d, e, wt, hwc, cs, row, dst)
}

/// Channels `c0 .. c1` of output row `oy` of [`depthwise_rows`] (`ow` positions of `c`
/// channels from `dst` on). `FMA`: fused multiply-adds (only where the target has them;
/// elsewhere `mul_add` is a library call).
///
/// # Safety
/// `dst` addresses `ow · c` values, whose channels `c0 .. c1` nothing else accesses meanwhile;
/// `c0 ≤ c1 ≤ c`.
#[inline(always)]
unsafe fn span_body<const FMA: bool>(
    d: &DepthwiseStage,
    e: &[f32],
    wt: &[f32],
    (h, w, c): (usize, usize, usize),
    (c0, c1): (usize, usize),
    (oy, ow): (usize, usize),
    dst: *mut f32,
) {
    let (kh, kw) = d.kernel;
    let (sy, sx) = d.stride;
    let (dy, dx) = d.dilation;
    let (pt, pl) = (d.pads[0], d.pads[1]);
    let n = c1 - c0;
    for ox in 0..ow {
        // SAFETY: position ox's channels c0 .. c1 lie inside the row and are ours alone.
        let acc = unsafe { std::slice::from_raw_parts_mut(dst.add(ox * c + c0), n) };
        match d.bias {
            Some(b) => acc.copy_from_slice(&b[c0..c1]),
            None => acc.fill(0.0),
        }
        for ky in 0..kh {
            let Some(iy) = (oy * sy + ky * dy).checked_sub(pt).filter(|&y| y < h) else {
                continue;
            };
            for kx in 0..kw {
                let Some(ix) = (ox * sx + kx * dx).checked_sub(pl).filter(|&x| x < w) else {
                    continue;
                };
                let src = &e[(iy * w + ix) * c + c0..][..n];
                let wk = &wt[(ky * kw + kx) * c + c0..][..n];
                for ((a, &x), &k) in acc.iter_mut().zip(src).zip(wk) {
                    *a = if FMA { x.mul_add(k, *a) } else { *a + x * k };
                }
            }
        }
        apply_activation(d.activation, acc);
    }
}

/// Depthwise weights `[channel][tap]` as `[tap][channel]`, for [`ChannelsLast::by_tap`].
pub fn weights_by_tap(weight: &[f32], taps: usize) -> Vec<f32> {
    let c = weight.len().checked_div(taps).unwrap_or(0);
    let mut wt = vec![0f32; c * taps];
    for (ch, k) in weight.chunks_exact(taps.max(1)).enumerate() {
        for (t, &v) in k.iter().enumerate() {
            wt[t * c + ch] = v;
        }
    }
    wt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Activation;
    use crate::kernels::conv::{ConvPacking, PackedConv};
    use crate::kernels::depthwise::{depthwise_conv2d, DepthwiseShape};
    use crate::kernels::testutil::rand;

    fn pointwise(cin: usize, cout: usize, seed: u64, packing: ConvPacking) -> PackedConv {
        let w = rand(cout * cin, seed);
        let b = rand(cout, seed + 1);
        PackedConv::new(
            &w,
            &[cout, cin, 1, 1],
            Some(&b),
            &[1, 1],
            &[0; 4],
            &[1, 1],
            1,
            packing,
        )
        .expect("a valid pointwise convolution")
    }

    /// The block matches its three stages run layer by layer by the NCHW kernels, over odd
    /// channel counts (pruned models), strides 1 and 2, 3 × 3 and 5 × 5 kernels, with and
    /// without a residual or a depthwise bias, a clamp or another activation after the
    /// depthwise, on 1 and 2 threads.
    #[test]
    fn matches_the_layer_by_layer_path() {
        let clip = Some(Activation::Clip {
            min: Some(0.0),
            max: Some(6.0),
        });
        // (cin, mid, cout, side, kernel, stride, residual)
        for &(cin, mid, cout, side, k, stride, res) in &[
            (16usize, 96usize, 16usize, 7usize, 3usize, 1usize, true),
            (24, 37, 11, 14, 3, 2, false),
            (5, 19, 5, 9, 5, 1, true),
            (64, 384, 96, 14, 3, 1, false),
            (3, 40, 8, 1, 3, 1, false),
            (40, 300, 24, 7, 5, 1, true),
            (8, 1000, 16, 5, 3, 2, false),
        ] {
            let x = rand(cin * side * side, 1);
            let expand_n = pointwise(cin, mid, 2, ConvPacking::Direct);
            let project_n = pointwise(mid, cout, 4, ConvPacking::Direct);
            let expand_t = pointwise(cin, mid, 2, ConvPacking::Transposed);
            let project_t = pointwise(mid, cout, 4, ConvPacking::Transposed);
            let dw_w = rand(mid * k * k, 6);
            let dw_b = rand(mid, 7);
            let pad = k / 2;
            // Odd widths: an activation that is not a clamp, and no bias.
            let odd = mid % 2 == 1;
            let dw_act = if odd { Some(Activation::Sigmoid) } else { clip };
            let dw_bias = (!odd).then_some(&dw_b[..]);
            let stage = DepthwiseStage {
                weight: &dw_w,
                bias: dw_bias,
                kernel: (k, k),
                stride: (stride, stride),
                dilation: (1, 1),
                pads: [pad; 4],
                activation: dw_act,
            };
            let by_tap = weights_by_tap(&dw_w, k * k);
            let block = ChannelsLast {
                expand: Pointwise {
                    conv: &expand_t,
                    activation: clip,
                },
                depthwise: stage,
                by_tap: &by_tap,
                project: Pointwise {
                    conv: &project_t,
                    activation: None,
                },
            };
            let (oh, ow) = block.out_hw(side, side).expect("fits");
            let residual = res.then(|| rand(cout * oh * ow, 8));
            // Reference: the three layers one after the other.
            let mut e = vec![0f32; mid * side * side];
            expand_n
                .run(&x, (1, cin, side, side), None, clip, &mut e)
                .expect("expand");
            let shape = DepthwiseShape {
                n: 1,
                c: mid,
                h: side,
                w: side,
                kh: k,
                kw: k,
                stride: (stride, stride),
                dilation: (1, 1),
                pad_begin: (pad, pad),
                pad_end: (pad, pad),
            };
            let mut dw = vec![0f32; mid * oh * ow];
            assert!(depthwise_conv2d(
                &shape, &e, &dw_w, dw_bias, None, dw_act, &mut dw
            ));
            let mut want = vec![0f32; cout * oh * ow];
            project_n
                .run(&dw, (1, mid, oh, ow), residual.as_deref(), None, &mut want)
                .expect("project");
            for threads in [1, 2] {
                let pool =
                    std::sync::Arc::new(crate::kernels::par::SpinPool::new(threads).unwrap());
                let mut got = vec![f32::NAN; cout * oh * ow];
                pool.install(|| block.run(&x, (cin, side, side), residual.as_deref(), &mut got))
                    .expect("the block runs");
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "{cin}->{mid}->{cout} at {side}, k{k} s{stride}, {threads} threads: {err}"
                );
            }
        }
    }

    /// Direct-form stages and wrong sizes are refused, with nothing written.
    #[test]
    fn refuses_what_it_cannot_run() {
        let expand = pointwise(4, 8, 1, ConvPacking::Direct);
        let project = pointwise(8, 4, 2, ConvPacking::Transposed);
        let dw_w = rand(8 * 9, 3);
        let by_tap = weights_by_tap(&dw_w, 9);
        let block = ChannelsLast {
            expand: Pointwise {
                conv: &expand,
                activation: None,
            },
            depthwise: DepthwiseStage {
                weight: &dw_w,
                bias: None,
                kernel: (3, 3),
                stride: (1, 1),
                dilation: (1, 1),
                pads: [1; 4],
                activation: None,
            },
            by_tap: &by_tap,
            project: Pointwise {
                conv: &project,
                activation: None,
            },
        };
        let x = rand(4 * 25, 4);
        let mut out = vec![7f32; 4 * 25];
        assert!(block.run(&x, (4, 5, 5), None, &mut out).is_err());
        let expand = pointwise(4, 8, 1, ConvPacking::Transposed);
        let block = ChannelsLast {
            expand: Pointwise {
                conv: &expand,
                activation: None,
            },
            ..block
        };
        assert!(block.run(&x[1..], (4, 5, 5), None, &mut out).is_err());
        assert!(block.run(&x, (3, 5, 5), None, &mut out).is_err());
        assert!(out.iter().all(|&v| v == 7.0));
        block.run(&x, (4, 5, 5), None, &mut out).expect("fits");
    }
}
