//! The pruning / dtype sweep's results: one row per model variant, written as a Markdown
//! table, JSON, and an SVG of latency and accuracy against the pruning ratio.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};

/// One measured variant.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Variant name (`p40-int8`).
    pub variant: String,
    /// Pruning ratio.
    pub ratio: f64,
    /// Weight dtype.
    pub dtype: String,
    /// Parameters.
    pub params: usize,
    /// Multiply-adds per frame.
    pub macs: u64,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Load time (open, map, plan), ms.
    pub load_ms: f64,
    /// Latency percentiles over the timed frames, ms.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Peak resident memory of the process that measured it, MB.
    pub peak_rss_mb: f64,
    /// Top-1 accuracy on the evaluation folder, when one was given.
    pub accuracy: Option<f64>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        cause: std::io::Error::other(e.to_string()),
    }
}

/// Writes `report.md`, `report.json` and `latency_vs_ratio.svg` into `dir`.
pub fn write_report(dir: &Path, title: &str, rows: &[Row], budget_ms: f64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(rows).map_err(|e| io(&json, e))?;
    std::fs::write(&json, text).map_err(|e| io(&json, e))?;

    let mut md = format!(
        "# {title}\n\nbudget {budget_ms:.0} ms. *MAC ÷* and *speed-up* are against the unpruned variant of the same dtype; *size / f32* against the f32 file at the same ratio.\n\n| variant | ratio | dtype | params | GMACs | MAC ÷ | file MB | size / f32 | load ms | p50 ms | speed-up | p95 ms | p99 ms | peak RSS MB | accuracy |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let base = rows.iter().find(|b| b.dtype == r.dtype && b.ratio == 0.0);
        let f32_file = rows
            .iter()
            .find(|b| b.dtype == "f32" && b.ratio == r.ratio)
            .map(|b| b.file_bytes);
        let opt = |v: Option<f64>, digits: usize| {
            v.map(|x| format!("{x:.digits$}"))
                .unwrap_or_else(|| "-".into())
        };
        md.push_str(&format!(
            "| {} | {:.2} | {} | {} | {:.3} | {} | {:.2} | {} | {:.1} | {:.2} | {} | {:.2} | {:.2} | {:.1} | {} |\n",
            r.variant,
            r.ratio,
            r.dtype,
            r.params,
            r.macs as f64 / 1e9,
            opt(base.map(|b| b.macs as f64 / r.macs.max(1) as f64), 2),
            r.file_bytes as f64 / 1e6,
            opt(f32_file.map(|f| r.file_bytes as f64 / f.max(1) as f64), 2),
            r.load_ms,
            r.p50_ms,
            opt(base.map(|b| b.p50_ms / r.p50_ms.max(1e-9)), 2),
            r.p95_ms,
            r.p99_ms,
            r.peak_rss_mb,
            r.accuracy
                .map(|a| format!("{:.1} %", 100.0 * a))
                .unwrap_or_else(|| "-".into())
        ));
    }
    let mdp = dir.join("report.md");
    std::fs::write(&mdp, md).map_err(|e| io(&mdp, e))?;

    let svg = dir.join("latency_vs_ratio.svg");
    plot(&svg, title, rows, budget_ms).map_err(|e| io(&svg, e))?;
    Ok(())
}

fn plot(
    path: &Path,
    title: &str,
    rows: &[Row],
    budget_ms: f64,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ratio = rows.iter().map(|r| r.ratio).fold(0.0, f64::max).max(0.1);
    let slowest = rows.iter().map(|r| r.p95_ms).fold(0.0, f64::max);
    // A budget far above every variant would flatten the curves to the floor: it is named in
    // the caption instead of drawn.
    let draw_budget = budget_ms <= 3.0 * slowest;
    let max_ms = if draw_budget {
        slowest.max(budget_ms)
    } else {
        slowest
    } * 1.15;
    let caption = if draw_budget {
        title.to_string()
    } else {
        format!("{title} (budget {budget_ms:.0} ms, above every variant)")
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..max_ratio * 1.05, 0.0..max_ms)?
        .set_secondary_coord(0.0..max_ratio * 1.05, 0.0..100.0);
    chart
        .configure_mesh()
        .x_desc("pruning ratio")
        .y_desc("latency p50 (ms)")
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("top-1 accuracy (%)")
        .draw()?;
    if draw_budget {
        chart
            .draw_series(LineSeries::new(
                [(0.0, budget_ms), (max_ratio * 1.05, budget_ms)],
                RED.stroke_width(2),
            ))?
            .label(format!("budget {budget_ms:.0} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    let mut dtypes: Vec<&str> = rows.iter().map(|r| r.dtype.as_str()).collect();
    dtypes.sort();
    dtypes.dedup();
    for (i, d) in dtypes.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.dtype == *d)
            .map(|r| (r.ratio, r.p50_ms))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
            .label(format!("{d} latency"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        let mut acc: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.dtype == *d)
            .filter_map(|r| r.accuracy.map(|a| (r.ratio, 100.0 * a)))
            .collect();
        acc.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !acc.is_empty() {
            chart
                .draw_secondary_series(LineSeries::new(acc, colour.stroke_width(1)))?
                .label(format!("{d} accuracy"))
                .legend(move |(x, y)| PathElement::new([(x, y + 3), (x + 20, y + 3)], colour));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
