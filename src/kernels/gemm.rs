//! Single-precision GEMM with pre-packed left operand and a fused epilogue:
//!
//! `C[m, n] = act(Σ_k A[m, k] · B[k, n] + bias[m] + R[m, n])`
//!
//! A is the constant operand (conv or linear weights, rows = output channels), packed once at
//! load into panels of `MR` rows per `KC`-deep block. B is the activation operand, described by
//! a [`BSource`] that packs a `KC × NC` block into `NR`-column panels on demand (a strided
//! matrix, or im2col of a convolution input, which never materialises the whole column matrix).
//! The micro-kernel keeps an `MR × NR` tile of C in registers; the epilogue (bias, residual,
//! activation) runs on the tile as it is stored, so a conv writes its final output once.
//!
//! Micro-kernels: AVX-512F (8 × 32) and AVX2+FMA (6 × 16) on x86-64, chosen at run time, and a
//! portable one (4 × 16) the compiler vectorises for whatever the target has (NEON on aarch64).

use std::cell::RefCell;
use std::sync::OnceLock;

use super::ahead::Ahead;
use super::par::{self, SendPtr};

use super::act::apply_activation;
use crate::graph::Activation;

/// Depth of one packed block of A and B: A's micro-panel (`KC × MR`) stays in L1 while the
/// B panels stream past it.
pub const KC: usize = 256;
/// Largest `MR × NR` of any micro-kernel (the size of a tile buffer).
const TILE_MAX: usize = 16 * 32;

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F, 8 × 32 tiles.
    Avx512,
    /// AVX2 + FMA, 6 × 16 tiles.
    Avx2,
    /// Plain Rust, 4 × 16 tiles, vectorised by the compiler.
    Portable,
}

impl Isa {
    /// The best micro-kernel this CPU runs (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("EDGEINFER_ISA").is_ok_and(|v| v == "portable") {
                return Isa::Portable;
            }
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                if std::env::var("EDGEINFER_ISA").is_ok_and(|v| v == "avx2") && avx2 {
                    return Isa::Avx2;
                }
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if avx2 {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Every variant this CPU runs (tests run each kernel against the reference).
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    v.push(Isa::Avx512);
                }
            }
        }
        v
    }

    /// Rows of C per micro-tile.
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }

    /// Columns of C per micro-tile.
    pub fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Portable => 16,
        }
    }
}

/// The constant left operand, packed for one [`Isa`]: for each `KC` block of k, for each panel
/// of `MR` rows, `kc × MR` values (k-major), rows past `m` zero.
#[derive(Debug, Clone)]
pub struct PackedA {
    isa: Isa,
    m: usize,
    k: usize,
    data: super::scratch::Scratch,
}

