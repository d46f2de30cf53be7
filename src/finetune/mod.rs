//! Recovering accuracy after pruning: fine-tuning a model file's weights on an image folder
//! (one sub-folder per class label) with candle's autograd on the CPU, writing the same file
//! format. BatchNorm running statistics stay frozen (inference mode); their scale and shift
//! train with the convolution and linear weights.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::error::{Error, Result};
use crate::exec::{load_weights, run_nodes};
use crate::graph::{derived_provenance, Graph, Op, META_LABELS, META_PROVENANCE};
use crate::model::{DType, ModelFile, ModelWriter};
use crate::pipeline::preprocess::image_to_tensor;

/// Fine-tuning settings.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// Passes over the data.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Samples per optimizer step.
    pub batch: usize,
    /// Shuffling seed.
    pub seed: u64,
}

/// One epoch's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochStats {
    /// Mean cross-entropy over the epoch.
    pub loss: f64,
    /// Training top-1 accuracy during the epoch.
    pub accuracy: f64,
}

fn bad(file: &ModelFile, reason: String) -> Error {
    Error::InvalidGraph {
        file: file.label().to_string(),
        reason,
    }
}

/// `(image path, class)` for every image (png, jpg, bmp) under `dir/<label>/`, in name order.
pub fn labelled_images(dir: &Path, labels: &[String]) -> Result<Vec<(PathBuf, usize)>> {
    let io = |e: std::io::Error| Error::Io {
        path: dir.display().to_string(),
        cause: e,
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for c in classes {
        let name = c
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let class = labels
            .iter()
            .position(|l| *l == name)
            .ok_or_else(|| Error::BadInput {
                name: c.display().to_string(),
                reason: format!("class folder '{name}' is not one of the model's labels"),
            })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&c)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().is_some_and(|x| {
                        matches!(
                            x.to_ascii_lowercase().to_str(),
                            Some("png" | "jpg" | "jpeg" | "bmp")
                        )
                    })
            })
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (f, class)));
    }
    Ok(out)
}

/// The tensors that train: weights and biases of Conv, Gemm, MatMul, and the scale / shift of
/// BatchNorm and LayerNorm. Shapes, indices and scalar constants stay fixed.
fn trainable(graph: &Graph, file: &ModelFile) -> HashSet<String> {
    let mut out = HashSet::new();
    for n in &graph.nodes {
        let picks: &[usize] = match n.op {
            Op::Conv { .. } | Op::Gemm { .. } | Op::ConvTranspose { .. } => &[1, 2],
            Op::MatMul { .. } => &[1],
            Op::BatchNormalization { .. } | Op::LayerNormalization { .. } => &[1, 2],
            _ => &[],
        };
        for &i in picks {
            if let Some(t) = n.inputs.get(i).filter(|t| file.contains(t)) {
                let float = file
                    .get(t)
                    .is_some_and(|v| matches!(v.info.dtype, DType::F32 | DType::F16 | DType::BF16));
                if float {
                    out.insert(t.clone());
                }
            }
        }
    }
    out
}

