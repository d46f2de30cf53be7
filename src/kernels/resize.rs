//! Resize of the two trailing (spatial) axes of an NCHW tensor, nearest or bilinear.
//!
//! candle's path gathers the input twice per axis and blends with broadcast ops, allocating at
//! every step: the defect classifier's ×2 bilinear upsampling (48 × 32 × 32 → 64 × 64) took
//! 1.2 ms of its 2.4 ms frame there. Here the source indices and weights are worked out once
//! (the shapes are static), and each output row is one blend of two input rows.
//!
//! The arithmetic is candle's, in the same order (rows first, then columns, each as
//! `a + (b − a)·w` with the weight rounded to f32), so the two paths agree to the last bit.

use super::par::par_chunks_mut;
use super::scratch;

/// The input index nearest to source coordinate `c`, rounded as ONNX's `nearest_mode` says
/// (`floor`, `ceil`, `round_prefer_ceil`; anything else is `round_prefer_floor`), clamped
/// to `0..=last`. Shared with candle's path (`exec::ops`), so both pick the same pixels.
pub fn nearest_source(c: f64, last: f64, mode: &str) -> usize {
    let r = match mode {
        "floor" => c.floor(),
        "ceil" => c.ceil(),
        "round_prefer_ceil" => (c + 0.5).floor(),
        // round_prefer_floor: halves go down.
        _ => (c - 0.5).ceil(),
    };
    r.clamp(0.0, last) as usize
}

/// The two input indices around source coordinate `c` (clamped to `0..=last`) and the weight
/// of the second. Shared with candle's path (`exec::ops`).
pub fn linear_source(c: f64, last: f64) -> (usize, usize, f64) {
    let c = c.clamp(0.0, last);
    let f = c.floor();
    (f as usize, (f + 1.0).min(last) as usize, c - f)
}

/// How one output axis reads its input axis.
#[derive(Debug, Clone, PartialEq)]
pub enum AxisMap {
    /// Output index i copies input index `idx[i]`.
    Nearest(Vec<usize>),
    /// Output index i is `x[i0] + (x[i1] − x[i0])·w`, per i.
    Linear(Vec<(usize, usize, f32)>),
}

impl AxisMap {
    /// Nearest neighbour from `n_in` to `n_out` positions: source coordinate
    /// `(i + pre) / div + post`, rounded as `nearest_mode` says (see [`nearest_source`]).
    pub fn nearest(n_in: usize, n_out: usize, [pre, div, post]: [f64; 3], mode: &str) -> Self {
        let last = n_in.saturating_sub(1) as f64;
        AxisMap::Nearest(
            (0..n_out)
                .map(|i| nearest_source((i as f64 + pre) / div + post, last, mode))
                .collect(),
        )
    }

    /// Linear interpolation from `n_in` to `n_out` positions, source coordinate as in
    /// [`AxisMap::nearest`] (see [`linear_source`]).
    pub fn linear(n_in: usize, n_out: usize, [pre, div, post]: [f64; 3]) -> Self {
        let last = n_in.saturating_sub(1) as f64;
        AxisMap::Linear(
            (0..n_out)
                .map(|i| {
                    let (a, b, w) = linear_source((i as f64 + pre) / div + post, last);
                    (a, b, w as f32)
                })
                .collect(),
        )
    }

    /// Output positions.
    pub fn positions(&self) -> usize {
        match self {
            AxisMap::Nearest(v) => v.len(),
            AxisMap::Linear(v) => v.len(),
        }
    }

    /// Whether every source index is below `n_in`.
    fn fits(&self, n_in: usize) -> bool {
        match self {
            AxisMap::Nearest(v) => v.iter().all(|&i| i < n_in),
            AxisMap::Linear(v) => v.iter().all(|&(a, b, _)| a < n_in && b < n_in),
        }
    }
}

