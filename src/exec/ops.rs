//! One function per [`Op`] on candle tensors. The same code folds constants at import and runs
//! frames, so a folded constant is exactly what the executor would have computed.

use candle_core::{DType, Device, Result, Tensor};

use crate::graph::{
    Activation, BinaryKind, Op, PadMode, PoolKind, ReduceKind, ResizeMode, SliceRange, UnaryKind,
    VariadicKind,
};
use crate::kernels::resize::{linear_source, nearest_source};

fn bail<T>(msg: String) -> Result<T> {
    Err(candle_core::Error::Msg(msg))
}

fn input<'a>(inputs: &'a [Tensor], i: usize, op: &str) -> Result<&'a Tensor> {
    match inputs.get(i) {
        Some(t) => Ok(t),
        None => bail(format!(
            "{op} expects at least {} inputs, got {}",
            i + 1,
            inputs.len()
        )),
    }
}

/// Runs `op` on `inputs` and returns its outputs.
pub fn eval(op: &Op, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let x = || input(inputs, 0, &op.name());
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Conv {
            strides,
            pads,
            dilations,
            group,
            activation,
            residual,
        } => {
            let w = input(inputs, 1, "Conv")?;
            let (bias, res) = conv_extra_inputs(inputs, *residual);
            #[cfg(feature = "cuda")]
            if let Some(y) = conv_cuda(
                x()?,
                w,
                bias,
                res,
                (strides, pads, dilations, *group),
                activation.as_ref(),
            )? {
                return one(y);
            }
            let mut y = conv(x()?, w, bias, strides, pads, dilations, *group)?;
            if let Some(r) = res {
                y = y.broadcast_add(r)?;
            }
            one(apply_activation(y, activation.as_ref())?)
        }
        Op::ConvTranspose {
            strides,
            pads,
            dilations,
            output_padding,
            group,
        } => {
            let w = input(inputs, 1, "ConvTranspose")?;
            one(conv_transpose(
                x()?,
                w,
                inputs.get(2),
                strides,
                pads,
                dilations,
                output_padding,
                *group,
            )?)
        }
        Op::BatchNormalization { epsilon } => {
            let x = x()?;
            let rank = x.rank();
            let p = |i| -> Result<Tensor> {
                channel_param(input(inputs, i, "BatchNormalization")?, rank)
            };
            let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
            let inv = (var + *epsilon as f64)?.sqrt()?.recip()?;
            let y = x.broadcast_sub(&mean)?.broadcast_mul(&(inv * scale)?)?;
            one(y.broadcast_add(&bias)?)
        }
        Op::Activation { activation } => one(apply_activation(x()?.clone(), Some(activation))?),
        Op::PRelu => {
            let x = x()?;
            let slope = input(inputs, 1, "PRelu")?;
            let pos = x.maximum(0f64)?;
            let neg = x.minimum(0f64)?.broadcast_mul(slope)?;
            one(pos.broadcast_add(&neg)?)
        }
        Op::Softmax { axis } => one(candle_nn::ops::softmax(x()?, *axis)?),
        Op::Binary { kind, activation } => {
            let b = input(inputs, 1, "binary op")?;
            let y = binary(*kind, x()?, b)?;
            one(apply_activation(y, activation.as_ref())?)
        }
        Op::Variadic { kind } => {
            let mut acc = x()?.clone();
            for t in &inputs[1..] {
                acc = match kind {
                    VariadicKind::Max => acc.broadcast_maximum(t)?,
                    VariadicKind::Min => acc.broadcast_minimum(t)?,
                    VariadicKind::Sum => acc.broadcast_add(t)?,
                };
            }
            one(acc)
        }
        Op::Unary { kind } => {
            let x = x()?;
            one(match kind {
                UnaryKind::Sqrt => x.sqrt()?,
                UnaryKind::Exp => x.exp()?,
                UnaryKind::Log => x.log()?,
                UnaryKind::Erf => x.erf()?,
            })
        }
        Op::MatMul {
            activation,
            residual,
        } => {
            let mut y = matmul(x()?, input(inputs, 1, "MatMul")?)?;
            // A fused bias (set by the load-time passes) broadcasts over the last axis.
            if inputs.len() == 3 + usize::from(*residual) {
                y = y.broadcast_add(&inputs[2])?;
            }
            if *residual {
                y = y.broadcast_add(input(inputs, inputs.len() - 1, "MatMul residual")?)?;
            }
            one(apply_activation(y, activation.as_ref())?)
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
            activation,
        } => {
            let mut a = x()?.clone();
            let mut b = input(inputs, 1, "Gemm")?.clone();
            if *trans_a {
                a = a.t()?;
            }
            if *trans_b {
                b = b.t()?;
            }
            let mut y = a.contiguous()?.matmul(&b.contiguous()?)?;
            if *alpha != 1.0 {
                y = (y * *alpha as f64)?;
            }
            if let Some(c) = inputs.get(2) {
                let c = if *beta != 1.0 {
                    (c * *beta as f64)?
                } else {
                    c.clone()
                };
                y = y.broadcast_add(&c)?;
            }
            one(apply_activation(y, activation.as_ref())?)
        }
        Op::Pool {
            kind,
            kernel,
            strides,
            pads,
            ceil_pads,
            count_include_pad,
        } => one(pool(
            x()?,
            *kind,
            kernel,
            strides,
            pads,
            ceil_pads,
            *count_include_pad,
        )?),
        Op::GlobalPool { kind } => {
            let x = x()?;
            let mut y = x.clone();
            for axis in (2..x.rank()).rev() {
                y = match kind {
                    PoolKind::Avg => y.mean_keepdim(axis)?,
                    PoolKind::Max => y.max_keepdim(axis)?,
                };
            }
            one(y)
        }
        Op::Reshape { shape } => one(x()?.reshape(shape.as_slice())?),
        Op::Transpose { perm } => one(x()?.permute(perm.as_slice())?.contiguous()?),
        Op::Concat { axis } => one(Tensor::cat(inputs, *axis)?),
        Op::Split { axis, sizes } => {
            let x = x()?;
            let mut start = 0;
            let mut outs = Vec::with_capacity(sizes.len());
            for &len in sizes {
                outs.push(x.narrow(*axis, start, len)?);
                start += len;
            }
            Ok(outs)
        }
        Op::Slice { ranges } => one(slice(x()?, ranges)?),
        Op::Resize {
            mode,
            sizes,
            pre,
            div,
            post,
            nearest_mode,
            exclude_outside: _,
        } => one(resize(x()?, *mode, sizes, [pre, div, post], nearest_mode)?),
        Op::Pad { mode, pads, value } => one(pad(x()?, *mode, pads, *value)?),
        Op::Reduce {
            kind,
            axes,
            keepdims,
        } => {
            let x = x()?;
            let mut y = x.clone();
            for &axis in axes.iter().rev() {
                y = match kind {
                    ReduceKind::Mean => y.mean_keepdim(axis)?,
                    ReduceKind::Max => y.max_keepdim(axis)?,
                };
            }
            if !keepdims {
                let shape: Vec<usize> = y
                    .dims()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, d)| *d)
                    .collect();
                y = y.reshape(shape)?;
            }
            one(y)
        }
        Op::LayerNormalization { axis, epsilon } => {
            let x = x()?;
            let dims = x.dims().to_vec();
            let outer: usize = dims[..*axis].iter().product();
            let inner: usize = dims[*axis..].iter().product();
            let flat = x.reshape((outer, inner))?;
            let mean = flat.mean_keepdim(1)?;
            let centred = flat.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(1)?;
            let inv_std = (var + *epsilon as f64)?.sqrt()?.recip()?;
            let normed = centred.broadcast_mul(&inv_std)?;
            let mut y = normed.reshape(dims.as_slice())?;
            y = y.broadcast_mul(input(inputs, 1, "LayerNormalization")?)?;
            if let Some(b) = inputs.get(2) {
                y = y.broadcast_add(b)?;
            }
            // ONNX's optional Mean and InvStdDev outputs keep the reduced axes as 1.
            let mut stat_shape = dims[..*axis].to_vec();
            stat_shape.resize(dims.len(), 1);
            Ok(vec![
                y,
                mean.reshape(stat_shape.as_slice())?,
                inv_std.reshape(stat_shape.as_slice())?,
            ])
        }
        Op::Identity => one(x()?.clone()),
        Op::Shape { start, end } => {
            let x = x()?;
            let dims: Vec<i64> = x.dims()[*start..*end].iter().map(|&d| d as i64).collect();
            let n = dims.len();
            one(Tensor::from_vec(dims, n, x.device())?)
        }
        Op::Gather { axis } => one(gather(x()?, input(inputs, 1, "Gather")?, *axis)?),
        Op::Cast { to } => one(cast(x()?, *to)?),
        Op::Expand { shape } => one(x()?.broadcast_as(shape.as_slice())?.contiguous()?),
        Op::Where => {
            let cond = x()?;
            let a = input(inputs, 1, "Where")?;
            let b = input(inputs, 2, "Where")?;
            let shape = broadcast_shape(&[cond.dims(), a.dims(), b.dims()])?;
            let cond = cond.broadcast_as(shape.as_slice())?.contiguous()?;
            let a = a.broadcast_as(shape.as_slice())?.contiguous()?;
            let b = b.broadcast_as(shape.as_slice())?.contiguous()?;
            one(cond.where_cond(&a, &b)?)
        }
    }
}

