//! The small ops between the heavy ones: transposes, concatenation and splits, gathers along
//! an axis, broadcasting elementwise arithmetic and global pooling, written straight into the
//! caller's buffer (an arena slot) instead of through a freshly allocated tensor.
//!
//! Every function checks the lengths against the shapes it is given and returns false, having
//! written nothing, when they disagree; it then writes every element of its output.

use super::act::apply_activation;
use super::par::{self, SendPtr};
use crate::graph::Activation;

/// Outputs smaller than this (elements) are written on one thread: a fork costs more.
const PAR_MIN: usize = 1 << 15;

/// Pieces of `len` elements to split a parallel write into (1 when it is small).
fn pieces(len: usize) -> usize {
    if len < PAR_MIN {
        1
    } else {
        (2 * par::current_threads()).min(len / (PAR_MIN / 4)).max(1)
    }
}

/// `out = src` in parallel pieces (a Reshape's copy).
pub fn copy(src: &[f32], out: &mut [f32]) -> bool {
    if src.len() != out.len() {
        return false;
    }
    let chunk = out.len().div_ceil(pieces(out.len())).max(1);
    par::par_chunks_mut(out, chunk, |i, o| {
        o.copy_from_slice(&src[i * chunk..i * chunk + o.len()]);
    });
    true
}

/// The most axes a strided walk supports (ONNX models in practice stay below 8).
pub const MAX_RANK: usize = 8;

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// Row-major strides of `dims`.
fn strides_of(dims: &[usize], out: &mut [usize; MAX_RANK]) {
    let mut s = 1;
    for (i, &d) in dims.iter().enumerate().rev() {
        out[i] = s;
        s *= d;
    }
}

/// Calls `f(src_offset, dst_offset)` for rows `r0 .. r1` (rows: all axes but the last) of
/// `dims`, where a step along axis i moves the source by `src[i]` and the destination is
/// contiguous; rows of `dims[last]` elements.
fn for_each_row(
    dims: &[usize],
    src: &[usize],
    (r0, r1): (usize, usize),
    mut f: impl FnMut(usize, usize),
) {
    let r = dims.len();
    if r == 0 || dims.contains(&0) {
        if r == 0 && r0 == 0 && r1 > 0 {
            f(0, 0);
        }
        return;
    }
    let inner = dims[r - 1];
    // The odometer at row r0.
    let mut idx = [0usize; MAX_RANK];
    let mut off = 0usize;
    let mut rest = r0;
    for ax in (0..r - 1).rev() {
        idx[ax] = rest % dims[ax];
        rest /= dims[ax];
        off += idx[ax] * src[ax];
    }
    for row in r0..r1 {
        f(off, row * inner);
        for ax in (0..r - 1).rev() {
            idx[ax] += 1;
            off += src[ax];
            if idx[ax] < dims[ax] {
                break;
            }
            off -= src[ax] * dims[ax];
            idx[ax] = 0;
        }
    }
}

/// Runs `f(row range, out)` over `rows` rows of `inner` elements of `out` in parallel pieces;
/// `f` writes exactly the rows of its range, which start at `out[0]` of the slice it gets.
fn par_rows(
    out: &mut [f32],
    rows: usize,
    inner: usize,
    f: impl Fn((usize, usize), &mut [f32]) + Sync,
) {
    let parts = pieces(out.len()).min(rows.max(1));
    let base = SendPtr(out.as_mut_ptr());
    let len = out.len();
    par::par_for(parts, |p| {
        let (r0, r1) = (p * rows / parts, (p + 1) * rows / parts);
        let (a, b) = (r0 * inner, (r1 * inner).min(len));
        // SAFETY: piece p owns rows r0..r1 of `out`, disjoint from every other piece's.
        let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(a), b - a) };
        f((r0, r1), o);
    });
}

