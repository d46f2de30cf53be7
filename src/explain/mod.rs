//! The attention-mask explainability layer: CAM, Eigen-CAM, Grad-CAM and ViT attention
//! rollout as a timed stage of every frame, with heat-map rendering, masks and localisation
//! scores.
//!
//! At load, [`Explainer::new`] reads the stored graph ([`plan`]) to find what the model offers
//! (a GAP → linear head for CAM, the last spatial feature map, attention softmaxes) and names
//! the values the executor must keep ([`Explainer::taps`]). Per frame, [`Explainer::explain`]
//! turns those taps into an [`Explanation`], falling back to a cheaper method, or skipping,
//! when its rolling cost does not fit the time left in the frame's budget.

pub mod gradcam;
pub mod mask;
pub mod methods;
pub mod plan;
pub mod render;
pub mod score;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::budget::Rolling;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::model::ModelFile;
use gradcam::GradientTail;
use mask::{BBox, Mask, Threshold};
use methods::{Features, HeadFusion};
use plan::GraphTargets;

/// A single-channel map, row-major, `width × height` values.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatMap {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height × width` values, row-major.
    pub data: Vec<f32>,
}

/// An explanation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Class activation map from a GAP → linear head (exact, nearly free).
    Cam,
    /// First principal component of a feature map (gradient-free, any model).
    #[serde(rename = "eigencam")]
    EigenCam,
    /// Gradient-weighted CAM (a backward pass over the layers after the target).
    #[serde(rename = "gradcam")]
    GradCam,
    /// ViT attention rollout.
    Rollout,
}

impl Method {
    /// The CLI / report name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Cam => "cam",
            Method::EigenCam => "eigencam",
            Method::GradCam => "gradcam",
            Method::Rollout => "rollout",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `--explain` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// No explanation.
    #[default]
    Off,
    /// The cheapest faithful method the model allows: CAM when the head allows, rollout for
    /// ViTs, Eigen-CAM otherwise.
    Auto,
    /// This method (with cheaper fallbacks when the budget is short).
    Use(Method),
}

impl FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "off" => Choice::Off,
            "auto" => Choice::Auto,
            "cam" => Choice::Use(Method::Cam),
            "eigencam" => Choice::Use(Method::EigenCam),
            "gradcam" => Choice::Use(Method::GradCam),
            "rollout" => Choice::Use(Method::Rollout),
            _ => {
                return Err(format!(
                    "unknown explain method '{s}' (cam, eigencam, gradcam, rollout, auto, off)"
                ))
            }
        })
    }
}

/// Explain settings.
#[derive(Debug, Clone)]
pub struct ExplainOptions {
    /// The method.
    pub choice: Choice,
    /// Class to explain (default: the frame's top-1).
    pub target_class: Option<usize>,
    /// Value to tap for Eigen-CAM / Grad-CAM (default: the last spatial feature map).
    pub target_layer: Option<String>,
    /// How the heat map becomes a binary mask.
    pub threshold: Threshold,
    /// Rollout head fusion.
    pub head_fusion: HeadFusion,
    /// Rollout: fraction of the weakest attention links dropped per layer.
    pub discard_ratio: f32,
    /// Fall back / skip when the method's rolling cost exceeds the time left (default on).
    pub budget_aware: bool,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        ExplainOptions {
            choice: Choice::Off,
            target_class: None,
            target_layer: None,
            threshold: Threshold::default(),
            head_fusion: HeadFusion::Mean,
            discard_ratio: 0.0,
            budget_aware: true,
        }
    }
}

/// One frame's explanation.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The method that ran.
    pub method: Method,
    /// The class explained.
    pub target_class: usize,
    /// The tapped value(s) (for rollout, the first and last softmax).
    pub target_layer: String,
    /// The map at the tapped resolution, before ReLU and normalisation.
    pub raw: HeatMap,
    /// The map at the model input's resolution, 0..1.
    pub map: HeatMap,
    /// The threshold applied to `map`.
    pub threshold: f32,
    /// `map ≥ threshold`.
    pub mask: Mask,
    /// The largest hot region, in model-input pixels.
    pub bbox: Option<BBox>,
    /// Milliseconds the method took.
    pub ms: f64,
}

