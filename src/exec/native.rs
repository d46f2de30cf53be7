//! The native CPU path: nodes that our own kernels ([`crate::kernels`]) run, prepared once at
//! load (weights packed for the micro-kernel), with candle's op as the fallback for anything a
//! kernel does not cover. Every kernel is tested against the candle path.

use candle_core::{DType, Result, Tensor};

use crate::graph::{Activation, BinaryKind, Op, PoolKind, ResizeMode, ValueInfo};
use crate::kernels::conv::{ConvPacking, PackedConv};
use crate::kernels::depthwise::{depthwise_conv2d, DepthwiseShape};
use crate::kernels::gemm::{gemm, gemv, Epilogue, Layout, MatrixB, PackedA, PackedB};
use crate::kernels::layout::{self, BinOp};
use crate::kernels::par::{self, SendPtr};
use crate::kernels::pool::max_pool2d;
use crate::kernels::resize::{resize2d, AxisMap};
use crate::kernels::rowwise::{layer_norm_rows, softmax_rows};
use crate::kernels::winograd::WinogradConv;
use crate::model::DType as ModelDType;

/// When 3 × 3 stride-1 convolutions use Winograd (F(2×2, 3×3) or F(4×4, 3×3)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Winograd {
    /// Per layer, whichever measured faster at load (layers of ≥ 8 M multiply-adds).
    #[default]
    Auto,
    /// Every eligible layer, whatever its size (for tests and comparisons).
    Always,
    /// Never.
    Never,
}

named_choices!(Winograd, "Winograd policy", "auto, always or never", {
    Auto => "auto",
    Always => "always",
    Never => "never",
});

/// Which kernels run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our own kernels where they exist, candle's ops elsewhere (the default).
    #[default]
    Native,
    /// candle's ops only: the reference path.
    Candle,
}

named_choices!(Kernels, "kernels", "native or candle", {
    Native => "native",
    Candle => "candle",
});

/// How a dense convolution runs.
pub(crate) enum ConvEngine {
    /// im2col packed on the fly into the GEMM.
    Gemm(PackedConv),
    /// Winograd F(2×2, 3×3) or F(4×4, 3×3), for the 3 × 3 stride-1 layers where it measured
    /// faster.
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
/// transforms cannot pay for themselves and the load-time measurement is noise. (8 M until
/// the transforms lost their per-row call overhead; since then F(4×4) measures ~20 % faster
/// than direct on 32 channels at 28 × 28 and F(2×2) on 64 at 14 × 14, both 7.2 M: the
/// Fashion-MNIST ResNet's frame 0.58 → 0.52 ms.)
const WINOGRAD_MIN_MACS: usize = 4_000_000;
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
        /// The weights as `[tap][channel]` when the step heads a channels-last block's
        /// depthwise (made at load by `fuse::make_transposed`), else empty.
        by_tap: Vec<f32>,
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
        /// The second computed input, shaped like the output, is added before the activation.
        residual: bool,
    },
    /// Reshape or Identity: the same elements under the planned shape.
    Copy,
    /// Permuted axes.
    Transpose { perm: Vec<usize> },
    /// Broadcasting arithmetic; `constant` is (which input, its values, its shape) when one
    /// operand is a weight.
    Binary {
        op: BinOp,
        activation: Option<Activation>,
        constant: Option<Constant>,
    },
    /// Global average (or maximum) over the spatial axes.
    GlobalPool { max: bool },
    /// Concatenation; per input, its values and shape when it is a weight.
    Concat {
        axis: usize,
        constants: Vec<Option<(Vec<f32>, Vec<usize>)>>,
    },
    /// Split into pieces of `sizes` along `axis`.
    Split { axis: usize, sizes: Vec<usize> },
    /// Take constant `indices` (already in range) along `axis`.
    Gather { axis: usize, indices: Vec<usize> },
    /// Resize of the two spatial axes of an NCHW tensor whose shape is known at load.
    Resize {
        /// The input shape the maps were made for.
        input: [usize; 4],
        rows: AxisMap,
        cols: AxisMap,
    },
}

/// A weight operand of an elementwise op: (input position, values, shape).
pub(crate) type Constant = (usize, Vec<f32>, Vec<usize>);

impl Prepared {
    /// Whether the node's weights live on in packed form here, so candle's copy can be
    /// dropped. Small constants (an elementwise operand, a concatenated token) are copied and
    /// candle keeps its own, so its op can still take over when a frame's shapes surprise the
    /// kernel.
    pub(crate) fn owns_weights(&self) -> bool {
        matches!(
            self,
            Prepared::Conv { .. }
                | Prepared::Depthwise { .. }
                | Prepared::Linear { .. }
                | Prepared::LayerNorm { .. }
        )
    }