impl PackedA {
    /// Packs `A[i, j] = a[i * rs + j * cs]` for `i < m`, `j < k`.
    pub fn pack(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> PackedA {
        Self::pack_for(Isa::detect(), a, m, k, rs, cs)
    }

    /// As [`PackedA::pack`], for a given micro-kernel.
    pub fn pack_for(isa: Isa, a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> PackedA {
        let len = m.div_ceil(isa.mr()) * isa.mr() * k;
        Self::pack_into(super::pages::zeroed(len).into(), isa, a, m, k, rs, cs)
    }

    /// As [`PackedA::pack`], into a buffer from this thread's scratch pool; hand it back with
    /// [`PackedA::recycle`].
    pub fn pack_scratch(a: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> PackedA {
        let isa = Isa::detect();
        let len = m.div_ceil(isa.mr()) * isa.mr() * k;
        Self::pack_into(super::scratch::take(len), isa, a, m, k, rs, cs)
    }

    /// An `m × k` left operand in a scratch buffer (hand it back with [`PackedA::recycle`])
    /// whose pieces the caller writes: `fill(k0, row0, dst)` writes rows `row0 .. row0 + MR`
    /// (zeros past `m`) of columns `k0 .. k0 + kc` as `kc × MR` values, k-major, where
    /// `kc = dst.len() / MR`. Pieces run in parallel when there is enough to share.
    pub fn pack_scratch_by(
        m: usize,
        k: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> PackedA {
        let isa = Isa::detect();
        let mr = isa.mr();
        let data = super::scratch::take(m.div_ceil(mr) * mr * k);
        Self::pack_pieces(data, isa, m, k, |(k0, p, _), dst| fill(k0, p * mr, dst))
    }

    /// Returns a [`PackedA::pack_scratch`] buffer to the scratch pool.
    pub fn recycle(self) {
        super::scratch::give(self.data);
    }

    fn pack_into(
        data: super::scratch::Scratch,
        isa: Isa,
        a: &[f32],
        m: usize,
        k: usize,
        rs: usize,
        cs: usize,
    ) -> PackedA {
        let mr = isa.mr();
        let fill = |(k0, p, kc): (usize, usize, usize), dst: &mut [f32]| {
            let rows = mr.min(m - p * mr);
            let first = p * mr * rs + k0 * cs;
            if rows == mr && rs == 1 {
                // The panel's rows are adjacent in memory: MR contiguous values per k, copied
                // at the ISA's constant MR so that each copy is a move or two rather than a
                // `memcpy` call. Positions as rows (the transposed form, a channels-last block)
                // pack this way every frame: MobileNetV2's four 7 × 7 blocks 15 → 8 µs a frame
                // (1 thread), ResNet-50's 1 × 1 layers at 7 × 7 0.02–0.03 ms faster each by
                // node; whole frames within this host's noise.
                fn copy<const MR: usize>(
                    a: &[f32],
                    first: usize,
                    cs: usize,
                    kc: usize,
                    dst: &mut [f32],
                ) {
                    for (kk, d) in dst.chunks_exact_mut(MR).take(kc).enumerate() {
                        let at = first + kk * cs;
                        d.copy_from_slice(&a[at..at + MR]);
                    }
                }
                match mr {
                    8 => copy::<8>(a, first, cs, kc, dst),
                    6 => copy::<6>(a, first, cs, kc, dst),
                    _ => copy::<4>(a, first, cs, kc, dst),
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if rows == mr && cs == 1 && isa != Isa::Portable {
                let need = first + (mr - 1) * rs + kc;
                assert!(need <= a.len() && dst.len() >= kc * mr);
                // SAFETY: AVX2 is present (either ISA detected implies it); rows first + r·rs .. + kc
                // (r < MR) lie inside `a` (checked above) and dst holds kc · MR values.
                unsafe {
                    let (src, out) = (a.as_ptr().add(first), dst.as_mut_ptr());
                    if mr == 8 {
                        x86::transpose_rows::<8>(src, rs, kc, out)
                    } else {
                        x86::transpose_rows::<6>(src, rs, kc, out)
                    }
                };
                return;
            }
            for r in 0..mr {
                if r >= rows {
                    for kk in 0..kc {
                        dst[kk * mr + r] = 0.0;
                    }
                    continue;
                }
                let row = first + r * rs;
                if cs == 1 {
                    // A row of A read contiguously, written every MR-th value.
                    for (kk, &v) in a[row..row + kc].iter().enumerate() {
                        dst[kk * mr + r] = v;
                    }
                } else {
                    for kk in 0..kc {
                        dst[kk * mr + r] = a[row + kk * cs];
                    }
                }
            }
        };
        Self::pack_pieces(data, isa, m, k, fill)
    }

    /// Has `fill((k0, panel, kc), dst)` write every (KC block, panel) piece of `data`, which
    /// holds exactly the packed size of `m × k` (every caller takes or allocates that much).
    fn pack_pieces(
        mut data: super::scratch::Scratch,
        isa: Isa,
        m: usize,
        k: usize,
        fill: impl Fn((usize, usize, usize), &mut [f32]) + Sync,
    ) -> PackedA {
        let mr = isa.mr();
        let panels = m.div_ceil(mr);
        // Every element is written by `fill` (rows past m as zeros): no fill first.
        debug_assert_eq!(data.len(), panels * mr * k);
        // Layout: for each KC block (all panels of it together), for each panel, kc × MR.
        // Packed per (block, panel) piece, in parallel when there is enough to share. Piece i
        // is block i / panels, panel i % panels; every block but the last is KC deep, so
        // piece i starts at k0 · panels · MR + p · kc · MR.
        let piece = |i: usize| {
            let (k0, p) = ((i / panels) * KC, i % panels);
            let kc = KC.min(k - k0);
            (k0, p, kc, k0 * panels * mr + p * kc * mr)
        };
        let pieces = k.div_ceil(KC) * panels;
        // From 8 K values: a channels-last block's project operand (49 × 960) packed by the
        // caller alone held the other thread waiting (27 µs a MobileNetV2 frame; 19 µs shared).
        // 2 threads, frames alternating with a 64 K threshold in one process: MobileNetV2
        // 0.991–0.998× (four runs), ViT-Tiny 0.996×, the ResNets 1.002–1.003×.
        if m * k < 1 << 13 {
            for i in 0..pieces {
                let (k0, p, kc, at) = piece(i);
                fill((k0, p, kc), &mut data[at..at + kc * mr]);
            }
        } else {
            let base = SendPtr(data.as_mut_ptr());
            par::par_for(pieces, |i| {
                let (k0, p, kc, at) = piece(i);
                // SAFETY: piece i owns [at, at + kc · MR) of `data`, disjoint from every
                // other piece's range, and `data` outlives the call.
                let dst = unsafe { std::slice::from_raw_parts_mut(base.get().add(at), kc * mr) };
                fill((k0, p, kc), dst);
            });
        }
        PackedA { isa, m, k, data }
    }

    /// The packed matrix back as row-major `m × k` values.
    pub fn unpack(&self) -> Vec<f32> {
        let mr = self.isa.mr();
        let mut out = vec![0f32; self.m * self.k];
        for k0 in (0..self.k).step_by(KC) {
            let kc = KC.min(self.k - k0);
            for p in 0..self.m.div_ceil(mr) {
                let panel = self.panel(k0, p);
                for r in 0..mr.min(self.m - p * mr) {
                    let row = &mut out[(p * mr + r) * self.k + k0..][..kc];
                    for (kk, v) in row.iter_mut().enumerate() {
                        *v = panel[kk * mr + r];
                    }
                }
            }
        }
        out
    }

    /// Rows (output channels).
    pub fn m(&self) -> usize {
        self.m
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The micro-kernel this packing is for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Start of the panel `p` of the block starting at `k0`.
    fn panel(&self, k0: usize, p: usize) -> &[f32] {
        let mr = self.isa.mr();
        let panels = self.m.div_ceil(mr);
        let kc = KC.min(self.k - k0);
        let start = k0 * panels * mr + p * kc * mr;
        &self.data[start..start + kc * mr]
    }
}

/// A constant right operand (linear-layer weights), packed once for one [`Isa`]: for each
/// `KC` block of k, for each panel of `NR` columns, `kc × NR` values (k-major), columns past
/// `n` zero. Its [`BSource::pack`] is a copy of whole panels.
#[derive(Debug, Clone)]
pub struct PackedB {
    isa: Isa,
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `B[k, n] = b[k * rs + n * cs]` for the CPU's micro-kernel.
    pub fn pack(b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        Self::pack_for(Isa::detect(), b, k, n, rs, cs)
    }

    /// As [`PackedB::pack`], for a given micro-kernel.
    pub fn pack_for(isa: Isa, b: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> PackedB {
        let nr = isa.nr();
        let mut data = super::pages::zeroed(n.div_ceil(nr) * nr * k);
        for_each_packed(k, n, nr, |at, row, col| data[at] = b[row * rs + col * cs]);
        PackedB { isa, k, n, data }
    }

    /// The matrix back, row-major `[k, n]` (the inverse of [`PackedB::pack`] with `rs = n`,
    /// `cs = 1`).
    pub fn unpack(&self) -> Vec<f32> {
        let mut b = vec![0f32; self.k * self.n];
        for_each_packed(self.k, self.n, self.isa.nr(), |at, row, col| {
            b[row * self.n + col] = self.data[at]
        });
        b
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

impl BSource for PackedB {
    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        if let Some(src) = self.packed(k0, kc, n0, nc, nr) {
            dst[..src.len()].copy_from_slice(src);
            return;
        }
        // Another panel width: regather element by element from our own panels.
        let own = self.isa.nr();
        let block = k0 * self.n.div_ceil(own) * own;
        for p in 0..nc.div_ceil(nr) {
            for kk in 0..kc {
                for j in 0..nr {
                    let col = n0 + p * nr + j;
                    dst[(p * kc + kk) * nr + j] = if p * nr + j < nc && col < self.n {
                        self.data[block + ((col / own) * kc + kk) * own + col % own]
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    fn constant(&self) -> bool {
        true
    }

    fn packed(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize) -> Option<&[f32]> {
        // The driver asks for panel-aligned blocks of the packing's own width.
        if nr != self.isa.nr() || !n0.is_multiple_of(nr) {
            return None;
        }
        let panels = self.n.div_ceil(nr);
        let block = k0 * panels * nr;
        let (p0, np) = (n0 / nr, nc.div_ceil(nr));
        self.data
            .get(block + p0 * kc * nr..block + (p0 + np) * kc * nr)
    }
}

/// The right operand: something that can write a block of B into packed panels.
pub trait BSource: Sync {
    /// Writes `B[k0 .. k0 + kc, n0 .. n0 + nc]` into `dst` as `nc.div_ceil(nr)` panels of
    /// `kc × nr` values (k-major), columns past `nc` zero.
    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, dst: &mut [f32]);

    /// Whether B is a constant (weights, the same every frame): then the driver asks for its
    /// blocks ahead of use (see [`super::ahead`]) rather than for A's.
    fn constant(&self) -> bool {
        false
    }

    /// The same block when it already exists in packed form (no copy needed).
    fn packed(&self, _k0: usize, _kc: usize, _n0: usize, _nc: usize, _nr: usize) -> Option<&[f32]> {
        None
    }

    /// The block as rows of contiguous columns in place: `(s, ld)` with `B[k0 + kk, n0 + j] =
    /// s[kk · ld + j]` for `kk < kc`, `j < nc`, so the micro-kernel can read whole panels
    /// without a copy.
    fn rows(&self, _k0: usize, _kc: usize, _n0: usize, _nc: usize) -> Option<(&[f32], usize)> {
        None
    }

    /// The block's panels as rows found in place, each row anywhere: `Some(s)` with
    /// `B[k0 + kk, n0 + p · nr + j] = s[bases[kk] + offs[p] + j]` for `j < nr` and every panel
    /// `p` whose `offs[p]` is `Some` (a whole panel in one run of the source); the others are
    /// packed as usual. Fills `bases` (`kc` values) and `offs` (one per panel).
    #[allow(clippy::too_many_arguments)]
    fn gathered(
        &self,
        _k0: usize,
        _kc: usize,
        _n0: usize,
        _nc: usize,
        _nr: usize,
        _bases: &mut Vec<usize>,
        _offs: &mut Vec<Option<usize>>,
    ) -> Option<&[f32]> {
        None
    }
}

/// `y = act(x · B + col_bias + residual)` for one row `x` (`k` values) and a prepacked `B`:
/// a matrix-vector product (a classifier over pooled features), which [`gemm`] would run on
/// micro-tiles of which one row in `MR` is real. Each panel of `NR` columns streams its `k × NR`
/// block once with four partial sums in flight; panels are shared between threads.
pub fn gemv(x: &[f32], b: &PackedB, y: &mut [f32], epi: &Epilogue) {
    let (k, n) = (b.k, b.n);
    assert!(
        x.len() == k && y.len() == n,
        "gemv: x of {}, y of {}",
        x.len(),
        y.len()
    );
    assert!(epi.col_bias.is_none_or(|c| c.len() >= n) && epi.residual.is_none_or(|r| r.len() >= n));
    let nr = b.isa.nr();
    let panels = n.div_ceil(nr);
    // Panels per task: enough to amortise a task, at most one share per thread.
    let threads = par::current_threads().max(1);
    let per = panels.div_ceil(threads).max(1);
    par::par_chunks_mut(y, per * nr, |t, yc| {
        let p0 = t * per;
        #[cfg(target_arch = "x86_64")]
        match b.isa {
            // SAFETY: the packing's ISA was detected on this CPU.
            Isa::Avx512 => return unsafe { gemv_avx512(x, b, p0, yc, epi) },
            Isa::Avx2 => return unsafe { gemv_avx2(x, b, p0, yc, epi) },
            Isa::Portable => {}
        }
        gemv_panels::<16>(x, b, p0, yc, epi)
    });
    apply_activation(epi.activation, y);
}

/// [`gemv_panels`] for 32-column panels in AVX-512 registers: four k-steps in flight, each
/// with its own two accumulators. The packed weights are walked in memory order (k blocks
/// outside, this task's panels inside), partial sums kept per panel: panel by panel, the walk
/// jumps a whole block ahead every 32 KB, and the stream from memory (5 MB for MobileNetV2's
/// classifier, read once per frame) kept restarting.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_avx512(x: &[f32], b: &PackedB, p0: usize, y: &mut [f32], epi: &Epilogue) {
    use std::arch::x86_64::*;
    const NR: usize = 32;
    let (k, n) = (b.k, b.n);
    let panels = n.div_ceil(NR);
    assert!(b.data.len() >= panels * NR * k);
    let mine = y.len().div_ceil(NR);
    // Partial sums of this task's panels, NR per panel.
    let mut sums = super::scratch::take(mine * NR);
    sums.fill(0.0);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let xs = &x[k0..k0 + kc];
        for i in 0..mine {
            let p = p0 + i;
            // SAFETY: panel p of block k0 is kc × NR values inside data (asserted above).
            let blk = unsafe { b.data.as_ptr().add(k0 * panels * NR + p * kc * NR) };
            let mut acc = [_mm512_setzero_ps(); 8];
            let mut kk = 0;
            while kk + 4 <= kc {
                for u in 0..4 {
                    let xv = _mm512_set1_ps(xs[kk + u]);
                    // SAFETY: row kk + u of the panel.
                    let (r0, r1) = unsafe {
                        let r = blk.add((kk + u) * NR);
                        (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(16)))
                    };
                    acc[2 * u] = _mm512_fmadd_ps(xv, r0, acc[2 * u]);
                    acc[2 * u + 1] = _mm512_fmadd_ps(xv, r1, acc[2 * u + 1]);
                }
                kk += 4;
            }
            while kk < kc {
                let xv = _mm512_set1_ps(xs[kk]);
                // SAFETY: row kk of the panel.
                let (r0, r1) = unsafe {
                    let r = blk.add(kk * NR);
                    (_mm512_loadu_ps(r), _mm512_loadu_ps(r.add(16)))
                };
                acc[0] = _mm512_fmadd_ps(xv, r0, acc[0]);
                acc[1] = _mm512_fmadd_ps(xv, r1, acc[1]);
                kk += 1;
            }
            let lo = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
            let hi = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
            let dst = &mut sums[i * NR..(i + 1) * NR];
            // SAFETY: dst holds 32 values.
            unsafe {
                let d = dst.as_mut_ptr();
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), lo));
                _mm512_storeu_ps(d.add(16), _mm512_add_ps(_mm512_loadu_ps(d.add(16)), hi));
            }
        }
    }
    for (i, yp) in y.chunks_mut(NR).enumerate() {
        finish_panel(&sums[i * NR..(i + 1) * NR], (p0 + i) * NR, yp, epi);
    }
    super::scratch::give(sums);
}

/// Writes a panel's sums into y with the column bias and residual of columns `c0 ..`.
#[inline(always)]
fn finish_panel(sums: &[f32], c0: usize, y: &mut [f32], epi: &Epilogue) {
    for (j, v) in y.iter_mut().enumerate() {
        let mut s = sums[j];
        if let Some(cb) = epi.col_bias {
            s += cb[c0 + j];
        }
        if let Some(r) = epi.residual {
            s += r[c0 + j];
        }
        *v = s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_avx2(x: &[f32], b: &PackedB, p0: usize, y: &mut [f32], epi: &Epilogue) {
    gemv_panels::<16>(x, b, p0, y, epi)
}

/// Columns `p0 · NR ..` of y (as many as `y` holds), bias and residual added.
#[inline(always)]
fn gemv_panels<const NR: usize>(x: &[f32], b: &PackedB, p0: usize, y: &mut [f32], epi: &Epilogue) {
    let (k, n) = (b.k, b.n);
    let panels = n.div_ceil(NR);
    for (i, yp) in y.chunks_mut(NR).enumerate() {
        let p = p0 + i;
        let mut acc = [[0f32; NR]; 4];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &b.data[k0 * panels * NR + p * kc * NR..][..kc * NR];
            let xs = &x[k0..k0 + kc];
            let quads = kc / 4;
            for q in 0..quads {
                for (u, a) in acc.iter_mut().enumerate() {
                    let kk = 4 * q + u;
                    let xv = xs[kk];
                    let row = &block[kk * NR..kk * NR + NR];
                    for j in 0..NR {
                        a[j] = xv.mul_add(row[j], a[j]);
                    }
                }
            }
            for kk in 4 * quads..kc {
                let xv = xs[kk];
                let row = &block[kk * NR..kk * NR + NR];
                for j in 0..NR {
                    acc[0][j] = xv.mul_add(row[j], acc[0][j]);
                }
            }
        }
        let mut sums = [0f32; NR];
        for (j, v) in sums.iter_mut().enumerate() {
            *v = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
        }
        finish_panel(&sums, p * NR, yp, epi);
    }
}

/// A strided matrix `B[k, n] = data[k * rs + n * cs]`.
pub struct MatrixB<'a> {
    /// Elements.
    pub data: &'a [f32],
    /// Step between rows (k).
    pub rs: usize,
    /// Step between columns (n).
    pub cs: usize,
}

impl BSource for MatrixB<'_> {
    fn rows(&self, k0: usize, kc: usize, n0: usize, nc: usize) -> Option<(&[f32], usize)> {
        if self.cs != 1 || kc == 0 {
            return None;
        }
        let start = k0 * self.rs + n0;
        self.data
            .get(start..start + (kc - 1) * self.rs + nc)
            .map(|s| (s, self.rs))
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        for p in 0..nc.div_ceil(nr) {
            let cols = nr.min(nc - p * nr);
            let panel = &mut dst[p * kc * nr..(p + 1) * kc * nr];
            if self.rs == 1 && self.cs != 1 {
                // Columns run along k (xᵀ of a row-major x): read each column contiguously.
                for j in 0..nr {
                    if j < cols {
                        let base = k0 + (n0 + p * nr + j) * self.cs;
                        for (kk, &v) in self.data[base..base + kc].iter().enumerate() {
                            panel[kk * nr + j] = v;
                        }
                    } else {
                        (0..kc).for_each(|kk| panel[kk * nr + j] = 0.0);
                    }
                }
                continue;
            }
            for kk in 0..kc {
                let row = &mut panel[kk * nr..(kk + 1) * nr];
                let base = (k0 + kk) * self.rs + (n0 + p * nr) * self.cs;
                if self.cs == 1 {
                    row[..cols].copy_from_slice(&self.data[base..base + cols]);
                } else {
                    for (j, v) in row[..cols].iter_mut().enumerate() {
                        *v = self.data[base + j * self.cs];
                    }
                }
                row[cols..].fill(0.0);
            }
        }
    }
}

/// What happens to each element of C as it is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added per row (output channel).
    pub bias: Option<&'a [f32]>,
    /// Added per column (a linear layer's bias when C is tokens × features).
    pub col_bias: Option<&'a [f32]>,
    /// Added per element, laid out like C (a residual connection).
    pub residual: Option<&'a [f32]>,
    /// Applied last.
    pub activation: Option<Activation>,
}

/// Where C lives: `C[i, j] = c[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Step between rows.
    pub rs: usize,
    /// Step between columns.
    pub cs: usize,
}

thread_local! {
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// [`BSource::gathered`]'s row bases and panel offsets, grown once per thread.
    static GATHER: RefCell<(Vec<usize>, Vec<Option<usize>>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Calls `f(at, row, col)` for every element `B[row, col]` of a `k × n` matrix packed in
/// panels `nr` wide, `at` being its index in the packed data: for each KC block of rows, for
/// each panel, `kc` rows of `nr` (the columns past `n` are padding, skipped).
fn for_each_packed(k: usize, n: usize, nr: usize, mut f: impl FnMut(usize, usize, usize)) {
    let panels = n.div_ceil(nr);
    let mut at = 0;
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for p in 0..panels {
            for kk in 0..kc {
                for j in 0..nr {
                    let col = p * nr + j;
                    if col < n {
                        f(at, k0 + kk, col);
                    }
                    at += 1;
                }
            }
        }
    }
}

/// `C = epilogue(A · B)` for `n` columns. `c` and `epi.residual` must hold every element the
/// layout addresses; panics otherwise (callers size them from the same shapes).
pub fn gemm(a: &PackedA, b: &dyn BSource, n: usize, c: &mut [f32], layout: Layout, epi: &Epilogue) {
    let m = a.m;
    if m == 0 || n == 0 {
        return;
    }
    let last = (m - 1) * layout.rs + (n - 1) * layout.cs;
    assert!(
        c.len() > last,
        "gemm: C holds {} elements, needs {}",
        c.len(),
        last + 1
    );
    if let Some(r) = epi.residual {
        assert!(
            r.len() > last,
            "gemm: residual holds {} elements, needs {}",
            r.len(),
            last + 1
        );
    }
    if let Some(bias) = epi.bias {
        assert!(
            bias.len() >= m,
            "gemm: bias holds {} values for {m} rows",
            bias.len()
        );
    }
    if let Some(cb) = epi.col_bias {
        assert!(
            cb.len() >= n,
            "gemm: column bias holds {} values for {n} columns",
            cb.len()
        );
    }
    // SAFETY: C holds every element the layout addresses (checked above), and `c` is
    // borrowed mutably for the call.
    unsafe { gemm_into(a, b, n, c.as_mut_ptr(), layout, epi) }
}

/// [`gemm`] into C at a raw pointer, for callers that write disjoint parts of one output from
/// several threads (a block computed in row strips).
///
/// # Safety
/// `c` must address every element `i * layout.rs + j * layout.cs` (`i < a.m()`, `j < n`), and
/// while the call runs no other code may access those elements; `epi.residual` and
/// `epi.bias` / `epi.col_bias` must cover C's layout, its rows and its columns.
pub unsafe fn gemm_into(
    a: &PackedA,
    b: &dyn BSource,
    n: usize,
    c: *mut f32,
    layout: Layout,
    epi: &Epilogue,
) {
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // No products: C is the epilogue of zero.
        for i in 0..m {
            let mut row: Vec<f32> = (0..n)
                .map(|j| {
                    epi.bias.map_or(0.0, |b| b[i])
                        + epi.col_bias.map_or(0.0, |b| b[j])
                        + epi
                            .residual
                            .map_or(0.0, |r| r[i * layout.rs + j * layout.cs])
                })
                .collect();
            apply_activation(epi.activation, &mut row);
            for (j, v) in row.into_iter().enumerate() {
                // SAFETY: inside C (the caller's contract).
                unsafe { *c.add(i * layout.rs + j * layout.cs) = v };
            }
        }
        return;
    }
    let (mr, nr) = (a.isa.mr(), a.isa.nr());
    // Work items: column chunks of `panels_per_chunk` panels, and row chunks when there are
    // too few column chunks to give every thread one (the 7 × 7 maps at the end of a ResNet).
    // Chunk counts are multiples of the thread count and panels are dealt out evenly, so no
    // thread waits on a last, lone chunk.
    let threads = par::current_threads().max(1);
    let n_panels = n.div_ceil(nr);
    let m_panels = m.div_ceil(mr);
    let mut n_chunks = n_panels.div_ceil(panels_per_chunk(a.isa, k, nr));
    // Fewer than four column panels a thread (14 × 14 and 7 × 7 maps): rounding the chunks up
    // to the thread count deals them out unevenly (7 panels as 3 and 4, the 4 holding the
    // ragged one), so such products split their rows only, which are many and come out even.
    // Alone, 2 threads: 1024 × 256 × 196 0.965x, 512 × 256 × 196 0.95x, 2048 × 512 × 49
    // 0.93x of the time; ResNet-50 frames alternating in one process 0.99x.
    let few_columns = n_panels < 4 * threads && m_panels >= 2 * threads;
    if threads > 1 {
        n_chunks = if few_columns {
            1
        } else {
            n_chunks.div_ceil(threads) * threads
        };
    }
    let n_chunks = n_chunks.min(n_panels);
    // One row part a thread, not two: each row part streams all of the item's columns of B
    // again, and the even split needs no second part to balance. 2 threads, frames
    // alternating in one process against two parts a thread: MobileNetV2 0.989–0.993×,
    // ViT-Tiny 0.991–0.994×, ResNet-50 0.994–0.996×, ResNet-18 0.996–0.999×.
    let mut m_parts = if threads == 1 || n_chunks >= threads {
        1
    } else {
        threads.div_ceil(n_chunks)
    };
    if threads > 1 && m_parts > 1 {
        m_parts = m_parts.div_ceil(threads) * threads;
    }
    let m_parts = m_parts.min(m_panels);
    // Item (mi, nj): panels [mi·M/parts, (mi+1)·M/parts) × [nj·N/chunks, (nj+1)·N/chunks).
    let split = |i: usize, total: usize, parts: usize| (i * total / parts, (i + 1) * total / parts);
    // Item i is (i % m_parts, i / m_parts).
    let items = n_chunks * m_parts;
    // Bias, residual and a clamp-like activation run in the micro-kernel's registers as it
    // stores the last k block; anything else in a pass over the stored tile.
    // Other activations (GELU, SiLU, ...) are deferred when C's rows are contiguous: applied
    // once per row panel over all the item's columns after its last tile is stored (still in
    // cache), rather than in a call per tile row of 32 values.
    let clamp_like = matches!(
        epi.activation,
        None | Some(Activation::Relu) | Some(Activation::Clip { .. })
    );
    // The exact GELU runs in the AVX2 kernels' registers as they store the last k block rather
    // than in a pass over the stored rows: ViT-Tiny frames alternating in one process took
    // 0.99x (1 thread) and 0.96-0.98x (2 threads) of the deferred pass's time.
    let gelu = a.isa == Isa::Avx2
        && layout.cs == 1
        && matches!(epi.activation, Some(Activation::Gelu { tanh: false }));
    let defer = !clamp_like && layout.cs == 1 && !gelu;
    let activation = epi.activation;
    let (fusable, lo, hi) = match crate::graph::clamp_bounds(epi.activation.as_ref()) {
        _ if a.isa == Isa::Portable => (false, 0.0, 0.0),
        Some((lo, hi)) => (true, lo, hi),
        None if defer || gelu => (true, f32::NEG_INFINITY, f32::INFINITY),
        None => (false, 0.0, 0.0),
    };
    let tile_epi = Epilogue {
        activation: if defer || gelu { None } else { epi.activation },
        ..*epi
    };
    let epi = &tile_epi;
    // The fused epilogue's operands for the tile at (i0, j0), as the micro-kernels take them.
    let fused_at = |i0: usize, j0: usize| Fused {
        bias: epi.bias.map_or(std::ptr::null(), |b| b[i0..].as_ptr()),
        col_bias: epi.col_bias.map_or(std::ptr::null(), |b| b[j0..].as_ptr()),
        residual: epi
            .residual
            .map_or(std::ptr::null(), |r| r[i0 * layout.rs + j0..].as_ptr()),
        lo,
        hi,
        gelu,
    };
    let cptr = SendPtr(c);
    let run = |i: usize| {
        let (mi, nj) = (i % m_parts, i / m_parts);
        let (p0, p1) = split(mi, m_panels, m_parts);
        let (q0, q1) = split(nj, n_panels, n_chunks);
        let n0 = q0 * nr;
        let nc = (q1 * nr).min(n) - n0;
        if p0 == p1 || nc == 0 {
            return;
        }
        PACK_B.with(|buf| {
            GATHER.with(|plan| {
                let mut buf = buf.borrow_mut();
                let mut plan = plan.borrow_mut();
                let plan = &mut *plan;
                let need = KC.min(k) * nc.div_ceil(nr) * nr;
                if buf.len() < need {
                    buf.resize(need, 0.0);
                }
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let len = kc * nc.div_ceil(nr) * nr;
                    // Prepacked operands are read where they lie, row-major ones in place (whole
                    // panels; a ragged last panel is packed), others are packed into `buf`.
                    let mut in_place = None;
                    // Read only by the AVX-512 tile path (x86-64).
                    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_assignments))]
                    let mut gathered: Option<&[f32]> = None;
                    let prepacked = b.packed(k0, kc, n0, nc, nr);
                    let block: &[f32] = match prepacked {
                        Some(panels) => panels,
                        None if a.isa == Isa::Avx512 && layout.cs == 1 && fusable && {
                            gathered = b.gathered(k0, kc, n0, nc, nr, &mut plan.0, &mut plan.1);
                            gathered.is_some()
                        } =>
                        {
                            // Checked here once per block, so the kernel need not: a panel is read
                            // in place only if it is whole and its every row lies in the source.
                            let src_len = gathered.map_or(0, <[f32]>::len);
                            let top = plan.0.iter().copied().max().unwrap_or(0);
                            if plan.0.len() != kc {
                                plan.1.clear();
                            }
                            for (np, off) in plan.1.iter_mut().enumerate() {
                                // Whole panels only: an edge panel is packed.
                                if (np + 1) * nr > nc || off.is_some_and(|o| top + o + nr > src_len)
                                {
                                    *off = None;
                                }
                            }
                            // Panels found whole in the source are read there; the rest packed.
                            for np in 0..nc.div_ceil(nr) {
                                if !matches!(plan.1.get(np), Some(Some(_))) {
                                    let c0 = np * nr;
                                    let cols = nr.min(nc - c0);
                                    b.pack(
                                        k0,
                                        kc,
                                        n0 + c0,
                                        cols,
                                        nr,
                                        &mut buf[np * kc * nr..(np + 1) * kc * nr],
                                    );
                                }
                            }
                            &buf[..len]
                        }
                        None => match b
                            .rows(k0, kc, n0, nc)
                            .filter(|&(r, ld)| in_place_ok(a.isa, r, ld))
                        {
                            Some(rows) => {
                                let full = nc / nr;
                                if full * nr < nc {
                                    let at = full * kc * nr;
                                    b.pack(
                                        k0,
                                        kc,
                                        n0 + full * nr,
                                        nc - full * nr,
                                        nr,
                                        &mut buf[at..len],
                                    );
                                }
                                in_place = Some(rows);
                                &buf[..len]
                            }
                            None => {
                                b.pack(k0, kc, n0, nc, nr, &mut buf[..len]);
                                &buf[..len]
                            }
                        },
                    };
                    let first = k0 == 0;
                    let final_block = k0 + kc == k;
                    // Which weights the kernels ask for while they run (see `super::ahead`):
                    // with B the weights (a linear layer, a transposed convolution) the next k
                    // block of this item's columns, or the next item's first, a share per row
                    // panel; with A the weights, the row panel after this one in the item's
                    // order (then the next k block's first, then the next item's).
                    let b_const = b.constant() && prepacked.is_some();
                    // Looked up once per k block; each row panel takes its share.
                    let next_b = if !b_const {
                        None
                    } else if k0 + kc < k {
                        b.packed(k0 + kc, KC.min(k - k0 - kc), n0, nc, nr)
                    } else if i + 1 < items {
                        let (r0, r1) = split((i + 1) / m_parts, n_panels, n_chunks);
                        let n1 = r0 * nr;
                        b.packed(0, KC.min(k), n1, (r1 * nr).min(n) - n1, nr)
                    } else {
                        None
                    };
                    let ahead_of = |p: usize| -> Ahead {
                        if b_const {
                            next_b.map_or(Ahead::NONE, |v| Ahead::far(v).share(p - p0, p1 - p0))
                        } else if p + 1 < p1 {
                            Ahead::near(a.panel(k0, p + 1))
                        } else if k0 + kc < k {
                            Ahead::near(a.panel(k0 + kc, p0))
                        } else if i + 1 < items {
                            let (r0, r1) = split((i + 1) % m_parts, m_panels, m_parts);
                            if r0 < r1 {
                                Ahead::near(a.panel(0, r0))
                            } else {
                                Ahead::NONE
                            }
                        } else {
                            Ahead::NONE
                        }
                    };
                    let tile = |p: usize, np: usize| {
                        let ap = a.panel(k0, p);
                        let rows = mr.min(m - p * mr);
                        let cols = nr.min(nc - np * nr);
                        let (bp, ldb) = match in_place {
                            Some((rows, ld)) if cols == nr => (&rows[np * nr..], ld),
                            _ => (&block[np * kc * nr..(np + 1) * kc * nr], nr),
                        };
                        #[cfg(target_arch = "x86_64")]
                        if let (Some(src), Some(Some(off))) = (gathered, plan.1.get(np)) {
                            // Every tile of a gathered panel comes here (whole columns, unit
                            // stride and a fusable epilogue were required to gather at all).
                            {
                                let (i0, j0) = (p * mr, n0 + np * nr);
                                // SAFETY: as for a whole tile below; `gathered` promised that
                                // every row `src[bases[kk] + off..][..nr]` lies in `src` (checked
                                // by the kernel).
                                unsafe {
                                    let fused = final_block.then(|| fused_at(i0, j0));
                                    x86::kernel_8x32_gather(
                                        kc,
                                        ap,
                                        (src, &plan.0[..kc], *off),
                                        cptr.get().add(i0 * layout.rs + j0),
                                        layout.rs,
                                        rows,
                                        !first,
                                        fused.as_ref(),
                                    );
                                }
                                return;
                            }
                        }
                        if rows == mr && cols == nr && layout.cs == 1 {
                            // Whole tile, unit column stride: the kernel adds into C itself.
                            let (i0, j0) = (p * mr, n0 + np * nr);
                            // SAFETY: the tile lies inside C (checked against `last` above) and
                            // belongs to this work item only.
                            unsafe {
                                let cp = cptr.get().add(i0 * layout.rs + j0);
                                let fused = (final_block && fusable).then(|| fused_at(i0, j0));
                                micro(
                                    a.isa,
                                    kc,
                                    ap,
                                    (bp, ldb),
                                    cp,
                                    layout.rs,
                                    !first,
                                    fused.as_ref(),
                                );
                                if final_block && !fusable {
                                    epilogue_in_place(cp, layout.rs, (i0, j0), (mr, nr), epi);
                                }
                            }
                            return;
                        }
                        // Ragged tiles: the ISA's masked edge kernel, epilogue fused.
                        #[cfg(target_arch = "x86_64")]
                        let edge = match a.isa {
                            Isa::Avx512 => Some(x86::kernel_8x32_edge as x86::EdgeKernel),
                            Isa::Avx2 => Some(x86::kernel_6x16_edge as x86::EdgeKernel),
                            Isa::Portable => None,
                        };
                        #[cfg(target_arch = "x86_64")]
                        if let Some(edge) = edge.filter(|_| layout.cs == 1 && fusable) {
                            let (i0, j0) = (p * mr, n0 + np * nr);
                            // SAFETY: as for a whole tile; the kernel touches only the tile's
                            // `rows × cols` part of C and of the residual and column bias, and
                            // the ISA it was picked for is the detected one.
                            unsafe {
                                let fused = final_block.then(|| fused_at(i0, j0));
                                edge(
                                    kc,
                                    ap,
                                    (bp, ldb),
                                    cptr.get().add(i0 * layout.rs + j0),
                                    layout.rs,
                                    (rows, cols),
                                    !first,
                                    fused.as_ref(),
                                );
                            }
                            return;
                        }
                        let mut tile = [0f32; TILE_MAX];
                        // SAFETY: the tile buffer holds MR × NR values at row stride NR.
                        unsafe {
                            micro(a.isa, kc, ap, (bp, ldb), tile.as_mut_ptr(), nr, false, None)
                        };
                        // SAFETY: rows p*mr.. and columns n0+np*nr.. belong to this item only.
                        unsafe {
                            store(
                                &tile[..mr * nr],
                                nr,
                                cptr.get(),
                                layout,
                                (p * mr, n0 + np * nr),
                                (rows, cols),
                                first,
                                final_block,
                                epi,
                            );
                        }
                    };
                    // A ragged last column panel of a few columns goes to the narrow kernel,
                    // every row panel of the item at once, after the whole tiles.
                    #[cfg(target_arch = "x86_64")]
                    let narrow = a.isa == Isa::Avx512
                        && layout.cs == 1
                        && fusable
                        && (1..=x86::NARROW).contains(&(nc % nr));
                    #[cfg(not(target_arch = "x86_64"))]
                    let narrow = false;
                    let col_panels = if narrow { nc / nr } else { nc.div_ceil(nr) };
                    // Row panels outside, column panels inside: the tile walks along MR rows of C
                    // (few pages) while the packed B block stays in cache. (Column panels outside
                    // measured the same on ResNet-50, ViT-Tiny and MobileNetV2.)
                    for p in p0..p1 {
                        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
                        let mut ahead = ahead_of(p);
                        // The row's whole tiles in one kernel call: a call per tile (the
                        // closure, its operand checks and the dispatch) cost as much as the
                        // products of a short k. Frames alternating in one process, node sums:
                        // MobileNetV2 −2.1 to −2.9 % (1 thread) and −2.8 / −3.3 % (2),
                        // ResNet-50 −1.0 / −1.3 % and −1.5 / −3.8 %, ViT-Tiny −1.6 % and
                        // −4.1 / −4.8 %, ResNet-18 −0.3 % (1 thread); with the AVX2 kernel
                        // (`EDGEINFER_ISA=avx2`, 1 thread) MobileNetV2 −3.2 %, ResNet-50
                        // −2.0 %, ViT-Tiny −1.7 %.
                        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
                        let mut np0 = 0;
                        #[cfg(target_arch = "x86_64")]
                        if a.isa != Isa::Portable
                            && layout.cs == 1
                            && gathered.is_none()
                            && (fusable || !final_block)
                            && p * mr + mr <= m
                        {
                            let full = nc / nr;
                            let (bp, ldb, bstep) = match in_place {
                                Some((rows, ld)) => (rows.as_ptr(), ld, nr),
                                None => (block.as_ptr(), nr, kc * nr),
                            };
                            let (i0, j0) = (p * mr, n0);
                            // SAFETY: as for whole tiles in `tile`: each of the `full` tiles
                            // lies inside C and belongs to this item; B's panels lie in the
                            // block (packed) or in the source rows (in place, whole panels).
                            unsafe {
                                let fused = final_block.then(|| fused_at(i0, j0));
                                let panels = if a.isa == Isa::Avx512 {
                                    x86::kernel_8x32_panels
                                } else {
                                    x86::kernel_6x16_panels
                                };
                                panels(
                                    kc,
                                    a.panel(k0, p),
                                    (bp, ldb, bstep),
                                    cptr.get().add(i0 * layout.rs + j0),
                                    layout.rs,
                                    full,
                                    !first,
                                    fused.as_ref(),
                                    ahead,
                                );
                            }
                            np0 = full;
                            if full > 0 {
                                ahead = Ahead::NONE;
                            }
                        }
                        // No kernel loop to spread them over: the next A panel at once (4–6 %
                        // off whole frames of MobileNetV2 and the ResNets against none).
                        if !ahead.is_far() {
                            ahead.all_now();
                        }
                        for np in np0..col_panels {
                            tile(p, np);
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if narrow {
                        let np = nc / nr;
                        // The ragged panel is always packed (in place and gathered panels are
                        // whole ones), zero past its columns.
                        let bp = block[np * kc * nr..(np + 1) * kc * nr].as_ptr();
                        let j0 = n0 + np * nr;
                        let mut p = p0;
                        while p < p1 {
                            let panels = (p1 - p).min(4);
                            let i0 = p * mr;
                            let rows = (m - i0).min(panels * mr);
                            // SAFETY: AVX-512 was detected (the packing's ISA); the panels p ..
                            // p + panels of this k block lie kc · MR apart in A; B's panel holds
                            // kc rows of NR ≥ nc % NR values; rows i0 .. i0 + rows and columns j0 ..
                            // j0 + nc % NR lie inside C and belong to this item only; the epilogue's
                            // operands cover them (as for the whole tiles).
                            unsafe {
                                let fused = final_block.then(|| fused_at(i0, j0));
                                x86::kernel_narrow_cols(
                                    kc,
                                    (a.panel(k0, p).as_ptr(), kc * mr, panels),
                                    (bp, nr),
                                    cptr.get().add(i0 * layout.rs + j0),
                                    layout.rs,
                                    (rows, nc % nr),
                                    !first,
                                    fused.as_ref(),
                                );
                            }
                            p += panels;
                        }
                    }
                    if final_block && defer {
                        for i in p0 * mr..(p1 * mr).min(m) {
                            // SAFETY: row i, columns n0 .. n0 + nc (unit stride) lie in C and
                            // belong to this item only.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(
                                    cptr.get().add(i * layout.rs + n0),
                                    nc,
                                )
                            };
                            apply_activation(activation, row);
                        }
                    }
                }
            })
        });
    };
    if items == 1 || threads == 1 {
        (0..items).for_each(run);
    } else {
        par::par_for(items, run);
    }
}

