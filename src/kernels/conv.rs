//! 2-D convolution as a GEMM over packed weights: `out[co, p] = W[co, (ci, ky, kx)] · cols[(ci,
//! ky, kx), p]`, where the column matrix is never built whole: [`Im2col`] packs the `KC × NC`
//! block the GEMM asks for straight from the NCHW input. Bias (folded BatchNorm), a residual
//! add and the activation run in the GEMM's epilogue, so the output is written once.

use super::act::apply_activation;
use super::gemm::{gemm, gemm_into, BSource, Epilogue, Isa, Layout, MatrixB, PackedA, PackedB};
use super::{par, scratch};
use crate::graph::Activation;
use std::cell::RefCell;

/// Which operand the output positions are (see [`PackedConv::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPacking {
    /// Whichever wastes less of the micro-kernel's tiles for this input size (`None`: unknown
    /// size, direct).
    Auto(Option<(usize, usize)>),
    /// Output positions are GEMM columns.
    Direct,
    /// Output positions are GEMM rows.
    Transposed,
}

/// How the weights are packed, which decides which GEMM operand the output positions are.
#[derive(Debug, Clone)]
enum Form {
    /// `out[co, p] = W · cols`: weights are the left operand (rows = output channels), output
    /// positions the columns (tiles of `NR`). One matrix per group.
    Direct(Vec<PackedA>),
    /// `outᵀ[p, co] = colsᵀ · Wᵀ`: output positions are the rows (tiles of `MR`), for small
    /// maps (7 × 7 = 49 positions fill 64 columns but 56 rows), transposed back on the way
    /// out. One matrix per group.
    Transposed(Vec<PackedB>),
    /// By taps: output channels along the vector lanes, output positions broadcast from the
    /// padded input (see [`super::taps`]). Single group, kernels larger than 1 × 1.
    #[cfg(target_arch = "x86_64")]
    Taps(super::taps::TapWeights),
}

/// A convolution's fixed parameters with its weights packed for the GEMM micro-kernel.
#[derive(Debug, Clone)]
pub struct PackedConv {
    form: Form,
    groups: usize,
    bias: Option<Vec<f32>>,
    cout: usize,
    cin_g: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    pad_begin: (usize, usize),
    pad_end: (usize, usize),
}

/// Why a convolution cannot take the native path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSupported(pub String);