/// numpy broadcasting of several shapes.
pub fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return bail(format!("shapes {shapes:?} do not broadcast"));
            }
        }
    }
    Ok(out)
}

/// Reshapes a per-channel vector [C] to [1, C, 1, ...] for an input of `rank`.
fn channel_param(p: &Tensor, rank: usize) -> Result<Tensor> {
    let c = p.elem_count();
    let mut shape = vec![1usize; rank.max(2)];
    shape[1] = c;
    p.reshape(shape)
}

/// Applies an activation (fused or standalone).
pub fn apply_activation(x: Tensor, act: Option<&Activation>) -> Result<Tensor> {
    let Some(act) = act else { return Ok(x) };
    match *act {
        Activation::Relu => x.relu(),
        Activation::Clip { min, max } => {
            let mut y = x;
            if let Some(m) = min {
                y = y.maximum(m as f64)?;
            }
            if let Some(m) = max {
                y = y.minimum(m as f64)?;
            }
            Ok(y)
        }
        Activation::LeakyRelu { alpha } => {
            let pos = x.maximum(0f64)?;
            let neg = (x.minimum(0f64)? * alpha as f64)?;
            pos + neg
        }
        Activation::Sigmoid => candle_nn::ops::sigmoid(&x),
        Activation::HardSigmoid { alpha, beta } => {
            x.affine(alpha as f64, beta as f64)?.clamp(0f64, 1f64)
        }
        Activation::HardSwish => {
            let gate = x.affine(1.0 / 6.0, 0.5)?.clamp(0f64, 1f64)?;
            x * gate
        }
        Activation::Tanh => x.tanh(),
        Activation::Gelu { tanh } => {
            if tanh {
                x.gelu()
            } else {
                x.gelu_erf()
            }
        }
    }
}

