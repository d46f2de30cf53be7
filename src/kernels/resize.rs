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
                let mut t = scratch::take(w);
                for (o, &(y0, y1, wy)) in out.chunks_exact_mut(ow).zip(ry) {
                    let (a, b) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
                    for ((tv, &av), &bv) in t.iter_mut().zip(a).zip(b) {
                        *tv = av + (bv - av) * wy;
                    }
                    for (v, &(x0, x1, wx)) in o.iter_mut().zip(cx) {
                        let (av, bv) = (t[x0], t[x1]);
                        *v = av + (bv - av) * wx;
                    }
                }
                scratch::give(t);
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