impl PackedConv {
    /// Packs `weight` (`[cout, cin/group, kh, kw]`, row-major) and `bias` (`[cout]`).
    /// `strides`, `dilations` are per spatial axis (y, x); `pads` are begins then ends.
    /// `packing` picks the GEMM form; `Auto` with the (static) input size picks the one that
    /// wastes least of the micro-kernel's tiles.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weight: &[f32],
        wshape: &[usize],
        bias: Option<&[f32]>,
        strides: &[usize],
        pads: &[usize],
        dilations: &[usize],
        group: usize,
        packing: ConvPacking,
    ) -> Result<PackedConv, NotSupported> {
        let bad = |s: String| Err(NotSupported(s));
        if wshape.len() != 4 || strides.len() != 2 || dilations.len() != 2 || pads.len() != 4 {
            return bad(format!("not a 2-D convolution (weight {wshape:?})"));
        }
        let (cout, cin_g, kh, kw) = (wshape[0], wshape[1], wshape[2], wshape[3]);
        if group == 0 || cout % group != 0 || weight.len() != cout * cin_g * kh * kw {
            return bad(format!(
                "weight {wshape:?} does not split into {group} groups"
            ));
        }
        if strides.contains(&0) || dilations.contains(&0) || kh == 0 || kw == 0 {
            return bad("zero stride, dilation or kernel size".into());
        }
        if let Some(b) = bias {
            if b.len() != cout {
                return bad(format!("bias of {} values for {cout} channels", b.len()));
            }
        }
        let cout_g = cout / group;
        let k = cin_g * kh * kw;
        let slice = |g: usize| &weight[g * cout_g * k..(g + 1) * cout_g * k];
        // Padded work of each form: output channels × positions, each rounded up to its tile.
        let isa = Isa::detect();
        let (mr, nr) = (isa.mr(), isa.nr());
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let positions = |(h, w): (usize, usize)| {
            let oh = (h + pads[0] + pads[2]).checked_sub(span(kh, dilations[0]))? / strides[0] + 1;
            let ow = (w + pads[1] + pads[3]).checked_sub(span(kw, dilations[1]))? / strides[1] + 1;
            Some(oh * ow)
        };
        let transposed = match packing {
            ConvPacking::Direct => false,
            ConvPacking::Transposed => true,
            ConvPacking::Auto(hw) => hw.and_then(positions).is_some_and(|p| {
                // Multiply-adds including the tiles' padding, plus, for the transposed form,
                // transposing the result back (≈ 24 multiply-adds per output element,
                // measured) and, for a 1 × 1 layer, packing its left operand: the direct
                // form reads a pointwise layer's input in place, the transposed one copies
                // all of it (≈ 30 multiply-adds per value, measured: 384 → 64 at 14 × 14 ran
                // 45 µs direct, 67 µs transposed). It wins on small maps with a deep K (3 × 3
                // layers, and 1 × 1 ones at 7 × 7).
                let pointwise = (kh, kw) == (1, 1) && pads.iter().all(|&p| p == 0);
                let pack = if pointwise { 30 * p * k } else { 0 };
                // A last panel of at most nr / 2 columns costs half a panel, which matters
                // where the direct form reads its input in place (512 → 1024 at 14 × 14,
                // stride 2: 1.07 ms direct, 1.14 transposed); a 3 × 3 layer packs that panel
                // too and measured faster transposed on 14 × 14 maps either way.
                let cols = match p % nr {
                    r if pointwise && r > 0 && r <= nr / 2 => p - r + nr / 2,
                    _ => p.div_ceil(nr) * nr,
                };
                let direct = cout_g.div_ceil(mr) * mr * cols * k;
                let trans =
                    p.div_ceil(mr) * mr * cout_g.div_ceil(nr) * nr * k + 24 * p * cout_g + pack;
                (trans as f64) < 0.97 * direct as f64
            }),
        };
        let taps = matches!(packing, ConvPacking::Auto(_))
            && group == 1
            && dilations == [1, 1]
            && kh * kw > 1;
        let form = if let Some(f) = taps.then(|| taps_form(weight, wshape, bias)).flatten() {
            f
        } else if transposed {
            Form::Transposed(
                (0..group)
                    .map(|g| PackedB::pack(slice(g), k, cout_g, 1, k))
                    .collect(),
            )
        } else {
            Form::Direct(
                (0..group)
                    .map(|g| PackedA::pack(slice(g), cout_g, k, k, 1))
                    .collect(),
            )
        };
        Ok(PackedConv {
            form,
            groups: group,
            bias: bias.map(<[f32]>::to_vec),
            cout,
            cin_g,
            kernel: (kh, kw),
            stride: (strides[0], strides[1]),
            dilation: (dilations[0], dilations[1]),
            pad_begin: (pads[0], pads[1]),
            pad_end: (pads[2], pads[3]),
        })
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin_g * self.groups
    }

    /// The bias (folded BatchNorm), one value per output channel.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `Wᵀ` (`[k, cout]`) packed as the right operand, when this single-group convolution is
    /// packed in the transposed form.
    pub fn transposed(&self) -> Option<&PackedB> {
        match &self.form {
            Form::Transposed(ws) if self.groups == 1 => ws.first(),
            _ => None,
        }
    }

    /// Repacks direct-form weights in the transposed form (for a channels-last block, which
    /// multiplies positions by `Wᵀ`); the convolution computes the same either way.
    pub fn make_transposed(&mut self) {
        if let Form::Direct(ws) = &self.form {
            let k = self.cin_g * self.kernel.0 * self.kernel.1;
            let cout_g = self.cout / self.groups;
            let packed = ws
                .iter()
                .map(|a| PackedB::pack(&a.unpack(), k, cout_g, 1, k))
                .collect();
            self.form = Form::Transposed(packed);
        }
    }

    /// Whether this is a 1 × 1, stride-1, unpadded, single-group convolution, in either form.
    pub fn is_one_by_one(&self) -> bool {
        self.kernel == (1, 1)
            && self.stride == (1, 1)
            && self.dilation == (1, 1)
            && self.pad_begin == (0, 0)
            && self.pad_end == (0, 0)
            && self.groups == 1
    }

    /// Whether this is a plain pointwise product (1 × 1, stride 1, no padding, one group, weights
    /// as the left operand): what [`PackedConv::pointwise_into`] runs.
    pub fn is_pointwise(&self) -> bool {
        self.is_one_by_one() && matches!(self.form, Form::Direct(_))
    }

    /// Whether [`PackedConv::run_blocked`] takes this convolution: the by-taps form, whose
    /// output channels come in whole blocks of 8.
    pub fn writes_blocked(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Form::Taps(_) = &self.form {
            return self.cout.is_multiple_of(8);
        }
        false
    }

    /// [`PackedConv::run`] writing NCHWc8 (`[n][cout / 8][oh · ow][8]`,
    /// [`super::nchwc`]); `residual`, when given, is laid out the same. The input stays NCHW.
    /// Only where [`PackedConv::writes_blocked`].
    pub fn run_blocked(
        &self,
        x: &[f32],
        (n, cin, h, w): (usize, usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
    ) -> Result<(), NotSupported> {
        let bad = |what: &str| Err(NotSupported(format!("blocked output: {what}")));
        if !self.writes_blocked() {
            return bad("only the by-taps form writes it");
        }
        if cin != self.cin() || x.len() != n * cin * h * w {
            return bad("input of the wrong size");
        }
        let Some((oh, ow)) = self.out_hw(h, w) else {
            return bad("input smaller than the kernel");
        };
        let osz = self.cout * oh * ow;
        if out.len() != n * osz || residual.is_some_and(|r| r.len() != out.len()) {
            return bad("output or residual of the wrong size");
        }
        #[cfg(target_arch = "x86_64")]
        if let Form::Taps(wts) = &self.form {
            let dims = (n, cin, h, w);
            return self.run_taps(wts, x, dims, (oh, ow), residual, activation, out, true);
        }
        let _ = (residual, activation, osz);
        bad("only the by-taps form writes it")
    }

    /// The by-taps form image by image; `blocked`: output and residual NCHWc8.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn run_taps(
        &self,
        wts: &super::taps::TapWeights,
        x: &[f32],
        (n, cin, h, w): (usize, usize, usize, usize),
        out_hw: (usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
        blocked: bool,
    ) -> Result<(), NotSupported> {
        let shape = super::taps::Shape {
            cin,
            h,
            w,
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad_begin,
            out: out_hw,
        };
        let (isz, osz) = (cin * h * w, self.cout * out_hw.0 * out_hw.1);
        for img in 0..n {
            super::taps::run(
                wts,
                &x[img * isz..(img + 1) * isz],
                shape,
                residual.map(|r| &r[img * osz..(img + 1) * osz]),
                activation,
                &mut out[img * osz..(img + 1) * osz],
                blocked,
            )?;
        }
        Ok(())
    }

    /// For an unpadded, single-group 1 × 1 convolution (any stride, either GEMM form): its
    /// weights back as a row-major `[cout, cin]` matrix (for repacking in another layout's
    /// form), and its stride.
    pub fn one_by_one_matrix(&self) -> Option<(Vec<f32>, (usize, usize))> {
        let unpadded = self.pad_begin == (0, 0) && self.pad_end == (0, 0);
        if self.kernel != (1, 1) || !unpadded || self.groups != 1 {
            return None;
        }
        match &self.form {
            Form::Direct(ws) => Some((ws.first()?.unpack(), self.stride)),
            // Packed as Wᵀ (`[cin, cout]`): transposed back.
            Form::Transposed(ws) => {
                let wt = ws.first()?.unpack();
                let mut w = vec![0f32; wt.len()];
                super::layout::transpose(&wt, &[self.cin_g, self.cout], &[1, 0], &mut w)
                    .then_some((w, self.stride))
            }
            #[cfg(target_arch = "x86_64")]
            Form::Taps(_) => None,
        }
    }

    /// `out[co, j] = act(Σ_ci W[co, ci] · x[ci · x_rs + j] + bias[co] (+ residual))` for the
    /// `n` columns `j` of a pointwise convolution, where C's rows are `out_rs` apart (a band of
    /// rows of a larger map). `residual` is laid out like C.
    ///
    /// # Safety
    /// Only for [`PackedConv::is_pointwise`] convolutions (checked, panics otherwise). `x` must
    /// hold `(cin - 1) · x_rs + n` values; `out` must address `co · out_rs + j` for every
    /// `co < cout`, `j < n`, and no other code may access those elements during the call;
    /// `residual`, when given, must hold `(cout - 1) · out_rs + n` values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pointwise_into(
        &self,
        x: &[f32],
        x_rs: usize,
        n: usize,
        out: *mut f32,
        out_rs: usize,
        residual: Option<&[f32]>,
        activation: Option<Activation>,
    ) {
        let Form::Direct(ws) = &self.form else {
            panic!("pointwise_into on a transposed convolution");
        };
        assert!(self.is_pointwise() && n > 0 && x.len() + x_rs >= self.cin() * x_rs + n);
        let epi = Epilogue {
            bias: self.bias.as_deref(),
            col_bias: None,
            residual,
            activation,
        };
        let b = MatrixB {
            data: x,
            rs: x_rs,
            cs: 1,
        };
        // SAFETY: the caller's contract covers C and the residual.
        unsafe { gemm_into(&ws[0], &b, n, out, Layout { rs: out_rs, cs: 1 }, &epi) }
    }

    /// Output height and width for an `h × w` input, `None` when the kernel does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let span = |k: usize, d: usize| d * (k - 1) + 1;
        let oh = (h + self.pad_begin.0 + self.pad_end.0)
            .checked_sub(span(self.kernel.0, self.dilation.0))?
            / self.stride.0
            + 1;
        let ow = (w + self.pad_begin.1 + self.pad_end.1)
            .checked_sub(span(self.kernel.1, self.dilation.1))?
            / self.stride.1
            + 1;
        Some((oh, ow))
    }

    /// Runs on `x` (`[n, cin, h, w]`), writing `out` (`[n, cout, oh, ow]`); `residual`, laid
    /// out like `out`, is added before the activation.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        x: &[f32],
        (n, cin, h, w): (usize, usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
    ) -> Result<(), NotSupported> {
        let group = self.groups;
        if cin != self.cin_g * group || x.len() != n * cin * h * w {
            return Err(NotSupported(format!(
                "input [{n}, {cin}, {h}, {w}] for a convolution of {} input channels",
                self.cin_g * group
            )));
        }
        let (oh, ow) = self
            .out_hw(h, w)
            .ok_or_else(|| NotSupported(format!("input {h}×{w} is smaller than the kernel")))?;
        let plane = oh * ow;
        if out.len() != n * self.cout * plane || residual.is_some_and(|r| r.len() != out.len()) {
            return Err(NotSupported("output or residual of the wrong size".into()));
        }
        let cout_g = self.cout / group;
        let one_by_one =
            self.kernel == (1, 1) && self.pad_begin == (0, 0) && self.pad_end == (0, 0);
        // A strided 1 × 1 convolution (a ResNet downsample) reads one input position in
        // `sy · sx`: the input is subsampled first (a quarter of it for stride 2) and the rest
        // runs as a plain GEMM, instead of phase-splitting the whole input for im2col.
        let subsample = one_by_one && self.stride != (1, 1);
        #[cfg(target_arch = "x86_64")]
        if let Form::Taps(wts) = &self.form {
            let dims = (n, cin, h, w);
            return self.run_taps(wts, x, dims, (oh, ow), residual, activation, out, false);
        }
        for img in 0..n {
            for g in 0..group {
                let xg = &x[(img * cin + g * self.cin_g) * h * w
                    ..(img * cin + (g + 1) * self.cin_g) * h * w];
                let sub = subsample.then(|| {
                    let (sy, sx) = self.stride;
                    let mut v = scratch::take(self.cin_g * plane);
                    let one = |c: usize, dst: &mut [f32]| {
                        let src = &xg[c * h * w..(c + 1) * h * w];
                        for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                            let line = &src[oy * sy * w..(oy * sy + 1) * w];
                            if sx == 2 {
                                take_even(line, row);
                            } else {
                                for (o, &v) in row.iter_mut().zip(line.iter().step_by(sx)) {
                                    *o = v;
                                }
                            }
                        }
                    };
                    // Channels across the threads: copied by the calling thread alone, the
                    // subsample held the other one waiting (per node, in frame, 2 threads:
                    // ResNet-50's downsamples 0.63 → 0.56, 0.66 → 0.62, 0.74 → 0.68 ms).
                    let threads = par::current_threads().max(1);
                    let per = self.cin_g.div_ceil(4 * threads).max(1);
                    par::par_chunks_mut(&mut v[..self.cin_g * plane], per * plane, |t, d| {
                        for (i, dst) in d.chunks_exact_mut(plane).enumerate() {
                            one(t * per + i, dst);
                        }
                    });
                    v
                });
                // From here on the input of a pointwise product: `plane` positions per channel.
                let pointwise = one_by_one && (subsample || self.stride == (1, 1));
                let xg: &[f32] = sub.as_deref().unwrap_or(xg);
                let c0 = (img * self.cout + g * cout_g) * plane;
                let c1 = c0 + cout_g * plane;
                let bias = self
                    .bias
                    .as_deref()
                    .map(|b| &b[g * cout_g..(g + 1) * cout_g]);
                let res = residual.map(|r| &r[c0..c1]);
                let cols = (!pointwise).then(|| Im2col::new(self, xg, h, w, ow));
                match &self.form {
                    Form::Direct(ws) => {
                        let epi = Epilogue {
                            col_bias: None,
                            bias,
                            residual: res,
                            activation,
                        };
                        let layout = Layout { rs: plane, cs: 1 };
                        match &cols {
                            Some(cols) => gemm(&ws[g], cols, plane, &mut out[c0..c1], layout, &epi),
                            None => {
                                let b = MatrixB {
                                    data: xg,
                                    rs: plane,
                                    cs: 1,
                                };
                                gemm(&ws[g], &b, plane, &mut out[c0..c1], layout, &epi);
                            }
                        }
                    }
                    // Ran whole above.
                    #[cfg(target_arch = "x86_64")]
                    Form::Taps(_) => {}
                    Form::Transposed(ws) => {
                        let k = self.cin_g * self.kernel.0 * self.kernel.1;
                        // colsᵀ as the left operand: position p's row is column p of cols.
                        let a = if let Some(cols) = &cols {
                            cols.pack_transposed(plane, k)
                        } else {
                            PackedA::pack_scratch(xg, plane, k, 1, plane)
                        };
                        let mut t = scratch::take(plane * cout_g);
                        let epi = Epilogue {
                            col_bias: bias,
                            ..Default::default()
                        };
                        gemm(
                            &a,
                            &ws[g],
                            cout_g,
                            &mut t,
                            Layout { rs: cout_g, cs: 1 },
                            &epi,
                        );
                        positions_to_channels(&t, plane, cout_g, res, activation, &mut out[c0..c1]);
                        scratch::give(t);
                        a.recycle();
                    }
                }
                drop(cols);
                if let Some(v) = sub {
                    scratch::give(v);
                }
            }
        }
        Ok(())
    }
}