    /// Which kernel runs the node (for profiles).
    pub(crate) fn kernel_name(&self) -> &'static str {
        match self {
            Prepared::Conv {
                conv: ConvEngine::Gemm(_),
                ..
            } => "gemm-conv",
            Prepared::Conv {
                conv: ConvEngine::Winograd(c),
                ..
            } => {
                if c.tile() == 4 {
                    "winograd-f4"
                } else {
                    "winograd"
                }
            }
            Prepared::Depthwise { .. } => "depthwise",
            Prepared::Linear { .. } => "linear",
            Prepared::MaxPool { .. } => "maxpool",
            Prepared::Softmax => "softmax",
            Prepared::BatchedMatMul { .. } => "batched-matmul",
            Prepared::LayerNorm { .. } => "layernorm",
            Prepared::Copy => "copy",
            Prepared::Transpose { .. } => "transpose",
            Prepared::Binary { .. } => "binary",
            Prepared::GlobalPool { .. } => "global-pool",
            Prepared::Concat { .. } => "concat",
            Prepared::Split { .. } => "split",
            Prepared::Gather { .. } => "gather",
            Prepared::Resize { .. } => "resize",
        }
    }
}

fn host_f32(t: &Tensor) -> Option<Vec<f32>> {
    (t.dtype() == DType::F32 && t.device().is_cpu())
        .then(|| t.flatten_all().and_then(|f| f.to_vec1::<f32>()).ok())
        .flatten()
}

fn dims_f32(t: &Tensor) -> Option<(Vec<f32>, Vec<usize>)> {
    Some((host_f32(t)?, t.dims().to_vec()))
}

