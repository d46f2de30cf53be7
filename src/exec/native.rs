//! The native CPU path: nodes that our own kernels ([`crate::kernels`]) run, prepared once at
//! load (weights packed for the micro-kernel), with candle's op as the fallback for anything a
//! kernel does not cover. Every kernel is tested against the candle path.

use std::str::FromStr;

use candle_core::{DType, Result, Tensor};

use crate::graph::{Activation, Op, PoolKind};
use crate::kernels::conv::{ConvPacking, PackedConv};
use crate::kernels::depthwise::{depthwise_conv2d, DepthwiseShape};
use crate::kernels::gemm::{gemm, Epilogue, Layout, MatrixB, PackedA, PackedB};
use crate::kernels::par::{self, SendPtr};
use crate::kernels::pool::max_pool2d;
use crate::kernels::rowwise::{layer_norm_rows, softmax_rows};
use crate::kernels::winograd::WinogradConv;

/// When 3 × 3 stride-1 convolutions use Winograd's F(2×2, 3×3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Winograd {
    /// Per layer, whichever measured faster at load (layers of ≥ 20 M multiply-adds).
    #[default]
    Auto,
    /// Every eligible layer, whatever its size (for tests and comparisons).
    Always,
    /// Never.
    Never,
}

impl FromStr for Winograd {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Winograd::Auto),
            "always" => Ok(Winograd::Always),
            "never" => Ok(Winograd::Never),
            other => Err(format!(
                "unknown Winograd policy '{other}' (expected auto, always or never)"
            )),
        }
    }
}

/// Which kernels run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our own kernels where they exist, candle's ops elsewhere (the default).
    #[default]
    Native,
    /// candle's ops only: the reference path.
    Candle,
}

impl FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "native" => Ok(Kernels::Native),
            "candle" => Ok(Kernels::Candle),
            other => Err(format!(
                "unknown kernels '{other}' (expected native or candle)"
            )),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Native => "native",
            Kernels::Candle => "candle",
        })
    }
}

/// How a dense convolution runs.
pub(crate) enum ConvEngine {
    /// im2col packed on the fly into the GEMM.
    Gemm(PackedConv),
    /// Winograd F(2×2, 3×3), for the 3 × 3 stride-1 layers where it measured faster.
    Winograd(WinogradConv),
}

impl ConvEngine {
    fn cout(&self) -> usize {
        match self {
            ConvEngine::Gemm(c) => c.cout(),
            ConvEngine::Winograd(c) => c.cout(),
        }
    }

    fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        match self {
            ConvEngine::Gemm(c) => c.out_hw(h, w),
            ConvEngine::Winograd(c) => c.out_hw(h, w),
        }
    }

    fn run(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        residual: Option<&[f32]>,
        activation: Option<Activation>,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        match self {
            ConvEngine::Gemm(c) => c.run(x, dims, residual, activation, out).map_err(|e| e.0),
            ConvEngine::Winograd(c) => {
                let (n, _, h, w) = dims;
                c.run(x, (n, h, w), residual, activation, out)
                    .then_some(())
                    .ok_or_else(|| format!("input {dims:?} does not fit the Winograd plan"))
            }
        }
    }

    /// Median seconds of a few runs on a zero input of `[1, cin, h, w]`.
    fn time(&self, cin: usize, h: usize, w: usize) -> f64 {
        let Some((oh, ow)) = self.out_hw(h, w) else {
            return f64::INFINITY;
        };
        let x = vec![0f32; cin * h * w];
        let mut out = vec![0f32; self.cout() * oh * ow];
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let ok = self.run(&x, (1, cin, h, w), None, None, &mut out).is_ok();
                if ok {
                    t.elapsed().as_secs_f64()
                } else {
                    f64::INFINITY
                }
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    }
}

/// Winograd is only tried when a layer has at least this many multiply-adds: below it the
/// transforms cannot pay for themselves and the load-time measurement is noise.
const WINOGRAD_MIN_MACS: usize = 20_000_000;
/// ... and at least this many output tiles.
const WINOGRAD_MIN_TILES: usize = 36;