fn binary(kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match kind {
        BinaryKind::Add => a.broadcast_add(b),
        BinaryKind::Sub => a.broadcast_sub(b),
        BinaryKind::Mul => a.broadcast_mul(b),
        BinaryKind::Div => {
            if a.dtype().is_int() {
                // Integer division by zero would panic inside the engine; dividing in f64 and
                // truncating gives C semantics and turns /0 into a saturated value instead.
                let q = a
                    .to_dtype(DType::F64)?
                    .broadcast_div(&b.to_dtype(DType::F64)?)?;
                let t = q.ge(0f64)?.where_cond(&q.floor()?, &q.ceil()?)?;
                t.to_dtype(a.dtype())
            } else {
                a.broadcast_div(b)
            }
        }
        BinaryKind::Pow => {
            if b.elem_count() == 1 && a.dtype().is_float() {
                let e = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
                if e == 2.0 {
                    return a.sqr();
                }
                if e == 1.0 {
                    return Ok(a.clone());
                }
                if e == 0.5 {
                    return a.sqrt();
                }
                a.powf(e)
            } else {
                let shape = broadcast_shape(&[a.dims(), b.dims()])?;
                let af = a.broadcast_as(shape.as_slice())?.to_dtype(DType::F64)?;
                let bf = b.broadcast_as(shape.as_slice())?.to_dtype(DType::F64)?;
                let av = af.flatten_all()?.to_vec1::<f64>()?;
                let bv = bf.flatten_all()?.to_vec1::<f64>()?;
                let out: Vec<f64> = av.iter().zip(&bv).map(|(x, y)| x.powf(*y)).collect();
                Tensor::from_vec(out, shape, a.device())?.to_dtype(a.dtype())
            }
        }
        BinaryKind::Equal => a.broadcast_eq(b),
    }
}

fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a2 = if a1 { a.unsqueeze(0)? } else { a.clone() };
    let b2 = if b1 { b.unsqueeze(1)? } else { b.clone() };
    let mut y = if a2.rank() == 2 && b2.rank() == 2 {
        a2.contiguous()?.matmul(&b2.contiguous()?)?
    } else {
        // Broadcast batch dims explicitly: candle's broadcast_matmul wants equal-rank inputs.
        let ra = a2.rank().max(b2.rank());
        let (m, k) = (a2.dims()[a2.rank() - 2], a2.dims()[a2.rank() - 1]);
        let (k2, n) = (b2.dims()[b2.rank() - 2], b2.dims()[b2.rank() - 1]);
        if k != k2 {
            return bail(format!(
                "MatMul inner dimensions differ: {:?} x {:?}",
                a.dims(),
                b.dims()
            ));
        }
        let batch = broadcast_shape(&[&a2.dims()[..a2.rank() - 2], &b2.dims()[..b2.rank() - 2]])?;
        let bsz: usize = batch.iter().product();
        let mut sa = batch.clone();
        sa.extend([m, k]);
        let mut sb = batch.clone();
        sb.extend([k, n]);
        let _ = ra;
        let a3 = a2.broadcast_as(sa)?.contiguous()?.reshape((bsz, m, k))?;
        let b3 = b2.broadcast_as(sb)?.contiguous()?.reshape((bsz, k, n))?;
        let mut so = batch;
        so.extend([m, n]);
        a3.matmul(&b3)?.reshape(so)?
    };
    if a1 {
        y = y.squeeze(y.rank() - 2)?;
    }
    if b1 {
        y = y.squeeze(y.rank() - 1)?;
    }
    Ok(y)
}

/// Pads spatial axes (from axis 2) with `value`, begins then ends.
fn pad_spatial(x: &Tensor, pads: &[usize], value: f64) -> Result<Tensor> {
    let n = pads.len() / 2;
    let mut y = x.clone();
    for i in 0..n {
        let (b, e) = (pads[i], pads[i + n]);
        if b == 0 && e == 0 {
            continue;
        }
        y = pad_axis_const(&y, 2 + i, b, e, value)?;
    }
    Ok(y)
}

