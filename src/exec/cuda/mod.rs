//! Our CUDA kernels for what candle runs badly on a GPU, as candle custom ops.
//!
//! candle runs a grouped convolution as one convolution per group plus a concatenation:
//! MobileNetV2's depthwise layers (up to 960 groups) cost 200+ ms a frame on an H200 that way.
//! [`grouped_conv2d`] runs any grouped 2-D convolution as one launch, [`pointwise_conv2d`] a
//! 1×1 convolution as one cuBLAS product (candle: im2col, product, transposing copy), and
//! [`bias_act`] a convolution's bias, residual and ReLU/clip as one pass (candle: up to four
//! launches). A batch-1 frame on a big GPU is bound by launches, not arithmetic. The PTX comes from
//! `grouped_conv.cu`, compiled by build.rs with nvcc (the `cuda` feature needs nvcc anyway,
//! for candle's own kernels).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/grouped_conv.ptx"));
const MODULE: &str = "edgeinfer_grouped_conv";

/// The kernel's geometry argument; field for field `ConvShape` in grouped_conv.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    n: i32,
    cin: i32,
    h: i32,
    w: i32,
    cout: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    sh: i32,
    sw: i32,
    ph: i32,
    pw: i32,
    dh: i32,
    dw: i32,
    cin_g: i32,
    cout_g: i32,
}

// SAFETY: a plain `repr(C)` struct of i32, passed by value as the kernel's first parameter.
unsafe impl DeviceRepr for ConvShape {}

struct GroupedConv2d(ConvShape);

fn launch<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    s: &ConvShape,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    elems: usize,
) -> Result<CudaSlice<T>> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    // SAFETY: every element is written by the kernel below before anyone reads it.
    let y = unsafe { dev.alloc::<T>(elems)? };
    let mut b = func.builder();
    b.arg(s);
    b.arg(x);
    b.arg(w);
    b.arg(&y);
    let cfg = LaunchConfig::for_num_elems(elems as u32);
    // SAFETY: the arguments match the kernel's signature; x and w hold the elements the shape
    // names (contiguous, checked by the caller), y holds `elems`.
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

impl CustomOp2 for GroupedConv2d {
    fn name(&self) -> &'static str {
        "edgeinfer-grouped-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("edgeinfer-grouped-conv2d runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let s = &self.0;
        let (Some((xo, _)), Some((wo, _))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("edgeinfer-grouped-conv2d needs contiguous operands");
        };
        let shape = Shape::from((s.n as usize, s.cout as usize, s.oh as usize, s.ow as usize));
        let elems = shape.elem_count();
        let dev = xs.device();
        let slice = match (&xs.slice, &ws.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w)) => CudaStorageSlice::F32(launch(
                dev,
                "grouped_conv2d_f32",
                s,
                &x.slice(xo..),
                &w.slice(wo..),
                elems,
            )?),
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(w)) => CudaStorageSlice::F16(launch(
                dev,
                "grouped_conv2d_f16",
                s,
                &x.slice(xo..),
                &w.slice(wo..),
                elems,
            )?),
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w)) => {
                CudaStorageSlice::BF16(launch(
                    dev,
                    "grouped_conv2d_bf16",
                    s,
                    &x.slice(xo..),
                    &w.slice(wo..),
                    elems,
                )?)
            }
            _ => candle_core::bail!(
                "edgeinfer-grouped-conv2d: {:?} input with {:?} weights",
                xs.dtype(),
                ws.dtype()
            ),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            shape,
        ))
    }
}