/// A tensor's elements on the host: borrowed from a contiguous CPU f32 tensor (taps of a
/// ViT's attention are megabytes a frame), copied otherwise.
enum HostF32<G> {
    Borrowed(G, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> HostF32<G> {
    fn as_slice(&self) -> &[f32] {
        match self {
            HostF32::Borrowed(storage, range) => match &**storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[range.clone()],
                // `host_f32` only borrows CPU f32 storage.
                _ => &[],
            },
            HostF32::Owned(v) => v,
        }
    }
}

/// See [`HostF32`].
fn host_f32(
    t: &Tensor,
) -> Result<HostF32<impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(HostF32::Borrowed(storage, a..b));
        }
    }
    Ok(HostF32::Owned(
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    ))
}

/// Costs kept per method: the 90th percentile of the last 32 judges the method by its spikes,
/// so a fallback happens before the frame is late, not after.
const COST_WINDOW: usize = 32;
const COST_QUANTILE: f64 = 0.9;

/// Explains frames of one model.
pub struct Explainer {
    options: ExplainOptions,
    targets: GraphTargets,
    /// The requested method first, then cheaper fallbacks.
    ladder: Vec<Method>,
    /// Eigen-CAM / Grad-CAM target layer and its `[C, h, w]`.
    layer: Option<(String, (usize, usize, usize))>,
    gradcam: Option<GradientTail>,
    /// Model input (width, height).
    input_size: (usize, usize),
    costs: Mutex<HashMap<Method, Rolling>>,
}

impl Explainer {
    /// Plans explanations for `graph` (as stored in `file`). Errors when the method cannot
    /// work on this model (no CAM head, no attention, an unknown target layer), naming why.
    pub fn new(graph: &Graph, file: &ModelFile, options: ExplainOptions) -> Result<Self> {
        let targets = GraphTargets::find(graph, file);
        let no = |method: &str, reason: String| Error::Explain {
            method: method.into(),
            reason,
        };
        let input_size = match graph.inputs.first().map(|i| i.shape.as_slice()) {
            Some(&[_, _, h, w]) => (w, h),
            other => {
                return Err(no(
                    "any",
                    format!("explanations need a 4-D image input, the model has {other:?}"),
                ))
            }
        };
        let layer_name = options.target_layer.clone().or(targets.feature.clone());
        let layer = match &layer_name {
            Some(name) => match plan::spatial_dims(graph, name) {
                Some(d) => Some((name.clone(), d)),
                None if options.target_layer.is_some() => {
                    let shape = graph.values.get(name).map(|v| v.shape.clone());
                    return Err(no(
                        "any",
                        match shape {
                            Some(s) => format!(
                                "target layer '{name}' has shape {s:?}; it must be a [1, C, h, w] feature map"
                            ),
                            None => format!("target layer '{name}' is not a value of the graph"),
                        },
                    ));
                }
                None => None,
            },
            None => None,
        };
        let primary = match options.choice {
            Choice::Off => {
                return Err(no("off", "explanations are off".into()));
            }
            Choice::Use(m) => m,
            Choice::Auto if targets.cam.is_some() => Method::Cam,
            Choice::Auto if targets.attention.is_some() => Method::Rollout,
            Choice::Auto => Method::EigenCam,
        };
        let has_cam = targets.cam.is_some();
        let ladder: Vec<Method> = match primary {
            Method::Cam => vec![Method::Cam],
            Method::Rollout => vec![Method::Rollout],
            Method::EigenCam if has_cam => vec![Method::EigenCam, Method::Cam],
            Method::EigenCam => vec![Method::EigenCam],
            Method::GradCam if has_cam => vec![Method::GradCam, Method::Cam],
            Method::GradCam => vec![Method::GradCam, Method::EigenCam],
        };
        match primary {
            Method::Cam if !has_cam => {
                return Err(no(
                    "cam",
                    "the model's head is not GlobalAveragePool → Linear (try eigencam or gradcam)"
                        .into(),
                ))
            }
            Method::Rollout if targets.attention.is_none() => {
                return Err(no(
                    "rollout",
                    "no attention softmaxes shaped [1, heads, T, T] with a class token and a \
                     square patch grid were found"
                        .into(),
                ))
            }
            Method::EigenCam | Method::GradCam if layer.is_none() => {
                return Err(no(
                    primary.name(),
                    "the model has no [1, C, h, w] feature map to explain from".into(),
                ))
            }
            _ => {}
        }
        let classes = graph
            .outputs
            .first()
            .and_then(|o| graph.values.get(&o.name))
            .map(|v| v.shape.iter().product::<usize>());
        if let (Some(k), Some(n)) = (options.target_class, classes) {
            if k >= n {
                return Err(no(
                    primary.name(),
                    format!("--target-class {k} is out of range: the model has {n} classes"),
                ));
            }
        }
        let gradcam = match (ladder.contains(&Method::GradCam), &layer) {
            (true, Some((name, _))) => Some(GradientTail::new(graph, file, name)?),
            _ => None,
        };
        Ok(Explainer {
            options,
            targets,
            ladder,
            layer,
            gradcam,
            input_size,
            costs: Mutex::new(HashMap::new()),
        })
    }