/// Fine-tunes `file` on `data`; `progress(epoch, done, total, running loss)` is called after
/// every optimizer step. Returns the new file and per-epoch numbers.
pub fn finetune(
    file: &ModelFile,
    data: &Path,
    opts: &FinetuneOptions,
    mut progress: impl FnMut(usize, usize, usize, f64),
) -> Result<(ModelWriter, Vec<EpochStats>)> {
    let graph = Graph::from_model_file(file)?;
    let labels: Vec<String> = file
        .metadata()
        .get(META_LABELS)
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            bad(
                file,
                "fine-tuning needs class labels in the model file".into(),
            )
        })?;
    let input = match graph.inputs.as_slice() {
        [i] => i.clone(),
        _ => return Err(bad(file, "fine-tuning needs a single image input".into())),
    };
    let output = graph
        .outputs
        .first()
        .map(|o| o.name.clone())
        .ok_or_else(|| bad(file, "the model has no outputs".into()))?;
    let samples = labelled_images(data, &labels)?;
    if samples.is_empty() {
        return Err(Error::BadInput {
            name: data.display().to_string(),
            reason: "no training images".into(),
        });
    }
    let mut inputs = Vec::with_capacity(samples.len());
    for (path, class) in &samples {
        let img = image::open(path).map_err(|e| Error::BadInput {
            name: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let t = image_to_tensor(&img, &input, &Device::Cpu).map_err(|reason| Error::BadInput {
            name: path.display().to_string(),
            reason,
        })?;
        inputs.push((t, *class as u32));
    }
    let names = graph.tensor_names();
    let mut weights = load_weights(file, &names, &Device::Cpu)?;
    let train = trainable(&graph, file);
    let mut vars: HashMap<String, Var> = HashMap::new();
    for name in &train {
        if let Some(t) = weights.remove(name) {
            vars.insert(name.clone(), Var::from_tensor(&t.to_dtype(CDType::F32)?)?);
        }
    }
    let mut opt = AdamW::new(
        vars.values().cloned().collect(),
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let forward = |x: &Tensor| -> Result<Tensor> {
        run_nodes(
            &graph.nodes,
            (input.name.as_str(), x.clone()),
            |i| {
                vars.get(i)
                    .map(|v| v.as_tensor().clone())
                    .or_else(|| weights.get(i).cloned())
            },
            &output,
            |reason| bad(file, reason),
        )
    };
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    let mut seed = opts
        .seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1);
    let mut stats = Vec::new();
    let batch = opts.batch.max(1);
    for epoch in 0..opts.epochs {
        // Fisher-Yates with a small LCG: reproducible without a rand dependency.
        for i in (1..order.len()).rev() {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            order.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for (step, chunk) in order.chunks(batch).enumerate() {
            let mut total: Option<Tensor> = None;
            for &i in chunk {
                let (x, y) = &inputs[i];
                let logits = forward(x)?.flatten_all()?.unsqueeze(0)?;
                let target = Tensor::new(&[*y], &Device::Cpu)?;
                let l = candle_nn::loss::cross_entropy(&logits, &target)?;
                let top = crate::runtime::argmax(&logits)?;
                correct += usize::from(top == *y as usize);
                total = Some(match total {
                    Some(t) => (t + l)?,
                    None => l,
                });
            }
            if let Some(t) = total {
                let mean = (t / chunk.len() as f64)?;
                loss_sum += mean.to_scalar::<f32>()? as f64 * chunk.len() as f64;
                opt.backward_step(&mean)?;
            }
            progress(
                epoch,
                ((step + 1) * batch).min(order.len()),
                order.len(),
                loss_sum / ((step + 1) * batch).min(order.len()) as f64,
            );
        }
        stats.push(EpochStats {
            loss: loss_sum / order.len() as f64,
            accuracy: correct as f64 / order.len() as f64,
        });
    }
    let mut w = ModelWriter::new();
    for (k, v) in file.metadata() {
        w.set_metadata(k.clone(), v.clone());
    }
    let record = serde_json::json!({
        "data": data.display().to_string(),
        "images": samples.len(),
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch": batch,
        "optimizer": "AdamW, weight decay 1e-4",
        "epoch_stats": stats,
    });
    w.set_metadata(
        META_PROVENANCE,
        derived_provenance(file, "ft", "finetune", record),
    );
    let infos: Vec<_> = file.tensors().cloned().collect();
    for info in infos {
        match vars.get(&info.name) {
            Some(v) => {
                let vals = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let (dtype, bytes): (DType, Vec<u8>) = match info.dtype {
                    DType::F16 => (
                        DType::F16,
                        vals.iter()
                            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                            .collect(),
                    ),
                    DType::BF16 => (
                        DType::BF16,
                        vals.iter()
                            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                            .collect(),
                    ),
                    _ => (
                        DType::F32,
                        vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ),
                };
                w.add_tensor(info.name.clone(), dtype, info.shape.clone(), bytes)?;
            }
            None => {
                let view = file
                    .get(&info.name)
                    .ok_or_else(|| bad(file, format!("tensor '{}' vanished", info.name)))?;
                w.add_tensor(
                    info.name.clone(),
                    info.dtype,
                    info.shape.clone(),
                    view.data.to_vec(),
                )?;
            }
        }
    }
    Ok((w, stats))
}
