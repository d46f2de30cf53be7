//! The explain side of the CLI: flags shared by `run` / `demo` / `explain` / `eval`, overlay
//! pictures, the raw-map dump, and the `explain` and `eval` commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use image::{DynamicImage, RgbImage};

use edgeinfer::explain::mask::{self, Threshold};
use edgeinfer::explain::methods::HeadFusion;
use edgeinfer::explain::score::{self, ScoreStats};
use edgeinfer::explain::{render, Choice, ExplainOptions, Explanation, Method};
use edgeinfer::model::{DType, ModelWriter};
use edgeinfer::pipeline::preprocess::model_view;
use edgeinfer::runtime::{Explained, RuntimeBuilder};
use edgeinfer::Runtime;

/// How frames are explained.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// cam, eigencam, gradcam, rollout, auto (the cheapest faithful method for the model) or
    /// off (run's default; demo's is auto).
    #[arg(long)]
    pub explain: Option<Choice>,
    /// Class to explain (default: each frame's top-1).
    #[arg(long)]
    pub target_class: Option<usize>,
    /// Value (ONNX name) to explain from, for eigencam / gradcam (default: the last spatial
    /// feature map; `inspect --nodes` lists values).
    #[arg(long)]
    pub target_layer: Option<String>,
    /// Heat map → mask threshold: otsu, or pNN (keep the top 100 − NN %).
    #[arg(long, default_value = "otsu")]
    pub threshold: Threshold,
    /// Rollout: how heads are fused (mean, max, min).
    #[arg(long, default_value = "mean")]
    pub head_fusion: HeadFusion,
    /// Rollout: fraction of the weakest attention links dropped per layer.
    #[arg(long, default_value_t = 0.0)]
    pub discard_ratio: f32,
    /// Write each frame's raw map (`frame<N>.raw`, tapped resolution), its map at input
    /// resolution (`frame<N>.input`) and its mask (`frame<N>.mask`, bool) to this safetensors
    /// file.
    #[arg(long)]
    pub dump_maps: Option<PathBuf>,
}

impl ExplainArgs {
    /// The library options.
    pub fn options(&self, choice: Choice) -> Result<ExplainOptions> {
        if !(0.0..1.0).contains(&self.discard_ratio) {
            bail!(
                "--discard-ratio {}: expected a fraction in [0, 1)",
                self.discard_ratio
            );
        }
        Ok(ExplainOptions {
            choice,
            target_class: self.target_class,
            target_layer: self.target_layer.clone(),
            threshold: self.threshold,
            head_fusion: self.head_fusion,
            discard_ratio: self.discard_ratio,
            budget_aware: true,
        })
    }

    /// Applies the options to a builder when explanations are on.
    pub fn apply(&self, b: RuntimeBuilder, choice: Choice) -> Result<RuntimeBuilder> {
        Ok(match choice {
            Choice::Off => b,
            c => b.explain(self.options(c)?),
        })
    }
}

/// The picture a frame's explanation is drawn on: the frame as the model saw it.
fn view(rt: &Runtime, img: &DynamicImage) -> Result<RgbImage> {
    let input = rt
        .model()
        .exec
        .graph()
        .inputs
        .first()
        .context("the model has no inputs")?;
    model_view(img, input).context("the model's input is not an image")
}

/// The heat map blended over the model's view, with the hot region's box.
pub fn overlay_picture(view: &RgbImage, e: &Explanation) -> RgbImage {
    let mut out = render::overlay(view, &e.map, 0.45);
    if let Some(b) = &e.bbox {
        render::draw_bbox(&mut out, b, [255, 255, 255], 2);
    }
    out
}

/// Input | heat map | overlay.
pub fn side_by_side(view: &RgbImage, e: &Explanation) -> RgbImage {
    let heat = render::heat_image(&e.map, view.width(), view.height());
    let over = overlay_picture(view, e);
    render::side_by_side(&[view, &heat, &over], 8)
}

/// Writes overlays for explained frames into a folder and puts their paths in the reports.
pub struct OverlaySink {
    dir: PathBuf,
}

impl OverlaySink {
    /// Creates the folder.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(OverlaySink {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes `<frame>-<source stem>.png` and records it as the report's `explain.map`.
    pub fn write(&self, rt: &Runtime, x: &mut Explained) -> Result<()> {
        let (Some(e), Some(img)) = (&x.explanation, &x.image) else {
            return Ok(());
        };
        let stem = Path::new(&x.report.source)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "frame".into());
        let path = self.dir.join(format!("{:06}-{stem}.png", x.report.frame));
        overlay_picture(&view(rt, img)?, e)
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        if let Some(obj) = x.report.explain.as_mut().and_then(|v| v.as_object_mut()) {
            obj.insert("map".into(), path.display().to_string().into());
        }
        Ok(())
    }
}