/// Column panels per work item. A shallow product (k of 16–64: MobileNetV2's expansions,
/// ResNet's 64-channel layers) over a large map spends its time writing C, and an item of 8
/// panels wrote each of C's rows in runs of 128 values (512 bytes), a hundred rows at a time,
/// too short for the hardware prefetcher to follow. With AVX2, items hold about 64 KB of B
/// (`kc · columns`, up to 64 panels), so C's rows are written in runs of up to 1024 values.
/// Frames alternating in one process (Zen 3), node sums: MobileNetV2 −3.6 / −4.7 % at 1
/// thread (its 16 → 96 expand at 112² 1.47 → 1.23 ms) and −4.7 % at 2, ResNet-50 −1.6 / −1.4
/// %, ResNet-18 and ViT-Tiny level. The AVX-512 kernel keeps 8 panels: it was tuned on a
/// host this was not measured on.
fn panels_per_chunk(isa: Isa, k: usize, nr: usize) -> usize {
    match isa {
        Isa::Avx2 => (16 * 1024 / (k.clamp(1, KC) * nr)).clamp(8, 64),
        _ => 8,
    }
}

/// Whether the micro-kernel reads B's rows where they lie (`rows`, `ld` apart) rather than from
/// a packed copy. The AVX2 kernel reads a 16-wide strip of B per k against 12 multiply-adds, so
/// a tile's kc rows come from L2 each call; rows that do not start on a cache line (a 14 × 14 or
/// 7 × 7 map: 196 or 49 values apart) straddle two lines each, twice the traffic, and packing
/// them first paid: per call, interleaved, 1 thread, Zen 3, 1 × 1 layers of ResNet-50 0.89–0.95×
/// at 14 × 14 and 7 × 7; frames alternating in one process, ResNet-50 node sums −3.6 / −5.9 %,
/// ResNet-18 −0.7 %, MobileNetV2 and ViT-Tiny level. Aligned rows (56 × 56, 28 × 28) measured
/// the same either way and stay in place. The AVX-512 kernel reads 32 wide against 16 wider
/// multiply-adds and measured faster in place (Zen 4; on Zen 5 packing took MobileNetV2 frames 1.05x,
/// ResNet-50 1.01x); the portable one always packs.
fn in_place_ok(isa: Isa, rows: &[f32], ld: usize) -> bool {
    match isa {
        Isa::Portable => false,
        Isa::Avx2 => (rows.as_ptr() as usize).is_multiple_of(64) && ld.is_multiple_of(16),
        Isa::Avx512 => true,
    }
}