fn pad_axis_const(x: &Tensor, axis: usize, begin: usize, end: usize, value: f64) -> Result<Tensor> {
    if value == 0.0 {
        return x.pad_with_zeros(axis, begin, end);
    }
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if begin > 0 {
        shape[axis] = begin;
        parts.push(Tensor::full(value, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if end > 0 {
        shape[axis] = end;
        parts.push(Tensor::full(value, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    Tensor::cat(&parts, axis)
}

/// Keeps every `step`-th index along `axis` (for anisotropic strides candle cannot express).
fn subsample(x: &Tensor, axis: usize, step: usize) -> Result<Tensor> {
    if step == 1 {
        return Ok(x.clone());
    }
    let n = x.dims()[axis].div_ceil(step);
    let idx: Vec<u32> = (0..n).map(|i| (i * step) as u32).collect();
    take(x, idx, axis)
}

/// A Conv node's optional bias and fused residual: inputs are X, W, [B], [R].
pub fn conv_extra_inputs(inputs: &[Tensor], residual: bool) -> (Option<&Tensor>, Option<&Tensor>) {
    let extra = inputs.get(2..).unwrap_or(&[]);
    match (residual, extra) {
        (true, [b, r]) => (Some(b), Some(r)),
        (true, [r]) => (None, Some(r)),
        (_, [b, ..]) => (Some(b), None),
        _ => (None, None),
    }
}

/// A 2-D convolution on CUDA with fewer launches than candle's ops: grouped ones in one kernel,
/// 1×1 ones as one product, and bias + residual + ReLU/clip in one pass. `None` off CUDA.
#[cfg(feature = "cuda")]
fn conv_cuda(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    res: Option<&Tensor>,
    (strides, pads, dilations, group): (&[usize], &[usize], &[usize], usize),
    act: Option<&Activation>,
) -> Result<Option<Tensor>> {
    use super::cuda;
    if !x.device().is_cuda() || w.rank() != 4 {
        return Ok(None);
    }
    let raw = match cuda::grouped_conv2d(x, w, strides, pads, dilations, group)? {
        Some(y) => y,
        None => match cuda::pointwise_conv2d(x, w, strides, pads, group)? {
            Some(y) => y,
            None => conv(x, w, None, strides, pads, dilations, group)?,
        },
    };
    if let (Some(b), Some((lo, hi))) = (bias, crate::graph::clamp_bounds(act)) {
        if res.is_none_or(|r| r.dims() == raw.dims()) {
            if let Some(y) = cuda::bias_act(&raw, b, res, lo, hi)? {
                return Ok(Some(y));
            }
        }
    }
    let mut y = match bias {
        Some(b) => raw.broadcast_add(&channel_param(b, raw.rank())?)?,
        None => raw,
    };
    if let Some(r) = res {
        y = y.broadcast_add(r)?;
    }
    apply_activation(y, act).map(Some)
}

fn conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    strides: &[usize],
    pads: &[usize],
    dilations: &[usize],
    group: usize,
) -> Result<Tensor> {
    let spatial = w.rank().saturating_sub(2);
    let xp = pad_spatial(x, pads, 0.0)?;
    let y = match spatial {
        1 => xp.conv1d(w, 0, strides[0], dilations[0], group)?,
        2 => {
            if dilations[0] != dilations[1] {
                return bail(format!("unsupported: anisotropic dilations {dilations:?}"));
            }
            if strides[0] == strides[1] {
                xp.conv2d(w, 0, strides[0], dilations[0], group)?
            } else {
                let y = xp.conv2d(w, 0, 1, dilations[0], group)?;
                subsample(&subsample(&y, 2, strides[0])?, 3, strides[1])?
            }
        }
        n => return bail(format!("unsupported: {n}-D convolution")),
    };
    match bias {
        Some(b) => y.broadcast_add(&channel_param(b, y.rank())?),
        None => Ok(y),
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    strides: &[usize],
    pads: &[usize],
    dilations: &[usize],
    output_padding: &[usize],
    group: usize,
) -> Result<Tensor> {
    if w.rank() != 4 || strides.len() != 2 {
        return bail("unsupported: ConvTranspose other than 2-D".into());
    }
    if strides[0] != strides[1] || dilations[0] != dilations[1] {
        return bail(format!(
            "unsupported: ConvTranspose with anisotropic strides {strides:?} / dilations {dilations:?}"
        ));
    }
    let full = if group == 1 {
        x.conv_transpose2d(w, 0, 0, strides[0], dilations[0])?
    } else {
        let cin = x.dims()[1] / group;
        let mut outs = Vec::with_capacity(group);
        for g in 0..group {
            let xg = x.narrow(1, g * cin, cin)?.contiguous()?;
            let wg = w.narrow(0, g * cin, cin)?.contiguous()?;
            outs.push(xg.conv_transpose2d(&wg, 0, 0, strides[0], dilations[0])?);
        }
        Tensor::cat(&outs, 1)?
    };
    // Output padding extends the end; ONNX pads then crop both sides.
    let mut y = full;
    for i in 0..2 {
        let axis = 2 + i;
        let op = output_padding.get(i).copied().unwrap_or(0);
        if op > 0 {
            y = y.pad_with_zeros(axis, 0, op)?;
        }
        let (b, e) = (pads[i], pads[i + 2]);
        let len = y.dims()[axis];
        if b + e > len {
            return bail(format!(
                "ConvTranspose pads {pads:?} exceed the output size {len}"
            ));
        }
        y = y.narrow(axis, b, len - b - e)?;
    }
    match bias {
        Some(b) => y.broadcast_add(&channel_param(b, 4)?),
        None => Ok(y),
    }
}

fn pool(
    x: &Tensor,
    kind: PoolKind,
    kernel: &[usize],
    strides: &[usize],
    pads: &[usize],
    ceil_pads: &[usize],
    count_include_pad: bool,
) -> Result<Tensor> {
    let extra = |i: usize| ceil_pads.get(i).copied().unwrap_or(0);
    // 1-D pools run as 2-D pools over a height of 1.
    let (x4, k, s, p, c, squeeze) = match kernel.len() {
        1 => (
            x.unsqueeze(2)?,
            [1, kernel[0]],
            [1, strides[0]],
            vec![0, pads[0], 0, pads[1]],
            vec![0, 0, 0, extra(0)],
            true,
        ),
        2 => (
            x.clone(),
            [kernel[0], kernel[1]],
            [strides[0], strides[1]],
            pads.to_vec(),
            vec![0, 0, extra(0), extra(1)],
            false,
        ),
        n => return bail(format!("unsupported: {n}-D pooling")),
    };
    let y = match kind {
        PoolKind::Max => {
            let xp = pad_spatial(&x4, &p, f64::NEG_INFINITY)?;
            xp.max_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))?
        }
        PoolKind::Avg => {
            let xp = pad_spatial(&pad_spatial(&x4, &p, 0.0)?, &c, 0.0)?;
            let area = (k[0] * k[1]) as f64;
            let sums = (xp.avg_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))? * area)?;
            // The divisor per window: cells of the input, plus explicit pads when counted.
            // ceil_mode's extra end cells are never counted, as in PyTorch.
            let (h, w) = (x4.dims()[2], x4.dims()[3]);
            let mask = Tensor::ones((1, 1, h, w), x4.dtype(), x4.device())?;
            let mask = pad_spatial(&mask, &p, if count_include_pad { 1.0 } else { 0.0 })?;
            let mask = pad_spatial(&mask, &c, 0.0)?;
            let counts = (mask.avg_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))? * area)?;
            sums.broadcast_div(&counts)?
        }
    };
    if squeeze {
        y.squeeze(2)
    } else {
        Ok(y)
    }
}

