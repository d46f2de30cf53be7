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
use crate::graph::{derived_provenance, Graph, Node, Op, META_LABELS, META_PROVENANCE};
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
    /// Shuffling (and augmentation) seed.
    pub seed: u64,
    /// How the learning rate moves over the run.
    pub schedule: Schedule,
    /// Mirror each training image left-right with probability 1/2 (only for data whose
    /// classes survive a mirror: garments, surfaces; not digits or text).
    pub hflip: bool,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            epochs: 3,
            lr: 1e-3,
            batch: 16,
            seed: 0,
            schedule: Schedule::Cosine,
            hflip: false,
        }
    }
}

/// Learning-rate schedule over all optimizer steps of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Half a cosine from the full rate down to zero at the last step, the usual schedule for
    /// recovering a pruned network: large steps first, then settling.
    #[default]
    Cosine,
}

impl Schedule {
    /// The rate at `step` of `total` steps (0-based) for a peak rate `lr`.
    pub fn rate(self, lr: f64, step: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => lr,
            Schedule::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!("'{other}': expected constant or cosine")),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
        })
    }
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

/// The graph with every static Reshape that starts at batch 1 reshaped for `batch` images
/// (shapes are resolved at import for one frame). Whether that is right is checked against
/// one-image passes before it is used.
fn with_batch(nodes: &[Node], batch: usize) -> Vec<Node> {
    nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            if let Op::Reshape { shape } = &mut n.op {
                if shape.first() == Some(&1) {
                    shape[0] = batch;
                }
            }
            n
        })
        .collect()
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
    let forward = |nodes: &[Node], x: &Tensor| -> Result<Tensor> {
        run_nodes(
            nodes,
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
    let nhwc = input
        .preprocess
        .as_ref()
        .is_some_and(|p| p.layout == "NHWC");
    let width_axis = if nhwc { 2 } else { 3 };
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    let mut seed = opts
        .seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1);
    // A small LCG: reproducible without a rand dependency.
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let mut stats = Vec::new();
    let batch = opts.batch.max(1);
    let steps_per_epoch = order.len().div_ceil(batch);
    let total_steps = steps_per_epoch * opts.epochs;
    // One forward pass over the whole batch saves the per-pass graph walk and small-op
    // overhead (about 15 % of the CPU time on the Fashion-MNIST ResNet), but an exported graph
    // pins the batch to 1 in its static Reshapes; they are rewritten per batch size, and the
    // first step checks the result and falls back to per-image passes for the run.
    let mut batched = true;
    let mut by_batch: HashMap<usize, Vec<Node>> = HashMap::new();
    for epoch in 0..opts.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, next() as usize % (i + 1));
        }
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for (step, chunk) in order.chunks(batch).enumerate() {
            opt.set_learning_rate(opts.schedule.rate(
                opts.lr,
                epoch * steps_per_epoch + step,
                total_steps,
            ));
            let mut xs = Vec::with_capacity(chunk.len());
            let mut ys = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let (x, y) = &inputs[i];
                let x = if opts.hflip && next() & 1 == 1 {
                    let w = x.dim(width_axis)?;
                    let idx: Vec<u32> = (0..w as u32).rev().collect();
                    x.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, width_axis)?
                } else {
                    x.clone()
                };
                xs.push(x);
                ys.push(*y);
            }
            let target = Tensor::new(ys.as_slice(), &Device::Cpu)?;
            let mut logits = None;
            if batched {
                let nodes = by_batch
                    .entry(chunk.len())
                    .or_insert_with(|| with_batch(&graph.nodes, chunk.len()));
                let x = Tensor::cat(&xs, 0)?;
                let got = forward(nodes, &x).and_then(|l| Ok(l.flatten_from(1)?));
                if epoch == 0 && step == 0 {
                    // Trust the batched graph only if it agrees with one-image passes.
                    let check = |l: &Tensor| -> Result<bool> {
                        if l.dim(0)? != chunk.len() {
                            return Ok(false);
                        }
                        for (i, x) in xs.iter().enumerate().take(2) {
                            let one = forward(&graph.nodes, x)?.flatten_all()?;
                            let diff = (l.get(i)? - &one)?.abs()?.max(0)?.to_scalar::<f32>()?;
                            let scale = one.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                            if diff > 1e-3 * scale {
                                return Ok(false);
                            }
                        }
                        Ok(true)
                    };
                    match got.as_ref().map_err(|e| e.to_string()).map(check) {
                        Ok(Ok(true)) => {}
                        other => {
                            tracing::info!(
                                "fine-tuning one image per forward pass: a batch of {} did not \
                                 match ({:?})",
                                chunk.len(),
                                other.map(|r| r.map_err(|e| e.to_string()))
                            );
                            batched = false;
                        }
                    }
                }
                if batched {
                    let l = got?;
                    if l.dim(0)? != chunk.len() {
                        return Err(bad(
                            file,
                            format!("a batch of {} gave {:?} logits", chunk.len(), l.dims()),
                        ));
                    }
                    logits = Some(l);
                }
            }
            let logits = match logits {
                Some(l) => l,
                None => {
                    let rows = xs
                        .iter()
                        .map(|x| Ok(forward(&graph.nodes, x)?.flatten_all()?.unsqueeze(0)?))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&rows, 0)?
                }
            };
            let mean = candle_nn::loss::cross_entropy(&logits, &target)?;
            let top = logits.argmax(1)?.to_vec1::<u32>()?;
            correct += top.iter().zip(&ys).filter(|(a, b)| a == b).count();
            loss_sum += mean.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            opt.backward_step(&mean)?;
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
        "schedule": opts.schedule.to_string(),
        "hflip": opts.hflip,
        "batched_forward": batched,
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
                let (dtype, bytes) = info.dtype.encode_floats(&vals);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_decays_from_the_peak_to_zero_and_constant_stays() {
        let c = Schedule::Cosine;
        assert_eq!(c.rate(1e-3, 0, 100), 1e-3);
        assert!((c.rate(1e-3, 50, 100) - 5e-4).abs() < 1e-12);
        assert!(c.rate(1e-3, 99, 100) < 1e-6);
        let mut last = f64::INFINITY;
        for s in 0..100 {
            let r = c.rate(1e-3, s, 100);
            assert!(r <= last);
            last = r;
        }
        assert_eq!(Schedule::Constant.rate(1e-3, 99, 100), 1e-3);
        assert_eq!("Cosine".parse::<Schedule>(), Ok(Schedule::Cosine));
        assert!("linear".parse::<Schedule>().is_err());
    }

    #[test]
    fn batch_rewrite_touches_only_reshapes_that_start_at_one() {
        let node = |op| Node {
            name: String::new(),
            op,
            inputs: vec![],
            outputs: vec![],
        };
        let nodes = vec![
            node(Op::Reshape { shape: vec![1, 88] }),
            node(Op::Reshape { shape: vec![4, 22] }),
        ];
        let out = with_batch(&nodes, 16);
        assert!(matches!(&out[0].op, Op::Reshape { shape } if shape == &[16, 88]));
        assert!(matches!(&out[1].op, Op::Reshape { shape } if shape == &[4, 22]));
    }
}