/// Adds the tile into C (or stores it, for the first k block) and, after the last k block,
/// applies the epilogue.
///
/// # Safety
/// `c` must address every element of the `rows × cols` block at `(i0, j0)` under `layout`, and
/// no other thread may touch that block.
#[allow(clippy::too_many_arguments)]
unsafe fn store(
    tile: &[f32],
    nr: usize,
    c: *mut f32,
    layout: Layout,
    (i0, j0): (usize, usize),
    (rows, cols): (usize, usize),
    first: bool,
    final_block: bool,
    epi: &Epilogue,
) {
    let mut row = [0f32; 32];
    for r in 0..rows {
        let i = i0 + r;
        let vals = &mut row[..cols];
        vals.copy_from_slice(&tile[r * nr..r * nr + cols]);
        let base = i * layout.rs + j0 * layout.cs;
        if !first {
            for (j, v) in vals.iter_mut().enumerate() {
                *v += *c.add(base + j * layout.cs);
            }
        }
        if final_block {
            if let Some(b) = epi.bias {
                let bi = b[i];
                vals.iter_mut().for_each(|v| *v += bi);
            }
            if let Some(cb) = epi.col_bias {
                vals.iter_mut()
                    .zip(&cb[j0..j0 + cols])
                    .for_each(|(v, b)| *v += b);
            }
            if let Some(res) = epi.residual {
                if layout.cs == 1 {
                    for (v, r) in vals.iter_mut().zip(&res[base..base + cols]) {
                        *v += r;
                    }
                } else {
                    for (j, v) in vals.iter_mut().enumerate() {
                        *v += res[base + j * layout.cs];
                    }
                }
            }
            apply_activation(epi.activation, vals);
        }
        if layout.cs == 1 {
            std::ptr::copy_nonoverlapping(vals.as_ptr(), c.add(base), cols);
        } else {
            for (j, v) in vals.iter().enumerate() {
                *c.add(base + j * layout.cs) = *v;
            }
        }
    }
}