/// A grouped 2-D convolution (`group` > 1, NCHW, ONNX `pads` order: begins then ends) as one
/// CUDA launch, without bias. `None` where it does not apply: `x` not on CUDA, `group` 1
/// (candle's im2col and cuBLAS do that well), or gradients tracked (the custom op has no
/// backward; Grad-CAM's backward pass keeps candle's differentiable path).
pub fn grouped_conv2d(
    x: &Tensor,
    w: &Tensor,
    strides: &[usize],
    pads: &[usize],
    dilations: &[usize],
    group: usize,
) -> Result<Option<Tensor>> {
    if group <= 1 || !x.device().is_cuda() || x.track_op() || w.track_op() {
        return Ok(None);
    }
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, cin_g, kh, kw) = w.dims4()?;
    if cin_g * group != cin || cout % group != 0 {
        candle_core::bail!(
            "grouped Conv: input has {cin} channels, weights {:?}, group {group}",
            w.dims()
        );
    }
    let at = |v: &[usize], i: usize, d: usize| v.get(i).copied().unwrap_or(d);
    let (sh, sw) = (at(strides, 0, 1), at(strides, 1, 1));
    let (dh, dw) = (at(dilations, 0, 1), at(dilations, 1, 1));
    let (pt, pl, pb, pr) = (
        at(pads, 0, 0),
        at(pads, 1, 0),
        at(pads, 2, 0),
        at(pads, 3, 0),
    );
    let out = |len: usize, lo: usize, hi: usize, k: usize, s: usize, d: usize| {
        if k == 0 || s == 0 || d == 0 {
            return None;
        }
        let span = d * (k - 1) + 1;
        let padded = len + lo + hi;
        (padded >= span).then(|| (padded - span) / s + 1)
    };
    let (Some(oh), Some(ow)) = (out(h, pt, pb, kh, sh, dh), out(wd, pl, pr, kw, sw, dw)) else {
        candle_core::bail!(
            "grouped Conv: a {kh}x{kw} kernel (dilations {dh},{dw}, strides {sh},{sw}) does not fit \
             a {h}x{wd} input padded by {pads:?}"
        );
    };
    let i = |v: usize| {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("grouped Conv: {v} too large")))
    };
    let total = n * cout * oh * ow;
    if total > u32::MAX as usize / 2 {
        candle_core::bail!("grouped Conv: {total} outputs are too many for one launch");
    }
    let s = ConvShape {
        n: i(n)?,
        cin: i(cin)?,
        h: i(h)?,
        w: i(wd)?,
        cout: i(cout)?,
        oh: i(oh)?,
        ow: i(ow)?,
        kh: i(kh)?,
        kw: i(kw)?,
        sh: i(sh)?,
        sw: i(sw)?,
        ph: i(pt)?,
        pw: i(pl)?,
        dh: i(dh)?,
        dw: i(dw)?,
        cin_g: i(cin_g)?,
        cout_g: i(cout / group)?,
    };
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op2_no_bwd(&w, &GroupedConv2d(s)).map(Some)
}

/// A 1×1, stride-1, unpadded, ungrouped convolution as one matrix product per image: the
/// weights (cout × cin) times the image (cin × h·w) is already NCHW. `None` where it does not
/// apply or `x` is not on CUDA (the CPU has its own kernels). Plain candle ops, so it stays
/// differentiable.
pub fn pointwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    strides: &[usize],
    pads: &[usize],
    group: usize,
) -> Result<Option<Tensor>> {
    if group != 1
        || !x.device().is_cuda()
        || w.rank() != 4
        || w.dims()[2..] != [1, 1]
        || strides.iter().any(|&s| s != 1)
        || pads.iter().any(|&p| p != 0)
    {
        return Ok(None);
    }
    let (n, cin, h, wd) = x.dims4()?;
    let cout = w.dims()[0];
    if w.dims()[1] != cin {
        candle_core::bail!("Conv: input has {cin} channels, weights {:?}", w.dims());
    }
    let w2 = w.reshape((cout, cin))?;
    let y = if n == 1 {
        w2.matmul(&x.reshape((cin, h * wd))?)?
    } else {
        w2.broadcast_left(n)?
            .contiguous()?
            .matmul(&x.reshape((n, cin, h * wd))?)?
    };
    y.reshape((n, cout, h, wd)).map(Some)
}

struct BiasAct {
    lo: f32,
    hi: f32,
}

/// Checks the epilogue's operands and returns (elements, channels, plane size, offsets).
fn bias_act_geometry(
    yl: &Layout,
    bl: &Layout,
    rl: Option<&Layout>,
) -> Result<(usize, usize, usize, [usize; 3])> {
    let dims = yl.dims();
    if dims.len() < 2 {
        candle_core::bail!("bias epilogue: output of rank {}", dims.len());
    }
    let c = dims[1];
    let total = yl.shape().elem_count();
    let hw = dims[2..].iter().product::<usize>();
    let (Some((yo, _)), Some((bo, _))) = (yl.contiguous_offsets(), bl.contiguous_offsets()) else {
        candle_core::bail!("bias epilogue needs contiguous operands");
    };
    if bl.shape().elem_count() != c {
        candle_core::bail!(
            "bias epilogue: {} biases for {c} channels",
            bl.shape().elem_count()
        );
    }
    let ro = match rl {
        None => 0,
        Some(rl) => match rl.contiguous_offsets() {
            Some((ro, _)) if rl.dims() == dims => ro,
            _ => candle_core::bail!(
                "bias epilogue: residual {:?} for output {dims:?}",
                rl.dims()
            ),
        },
    };
    if total > u32::MAX as usize / 2 {
        candle_core::bail!("bias epilogue: {total} elements are too many for one launch");
    }
    Ok((total, c, hw.max(1), [yo, bo, ro]))
}