/// A node prepared for a native kernel.
pub(crate) enum Prepared {
    /// Dense or grouped convolution.
    Conv {
        conv: ConvEngine,
        activation: Option<Activation>,
        residual: bool,
    },
    /// Depthwise convolution (one filter per channel).
    Depthwise {
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        kernel: (usize, usize),
        stride: (usize, usize),
        dilation: (usize, usize),
        pads: [usize; 4],
        activation: Option<Activation>,
        residual: bool,
    },
    /// `A · B` over matching batch dimensions, both computed per frame (attention scores and
    /// their weighted sum), with an optional constant bias over the last axis.
    BatchedMatMul {
        bias: Option<Vec<f32>>,
        activation: Option<Activation>,
    },
    /// Softmax over the last axis.
    Softmax,
    /// LayerNormalization over the trailing `inner` elements, with constant scale and bias.
    LayerNorm {
        inner: usize,
        gamma: Vec<f32>,
        beta: Option<Vec<f32>>,
        epsilon: f32,
    },
    /// 2-D max pooling; the shape's `c`, `n`, `h`, `w` are filled in per frame.
    MaxPool { window: DepthwiseShape },
    /// `x · W (+ bias)` with a constant `W` (`[k, n]`, or `[n, k]` transposed), over the
    /// last axis of `x`.
    Linear {
        w: PackedB,
        bias: Option<Vec<f32>>,
        activation: Option<Activation>,
    },
}

impl Prepared {
    /// Which kernel runs the node (for profiles).
    pub(crate) fn kernel_name(&self) -> &'static str {
        match self {
            Prepared::Conv {
                conv: ConvEngine::Gemm(_),
                ..
            } => "gemm-conv",
            Prepared::Conv {
                conv: ConvEngine::Winograd(_),
                ..
            } => "winograd",
            Prepared::Depthwise { .. } => "depthwise",
            Prepared::Linear { .. } => "linear",
            Prepared::MaxPool { .. } => "maxpool",
            Prepared::Softmax => "softmax",
            Prepared::BatchedMatMul { .. } => "batched-matmul",
            Prepared::LayerNorm { .. } => "layernorm",
        }
    }
}

fn host_f32(t: &Tensor) -> Option<Vec<f32>> {
    (t.dtype() == DType::F32 && t.device().is_cpu())
        .then(|| t.flatten_all().and_then(|f| f.to_vec1::<f32>()).ok())
        .flatten()
}