/// The by-taps form where it applies (AVX-512 or AVX2, whole vectors of output channels): it
/// measured faster than both GEMM forms on every dense k × k layer tried, on AVX-512 (stems,
/// 3 × 3 at stride 1 and 2 from 56² to 7², ViT's 16 × 16 patches) and on AVX2 (the same
/// layers of ResNet-18/50, MobileNetV2 and ViT-Tiny, 8–26 % faster), see [`super::taps`].
fn taps_form(weight: &[f32], wshape: &[usize], bias: Option<&[f32]>) -> Option<Form> {
    #[cfg(target_arch = "x86_64")]
    return super::taps::TapWeights::pack(weight, wshape, bias).map(Form::Taps);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (weight, wshape, bias);
        None
    }
}

/// `out[c][p] = act(t[p][c] + residual[c][p])`: a product computed with positions as rows
/// (`t`, `plane` rows of `channels`) back to channel-major, 16 channels per task.
pub(super) fn positions_to_channels(
    t: &[f32],
    plane: usize,
    channels: usize,
    residual: Option<&[f32]>,
    activation: Option<Activation>,
    out: &mut [f32],
) {
    const CH: usize = 16;
    par::par_chunks_mut(out, CH * plane, |blk, rows| {
        let co0 = blk * CH;
        let nch = rows.len() / plane;
        #[cfg(target_arch = "x86_64")]
        let done = nch == CH && Isa::detect() == Isa::Avx512;
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        #[cfg(target_arch = "x86_64")]
        if done {
            // SAFETY: AVX-512F is present; `t` holds `plane` rows of `channels` values with
            // co0 + 16 ≤ channels, and `rows` 16 rows of `plane` values.
            unsafe { transpose_to(t, plane, channels, co0, rows.as_mut_ptr(), plane) };
        }
        if !done {
            for p in 0..plane {
                let src = &t[p * channels + co0..p * channels + co0 + nch];
                for (c, &v) in src.iter().enumerate() {
                    rows[c * plane + p] = v;
                }
            }
        }
        // The task's channels are one run of the output (and of the residual): one pass
        // each over all of it. Per channel row (49 values on a 7 × 7 map) the activation's
        // call cost more than the work: 13 % of a 512 → 2048 layer at 7 × 7.
        if let Some(r) = residual {
            let len = rows.len();
            rows.iter_mut()
                .zip(&r[co0 * plane..co0 * plane + len])
                .for_each(|(v, x)| *v += x);
        }
        apply_activation(activation, rows);
    });
}