    /// The method asked for (after `auto` resolved).
    pub fn primary(&self) -> Method {
        self.ladder[0]
    }

    /// What the model offers.
    pub fn targets(&self) -> &GraphTargets {
        &self.targets
    }

    /// The values the executor must keep for every method on the ladder.
    pub fn taps(&self) -> Vec<String> {
        let mut taps = Vec::new();
        for m in &self.ladder {
            match m {
                Method::Cam => taps.extend(self.targets.cam.iter().map(|h| h.feature.clone())),
                Method::EigenCam | Method::GradCam => {
                    taps.extend(self.layer.iter().map(|(n, _)| n.clone()))
                }
                Method::Rollout => taps.extend(
                    self.targets
                        .attention
                        .iter()
                        .flat_map(|a| a.softmaxes.iter().cloned()),
                ),
            }
        }
        taps.sort();
        taps.dedup();
        taps
    }

    /// The target class: the fixed one, else `top1`.
    pub fn target_class(&self, top1: usize) -> usize {
        self.options.target_class.unwrap_or(top1)
    }

    /// Picks the method for a frame with `remaining` time left (`None`: no budget check) and
    /// says what was given up, e.g. `explain:gradcam->cam` or `explain_skipped`.
    pub fn choose(&self, remaining: Option<Duration>) -> (Option<Method>, Vec<String>) {
        let primary = self.primary();
        let remaining = match remaining {
            Some(r) if self.options.budget_aware => r.as_secs_f64() * 1e3,
            _ => return (Some(primary), Vec::new()),
        };
        let costs = self.costs.lock().unwrap_or_else(|e| e.into_inner());
        for &m in &self.ladder {
            // A method never measured gets one try: that is how its cost becomes known.
            let fits = costs
                .get(&m)
                .and_then(|w| w.quantile(COST_QUANTILE))
                .is_none_or(|ms| ms <= remaining);
            if fits {
                let degraded = if m == primary {
                    Vec::new()
                } else {
                    vec![format!("explain:{primary}->{m}")]
                };
                return (Some(m), degraded);
            }
        }
        (None, vec!["explain_skipped".into()])
    }

    /// Runs `method` on the tapped values for `class`, recording its cost.
    pub fn run(
        &self,
        method: Method,
        taps: &HashMap<String, Tensor>,
        class: usize,
    ) -> Result<Explanation> {
        let start = Instant::now();
        let (raw, layer) = self.raw_map(method, taps, class)?;
        let mut map = raw.clone();
        mask::relu(&mut map);
        mask::normalize(&mut map);
        let mut map = render::resize_bilinear(&map, self.input_size.0, self.input_size.1);
        map.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        // A cell with no heat is never hot: after the ReLU a low percentile can be 0.
        let threshold = mask::threshold_value(&map, self.options.threshold).max(f32::MIN_POSITIVE);
        let bin = mask::binarize(&map, threshold);
        let bbox = mask::largest_region(&bin).map(|(b, _)| b);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.costs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(method)
            .or_insert_with(|| Rolling::new(COST_WINDOW))
            .push(ms);
        Ok(Explanation {
            method,
            target_class: class,
            target_layer: layer,
            raw,
            map,
            threshold,
            mask: bin,
            bbox,
            ms,
        })
    }