/// Resizes `planes` planes of `h × w` (`x`, contiguous) into `y` (`planes` planes of
/// `rows.len() × cols.len()`). Both maps must be of the same kind. False, with nothing written,
/// when the lengths or indices do not fit.
pub fn resize2d(
    x: &[f32],
    (planes, h, w): (usize, usize, usize),
    rows: &AxisMap,
    cols: &AxisMap,
    y: &mut [f32],
) -> bool {
    let (oh, ow) = (rows.positions(), cols.positions());
    let plane_out = oh * ow;
    if x.len() != planes * h * w
        || y.len() != planes * plane_out
        || !rows.fits(h)
        || !cols.fits(w)
        || plane_out == 0
    {
        return false;
    }
    let phases = match cols {
        AxisMap::Linear(cx) => Phases::find(cx, w),
        AxisMap::Nearest(_) => None,
    };
    let plane = |p: usize, out: &mut [f32]| {
        let src = &x[p * h * w..(p + 1) * h * w];
        match (rows, cols) {
            (AxisMap::Nearest(ry), AxisMap::Nearest(cx)) => {
                for (o, &iy) in out.chunks_exact_mut(ow).zip(ry) {
                    let row = &src[iy * w..(iy + 1) * w];
                    for (v, &ix) in o.iter_mut().zip(cx) {
                        *v = row[ix];
                    }
                }
            }
            (AxisMap::Linear(ry), AxisMap::Linear(cx)) => {
                let periodic = phases.as_ref();
                let mut buf = scratch::take(w + periodic.map_or(0, |p| p.s * (p.hi - p.lo)));
                let (t, ph) = buf.split_at_mut(w);
                for (o, &(y0, y1, wy)) in out.chunks_exact_mut(ow).zip(ry) {
                    let (a, b) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
                    for ((tv, &av), &bv) in t.iter_mut().zip(a).zip(b) {
                        *tv = av + (bv - av) * wy;
                    }
                    let gather = |v: &mut f32, &(x0, x1, wx): &(usize, usize, f32)| {
                        let (av, bv) = (t[x0], t[x1]);
                        *v = av + (bv - av) * wx;
                    };
                    match periodic {
                        None => o.iter_mut().zip(cx).for_each(|(v, c)| gather(v, c)),
                        Some(p) => {
                            let (c0, c1) = (p.s * p.lo, p.s * p.hi);
                            o[..c0]
                                .iter_mut()
                                .zip(&cx[..c0])
                                .for_each(|(v, c)| gather(v, c));
                            o[c1..]
                                .iter_mut()
                                .zip(&cx[c1..])
                                .for_each(|(v, c)| gather(v, c));
                            p.blend(t, ph, &mut o[c0..c1]);
                        }
                    }
                }
                scratch::give(buf);
            }
            // Mixed kinds are refused below, before any plane runs.
            _ => {}
        }
    };
    if matches!(
        (rows, cols),
        (AxisMap::Nearest(_), AxisMap::Linear(_)) | (AxisMap::Linear(_), AxisMap::Nearest(_))
    ) {
        return false;
    }
    // Planes per task: at least ~16 k outputs, so per-task costs stay small.
    let per = (1usize << 14).div_ceil(plane_out).max(1);
    par_chunks_mut(y, per * plane_out, |t, out| {
        for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
            plane(t * per + i, o);
        }
    });
    true
}

/// The columns of an integer upscale by `s` that repeat with period `s`: for `i` in
/// `lo..hi` and each phase `k`, output column `s·i + k` blends `t[i + d[k]]` and
/// `t[i + d[k] + 1]` with weight `w[k]`. Blending phase by phase reads contiguous runs (the
/// loops vectorise) where the per-column gather took ~1 ns per output value; the border
/// columns, where the source index is clamped, keep the gather.
struct Phases {
    s: usize,
    lo: usize,
    hi: usize,
    d: Vec<usize>,
    w: Vec<f32>,
}