/// `dst[c · ld + p] = t[p · channels + co0 + c]` for 16 channels `c` and the `plane`
/// positions of `t`: 16 positions at a time by 16 × 16 register transposes (the
/// element-by-element copy was 6 % of a 512 → 2048 layer at 7 × 7), masked at the end.
///
/// # Safety
/// The CPU must have AVX-512F; `t.len() ≥ plane · channels`, `co0 + 16 ≤ channels`; `dst`
/// addresses 16 rows of `plane` values at stride `ld` that nothing else accesses meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_to(
    t: &[f32],
    plane: usize,
    channels: usize,
    co0: usize,
    dst: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(t.len() >= plane * channels && co0 + 16 <= channels);
    let src = t.as_ptr();
    let mut p0 = 0;
    while p0 < plane {
        let n = (plane - p0).min(16);
        // r[i]: position p0 + i's 16 channels (zero past the plane).
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(n) {
            *v = _mm512_loadu_ps(src.add((p0 + i) * channels + co0));
        }
        // Interleave pairs, then quads, then 128-bit lanes, then 256-bit halves.
        let mut a = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            for j in 0..2 {
                let (x, y) = (
                    _mm512_castps_pd(a[4 * i + j]),
                    _mm512_castps_pd(a[4 * i + j + 2]),
                );
                b[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
                b[4 * i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
            }
        }
        let mut c = [_mm512_setzero_ps(); 16];
        for i in 0..2 {
            for j in 0..4 {
                let (x, y) = (b[8 * i + j], b[8 * i + j + 4]);
                c[8 * i + j] = _mm512_shuffle_f32x4::<0b1000_1000>(x, y);
                c[8 * i + j + 4] = _mm512_shuffle_f32x4::<0b1101_1101>(x, y);
            }
        }
        let keep = ((1u32 << n) - 1) as __mmask16;
        for j in 0..8 {
            let (x, y) = (c[j], c[j + 8]);
            let lo = _mm512_shuffle_f32x4::<0b1000_1000>(x, y);
            let hi = _mm512_shuffle_f32x4::<0b1101_1101>(x, y);
            // Row k of the transpose is channel k: which j, and which half, holds it.
            let (ka, kb) = transpose_rows(j);
            _mm512_mask_storeu_ps(dst.add(ka * ld + p0), keep, lo);
            _mm512_mask_storeu_ps(dst.add(kb * ld + p0), keep, hi);
        }
        p0 += 16;
    }
}

#[cfg(target_arch = "x86_64")]
/// Channels `co .. co + 8` of `t` (`plane` rows of `channels`, position-major) to 8 rows of
/// `plane` values at `dst` (stride `ld`), 8 × 8 register transposes at a time: [`transpose_to`]
/// on AVX2.
///
/// # Safety
/// The CPU must have AVX2; `t` holds `plane` rows of `channels` values with `co + 8 ≤
/// channels`, and `dst` addresses 8 rows of `plane` values at stride `ld` that nothing else
/// accesses meanwhile.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transpose8_to(
    t: &[f32],
    plane: usize,
    channels: usize,
    co: usize,
    dst: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(t.len() >= plane * channels && co + 8 <= channels);
    let src = t.as_ptr();
    let mut p0 = 0;
    while p0 < plane {
        let n = (plane - p0).min(8);
        // r[i]: position p0 + i's 8 channels (zero past the plane).
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, v) in r.iter_mut().enumerate().take(n) {
            *v = _mm256_loadu_ps(src.add((p0 + i) * channels + co));
        }
        let out = super::gemm::transpose8x8(r);
        if n == 8 {
            for (k, &v) in out.iter().enumerate() {
                _mm256_storeu_ps(dst.add(k * ld + p0), v);
            }
        } else {
            let keep = super::gemm::lanes_below(n);
            for (k, &v) in out.iter().enumerate() {
                _mm256_maskstore_ps(dst.add(k * ld + p0), keep, v);
            }
        }
        p0 += 8;
    }
}

/// The channel each of the final stage's 16 outputs holds (pair `j` gives entries `j` and
/// `j + 8`): the pair and quad interleaves leave the channels of each 128-bit lane in the
/// order 0, 2, 1, 3.
#[cfg(target_arch = "x86_64")]
const TRANSPOSE_ORDER: [usize; 16] = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15];

/// Which channels the final stage of [`transpose_to`] yields from its pair `j`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose_rows(j: usize) -> (usize, usize) {
    (TRANSPOSE_ORDER[j], TRANSPOSE_ORDER[j + 8])
}

/// The column matrix of one image and group, packed on demand.
///
/// The input is first copied once into a zero-padded, stride-phase-split form
/// (`xp[ci][py][px][i][j] = padded[ci][i·sy + py][j·sx + px]`), so that every row of the column
/// matrix, over the output positions of one output row, is one contiguous run of `xp` with no
/// bounds to check: tap (ky, kx) of output (oy, ox) is `xp[ci][(ky·dy) % sy][(kx·dx) % sx]
/// [oy + ky·dy / sy][ox + kx·dx / sx]`. Packing a panel is then a copy per row (two when the
/// panel spans an output row boundary), where the earlier per-run bounds arithmetic cost as
/// much as the copies (a third of a 63 %-pruned ResNet-18's frame went to packing).
struct Im2col<'a> {
    conv: &'a PackedConv,
    ow: usize,
    /// The padded, phase-split input (a scratch buffer).
    xp: scratch::Scratch,
    /// Rows and columns of one phase plane of `xp`.
    hq: usize,
    wq: usize,
}

impl<'a> Im2col<'a> {
    fn new(conv: &'a PackedConv, x: &'a [f32], h: usize, w: usize, ow: usize) -> Self {
        let (sy, sx) = conv.stride;
        let (pt, pl) = conv.pad_begin;
        let hp = h + pt + conv.pad_end.0;
        let wp = w + pl + conv.pad_end.1;
        let (hq, wq) = (hp.div_ceil(sy), wp.div_ceil(sx));
        let chans = x.len().checked_div(h * w).unwrap_or(0);
        let per_chan = sy * sx * hq * wq;
        let mut xp = scratch::take(chans * per_chan);
        // One phase row (i, py, px) of channel ci: padded row i·sy + py, columns j·sx + px.
        let fill_row = |ci: usize, iy: usize, px: usize, dst: &mut [f32]| {
            let y = iy.wrapping_sub(pt);
            if iy < pt || y >= h {
                dst.fill(0.0);
                return;
            }
            let src = &x[(ci * h + y) * w..(ci * h + y + 1) * w];
            // Columns j with pl ≤ j·sx + px < pl + w come from the input.
            let lo = pl.saturating_sub(px).div_ceil(sx).min(wq);
            let hi = (pl + w).saturating_sub(px).div_ceil(sx).clamp(lo, wq);
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if hi == lo {
                // The whole phase row lies in the padding (a narrow input, a wide stride).
                return;
            }
            let first = lo * sx + px - pl;
            if sx == 1 {
                dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
            } else if sx == 2 {
                take_even(&src[first..], &mut dst[lo..hi]);
            } else {
                for (o, &v) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(sx)) {
                    *o = v;
                }
            }
        };
        let fill_chan = |ci: usize, dst: &mut [f32]| {
            // The next channel's plane, asked for while this one is split: the input comes
            // from L3 or memory (the previous layer's output), and a strided split reads it
            // in passes over every other row that the hardware prefetcher follows poorly.
            // 64 → 128 channels at 56², stride 2, input in L3: 0.87 → 0.73 ms. (Stride 1 reads
            // rows in order: no gain there.)
            if sy * sx > 1 {
                if let Some(next) = x.get((ci + 1) * h * w..(ci + 2) * h * w) {
                    super::ahead::Ahead::near(next).all_now();
                }
            }
            #[cfg(target_arch = "x86_64")]
            if sx == 2 && Isa::detect() == Isa::Avx512 {
                // Both column phases of a row from one pass over it.
                for py in 0..sy {
                    let (even, odd) =
                        dst[2 * py * hq * wq..(2 * py + 2) * hq * wq].split_at_mut(hq * wq);
                    for (i, (e, o)) in even
                        .chunks_exact_mut(wq)
                        .zip(odd.chunks_exact_mut(wq))
                        .enumerate()
                    {
                        let y = (i * sy + py).wrapping_sub(pt);
                        if i * sy + py < pt || y >= h {
                            e.fill(0.0);
                            o.fill(0.0);
                            continue;
                        }
                        let src = &x[(ci * h + y) * w..(ci * h + y + 1) * w];
                        // SAFETY: AVX-512F is present; e and o hold wq values each.
                        unsafe { split_pairs_avx512(src, pl, e, o) };
                    }
                }
                return;
            }
            for (ph, plane) in dst.chunks_exact_mut(hq * wq).enumerate() {
                let (py, px) = (ph / sx, ph % sx);
                for (i, row) in plane.chunks_exact_mut(wq).enumerate() {
                    fill_row(ci, i * sy + py, px, row);
                }
            }
        };
        if per_chan > 0 {
            // A whole input's worth of copying: in parallel when large (0.4–1.6 M values in
            // a ResNet's early layers).
            if xp.len() < 1 << 16 {
                for (ci, dst) in xp.chunks_exact_mut(per_chan).enumerate() {
                    fill_chan(ci, dst);
                }
            } else {
                let per = chans.div_ceil(2 * par::current_threads()).max(1);
                par::par_chunks_mut(&mut xp, per * per_chan, |i, dst| {
                    for (c, d) in dst.chunks_exact_mut(per_chan).enumerate() {
                        fill_chan(i * per + c, d);
                    }
                });
            }
        }
        Im2col {
            conv,
            ow,
            xp,
            hq,
            wq,
        }
    }
}

