//! Weight conversion of a model file: f16 / bf16 storage, and int8 weight-only quantisation
//! (symmetric, one scale per output channel, stored as `<name>.scale` shaped to broadcast
//! against the weight, so the loader needs no knowledge of which axis is the output).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::graph::{derived_provenance, Graph, Op, META_PROVENANCE};
use crate::model::{DType, ModelFile, ModelWriter, TensorView};

/// What to convert the weights to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// f32 storage (undoes f16 / bf16 storage; int8 tensors stay int8).
    F32,
    /// IEEE half precision storage (compute stays f32 on the CPU).
    F16,
    /// bfloat16 storage.
    BF16,
    /// int8 weights of convolutions and linear layers, per-output-channel scales (f16 when
    /// they all fit it, else f32); other float tensors (biases, norms) keep their dtype.
    Int8,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Target::F32),
            "f16" => Ok(Target::F16),
            "bf16" => Ok(Target::BF16),
            "int8" => Ok(Target::Int8),
            _ => Err(format!(
                "unknown quantisation target '{s}' (f16, bf16, int8)"
            )),
        }
    }
}

impl Target {
    /// Its name in provenance and variant names.
    pub fn name(self) -> &'static str {
        match self {
            Target::F32 => "f32",
            Target::F16 => "f16",
            Target::BF16 => "bf16",
            Target::Int8 => "int8",
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Tensors converted to the target dtype.
    pub converted: usize,
    /// Tensors left as they were.
    pub kept: usize,
    /// Bytes of tensor data before.
    pub bytes_before: usize,
    /// Bytes of tensor data after (scales included).
    pub bytes_after: usize,
}

/// The axis of each weight that holds output channels, for the weights int8 applies to.
fn output_axes(graph: &Graph) -> HashMap<&str, usize> {
    let mut axes = HashMap::new();
    for n in &graph.nodes {
        let (Some(w), axis) = (
            n.inputs.get(1),
            match &n.op {
                Op::Conv { .. } => 0,
                Op::ConvTranspose { .. } => 1,
                Op::Gemm { trans_b: true, .. } => 0,
                Op::Gemm { trans_b: false, .. } => 1,
                // [K, N] (or batched [.., K, N]): the last axis.
                Op::MatMul { .. } => usize::MAX,
                _ => continue,
            },
        ) else {
            continue;
        };
        axes.insert(w.as_str(), axis);
    }
    axes
}

/// Converts `file`'s weights to `to`. The graph, labels and other metadata are copied; the
/// provenance records the conversion, the parent's hash, and a variant name.
pub fn quantize(file: &ModelFile, to: Target) -> Result<(ModelWriter, Report)> {
    let graph = Graph::from_model_file(file)?;
    let axes = output_axes(&graph);
    let mut w = ModelWriter::new();
    let mut report = Report::default();
    for (k, v) in file.metadata() {
        w.set_metadata(k.clone(), v.clone());
    }
    let infos: Vec<_> = file.tensors().cloned().collect();
    for info in &infos {
        let view = file.get(&info.name).ok_or_else(|| Error::InvalidGraph {
            file: file.label().to_string(),
            reason: format!("tensor '{}' vanished", info.name),
        })?;
        report.bytes_before += view.data.len();
        let float = matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16);
        let added = match to {
            Target::F32 | Target::F16 | Target::BF16 if float => {
                let vals = view.to_f32_vec()?;
                let (dtype, bytes) = match to {
                    Target::F16 => DType::F16,
                    Target::BF16 => DType::BF16,
                    _ => DType::F32,
                }
                .encode_floats(&vals);
                w.add_tensor(info.name.clone(), dtype, info.shape.clone(), bytes)?;
                true
            }
            Target::Int8 if float && info.shape.len() >= 2 => match axes.get(info.name.as_str()) {
                Some(&axis) => {
                    let axis = if axis == usize::MAX {
                        info.shape.len() - 1
                    } else {
                        axis
                    };
                    add_int8(&mut w, &view, axis)?;
                    true
                }
                None => false,
            },
            _ => false,
        };
        if added {
            report.converted += 1;
        } else {
            w.add_tensor(
                info.name.clone(),
                info.dtype,
                info.shape.clone(),
                view.data.to_vec(),
            )?;
            report.kept += 1;
        }
    }
    report.bytes_after = w.data_bytes();
    let record = serde_json::json!({
        "to": to.name(),
        "scheme": match to {
            Target::Int8 => "weight-only, symmetric, per output channel (<name>.scale)",
            _ => "storage dtype of every float tensor",
        },
    });
    w.set_metadata(
        META_PROVENANCE,
        derived_provenance(file, to.name(), "quantization", record),
    );
    Ok((w, report))
}

