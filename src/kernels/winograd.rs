//! 3 × 3, stride-1 convolution by Winograd's minimal filtering (Lavin & Gray 2016), F(2×2, 3×3)
//! or F(4×4, 3×3): a 2 × 2 output tile costs 16 multiplications per input channel instead of
//! 36 (2.25× less GEMM work), a 4 × 4 tile 36 instead of 144 (4×). The weights are transformed
//! (`U = G g Gᵀ`, in f64) and packed once at load into 16 or 36 matrices; per frame the input
//! tiles are transformed (`V = Bᵀ d B`), the products `M = U · V` run on the packed GEMM, and
//! the output transform (`Y = Aᵀ M A`) applies bias, residual and activation as it writes.
//! F(2×2)'s transforms use only ±1 and ½ (a few f32 ulps from direct convolution); F(4×4)'s
//! reach 8 (measured within 1e-5 of direct, relative to the output's largest value).

use std::cell::RefCell;

use super::par::{self, par_for, SendPtr};
use super::scratch;

use super::act::apply_activation;
#[cfg(target_arch = "x86_64")]
use super::gemm::Isa;
use super::gemm::{gemm, BSource, Epilogue, Layout, PackedA, KC};
use crate::graph::Activation;

/// Work below this many multiply-adds per frame runs serially: rayon's fork costs more.
const PAR_MIN: usize = 1 << 15;

