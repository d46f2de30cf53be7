//! 3 × 3, stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016):
//! each 2 × 2 output tile costs 16 multiplications per input channel instead of 36, so the GEMM
//! work falls 2.25×. The weights are transformed (`U = G g Gᵀ`) and packed once at load into 16
//! matrices; per frame the input tiles are transformed (`V = Bᵀ d B`), the 16 products
//! `M = U · V` run on the packed GEMM, and the output transform (`Y = Aᵀ M A`) applies bias,
//! residual and activation as it writes. The transforms use only ±1 and ½, so the result
//! stays within a few f32 ulps of direct convolution.

use std::cell::RefCell;

use super::par::{par_chunks_mut, par_for, SendPtr};
use super::scratch;

use super::act::apply_activation;
#[cfg(target_arch = "x86_64")]
use super::gemm::Isa;
use super::gemm::{gemm, Epilogue, Layout, MatrixB, PackedA};
use crate::graph::Activation;

/// Work below this many multiply-adds per frame runs serially: rayon's fork costs more.
const PAR_MIN: usize = 1 << 15;

thread_local! {
    /// Transformed input and products (V, M) of the calling thread, reused across frames.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A 3 × 3 stride-1 convolution prepared for F(2×2, 3×3).
#[derive(Debug, Clone)]
pub struct WinogradConv {
    /// `U_ξ` (`cout × cin`) for the 16 tile positions ξ.
    u: Vec<PackedA>,
    bias: Option<Vec<f32>>,
    cin: usize,
    cout: usize,
    pad_begin: (usize, usize),
    pad_end: (usize, usize),
}

impl WinogradConv {
    /// Transforms and packs `weight` (`[cout, cin, 3, 3]`). `pads` are begins then ends.
    pub fn new(
        weight: &[f32],
        cout: usize,
        cin: usize,
        bias: Option<&[f32]>,
        pads: &[usize; 4],
    ) -> Option<WinogradConv> {
        if weight.len() != cout * cin * 9 || bias.is_some_and(|b| b.len() != cout) {
            return None;
        }
        // U = G g Gᵀ (4 × 4 per channel pair), built and packed one position ξ at a time so
        // load holds one unpacked cout × cin matrix, not sixteen.
        let transform = |g: &[f32]| -> [[f32; 4]; 4] {
            // G g: 4 × 3.
            let mut gg = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            // (G g) Gᵀ: 4 × 4.
            gg.map(|q| {
                [
                    q[0],
                    0.5 * (q[0] + q[1] + q[2]),
                    0.5 * (q[0] - q[1] + q[2]),
                    q[2],
                ]
            })
        };
        let mut plane = vec![0f32; cout * cin];
        let u = (0..16)
            .map(|xi| {
                for (dst, g) in plane.iter_mut().zip(weight.chunks_exact(9)) {
                    *dst = transform(g)[xi / 4][xi % 4];
                }
                PackedA::pack(&plane, cout, cin, cin, 1)
            })
            .collect();
        Some(WinogradConv {
            u,
            bias: bias.map(<[f32]>::to_vec),
            cin,
            cout,
            pad_begin: (pads[0], pads[1]),
            pad_end: (pads[2], pads[3]),
        })
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Output height and width for an `h × w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let oh = (h + self.pad_begin.0 + self.pad_end.0).checked_sub(2)?;
        let ow = (w + self.pad_begin.1 + self.pad_end.1).checked_sub(2)?;
        (oh > 0 && ow > 0).then_some((oh, ow))
    }

    /// Runs on `x` (`[n, cin, h, w]`) into `out` (`[n, cout, oh, ow]`); `residual` is laid out
    /// like `out`. Returns false (and writes nothing) when the sizes do not fit.
    pub fn run(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
    ) -> bool {
        let Some((oh, ow)) = self.out_hw(h, w) else {
            return false;
        };
        let plane = oh * ow;
        if x.len() != n * self.cin * h * w
            || out.len() != n * self.cout * plane
            || residual.is_some_and(|r| r.len() != out.len())
        {
            return false;
        }
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let t = th * tw;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (v, m) = &mut *scratch;
            // Grow-only and every element is written before it is read: no per-frame
            // allocation or page faults after the first frame.
            if v.len() < 16 * self.cin * t {
                v.resize(16 * self.cin * t, 0.0);
            }
            if m.len() < 16 * self.cout * t {
                m.resize(16 * self.cout * t, 0.0);
            }
            self.run_with(x, (n, h, w), (oh, ow), residual, activation, out, v, m);
        });
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn run_with(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        (oh, ow): (usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
        v: &mut [f32],
        m: &mut [f32],
    ) {
        let plane = oh * ow;
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let t = th * tw;
        let geo = Geometry {
            h,
            w,
            oh,
            ow,
            th,
            tw,
            pad: (self.pad_begin.0 as isize, self.pad_begin.1 as isize),
        };
        let par = self.cin * self.cout * t >= PAR_MIN;
        for img in 0..n {
            let xi = &x[img * self.cin * h * w..(img + 1) * self.cin * h * w];
            input_transform(xi, self.cin, &geo, v, par);
            for (xi_pos, u) in self.u.iter().enumerate() {
                let b = MatrixB {
                    data: &v[xi_pos * self.cin * t..(xi_pos + 1) * self.cin * t],
                    rs: t,
                    cs: 1,
                };
                let c = &mut m[xi_pos * self.cout * t..(xi_pos + 1) * self.cout * t];
                gemm(u, &b, t, c, Layout { rs: t, cs: 1 }, &Epilogue::default());
            }
            let o = &mut out[img * self.cout * plane..(img + 1) * self.cout * plane];
            let r = residual.map(|r| &r[img * self.cout * plane..(img + 1) * self.cout * plane]);
            self.output_transform(m, &geo, o, r, activation, par);
        }
    }

    #[allow(clippy::needless_range_loop)] // tx indexes 16 runs at once
    fn output_transform(
        &self,
        m: &[f32],
        g: &Geometry,
        out: &mut [f32],
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        par: bool,
    ) {
        let plane = g.oh * g.ow;
        let cout = self.cout;
        let one = |(co, o): (usize, &mut [f32])| {
            output_channel(m, g, cout, co, o);
            if let Some(b) = &self.bias {
                let bc = b[co];
                o.iter_mut().for_each(|v| *v += bc);
            }
            if let Some(r) = residual {
                o.iter_mut()
                    .zip(&r[co * plane..(co + 1) * plane])
                    .for_each(|(v, x)| *v += x);
            }
            apply_activation(activation, o);
        };
        if par {
            par_chunks_mut(out, plane, |co, o| one((co, o)));
        } else {
            out.chunks_mut(plane).enumerate().for_each(one);
        }
    }
}

struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    th: usize,
    tw: usize,
    pad: (isize, isize),
}

/// `V[ξ][ci][tile] = (Bᵀ d B)[ξ]` for every channel and 4 × 4 input tile `d` (stride 2).
fn input_transform(x: &[f32], cin: usize, g: &Geometry, v: &mut [f32], par: bool) {
    let vptr = SendPtr(v.as_mut_ptr());
    let one = |ci: usize| {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        // SAFETY: channel ci's runs of V are written by this task only, and lie inside V.
        unsafe { dispatch_input(plane, g, ci, cin, vptr.get()) }
    };
    if par {
        par_for(cin, one);
    } else {
        (0..cin).for_each(one);
    }
}

/// # Safety
/// `v` must address the whole of V; no other thread may write channel `ci`'s runs.
unsafe fn dispatch_input(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        Isa::Avx512 => return input_avx512(plane, g, ci, cin, v),
        Isa::Avx2 => return input_avx2(plane, g, ci, cin, v),
        Isa::Portable => {}
    }
    input_channel(plane, g, ci, cin, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_avx512(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    input_channel(plane, g, ci, cin, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_avx2(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    input_channel(plane, g, ci, cin, v)
}

/// One channel's input transform. Every loop runs over a row of tiles (tx), on contiguous
/// arrays, so it vectorises: each padded input row is split into even and odd columns, the
/// row transform (d₀ − d₂, d₁ + d₂, d₂ − d₁, d₁ − d₃) reads them at tx and tx + 1, and the
/// column transform combines four such rows.
///
/// # Safety
/// As for [`dispatch_input`].
#[inline(always)]
unsafe fn input_channel(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    let (tw, t) = (g.tw, g.th * g.tw);
    let width = 2 * tw + 2;
    let half = tw + 1;
    // Every part is written before it is read.
    let mut buf = scratch::take(width + 16 * tw + 2 * half);
    let (row, rest) = buf.split_at_mut(width);
    // Row transforms of the tile row's 4 input rows: h[r][c][tx].
    let (h, rest) = rest.split_at_mut(16 * tw);
    let (even, odd) = rest.split_at_mut(half);
    for ty in 0..g.th {
        for r in 0..4 {
            let iy = (2 * ty + r) as isize - g.pad.0;
            row.fill(0.0);
            if iy >= 0 && (iy as usize) < g.h {
                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                // row[j] = src[j - pad.1] where in range.
                let lo = g.pad.1.max(0) as usize;
                let n = g.w.min(width.saturating_sub(lo));
                row[lo..lo + n].copy_from_slice(&src[..n]);
            }
            for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
            let hr = &mut h[r * 4 * tw..(r + 1) * 4 * tw];
            let (h0, rest) = hr.split_at_mut(tw);
            let (h1, rest) = rest.split_at_mut(tw);
            let (h2, h3) = rest.split_at_mut(tw);
            for tx in 0..tw {
                let (d0, d1, d2, d3) = (even[tx], odd[tx], even[tx + 1], odd[tx + 1]);
                h0[tx] = d0 - d2;
                h1[tx] = d1 + d2;
                h2[tx] = d2 - d1;
                h3[tx] = d1 - d3;
            }
        }
        for c in 0..4 {
            let hrc = |r: usize| &h[(r * 4 + c) * tw..(r * 4 + c + 1) * tw];
            let (r0, r1, r2, r3) = (hrc(0), hrc(1), hrc(2), hrc(3));
            let run = |i: usize| {
                // SAFETY: run (ξ = 4i + c, ci, tile row ty) of V, owned by this task.
                unsafe {
                    std::slice::from_raw_parts_mut(
                        v.add(((i * 4 + c) * cin + ci) * t + ty * tw),
                        tw,
                    )
                }
            };
            for ((o, a), b) in run(0).iter_mut().zip(r0).zip(r2) {
                *o = a - b;
            }
            for ((o, a), b) in run(1).iter_mut().zip(r1).zip(r2) {
                *o = a + b;
            }
            for ((o, a), b) in run(2).iter_mut().zip(r2).zip(r1) {
                *o = a - b;
            }
            for ((o, a), b) in run(3).iter_mut().zip(r1).zip(r3) {
                *o = a - b;
            }
        }
    }
    scratch::give(buf);
}

/// One output channel's transform `Aᵀ m A` over all tiles, into the channel's plane.
fn output_channel(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        // SAFETY: detect() saw these features on this CPU.
        Isa::Avx512 => return unsafe { output_avx512(m, g, cout, co, o) },
        Isa::Avx2 => return unsafe { output_avx2(m, g, cout, co, o) },
        Isa::Portable => {}
    }
    output_body(m, g, cout, co, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_avx512(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    output_body(m, g, cout, co, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_avx2(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    output_body(m, g, cout, co, o)
}

/// Vectorised over tx like the input transform: the column transform (m₀ + m₁ + m₂,
/// m₁ − m₂ − m₃) on whole runs, then the row transform into even and odd output columns.
#[inline(always)]
fn output_body(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    let (tw, t) = (g.tw, g.th * g.tw);
    // Every part is written before it is read.
    let mut buf = scratch::take(10 * tw);
    let (s, rest) = buf.split_at_mut(8 * tw);
    let (even, odd) = rest.split_at_mut(tw);
    for ty in 0..g.th {
        let ms =
            |xi: usize| &m[(xi * cout + co) * t + ty * tw..(xi * cout + co) * t + (ty + 1) * tw];
        for c in 0..4 {
            let (s0, s1) = s[c * 2 * tw..(c + 1) * 2 * tw].split_at_mut(tw);
            let (m0, m1, m2, m3) = (ms(c), ms(4 + c), ms(8 + c), ms(12 + c));
            for tx in 0..tw {
                s0[tx] = m0[tx] + m1[tx] + m2[tx];
                s1[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        for i in 0..2 {
            let y = 2 * ty + i;
            if y >= g.oh {
                continue;
            }
            let sc = |c: usize| &s[(c * 2 + i) * tw..(c * 2 + i + 1) * tw];
            let (q0, q1, q2, q3) = (sc(0), sc(1), sc(2), sc(3));
            for tx in 0..tw {
                even[tx] = q0[tx] + q1[tx] + q2[tx];
                odd[tx] = q1[tx] - q2[tx] - q3[tx];
            }
            let dst = &mut o[y * g.ow..(y + 1) * g.ow];
            for (pair, (e, od)) in dst.chunks_exact_mut(2).zip(even.iter().zip(odd.iter())) {
                pair[0] = *e;
                pair[1] = *od;
            }
            if g.ow % 2 == 1 {
                dst[g.ow - 1] = even[tw - 1];
            }
        }
    }
    scratch::give(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::PackedConv;
    use crate::kernels::testutil::rand;

    /// Against the direct (im2col GEMM) convolution, itself tested against candle.
    #[test]
    fn matches_direct_convolution_within_1e4_relative() {
        for &(n, cin, cout, h, w, pads) in &[
            (1usize, 3usize, 5usize, 6usize, 6usize, [1usize, 1, 1, 1]),
            (1, 16, 24, 7, 7, [1, 1, 1, 1]),
            (2, 8, 8, 9, 5, [0, 0, 0, 0]),
            (1, 33, 17, 14, 13, [1, 0, 0, 1]),
            (1, 64, 64, 56, 56, [1, 1, 1, 1]),
            (1, 32, 48, 45, 37, [1, 1, 1, 1]),
            (2, 24, 40, 61, 30, [1, 0, 0, 1]),
            (1, 5, 3, 3, 3, [0, 0, 0, 0]),
        ] {
            let wt = rand(cout * cin * 9, 1);
            let b = rand(cout, 2);
            let x = rand(n * cin * h * w, 3);
            let direct = PackedConv::new(
                &wt,
                &[cout, cin, 3, 3],
                Some(&b),
                &[1, 1],
                &pads,
                &[1, 1],
                1,
                crate::kernels::conv::ConvPacking::Direct,
            )
            .unwrap();
            let wino = WinogradConv::new(&wt, cout, cin, Some(&b), &pads).unwrap();
            let (oh, ow) = direct.out_hw(h, w).unwrap();
            assert_eq!(wino.out_hw(h, w), Some((oh, ow)));
            let res = rand(n * cout * oh * ow, 4);
            let mut want = vec![0f32; res.len()];
            let mut got = vec![f32::NAN; res.len()];
            direct
                .run(
                    &x,
                    (n, cin, h, w),
                    Some(&res),
                    Some(Activation::Relu),
                    &mut want,
                )
                .unwrap();
            assert!(wino.run(&x, (n, h, w), Some(&res), Some(Activation::Relu), &mut got));
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err / scale <= 1e-4,
                "{cin}->{cout} {h}x{w} {pads:?}: rel err {}",
                err / scale
            );
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let wino = WinogradConv::new(&[0.0; 2 * 3 * 9], 2, 3, None, &[0; 4]).unwrap();
        let mut out = vec![0.0; 2 * 9];
        assert!(!wino.run(&[0.0; 10], (1, 5, 5), None, None, &mut out));
        assert!(WinogradConv::new(&[0.0; 5], 2, 3, None, &[0; 4]).is_none());
    }
}