/// Prepares `op` (with `n_inputs` inputs, the first of static shape `input_shape` when known,
/// and `n_outputs` outputs)
/// when a native kernel covers it. `constant(i)` is the node's i-th input when it is a weight
/// (known at load), `None` when it is computed per frame.
pub(crate) fn prepare<'a>(
    op: &Op,
    (n_inputs, n_outputs): (usize, usize),
    input_shape: Option<&[usize]>,
    winograd: Winograd,
    constant: impl Fn(usize) -> Option<&'a Tensor>,
) -> Option<Prepared> {
    match op {
        Op::Conv {
            strides,
            pads,
            dilations,
            group,
            activation,
            residual,
        } => {
            let w = constant(1)?;
            // Inputs are X, W, [B], [R]: a bias must be a weight to be packed.
            let has_bias = n_inputs == 3 + usize::from(*residual);
            let bias = if has_bias {
                Some(host_f32(constant(2)?)?)
            } else {
                None
            };
            let wshape = w.dims().to_vec();
            let weight = host_f32(w)?;
            if wshape.len() != 4 || strides.len() != 2 || pads.len() != 4 || dilations.len() != 2 {
                return None;
            }
            // Degenerate geometry from a lying file stays on candle's path, which reports it.
            if wshape[2] == 0 || wshape[3] == 0 || strides.contains(&0) || dilations.contains(&0) {
                return None;
            }
            if *group > 1 && wshape[0] == *group && wshape[1] == 1 {
                return Some(Prepared::Depthwise {
                    weight,
                    bias,
                    kernel: (wshape[2], wshape[3]),
                    stride: (strides[0], strides[1]),
                    dilation: (dilations[0], dilations[1]),
                    pads: [pads[0], pads[1], pads[2], pads[3]],
                    activation: *activation,
                    residual: *residual,
                });
            }
            let direct = ConvEngine::Gemm(
                PackedConv::new(
                    &weight,
                    &wshape,
                    bias.as_deref(),
                    strides,
                    pads,
                    dilations,
                    *group,
                    ConvPacking::Auto(match input_shape {
                        Some(&[_, _, h, w]) => Some((h, w)),
                        _ => None,
                    }),
                )
                .ok()?,
            );
            let conv = match input_shape {
                Some(&[1, cin, h, w])
                    if wshape[2..] == [3, 3]
                        && strides[..] == [1, 1]
                        && dilations[..] == [1, 1]
                        && *group == 1
                        && winograd != Winograd::Never =>
                {
                    let pads4 = [pads[0], pads[1], pads[2], pads[3]];
                    // Worth timing only with enough work and enough 2 × 2 tiles to amortise
                    // the transforms: measured to lose on 7 × 7 maps (16 tiles) at every width.
                    let out =
                        |n: usize, a: usize, b: usize| (n + a + b).saturating_sub(2).div_ceil(2);
                    let tiles = out(h, pads[0], pads[2]) * out(w, pads[1], pads[3]);
                    let big = wshape[0] * cin * 9 * h * w >= WINOGRAD_MIN_MACS
                        && tiles >= WINOGRAD_MIN_TILES;
                    let try_it = winograd == Winograd::Always || big;
                    let wino = try_it
                        .then(|| {
                            WinogradConv::new(&weight, wshape[0], cin, bias.as_deref(), &pads4)
                        })
                        .flatten()
                        .map(ConvEngine::Winograd);
                    match wino {
                        Some(wino) if winograd == Winograd::Always => wino,
                        // Keep whichever ran faster here, on this CPU and thread count.
                        Some(wino) if wino.time(cin, h, w) < 0.9 * direct.time(cin, h, w) => wino,
                        _ => direct,
                    }
                }
                _ => direct,
            };
            Some(Prepared::Conv {
                conv,
                activation: *activation,
                residual: *residual,
            })
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a: false,
            trans_b,
            activation,
        } if *alpha == 1.0 && (*beta == 1.0 || n_inputs == 2) => {
            let w = constant(1)?;
            if w.rank() != 2 {
                return None;
            }
            let (k, n) = if *trans_b {
                (w.dims()[1], w.dims()[0])
            } else {
                (w.dims()[0], w.dims()[1])
            };
            let data = host_f32(w)?;
            // A = Wᵀ (`n × k`): rows are output features.
            // B = W (`k × n`), or Wᵀ when stored transposed.
            let packed = if *trans_b {
                PackedB::pack(&data, k, n, 1, k)
            } else {
                PackedB::pack(&data, k, n, n, 1)
            };
            let bias = match (n_inputs, constant(2)) {
                (2, _) => None,
                (3, Some(b)) if b.elem_count() == n => Some(host_f32(b)?),
                _ => return None,
            };
            Some(Prepared::Linear {
                w: packed,
                bias,
                activation: *activation,
            })
        }
        Op::Pool {
            kind: PoolKind::Max,
            kernel,
            strides,
            pads,
            ..
        } if kernel.len() == 2
            && strides.len() == 2
            && pads.len() == 4
            && !kernel.contains(&0)
            && !strides.contains(&0) =>
        {
            Some(Prepared::MaxPool {
                window: DepthwiseShape {
                    n: 0,
                    c: 0,
                    h: 0,
                    w: 0,
                    kh: kernel[0],
                    kw: kernel[1],
                    stride: (strides[0], strides[1]),
                    dilation: (1, 1),
                    pad_begin: (pads[0], pads[1]),
                    pad_end: (pads[2], pads[3]),
                },
            })
        }
        Op::Softmax { axis } if input_shape.is_some_and(|s| *axis + 1 == s.len()) => {
            Some(Prepared::Softmax)
        }
        // Only the normalised output: the optional Mean / InvStdDev outputs take candle's op.
        Op::LayerNormalization { axis, epsilon } if n_outputs == 1 => {
            let inner: usize = input_shape?.get(*axis..)?.iter().product();
            let gamma = host_f32(constant(1)?)?;
            let beta = match n_inputs {
                2 => None,
                3 => Some(host_f32(constant(2)?)?),
                _ => return None,
            };
            (gamma.len() == inner && beta.as_ref().is_none_or(|b| b.len() == inner)).then_some(
                Prepared::LayerNorm {
                    inner,
                    gamma,
                    beta,
                    epsilon: *epsilon,
                },
            )
        }
        // Both operands computed per frame (attention): batched products on our GEMM.
        Op::MatMul { activation } if constant(1).is_none() => {
            let bias = match (n_inputs, constant(2)) {
                (2, _) => None,
                (3, Some(b)) if b.rank() == 1 => Some(host_f32(b)?),
                _ => return None,
            };
            Some(Prepared::BatchedMatMul {
                bias,
                activation: *activation,
            })
        }
        Op::MatMul { activation } => {
            let w = constant(1)?;
            if w.rank() != 2 {
                return None;
            }
            let (k, n) = (w.dims()[0], w.dims()[1]);
            // A fused bias (third input) must be a constant over the last axis.
            let bias = match (n_inputs, constant(2)) {
                (2, _) => None,
                (3, Some(b)) if b.elem_count() == n && b.dims().last() == Some(&n) => {
                    Some(host_f32(b)?)
                }
                _ => return None,
            };
            Some(Prepared::Linear {
                w: PackedB::pack(&host_f32(w)?, k, n, n, 1),
                bias,
                activation: *activation,
            })
        }
        _ => None,
    }
}