    /// The method's map at the tapped resolution, before ReLU and normalisation, and the
    /// layer it came from: [`Self::run`] without the rendering, mask and cost record.
    pub fn raw_map(
        &self,
        method: Method,
        taps: &HashMap<String, Tensor>,
        class: usize,
    ) -> Result<(HeatMap, String)> {
        let no = |reason: String| Error::Explain {
            method: method.name().into(),
            reason,
        };
        let tap = |name: &str| {
            taps.get(name)
                .ok_or_else(|| no(format!("the value '{name}' was not kept by the executor")))
        };
        match method {
            Method::Cam => {
                let head = self
                    .targets
                    .cam
                    .as_ref()
                    .ok_or_else(|| no("the model has no CAM head".into()))?;
                if class >= head.classes {
                    return Err(no(format!(
                        "target class {class} is out of range (the head has {} classes)",
                        head.classes
                    )));
                }
                let data = host_f32(tap(&head.feature)?)?;
                let dims = (head.channels, head.height, head.width);
                let f = Self::features(&head.feature, data.as_slice(), dims)?;
                let row = &head.weight[class * head.channels..(class + 1) * head.channels];
                Ok((methods::weighted_sum(f, row), head.feature.clone()))
            }
            Method::EigenCam => {
                let (name, dims) = self
                    .layer
                    .as_ref()
                    .ok_or_else(|| no("no target layer".into()))?;
                let data = host_f32(tap(name)?)?;
                Ok((
                    methods::eigen_cam(Self::features(name, data.as_slice(), *dims)?),
                    name.clone(),
                ))
            }
            Method::GradCam => {
                let tail = self
                    .gradcam
                    .as_ref()
                    .ok_or_else(|| no("Grad-CAM was not prepared at load".into()))?;
                let name = tail.feature();
                let dims = self
                    .layer
                    .as_ref()
                    .map(|(_, d)| *d)
                    .ok_or_else(|| no("no target layer".into()))?;
                let t = taps.get(name).ok_or_else(|| {
                    no(format!("the value '{name}' was not kept by the executor"))
                })?;
                let grads = tail.gradient(t, class)?.flatten_all()?.to_vec1::<f32>()?;
                let data = host_f32(tap(name)?)?;
                let f = Self::features(name, data.as_slice(), dims)?;
                let weights = methods::mean_per_channel(Self::features(name, &grads, dims)?);
                Ok((methods::weighted_sum(f, &weights), name.to_string()))
            }
            Method::Rollout => {
                let att = self
                    .targets
                    .attention
                    .as_ref()
                    .ok_or_else(|| no("the model has no attention layers".into()))?;
                let layers = att
                    .softmaxes
                    .iter()
                    .map(|s| host_f32(tap(s)?))
                    .collect::<Result<Vec<_>>>()?;
                let want = att.heads * att.tokens * att.tokens;
                if let Some(bad) = layers.iter().position(|l| l.as_slice().len() != want) {
                    return Err(no(format!(
                        "'{}' holds {} values, expected {want}",
                        att.softmaxes[bad],
                        layers[bad].as_slice().len()
                    )));
                }
                let refs: Vec<&[f32]> = layers.iter().map(HostF32::as_slice).collect();
                let map = methods::rollout(
                    &refs,
                    att.heads,
                    att.tokens,
                    att.grid,
                    self.options.head_fusion,
                    self.options.discard_ratio,
                );
                let layer = format!(
                    "{}..{}",
                    att.softmaxes.first().map(String::as_str).unwrap_or(""),
                    att.softmaxes.last().map(String::as_str).unwrap_or("")
                );
                Ok((map, layer))
            }
        }
    }

    fn features<'a>(
        name: &str,
        data: &'a [f32],
        (channels, height, width): (usize, usize, usize),
    ) -> Result<Features<'a>> {
        if channels * height * width != data.len() {
            return Err(Error::Explain {
                method: "any".into(),
                reason: format!(
                    "'{name}' holds {} values, expected {channels}×{height}×{width}",
                    data.len()
                ),
            });
        }
        Ok(Features {
            data,
            channels,
            height,
            width,
        })
    }

    /// The report's `explain` object (`map` is added by whoever writes the picture).
    pub fn report_json(&self, e: &Explanation, frame_bbox: Option<BBox>) -> serde_json::Value {
        let hot = e.mask.data.iter().filter(|&&b| b).count();
        json!({
            "method": e.method,
            "target_class": e.target_class,
            "target_layer": e.target_layer,
            "ms": e.ms,
            "threshold": {"rule": self.options.threshold.to_string(), "value": e.threshold},
            "hot_fraction": hot as f64 / e.mask.data.len().max(1) as f64,
            "bbox": frame_bbox,
            "input_bbox": e.bbox,
        })
    }
}