/// Writes `view` as int8 with one scale per index of `axis` (max |w| / 127), and the scale as
/// `<name>.scale`, shaped like the weight with every other axis 1.
fn add_int8(w: &mut ModelWriter, view: &TensorView<'_>, axis: usize) -> Result<()> {
    let shape = &view.info.shape;
    let vals = view.to_f32_vec()?;
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut max = vec![0f32; channels];
    for (i, &x) in vals.iter().enumerate() {
        let c = (i / inner.max(1)) % channels.max(1);
        max[c] = max[c].max(x.abs());
    }
    // An all-zero channel (pruned) keeps scale 1 so dequantising never divides by zero.
    let mut scale: Vec<f32> = max
        .iter()
        .map(|&m| {
            if m > 0.0 && m.is_finite() {
                m / 127.0
            } else {
                1.0
            }
        })
        .collect();
    // Scales are stored as f16 when every one is a normal f16: its rounding (≤ 2⁻¹¹ relative)
    // is far below int8's step (up to 1/254 of the channel's largest weight), and the values
    // are quantized against the rounded scale, so the file dequantizes to exactly what was
    // measured. It halves the scales' share, which on a small pruned model (MobileNetV2 at
    // 63 %: 30 KB of 616 KB) is what keeps int8 near a quarter of f32.
    let f16_ok = scale
        .iter()
        .all(|&s| (f32::from(half::f16::MIN_POSITIVE)..=f32::from(half::f16::MAX)).contains(&s));
    if f16_ok {
        scale
            .iter_mut()
            .for_each(|s| *s = half::f16::from_f32(*s).to_f32());
    }
    let q: Vec<u8> = vals
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = (i / inner.max(1)) % channels.max(1);
            ((x / scale[c]).round().clamp(-127.0, 127.0) as i8) as u8
        })
        .collect();
    w.add_tensor(view.info.name.clone(), DType::I8, shape.clone(), q)?;
    let mut scale_shape = vec![1; shape.len()];
    scale_shape[axis] = channels;
    let (dtype, bytes) = if f16_ok { DType::F16 } else { DType::F32 }.encode_floats(&scale);
    w.add_tensor(
        format!("{}.scale", view.info.name),
        dtype,
        scale_shape,
        bytes,
    )?;
    Ok(())
}

/// The f32 weight of an int8 tensor with a `<name>.scale` beside it; `None` when `view` is not
/// one. A scale that does not broadcast against the weight is an error naming both.
pub fn dequantize(file: &ModelFile, view: &TensorView<'_>) -> Result<Option<Vec<f32>>> {
    if view.info.dtype != DType::I8 {
        return Ok(None);
    }
    let name = &view.info.name;
    let Some(sv) = file.get(&format!("{name}.scale")) else {
        return Ok(None);
    };
    let bad = |reason: String| Error::InvalidGraph {
        file: file.label().to_string(),
        reason,
    };
    let shape = &view.info.shape;
    let sshape = &sv.info.shape;
    // One non-1 axis (or none), equal to the weight's.
    let axes: Vec<usize> = (0..sshape.len()).filter(|&a| sshape[a] != 1).collect();
    let ok = sshape.len() == shape.len()
        && axes.len() <= 1
        && axes.iter().all(|&a| sshape[a] == shape[a])
        && matches!(sv.info.dtype, DType::F32 | DType::F16 | DType::BF16);
    if !ok {
        return Err(bad(format!(
            "scale '{name}.scale' ({} {:?}) does not give one scale per channel of '{name}' {:?}",
            sv.info.dtype, sshape, shape
        )));
    }
    let scale = sv.to_f32_vec()?;
    let q = view.to_f32_vec()?;
    let (channels, inner) = match axes.first() {
        Some(&a) => (shape[a], shape[a + 1..].iter().product::<usize>()),
        None => (1, 1),
    };
    Ok(Some(
        q.iter()
            .enumerate()
            .map(|(i, &v)| v * scale[(i / inner.max(1)) % channels.max(1)])
            .collect(),
    ))
}