/// `dst[i] = src[2 i]`: one phase of a stride-2 row (a stride-2 convolution splits its whole
/// input this way; a strided 1 × 1 one subsamples it). `src` holds at least
/// `2 · dst.len() − 1` values.
fn take_even(src: &[f32], dst: &mut [f32]) {
    assert!(dst.is_empty() || src.len() > 2 * (dst.len() - 1));
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512 {
        // SAFETY: detect() saw AVX-512F; the lengths are checked above.
        return unsafe { take_even_avx512(src, dst) };
    }
    for (o, &v) in dst.iter_mut().zip(src.iter().step_by(2)) {
        *o = v;
    }
}

/// [`take_even`] 16 outputs at a time: two loads and one two-register permute, masked at the
/// row's end. Against the strided scalar copy (per node, pruned ResNet-18, 1 thread): a
/// stride-2 3 × 3 layer 0.216 → 0.192 ms, a stride-2 1 × 1 downsample 0.033 → 0.025 ms.
///
/// # Safety
/// The CPU must have AVX-512F; `src.len() > 2 · (dst.len() − 1)` for a non-empty `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn take_even_avx512(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let (n, len) = (dst.len(), src.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n {
        // Source values 2i .. 2i + 32 that exist; lanes past them load as zero, and their
        // outputs (past `n`) are not stored.
        let avail = len - 2 * i;
        let a = _mm512_maskz_loadu_ps(mask(avail), sp.add(2 * i));
        let b = _mm512_maskz_loadu_ps(mask(avail.saturating_sub(16)), sp.wrapping_add(2 * i + 16));
        let v = _mm512_permutex2var_ps(a, idx, b);
        _mm512_mask_storeu_ps(dp.add(i), mask(n - i), v);
        i += 16;
    }
}

/// Row `kk` of `dst` (`mr` values) is the runs `segs` (offset, length, lane) of `xp` from
/// `bases[kk]`, zeros in lanes no run covers: one masked load per run.
///
/// # Safety
/// The CPU must have AVX-512F; `mr ≤ 16`; every `bases[kk] + off .. + len` lies inside `xp`
/// and `dst` holds `bases.len() · mr` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transposed_rows_avx512(
    xp: &[f32],
    bases: &[usize],
    segs: &[Run],
    mr: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() >= bases.len() * mr && mr <= 16);
    let src = xp.as_ptr();
    let out = dst.as_mut_ptr();
    let keep = ((1u32 << mr) - 1) as __mmask16;
    for (kk, &base) in bases.iter().enumerate() {
        let mut v = _mm512_setzero_ps();
        for &(off, len, at) in segs {
            // Lane at + j reads xp[base + off + j]: the load starts `at` values early, and the
            // lanes outside [at, at + len) are masked off (not read).
            let m = (((1u32 << len) - 1) << at) as __mmask16;
            v = _mm512_mask_loadu_ps(v, m, src.wrapping_add(base + off).wrapping_sub(at));
        }
        _mm512_mask_storeu_ps(out.add(kk * mr), keep, v);
    }
}

/// `even[j] = padded[2j]`, `odd[j] = padded[2j + 1]` for `j < even.len()` (= `odd.len()`),
/// where `padded[c] = src[c − pl]` inside the row and 0 outside: a stride-2 row's two column
/// phases from one pass, 32 columns per two masked loads and two permutes (a phase at a time
/// read each row twice, with a fill and a copy call per phase row: a sixth of a stride-2
/// 3 × 3 layer at 56 × 56).
///
/// # Safety
/// The CPU must have AVX-512F; `even.len() == odd.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_pairs_avx512(src: &[f32], pl: usize, even: &mut [f32], odd: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(even.len(), odd.len());
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let sp = src.as_ptr();
    // Sixteen padded columns from `c`: lanes outside the row are masked off (not read).
    let load = |c: isize| {
        let s = c - pl as isize;
        _mm512_maskz_loadu_ps(super::lanes_in_row(s, src.len()), sp.wrapping_offset(s))
    };
    let n = even.len();
    let mut j = 0;
    while j < n {
        let keep = ((1u32 << (n - j).min(16)) - 1) as __mmask16;
        let (a, b) = (load(2 * j as isize), load(2 * j as isize + 16));
        _mm512_mask_storeu_ps(
            even.as_mut_ptr().add(j),
            keep,
            _mm512_permutex2var_ps(a, ie, b),
        );
        _mm512_mask_storeu_ps(
            odd.as_mut_ptr().add(j),
            keep,
            _mm512_permutex2var_ps(a, io, b),
        );
        j += 16;
    }
}

/// One 32-column panel whose columns come from several output rows (a row narrower than the
/// panel, or a panel across a row's end): row `kk` is the runs `segs` (offset, length,
/// column) of `xp` from `bases[kk]`, zeros where no run lies, built in two 16-lane halves
/// with one masked load per run and half. A copy call per run and row cost a third of a
/// stride-2 3 × 3 layer's packing on 28-wide rows.
///
/// # Safety
/// The CPU must have AVX-512F; `segs` (at most 4) lie within the panel's 32 columns; every
/// `bases[kk] + off .. + len` lies inside `xp`; `dst` holds `bases.len() · 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel_rows_avx512(xp: &[f32], bases: &[usize], segs: &[Run], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() >= bases.len() * 32 && segs.len() <= 4);
    // Per half and run: its lanes in the half, and where lane 0 of the half would read
    // (relative to a row's base; the masked-off lanes are not read).
    let mut plan = [[(0 as __mmask16, 0isize); 4]; 2];
    for (h, half) in plan.iter_mut().enumerate() {
        for (slot, &(off, len, at)) in half.iter_mut().zip(segs) {
            let (lo, hi) = (at.max(16 * h), (at + len).min(16 * h + 16));
            let m = if hi > lo {
                (((1u32 << (hi - lo)) - 1) << (lo - 16 * h)) as __mmask16
            } else {
                0
            };
            *slot = (m, off as isize - at as isize + 16 * h as isize);
        }
    }
    let src = xp.as_ptr();
    let out = dst.as_mut_ptr();
    for (kk, &base) in bases.iter().enumerate() {
        let row = src.wrapping_add(base);
        for (h, half) in plan.iter().enumerate() {
            let mut v = _mm512_setzero_ps();
            for &(m, rel) in &half[..segs.len()] {
                v = _mm512_mask_loadu_ps(v, m, row.wrapping_offset(rel));
            }
            _mm512_storeu_ps(out.add(kk * 32 + 16 * h), v);
        }
    }
}