thread_local! {
    /// Transformed input and products (V, M) of the calling thread, reused across frames.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A 3 × 3 stride-1 convolution prepared for F(2×2, 3×3) or F(4×4, 3×3).
#[derive(Debug, Clone)]
pub struct WinogradConv {
    /// Output tile side: 2 for F(2×2, 3×3), 4 for F(4×4, 3×3).
    tile: usize,
    /// `U_ξ` (`cout × cin`) for the `(tile + 2)²` tile positions ξ.
    u: Vec<PackedA>,
    bias: Option<Vec<f32>>,
    cin: usize,
    cout: usize,
    pad_begin: (usize, usize),
    pad_end: (usize, usize),
}

impl WinogradConv {
    /// Transforms and packs `weight` (`[cout, cin, 3, 3]`) for F(2×2, 3×3). `pads` are
    /// begins then ends.
    pub fn new(
        weight: &[f32],
        cout: usize,
        cin: usize,
        bias: Option<&[f32]>,
        pads: &[usize; 4],
    ) -> Option<WinogradConv> {
        Self::with_tile(weight, cout, cin, bias, pads, 2)
    }

    /// [`WinogradConv::new`] for output tiles of `tile` × `tile`: 2, or 4 for F(4×4, 3×3),
    /// which needs 36 multiplications per tile of 16 outputs (4× fewer than direct, against
    /// 2.25× for F(2×2)) at the price of larger transforms and rounding (coefficients up to
    /// 8; measured within 1e-4 of the direct result, relative to its largest value).
    pub fn with_tile(
        weight: &[f32],
        cout: usize,
        cin: usize,
        bias: Option<&[f32]>,
        pads: &[usize; 4],
        tile: usize,
    ) -> Option<WinogradConv> {
        if weight.len() != cout * cin * 9
            || bias.is_some_and(|b| b.len() != cout)
            || !(tile == 2 || tile == 4)
        {
            return None;
        }
        // G for each tile size (rows: points 0, ±1, ±½ for F(2); 0, ±1, ±2, ∞ for F(4)).
        const G2: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        const G4: [[f64; 3]; 6] = [
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        let gm: &[[f64; 3]] = if tile == 2 { &G2 } else { &G4 };
        let alpha = gm.len();
        // U = G g Gᵀ (α × α per channel pair, in f64), built and packed one position ξ at a
        // time so load holds one unpacked cout × cin matrix, not α².
        let u_at = |g: &[f32], i: usize, j: usize| -> f32 {
            let mut acc = 0f64;
            for a in 0..3 {
                for b in 0..3 {
                    acc += gm[i][a] * f64::from(g[a * 3 + b]) * gm[j][b];
                }
            }
            acc as f32
        };
        let mut plane = vec![0f32; cout * cin];
        let u = (0..alpha * alpha)
            .map(|xi| {
                for (dst, g) in plane.iter_mut().zip(weight.chunks_exact(9)) {
                    *dst = u_at(g, xi / alpha, xi % alpha);
                }
                PackedA::pack(&plane, cout, cin, cin, 1)
            })
            .collect();
        Some(WinogradConv {
            tile,
            u,
            bias: bias.map(<[f32]>::to_vec),
            cin,
            cout,
            pad_begin: (pads[0], pads[1]),
            pad_end: (pads[2], pads[3]),
        })
    }

    /// Output tile side (2 or 4).
    pub fn tile(&self) -> usize {
        self.tile
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
        let nr = self.u.first().map_or(16, |u| u.isa().nr());
        let pad = (self.pad_begin.0 as isize, self.pad_begin.1 as isize);
        let geo = Geometry::new((h, w), (oh, ow), pad, nr, self.tile);
        let xis = self.u.len();
        // One pass over the whole image, each phase split between the threads on its own
        // axis (input by channel, products by ξ, output by channel). Bands of tile rows through
        // all three phases, one a thread, kept V and M on the core that made them, but each
        // thread then read all of U: with the pool's shared counters on lines of their own,
        // ResNet-18 node sums on 2 threads were 1–5 % lower split by phase (seven runs each,
        // the host's vCPUs on one core complex) and 2–7 % lower (two runs, on two). Banding one
        // thread's image to keep V and M in cache measured slower at every band size (the 16
        // GEMMs lose more on short rows than the cache saves).
        let par_ok = self.cin * self.cout * geo.g >= PAR_MIN;
        for img in 0..n {
            let x = &x[img * self.cin * h * w..(img + 1) * self.cin * h * w];
            let o = &mut out[img * self.cout * plane..(img + 1) * self.cout * plane];
            let r = residual.map(|r| &r[img * self.cout * plane..(img + 1) * self.cout * plane]);
            let target = Target {
                out: SendPtr(o.as_mut_ptr()),
                plane,
                residual: r,
                activation,
            };
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let (v, m) = &mut *scratch;
                // Grow-only, and every element read is written first, or lies in a tile
                // column whose result is dropped (finite either way: the buffers start
                // zeroed): no per-frame allocation or page faults after the first frame.
                if v.len() < xis * self.cin * geo.gp {
                    v.resize(xis * self.cin * geo.gp, 0.0);
                }
                if m.len() < xis * self.cout * geo.gp {
                    m.resize(xis * self.cout * geo.gp, 0.0);
                }
                self.run_image(x, &geo, &target, v, m, par_ok);
            });
        }
        true
    }

    /// One image (`geo` its grid): input transform, products, output transform.
    fn run_image(
        &self,
        x: &[f32],
        geo: &Geometry,
        target: &Target,
        v: &mut [f32],
        m: &mut [f32],
        par: bool,
    ) {
        let (gp, g) = (geo.gp, geo.g);
        input_transform(x, self.cin, geo, v, par);
        let v: &[f32] = v;
        let mptr = SendPtr(m.as_mut_ptr());
        let product = |xi_pos: usize| {
            let b = Panels {
                data: &v[xi_pos * self.cin * gp..(xi_pos + 1) * self.cin * gp],
                k: self.cin,
                n: g,
                gp,
                nr: geo.nr,
            };
            // SAFETY: ξ's cout × gp block of M lies inside M (sized for all of them) and
            // is written by this call only.
            let c = unsafe {
                std::slice::from_raw_parts_mut(
                    mptr.get().add(xi_pos * self.cout * gp),
                    self.cout * gp,
                )
            };
            gemm(
                &self.u[xi_pos],
                &b,
                g,
                c,
                Layout { rs: gp, cs: 1 },
                &Epilogue::default(),
            );
        };
        // The 16 or 36 products are independent: threads take whole products, each on one
        // thread, rather than splitting every small product (64 × 64 × 224 for a 56 × 56
        // layer) and meeting after each.
        if par && self.u.len() >= 4 * par::current_threads() {
            par_for(self.u.len(), product);
        } else {
            (0..self.u.len()).for_each(product);
        }
        let m: &[f32] = m;
        self.output_transform(m, geo, target, par);
    }

    fn output_transform(&self, m: &[f32], g: &Geometry, target: &Target, par: bool) {
        let cout = self.cout;
        let rows = g.oh * g.ow;
        let one = |co: usize| {
            let at = co * target.plane;
            // SAFETY: channel co's plane lies inside the image's output and is written by this
            // call only (calls write disjoint channels).
            let o = unsafe { std::slice::from_raw_parts_mut(target.out.get().add(at), rows) };
            let residual = target.residual.map(|r| &r[at..at + rows]);
            #[cfg(target_arch = "x86_64")]
            if Isa::detect() == Isa::Avx512 {
                let epi = RowEpilogue {
                    bias: self.bias.as_ref().map_or(0.0, |b| b[co]),
                    residual,
                    activation: target.activation,
                };
                // SAFETY: detect() saw AVX-512F.
                unsafe { output_fused_avx512(m, g, cout, co, &epi, o) };
                return;
            }
            output_channel(m, g, cout, co, o);
            if let Some(b) = &self.bias {
                let bc = b[co];
                o.iter_mut().for_each(|v| *v += bc);
            }
            if let Some(r) = residual {
                o.iter_mut().zip(r).for_each(|(v, x)| *v += x);
            }
            apply_activation(target.activation, o);
        };
        if par {
            par_for(cout, one);
        } else {
            (0..cout).for_each(one);
        }
    }
}

/// Where one image's output goes: its channel planes, with their residual and activation.
struct Target<'a> {
    /// The image's `cout` planes of `plane` values; calls for different channels write
    /// disjoint planes.
    out: SendPtr<f32>,
    plane: usize,
    /// The image's whole residual, laid out like the output.
    residual: Option<&'a [f32]>,
    activation: Option<Activation>,
}

/// The tile grid of one image. Tile `(ty, tx)` covers output rows `2ty, 2ty + 1` and columns
/// `2tx, 2tx + 1`; each tile row carries one extra tile (`tx = tw`) whose result is dropped,
/// so that along the flat index `g = ty · (tw + 1) + tx` every operand of the transforms is
/// one contiguous run: they vectorise over whole 16-tile chunks with no row ends (a row of
/// 28 tiles left 12 scalar iterations per loop). The extra column costs 1 / (tw + 1) more
/// GEMM columns (3.4 % at 56 × 56, 12.5 % at 14 × 14).
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    th: usize,
    tw: usize,
    /// Tiles per grid row, `tw + 1`.
    gw: usize,
    /// Tiles in the grid (the GEMM's columns), `th · gw`.
    g: usize,
    /// `g` rounded up to whole panels: the row length of V's and M's matrices.
    gp: usize,
    /// The micro-kernel's panel width (a multiple of 16).
    nr: usize,
    pad: (isize, isize),
    /// Output tile side.
    m: usize,
}