/// Collects raw maps for `--dump-maps`.
#[derive(Default)]
pub struct MapDump {
    writer: ModelWriter,
}

impl MapDump {
    /// Adds a frame's maps.
    pub fn add(&mut self, frame: u64, e: &Explanation) -> Result<()> {
        for (key, m) in [("raw", &e.raw), ("input", &e.map)] {
            let bytes: Vec<u8> = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.writer.add_tensor(
                format!("frame{frame}.{key}"),
                DType::F32,
                vec![m.height, m.width],
                bytes,
            )?;
        }
        let mask: Vec<u8> = e.mask.data.iter().map(|&b| u8::from(b)).collect();
        self.writer.add_tensor(
            format!("frame{frame}.mask"),
            DType::Bool,
            vec![e.mask.height, e.mask.width],
            mask,
        )?;
        Ok(())
    }

    /// Writes the file.
    pub fn finish(self, path: &Path) -> Result<()> {
        self.writer
            .write(path)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// `edgeinfer explain`: one image, a side-by-side picture.
#[derive(Args)]
pub struct ExplainCmd {
    /// The model file.
    #[arg(long)]
    pub model: PathBuf,
    /// The image.
    #[arg(long)]
    pub input: PathBuf,
    /// Folder for `<image>.explain.png` (input | heat map | overlay).
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// cam, eigencam, gradcam, rollout or auto.
    #[arg(long, default_value = "auto")]
    pub method: Choice,
    #[command(flatten)]
    pub explain: ExplainArgs,
}

/// Runs `edgeinfer explain` on a builder that already has the target settings.
pub fn explain_cmd(a: &ExplainCmd, builder: RuntimeBuilder) -> Result<()> {
    if a.method == Choice::Off {
        bail!("--method off: nothing to explain");
    }
    let mut opts = a.explain.options(a.method)?;
    opts.budget_aware = false;
    let rt = builder
        .model(&a.model)
        .explain(opts)
        .build()
        .with_context(|| format!("loading {}", a.model.display()))?;
    let explainer = rt.explainer().context("no explainer")?;
    let img = image::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let feeds = [rt.image_tensor(&img)?];
    let (_, e) = rt.explain_tensors(&feeds, explainer.primary(), a.explain.target_class)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let stem = a
        .input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let path = a.out.join(format!("{stem}.explain.png"));
    side_by_side(&view(&rt, &img)?, &e)
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    let label = rt
        .model()
        .labels
        .as_ref()
        .and_then(|l| l.get(e.target_class).cloned());
    let mut json = explainer.report_json(&e, None);
    if let Some(obj) = json.as_object_mut() {
        obj.insert("label".into(), label.into());
        obj.insert("picture".into(), path.display().to_string().into());
        obj.remove("bbox");
    }
    println!("{json}");
    if let Some(p) = &a.explain.dump_maps {
        let mut dump = MapDump::default();
        dump.add(0, &e)?;
        dump.finish(p)?;
    }
    eprintln!(
        "{} on {}: class {} in {:.2} ms -> {}",
        e.method,
        a.input.display(),
        e.target_class,
        e.ms,
        path.display()
    );
    Ok(())
}

/// `edgeinfer eval`: accuracy, and how well each method's map localises known defects.
#[derive(Args)]
pub struct EvalCmd {
    /// The model file (a classifier with labels).
    #[arg(long)]
    pub model: PathBuf,
    /// Images, one sub-folder per class (folder names are the model's labels).
    #[arg(long)]
    pub data: PathBuf,
    /// Masks, same relative paths as the images (white = defect); images without one are
    /// counted for accuracy only.
    #[arg(long)]
    pub masks: PathBuf,
    /// Methods to score, comma-separated (default: every one the model supports).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Explain the true class (default) or the predicted one.
    #[arg(long, default_value = "true")]
    pub target: String,
    /// Heat map → mask threshold: otsu or pNN.
    #[arg(long, default_value = "otsu")]
    pub threshold: Threshold,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One labelled image.
struct Sample {
    path: PathBuf,
    class: usize,
    mask: Option<PathBuf>,
}

fn samples(a: &EvalCmd, labels: &[String]) -> Result<Vec<Sample>> {
    let images = edgeinfer::finetune::labelled_images(&a.data, labels)?;
    if images.is_empty() {
        bail!("no images under {}", a.data.display());
    }
    Ok(images
        .into_iter()
        .map(|(path, class)| {
            let rel = path.strip_prefix(&a.data).unwrap_or(&path).to_path_buf();
            let m = a.masks.join(&rel);
            Sample {
                path,
                class,
                mask: m.exists().then_some(m),
            }
        })
        .collect())
}

/// Loads a mask at the model view's geometry (the same resize/crop as the image).
fn load_mask(path: &Path, rt: &Runtime) -> Result<mask::Mask> {
    let img = image::open(path).with_context(|| format!("reading mask {}", path.display()))?;
    let input = rt
        .model()
        .exec
        .graph()
        .inputs
        .first()
        .context("the model has no inputs")?;
    // The mask goes through the model's geometry like its image; bilinear edges are cut at
    // half intensity.
    let mut gray = input.clone();
    if let Some(p) = gray.preprocess.as_mut() {
        p.color = edgeinfer::graph::ColorOrder::Rgb;
    }
    let v = model_view(&img, &gray).context("the model's input is not an image")?;
    let luma = DynamicImage::ImageRgb8(v).to_luma8();
    Ok(score::mask_from_luma(&luma))
}

/// Per-method results of `eval`.
#[derive(serde::Serialize)]
struct MethodResult {
    method: Method,
    scored: ScoreStats,
    mean_ms: f64,
}

/// Runs `edgeinfer eval`.
pub fn eval_cmd(a: &EvalCmd, builder: RuntimeBuilder) -> Result<()> {
    let by_true = match a.target.as_str() {
        "true" => true,
        "predicted" => false,
        other => bail!("--target '{other}': expected true or predicted"),
    };
    let methods: Vec<Method> = if a.methods.is_empty() {
        vec![
            Method::Cam,
            Method::EigenCam,
            Method::GradCam,
            Method::Rollout,
        ]
    } else {
        a.methods
            .iter()
            .map(|m| match m.parse::<Choice>() {
                Ok(Choice::Use(m)) => Ok(m),
                _ => bail!("--methods: unknown method '{m}' (cam, eigencam, gradcam, rollout)"),
            })
            .collect::<Result<_>>()?
    };
    let explicit = !a.methods.is_empty();
    let mut results = Vec::new();
    let mut accuracy = None;
    for method in methods {
        let opts = ExplainOptions {
            choice: Choice::Use(method),
            threshold: a.threshold,
            budget_aware: false,
            ..Default::default()
        };
        let rt = match builder.clone().model(&a.model).explain(opts).build() {
            Ok(rt) => rt,
            Err(e) if !explicit && matches!(e, edgeinfer::Error::Explain { .. }) => {
                eprintln!("{method}: not applicable to this model ({e})");
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("loading {}", a.model.display())),
        };
        let labels = rt
            .model()
            .labels
            .clone()
            .context("the model file has no labels; eval maps class folders to labels")?;
        let list = samples(a, &labels)?;
        let (mut correct, mut stats, mut ms) = (0usize, ScoreStats::default(), Vec::new());
        for s in &list {
            let img =
                image::open(&s.path).with_context(|| format!("reading {}", s.path.display()))?;
            let feeds = [rt.image_tensor(&img)?];
            let class = by_true.then_some(s.class);
            let (logits, e) = rt.explain_tensors(&feeds, method, class)?;
            let top1 = edgeinfer::runtime::argmax(&logits)?;
            correct += usize::from(top1 == s.class);
            ms.push(e.ms);
            if let Some(mpath) = &s.mask {
                let truth = load_mask(mpath, &rt)?;
                let sc = score::score(&e.map, &e.mask, &truth)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("scoring {}", s.path.display()))?;
                stats.add(&sc);
            }
        }
        accuracy.get_or_insert((correct, list.len()));
        results.push(MethodResult {
            method,
            scored: stats,
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        });
    }
    let (correct, n) = accuracy.context("no method applies to this model")?;
    println!(
        "accuracy {:.1} % ({correct}/{n}); localisation on frames with a mask, threshold {}:",
        100.0 * correct as f64 / n as f64,
        a.threshold
    );
    println!(
        "{:<10} {:>6} {:>7} {:>7} {:>9} {:>9} {:>8}",
        "method", "frames", "IoU", "Dice", "pointing", "energy", "ms"
    );
    for r in &results {
        println!(
            "{:<10} {:>6} {:>7.3} {:>7.3} {:>9.3} {:>9.3} {:>8.2}",
            r.method.name(),
            r.scored.n,
            r.scored.mean_iou,
            r.scored.mean_dice,
            r.scored.pointing_rate,
            r.scored.mean_energy_in_mask,
            r.mean_ms
        );
    }
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "model": a.model.display().to_string(),
            "data": a.data.display().to_string(),
            "threshold": a.threshold.to_string(),
            "target": a.target,
            "accuracy": correct as f64 / n as f64,
            "frames": n,
            "methods": results,
        });
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