/// Prepares `op` (with `n_inputs` inputs and `n_outputs` outputs) when a native kernel covers
/// it. `info(i)` is the planned shape and type of the node's i-th input when it is computed per
/// frame; `constant(i)` is the input itself when it is a weight (known at load). A prepared
/// node's kernel reads only its computed inputs; its weights are part of the preparation.
pub(crate) fn prepare<'a, 'b>(
    op: &Op,
    (n_inputs, n_outputs): (usize, usize),
    info: impl Fn(usize) -> Option<&'b ValueInfo>,
    winograd: Winograd,
    constant: impl Fn(usize) -> Option<&'a Tensor>,
) -> Option<Prepared> {
    let input_shape = info(0).map(|i| i.shape.as_slice());
    let float = |i: usize| info(i).is_some_and(|v| v.dtype == ModelDType::F32);
    // The data input of every op but the elementwise and concatenating ones is computed.
    if !matches!(op, Op::Binary { .. } | Op::Concat { .. }) && constant(0).is_some() {
        return None;
    }
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
            // Inputs are X, W, [B], [R]: a bias must be a weight to be packed, a residual
            // computed.
            if *residual && constant(n_inputs - 1).is_some() {
                return None;
            }
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
                    by_tap: Vec::new(),
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
                    let make = |tile: usize| {
                        let c = WinogradConv::with_tile(
                            &weight,
                            wshape[0],
                            cin,
                            bias.as_deref(),
                            &pads4,
                            tile,
                        );
                        c.map(ConvEngine::Winograd)
                    };
                    if !try_it {
                        direct
                    } else if winograd == Winograd::Always {
                        // F(2×2): the smaller transforms, the closer to the direct result.
                        make(2).unwrap_or(direct)
                    } else {
                        // Keep whichever ran fastest here, on this CPU and thread count:
                        // F(4×4) won on 28 × 28 and 56 × 56 maps, F(2×2) on 14 × 14, direct
                        // on 7 × 7 (measured, ResNet widths, 1 thread). A Winograd form must
                        // beat direct by 10 % (the load-time timing is noisy).
                        let base = direct.time(cin, h, w);
                        let mut best = (0.9 * base, direct);
                        for tile in [2, 4] {
                            if let Some(c) = make(tile) {
                                let t = c.time(cin, h, w);
                                if t < best.0 {
                                    best = (t, c);
                                }
                            }
                        }
                        best.1
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
                residual: false,
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
        Op::Reshape { .. } | Op::Identity if float(0) && n_inputs == 1 => Some(Prepared::Copy),
        Op::Transpose { perm } if float(0) && perm.len() <= layout::MAX_RANK => {
            Some(Prepared::Transpose { perm: perm.clone() })
        }
        Op::Binary { kind, activation } if n_inputs == 2 => {
            let op = match kind {
                BinaryKind::Add => BinOp::Add,
                BinaryKind::Sub => BinOp::Sub,
                BinaryKind::Mul => BinOp::Mul,
                BinaryKind::Div => BinOp::Div,
                _ => return None,
            };
            let constant = match (constant(0), constant(1)) {
                (None, None) if float(0) && float(1) => None,
                (Some(c), None) if float(1) => {
                    let (v, d) = dims_f32(c)?;
                    Some((0, v, d))
                }
                (None, Some(c)) if float(0) => {
                    let (v, d) = dims_f32(c)?;
                    Some((1, v, d))
                }
                _ => return None,
            };
            (constant
                .as_ref()
                .is_none_or(|c| c.2.len() <= layout::MAX_RANK))
            .then_some(Prepared::Binary {
                op,
                activation: *activation,
                constant,
            })
        }
        Op::GlobalPool { kind } if float(0) => Some(Prepared::GlobalPool {
            max: *kind == PoolKind::Max,
        }),
        Op::Concat { axis } if n_inputs <= 16 => {
            let mut constants = Vec::with_capacity(n_inputs);
            for i in 0..n_inputs {
                constants.push(match constant(i) {
                    Some(c) => Some(dims_f32(c)?),
                    None if float(i) => None,
                    None => return None,
                });
            }
            Some(Prepared::Concat {
                axis: *axis,
                constants,
            })
        }
        Op::Split { axis, sizes } if float(0) && sizes.len() == n_outputs && n_outputs <= 16 => {
            Some(Prepared::Split {
                axis: *axis,
                sizes: sizes.clone(),
            })
        }
        Op::Gather { axis } if float(0) && n_inputs == 2 => {
            let dim = *input_shape?.get(*axis)? as i64;
            let raw = constant(1)?
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::I64))
                .and_then(|t| t.to_vec1::<i64>())
                .ok()?;
            let mut indices = Vec::with_capacity(raw.len());
            for i in raw {
                let j = if i < 0 { i + dim } else { i };
                // Out of range: candle's op reports it.
                if !(0..dim).contains(&j) {
                    return None;
                }
                indices.push(j as usize);
            }
            Some(Prepared::Gather {
                axis: *axis,
                indices,
            })
        }
        Op::Resize {
            mode,
            sizes,
            pre,
            div,
            post,
            nearest_mode,
            exclude_outside: _,
        } if float(0) && n_inputs >= 1 => {
            let &[n, c, h, w] = input_shape? else {
                return None;
            };
            if sizes.len() != 4 || pre.len() != 4 || div.len() != 4 || post.len() != 4 {
                return None;
            }
            // Batch and channels must pass through untouched.
            let identity = |a: usize| pre[a] == 0.0 && div[a] == 1.0 && post[a] == 0.0;
            if sizes[0] != n || sizes[1] != c || !identity(0) || !identity(1) {
                return None;
            }
            if h == 0 || w == 0 || div[2] == 0.0 || div[3] == 0.0 {
                return None;
            }
            let t = |a: usize| [pre[a], div[a], post[a]];
            let (rows, cols) = match mode {
                ResizeMode::Linear => (
                    AxisMap::linear(h, sizes[2], t(2)),
                    AxisMap::linear(w, sizes[3], t(3)),
                ),
                ResizeMode::Nearest => (
                    AxisMap::nearest(h, sizes[2], t(2), nearest_mode),
                    AxisMap::nearest(w, sizes[3], t(3), nearest_mode),
                ),
            };
            Some(Prepared::Resize {
                input: [n, c, h, w],
                rows,
                cols,
            })
        }
        // Both operands computed per frame (attention): batched products on our GEMM.
        Op::MatMul {
            activation,
            residual: false,
        } if constant(1).is_none() && float(0) && float(1) => {
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
        Op::MatMul {
            activation,
            residual,
        } => {
            let w = constant(1)?;
            if w.rank() != 2 || (*residual && constant(n_inputs - 1).is_some()) {
                return None;
            }
            let (k, n) = (w.dims()[0], w.dims()[1]);
            // A fused bias (third input) must be a constant over the last axis.
            let bias = match (n_inputs - usize::from(*residual), constant(2)) {
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
                residual: *residual,
            })
        }
        _ => None,
    }
}

