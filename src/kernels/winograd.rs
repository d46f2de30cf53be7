//! 3 × 3, stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016):
//! each 2 × 2 output tile costs 16 multiplications per input channel instead of 36, so the GEMM
//! work falls 2.25×. The weights are transformed (`U = G g Gᵀ`) and packed once at load into 16
//! matrices; per frame the input tiles are transformed (`V = Bᵀ d B`), the 16 products
//! `M = U · V` run on the packed GEMM, and the output transform (`Y = Aᵀ M A`) applies bias,
//! residual and activation as it writes. The transforms use only ±1 and ½, so the result
//! stays within a few f32 ulps of direct convolution.

use std::cell::RefCell;

use super::par::{par_chunks_mut, par_for};

use super::act::apply_activation;
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
        let mut u = vec![0f32; 16 * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &weight[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
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
                for (r, q) in gg.iter().enumerate() {
                    let row = [
                        q[0],
                        0.5 * (q[0] + q[1] + q[2]),
                        0.5 * (q[0] - q[1] + q[2]),
                        q[2],
                    ];
                    for (c, v) in row.into_iter().enumerate() {
                        u[((r * 4 + c) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        let u = (0..16)
            .map(|xi| {
                PackedA::pack(
                    &u[xi * cout * cin..(xi + 1) * cout * cin],
                    cout,
                    cin,
                    cin,
                    1,
                )
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
        let t = g.th * g.tw;
        let plane = g.oh * g.ow;
        let cout = self.cout;
        let one = |(co, o): (usize, &mut [f32])| {
            for ty in 0..g.th {
                // The 16 transformed values of this tile row, each a contiguous run over tx.
                let run = |xi: usize| {
                    &m[(xi * cout + co) * t + ty * g.tw..(xi * cout + co) * t + (ty + 1) * g.tw]
                };
                let ms: [&[f32]; 16] = std::array::from_fn(run);
                let (y0, y1) = (2 * ty, 2 * ty + 1);
                for tx in 0..g.tw {
                    // Aᵀ m: 2 × 4, then (Aᵀ m) A: 2 × 2.
                    let s: [[f32; 4]; 2] = [
                        std::array::from_fn(|c| ms[c][tx] + ms[4 + c][tx] + ms[8 + c][tx]),
                        std::array::from_fn(|c| ms[4 + c][tx] - ms[8 + c][tx] - ms[12 + c][tx]),
                    ];
                    let x0 = 2 * tx;
                    for (y, q) in [(y0, s[0]), (y1, s[1])] {
                        if y < g.oh {
                            o[y * g.ow + x0] = q[0] + q[1] + q[2];
                            if x0 + 1 < g.ow {
                                o[y * g.ow + x0 + 1] = q[1] - q[2] - q[3];
                            }
                        }
                    }
                }
            }
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
    let t = g.th * g.tw;
    let vptr = SendPtr(v.as_mut_ptr());
    let one = |ci: usize| {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        // One padded input row per tile row, so the tile loop reads without bounds tests.
        let width = 2 * g.tw + 2;
        let mut rows = vec![0f32; 4 * width];
        // Per tile: the horizontal transform of its 4 rows, 4 values each.
        let mut hrow = vec![[0f32; 4]; 4 * g.tw];
        // This tile row's 16 transformed values per tile, ξ-major, copied to V in runs.
        let mut tiles = vec![0f32; 16 * g.tw];
        for ty in 0..g.th {
            for r in 0..4 {
                let dst = &mut rows[r * width..(r + 1) * width];
                let iy = (2 * ty + r) as isize - g.pad.0;
                dst.fill(0.0);
                if iy >= 0 && (iy as usize) < g.h {
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    // dst[j] = src[j - pad.1] where in range.
                    let lo = g.pad.1.max(0) as usize;
                    let n = g.w.min(width.saturating_sub(lo));
                    dst[lo..lo + n].copy_from_slice(&src[..n]);
                }
                for tx in 0..g.tw {
                    let d = &dst[2 * tx..2 * tx + 4];
                    hrow[r * g.tw + tx] = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
                }
            }
            for tx in 0..g.tw {
                let (r0, r1, r2, r3) = (
                    hrow[tx],
                    hrow[g.tw + tx],
                    hrow[2 * g.tw + tx],
                    hrow[3 * g.tw + tx],
                );
                for c in 0..4 {
                    tiles[c * g.tw + tx] = r0[c] - r2[c];
                    tiles[(4 + c) * g.tw + tx] = r1[c] + r2[c];
                    tiles[(8 + c) * g.tw + tx] = r2[c] - r1[c];
                    tiles[(12 + c) * g.tw + tx] = r1[c] - r3[c];
                }
            }
            for xi in 0..16 {
                // SAFETY: the run (ξ, ci, tile row ty) is inside V, and only this channel's
                // task writes channel ci.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        tiles[xi * g.tw..].as_ptr(),
                        vptr.get().add((xi * cin + ci) * t + ty * g.tw),
                        g.tw,
                    );
                }
            }
        }
    };
    if par {
        par_for(cin, one);
    } else {
        (0..cin).for_each(one);
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements (one channel each).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::PackedConv;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against the direct (im2col GEMM) convolution, itself tested against candle.
    #[test]
    fn matches_direct_convolution_within_1e4_relative() {
        for &(n, cin, cout, h, w, pads) in &[
            (1usize, 3usize, 5usize, 6usize, 6usize, [1usize, 1, 1, 1]),
            (1, 16, 24, 7, 7, [1, 1, 1, 1]),
            (2, 8, 8, 9, 5, [0, 0, 0, 0]),
            (1, 33, 17, 14, 13, [1, 0, 0, 1]),
            (1, 64, 64, 56, 56, [1, 1, 1, 1]),
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