impl Phases {
    /// The periodic run of `cols` (a map from `n_in` columns), if it has one worth using.
    fn find(cols: &[(usize, usize, f32)], n_in: usize) -> Option<Phases> {
        let n_out = cols.len();
        if n_in < 4 || !n_out.is_multiple_of(n_in) || n_out / n_in < 2 {
            return None;
        }
        let s = n_out / n_in;
        let mid = n_in / 2;
        // Each phase's offset and weight, read at the middle (d[k] = x0 − i + 1 ≥ 0, so
        // the offset of column i is i + d[k] − 1).
        let mut d = Vec::with_capacity(s);
        let mut w = Vec::with_capacity(s);
        for k in 0..s {
            let (x0, x1, wk) = cols[s * mid + k];
            if x1 != x0 + 1 || x0 + 1 < mid {
                return None;
            }
            d.push(x0 + 1 - mid);
            w.push(wk);
        }
        let regular = |i: usize| {
            (0..s).all(|k| {
                let x0 = (i + d[k]).wrapping_sub(1);
                cols[s * i + k] == (x0, x0 + 1, w[k]) && x0 + 1 < n_in
            })
        };
        let mut lo = mid;
        while lo > 0 && regular(lo - 1) {
            lo -= 1;
        }
        let mut hi = mid + 1;
        while hi < n_in && regular(hi) {
            hi += 1;
        }
        // Offsets relative to lo: t[i + d[k] − 1] for i ≥ lo needs lo + d[k] ≥ 1.
        (hi - lo >= 8 && d.iter().all(|&dk| lo + dk >= 1)).then_some(Phases { s, lo, hi, d, w })
    }