/// One input of a native kernel: contiguous f32 elements and their shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct In<'a> {
    pub data: &'a [f32],
    pub dims: &'a [usize],
}

/// One output of a native kernel: the buffer it fills (every element) and the shape the plan
/// gave it.
#[derive(Debug, Default)]
pub(crate) struct Out<'a> {
    pub data: &'a mut [f32],
    pub dims: &'a [usize],
}

/// Copies a CPU f32 tensor's elements into `dst`; false when it is not one or the lengths
/// differ.
pub(crate) fn copy_f32(t: &Tensor, dst: &mut [f32]) -> Result<bool> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() || t.elem_count() != dst.len() {
        return Ok(false);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            dst.copy_from_slice(&v[a..b]);
            return Ok(true);
        }
    }
    dst.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
    Ok(true)
}

fn bail<T>(msg: String) -> Result<T> {
    Err(candle_core::Error::Msg(msg))
}

/// Runs a prepared node from `ins` (its computed inputs, in order; constants are part of the
/// preparation) into `outs`. `Ok(false)`, with nothing written, when these shapes do not suit
/// the kernel or do not give the planned output shapes (the caller then runs candle's op);
/// an error when the input cannot be valid for the op at all.
pub(crate) fn run_into(p: &Prepared, ins: &[In], outs: &mut [Out]) -> Result<bool> {
    let Some(&x) = ins.first() else {
        return Ok(false);
    };
    let dims = x.dims;
    if let [Out {
        data: out,
        dims: od,
    }] = outs
    {
        let out: &mut [f32] = out;
        return run_one(p, x, ins, out, od);
    }
    match p {
        Prepared::Split { axis, sizes } => {
            if *axis >= dims.len() || sizes.len() != outs.len() {
                return Ok(false);
            }
            let inner: usize = dims[axis + 1..].iter().product();
            let outer: usize = dims[..*axis].iter().product();
            if sizes.iter().sum::<usize>() != dims[*axis] {
                return Ok(false);
            }
            for (o, &len) in outs.iter().zip(sizes) {
                let fits = o.dims.len() == dims.len()
                    && (0..dims.len()).all(|i| o.dims[i] == if i == *axis { len } else { dims[i] });
                if !fits {
                    return Ok(false);
                }
            }
            // At most a handful of pieces: their chunk sizes on the stack.
            let mut chunks = [0usize; 16];
            if sizes.len() > chunks.len() {
                return Ok(false);
            }
            for (c, &len) in chunks.iter_mut().zip(sizes) {
                *c = len * inner;
            }
            let mut bufs: [&mut [f32]; 16] = Default::default();
            for (b, o) in bufs.iter_mut().zip(outs.iter_mut()) {
                *b = &mut *o.data;
            }
            Ok(crate::kernels::layout::split(
                x.data,
                &chunks[..sizes.len()],
                outer,
                &mut bufs[..sizes.len()],
            ))
        }
        _ => Ok(false),
    }
}

fn same(a: &[usize], b: &[usize]) -> bool {
    a == b
}