/// `out = x.permute(perm)` for a contiguous `x` of shape `dims`.
pub fn transpose(x: &[f32], dims: &[usize], perm: &[usize], out: &mut [f32]) -> bool {
    let r = dims.len();
    if r > MAX_RANK || perm.len() != r || x.len() != numel(dims) || out.len() != x.len() {
        return false;
    }
    let mut seen = [false; MAX_RANK];
    for &p in perm {
        if p >= r || seen[p] {
            return false;
        }
        seen[p] = true;
    }
    let mut xs = [0usize; MAX_RANK];
    strides_of(dims, &mut xs);
    let mut od = [0usize; MAX_RANK];
    let mut src = [0usize; MAX_RANK];
    for (i, &p) in perm.iter().enumerate() {
        od[i] = dims[p];
        src[i] = xs[p];
    }
    if r == 0 {
        out.copy_from_slice(x);
        return true;
    }
    let inner = od[r - 1];
    let step = src[r - 1];
    let rows = numel(&od[..r - 1]);
    if step == 1 {
        par_rows(out, rows, inner, |(r0, r1), o| {
            for_each_row(&od[..r], &src[..r], (r0, r1), |s, d| {
                let d = d - r0 * inner;
                o[d..d + inner].copy_from_slice(&x[s..s + inner]);
            });
        });
        return true;
    }
    // The last output axis walks the input with a stride: 2-D tiles, so both sides stay in
    // cache, when the previous output axis is the input's contiguous one (a plain matrix
    // transpose, the common case); a strided gather otherwise.
    if r >= 2 && src[r - 2] == 1 {
        let m_rows = od[r - 2];
        let outer = numel(&od[..r - 2]);
        const T: usize = 16;
        // Items: (matrix, block of T rows), all disjoint in `out`.
        let blocks = m_rows.div_ceil(T);
        let base = SendPtr(out.as_mut_ptr());
        let work = |item: usize| {
            let (o, i0) = (item / blocks, (item % blocks) * T);
            let i1 = (i0 + T).min(m_rows);
            // The matrix's source offset: its outer index through the outer strides.
            let mut off = 0;
            let mut rest = o;
            for ax in (0..r - 2).rev() {
                off += (rest % od[ax]) * src[ax];
                rest /= od[ax];
            }
            let at = (o * m_rows + i0) * inner;
            // SAFETY: rows i0..i1 of matrix o are this item's alone, inside `out`.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(at), (i1 - i0) * inner) };
            for j0 in (0..inner).step_by(T) {
                for i in i0..i1 {
                    for j in j0..(j0 + T).min(inner) {
                        dst[(i - i0) * inner + j] = x[off + i + j * step];
                    }
                }
            }
        };
        if out.len() < PAR_MIN {
            (0..outer * blocks).for_each(work);
        } else {
            par::par_for(outer * blocks, work);
        }
        return true;
    }
    par_rows(out, rows, inner, |(r0, r1), o| {
        for_each_row(&od[..r], &src[..r], (r0, r1), |s, d| {
            let d = d - r0 * inner;
            for (j, v) in o[d..d + inner].iter_mut().enumerate() {
                *v = x[s + j * step];
            }
        });
    });
    true
}

/// Concatenation along an axis: `parts` are contiguous tensors that agree on every axis but
/// the concatenated one; `outer` is the product of the axes before it and `chunks[i]` the
/// number of elements of part i per outer index (its axis length times the inner size).
pub fn concat(parts: &[&[f32]], chunks: &[usize], outer: usize, out: &mut [f32]) -> bool {
    let total: usize = chunks.iter().sum();
    if parts.len() != chunks.len()
        || out.len() != outer * total
        || parts.iter().zip(chunks).any(|(p, &c)| p.len() != outer * c)
    {
        return false;
    }
    let mut at = 0;
    for o in 0..outer {
        for (p, &c) in parts.iter().zip(chunks) {
            out[at..at + c].copy_from_slice(&p[o * c..(o + 1) * c]);
            at += c;
        }
    }
    true
}