fn slice(x: &Tensor, ranges: &[SliceRange]) -> Result<Tensor> {
    let mut y = x.clone();
    for r in ranges {
        if r.step == 1 {
            y = y.narrow(r.axis, r.start, r.count)?;
        } else {
            let idx: Vec<u32> = (0..r.count)
                .map(|i| (r.start as i64 + i as i64 * r.step) as u32)
                .collect();
            y = take(&y, idx, r.axis)?;
        }
    }
    Ok(y)
}

fn resize(
    x: &Tensor,
    mode: ResizeMode,
    sizes: &[usize],
    [pre, div, post]: [&[f64]; 3],
    nearest_mode: &str,
) -> Result<Tensor> {
    let mut y = x.clone();
    for axis in 0..sizes.len() {
        let (n_in, n_out) = (y.dims()[axis], sizes[axis]);
        let (p, d, q) = (pre[axis], div[axis], post[axis]);
        if n_in == n_out && p == 0.0 && d == 1.0 && q == 0.0 {
            continue;
        }
        let src: Vec<f64> = (0..n_out).map(|i| (i as f64 + p) / d + q).collect();
        let last = (n_in - 1) as f64;
        match mode {
            ResizeMode::Nearest => {
                let idx: Vec<u32> = src
                    .iter()
                    .map(|&c| nearest_source(c, last, nearest_mode) as u32)
                    .collect();
                y = take(&y, idx, axis)?;
            }
            ResizeMode::Linear => {
                let mut i0 = Vec::with_capacity(n_out);
                let mut i1 = Vec::with_capacity(n_out);
                let mut wt = Vec::with_capacity(n_out);
                for &c in &src {
                    let (a, b, w) = linear_source(c, last);
                    i0.push(a as u32);
                    i1.push(b as u32);
                    wt.push(w);
                }
                let dev = y.device().clone();
                let a = take(&y, i0, axis)?;
                let b = take(&y, i1, axis)?;
                let mut wshape = vec![1usize; y.rank()];
                wshape[axis] = n_out;
                let w = Tensor::from_vec(wt, wshape, &dev)?.to_dtype(y.dtype())?;
                y = a.broadcast_add(&(b - &a)?.broadcast_mul(&w)?)?;
            }
        }
    }
    Ok(y)
}