/// Calls `f` with a CPU f32 tensor's elements, borrowed when contiguous, copied otherwise;
/// `None` for other dtypes and devices.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(None);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(Some(f(&v[a..b])));
        }
    }
    Ok(Some(f(&t.flatten_all()?.to_vec1::<f32>()?)))
}

fn bail<T>(msg: String) -> Result<T> {
    Err(candle_core::Error::Msg(msg))
}

/// Runs a prepared node; `Ok(None)` when this frame's inputs do not suit the kernel (then the
/// caller runs candle's op).
pub(crate) fn run(p: &Prepared, args: &[Tensor]) -> Result<Option<Tensor>> {
    let Some(x) = args.first() else {
        return bail("native kernel called without inputs".into());
    };
    match p {
        Prepared::Conv {
            conv,
            activation,
            residual,
        } => {
            let dims = x.dims();
            if dims.len() != 4 {
                return Ok(None);
            }
            let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
            let Some((oh, ow)) = conv.out_hw(h, w) else {
                return bail(format!("Conv input {dims:?} is smaller than its kernel"));
            };
            let out_shape = (n, conv.cout(), oh, ow);
            let mut out = vec![0f32; n * conv.cout() * oh * ow];
            let res = if *residual { args.last() } else { None };
            let done = with_f32(x, |xs| match res {
                Some(r) if r.dims() == [n, conv.cout(), oh, ow] => with_f32(r, |rs| {
                    conv.run(xs, (n, c, h, w), Some(rs), *activation, &mut out)
                }),
                Some(_) => Ok(None),
                None => Ok(Some(conv.run(
                    xs,
                    (n, c, h, w),
                    None,
                    *activation,
                    &mut out,
                ))),
            })?;
            match done.transpose()?.flatten() {
                Some(Ok(())) => Ok(Some(Tensor::from_vec(out, out_shape, x.device())?)),
                Some(Err(e)) => bail(format!("Conv: {e}")),
                None => Ok(None),
            }
        }
        Prepared::Depthwise {
            weight,
            bias,
            kernel,
            stride,
            dilation,
            pads,
            activation,
            residual,
        } => {
            let dims = x.dims();
            if dims.len() != 4 || weight.len() != dims[1] * kernel.0 * kernel.1 {
                return Ok(None);
            }
            let shape = DepthwiseShape {
                n: dims[0],
                c: dims[1],
                h: dims[2],
                w: dims[3],
                kh: kernel.0,
                kw: kernel.1,
                stride: *stride,
                dilation: *dilation,
                pad_begin: (pads[0], pads[1]),
                pad_end: (pads[2], pads[3]),
            };
            let Some((oh, ow)) = shape.out_hw() else {
                return bail(format!("Conv input {dims:?} is smaller than its kernel"));
            };
            let res = match residual.then(|| args.last()).flatten() {
                Some(r) if r.dims() == [shape.n, shape.c, oh, ow] && r.dtype() == DType::F32 => {
                    Some(r.contiguous()?)
                }
                Some(_) => return Ok(None),
                None => None,
            };
            let conv = |xs: &[f32], rs: Option<&[f32]>| {
                depthwise_conv2d(&shape, xs, weight, bias.as_deref(), rs, *activation)
            };
            let y = with_f32(x, |xs| match &res {
                Some(r) => with_f32(r, |rs| conv(xs, Some(rs))),
                None => Ok(Some(conv(xs, None))),
            })?;
            let Some(y) = y.transpose()?.flatten() else {
                return Ok(None);
            };
            Ok(Some(Tensor::from_vec(
                y,
                (shape.n, shape.c, oh, ow),
                x.device(),
            )?))
        }
        Prepared::BatchedMatMul { bias, activation } => {
            let Some(b) = args.get(1) else {
                return Ok(None);
            };
            let (ad, bd) = (x.dims(), b.dims());
            let (ra, rb) = (ad.len(), bd.len());
            // Equal batch dimensions only; broadcasting batches take candle's op.
            if ra < 2 || ra != rb || ad[..ra - 2] != bd[..rb - 2] || ad[ra - 1] != bd[rb - 2] {
                return Ok(None);
            }
            let (m, k, n) = (ad[ra - 2], ad[ra - 1], bd[rb - 1]);
            if bias.as_ref().is_some_and(|v| v.len() != n) || b.dtype() != DType::F32 {
                return Ok(None);
            }
            let batches: usize = ad[..ra - 2].iter().product();
            let mut out = vec![0f32; batches * m * n];
            let b = b.contiguous()?;
            let epi = Epilogue {
                col_bias: bias.as_deref(),
                activation: *activation,
                ..Default::default()
            };
            // Items are (batch, row range): each a small serial GEMM, all of them in parallel,
            // rather than a parallel GEMM per batch with a fork and join each.
            let parts = (2 * par::current_threads())
                .div_ceil(batches)
                .clamp(1, m.max(1));
            let rows = |p: usize| (p * m / parts, (p + 1) * m / parts);
            let done = with_f32(x, |xs| {
                with_f32(&b, |bs| {
                    let outp = SendPtr(out.as_mut_ptr());
                    par::par_for(batches * parts, |item| {
                        let (i, (r0, r1)) = (item / parts, rows(item % parts));
                        if r0 == r1 {
                            return;
                        }
                        let a0 = (i * m + r0) * k;
                        let a = PackedA::pack(&xs[a0..a0 + (r1 - r0) * k], r1 - r0, k, k, 1);
                        let rhs = MatrixB {
                            data: &bs[i * k * n..(i + 1) * k * n],
                            rs: n,
                            cs: 1,
                        };
                        // SAFETY: rows r0..r1 of batch i are this item's alone, inside `out`.
                        let c = unsafe {
                            std::slice::from_raw_parts_mut(
                                outp.get().add((i * m + r0) * n),
                                (r1 - r0) * n,
                            )
                        };
                        gemm(&a, &rhs, n, c, Layout { rs: n, cs: 1 }, &epi);
                    });
                })
            })?;
            if done.transpose()?.flatten().is_none() {
                return Ok(None);
            }
            let mut shape = ad.to_vec();
            shape[ra - 1] = n;
            Ok(Some(Tensor::from_vec(out, shape, x.device())?))
        }
        Prepared::Softmax => {
            let Some(&cols) = x.dims().last() else {
                return Ok(None);
            };
            let Some(mut y) = with_f32(x, <[f32]>::to_vec)? else {
                return Ok(None);
            };
            softmax_rows(&mut y, cols);
            Ok(Some(Tensor::from_vec(y, x.dims(), x.device())?))
        }
        Prepared::LayerNorm {
            inner,
            gamma,
            beta,
            epsilon,
        } => {
            if x.elem_count() % inner.max(&1) != 0 {
                return Ok(None);
            }
            let mut y = vec![0f32; x.elem_count()];
            let done = with_f32(x, |xs| {
                layer_norm_rows(xs, &mut y, *inner, gamma, beta.as_deref(), *epsilon)
            })?;
            match done {
                Some(()) => Ok(Some(Tensor::from_vec(y, x.dims(), x.device())?)),
                None => Ok(None),
            }
        }
        Prepared::MaxPool { window } => {
            let dims = x.dims();
            if dims.len() != 4 {
                return Ok(None);
            }
            let s = DepthwiseShape {
                n: dims[0],
                c: dims[1],
                h: dims[2],
                w: dims[3],
                ..*window
            };
            let Some((oh, ow)) = s.out_hw() else {
                return bail(format!("MaxPool input {dims:?} is smaller than its window"));
            };
            match with_f32(x, |xs| max_pool2d(&s, xs))?.flatten() {
                Some(y) => Ok(Some(Tensor::from_vec(y, (s.n, s.c, oh, ow), x.device())?)),
                None => Ok(None),
            }
        }
        Prepared::Linear {
            w,
            bias,
            activation,
        } => {
            let dims = x.dims();
            let (k, n) = (w.k(), w.n());
            if dims.last() != Some(&k) {
                return Ok(None);
            }
            let rows = x.elem_count() / k.max(1);
            let epi = Epilogue {
                col_bias: bias.as_deref(),
                activation: *activation,
                ..Default::default()
            };
            // y = x · W: the rows of x (tokens) are the packed left operand, packed per frame
            // (rows × k, small beside the rows × k × n product), W the prepacked right one.
            let Some(a) = with_f32(x, |xs| PackedA::pack(xs, rows, k, k, 1))? else {
                return Ok(None);
            };
            let mut out = vec![0f32; rows * n];
            gemm(&a, w, n, &mut out, Layout { rs: n, cs: 1 }, &epi);
            let mut shape = dims.to_vec();
            if let Some(last) = shape.last_mut() {
                *last = n;
            }
            Ok(Some(Tensor::from_vec(out, shape, x.device())?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Zero strides or kernel sizes (a lying model file) never reach a native kernel, whose
    /// geometry divides by them; candle's op gets them and reports the error.
    #[test]
    fn degenerate_geometry_is_left_to_candle() {
        let w = Tensor::zeros((4, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let conv = |strides: Vec<usize>, dilations: Vec<usize>| Op::Conv {
            strides,
            pads: vec![1; 4],
            dilations,
            group: 4,
            activation: None,
            residual: false,
        };
        let constant = |i: usize| (i == 1).then_some(&w);
        let prep = |op: &Op| prepare(op, (2, 1), Some(&[1, 4, 8, 8]), Winograd::Auto, constant);
        assert!(prep(&conv(vec![1, 1], vec![1, 1])).is_some());
        assert!(prep(&conv(vec![0, 1], vec![1, 1])).is_none());
        assert!(prep(&conv(vec![1, 1], vec![1, 0])).is_none());
        let pool = |kernel: Vec<usize>, strides: Vec<usize>| Op::Pool {
            kind: PoolKind::Max,
            kernel,
            strides,
            pads: vec![0; 4],
            ceil_pads: vec![],
            count_include_pad: false,
        };
        assert!(prep(&pool(vec![2, 2], vec![2, 2])).is_some());
        assert!(prep(&pool(vec![2, 2], vec![0, 2])).is_none());
        assert!(prep(&pool(vec![0, 2], vec![2, 2])).is_none());
    }
}