/// The inverse of [`concat`]: piece i of every outer index of `x` goes to `outs[i]`.
pub fn split(x: &[f32], chunks: &[usize], outer: usize, outs: &mut [&mut [f32]]) -> bool {
    let total: usize = chunks.iter().sum();
    if outs.len() != chunks.len()
        || x.len() != outer * total
        || outs.iter().zip(chunks).any(|(p, &c)| p.len() != outer * c)
    {
        return false;
    }
    let mut at = 0;
    for o in 0..outer {
        for (p, &c) in outs.iter_mut().zip(chunks) {
            p[o * c..(o + 1) * c].copy_from_slice(&x[at..at + c]);
            at += c;
        }
    }
    true
}

/// numpy `take` along an axis: `x` is `[outer, dim, inner]` flattened, `indices` already in
/// `0..dim`; `out` is `[outer, indices.len(), inner]`.
pub fn gather(
    x: &[f32],
    (outer, dim, inner): (usize, usize, usize),
    indices: &[usize],
    out: &mut [f32],
) -> bool {
    if x.len() != outer * dim * inner
        || out.len() != outer * indices.len() * inner
        || indices.iter().any(|&i| i >= dim)
    {
        return false;
    }
    let mut at = 0;
    for o in 0..outer {
        for &i in indices {
            let s = (o * dim + i) * inner;
            out[at..at + inner].copy_from_slice(&x[s..s + inner]);
            at += inner;
        }
    }
    true
}

/// Elementwise arithmetic with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
}

impl BinOp {
    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
}

/// `o[j] = f(a[at + j], b[at + j])`, either operand possibly one scalar.
#[inline(always)]
fn flat(f: impl Fn(f32, f32) -> f32, a: &[f32], b: &[f32], at: usize, o: &mut [f32]) {
    let len = o.len();
    match (a.len() == 1, b.len() == 1) {
        (false, false) => {
            for ((o, &x), &y) in o.iter_mut().zip(&a[at..at + len]).zip(&b[at..at + len]) {
                *o = f(x, y);
            }
        }
        (false, true) => {
            let y = b[0];
            for (o, &x) in o.iter_mut().zip(&a[at..at + len]) {
                *o = f(x, y);
            }
        }
        _ => {
            let x = a[0];
            for (o, &y) in o.iter_mut().zip(&b[at..at + len]) {
                *o = f(x, y);
            }
        }
    }
}

/// One output row of the broadcasting path: `dst[j] = f(a[oa + j·ia], b[ob + j·ib])` with
/// unit or zero steps.
#[inline(always)]
fn row(
    f: impl Fn(f32, f32) -> f32,
    (a, oa, ia): (&[f32], usize, usize),
    (b, ob, ib): (&[f32], usize, usize),
    dst: &mut [f32],
) {
    let len = dst.len();
    match (ia, ib) {
        (1, 1) => {
            for ((o, &x), &y) in dst.iter_mut().zip(&a[oa..oa + len]).zip(&b[ob..ob + len]) {
                *o = f(x, y);
            }
        }
        (1, 0) => {
            let y = b[ob];
            for (o, &x) in dst.iter_mut().zip(&a[oa..oa + len]) {
                *o = f(x, y);
            }
        }
        (0, 1) => {
            let x = a[oa];
            for (o, &y) in dst.iter_mut().zip(&b[ob..ob + len]) {
                *o = f(x, y);
            }
        }
        _ => dst.fill(f(a[oa], b[ob])),
    }
}

/// Broadcast strides of an operand of shape `d` against the output shape `od` (aligned on
/// the right); `None` when it does not broadcast.
fn broadcast_strides(d: &[usize], od: &[usize], out: &mut [usize; MAX_RANK]) -> Option<()> {
    let r = od.len();
    if d.len() > r {
        return None;
    }
    let lead = r - d.len();
    let mut s = 1;
    for i in (0..r).rev() {
        let dim = if i < lead { 1 } else { d[i - lead] };
        if dim == od[i] && dim != 1 {
            out[i] = s;
        } else if dim == 1 {
            out[i] = 0;
        } else {
            return None;
        }
        s *= dim;
    }
    Some(())
}