impl Drop for Im2col<'_> {
    fn drop(&mut self) {
        scratch::give(std::mem::take(&mut self.xp));
    }
}

thread_local! {
    /// `Im2col::pack`'s per-row offsets and per-panel runs, grown once per thread.
    static PACK_PLAN: RefCell<(Vec<usize>, Vec<Run>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A run of a panel's columns within one output row: (offset of its first position in a
/// phase plane, length, column offset in the panel).
type Run = (usize, usize, usize);

impl BSource for Im2col<'_> {
    /// Row `k` of the column matrix, for the positions of one output row, is a run of the
    /// padded input: a panel that lies in one output row is read there instead of copied
    /// into a packed panel (stride 1, and strided kernels of 25 taps or more).
    #[allow(clippy::too_many_arguments)]
    fn gathered(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        nc: usize,
        nr: usize,
        bases: &mut Vec<usize>,
        offs: &mut Vec<Option<usize>>,
    ) -> Option<&[f32]> {
        // Measured per node (pruned ResNet-18, 1 thread): a 3 × 3 stride-1 layer at 56 × 56
        // 0.36 → 0.33 ms. Strided layers read rows of their phase planes; a 7 × 7 stem reads
        // each phase row for several taps, and in place it is faster when few output channels
        // share the packed copy (ResNet-18's stem pruned to 32 channels 0.84 → 0.75 ms; at 64,
        // 1.39–1.42 ms either way), while the 3 × 3 stride-2 layers and MobileNetV2's 3 × 3
        // stem measure the same either way: they keep the packed copy.
        let (kh, kw) = self.conv.kernel;
        if self.conv.stride != (1, 1) && kh * kw < 25 {
            return None;
        }
        self.row_bases(k0, kc, bases);
        let ow = self.ow;
        offs.clear();
        offs.extend((0..nc.div_ceil(nr)).map(|p| {
            let q = n0 + p * nr;
            let (oy, ox) = (q / ow, q % ow);
            let base = oy * self.wq + ox;
            // Whole panel inside one output row (gemm_into checks every row's bounds, once
            // per block).
            (p * nr + nr <= nc && ox + nr <= ow).then_some(base)
        }));
        offs.iter().any(Option::is_some).then_some(&self.xp[..])
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, dst: &mut [f32]) {
        PACK_PLAN.with(|plan| match plan.try_borrow_mut() {
            Ok(mut plan) => {
                let (bases, segs) = &mut *plan;
                self.pack_with(k0, kc, n0, nc, nr, dst, bases, segs);
            }
            // Not reentrant in practice; stay correct if it ever is.
            Err(_) => self.pack_with(k0, kc, n0, nc, nr, dst, &mut Vec::new(), &mut Vec::new()),
        });
    }
}

impl Im2col<'_> {
    /// `colsᵀ` (output positions as rows, `m` of them, by `k`) packed straight into the GEMM's
    /// left operand: each piece's row of `MR` positions is, per k, at most a few runs of `xp`
    /// (one per output row it crosses), read with masked loads on AVX-512. Building the
    /// whole column matrix and repacking it cost as much as the product on a pruned
    /// ResNet-18's 7 × 7 layers (a memcpy call per 7-value run, then one per 8 values).
    fn pack_transposed(&self, m: usize, k: usize) -> PackedA {
        let pack = |bases: &mut Vec<usize>| {
            // Every k's base once, shared by the pieces (per piece it cost a third of the
            // packing).
            self.row_bases(0, k, bases);
            let bases = &bases[..];
            let xp = &self.xp[..];
            PackedA::pack_scratch_by(m, k, |k0, row0, dst| {
                let mr = Isa::detect().mr();
                let kc = dst.len() / mr;
                let bases = &bases[k0..k0 + kc];
                // The piece's positions as runs within output rows (at most one per position,
                // and MR ≤ 16).
                let mut segs = [(0usize, 0usize, 0usize); 16];
                let mut n = 0;
                for (seg, run) in segs.iter_mut().zip(self.row_runs(row0, (row0 + mr).min(m))) {
                    *seg = run;
                    n += 1;
                }
                let segs = &segs[..n];
                #[cfg(target_arch = "x86_64")]
                if Isa::detect() == Isa::Avx512 && mr <= 16 {
                    // SAFETY: AVX-512F is present; every run lies inside xp (it is part of
                    // the column matrix) and dst holds kc rows of mr values.
                    unsafe { transposed_rows_avx512(xp, bases, segs, mr, dst) };
                    return;
                }
                match mr {
                    6 => gather_rows::<6>(dst, xp, bases, segs),
                    4 => gather_rows::<4>(dst, xp, bases, segs),
                    _ => {
                        for (row, &base) in dst.chunks_exact_mut(mr).zip(bases) {
                            row.fill(0.0);
                            for &(off, len, at) in segs {
                                row[at..at + len]
                                    .copy_from_slice(&xp[base + off..base + off + len]);
                            }
                        }
                    }
                }
            })
        };
        PACK_PLAN.with(|plan| match plan.try_borrow_mut() {
            Ok(mut plan) => pack(&mut plan.0),
            Err(_) => pack(&mut Vec::new()),
        })
    }

    /// Output positions `start .. end` as runs that stay within one output row: (offset in a
    /// phase plane of `xp`, length, position of the run's first value from `start`).
    fn row_runs(&self, start: usize, end: usize) -> impl Iterator<Item = Run> + '_ {
        let mut q = start;
        std::iter::from_fn(move || {
            (q < end).then(|| {
                let (oy, ox) = (q / self.ow, q % self.ow);
                let len = (self.ow - ox).min(end - q);
                let run = (oy * self.wq + ox, len, q - start);
                q += len;
                run
            })
        })
    }

    /// Where row k of the block starts in xp, for output (0, 0): `bases[k - k0]`.
    fn row_bases(&self, k0: usize, kc: usize, bases: &mut Vec<usize>) {
        let c = self.conv;
        let (kh, kw) = c.kernel;
        let (sy, sx) = c.stride;
        let (dy, dx) = c.dilation;
        let (hq, wq) = (self.hq, self.wq);
        bases.clear();
        // Kernel tap (ci, ty, tx) of k stepped along rather than divided out per k (two
        // divisions per k were a third of packing a 7 × 7 layer's operand).
        let (mut ci, mut ty, mut tx) = (k0 / (kh * kw), (k0 % (kh * kw)) / kw, k0 % kw);
        bases.extend((0..kc).map(|_| {
            let (ky, kx) = (ty * dy, tx * dx);
            let phase = (ky % sy) * sx + kx % sx;
            let base = ((ci * sy * sx + phase) * hq + ky / sy) * wq + kx / sx;
            tx += 1;
            if tx == kw {
                tx = 0;
                ty += 1;
                if ty == kh {
                    ty = 0;
                    ci += 1;
                }
            }
            base
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn pack_with(
        &self,
        k0: usize,
        kc: usize,
        n0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
        bases: &mut Vec<usize>,
        segs: &mut Vec<Run>,
    ) {
        self.row_bases(k0, kc, bases);
        let xp = &self.xp[..];
        for p in 0..nc.div_ceil(nr) {
            segs.clear();
            let end = (p * nr + nr).min(nc);
            segs.extend(self.row_runs(n0 + p * nr, n0 + end));
            let panel = &mut dst[p * kc * nr..(p + 1) * kc * nr];
            match (segs.as_slice(), nr) {
                // The common case: the whole panel inside one output row.
                (&[(off, 32, 0)], 32) => copy_rows::<32>(panel, xp, bases, off),
                (&[(off, 16, 0)], 16) => copy_rows::<16>(panel, xp, bases, off),
                #[cfg(target_arch = "x86_64")]
                (segs, 32) if Isa::detect() == Isa::Avx512 && segs.len() <= 4 => {
                    // SAFETY: AVX-512F is present; every run lies inside xp (it is part of
                    // the column matrix) and the panel holds kc rows of 32 values.
                    unsafe { panel_rows_avx512(xp, &bases[..kc], segs, panel) }
                }
                _ => {
                    for (row, &base) in panel.chunks_exact_mut(nr).zip(bases.iter()) {
                        for &(off, len, at) in segs.iter() {
                            let s = base + off;
                            row[at..at + len].copy_from_slice(&xp[s..s + len]);
                        }
                        row[end - p * nr..].fill(0.0);
                    }
                }
            }
        }
    }
}

/// Rows of `MR` output positions of `colsᵀ` (row k is `xp[bases[k] + position's offset]`, the
/// positions given as runs within output rows), zero past the last position. Each
/// position's offset is found once per piece, so a row is `MR` loads and stores: a `memcpy`
/// call per run plus zeroing the row cost a fifth of a 3 × 3 layer's time on AVX2 (per call,
/// 1 thread, Zen 3: 256 → 256 at 28², stride 2, 0.88×; 512 → 512 at 7² 0.91×).
#[inline(always)]
fn gather_rows<const MR: usize>(dst: &mut [f32], xp: &[f32], bases: &[usize], segs: &[Run]) {
    let mut offs = [0usize; MR];
    let mut cnt = 0;
    for &(off, len, at) in segs {
        for (i, o) in offs[at..(at + len).min(MR)].iter_mut().enumerate() {
            *o = off + i;
        }
        cnt = cnt.max(at + len);
    }
    let rows = dst.chunks_exact_mut(MR).zip(bases);
    if cnt >= MR {
        for (row, &base) in rows {
            let src = &xp[base..];
            for (d, &o) in row.iter_mut().zip(&offs) {
                *d = src[o];
            }
        }
    } else {
        for (row, &base) in rows {
            let src = &xp[base..];
            for (i, d) in row.iter_mut().enumerate() {
                *d = if i < cnt { src[offs[i]] } else { 0.0 };
            }
        }
    }
}

/// One panel of `N` columns that all come from one output row: row k is `xp[bases[k] + off..]`.
/// Fixed-size copies compile to a few vector moves instead of a `memcpy` call per row.
#[inline(always)]
fn copy_rows<const N: usize>(panel: &mut [f32], xp: &[f32], bases: &[usize], off: usize) {
    for (row, &base) in panel.chunks_exact_mut(N).zip(bases) {
        let s = base + off;
        if let (Ok(d), Some(Ok(src))) = (
            <&mut [f32; N]>::try_from(row),
            xp.get(s..s + N).map(<&[f32; N]>::try_from),
        ) {
            *d = *src;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn take_even_matches_a_strided_copy_at_every_length() {
        for n in 0..70usize {
            for extra in [0usize, 1, 7] {
                let len = (2 * n).saturating_sub(1) + extra;
                let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
                let mut got = vec![f32::NAN; n + 3];
                take_even(&src, &mut got[..n]);
                for i in 0..n {
                    assert_eq!(got[i], src[2 * i], "n {n} len {len} at {i}");
                }
                // Nothing past the destination is touched.
                assert!(got[n..].iter().all(|v| v.is_nan()), "n {n} len {len}");
            }
        }
    }

    struct Case {
        n: usize,
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        stride: usize,
        pads: [usize; 4],
        dil: usize,
        group: usize,
    }

    fn check(c: &Case, packing: ConvPacking) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (c.n, c.cin, c.hw.0, c.hw.1), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (c.cout, c.cin / c.group, c.k.0, c.k.1), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c.cout, &dev).unwrap();
        let conv = PackedConv::new(
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.dims(),
            Some(&b.to_vec1::<f32>().unwrap()),
            &[c.stride, c.stride],
            &c.pads,
            &[c.dil, c.dil],
            c.group,
            packing,
        )
        .unwrap();
        let xp = x
            .pad_with_zeros(2, c.pads[0], c.pads[2])
            .unwrap()
            .pad_with_zeros(3, c.pads[1], c.pads[3])
            .unwrap();
        let want = xp
            .conv2d(&w, 0, c.stride, c.dil, c.group)
            .unwrap()
            .broadcast_add(&b.reshape((1, c.cout, 1, 1)).unwrap())
            .unwrap();
        let res = Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap();
        let want = (want + &res).unwrap().relu().unwrap();
        let (oh, ow) = conv.out_hw(c.hw.0, c.hw.1).unwrap();
        assert_eq!(want.dims(), &[c.n, c.cout, oh, ow]);
        let mut got = vec![f32::NAN; want.elem_count()];
        conv.run(
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (c.n, c.cin, c.hw.0, c.hw.1),
            Some(&res.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
            Some(Activation::Relu),
            &mut got,
        )
        .unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let scale = ((c.cin / c.group) * c.k.0 * c.k.1) as f32;
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 2e-5 * scale.sqrt().max(1.0) * 4.0, "max err {err}");
    }

    /// Random shapes (seeded, so a failure reproduces): odd channel counts as pruning leaves
    /// them, groups, rectangular kernels and inputs, asymmetric pads, strides, dilations.
    #[test]
    fn random_shapes_match_candle() {
        let mut next = crate::kernels::testutil::below(0x2545_f491_4f6c_dd1du64);
        let mut done = 0;
        while done < 60 {
            let group = [1, 1, 1, 2, 3][next(5)];
            let cin = group * (1 + next(9));
            let cout = group * (1 + next(13));
            let k = (1 + next(5), 1 + next(5));
            let stride = 1 + next(3);
            let dil = 1 + next(2);
            let pads = [next(3), next(3), next(3), next(3)];
            let hw = (1 + next(17), 1 + next(17));
            let n = 1 + next(2);
            // candle's reference takes square strides and dilations and needs the kernel to fit.
            if hw.0 + pads[0] + pads[2] < dil * (k.0 - 1) + 1
                || hw.1 + pads[1] + pads[3] < dil * (k.1 - 1) + 1
            {
                continue;
            }
            let c = Case {
                n,
                cin,
                cout,
                hw,
                k,
                stride,
                pads,
                dil,
                group,
            };
            check(&c, ConvPacking::Direct);
            check(&c, ConvPacking::Transposed);
            done += 1;
        }
    }

    /// The by-taps form (AVX-512 or AVX2): chosen by `Auto` for single-group k × k layers with
    /// whole vectors of output channels, and equal to candle's convolution over kernels,
    /// strides, asymmetric pads, maps narrower than a group of positions, blocks of output
    /// channels with and without a half-block tail, inputs deep enough for several passes,
    /// unpadded inputs read in place, with and without a residual, and clamp-like and other
    /// activations.
    #[test]
    fn taps_form_matches_candle() {
        let dev = Device::Cpu;
        let mut next = crate::kernels::testutil::below(0x9e37_79b9_7f4a_7c15u64);
        let acts = [
            None,
            Some(Activation::Relu),
            Some(Activation::Clip {
                min: Some(0.0),
                max: Some(6.0),
            }),
            Some(Activation::Sigmoid),
        ];
        let mut done = 0;
        while done < 40 {
            // Mostly an image's few channels; every fourth case deep (two or three passes
            // of 128 channels for a 3 × 3 kernel).
            let deep = done % 4 == 3;
            let cin = if deep { 120 + next(200) } else { 1 + next(4) };
            // Whole AVX2 vectors: 16-channel blocks and an 8-channel tail (AVX-512 takes the
            // multiples of 16 and leaves the rest to the GEMM forms).
            let cout = 8 * (1 + next(10));
            let k = if deep {
                (3, 3)
            } else {
                (1 + next(7), 1 + next(7))
            };
            let stride = 1 + next(3);
            // Every fifth case unpadded: its input is read in place rather than copied.
            let pads = if done % 5 == 4 {
                [0; 4]
            } else {
                [next(4), next(4), next(4), next(4)]
            };
            let hw = (1 + next(30), 1 + next(30));
            let n = 1 + next(2);
            if k.0 * k.1 == 1 || hw.0 + pads[0] + pads[2] < k.0 || hw.1 + pads[1] + pads[3] < k.1 {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (n, cin, hw.0, hw.1), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (cout, cin, k.0, k.1), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let conv = PackedConv::new(
                &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.dims(),
                Some(&b.to_vec1::<f32>().unwrap()),
                &[stride, stride],
                &pads,
                &[1, 1],
                1,
                ConvPacking::Auto(Some(hw)),
            )
            .unwrap();
            #[cfg(target_arch = "x86_64")]
            if Isa::detect() == Isa::Avx2
                || (Isa::detect() == Isa::Avx512 && cout.is_multiple_of(16))
            {
                assert!(matches!(conv.form, Form::Taps(_)), "cin {cin} cout {cout}");
            }
            let want = x
                .pad_with_zeros(2, pads[0], pads[2])
                .unwrap()
                .pad_with_zeros(3, pads[1], pads[3])
                .unwrap()
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let res = (done % 3 == 0).then(|| Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap());
            let want = match &res {
                Some(r) => (want + r).unwrap(),
                None => want,
            };
            let act = acts[next(acts.len())];
            let mut want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            apply_activation(act, &mut want);
            let mut got = vec![f32::NAN; want.len()];
            let res = res.map(|r| r.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            conv.run(
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                (n, cin, hw.0, hw.1),
                res.as_deref(),
                act,
                &mut got,
            )
            .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = (cin * k.0 * k.1) as f32;
            assert!(
                err < 8e-5 * scale.sqrt(),
                "cin {cin} cout {cout} k {k:?} s {stride} pads {pads:?} hw {hw:?}: err {err}"
            );
            // The same with the output (and residual) channel-blocked.
            if conv.writes_blocked() {
                use crate::kernels::nchwc::{to_blocked, to_planar};
                let plane = want.len() / (n * cout);
                let res_b = res.as_ref().map(|r| {
                    let mut b = vec![0f32; r.len()];
                    assert!(to_blocked(r, (n, cout, plane), &mut b));
                    b
                });
                let mut blocked = vec![f32::NAN; want.len()];
                conv.run_blocked(
                    &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    (n, cin, hw.0, hw.1),
                    res_b.as_deref(),
                    act,
                    &mut blocked,
                )
                .unwrap();
                let mut back = vec![f32::NAN; want.len()];
                assert!(to_planar(&blocked, (n, cout, plane), &mut back));
                assert_eq!(
                    back, got,
                    "blocked: cin {cin} cout {cout} k {k:?} hw {hw:?}"
                );
            }
            done += 1;
        }
    }

    #[test]
    fn matches_candle_over_strides_pads_groups_and_odd_channels() {
        let mut cases = Vec::new();
        for &(k, stride, pad, dil) in &[
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (1, 1, 0, 1),
            (1, 2, 0, 1),
            (7, 2, 3, 1),
            (3, 1, 2, 2),
            (5, 1, 0, 1),
        ] {
            for &(cin, cout, group) in &[(3, 64, 1), (13, 37, 1), (8, 12, 2), (6, 9, 3)] {
                for &hw in &[(5, 7), (12, 12), (1, 9)] {
                    let span = dil * (k - 1) + 1;
                    if hw.0 + 2 * pad >= span && hw.1 + 2 * pad >= span {
                        cases.push(Case {
                            n: 1,
                            cin,
                            cout,
                            hw,
                            k: (k, k),
                            stride,
                            pads: [pad; 4],
                            dil,
                            group,
                        });
                    }
                }
            }
        }
        cases.push(Case {
            n: 2,
            cin: 5,
            cout: 7,
            hw: (9, 6),
            k: (3, 3),
            stride: 2,
            pads: [0, 1, 1, 0],
            dil: 1,
            group: 1,
        });
        cases.push(Case {
            n: 1,
            cin: 300,
            cout: 40,
            hw: (14, 14),
            k: (3, 3),
            stride: 1,
            pads: [1; 4],
            dil: 1,
            group: 1,
        });
        // Stride 1 with output rows of 32 or more: whole panels read in place
        // (`Im2col::gathered`), over two K blocks (K = 360), with a ragged last row panel.
        cases.push(Case {
            n: 1,
            cin: 40,
            cout: 19,
            hw: (5, 48),
            k: (3, 3),
            stride: 1,
            pads: [1; 4],
            dil: 1,
            group: 1,
        });
        // Output rows of 32 or more positions: whole panels inside one output row take the
        // fixed-size copy in `Im2col::pack_with` (for 16- and 32-wide panels).
        for &(k, stride, pad, dil, hw) in &[
            // One input column, left padding 2, stride 3: phase rows that are all padding.
            (3, 3, 2, 1, (1, 1)),
            (3, 1, 1, 1, (6, 70)),
            (3, 2, 1, 1, (9, 81)),
            (5, 1, 2, 2, (4, 40)),
            (7, 2, 3, 1, (8, 100)),
            // Strided kernels of 25 taps or more read their panels in place too.
            (5, 2, 2, 1, (6, 80)),
            (5, 3, 2, 2, (7, 110)),
        ] {
            cases.push(Case {
                n: 1,
                cin: 5,
                cout: 9,
                hw,
                k: (k, k),
                stride,
                pads: [pad, pad, pad + 1, pad],
                dil,
                group: 1,
            });
        }
        for c in &cases {
            check(c, ConvPacking::Direct);
            check(c, ConvPacking::Transposed);
        }
    }

    #[test]
    fn wrong_input_size_is_an_error_not_a_panic() {
        let conv = PackedConv::new(
            &[0.0; 2 * 3 * 9],
            &[2, 3, 3, 3],
            None,
            &[1, 1],
            &[0; 4],
            &[1, 1],
            1,
            ConvPacking::Auto(None),
        )
        .unwrap();
        let mut out = vec![0.0; 2 * 9];
        assert!(conv
            .run(&[0.0; 10], (1, 3, 5, 5), None, None, &mut out)
            .is_err());
        assert!(conv
            .run(&[0.0; 3 * 2 * 2], (1, 3, 2, 2), None, None, &mut out)
            .is_err());
    }
}