fn pad(x: &Tensor, mode: PadMode, pads: &[i64], value: f32) -> Result<Tensor> {
    let rank = x.rank();
    let mut y = x.clone();
    for axis in 0..rank {
        let (b, e) = (pads[axis], pads[axis + rank]);
        if b == 0 && e == 0 {
            continue;
        }
        // Negative pads crop first.
        let n = y.dims()[axis] as i64;
        let (cb, ce) = ((-b).max(0), (-e).max(0));
        if cb + ce > n {
            return bail(format!("Pad crops {cb}+{ce} from an axis of {n}"));
        }
        if cb > 0 || ce > 0 {
            y = y.narrow(axis, cb as usize, (n - cb - ce) as usize)?;
        }
        let (b, e) = (b.max(0) as usize, e.max(0) as usize);
        if b == 0 && e == 0 {
            continue;
        }
        let n = y.dims()[axis] as i64;
        y = match mode {
            PadMode::Constant => pad_axis_const(&y, axis, b, e, value as f64)?,
            _ => {
                let idx: Result<Vec<u32>> = (-(b as i64)..n + e as i64)
                    .map(|i| {
                        let j = match mode {
                            PadMode::Edge => i.clamp(0, n - 1),
                            PadMode::Wrap => i.rem_euclid(n),
                            _ => {
                                if n == 1 {
                                    0
                                } else {
                                    let period = 2 * (n - 1);
                                    let m = i.rem_euclid(period);
                                    if m < n {
                                        m
                                    } else {
                                        period - m
                                    }
                                }
                            }
                        };
                        Ok(j as u32)
                    })
                    .collect();
                let idx = idx?;
                take(&y, idx, axis)?
            }
        };
    }
    Ok(y)
}

fn gather(data: &Tensor, indices: &Tensor, axis: usize) -> Result<Tensor> {
    let dim = data.dims()[axis] as i64;
    let idx_shape = indices.dims().to_vec();
    let raw = indices
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let mut fixed = Vec::with_capacity(raw.len());
    for &i in &raw {
        let j = if i < 0 { i + dim } else { i };
        if j < 0 || j >= dim {
            return bail(format!(
                "Gather index {i} out of range for axis of size {dim}"
            ));
        }
        fixed.push(j as u32);
    }
    let picked = take(data, fixed, axis)?;
    let mut shape = data.dims()[..axis].to_vec();
    shape.extend(&idx_shape);
    shape.extend(&data.dims()[axis + 1..]);
    picked.reshape(shape)
}

fn cast(x: &Tensor, to: crate::model::DType) -> Result<Tensor> {
    use crate::model::DType as M;
    let target = match to {
        M::Bool => return x.ne(0f64),
        M::U8 => DType::U8,
        M::I16 => DType::I16,
        M::I32 => DType::I32,
        M::I64 => DType::I64,
        M::F16 => DType::F16,
        M::BF16 => DType::BF16,
        M::F32 => DType::F32,
        M::F64 => DType::F64,
        M::I8 => return bail("unsupported: Cast to int8".into()),
    };
    x.to_dtype(target)
}

/// A zero tensor standing in for a dynamic value during shape inference at import.
pub fn probe(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros(shape, dtype, device)
}

/// Picks `idx` along `axis`. candle's CPU index-select wants a contiguous source, and slices and
/// transposes hand us strided views.
fn take(x: &Tensor, idx: Vec<u32>, axis: usize) -> Result<Tensor> {
    let n = idx.len();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    x.contiguous()?.index_select(&idx, axis)
}