/// `out = act(a ∘ b)`, `a` of shape `ad` and `b` of shape `bd` broadcast to `od`.
#[allow(clippy::too_many_arguments)]
pub fn binary(
    op: BinOp,
    (a, ad): (&[f32], &[usize]),
    (b, bd): (&[f32], &[usize]),
    (out, od): (&mut [f32], &[usize]),
    activation: Option<Activation>,
) -> bool {
    let r = od.len();
    if r > MAX_RANK || a.len() != numel(ad) || b.len() != numel(bd) || out.len() != numel(od) {
        return false;
    }
    let (mut sa, mut sb) = ([0usize; MAX_RANK], [0usize; MAX_RANK]);
    if broadcast_strides(ad, od, &mut sa).is_none() || broadcast_strides(bd, od, &mut sb).is_none()
    {
        return false;
    }
    let n = out.len();
    let chunk = n.div_ceil(pieces(n)).max(1);
    if a.len() == n && (b.len() == n || b.len() == 1) || a.len() == 1 && b.len() == n {
        // Elementwise or against one scalar: flat pieces in parallel, the operation chosen
        // outside the loops (a `match` per element kept them scalar: 1 cycle per value).
        par::par_chunks_mut(out, chunk, |i, o| {
            let at = i * chunk;
            match op {
                BinOp::Add => flat(|x, y| x + y, a, b, at, o),
                BinOp::Sub => flat(|x, y| x - y, a, b, at, o),
                BinOp::Mul => flat(|x, y| x * y, a, b, at, o),
                BinOp::Div => flat(|x, y| x / y, a, b, at, o),
            }
            apply_activation(activation, o);
        });
        return true;
    } else if r == 0 {
        out[0] = op.apply(a[0], b[0]);
    } else {
        let inner = od[r - 1];
        let (ia, ib) = (sa[r - 1], sb[r - 1]);
        // One odometer for both operands: offsets of a and b per output row.
        let rows = numel(&od[..r - 1]);
        let mut idx = [0usize; MAX_RANK];
        let (mut oa, mut ob) = (0usize, 0usize);
        for row in 0..rows {
            let dst = &mut out[row * inner..(row + 1) * inner];
            let (pa, pb) = ((a, oa, ia), (b, ob, ib));
            match op {
                BinOp::Add => self::row(|x, y| x + y, pa, pb, dst),
                BinOp::Sub => self::row(|x, y| x - y, pa, pb, dst),
                BinOp::Mul => self::row(|x, y| x * y, pa, pb, dst),
                BinOp::Div => self::row(|x, y| x / y, pa, pb, dst),
            }
            for ax in (0..r - 1).rev() {
                idx[ax] += 1;
                oa += sa[ax];
                ob += sb[ax];
                if idx[ax] < od[ax] {
                    break;
                }
                oa -= sa[ax] * od[ax];
                ob -= sb[ax] * od[ax];
                idx[ax] = 0;
            }
        }
    }
    apply_activation(activation, out);
    true
}

/// Mean (`max == false`) or maximum of each of `out.len()` planes of `plane` elements.
pub fn global_pool(x: &[f32], plane: usize, max: bool, out: &mut [f32]) -> bool {
    if x.len() != out.len() * plane || plane == 0 {
        return false;
    }
    let fold = |out: &mut [f32], x: &[f32]| {
        for (o, p) in out.iter_mut().zip(x.chunks_exact(plane)) {
            #[cfg(target_arch = "x86_64")]
            if super::gemm::Isa::detect() == super::gemm::Isa::Avx512 {
                // SAFETY: detect() saw AVX-512F on this CPU.
                let v = unsafe { fold_avx512(p, max) };
                *o = if max { v } else { v / plane as f32 };
                continue;
            }
            *o = if max {
                lanes(p, f32::NEG_INFINITY, f32::max)
            } else {
                lanes(p, 0.0, |a, b| a + b) / plane as f32
            };
        }
    };
    // Channels across the threads when there is enough to read (MobileNetV2's 1280 × 7 × 7
    // is 250 KB).
    let threads = super::par::current_threads().max(1);
    if threads > 1 && x.len() >= 1 << 15 {
        let chunk = out.len().div_ceil(2 * threads);
        super::par::par_chunks_mut(out, chunk, |i, o| {
            fold(o, &x[i * chunk * plane..(i * chunk + o.len()) * plane])
        });
    } else {
        fold(out, x);
    }
    true
}