fn run_one(p: &Prepared, x: In, ins: &[In], out: &mut [f32], od: &[usize]) -> Result<bool> {
    let dims = x.dims;
    match p {
        Prepared::Conv {
            conv,
            activation,
            residual,
        } => {
            if dims.len() != 4 || ins.len() != 1 + usize::from(*residual) {
                return Ok(false);
            }
            let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
            let Some((oh, ow)) = conv.out_hw(h, w) else {
                return bail(format!("Conv input {dims:?} is smaller than its kernel"));
            };
            if !same(od, &[n, conv.cout(), oh, ow]) {
                return Ok(false);
            }
            let res = match residual.then(|| ins[1]) {
                Some(r) if same(r.dims, od) => Some(r.data),
                Some(_) => return Ok(false),
                None => None,
            };
            match conv.run(x.data, (n, c, h, w), res, *activation, out) {
                Ok(()) => Ok(true),
                Err(e) => bail(format!("Conv: {e}")),
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
            ..
        } => {
            if dims.len() != 4 || ins.len() != 1 + usize::from(*residual) {
                return Ok(false);
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
            if !same(od, &[shape.n, shape.c, oh, ow]) {
                return Ok(false);
            }
            let res = match residual.then(|| ins[1]) {
                Some(r) if same(r.dims, od) => Some(r.data),
                Some(_) => return Ok(false),
                None => None,
            };
            Ok(depthwise_conv2d(
                &shape,
                x.data,
                weight,
                bias.as_deref(),
                res,
                *activation,
                out,
            ))
        }
        Prepared::BatchedMatMul { bias, activation } => {
            let [_, b] = ins else {
                return Ok(false);
            };
            let (ad, bd) = (dims, b.dims);
            let (ra, rb) = (ad.len(), bd.len());
            // Equal batch dimensions only; broadcasting batches take candle's op.
            if ra < 2 || ra != rb || ad[..ra - 2] != bd[..rb - 2] || ad[ra - 1] != bd[rb - 2] {
                return Ok(false);
            }
            let (m, k, n) = (ad[ra - 2], ad[ra - 1], bd[rb - 1]);
            if bias.as_ref().is_some_and(|v| v.len() != n)
                || od.len() != ra
                || od[..ra - 1] != ad[..ra - 1]
                || od[ra - 1] != n
            {
                return Ok(false);
            }
            let batches: usize = ad[..ra - 2].iter().product();
            let epi = Epilogue {
                col_bias: bias.as_deref(),
                activation: *activation,
                ..Default::default()
            };
            let (xs, bs) = (x.data, b.data);
            // Items are (batch, row range): each a small serial GEMM, all of them in parallel,
            // rather than a parallel GEMM per batch with a fork and join each.
            let parts = (2 * par::current_threads())
                .div_ceil(batches.max(1))
                .clamp(1, m.max(1));
            let rows = |p: usize| (p * m / parts, (p + 1) * m / parts);
            let outp = SendPtr(out.as_mut_ptr());
            par::par_for(batches * parts, |item| {
                let (i, (r0, r1)) = (item / parts, rows(item % parts));
                if r0 == r1 {
                    return;
                }
                let a0 = (i * m + r0) * k;
                let a = PackedA::pack_scratch(&xs[a0..a0 + (r1 - r0) * k], r1 - r0, k, k, 1);
                let rhs = MatrixB {
                    data: &bs[i * k * n..(i + 1) * k * n],
                    rs: n,
                    cs: 1,
                };
                // SAFETY: rows r0..r1 of batch i are this item's alone, inside `out`.
                let c = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add((i * m + r0) * n), (r1 - r0) * n)
                };
                gemm(&a, &rhs, n, c, Layout { rs: n, cs: 1 }, &epi);
                a.recycle();
            });
            Ok(true)
        }
        Prepared::Softmax => {
            let Some(&cols) = dims.last() else {
                return Ok(false);
            };
            if !same(od, dims) {
                return Ok(false);
            }
            out.copy_from_slice(x.data);
            softmax_rows(out, cols);
            Ok(true)
        }
        Prepared::LayerNorm {
            inner,
            gamma,
            beta,
            epsilon,
        } => {
            if !same(od, dims) || !x.data.len().is_multiple_of(*inner.max(&1)) {
                return Ok(false);
            }
            layer_norm_rows(x.data, out, *inner, gamma, beta.as_deref(), *epsilon);
            Ok(true)
        }
        Prepared::MaxPool { window } => {
            if dims.len() != 4 {
                return Ok(false);
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
            if !same(od, &[s.n, s.c, oh, ow]) {
                return Ok(false);
            }
            Ok(max_pool2d(&s, x.data, out))
        }
        Prepared::Linear {
            w,
            bias,
            activation,
            residual,
        } => {
            let (k, n) = (w.k(), w.n());
            if ins.len() != 1 + usize::from(*residual) {
                return Ok(false);
            }
            let res = match residual.then(|| ins[1]) {
                Some(r) if same(r.dims, od) => Some(r.data),
                Some(_) => return Ok(false),
                None => None,
            };
            if dims.last() != Some(&k)
                || od.len() != dims.len()
                || od[..od.len() - 1] != dims[..dims.len() - 1]
                || od.last() != Some(&n)
            {
                return Ok(false);
            }
            let rows = x.data.len() / k.max(1);
            let epi = Epilogue {
                col_bias: bias.as_deref(),
                residual: res,
                activation: *activation,
                ..Default::default()
            };
            // y = x · W: the rows of x (tokens) are the packed left operand, packed per frame
            // (rows × k, small beside the rows × k × n product), W the prepacked right one.
            if rows == 1 {
                gemv(x.data, w, out, &epi);
                return Ok(true);
            }
            let a = PackedA::pack_scratch(x.data, rows, k, k, 1);
            gemm(&a, w, n, out, Layout { rs: n, cs: 1 }, &epi);
            a.recycle();
            Ok(true)
        }
        Prepared::Copy => {
            if od.iter().product::<usize>() != out.len() {
                return Ok(false);
            }
            Ok(layout::copy(x.data, out))
        }
        Prepared::Transpose { perm } => {
            let permuted = perm.len() == dims.len()
                && od.len() == dims.len()
                && perm.iter().zip(od).all(|(&p, &d)| dims.get(p) == Some(&d));
            Ok(permuted && layout::transpose(x.data, dims, perm, out))
        }
        Prepared::Binary {
            op,
            activation,
            constant,
        } => {
            let (a, b) = match (constant, ins) {
                (None, [a, b]) => (*a, *b),
                (Some((0, c, cd)), [b]) => (In { data: c, dims: cd }, *b),
                (Some((1, c, cd)), [a]) => (*a, In { data: c, dims: cd }),
                _ => return Ok(false),
            };
            // The output shape must be exactly the broadcast of the two.
            let r = a.dims.len().max(b.dims.len());
            if od.len() != r {
                return Ok(false);
            }
            let dim = |d: &[usize], i: usize| {
                let lead = r - d.len();
                if i < lead {
                    1
                } else {
                    d[i - lead]
                }
            };
            let broadcast_ok = (0..r).all(|i| {
                let (p, q) = (dim(a.dims, i), dim(b.dims, i));
                od[i] == if p == 1 { q } else { p }
            });
            Ok(broadcast_ok
                && layout::binary(
                    *op,
                    (a.data, a.dims),
                    (b.data, b.dims),
                    (out, od),
                    *activation,
                ))
        }
        Prepared::Resize { input, rows, cols } => {
            if dims != input.as_slice()
                || od.len() != 4
                || od[..2] != input[..2]
                || od[2] != rows.positions()
                || od[3] != cols.positions()
            {
                return Ok(false);
            }
            let planes = input[0] * input[1];
            Ok(resize2d(
                x.data,
                (planes, input[2], input[3]),
                rows,
                cols,
                out,
            ))
        }
        Prepared::GlobalPool { max } => {
            if dims.len() < 3 || od.len() != dims.len() {
                return Ok(false);
            }
            let fits = od[..2] == dims[..2] && od[2..].iter().all(|&d| d == 1);
            let plane: usize = dims[2..].iter().product();
            Ok(fits && layout::global_pool(x.data, plane, *max, out))
        }
        Prepared::Concat { axis, constants } => {
            if constants.len() > 16 || *axis >= od.len() {
                return Ok(false);
            }
            let mut parts: [&[f32]; 16] = [&[]; 16];
            let mut chunks = [0usize; 16];
            let mut computed = ins.iter();
            let inner: usize = od[axis + 1..].iter().product();
            let outer: usize = od[..*axis].iter().product();
            let mut along = 0;
            for (i, c) in constants.iter().enumerate() {
                let part = match c {
                    Some((data, d)) => In { data, dims: d },
                    None => match computed.next() {
                        Some(p) => *p,
                        None => return Ok(false),
                    },
                };
                let pd = part.dims;
                let agrees = pd.len() == od.len()
                    && pd
                        .iter()
                        .zip(od)
                        .enumerate()
                        .all(|(j, (a, b))| j == *axis || a == b);
                if !agrees {
                    return Ok(false);
                }
                along += pd[*axis];
                parts[i] = part.data;
                chunks[i] = pd[*axis] * inner;
            }
            if computed.next().is_some() || along != od[*axis] {
                return Ok(false);
            }
            let n = constants.len();
            Ok(layout::concat(&parts[..n], &chunks[..n], outer, out))
        }
        Prepared::Gather { axis, indices } => {
            if *axis >= dims.len() {
                return Ok(false);
            }
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            if od.iter().product::<usize>() != outer * indices.len() * inner {
                return Ok(false);
            }
            Ok(layout::gather(
                x.data,
                (outer, dims[*axis], inner),
                indices,
                out,
            ))
        }
        // One piece: the whole input.
        Prepared::Split { sizes, .. } if sizes.len() == 1 && same(od, dims) => {
            Ok(layout::copy(x.data, out))
        }
        Prepared::Split { .. } => Ok(false),
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
        let x = ValueInfo {
            shape: vec![1, 4, 8, 8],
            dtype: ModelDType::F32,
        };
        let info = |i: usize| (i == 0).then_some(&x);
        let prep = |op: &Op| prepare(op, (2, 1), info, Winograd::Auto, constant);
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