impl Geometry {
    fn new(
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        pad: (isize, isize),
        nr: usize,
        m: usize,
    ) -> Self {
        debug_assert!(
            nr.is_multiple_of(16),
            "16-tile chunks must stay within one panel"
        );
        let (th, tw) = (oh.div_ceil(m), ow.div_ceil(m));
        let gw = tw + 1;
        let g = th * gw;
        Geometry {
            h,
            w,
            oh,
            ow,
            th,
            tw,
            gw,
            g,
            gp: g.div_ceil(nr) * nr,
            nr,
            pad,
            m,
        }
    }

    /// Where `V[ξ][ci][g]` lies: each ξ's `cin × gp` matrix is stored already packed for
    /// the GEMM (per `KC` block of rows, per panel of `nr` tiles, `kc × nr` values), so the
    /// products read it in place instead of copying it into panels first.
    #[inline(always)]
    fn v_at(&self, cin: usize, xi: usize, ci: usize, g: usize) -> usize {
        xi * cin * self.gp + panel_index(cin, self.gp, self.nr, ci, g)
    }
}

/// Where element `(k, col)` of a `k × gp` matrix lies when packed like the GEMM's right
/// operand: per `KC` block of rows, per panel of `nr` columns, `kc × nr` values.
#[inline(always)]
fn panel_index(k: usize, gp: usize, nr: usize, row: usize, col: usize) -> usize {
    let k0 = row / KC * KC;
    let kc = KC.min(k - k0);
    k0 * gp + ((col / nr) * kc + row - k0) * nr + col % nr
}

/// One ξ's transformed input as the GEMM's right operand, laid out by [`Geometry::v_at`].
struct Panels<'a> {
    data: &'a [f32],
    k: usize,
    n: usize,
    gp: usize,
    nr: usize,
}