#[allow(clippy::too_many_arguments)]
fn launch_bias_act<T: DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    (total, c, hw): (usize, usize, usize),
    y: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    r: Option<&CudaView<'_, T>>,
    lo: f32,
    hi: f32,
) -> Result<CudaSlice<T>> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    // SAFETY: the kernel writes every one of the `total` elements.
    let out = unsafe { dev.alloc::<T>(total)? };
    let (total_i, c_i, hw_i) = (total as i64, c as i32, hw as i64);
    let mut bld = func.builder();
    bld.arg(&total_i);
    bld.arg(&c_i);
    bld.arg(&hw_i);
    bld.arg(y);
    bld.arg(b);
    if let Some(r) = r {
        bld.arg(r);
    }
    bld.arg(&out);
    bld.arg(&lo);
    bld.arg(&hi);
    // SAFETY: the arguments match `bias_act_*` / `bias_res_act_*` in grouped_conv.cu; y and r
    // hold `total` elements and b `c` (checked by bias_act_geometry).
    unsafe { bld.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
    Ok(out)
}

impl BiasAct {
    fn run(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        r: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (total, c, hw, [yo, bo, ro]) = bias_act_geometry(yl, bl, r.map(|(_, l)| l))?;
        let dev = ys.device();
        let g = (total, c, hw);
        let name = |t: &str| match r {
            None => format!("bias_act_{t}"),
            Some(_) => format!("bias_res_act_{t}"),
        };
        macro_rules! go {
            ($variant:ident, $t:literal) => {{
                let (CudaStorageSlice::$variant(y), CudaStorageSlice::$variant(b)) =
                    (&ys.slice, &bs.slice)
                else {
                    candle_core::bail!(
                        "bias epilogue: {:?} output with {:?} bias",
                        ys.dtype(),
                        bs.dtype()
                    );
                };
                let rv = match r {
                    None => None,
                    Some((rs, _)) => match &rs.slice {
                        CudaStorageSlice::$variant(r) => Some(r.slice(ro..)),
                        _ => candle_core::bail!("bias epilogue: {:?} residual", rs.dtype()),
                    },
                };
                CudaStorageSlice::$variant(launch_bias_act(
                    dev,
                    &name($t),
                    g,
                    &y.slice(yo..),
                    &b.slice(bo..),
                    rv.as_ref(),
                    self.lo,
                    self.hi,
                )?)
            }};
        }
        let slice = match &ys.slice {
            CudaStorageSlice::F32(_) => go!(F32, "f32"),
            CudaStorageSlice::F16(_) => go!(F16, "f16"),
            CudaStorageSlice::BF16(_) => go!(BF16, "bf16"),
            _ => candle_core::bail!("bias epilogue: {:?} output", ys.dtype()),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            yl.shape().clone(),
        ))
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "edgeinfer-bias-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("edgeinfer-bias-act runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(ys, yl, bs, bl, None)
    }
}

impl CustomOp3 for BiasAct {
    fn name(&self) -> &'static str {
        "edgeinfer-bias-residual-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("edgeinfer-bias-residual-act runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run(ys, yl, bs, bl, Some((rs, rl)))
    }
}

/// A convolution's epilogue, `clamp(y + bias[c] (+ residual), lo, hi)`, as one launch: `lo`
/// and `hi` are the activation's bounds (ReLU: 0 and +inf; none: ±inf). `None` where it does
/// not apply: `y` not on CUDA, or gradients tracked (no backward).
pub fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    lo: f32,
    hi: f32,
) -> Result<Option<Tensor>> {
    if !y.device().is_cuda()
        || y.track_op()
        || bias.track_op()
        || residual.is_some_and(|r| r.track_op())
    {
        return Ok(None);
    }
    let y = y.contiguous()?;
    let b = bias.to_dtype(y.dtype())?.contiguous()?;
    let op = BiasAct { lo, hi };
    match residual {
        None => y.apply_op2_no_bwd(&b, &op).map(Some),
        Some(r) => {
            let r = r.to_dtype(y.dtype())?.contiguous()?;
            y.apply_op3_no_bwd(&b, &r, &op).map(Some)
        }
    }
}