/// `C[r, j] (+)= Σ_k a[k * MR + r] · b[k * NR + j]` for the kernel of `isa`, C at `c` with row
/// stride `ldc`, added to when `accumulate`.
///
/// # Safety
/// `c` must address `MR` rows of `NR` values at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    isa: Isa,
    kc: usize,
    a: &[f32],
    (b, ldb): (&[f32], usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    fused: Option<&Fused>,
) {
    match isa {
        // SAFETY: Isa::detect only picks Avx512 / Avx2 when the CPU has those features; the
        // panels hold kc·MR and kc·NR values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::kernel_8x32(kc, a, (b, ldb), c, ldc, accumulate, fused),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::kernel_6x16(kc, a, (b, ldb), c, ldc, accumulate, fused),
        _ => {
            // The portable kernel stores plain sums; the caller's epilogue pass does the rest.
            let _ = fused;
            let _ = ldb;
            portable::kernel_4x16(kc, a, b, c, ldc, accumulate)
        }
    }
}

/// The epilogue as the x86 micro-kernels apply it in registers: `clamp(acc + bias[r] +
/// col_bias[j] + residual[r, j], lo, hi)`; null pointers are absent terms. NaN passes the
/// clamp unchanged, as in the reference.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Fused {
    /// MR row biases, or null.
    bias: *const f32,
    /// NR column biases, or null.
    col_bias: *const f32,
    /// The tile's residual, at C's row stride, or null.
    residual: *const f32,
    lo: f32,
    hi: f32,
    /// Apply the exact GELU after the clamp (the AVX2 kernels only).
    gelu: bool,
}

impl Fused {
    /// The same epilogue for the tile `cols` columns to the right.
    ///
    /// # Safety
    /// The column bias and the residual (where present) must extend that far.
    #[cfg(target_arch = "x86_64")]
    unsafe fn columns_on(&self, cols: usize) -> Fused {
        let on = |p: *const f32| if p.is_null() { p } else { p.add(cols) };
        Fused {
            col_bias: on(self.col_bias),
            residual: on(self.residual),
            ..*self
        }
    }
}

/// Bias, residual and activation on a whole tile already in C.
///
/// # Safety
/// As for [`micro`]; `epi`'s slices are indexed like C with column stride 1.
unsafe fn epilogue_in_place(
    c: *mut f32,
    ldc: usize,
    (i0, j0): (usize, usize),
    (rows, cols): (usize, usize),
    epi: &Epilogue,
) {
    if epi.bias.is_none()
        && epi.col_bias.is_none()
        && epi.residual.is_none()
        && epi.activation.is_none()
    {
        return;
    }
    for r in 0..rows {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc), cols);
        if let Some(b) = epi.bias {
            let bi = b[i0 + r];
            row.iter_mut().for_each(|v| *v += bi);
        }
        if let Some(cb) = epi.col_bias {
            row.iter_mut()
                .zip(&cb[j0..j0 + cols])
                .for_each(|(v, b)| *v += b);
        }
        if let Some(res) = epi.residual {
            let base = (i0 + r) * ldc + j0;
            row.iter_mut()
                .zip(&res[base..base + cols])
                .for_each(|(v, x)| *v += x);
        }
        apply_activation(epi.activation, row);
    }
}

mod portable {
    /// # Safety
    /// `c` addresses 4 rows of 16 values at stride `ldc`; `a`, `b` hold `kc·4`, `kc·16`.
    pub unsafe fn kernel_4x16(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[0f32; 16]; 4];
        for (ak, bk) in a.chunks_exact(4).zip(b.chunks_exact(16)).take(kc) {
            for r in 0..4 {
                for j in 0..16 {
                    acc[r][j] += ak[r] * bk[j];
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let row = std::slice::from_raw_parts_mut(c.add(r * ldc), 16);
            if accumulate {
                row.iter_mut().zip(acc_r).for_each(|(o, v)| *o += v);
            } else {
                row.copy_from_slice(acc_r);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{lanes_below, transpose8x8};

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// Packs `R` ≤ 8 rows (at `a + r · rs`) of `kc` values k-major: `dst[kk · R + r] =
    /// row_r[kk]`, 8 × 8 blocks transposed in registers. A packing of rows (a linear layer's
    /// tokens, every frame) done element by element cost about 1.7 ns a value on Zen 3 (AVX2,
    /// 6 rows): 197 × 192 tokens 0.063 ms against 0.007 ms this way.
    ///
    /// # Safety
    /// The CPU must have AVX2; each row holds `kc` values and `dst` `kc · R`.
    #[target_feature(enable = "avx,avx2")]
    pub unsafe fn transpose_rows<const R: usize>(
        a: *const f32,
        rs: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        debug_assert!(R <= 8);
        let last = lanes_below(R);
        let mut kk = 0;
        while kk + 8 <= kc {
            // A plain loop, not `array::map`: a closure run through a generic function may
            // be compiled without this function's AVX and call the load out of line.
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, ri) in r.iter_mut().enumerate().take(R) {
                *ri = _mm256_loadu_ps(a.add(i * rs + kk));
            }
            let d = dst.add(kk * R);
            let t = transpose8x8(r);
            if R == 8 {
                for (i, &v) in t.iter().enumerate() {
                    _mm256_storeu_ps(d.add(8 * i), v);
                }
            } else {
                // Whole vectors in order, each one's spare lanes overwritten by the next; the
                // last one masked so nothing past the block is written.
                for (i, &v) in t.iter().enumerate().take(7) {
                    _mm256_storeu_ps(d.add(R * i), v);
                }
                _mm256_maskstore_ps(d.add(R * 7), last, t[7]);
            }
            kk += 8;
        }
        for k in kk..kc {
            for r in 0..R {
                *dst.add(k * R + r) = *a.add(r * rs + k);
            }
        }
    }

    /// A mask of the first `n` (≤ 8) of 8 lanes, for masked loads and stores of a ragged end.
    ///
    /// # Safety
    /// Call only from code compiled with AVX2 (as [`transpose8x8`]).
    #[inline(always)]
    pub(crate) unsafe fn lanes_below(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `out[j]` lane `i` = `r[i]` lane `j`: pairs of rows interleaved, then quads, then the
    /// 128-bit halves exchanged (24 shuffles). Shared by the A packing here and depthwise's
    /// channel-blocked path.
    ///
    /// # Safety
    /// Call only from code compiled with AVX (it inlines there; elsewhere the intrinsics
    /// would be calls into AVX code on a CPU that may lack it).
    #[inline(always)]
    pub(crate) unsafe fn transpose8x8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    use super::super::ahead::{Ahead, Drip};
    use super::Fused;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc * 8` values and `b` `kc` rows of 32 at
    /// stride `ldb`; `c` addresses 8 rows of 32 values at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8x32(
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!(a.len() >= kc * 8 && (kc == 0 || b.len() >= (kc - 1) * ldb + 32));
        let (ap, bp) = (a.as_ptr(), (b.as_ptr(), ldb));
        tile_8x32(kc, ap, bp, c, ldc, accumulate, fused, Ahead::NONE);
    }

    /// [`kernel_8x32`] over `panels` whole tiles side by side, in one call: tile `t` reads B
    /// at `b + t · bstep` (rows at stride `ldb`) and writes C, and reads its residual and
    /// column bias, `32 · t` columns further. The tiles ask for `ahead`'s lines, a share each.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc * 8` values; for every `t < panels`, B's
    /// `kc` rows of 32 at `b + t · bstep` (stride `ldb`) are readable and C's 8 rows of 32 at
    /// `c + 32 · t` (stride `ldc`) writable, and `fused`'s residual and column bias cover them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8x32_panels(
        kc: usize,
        a: &[f32],
        (b, ldb, bstep): (*const f32, usize, usize),
        c: *mut f32,
        ldc: usize,
        panels: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        ahead: Ahead,
    ) {
        assert!(a.len() >= kc * 8);
        for t in 0..panels {
            let f = fused.map(|f| f.columns_on(32 * t));
            tile_8x32(
                kc,
                a.as_ptr(),
                (b.add(t * bstep), ldb),
                c.add(32 * t),
                ldc,
                accumulate,
                f.as_ref(),
                ahead.share(t, panels),
            );
        }
    }

    /// The body of [`kernel_8x32`] on raw pointers.
    ///
    /// # Safety
    /// As for [`kernel_8x32`].
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_8x32(
        kc: usize,
        mut ap: *const f32,
        (mut bp, ldb): (*const f32, usize),
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        ahead: Ahead,
    ) {
        let mut c0 = [_mm512_setzero_ps(); 8];
        let mut c1 = [_mm512_setzero_ps(); 8];
        prefetch_tile(c, ldc, accumulate, fused);
        let mut drip = Drip::new(ahead, kc);
        for kk in 0..kc {
            drip.tick(kk);
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for r in 0..8 {
                let av = _mm512_set1_ps(*ap.add(r));
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
            }
            ap = ap.add(8);
            bp = bp.add(ldb);
        }
        // The sums stay in registers: a row loop with the operand checks inside did not
        // unroll and went through the stack (frames alternating in one process, 1 thread:
        // MobileNetV2 0.97-0.98x, ViT-Tiny 0.99x, ResNet-50 0.99x).
        store_8x32(c, ldc, 8, accumulate, fused, &mut c0, &mut c1);
    }

    /// The 8 × 32 tile's epilogue for its first `rows` (≤ 8) rows, with the operand checks
    /// made once, outside the rows, so that for a constant 8 the rows unroll and the sums stay
    /// in registers.
    #[inline(always)]
    unsafe fn store_8x32(
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        c0: &mut [__m512; 8],
        c1: &mut [__m512; 8],
    ) {
        if accumulate {
            for r in 0..rows {
                let t = c.add(r * ldc);
                c0[r] = _mm512_add_ps(c0[r], _mm512_loadu_ps(t));
                c1[r] = _mm512_add_ps(c1[r], _mm512_loadu_ps(t.add(16)));
            }
        }
        if let Some(f) = fused {
            if !f.bias.is_null() {
                for r in 0..rows {
                    let bb = _mm512_set1_ps(*f.bias.add(r));
                    c0[r] = _mm512_add_ps(c0[r], bb);
                    c1[r] = _mm512_add_ps(c1[r], bb);
                }
            }
            if !f.col_bias.is_null() {
                let (b0, b1) = (
                    _mm512_loadu_ps(f.col_bias),
                    _mm512_loadu_ps(f.col_bias.add(16)),
                );
                for r in 0..rows {
                    c0[r] = _mm512_add_ps(c0[r], b0);
                    c1[r] = _mm512_add_ps(c1[r], b1);
                }
            }
            if !f.residual.is_null() {
                for r in 0..rows {
                    let rr = f.residual.add(r * ldc);
                    c0[r] = _mm512_add_ps(c0[r], _mm512_loadu_ps(rr));
                    c1[r] = _mm512_add_ps(c1[r], _mm512_loadu_ps(rr.add(16)));
                }
            }
            // max(lo, x) and min(hi, x) return x when x is NaN.
            let (lo, hi) = (_mm512_set1_ps(f.lo), _mm512_set1_ps(f.hi));
            for r in 0..rows {
                c0[r] = _mm512_min_ps(hi, _mm512_max_ps(lo, c0[r]));
                c1[r] = _mm512_min_ps(hi, _mm512_max_ps(lo, c1[r]));
            }
        }
        for r in 0..rows {
            let t = c.add(r * ldc);
            _mm512_storeu_ps(t, c0[r]);
            _mm512_storeu_ps(t.add(16), c1[r]);
        }
    }

    /// Asks for the lines of the 8 × 32 tile at `c` (unless this call adds into it) and of
    /// its residual, which the kernel touches only after its k loop, so the misses overlap
    /// the products instead of following them. The outputs and residuals of 56² maps come
    /// from L3 or memory: per node, in-frame, ResNet-50's stem went 1.40 → 1.31 ms and its
    /// 56² residual layers 0.02–0.08 ms faster each.
    #[inline(always)]
    unsafe fn prefetch_tile(c: *const f32, ldc: usize, accumulate: bool, fused: Option<&Fused>) {
        let res = fused.map_or(std::ptr::null(), |f| f.residual);
        for r in 0..8 {
            // Hints only: a prefetch never faults.
            if !accumulate {
                let t = c.wrapping_add(r * ldc);
                _mm_prefetch::<_MM_HINT_T0>(t.cast());
                _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(31).cast());
            }
            if !res.is_null() {
                let t = res.wrapping_add(r * ldc);
                _mm_prefetch::<_MM_HINT_T0>(t.cast());
                _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(31).cast());
            }
        }
    }

    /// [`kernel_8x32`] with B's rows read where they lie: row `kk` of the panel is
    /// `src[bases[kk] + off..][..32]` (an im2col row straight from the phase-split input,
    /// instead of a copy into a packed panel). Stores the first `rows` rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc * 8` values, `bases` `kc`, and every row
    /// `src[bases[kk] + off..][..32]` lies inside `src`; `c` addresses `rows` (≤ 8) rows of
    /// 32 values at stride `ldc`; `fused` as for [`kernel_8x32`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8x32_gather(
        kc: usize,
        a: &[f32],
        (src, bases, off): (&[f32], &[usize], usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!(a.len() >= kc * 8 && bases.len() >= kc && rows <= 8);
        // The caller checked every row once per block (`gemm_into`).
        debug_assert!(bases[..kc].iter().all(|&b| b + off + 32 <= src.len()));
        let (mut ap, sp) = (a.as_ptr(), src.as_ptr().add(off));
        let mut c0 = [_mm512_setzero_ps(); 8];
        let mut c1 = [_mm512_setzero_ps(); 8];
        prefetch_tile(c, ldc, accumulate, fused);
        for &base in &bases[..kc] {
            let bp = sp.add(base);
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            for r in 0..8 {
                let av = _mm512_set1_ps(*ap.add(r));
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
            }
            ap = ap.add(8);
        }
        // The same epilogue as kernel_8x32, for the first `rows` rows (unrolled for 8).
        if rows == 8 {
            store_8x32(c, ldc, 8, accumulate, fused, &mut c0, &mut c1);
        } else {
            store_8x32(c, ldc, rows, accumulate, fused, &mut c0, &mut c1);
        }
    }

    /// Columns a narrow ragged panel may have for [`kernel_narrow_cols`].
    pub const NARROW: usize = 4;

    /// The ragged last column panel of `panels` (≤ 4) consecutive row panels when it has at
    /// most [`NARROW`] columns (a 14 × 14 map's 196 positions are 6 panels of 32 and 4), rows
    /// in the vector lanes: per k, two 8-row panels fill a vector and each column's value of
    /// B is broadcast, `cols` multiply-adds per 16 rows. The masked edge tile spent 8
    /// broadcasts and 8 multiply-adds per k on each panel's 4 columns, a twelfth of a 14 ×
    /// 14 layer's products for a fiftieth of its work. Stores and the epilogue's residual go
    /// through scatters and gathers down the columns (once per tile, not per k). Frames
    /// alternating in one process against the edge tiles: MobileNetV2 0.986× / 0.986× (1
    /// thread) and 0.988× / 0.984× (2), ResNet-50 0.993× / 0.992×, ResNet-18 0.996× / 1.002×,
    /// ViT-Tiny 0.999× (its ragged panels are rows: 197 tokens).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` is the first panel of `panels` packed row panels of
    /// `kc × 8` values `pstride` apart, `b` holds `kc` rows of at least `cols` at stride `ldb`;
    /// `c` addresses `rows` ≤ `8 · panels` rows of `cols` values at stride `ldc` (< 2²⁶);
    /// `fused`'s row bias covers the rows, its residual and column bias the rows and columns;
    /// 1 ≤ `panels` ≤ 4 and 1 ≤ `cols` ≤ [`NARROW`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_narrow_cols(
        kc: usize,
        (a, pstride, panels): (*const f32, usize, usize),
        (b, ldb): (*const f32, usize),
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!((1..=4).contains(&panels) && (1..=NARROW).contains(&cols));
        assert!(rows <= 8 * panels && ldc < 1 << 26);
        macro_rules! go {
            ($($c:literal)*) => {
                match (cols, panels > 2) {
                    $(
                        ($c, false) => narrow::<$c, 1>(kc, (a, pstride, panels), (b, ldb), c, ldc, rows, accumulate, fused),
                        ($c, true) => narrow::<$c, 2>(kc, (a, pstride, panels), (b, ldb), c, ldc, rows, accumulate, fused),
                    )*
                    _ => {}
                }
            };
        }
        go!(1 2 3 4);
    }