impl BSource for Panels<'_> {
    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        if let Some(src) = self.packed(k0, kc, n0, nc, nr) {
            dst[..src.len()].copy_from_slice(src);
            return;
        }
        // Another panel width (not asked by our own GEMM): element by element.
        for p in 0..nc.div_ceil(nr) {
            for kk in 0..kc {
                for j in 0..nr {
                    let col = n0 + p * nr + j;
                    dst[(p * kc + kk) * nr + j] = if p * nr + j < nc && col < self.n {
                        self.data[panel_index(self.k, self.gp, self.nr, k0 + kk, col)]
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    fn packed(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize) -> Option<&[f32]> {
        // The driver asks for KC blocks of rows and whole panels of our width.
        if nr != self.nr || !n0.is_multiple_of(nr) || kc != KC.min(self.k - k0) {
            return None;
        }
        let block = k0 * self.gp;
        let (p0, np) = (n0 / nr, nc.div_ceil(nr));
        self.data
            .get(block + p0 * kc * nr..block + (p0 + np) * kc * nr)
    }
}

/// `V[ξ][ci][g] = (Bᵀ d B)[ξ]` for every channel and 4 × 4 input tile `d` (stride 2).
fn input_transform(x: &[f32], cin: usize, g: &Geometry, v: &mut [f32], par: bool) {
    let vptr = SendPtr(v.as_mut_ptr());
    let one = |ci: usize| {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        // SAFETY: channel ci's cells of V are written by this task only, and lie inside V.
        unsafe { dispatch_input(plane, g, ci, cin, vptr.get()) }
    };
    if par {
        par_for(cin, one);
    } else {
        (0..cin).for_each(one);
    }
}

/// # Safety
/// `v` must address the whole of V; no other thread may write channel `ci`'s cells.
unsafe fn dispatch_input(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        Isa::Avx512 => return input_avx512(plane, g, ci, cin, v),
        Isa::Avx2 => return input_avx2(plane, g, ci, cin, v),
        Isa::Portable => {}
    }
    input_any(plane, g, ci, cin, v)
}

/// # Safety
/// As for [`dispatch_input`].
#[inline(always)]
unsafe fn input_any(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    if g.m == 4 {
        input_channel4(plane, g, ci, cin, v)
    } else {
        input_channel(plane, g, ci, cin, v)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_avx512(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    input_any(plane, g, ci, cin, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_avx2(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    input_any(plane, g, ci, cin, v)
}

/// Row `y` of the zero-padded plane (`y` counts from the top padding) into `row`:
/// `row[j] = plane[y − pad.0][j − pad.1]` where that lies inside the plane, 0 elsewhere.
#[inline(always)]
fn padded_row(plane: &[f32], g: &Geometry, y: isize, row: &mut [f32]) {
    let iy = y - g.pad.0;
    row.fill(0.0);
    if iy >= 0 && (iy as usize) < g.h {
        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        let lo = g.pad.1.max(0) as usize;
        let n = g.w.min(row.len().saturating_sub(lo));
        row[lo..lo + n].copy_from_slice(&src[..n]);
    }
}

type V16 = [f32; 16];

// Plain loops rather than `array::from_fn`: closures are compiled without the caller's
// target features and did not inline (a fifth of the time went to the calls).
#[inline(always)]
fn add16(a: &V16, b: &V16) -> V16 {
    let mut r = [0f32; 16];
    for i in 0..16 {
        r[i] = a[i] + b[i];
    }
    r
}

#[inline(always)]
fn sub16(a: &V16, b: &V16) -> V16 {
    let mut r = [0f32; 16];
    for i in 0..16 {
        r[i] = a[i] - b[i];
    }
    r
}

/// 16 values from `s` at `at` (callers keep `at + 16` inside `s`).
#[inline(always)]
fn ld16(s: &[f32], at: usize) -> V16 {
    let mut v = [0f32; 16];
    v.copy_from_slice(&s[at..at + 16]);
    v
}

/// One channel's input transform. The padded rows of the channel are first split into even
/// and odd columns and laid out along the tile grid: `E[r][g] = padded[2ty + r][2tx]`,
/// `O[r][g] = padded[2ty + r][2tx + 1]` (r < 4), so tile g's 4 × 4 input is `E[r][g],
/// O[r][g], E[r][g + 1], O[r][g + 1]`. Then each chunk of 16 tiles is the row transform
/// (d₀ − d₂, d₁ + d₂, d₂ − d₁, d₁ − d₃) and the column transform on 16-lane arrays, stored
/// as 16 runs of V.
///
/// # Safety
/// As for [`dispatch_input`].
#[inline(always)]
unsafe fn input_channel(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    // 16 + 1 values of slack after each array: the last chunk reads up to g + 16.
    let len = g.g + 32;
    let width = 2 * g.gw;
    // Every part is written before it is read (the slack is zeroed below).
    let mut buf = scratch::take(8 * len + width);
    let (eo, row) = buf.split_at_mut(8 * len);
    let split = phases_from_plane();
    for ty in 0..g.th {
        for r in 0..4 {
            if split {
                #[cfg(target_arch = "x86_64")]
                phases_avx512::<2>(
                    plane,
                    g,
                    (2 * ty + r) as isize,
                    &mut eo[2 * r * len..(2 * r + 2) * len],
                    len,
                    ty * g.gw,
                );
                continue;
            }
            padded_row(plane, g, (2 * ty + r) as isize, row);
            let (e, o) = eo[2 * r * len..(2 * r + 2) * len].split_at_mut(len);
            let at = ty * g.gw;
            for ((e, o), pair) in e[at..at + g.gw]
                .iter_mut()
                .zip(&mut o[at..at + g.gw])
                .zip(row.chunks_exact(2))
            {
                *e = pair[0];
                *o = pair[1];
            }
        }
    }
    if split {
        #[cfg(target_arch = "x86_64")]
        zero_slack_avx512(eo, 8, len, g.g);
    } else {
        for r in 0..8 {
            eo[r * len + g.g..(r + 1) * len].fill(0.0);
        }
    }
    let arr = |i: usize| &eo[i * len..(i + 1) * len];
    let (e, o) = (
        [arr(0), arr(2), arr(4), arr(6)],
        [arr(1), arr(3), arr(5), arr(7)],
    );
    // Out of the loop: a fresh zeroed array per chunk was a memset call per chunk.
    let mut h = [[[0f32; 16]; 4]; 4];
    for c in (0..g.g).step_by(16) {
        // Row transform of input row r of the 16 tiles: h[r][col].
        for (hr, (er, or)) in h.iter_mut().zip(e.iter().zip(&o)) {
            let (e0, e1) = (ld16(er, c), ld16(er, c + 1));
            let (o0, o1) = (ld16(or, c), ld16(or, c + 1));
            *hr = [
                sub16(&e0, &e1),
                add16(&o0, &e1),
                sub16(&e1, &o0),
                sub16(&o0, &o1),
            ];
        }
        #[allow(clippy::needless_range_loop)] // col picks one of four columns of four rows
        for col in 0..4 {
            let vals = [
                sub16(&h[0][col], &h[2][col]),
                add16(&h[1][col], &h[2][col]),
                sub16(&h[2][col], &h[1][col]),
                sub16(&h[1][col], &h[3][col]),
            ];
            for (i, val) in vals.iter().enumerate() {
                // SAFETY: 16 cells of (ξ, ci) within one panel (c is a multiple of 16 and
                // the panel width of 16), inside V's gp columns; owned by this task.
                let dst = v.add(g.v_at(cin, i * 4 + col, ci, c));
                std::ptr::copy_nonoverlapping(val.as_ptr(), dst, 16);
            }
        }
    }
    scratch::give(buf);
}

/// What the output transform adds to one output channel as it writes its rows.
#[cfg(target_arch = "x86_64")]
struct RowEpilogue<'a> {
    bias: f32,
    /// The channel's plane of the residual.
    residual: Option<&'a [f32]>,
    activation: Option<Activation>,
}

/// [`output_channel`] followed by the channel's bias, residual and activation, with the rows
/// written by AVX-512 permutes (the phase interleave was a scalar store per output) and the
/// epilogue applied in registers on the way (three more passes over the plane before).
/// Activations other than ReLU and Clip run over each finished row.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_fused_avx512(
    m: &[f32],
    g: &Geometry,
    cout: usize,
    co: usize,
    epi: &RowEpilogue,
    o: &mut [f32],
) {
    // The tile is 2 or 4 (`with_tile` refuses the rest).
    let p = g.m;
    let gp = g.gp;
    let mut buf = scratch::take(p * p * gp);
    if p == 4 {
        transform4(m, g, cout, co, &mut buf);
    } else {
        transform2(m, g, cout, co, &mut buf);
    }
    for ty in 0..g.th {
        for i in 0..p {
            let yr = p * ty + i;
            if yr >= g.oh {
                continue;
            }
            let at = ty * g.gw;
            let row = &mut o[yr * g.ow..(yr + 1) * g.ow];
            let res = epi.residual.map(|r| &r[yr * g.ow..(yr + 1) * g.ow]);
            let phases = &buf[i * p * gp + at..];
            if p == 4 {
                interleave_row_avx512::<4>(phases, gp, g.tw, epi, res, row);
            } else {
                interleave_row_avx512::<2>(phases, gp, g.tw, epi, res, row);
            }
        }
    }
    scratch::give(buf);
}

/// Output row `row[P·t + k] = phases[k · gp + t]` (t < tiles) with the epilogue applied.
///
/// # Safety
/// The CPU must have AVX-512F; `phases` holds `(P − 1) · gp + tiles` values and
/// `row.len() ≤ P · tiles`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_row_avx512<const P: usize>(
    phases: &[f32],
    gp: usize,
    tiles: usize,
    epi: &RowEpilogue,
    res: Option<&[f32]>,
    row: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(phases.len() >= (P - 1) * gp + tiles && row.len() <= P * tiles);
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let (fused_relu, clip) = match epi.activation {
        Some(Activation::Relu) => (true, None),
        Some(Activation::Clip { min, max }) => (
            false,
            Some((
                _mm512_set1_ps(min.unwrap_or(f32::NEG_INFINITY)),
                _mm512_set1_ps(max.unwrap_or(f32::INFINITY)),
            )),
        ),
        _ => (false, None),
    };
    let bias = _mm512_set1_ps(epi.bias);
    let zero = _mm512_setzero_ps();
    let (src, dst, n) = (phases.as_ptr(), row.as_mut_ptr(), row.len());
    let mut t = 0;
    while t < tiles {
        let lm = mask(tiles - t);
        let ld = |k: usize| _mm512_maskz_loadu_ps(lm, src.add(k * gp + t));
        let out = if P == 4 {
            let (q0, q1, q2, q3) = (ld(0), ld(1), ld(2), ld(3));
            let (el, eh) = (
                _mm512_permutex2var_ps(q0, lo, q2),
                _mm512_permutex2var_ps(q0, hi, q2),
            );
            let (ol, oh) = (
                _mm512_permutex2var_ps(q1, lo, q3),
                _mm512_permutex2var_ps(q1, hi, q3),
            );
            [
                _mm512_permutex2var_ps(el, lo, ol),
                _mm512_permutex2var_ps(el, hi, ol),
                _mm512_permutex2var_ps(eh, lo, oh),
                _mm512_permutex2var_ps(eh, hi, oh),
            ]
        } else {
            let (q0, q1) = (ld(0), ld(1));
            let v = [
                _mm512_permutex2var_ps(q0, lo, q1),
                _mm512_permutex2var_ps(q0, hi, q1),
            ];
            [v[0], v[1], v[0], v[1]]
        };
        for (j, mut v) in out.into_iter().take(P).enumerate() {
            let col = P * t + 16 * j;
            if col >= n {
                break;
            }
            let sm = mask(n - col);
            v = _mm512_add_ps(v, bias);
            if let Some(r) = res {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(sm, r.as_ptr().add(col)));
            }
            // The value as the second operand: a NaN passes through, as in `apply_activation`.
            if fused_relu {
                v = _mm512_max_ps(zero, v);
            } else if let Some((lo_v, hi_v)) = clip {
                v = _mm512_min_ps(hi_v, _mm512_max_ps(lo_v, v));
            }
            _mm512_mask_storeu_ps(dst.add(col), sm, v);
        }
        t += 16;
    }
    if !fused_relu && clip.is_none() {
        apply_activation(epi.activation, row);
    }
}

/// One output channel's transform `Aᵀ m A` over all tiles, into the channel's plane.
fn output_channel(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect() {
        // SAFETY: detect() saw these features on this CPU (AVX-512 ones take
        // `output_fused_avx512` instead and do not come here).
        Isa::Avx512 | Isa::Avx2 => return unsafe { output_avx2(m, g, cout, co, o) },
        Isa::Portable => {}
    }
    output_any(m, g, cout, co, o)
}

#[inline(always)]
fn output_any(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    if g.m == 4 {
        output_body4(m, g, cout, co, o)
    } else {
        output_body(m, g, cout, co, o)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_avx2(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    output_any(m, g, cout, co, o)
}

/// The transform half of [`output_body`]: `Aᵀ m A` of channel `co` into the four
/// grid-shaped arrays of `buf` (`Y[2i + j]`, `gp` values each).
#[inline(always)]
fn transform2(m: &[f32], g: &Geometry, cout: usize, co: usize, buf: &mut [f32]) {
    let gp = g.gp;
    let mut mx: [&[f32]; 16] = [&[]; 16];
    for (xi, r) in mx.iter_mut().enumerate() {
        *r = &m[(xi * cout + co) * gp..(xi * cout + co + 1) * gp];
    }
    for c in (0..g.g).step_by(16) {
        let mut y = [[0f32; 16]; 4];
        for i in 0..2 {
            let mut s = [[0f32; 16]; 4];
            for (col, sc) in s.iter_mut().enumerate() {
                let (m0, m1) = (ld16(mx[col], c), ld16(mx[4 + col], c));
                let (m2, m3) = (ld16(mx[8 + col], c), ld16(mx[12 + col], c));
                *sc = if i == 0 {
                    add16(&add16(&m0, &m1), &m2)
                } else {
                    sub16(&sub16(&m1, &m2), &m3)
                };
            }
            y[2 * i] = add16(&add16(&s[0], &s[1]), &s[2]);
            y[2 * i + 1] = sub16(&sub16(&s[1], &s[2]), &s[3]);
        }
        for (k, yk) in y.iter().enumerate() {
            buf[k * gp + c..k * gp + c + 16].copy_from_slice(yk);
        }
    }
}

/// Chunks of 16 tiles along the grid like the input transform: the column transform
/// (m₀ + m₁ + m₂, m₁ − m₂ − m₃), then the row transform, into four grid-shaped arrays
/// `Y[i][j][g]` (output row 2ty + i, column 2tx + j); then each output row interleaves its
/// even and odd columns from them, dropping the extra tile of the row.
#[inline(always)]
fn output_body(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    let gp = g.gp;
    // Every part is written before it is read.
    let mut buf = scratch::take(4 * gp);
    transform2(m, g, cout, co, &mut buf);
    for ty in 0..g.th {
        for i in 0..2 {
            let yr = 2 * ty + i;
            if yr >= g.oh {
                continue;
            }
            let at = ty * g.gw;
            let even = &buf[2 * i * gp + at..2 * i * gp + at + g.tw];
            let odd = &buf[(2 * i + 1) * gp + at..(2 * i + 1) * gp + at + g.tw];
            let dst = &mut o[yr * g.ow..(yr + 1) * g.ow];
            for (pair, (e, od)) in dst.chunks_exact_mut(2).zip(even.iter().zip(odd)) {
                pair[0] = *e;
                pair[1] = *od;
            }
            if g.ow % 2 == 1 {
                dst[g.ow - 1] = even[g.tw - 1];
            }
        }
    }
    scratch::give(buf);
}

/// `Bᵀ d` along one axis for F(4×4, 3×3), 16 tiles at a time.
#[inline(always)]
fn bt6(d: [&V16; 6]) -> [V16; 6] {
    let mut t = [[0f32; 16]; 6];
    for j in 0..16 {
        let (d0, d1, d2, d3, d4, d5) = (d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]);
        t[0][j] = 4.0 * d0 - 5.0 * d2 + d4;
        t[1][j] = (d3 + d4) - 4.0 * (d1 + d2);
        t[2][j] = (d4 - d3) + 4.0 * (d1 - d2);
        t[3][j] = (d4 - d2) + 2.0 * (d3 - d1);
        t[4][j] = (d4 - d2) - 2.0 * (d3 - d1);
        t[5][j] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    t
}

/// `Aᵀ m` along one axis for F(4×4, 3×3), 16 tiles at a time.
#[inline(always)]
fn at6(m: [&V16; 6]) -> [V16; 4] {
    let mut y = [[0f32; 16]; 4];
    for j in 0..16 {
        let (m0, m1, m2, m3, m4, m5) = (m[0][j], m[1][j], m[2][j], m[3][j], m[4][j], m[5][j]);
        let (a, b) = (m1 + m2, m1 - m2);
        let (c, d) = (m3 + m4, m3 - m4);
        y[0][j] = m0 + a + c;
        y[1][j] = b + 2.0 * d;
        y[2][j] = a + 4.0 * c;
        y[3][j] = b + 8.0 * d + m5;
    }
    y
}

/// [`input_channel`] for F(4×4, 3×3): tiles step 4 and read 6 × 6, so the padded rows are
/// split into four column phases, `T[r][k][g] = padded[4ty + r][4tx + k]` (r < 6), and tile
/// g's input row r is `T[r][0..4][g], T[r][0][g + 1], T[r][1][g + 1]`.
///
/// # Safety
/// As for [`dispatch_input`].
#[inline(always)]
unsafe fn input_channel4(plane: &[f32], g: &Geometry, ci: usize, cin: usize, v: *mut f32) {
    let len = g.g + 32;
    let width = 4 * g.gw;
    let mut buf = scratch::take(24 * len + width);
    let (ts, row) = buf.split_at_mut(24 * len);
    let split = phases_from_plane();
    for ty in 0..g.th {
        for r in 0..6 {
            if split {
                #[cfg(target_arch = "x86_64")]
                phases_avx512::<4>(
                    plane,
                    g,
                    (4 * ty + r) as isize,
                    &mut ts[4 * r * len..4 * (r + 1) * len],
                    len,
                    ty * g.gw,
                );
                continue;
            }
            padded_row(plane, g, (4 * ty + r) as isize, row);
            let at = ty * g.gw;
            let rs = &mut ts[4 * r * len..4 * (r + 1) * len];
            let (p0, rest) = rs.split_at_mut(len);
            let (p1, rest) = rest.split_at_mut(len);
            let (p2, p3) = rest.split_at_mut(len);
            for (j, quad) in row.chunks_exact(4).enumerate() {
                p0[at + j] = quad[0];
                p1[at + j] = quad[1];
                p2[at + j] = quad[2];
                p3[at + j] = quad[3];
            }
        }
    }
    if split {
        #[cfg(target_arch = "x86_64")]
        zero_slack_avx512(ts, 24, len, g.g);
    } else {
        for a in 0..24 {
            ts[a * len + g.g..(a + 1) * len].fill(0.0);
        }
    }
    let arr = |r: usize, k: usize| &ts[(4 * r + k) * len..(4 * r + k + 1) * len];
    // Out of the loop: a fresh zeroed array per chunk was a memset call per chunk.
    let mut t = [[[0f32; 16]; 6]; 6];
    for c in (0..g.g).step_by(16) {
        // Row transform of input row r of the 16 tiles: t[r][col].
        for (r, tr) in t.iter_mut().enumerate() {
            let d = [
                ld16(arr(r, 0), c),
                ld16(arr(r, 1), c),
                ld16(arr(r, 2), c),
                ld16(arr(r, 3), c),
                ld16(arr(r, 0), c + 1),
                ld16(arr(r, 1), c + 1),
            ];
            *tr = bt6([&d[0], &d[1], &d[2], &d[3], &d[4], &d[5]]);
        }
        #[allow(clippy::needless_range_loop)] // col picks one column of six rows
        for col in 0..6 {
            let vals = bt6([
                &t[0][col], &t[1][col], &t[2][col], &t[3][col], &t[4][col], &t[5][col],
            ]);
            for (i, val) in vals.iter().enumerate() {
                // SAFETY: as in `input_channel`.
                let dst = v.add(g.v_at(cin, i * 6 + col, ci, c));
                std::ptr::copy_nonoverlapping(val.as_ptr(), dst, 16);
            }
        }
    }
    scratch::give(buf);
}

/// Whether the input transforms split rows into phases straight from the plane
/// ([`phases_avx512`]) rather than through a zero-padded row copy.
fn phases_from_plane() -> bool {
    #[cfg(target_arch = "x86_64")]
    return Isa::detect() == Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Padded row `y` of the plane split into its `P` (2 or 4) column phases at `at` of `rs`'s
/// `P` arrays of `len` values (`rs[k · len + at + j] = padded[y][P·j + k]`, j < gw), read
/// straight from the plane: masked loads stand in for the padding (a zero-filled row copy,
/// a memset and a memcpy call per row, then a scalar deinterleave: with the transform itself
/// a fifth of a pruned ResNet-18's frame under perf), and rounds of two-register permutes
/// deinterleave 16·P columns into 16 per phase.
///
/// # Safety
/// The CPU must have AVX-512F; `rs` holds `P` arrays of `len ≥ at + gw` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn phases_avx512<const P: usize>(
    plane: &[f32],
    g: &Geometry,
    y: isize,
    rs: &mut [f32],
    len: usize,
    at: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!((P == 2 || P == 4) && rs.len() >= P * len && at + g.gw <= len);
    let dst = rs.as_mut_ptr();
    let iy = y - g.pad.0;
    let chunks = g.gw.div_ceil(16);
    let keep = |q: usize| -> __mmask16 { ((1u32 << (g.gw - 16 * q).min(16)) - 1) as __mmask16 };
    if iy < 0 || iy as usize >= g.h {
        for q in 0..chunks {
            for k in 0..P {
                _mm512_mask_storeu_ps(dst.add(k * len + at + 16 * q), keep(q), _mm512_setzero_ps());
            }
        }
        return;
    }
    let src = plane.as_ptr().add(iy as usize * g.w);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // Sixteen padded columns from `c`: plane columns c − pad where they exist, zero elsewhere.
    // Lanes outside the row are masked off, so their (out of bounds) addresses are not read.
    let load = |c: isize| {
        let s = c - g.pad.1;
        _mm512_maskz_loadu_ps(super::lanes_in_row(s, g.w), src.wrapping_offset(s))
    };
    for q in 0..chunks {
        let c = (16 * P * q) as isize;
        let (x0, x1) = (load(c), load(c + 16));
        let (a, b) = (
            _mm512_permutex2var_ps(x0, even, x1),
            _mm512_permutex2var_ps(x0, odd, x1),
        );
        let mut ph = [a, b, a, b];
        if P == 4 {
            let (x2, x3) = (load(c + 32), load(c + 48));
            let (cc, d) = (
                _mm512_permutex2var_ps(x2, even, x3),
                _mm512_permutex2var_ps(x2, odd, x3),
            );
            ph = [
                _mm512_permutex2var_ps(a, even, cc),
                _mm512_permutex2var_ps(b, even, d),
                _mm512_permutex2var_ps(a, odd, cc),
                _mm512_permutex2var_ps(b, odd, d),
            ];
        }
        for (k, v) in ph.into_iter().take(P).enumerate() {
            _mm512_mask_storeu_ps(dst.add(k * len + at + 16 * q), keep(q), v);
        }
    }
}

/// Zeroes `[from, len)` of each of the `arrays` arrays of `len` values in `buf` (the transforms'
/// read slack) with vector stores: a memset call per array cost more than the stores.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn zero_slack_avx512(buf: &mut [f32], arrays: usize, len: usize, from: usize) {
    use std::arch::x86_64::*;
    for a in buf.chunks_exact_mut(len).take(arrays) {
        let tail = &mut a[from..];
        let p = tail.as_mut_ptr();
        for i in (0..tail.len()).step_by(16) {
            let m = ((1u32 << (tail.len() - i).min(16)) - 1) as __mmask16;
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_setzero_ps());
        }
    }
}

/// The transform half of [`output_body4`]: `Aᵀ m A` of channel `co` into the sixteen
/// grid-shaped arrays of `buf` (`Y[4i + j]`, `gp` values each).
#[inline(always)]
fn transform4(m: &[f32], g: &Geometry, cout: usize, co: usize, buf: &mut [f32]) {
    let gp = g.gp;
    let mut mx: [&[f32]; 36] = [&[]; 36];
    for (xi, r) in mx.iter_mut().enumerate() {
        *r = &m[(xi * cout + co) * gp..(xi * cout + co + 1) * gp];
    }
    // Out of the loop: a fresh zeroed array per chunk was a memset call per chunk.
    let mut s = [[[0f32; 16]; 4]; 6];
    for c in (0..g.g).step_by(16) {
        for (col, sc) in s.iter_mut().enumerate() {
            let v: [V16; 6] = [
                ld16(mx[col], c),
                ld16(mx[6 + col], c),
                ld16(mx[12 + col], c),
                ld16(mx[18 + col], c),
                ld16(mx[24 + col], c),
                ld16(mx[30 + col], c),
            ];
            *sc = at6([&v[0], &v[1], &v[2], &v[3], &v[4], &v[5]]);
        }
        #[allow(clippy::needless_range_loop)] // i picks one row of six columns
        for i in 0..4 {
            let y = at6([&s[0][i], &s[1][i], &s[2][i], &s[3][i], &s[4][i], &s[5][i]]);
            for (j, yj) in y.iter().enumerate() {
                let at = (i * 4 + j) * gp + c;
                buf[at..at + 16].copy_from_slice(yj);
            }
        }
    }
}

/// [`output_body`] for F(4×4, 3×3): per chunk of 16 tiles `Aᵀ m A` into sixteen grid-shaped
/// arrays `Y[i][j][g]` (output row 4ty + i, column 4tx + j), then each output row gathers
/// its four column phases.
#[inline(always)]
fn output_body4(m: &[f32], g: &Geometry, cout: usize, co: usize, o: &mut [f32]) {
    let gp = g.gp;
    let mut buf = scratch::take(16 * gp);
    transform4(m, g, cout, co, &mut buf);
    for ty in 0..g.th {
        for i in 0..4 {
            let yr = 4 * ty + i;
            if yr >= g.oh {
                continue;
            }
            let at = ty * g.gw;
            let ph = |j: usize| &buf[(i * 4 + j) * gp + at..(i * 4 + j) * gp + at + g.tw];
            let (q0, q1, q2, q3) = (ph(0), ph(1), ph(2), ph(3));
            let dst = &mut o[yr * g.ow..(yr + 1) * g.ow];
            let mut quads = dst.chunks_exact_mut(4);
            for (tx, quad) in (&mut quads).enumerate() {
                quad[0] = q0[tx];
                quad[1] = q1[tx];
                quad[2] = q2[tx];
                quad[3] = q3[tx];
            }
            let tail = quads.into_remainder();
            let tx = g.ow / 4;
            for (j, d) in tail.iter_mut().enumerate() {
                *d = [q0, q1, q2, q3][j][tx];
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
        let pools: Vec<_> = (1..=3)
            .map(|t| std::sync::Arc::new(crate::kernels::par::SpinPool::new(t).unwrap()))
            .collect();
        for (case, &(n, cin, cout, h, w, pads)) in [
            (1usize, 3usize, 5usize, 6usize, 6usize, [1usize, 1, 1, 1]),
            (1, 16, 24, 7, 7, [1, 1, 1, 1]),
            (2, 8, 8, 9, 5, [0, 0, 0, 0]),
            (1, 33, 17, 14, 13, [1, 0, 0, 1]),
            (1, 64, 64, 56, 56, [1, 1, 1, 1]),
            (1, 32, 48, 45, 37, [1, 1, 1, 1]),
            (2, 24, 40, 61, 30, [1, 0, 0, 1]),
            (1, 5, 3, 3, 3, [0, 0, 0, 0]),
            // More input channels than one KC block of the GEMM (two blocks of V's panels).
            (1, 300, 20, 9, 11, [1, 1, 1, 1]),
            (1, 520, 8, 5, 5, [1, 1, 1, 1]),
            // Rows wider than one 16-tile chunk of the AVX-512 phase split and interleave.
            (1, 6, 7, 9, 75, [1, 1, 1, 1]),
            (1, 4, 5, 7, 131, [0, 1, 1, 0]),
        ]
        .iter()
        .enumerate()
        {
            // Each case with another epilogue: the AVX-512 output path fuses ReLU and Clip
            // and runs the others over its rows.
            let act = [
                Some(Activation::Relu),
                Some(Activation::Clip {
                    min: Some(0.0),
                    max: Some(6.0),
                }),
                None,
                Some(Activation::Sigmoid),
            ][case % 4];
            let with_res = case % 3 != 1;
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
            for tile in [2, 4] {
                let wino = WinogradConv::with_tile(&wt, cout, cin, Some(&b), &pads, tile).unwrap();
                let (oh, ow) = direct.out_hw(h, w).unwrap();
                assert_eq!(wino.out_hw(h, w), Some((oh, ow)));
                let res = rand(n * cout * oh * ow, 4);
                let mut want = vec![0f32; res.len()];
                let r = with_res.then_some(res.as_slice());
                direct.run(&x, (n, cin, h, w), r, act, &mut want).unwrap();
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
                // One thread runs every phase alone; two and three split each phase (three:
                // parts of unequal size).
                for (threads, pool) in pools.iter().enumerate().map(|(i, p)| (i + 1, p)) {
                    let mut got = vec![f32::NAN; res.len()];
                    assert!(pool.install(|| wino.run(&x, (n, h, w), r, act, &mut got)));
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err / scale <= 1e-4,
                        "F({tile}) {cin}->{cout} {h}x{w} {pads:?} {act:?}, {threads} threads: \
                         rel err {}",
                        err / scale
                    );
                }
            }
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