/// The max or the sum of `p` in one 16-lane register, then across its lanes: the plain
/// loop's scalar tree of 16 lanes per channel took 16 µs for MobileNetV2's 1280 × 7 × 7.
/// NaN is dropped from a max as `f32::max` drops it.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fold_avx512(p: &[f32], max: bool) -> f32 {
    use std::arch::x86_64::*;
    let init = if max { f32::NEG_INFINITY } else { 0.0 };
    let mut acc = _mm512_set1_ps(init);
    let chunks = p.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        let v = _mm512_loadu_ps(c.as_ptr());
        // max_ps(v, acc) gives acc where v is NaN: the NaN is dropped.
        acc = if max {
            _mm512_max_ps(v, acc)
        } else {
            _mm512_add_ps(acc, v)
        };
    }
    if !tail.is_empty() {
        let m = ((1u32 << tail.len()) - 1) as __mmask16;
        let v = _mm512_mask_loadu_ps(_mm512_set1_ps(init), m, tail.as_ptr());
        acc = if max {
            _mm512_max_ps(v, acc)
        } else {
            _mm512_add_ps(acc, v)
        };
    }
    if max {
        _mm512_reduce_max_ps(acc)
    } else {
        _mm512_reduce_add_ps(acc)
    }
}

/// `p` folded with `f` in 16 independent lanes, then the lanes folded: a single running
/// sum waits on each add's latency (a 64 × 64 plane took 2 µs per channel). For max the order
/// does not matter (`f32::max` drops NaN either way); for a sum it is a different rounding
/// order than left to right, no less accurate.
#[inline(always)]
fn lanes(p: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = p.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = f(*a, v);
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] = f(acc[i], acc[i + w]);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{below, rand};
    use candle_core::{Device, Tensor};

    fn t(v: &[f32], d: &[usize]) -> Tensor {
        Tensor::from_slice(v, d, &Device::Cpu).unwrap()
    }

    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Random ranks, shapes and permutations against candle's permute.
    #[test]
    fn transpose_matches_candle_permute() {
        let mut pick = below(7);
        for case in 0..200 {
            let r = 1 + pick(5);
            let dims: Vec<usize> = (0..r)
                .map(|_| 1 + pick(if r > 3 { 6 } else { 40 }))
                .collect();
            let mut perm: Vec<usize> = (0..r).collect();
            for i in (1..r).rev() {
                perm.swap(i, pick(i + 1));
            }
            let x = rand(numel(&dims), case);
            let want = flat(&t(&x, &dims).permute(perm.as_slice()).unwrap());
            let mut got = vec![f32::NAN; x.len()];
            assert!(transpose(&x, &dims, &perm, &mut got));
            assert_eq!(got, want, "dims {dims:?} perm {perm:?}");
        }
        let mut out = vec![0.0; 6];
        assert!(!transpose(&[0.0; 6], &[2, 3], &[0, 0], &mut out));
        assert!(!transpose(&[0.0; 5], &[2, 3], &[1, 0], &mut out));
    }

    #[test]
    fn binary_broadcasts_like_candle() {
        let mut pick = below(11);
        for case in 0..300u64 {
            let r = 1 + pick(4);
            let od: Vec<usize> = (0..r).map(|_| 1 + pick(7)).collect();
            // Each operand: a suffix of the output's axes, some of them 1.
            let operand = |pick: &mut dyn FnMut(usize) -> usize, drop: usize| -> Vec<usize> {
                od[drop.min(r)..]
                    .iter()
                    .map(|&d| if pick(3) == 0 { 1 } else { d })
                    .collect()
            };
            let (da, db) = (pick(2), pick(r + 1));
            let ad = operand(&mut pick, da);
            let bd = operand(&mut pick, db);
            let (a, b) = (rand(numel(&ad), case), rand(numel(&bd), case + 1000));
            let (ta, tb) = (t(&a, &ad), t(&b, &bd));
            // The broadcast output shape.
            let want_t = ta.broadcast_add(&tb).unwrap();
            let od = want_t.dims().to_vec();
            for (op, want) in [
                (BinOp::Add, want_t),
                (BinOp::Sub, ta.broadcast_sub(&tb).unwrap()),
                (BinOp::Mul, ta.broadcast_mul(&tb).unwrap()),
                (BinOp::Div, ta.broadcast_div(&tb).unwrap()),
            ] {
                let mut got = vec![f32::NAN; numel(&od)];
                assert!(binary(op, (&a, &ad), (&b, &bd), (&mut got, &od), None));
                assert_eq!(got, flat(&want), "{op:?} {ad:?} {bd:?} -> {od:?}");
            }
        }
        let mut out = vec![0.0; 6];
        assert!(!binary(
            BinOp::Add,
            (&[0.0; 6], &[2, 3]),
            (&[0.0; 2], &[2]),
            (&mut out, &[2, 3]),
            None
        ));
    }

    #[test]
    fn concat_split_gather_and_pool() {
        let dev = Device::Cpu;
        let (a, b) = (rand(2 * 3 * 4, 1), rand(2 * 5 * 4, 2));
        let want = Tensor::cat(&[t(&a, &[2, 3, 4]), t(&b, &[2, 5, 4])], 1).unwrap();
        let mut got = vec![f32::NAN; 2 * 8 * 4];
        assert!(concat(&[&a, &b], &[12, 20], 2, &mut got));
        assert_eq!(got, flat(&want));
        let (mut p, mut q) = (vec![f32::NAN; a.len()], vec![f32::NAN; b.len()]);
        assert!(split(&got, &[12, 20], 2, &mut [&mut p, &mut q]));
        assert_eq!((p, q), (a.clone(), b.clone()));

        let x = rand(2 * 5 * 3, 3);
        let idx = Tensor::new(&[4u32, 0, 4], &dev).unwrap();
        let want = t(&x, &[2, 5, 3]).index_select(&idx, 1).unwrap();
        let mut got = vec![f32::NAN; 2 * 3 * 3];
        assert!(gather(&x, (2, 5, 3), &[4, 0, 4], &mut got));
        assert_eq!(got, flat(&want));
        assert!(!gather(&x, (2, 5, 3), &[5], &mut got[..6]));

        let x = rand(2 * 3 * 7 * 5, 4);
        let xt = t(&x, &[2, 3, 7, 5]);
        let mut got = vec![f32::NAN; 6];
        assert!(global_pool(&x, 35, false, &mut got));
        let want = flat(&xt.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(global_pool(&x, 35, true, &mut got));
        let want = flat(&xt.max_keepdim(3).unwrap().max_keepdim(2).unwrap());
        assert_eq!(got, want);
        // Enough channels for the threads, planes of whole vectors and a tail, and a NaN
        // (dropped from the max, kept by the mean).
        let pool = std::sync::Arc::new(crate::kernels::par::SpinPool::new(2).unwrap());
        for plane in [16, 49] {
            let mut x = rand(1300 * plane, 5);
            x[3 * plane + 7] = f32::NAN;
            let xt = t(&x, &[1300, plane]);
            let mut got = vec![f32::NAN; 1300];
            pool.install(|| assert!(global_pool(&x, plane, false, &mut got)));
            let want = flat(&xt.mean_keepdim(1).unwrap());
            for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-6 || (c == 3 && g.is_nan()),
                    "channel {c}: {g} vs {w}"
                );
            }
            pool.install(|| assert!(global_pool(&x, plane, true, &mut got)));
            for (c, (g, p)) in got.iter().zip(x.chunks_exact(plane)).enumerate() {
                let w = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(*g, w, "channel {c}");
            }
        }
    }
}