    /// [`kernel_narrow_cols`] for `C` columns and `G` groups of 16 rows (two panels each; a
    /// missing second panel reads as zeros).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn narrow<const C: usize, const G: usize>(
        kc: usize,
        (a, pstride, panels): (*const f32, usize, usize),
        (b, ldb): (*const f32, usize),
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; G];
        for k in 0..kc {
            let mut av = [_mm512_setzero_ps(); G];
            for (g, v) in av.iter_mut().enumerate() {
                let lo = _mm256_loadu_ps(a.add(2 * g * pstride + k * 8));
                let hi = if 2 * g + 1 < panels {
                    _mm256_loadu_ps(a.add((2 * g + 1) * pstride + k * 8))
                } else {
                    _mm256_setzero_ps()
                };
                *v = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                    _mm256_castps_pd(hi),
                ));
            }
            let bk = b.add(k * ldb);
            let mut bv = [_mm512_setzero_ps(); C];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = _mm512_set1_ps(*bk.add(j));
            }
            for (sums, &a) in acc.iter_mut().zip(&av) {
                for (s, &b) in sums.iter_mut().zip(&bv) {
                    *s = _mm512_fmadd_ps(a, b, *s);
                }
            }
        }
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(ldc as i32));
        for (g, sums) in acc.iter().enumerate() {
            let r0 = 16 * g;
            if r0 >= rows {
                break;
            }
            let n = (rows - r0).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            for (j, &sum) in sums.iter().enumerate() {
                let at = r0 * ldc + j;
                let mut v = sum;
                if accumulate {
                    v = _mm512_add_ps(
                        v,
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, c.add(at)),
                    );
                }
                if let Some(f) = fused {
                    if !f.bias.is_null() {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, f.bias.add(r0)));
                    }
                    if !f.col_bias.is_null() {
                        v = _mm512_add_ps(v, _mm512_set1_ps(*f.col_bias.add(j)));
                    }
                    if !f.residual.is_null() {
                        let r = f.residual.add(at);
                        v = _mm512_add_ps(
                            v,
                            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, r),
                        );
                    }
                    // max(lo, x) and min(hi, x) return x when x is NaN.
                    v = _mm512_min_ps(_mm512_set1_ps(f.hi), _mm512_max_ps(_mm512_set1_ps(f.lo), v));
                }
                _mm512_mask_i32scatter_ps::<4>(c.add(at), mask, idx, v);
            }
        }
    }

    /// [`kernel_8x32`] for a tile on C's edge: stores only the first `rows` rows and `cols`
    /// columns (masked loads and stores, never past them), and computes only the left 16
    /// columns when `cols` ≤ 16. A 14 × 14 map is 6 panels of 32 and 4 columns; a ViT's 197
    /// tokens 6 and 5: the ragged panel costs half a tile instead of a whole one plus a scalar
    /// store pass.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc * 8` values and `b` `kc` rows of 32 at stride
    /// `ldb`; `c` addresses `rows` rows of `cols` values at stride `ldc`; `fused`'s residual
    /// and column bias cover the same rows and columns; `rows` ≤ 8 and 1 ≤ `cols` ≤ 32.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8x32_edge(
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!(a.len() >= kc * 8 && (kc == 0 || b.len() >= (kc - 1) * ldb + 32));
        assert!(rows <= 8 && (1..=32).contains(&cols));
        let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (m0, m1) = (mask(cols), mask(cols.saturating_sub(16)));
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut c0 = [_mm512_setzero_ps(); 8];
        let mut c1 = [_mm512_setzero_ps(); 8];
        // Only the rows that exist are multiplied: a 7 × 7 map's 49 positions leave one row in
        // its last panel of 8, which cost as much as a whole tile (a sixth of a transposed
        // 3 × 3 layer's time at 7 × 7).
        macro_rules! sums {
            ($($r:literal)*) => {
                match (rows, cols > 16) {
                    $(
                        ($r, false) => edge_sums::<$r, false>(kc, ap, bp, ldb, &mut c0, &mut c1),
                        ($r, true) => edge_sums::<$r, true>(kc, ap, bp, ldb, &mut c0, &mut c1),
                    )*
                    _ => {}
                }
            };
        }
        sums!(1 2 3 4 5 6 7 8);
        for r in 0..rows {
            let t = c.add(r * ldc);
            let (mut v0, mut v1) = (c0[r], c1[r]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, t));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, t.wrapping_add(16)));
            }
            if let Some(f) = fused {
                if !f.bias.is_null() {
                    let bb = _mm512_set1_ps(*f.bias.add(r));
                    v0 = _mm512_add_ps(v0, bb);
                    v1 = _mm512_add_ps(v1, bb);
                }
                if !f.col_bias.is_null() {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, f.col_bias));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, f.col_bias.wrapping_add(16)));
                }
                if !f.residual.is_null() {
                    let rr = f.residual.add(r * ldc);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, rr));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, rr.wrapping_add(16)));
                }
                // max(lo, x) and min(hi, x) return x when x is NaN.
                let (lo, hi) = (_mm512_set1_ps(f.lo), _mm512_set1_ps(f.hi));
                v0 = _mm512_min_ps(hi, _mm512_max_ps(lo, v0));
                v1 = _mm512_min_ps(hi, _mm512_max_ps(lo, v1));
            }
            _mm512_mask_storeu_ps(t, m0, v0);
            // The right half's pointer may lie past C's end when m1 is empty: wrapping, never
            // dereferenced there (masked-off lanes are not accessed).
            _mm512_mask_storeu_ps(t.wrapping_add(16), m1, v1);
        }
    }

    /// The sums of [`kernel_8x32_edge`] for its first `R` rows, over 32 columns (`WIDE`) or 16.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc` groups of 8 values, `b` `kc` rows of 32
    /// (16 unless `WIDE`) at stride `ldb`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn edge_sums<const R: usize, const WIDE: bool>(
        kc: usize,
        mut ap: *const f32,
        mut bp: *const f32,
        ldb: usize,
        c0: &mut [__m512; 8],
        c1: &mut [__m512; 8],
    ) {
        // A few rows make fewer than 8 independent sums, and then the products wait on the
        // FMA's latency (4 cycles, 2 issued per cycle): the one row of a 7 × 7 map's last
        // panel cost half a whole tile. Such tiles split k over `u` interleaved sets of sums
        // (2048 → 512 channels at 7 × 7, transposed form, alone: 0.478 → 0.466 ms).
        let chains = R * if WIDE { 2 } else { 1 };
        let u = (8 / chains).clamp(1, 4);
        let mut s0 = [[_mm512_setzero_ps(); 8]; 4];
        let mut s1 = [[_mm512_setzero_ps(); 8]; 4];
        let mut k = 0;
        while k + u <= kc {
            for (p0, p1) in s0.iter_mut().zip(s1.iter_mut()).take(u) {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = if WIDE {
                    _mm512_loadu_ps(bp.add(16))
                } else {
                    _mm512_setzero_ps()
                };
                for r in 0..R {
                    let av = _mm512_set1_ps(*ap.add(r));
                    p0[r] = _mm512_fmadd_ps(av, b0, p0[r]);
                    if WIDE {
                        p1[r] = _mm512_fmadd_ps(av, b1, p1[r]);
                    }
                }
                ap = ap.add(8);
                bp = bp.add(ldb);
            }
            k += u;
        }
        for _ in k..kc {
            let b0 = _mm512_loadu_ps(bp);
            let b1 = if WIDE {
                _mm512_loadu_ps(bp.add(16))
            } else {
                _mm512_setzero_ps()
            };
            for r in 0..R {
                let av = _mm512_set1_ps(*ap.add(r));
                s0[0][r] = _mm512_fmadd_ps(av, b0, s0[0][r]);
                if WIDE {
                    s1[0][r] = _mm512_fmadd_ps(av, b1, s1[0][r]);
                }
            }
            ap = ap.add(8);
            bp = bp.add(ldb);
        }
        for r in 0..R {
            let (mut v0, mut v1) = (s0[0][r], s1[0][r]);
            for p in 1..u {
                v0 = _mm512_add_ps(v0, s0[p][r]);
                v1 = _mm512_add_ps(v1, s1[p][r]);
            }
            c0[r] = v0;
            c1[r] = v1;
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` holds `kc * 6` values and `b` `kc` rows of 16 at
    /// stride `ldb`; `c` addresses 6 rows of 16 values at stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_6x16(
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!(a.len() >= kc * 6 && (kc == 0 || b.len() >= (kc - 1) * ldb + 16));
        let (ap, bp) = (a.as_ptr(), (b.as_ptr(), ldb));
        tile_6x16(kc, ap, bp, c, ldc, accumulate, fused, Ahead::NONE);
    }

    /// [`kernel_6x16`] over `panels` whole tiles side by side (see [`kernel_8x32_panels`]).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; as for [`kernel_8x32_panels`], with 6 rows and tiles 16
    /// columns wide.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_6x16_panels(
        kc: usize,
        a: &[f32],
        (b, ldb, bstep): (*const f32, usize, usize),
        c: *mut f32,
        ldc: usize,
        panels: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        ahead: Ahead,
    ) {
        assert!(a.len() >= kc * 6);
        for t in 0..panels {
            let f = fused.map(|f| f.columns_on(16 * t));
            tile_6x16(
                kc,
                a.as_ptr(),
                (b.add(t * bstep), ldb),
                c.add(16 * t),
                ldc,
                accumulate,
                f.as_ref(),
                ahead.share(t, panels),
            );
        }
    }

    /// [`kernel_8x32_edge`] or [`kernel_6x16_edge`]: a ragged tile with the epilogue fused.
    pub type EdgeKernel = unsafe fn(
        usize,
        &[f32],
        (&[f32], usize),
        *mut f32,
        usize,
        (usize, usize),
        bool,
        Option<&Fused>,
    );

    /// A tile of `rows` ≤ 6 rows and 1 ≤ `cols` ≤ 16 columns (a row panel's or a column
    /// panel's ragged end) with the epilogue fused, through masked loads and stores: one
    /// 8-lane vector per row when `cols` ≤ 8, so a 7 × 7 map's last column (49 = 3 · 16 + 1)
    /// costs half a tile, not a whole one plus a pass through a tile buffer.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` holds `kc * 6` values and `b` `kc` rows of 16 at
    /// stride `ldb` (columns past `cols` may hold anything finite); `c` addresses `rows` rows
    /// of `cols` values at stride `ldc`; `fused`'s residual and column bias cover the same rows
    /// and columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_6x16_edge(
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        assert!(a.len() >= kc * 6 && (kc == 0 || b.len() >= (kc - 1) * ldb + 16));
        assert!((1..=6).contains(&rows) && (1..=16).contains(&cols));
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        if cols <= 8 {
            // Two sums per row (even and odd k): six chains alone wait on the FMA latency.
            let mut s0 = [_mm256_setzero_ps(); 6];
            let mut s1 = [_mm256_setzero_ps(); 6];
            let mut kk = 0;
            while kk + 1 < kc {
                let (b0, b1) = (
                    _mm256_loadu_ps(bp.add(kk * ldb)),
                    _mm256_loadu_ps(bp.add((kk + 1) * ldb)),
                );
                for r in 0..6 {
                    s0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ap.add(kk * 6 + r)), b0, s0[r]);
                    s1[r] =
                        _mm256_fmadd_ps(_mm256_broadcast_ss(&*ap.add((kk + 1) * 6 + r)), b1, s1[r]);
                }
                kk += 2;
            }
            if kk < kc {
                let b0 = _mm256_loadu_ps(bp.add(kk * ldb));
                for (r, s) in s0.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ap.add(kk * 6 + r)), b0, *s);
                }
            }
            for r in 0..rows {
                edge_store(
                    _mm256_add_ps(s0[r], s1[r]),
                    c,
                    ldc,
                    (r, 0),
                    cols,
                    accumulate,
                    fused,
                );
            }
        } else {
            let mut c0 = [_mm256_setzero_ps(); 6];
            let mut c1 = [_mm256_setzero_ps(); 6];
            for kk in 0..kc {
                let b0 = _mm256_loadu_ps(bp.add(kk * ldb));
                let b1 = _mm256_loadu_ps(bp.add(kk * ldb + 8));
                for r in 0..6 {
                    let av = _mm256_broadcast_ss(&*ap.add(kk * 6 + r));
                    c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
                    c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
                }
            }
            for r in 0..rows {
                edge_store(c0[r], c, ldc, (r, 0), 8, accumulate, fused);
                edge_store(c1[r], c, ldc, (r, 8), cols - 8, accumulate, fused);
            }
        }
    }

    /// Row `r`'s 8 lanes from column `j` (`n` ≤ 8 of them inside C) of an edge tile: added to C
    /// when accumulating, the fused epilogue applied, stored through a mask.
    ///
    /// # Safety
    /// As for [`kernel_6x16_edge`]: lanes `j .. j + n` of row `r` lie in C (and in the
    /// epilogue's residual and column bias).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn edge_store(
        mut v: __m256,
        c: *mut f32,
        ldc: usize,
        (r, j): (usize, usize),
        n: usize,
        accumulate: bool,
        fused: Option<&Fused>,
    ) {
        let m = lanes_below(n);
        let t = c.add(r * ldc + j);
        if accumulate {
            v = _mm256_add_ps(v, _mm256_maskload_ps(t, m));
        }
        if let Some(f) = fused {
            if !f.bias.is_null() {
                v = _mm256_add_ps(v, _mm256_set1_ps(*f.bias.add(r)));
            }
            if !f.col_bias.is_null() {
                v = _mm256_add_ps(v, _mm256_maskload_ps(f.col_bias.add(j), m));
            }
            if !f.residual.is_null() {
                v = _mm256_add_ps(v, _mm256_maskload_ps(f.residual.add(r * ldc + j), m));
            }
            // max(lo, x) and min(hi, x) return x when x is NaN.
            v = _mm256_min_ps(_mm256_set1_ps(f.hi), _mm256_max_ps(_mm256_set1_ps(f.lo), v));
            if f.gelu {
                v = gelu(v);
            }
        }
        _mm256_maskstore_ps(t, m, v);
    }

    /// The exact GELU, x · (1 + erf(x / √2)) / 2, with [`crate::kernels::act::erf_fast`]'s
    /// rational erf, on 8 lanes (NaN stays NaN).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu(x: __m256) -> __m256 {
        use crate::kernels::act::{ERF_CLAMP, ERF_P, ERF_Q};
        let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        // max / min return their second operand for NaN: z stays NaN.
        let z = _mm256_max_ps(_mm256_set1_ps(-ERF_CLAMP), z);
        let z = _mm256_min_ps(_mm256_set1_ps(ERF_CLAMP), z);
        let u = _mm256_mul_ps(z, z);
        let mut p = _mm256_set1_ps(ERF_P[6]);
        for &c in ERF_P[..6].iter().rev() {
            p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(c));
        }
        let mut q = _mm256_set1_ps(ERF_Q[4]);
        for &c in ERF_Q[..4].iter().rev() {
            q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(c));
        }
        let erf = _mm256_div_ps(_mm256_mul_ps(z, p), q);
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_x, erf, half_x)
    }

    /// The body of [`kernel_6x16`] on raw pointers.
    ///
    /// # Safety
    /// As for [`kernel_6x16`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_6x16(
        kc: usize,
        mut ap: *const f32,
        (mut bp, ldb): (*const f32, usize),
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        ahead: Ahead,
    ) {
        let mut c0 = [_mm256_setzero_ps(); 6];
        let mut c1 = [_mm256_setzero_ps(); 6];
        let mut step = |ap: &mut *const f32, bp: &mut *const f32| {
            let b0 = _mm256_loadu_ps(*bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for r in 0..6 {
                let av = _mm256_broadcast_ss(&*ap.add(r));
                c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
            }
            *ap = ap.add(6);
            *bp = bp.add(ldb);
        };
        // Four k-steps per loop trip. One step per trip ran at 0.83-0.93 of this rate (Zen 3, one
        // thread, ViT-Tiny's qkv tiles with A and B in L2, variants interleaved in one process);
        // whole ViT-Tiny frames, alternating in one process, took 0.945 (1 thread) and 0.966
        // (2 threads) of their time; ResNet-50 0.99-1.00.
        let mut drip = Drip::new(ahead, kc / 4);
        for trip in 0..kc / 4 {
            drip.tick(trip);
            step(&mut ap, &mut bp);
            step(&mut ap, &mut bp);
            step(&mut ap, &mut bp);
            step(&mut ap, &mut bp);
        }
        for _ in 0..kc % 4 {
            step(&mut ap, &mut bp);
        }
        // As for the AVX-512 tile (frames alternating in one process, `EDGEINFER_ISA=avx2`
        // on a Zen 5 host: ViT-Tiny 0.988x at 1 thread, 0.992x at 2; the CNNs level).
        store_6x16(c, ldc, accumulate, fused, &mut c0, &mut c1);
    }

    /// The 6 × 16 tile's epilogue with the operand checks made once, outside the rows, so the
    /// rows unroll and the sums stay in registers.
    #[inline(always)]
    unsafe fn store_6x16(
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fused: Option<&Fused>,
        c0: &mut [__m256; 6],
        c1: &mut [__m256; 6],
    ) {
        if accumulate {
            for r in 0..6 {
                let t = c.add(r * ldc);
                c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(t));
                c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(t.add(8)));
            }
        }
        if let Some(f) = fused {
            if !f.bias.is_null() {
                for r in 0..6 {
                    let bb = _mm256_set1_ps(*f.bias.add(r));
                    c0[r] = _mm256_add_ps(c0[r], bb);
                    c1[r] = _mm256_add_ps(c1[r], bb);
                }
            }
            if !f.col_bias.is_null() {
                let (b0, b1) = (
                    _mm256_loadu_ps(f.col_bias),
                    _mm256_loadu_ps(f.col_bias.add(8)),
                );
                for r in 0..6 {
                    c0[r] = _mm256_add_ps(c0[r], b0);
                    c1[r] = _mm256_add_ps(c1[r], b1);
                }
            }
            if !f.residual.is_null() {
                for r in 0..6 {
                    let rr = f.residual.add(r * ldc);
                    c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(rr));
                    c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(rr.add(8)));
                }
            }
            // max(lo, x) and min(hi, x) return x when x is NaN.
            let (lo, hi) = (_mm256_set1_ps(f.lo), _mm256_set1_ps(f.hi));
            for r in 0..6 {
                c0[r] = _mm256_min_ps(hi, _mm256_max_ps(lo, c0[r]));
                c1[r] = _mm256_min_ps(hi, _mm256_max_ps(lo, c1[r]));
            }
            if f.gelu {
                for r in 0..6 {
                    c0[r] = gelu(c0[r]);
                    c1[r] = gelu(c1[r]);
                }
            }
        }
        for r in 0..6 {
            let t = c.add(r * ldc);
            _mm256_storeu_ps(t, c0[r]);
            _mm256_storeu_ps(t.add(8), c1[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::rand;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Every packed value against the layout's definition, for every micro-kernel, both
    /// operand orders (rows contiguous or columns contiguous), ragged sizes and the parallel
    /// path; rows past m must be zero even in a reused buffer.
    #[test]
    fn packed_a_holds_a_in_panel_order() {
        for isa in Isa::available() {
            let mr = isa.mr();
            for &(m, k) in &[
                (1usize, 1usize),
                (8, 8),
                (13, 19),
                (197, 192),
                (61, 300),
                (300, 260),
            ] {
                let a = rand(m * k, (m * 31 + k) as u64);
                for &(rs, cs) in &[(k, 1usize), (1, m)] {
                    let p = PackedA::pack_into(
                        vec![f32::NAN; m.div_ceil(mr) * mr * k].into(),
                        isa,
                        &a,
                        m,
                        k,
                        rs,
                        cs,
                    );
                    for k0 in (0..k).step_by(KC) {
                        let kc = KC.min(k - k0);
                        for pi in 0..m.div_ceil(mr) {
                            let panel = p.panel(k0, pi);
                            for kk in 0..kc {
                                for r in 0..mr {
                                    let i = pi * mr + r;
                                    let want = if i < m {
                                        a[i * rs + (k0 + kk) * cs]
                                    } else {
                                        0.0
                                    };
                                    assert_eq!(
                                        panel[kk * mr + r],
                                        want,
                                        "{isa:?} m {m} k {k} rs {rs} cs {cs} at ({i}, {})",
                                        k0 + kk
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_naive_over_odd_shapes_and_every_kernel() {
        for isa in Isa::available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (7, 3, 5),
                (13, 300, 37),
                (64, 576, 300),
                (33, 257, 65),
                (5, 600, 1),
                // A last row panel of 1 and 2 rows over odd k: the edge kernel's split sums.
                (17, 7, 40),
                (10, 9, 64),
            ] {
                let a = rand(m * k, 1);
                let b = rand(k * n, 2);
                let want = naive(&a, &b, m, k, n);
                let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
                let mut c = vec![f32::NAN; m * n];
                gemm(
                    &pa,
                    &MatrixB {
                        data: &b,
                        rs: n,
                        cs: 1,
                    },
                    n,
                    &mut c,
                    Layout { rs: n, cs: 1 },
                    &Epilogue::default(),
                );
                let err = c
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4 * (k as f32).sqrt(),
                    "{isa:?} {m}x{k}x{n}: max err {err}"
                );
            }
        }
    }

    #[test]
    fn epilogue_and_transposed_layouts() {
        let (m, k, n) = (10, 40, 23);
        let a = rand(m * k, 3);
        let b = rand(k * n, 4);
        let bias = rand(m, 5);
        let res = rand(m * n, 6);
        let mut want = naive(&a, &b, m, k, n);
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (want[i * n + j] + bias[i] + res[i * n + j]).max(0.0);
            }
        }
        for isa in Isa::available() {
            // A given transposed (column-major), B transposed, C written transposed.
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            let rt: Vec<f32> = (0..n * m).map(|x| res[(x % m) * n + x / m]).collect();
            let pa = PackedA::pack_for(isa, &at, m, k, 1, m);
            let mut ct = vec![0f32; m * n];
            let epi = Epilogue {
                bias: Some(&bias),
                residual: Some(&rt),
                activation: Some(Activation::Relu),
                col_bias: None,
            };
            gemm(
                &pa,
                &MatrixB {
                    data: &bt,
                    rs: 1,
                    cs: k,
                },
                n,
                &mut ct,
                Layout { rs: 1, cs: m },
                &epi,
            );
            for i in 0..m {
                for j in 0..n {
                    let d = (ct[j * m + i] - want[i * n + j]).abs();
                    assert!(
                        d < 1e-4,
                        "{isa:?} ({i},{j}): {} vs {}",
                        ct[j * m + i],
                        want[i * n + j]
                    );
                }
            }
        }
    }

    /// Activations that cannot run in registers are applied per row panel after the last
    /// tile (deferred), and the exact GELU in the AVX2 kernels' registers: over ragged tiles,
    /// several column chunks, with every other term, for every ISA.
    #[test]
    fn deferred_activations_follow_bias_and_residual() {
        for act in [
            Activation::Gelu { tanh: false },
            Activation::Sigmoid,
            Activation::HardSwish,
        ] {
            for &(m, k, n) in &[(37usize, 70usize, 300usize), (5, 3, 17), (64, 260, 64)] {
                let (a, b) = (rand(m * k, 11), rand(k * n, 12));
                let (bias, cb, res) = (rand(m, 13), rand(n, 14), rand(m * n, 15));
                let mut want = naive(&a, &b, m, k, n);
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] += bias[i] + cb[j] + res[i * n + j];
                    }
                }
                crate::kernels::act::apply_activation(Some(act), &mut want);
                for isa in Isa::available() {
                    let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
                    let mut c = vec![f32::NAN; m * n];
                    let epi = Epilogue {
                        bias: Some(&bias),
                        col_bias: Some(&cb),
                        residual: Some(&res),
                        activation: Some(act),
                    };
                    let rhs = MatrixB {
                        data: &b,
                        rs: n,
                        cs: 1,
                    };
                    gemm(&pa, &rhs, n, &mut c, Layout { rs: n, cs: 1 }, &epi);
                    for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() < 1e-4,
                            "{act:?} {isa:?} {m}x{k}x{n} at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A NaN product stays NaN through the in-register GELU (and the deferred one), on whole
    /// and ragged tiles alike; its neighbours are untouched.
    #[test]
    fn gelu_epilogue_keeps_nan() {
        let (m, k, n) = (13usize, 9usize, 40usize);
        let mut a = rand(m * k, 21);
        a[7 * k + 3] = f32::NAN; // row 7: every product NaN
        let b = rand(k * n, 22);
        for isa in Isa::available() {
            let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
            let mut c = vec![0f32; m * n];
            let epi = Epilogue {
                activation: Some(Activation::Gelu { tanh: false }),
                ..Default::default()
            };
            let rhs = MatrixB {
                data: &b,
                rs: n,
                cs: 1,
            };
            gemm(&pa, &rhs, n, &mut c, Layout { rs: n, cs: 1 }, &epi);
            for (i, v) in c.iter().enumerate() {
                assert_eq!(v.is_nan(), i / n == 7, "{isa:?} at {i}: {v}");
            }
        }
    }

    #[test]
    fn prepacked_right_operand_with_column_bias() {
        for &(m, k, n) in &[(197, 192, 576), (3, 300, 40), (1, 5, 33), (9, 600, 64)] {
            let a = rand(m * k, 7);
            let b = rand(k * n, 8);
            let cb = rand(n, 9);
            let mut want = naive(&a, &b, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += cb[j];
                }
            }
            // B given as stored (k × n) and as its transpose (n × k, a Gemm with transB).
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            for pb in [
                PackedB::pack(&b, k, n, n, 1),
                PackedB::pack(&bt, k, n, 1, k),
            ] {
                let pa = PackedA::pack(&a, m, k, k, 1);
                let mut c = vec![f32::NAN; m * n];
                let epi = Epilogue {
                    col_bias: Some(&cb),
                    ..Default::default()
                };
                gemm(&pa, &pb, n, &mut c, Layout { rs: n, cs: 1 }, &epi);
                let err = c
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4 * (k as f32).sqrt(), "{m}x{k}x{n}: max err {err}");
            }
        }
    }

    /// Unpacking gives back the matrix that was packed (a channels-last block repacks its
    /// weights from it), for every packing and across KC blocks.
    #[test]
    fn unpack_inverts_pack() {
        for isa in Isa::available() {
            for &(m, k) in &[(1usize, 1usize), (13, 19), (61, 300), (8, 512)] {
                let a = rand(m * k, (m + 7 * k) as u64);
                assert_eq!(
                    PackedA::pack_for(isa, &a, m, k, k, 1).unpack(),
                    a,
                    "{isa:?} {m}x{k}"
                );
                let b = rand(m * k, (3 * m + k) as u64);
                assert_eq!(
                    PackedB::pack_for(isa, &b, k, m, m, 1).unpack(),
                    b,
                    "B {isa:?} {k}x{m}"
                );
            }
        }
    }

    /// One row times a prepacked matrix, for every micro-kernel's packing: deep k (several KC
    /// blocks, k not a multiple of 4), ragged n, column bias, residual and an activation.
    #[test]
    fn gemv_matches_naive() {
        for isa in Isa::available() {
            for &(k, n) in &[(1280, 1000), (300, 37), (5, 33), (520, 64), (3, 1)] {
                let x = rand(k, 21);
                let b = rand(k * n, 22);
                let cb = rand(n, 23);
                let r = rand(n, 24);
                let mut want = naive(&x, &b, 1, k, n);
                for j in 0..n {
                    want[j] = (want[j] + cb[j] + r[j]).max(0.0);
                }
                let pb = PackedB::pack_for(isa, &b, k, n, n, 1);
                let mut y = vec![f32::NAN; n];
                let epi = Epilogue {
                    col_bias: Some(&cb),
                    residual: Some(&r),
                    activation: Some(Activation::Relu),
                    ..Default::default()
                };
                for threads in [1, 2] {
                    let pool = std::sync::Arc::new(par::SpinPool::new(threads).unwrap());
                    pool.install(|| gemv(&x, &pb, &mut y, &epi));
                    let err = y
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err < 1e-4 * (k as f32).sqrt(),
                        "{isa:?} {k}x{n}, {threads} threads: max err {err}"
                    );
                }
            }
        }
    }

    /// Every way `gemm` splits its work over threads (column chunks, row parts, rows only when
    /// the columns are few) computes the same product: maps of 196, 49 and 5 positions and a
    /// wide one, bias, residual and ReLU fused, 1 to 3 threads.
    #[test]
    fn gemm_splits_agree_across_threads() {
        for isa in Isa::available() {
            for &(m, k, n) in &[(96, 40, 196), (130, 24, 49), (64, 9, 5), (24, 16, 1100)] {
                let a = rand(m * k, (m + n) as u64);
                let b = rand(k * n, 31);
                let bias = rand(m, 32);
                let res = rand(m * n, 33);
                let mut want = naive(&a, &b, m, k, n);
                for (i, row) in want.chunks_exact_mut(n).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (*v + bias[i] + res[i * n + j]).max(0.0);
                    }
                }
                let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
                let epi = Epilogue {
                    bias: Some(&bias),
                    residual: Some(&res),
                    activation: Some(Activation::Relu),
                    ..Default::default()
                };
                for threads in [1, 2, 3] {
                    let pool = std::sync::Arc::new(par::SpinPool::new(threads).unwrap());
                    let mut c = vec![f32::NAN; m * n];
                    let rhs = MatrixB {
                        data: &b,
                        rs: n,
                        cs: 1,
                    };
                    pool.install(|| gemm(&pa, &rhs, n, &mut c, Layout { rs: n, cs: 1 }, &epi));
                    let err = c
                        .iter()
                        .zip(&want)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-4, "{isa:?} {m}x{k}x{n}, {threads} threads: {err}");
                }
            }
        }
    }

    /// A ragged last column panel of 1–4 columns (the narrow kernel on AVX-512: rows in the
    /// lanes, one to four row panels a call) over row counts that leave odd panel counts and
    /// partial panels, one and two k blocks, with every fused epilogue operand and NaN kept.
    #[test]
    fn narrow_ragged_panels_match_naive() {
        for isa in Isa::available() {
            let nr = isa.nr();
            for &m in &[3usize, 8, 19, 33, 40] {
                for &k in &[7usize, 300] {
                    for (case, &n) in [1usize, nr + 2, 6 * nr + 4, 2 * nr + 3].iter().enumerate() {
                        let mut a = rand(m * k, (m * 7 + k + n) as u64);
                        if case == 1 {
                            a[k] = f32::NAN; // row 1 of C becomes NaN
                        }
                        let b = rand(k * n, 41 + case as u64);
                        let bias = rand(m, 42);
                        let col_bias = rand(n, 43);
                        let res = rand(m * n, 44);
                        let mut want = naive(&a, &b, m, k, n);
                        for (i, row) in want.chunks_exact_mut(n).enumerate() {
                            for (j, v) in row.iter_mut().enumerate() {
                                let x = *v + bias[i] + col_bias[j] + res[i * n + j];
                                *v = if x.is_nan() { x } else { x.clamp(-0.5, 6.0) };
                            }
                        }
                        let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
                        let epi = Epilogue {
                            bias: Some(&bias),
                            col_bias: Some(&col_bias),
                            residual: Some(&res),
                            activation: Some(Activation::Clip {
                                min: Some(-0.5),
                                max: Some(6.0),
                            }),
                        };
                        let pb = PackedB::pack_for(isa, &b, k, n, n, 1);
                        for threads in [1, 2] {
                            let pool = std::sync::Arc::new(par::SpinPool::new(threads).unwrap());
                            let plain = MatrixB {
                                data: &b,
                                rs: n,
                                cs: 1,
                            };
                            let sources: [&dyn BSource; 2] = [&plain, &pb];
                            for rhs in sources {
                                let mut c = vec![f32::NAN; m * n];
                                pool.install(|| {
                                    gemm(&pa, rhs, n, &mut c, Layout { rs: n, cs: 1 }, &epi)
                                });
                                for (idx, (g, w)) in c.iter().zip(&want).enumerate() {
                                    let ok = if w.is_nan() {
                                        g.is_nan()
                                    } else {
                                        (g - w).abs() < 1e-3
                                    };
                                    assert!(
                                        ok,
                                        "{isa:?} {m}x{k}x{n} {threads}T [{idx}]: {g} vs {w}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The fused register epilogue (whole tiles) keeps NaN through ReLU/Clip, adds row bias and
    /// residual, and matches the pass-over-the-tile epilogue of partial tiles.
    #[test]
    fn fused_epilogue_keeps_nan_and_matches_partial_tiles() {
        for isa in Isa::available() {
            let (m, k, n) = (2 * isa.mr() + 3, 20, 2 * isa.nr() + 5);
            let mut a = rand(m * k, 11);
            a[0] = f32::NAN; // row 0 of C becomes NaN
            let b = rand(k * n, 12);
            let bias = rand(m, 13);
            let res = rand(m * n, 14);
            let mut want = naive(&a, &b, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let v = want[i * n + j] + bias[i] + res[i * n + j];
                    want[i * n + j] = if v.is_nan() { v } else { v.clamp(0.0, 6.0) };
                }
            }
            let pa = PackedA::pack_for(isa, &a, m, k, k, 1);
            let mut c = vec![0f32; m * n];
            let epi = Epilogue {
                bias: Some(&bias),
                residual: Some(&res),
                activation: Some(Activation::Clip {
                    min: Some(0.0),
                    max: Some(6.0),
                }),
                col_bias: None,
            };
            gemm(
                &pa,
                &MatrixB {
                    data: &b,
                    rs: n,
                    cs: 1,
                },
                n,
                &mut c,
                Layout { rs: n, cs: 1 },
                &epi,
            );
            for (idx, (g, w)) in c.iter().zip(&want).enumerate() {
                if w.is_nan() {
                    assert!(g.is_nan(), "{isa:?} [{idx}]: {g} should be NaN");
                } else {
                    assert!((g - w).abs() < 1e-4, "{isa:?} [{idx}]: {g} vs {w}");
                }
            }
        }
    }
}