    /// `out[s·(i − lo) + k]` for `i` in `lo..hi`, from the blended row `t`; `ph` holds
    /// `s · (hi − lo)` values of scratch.
    fn blend(&self, t: &[f32], ph: &mut [f32], out: &mut [f32]) {
        let n = self.hi - self.lo;
        for (k, pk) in ph.chunks_exact_mut(n).enumerate() {
            let x0 = self.lo + self.d[k] - 1;
            let (a, b) = (&t[x0..x0 + n], &t[x0 + 1..x0 + 1 + n]);
            let wk = self.w[k];
            for ((v, &av), &bv) in pk.iter_mut().zip(a).zip(b) {
                *v = av + (bv - av) * wk;
            }
        }
        if self.s == 2 {
            let (p0, p1) = ph.split_at(n);
            for (pair, (&e, &o)) in out.chunks_exact_mut(2).zip(p0.iter().zip(p1)) {
                pair[0] = e;
                pair[1] = o;
            }
        } else {
            for (k, pk) in ph.chunks_exact(n).enumerate() {
                for (v, &x) in out[k..].iter_mut().step_by(self.s).zip(pk) {
                    *v = x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ResizeMode;
    use crate::kernels::testutil::{below, rand};

    /// candle's reference (the executor's op) on the same planes.
    fn reference(
        x: &[f32],
        dims: [usize; 4],
        mode: ResizeMode,
        sizes: [usize; 4],
        t: [[f64; 3]; 2],
        nearest: &str,
    ) -> Vec<f32> {
        let xt = candle_core::Tensor::from_slice(x, &dims, &candle_core::Device::Cpu).unwrap();
        let op = crate::graph::Op::Resize {
            mode,
            sizes: sizes.to_vec(),
            pre: vec![0.0, 0.0, t[0][0], t[1][0]],
            div: vec![1.0, 1.0, t[0][1], t[1][1]],
            post: vec![0.0, 0.0, t[0][2], t[1][2]],
            nearest_mode: nearest.into(),
            exclude_outside: false,
        };
        let y = crate::exec::ops::eval(&op, &[xt]).unwrap();
        y[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_over_modes_scales_and_transforms() {
        let mut next = below(0x9e37_79b9_7f4a_7c15);
        for case in 0..40 {
            let dims = [1 + next(2), 1 + next(5), 1 + next(9), 1 + next(9)];
            let (oh, ow) = (1 + next(20), 1 + next(20));
            // half_pixel (x + 0.5)/s − 0.5, asymmetric x/s, align_corners-like scalings.
            let sh = oh as f64 / dims[2] as f64;
            let sw = ow as f64 / dims[3] as f64;
            let t = match case % 3 {
                0 => [[0.5, sh, -0.5], [0.5, sw, -0.5]],
                1 => [[0.0, sh, 0.0], [0.0, sw, 0.0]],
                _ => [
                    [
                        0.0,
                        (oh.max(2) - 1) as f64 / (dims[2].max(2) - 1) as f64,
                        0.0,
                    ],
                    [
                        0.0,
                        (ow.max(2) - 1) as f64 / (dims[3].max(2) - 1) as f64,
                        0.0,
                    ],
                ],
            };
            let x = rand(dims.iter().product(), case as u64);
            let sizes = [dims[0], dims[1], oh, ow];
            for (mode, nearest) in [
                (ResizeMode::Linear, ""),
                (ResizeMode::Nearest, "floor"),
                (ResizeMode::Nearest, "round_prefer_floor"),
                (ResizeMode::Nearest, "round_prefer_ceil"),
                (ResizeMode::Nearest, "ceil"),
            ] {
                let want = reference(&x, dims, mode, sizes, t, nearest);
                let (rows, cols) = match mode {
                    ResizeMode::Linear => (
                        AxisMap::linear(dims[2], oh, t[0]),
                        AxisMap::linear(dims[3], ow, t[1]),
                    ),
                    ResizeMode::Nearest => (
                        AxisMap::nearest(dims[2], oh, t[0], nearest),
                        AxisMap::nearest(dims[3], ow, t[1], nearest),
                    ),
                };
                let mut got = vec![f32::NAN; want.len()];
                let planes = dims[0] * dims[1];
                assert!(resize2d(
                    &x,
                    (planes, dims[2], dims[3]),
                    &rows,
                    &cols,
                    &mut got
                ));
                assert_eq!(
                    got, want,
                    "case {case} {mode:?} {nearest} {dims:?} -> {oh}x{ow}"
                );
            }
        }
    }

    /// Integer upscales take the phase-by-phase blend for their interior columns: still
    /// bit-identical to candle, for each coordinate transform and factor.
    #[test]
    fn integer_upscales_match_candle_exactly() {
        for (h, w, s) in [(7, 32, 2), (5, 20, 3), (4, 16, 4), (3, 9, 2), (6, 40, 2)] {
            let (oh, ow) = (h * 2, w * s);
            let x = rand(2 * 3 * h * w, (w * s) as u64);
            for t in [
                [[0.5, 2.0, -0.5], [0.5, s as f64, -0.5]],
                [[0.0, 2.0, 0.0], [0.0, s as f64, 0.0]],
                [
                    [0.0, (oh - 1) as f64 / (h - 1) as f64, 0.0],
                    [0.0, (ow - 1) as f64 / (w - 1) as f64, 0.0],
                ],
            ] {
                let dims = [2, 3, h, w];
                let want = reference(&x, dims, ResizeMode::Linear, [2, 3, oh, ow], t, "");
                let (rows, cols) = (AxisMap::linear(h, oh, t[0]), AxisMap::linear(w, ow, t[1]));
                let mut got = vec![f32::NAN; want.len()];
                assert!(resize2d(&x, (6, h, w), &rows, &cols, &mut got));
                assert_eq!(got, want, "{h}x{w} x{s} {t:?}");
            }
        }
        // The half-pixel ×2 map of 32 columns has a periodic interior (what the test above
        // is for), the align-corners one does not.
        let AxisMap::Linear(c) = AxisMap::linear(32, 64, [0.5, 2.0, -0.5]) else {
            unreachable!()
        };
        let p = Phases::find(&c, 32).expect("a periodic interior");
        assert_eq!((p.s, p.lo, p.hi), (2, 1, 31));
    }

    #[test]
    fn wrong_sizes_and_mixed_kinds_are_refused() {
        let rows = AxisMap::linear(4, 8, [0.5, 2.0, -0.5]);
        let cols = AxisMap::linear(4, 8, [0.5, 2.0, -0.5]);
        let x = vec![0.0; 2 * 16];
        let mut y = vec![0.0; 2 * 64];
        assert!(resize2d(&x, (2, 4, 4), &rows, &cols, &mut y));
        assert!(!resize2d(&x[1..], (2, 4, 4), &rows, &cols, &mut y));
        assert!(!resize2d(&x, (2, 4, 4), &rows, &cols, &mut y[1..]));
        // Indices past a smaller input than the maps were made for.
        assert!(!resize2d(&x[..2 * 9], (2, 3, 3), &rows, &cols, &mut y));
        let near = AxisMap::nearest(4, 8, [0.0, 2.0, 0.0], "floor");
        assert!(!resize2d(&x, (2, 4, 4), &rows, &near, &mut y));
    }
}
