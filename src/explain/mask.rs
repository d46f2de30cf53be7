//! Heat-map clean-up, thresholding, binary masks and their largest connected region.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::HeatMap;

/// Number of histogram bins [`threshold_value`] uses for Otsu's method.
const OTSU_BINS: usize = 256;

/// Rescales `map` to `0..=1` in place (min-max).
///
/// Non-finite values (NaN, ±inf) are replaced by 0 *before* the min and max are taken, so
/// they take part in the range like any other zero. A constant map (including one made
/// constant by that replacement) becomes all zeros: with no contrast there is no
/// evidence to spread over the range. An empty map is left as it is.
pub fn normalize(map: &mut HeatMap) {
    for v in &mut map.data {
        if !v.is_finite() {
            *v = 0.0;
        }
    }
    let (lo, hi) = min_max(&map.data);
    let range = hi - lo;
    for v in &mut map.data {
        *v = if range > 0.0 { (*v - lo) / range } else { 0.0 };
    }
}

/// Smallest and largest value; `(0, 0)` for an empty slice.
fn min_max(values: &[f32]) -> (f32, f32) {
    let mut iter = values.iter().copied();
    let Some(first) = iter.next() else {
        return (0.0, 0.0);
    };
    iter.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Clips negative values to 0 in place; NaN also becomes 0.
pub fn relu(map: &mut HeatMap) {
    for v in &mut map.data {
        // `f32::max` returns the non-NaN operand, which is what turns NaN into 0.
        *v = v.max(0.0);
    }
}

/// How [`threshold_value`] picks the cut between "attended" and background.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Threshold {
    /// Otsu's method: the cut that maximises the between-class variance.
    #[default]
    Otsu,
    /// Keep the values at or above this percentile (strictly between 0 and 100):
    /// `Percentile(90.0)` keeps roughly the top 10 %.
    Percentile(f32),
}

impl FromStr for Threshold {
    type Err = String;

    /// Parses `otsu`, `pN` or `percentile:N` (case-insensitive, surrounding spaces
    /// ignored), with `0 < N < 100`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_ascii_lowercase();
        if text == "otsu" {
            return Ok(Threshold::Otsu);
        }
        let number = text
            .strip_prefix("percentile:")
            .or_else(|| text.strip_prefix('p'))
            .ok_or_else(|| {
                format!("unknown threshold {s:?}: expected \"otsu\", \"pN\" or \"percentile:N\"")
            })?;
        let p: f32 = number
            .trim()
            .parse()
            .map_err(|_| format!("threshold {s:?}: {number:?} is not a number"))?;
        // Written as a negated range test so that NaN is rejected too.
        if !(p > 0.0 && p < 100.0) {
            return Err(format!(
                "threshold {s:?}: percentile {p} is outside 0 < p < 100"
            ));
        }
        Ok(Threshold::Percentile(p))
    }
}

impl fmt::Display for Threshold {
    /// Writes `otsu` or `pN`, which [`Threshold::from_str`] reads back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Otsu => f.write_str("otsu"),
            // `{}` on f32 prints the shortest text that parses back to the same value.
            Threshold::Percentile(p) => write!(f, "p{p}"),
        }
    }
}

/// The value that separates attended pixels from background: a pixel is *in* when
/// `value >= threshold` (that is what [`binarize`] does).
///
/// NaN values are ignored; a map with no other values (or an empty one) gives 0.
///
/// * [`Threshold::Otsu`] assumes a normalised map: values are clamped to `[0, 1]` and
///   counted in 256 bins, bin `i` holding `[i/256, (i+1)/256)` (1.0 falls in the last).
///   The result is a bin boundary `k/256` maximising the between-class variance, so the
///   pixels `>= k/256` are exactly those in bins `k..`. When several consecutive
///   boundaries tie (an empty gap between two modes) the middle of the first such run is
///   returned, which keeps the cut away from both modes. When all values share one bin
///   there is nothing to split and the result lies just above the largest (clamped)
///   value, so nothing is in.
/// * [`Threshold::Percentile`] is the nearest-rank percentile of the values: the
///   `ceil(p/100 · n)`-th smallest.
pub fn threshold_value(map: &HeatMap, t: Threshold) -> f32 {
    match t {
        Threshold::Otsu => otsu(&map.data),
        Threshold::Percentile(p) => percentile(&map.data, p),
    }
}

/// Otsu's threshold on a [`OTSU_BINS`]-bin histogram; see [`threshold_value`].
fn otsu(values: &[f32]) -> f32 {
    // Four interleaved histograms: a smooth map puts neighbours in the same bin, and one
    // histogram would make every increment wait for the previous one to the same counter.
    let mut parts = [[0u32; OTSU_BINS]; 4];
    let mut counted = 0usize;
    for chunk in values.chunks(4) {
        for (part, &v) in parts.iter_mut().zip(chunk) {
            if let Some(b) = otsu_bin(v) {
                part[b] += 1;
                counted += 1;
            }
        }
    }
    if counted == 0 {
        return 0.0;
    }
    let mut hist = [0u64; OTSU_BINS];
    for part in &parts {
        for (h, &p) in hist.iter_mut().zip(part) {
            *h += u64::from(p);
        }
    }
    match best_split(&hist) {
        Some(k) => k as f32 / OTSU_BINS as f32,
        None => {
            // Nothing to split (rare): just above the largest value, so nothing is in.
            let top = values
                .iter()
                .filter(|v| !v.is_nan())
                .fold(0f32, |m, &v| m.max(v.clamp(0.0, 1.0)));
            // `+ 0.0` turns a clamped -0.0 into +0.0, whose next value up is positive.
            (top + 0.0).next_up()
        }
    }
}

/// The bin of a value, clamped to `[0, 1]` first; `None` for NaN.
#[inline]
fn otsu_bin(v: f32) -> Option<usize> {
    if v.is_nan() {
        return None;
    }
    // Scaling by a power of two is exact, so `v >= k/256` exactly when the bin is `>= k`.
    let x = v.clamp(0.0, 1.0) * OTSU_BINS as f32;
    // SAFETY: x is finite and in [0, 256], so it fits a u32 (the checked cast costs a
    // third of the histogram's time).
    let b = unsafe { x.to_int_unchecked::<u32>() } as usize;
    Some(b.min(OTSU_BINS - 1))
}

/// The boundary `k` (class 0 = bins `< k`) with the largest between-class variance, the
/// middle of the first run of tied boundaries; `None` when no boundary splits the
/// histogram into two non-empty classes.
fn best_split(hist: &[u64; OTSU_BINS]) -> Option<usize> {
    let total: u64 = hist.iter().sum();
    let total_sum: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * c as f64)
        .sum();
    let (mut w0, mut sum0) = (0u64, 0.0f64);
    let mut best: Option<(f64, usize, usize)> = None;
    for k in 1..OTSU_BINS {
        w0 += hist[k - 1];
        sum0 += (k - 1) as f64 * hist[k - 1] as f64;
        let w1 = total - w0;
        if w0 == 0 || w1 == 0 {
            continue;
        }
        let diff = sum0 / w0 as f64 - (total_sum - sum0) / w1 as f64;
        let var = w0 as f64 * w1 as f64 * diff * diff;
        best = match best {
            Some((b, lo, hi)) if var < b || (var == b && hi + 1 != k) => Some((b, lo, hi)),
            // Across empty bins nothing changes, so a gap's variances are bit-identical.
            Some((b, lo, _)) if var == b => Some((b, lo, k)),
            _ => Some((var, k, k)),
        };
    }
    best.map(|(_, lo, hi)| (lo + hi) / 2)
}

/// Nearest-rank percentile of the non-NaN values; 0 when there are none.
fn percentile(values: &[f32], p: f32) -> f32 {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    // `p·n/100` in this order stays exact for whole percentiles, so p90 of 10 values is
    // rank 9, not a rounding error away from rank 10.
    let rank = (f64::from(p) * n as f64 / 100.0).ceil();
    let index = if rank.is_nan() { 0 } else { rank as usize };
    sorted[index.clamp(1, n) - 1]
}

/// A binary mask, row-major, `width × height` cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height × width` cells, row-major; `true` is in.
    pub data: Vec<bool>,
}

/// The mask of the cells with `value >= thr`.
///
/// NaN values are out. The mask always has `width × height` cells: should `map.data`
/// hold fewer values than that, the missing ones are out.
pub fn binarize(map: &HeatMap, thr: f32) -> Mask {
    let n = map.width * map.height;
    let mut data: Vec<bool> = map.data.iter().take(n).map(|&v| v >= thr).collect();
    data.resize(n, false);
    Mask {
        width: map.width,
        height: map.height,
        data,
    }
}

/// An axis-aligned box in pixels; `x1` and `y1` are exclusive.
///
/// Serialised as the JSON array `[x0, y0, x1, y1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "[u32; 4]", from = "[u32; 4]")]
pub struct BBox {
    /// Left column (inclusive).
    pub x0: u32,
    /// Top row (inclusive).
    pub y0: u32,
    /// Right column (exclusive).
    pub x1: u32,
    /// Bottom row (exclusive).
    pub y1: u32,
}

impl From<BBox> for [u32; 4] {
    fn from(b: BBox) -> Self {
        [b.x0, b.y0, b.x1, b.y1]
    }
}

impl From<[u32; 4]> for BBox {
    fn from([x0, y0, x1, y1]: [u32; 4]) -> Self {
        BBox { x0, y0, x1, y1 }
    }
}

/// Slack for float error when a scaled edge lands on a whole pixel, so that e.g.
/// `25 · (224/25)` (224.00000000000003 in f64) rounds up to 224, not 225.
const SCALE_SLACK: f64 = 1e-6;

impl BBox {
    /// Columns covered (0 for an inverted box).
    pub fn width(&self) -> u32 {
        self.x1.saturating_sub(self.x0)
    }

    /// Rows covered (0 for an inverted box).
    pub fn height(&self) -> u32 {
        self.y1.saturating_sub(self.y0)
    }

    /// The box in a frame scaled by `sx` horizontally and `sy` vertically (e.g. from a
    /// 7×7 map to a 224×224 image: 32, 32).
    ///
    /// Edges round outwards (start down, end up) so the scaled box still covers every
    /// pixel the original touched. Results saturate to the `u32` range; a negative or
    /// NaN scale gives 0.
    pub fn scaled(&self, sx: f64, sy: f64) -> BBox {
        BBox {
            x0: scale_down(self.x0, sx),
            y0: scale_down(self.y0, sy),
            x1: scale_up(self.x1, sx),
            y1: scale_up(self.y1, sy),
        }
    }
}

/// `floor(v · s)`, saturating (the `as` cast saturates and maps NaN to 0).
fn scale_down(v: u32, s: f64) -> u32 {
    (f64::from(v) * s + SCALE_SLACK).floor() as u32
}

/// `ceil(v · s)`, saturating.
fn scale_up(v: u32, s: f64) -> u32 {
    (f64::from(v) * s - SCALE_SLACK).ceil() as u32
}

/// The largest 8-connected region of `mask`: its bounding box and pixel count.
///
/// On a tie the region reached first in row-major order wins. `None` when no cell is in
/// (including a zero-sized mask).
///
/// Works on runs of set cells, joined with a union-find when a run touches one in the row
/// above (diagonals included): a frame's mask has a few runs per row, so this touches each
/// cell once, where a flood fill visits every neighbour of every cell.
pub fn largest_region(mask: &Mask) -> Option<(BBox, usize)> {
    let (w, h) = (mask.width, mask.height);
    if w == 0 || h == 0 {
        return None;
    }
    // Per run: (row, x0, x1 exclusive); per root: size and box.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut parent: Vec<usize> = Vec::new();
    let mut prev_row = 0..0; // indices into `runs` of the previous row's runs
    for y in 0..h {
        let row_start = runs.len();
        // Cells missing from short data are out.
        let row = mask
            .data
            .get((y * w).min(mask.data.len())..((y + 1) * w).min(mask.data.len()))
            .unwrap_or(&[]);
        let mut x = 0;
        while let Some(start) = row[x..].iter().position(|&b| b) {
            let x0 = x + start;
            x = row[x0..]
                .iter()
                .position(|&b| !b)
                .map_or(row.len(), |n| x0 + n);
            let id = runs.len();
            runs.push((y, x0, x));
            parent.push(id);
            for p in prev_row.clone() {
                let (_, px0, px1) = runs[p];
                // 8-connected: the runs overlap once widened by one cell.
                if px0 <= x && x0 <= px1 {
                    union(&mut parent, p, id);
                }
            }
            if x >= row.len() {
                break;
            }
        }
        prev_row = if y + 1 < h {
            row_start..runs.len()
        } else {
            0..0
        };
    }
    // Regions by root: (first run index, size, x0, y0, x1, y1).
    let mut regions: std::collections::HashMap<usize, (usize, usize, usize, usize, usize, usize)> =
        std::collections::HashMap::new();
    for (i, &(y, x0, x1)) in runs.iter().enumerate() {
        let r = find(&mut parent, i);
        let e = regions.entry(r).or_insert((i, 0, x0, y, x1, y + 1));
        e.1 += x1 - x0;
        e.2 = e.2.min(x0);
        e.3 = e.3.min(y);
        e.4 = e.4.max(x1);
        e.5 = e.5.max(y + 1);
    }
    regions
        .into_values()
        // Largest first; among equals, the one whose first run comes first.
        .min_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)))
        .map(|(_, n, x0, y0, x1, y1)| (box_from_corners(x0, y0, x1, y1), n))
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Joins two sets under the smaller index, so a root is always its region's first run.
fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        let (lo, hi) = (ra.min(rb), ra.max(rb));
        parent[hi] = lo;
    }
}

/// A [`BBox`] from `usize` corners, saturating at `u32::MAX`.
fn box_from_corners(x0: usize, y0: usize, x1: usize, y1: usize) -> BBox {
    let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    BBox {
        x0: c(x0),
        y0: c(y0),
        x1: c(x1),
        y1: c(y1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(width: usize, height: usize, data: &[f32]) -> HeatMap {
        HeatMap {
            width,
            height,
            data: data.to_vec(),
        }
    }

    fn mask(width: usize, rows: &[&str]) -> Mask {
        let data: Vec<bool> = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        Mask {
            width,
            height: rows.len(),
            data,
        }
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn normalize_zeroes_non_finite_before_min_max() {
        let mut m = map(4, 1, &[2.0, 4.0, f32::NAN, 6.0]);
        normalize(&mut m);
        assert_close(&m.data, &[1.0 / 3.0, 2.0 / 3.0, 0.0, 1.0]);

        let mut m = map(3, 1, &[f32::INFINITY, -1.0, 3.0]);
        normalize(&mut m);
        assert_close(&m.data, &[0.25, 0.0, 1.0]);
    }

    #[test]
    fn normalize_constant_and_empty() {
        let mut m = map(2, 1, &[3.0, 3.0]);
        normalize(&mut m);
        assert_eq!(m.data, vec![0.0, 0.0]);

        let mut m = map(0, 0, &[]);
        normalize(&mut m);
        assert!(m.data.is_empty());
    }

    #[test]
    fn relu_clips_negatives_and_nan() {
        let mut m = map(4, 1, &[-1.0, 0.0, 2.5, f32::NAN]);
        relu(&mut m);
        assert_eq!(m.data, vec![0.0, 0.0, 2.5, 0.0]);
    }

    #[test]
    fn threshold_parses_all_spellings() {
        assert_eq!("otsu".parse::<Threshold>(), Ok(Threshold::Otsu));
        assert_eq!(" OTSU ".parse::<Threshold>(), Ok(Threshold::Otsu));
        assert_eq!("p90".parse::<Threshold>(), Ok(Threshold::Percentile(90.0)));
        assert_eq!(
            "percentile:92.5".parse::<Threshold>(),
            Ok(Threshold::Percentile(92.5))
        );
        assert_eq!(Threshold::default(), Threshold::Otsu);
    }

    #[test]
    fn threshold_rejects_bad_values_naming_them() {
        for bad in [
            "p0",
            "p100",
            "percentile:150",
            "p-5",
            "pnan",
            "pabc",
            "p",
            "mean",
        ] {
            let err = bad.parse::<Threshold>().expect_err(bad);
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn threshold_display_round_trips() {
        for t in [
            Threshold::Otsu,
            Threshold::Percentile(90.0),
            Threshold::Percentile(92.5),
            Threshold::Percentile(0.1),
        ] {
            assert_eq!(t.to_string().parse::<Threshold>(), Ok(t), "{t}");
        }
        assert_eq!(Threshold::Percentile(90.0).to_string(), "p90");
    }

    #[test]
    fn otsu_two_levels_cuts_in_the_middle_of_the_gap() {
        // Bins 0 and 255: every boundary 1..=255 ties, the middle one is 128.
        let m = map(4, 1, &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!(threshold_value(&m, Threshold::Otsu), 0.5);
    }

    #[test]
    fn otsu_picks_the_higher_variance_split() {
        // Bins 0,0,0,128,255. Boundaries 1..=128: 3·2·(191.5)² = 220033.5;
        // 129..=255: 4·1·223² = 198916. First run wins, middle (1+128)/2 = 64.
        let m = map(5, 1, &[0.0, 0.0, 0.0, 0.5, 1.0]);
        let thr = threshold_value(&m, Threshold::Otsu);
        assert_eq!(thr, 64.0 / 256.0);
        assert_eq!(
            binarize(&m, thr).data,
            vec![false, false, false, true, true]
        );

        // Mirror: bins 0,128,255,255,255. 1..=128: 4·223.25² = 199362.25;
        // 129..=255: 6·191² = 218886, middle (129+255)/2 = 192.
        let m = map(5, 1, &[0.0, 0.5, 1.0, 1.0, 1.0]);
        assert_eq!(threshold_value(&m, Threshold::Otsu), 192.0 / 256.0);
    }

    #[test]
    fn otsu_value_on_the_boundary_is_in() {
        // Bins 0 and 1: the only split is boundary 1, i.e. exactly the second value.
        let m = map(2, 1, &[0.0, 1.0 / 256.0]);
        let thr = threshold_value(&m, Threshold::Otsu);
        assert_eq!(thr, 1.0 / 256.0);
        assert_eq!(binarize(&m, thr).data, vec![false, true]);
    }

    #[test]
    fn otsu_degenerate_maps_keep_nothing() {
        for data in [&[0.0f32, 0.0][..], &[1.0, 1.0], &[0.7]] {
            let m = map(data.len(), 1, data);
            let thr = threshold_value(&m, Threshold::Otsu);
            assert!(
                binarize(&m, thr).data.iter().all(|&b| !b),
                "{data:?}: {thr}"
            );
        }
        assert_eq!(threshold_value(&map(0, 0, &[]), Threshold::Otsu), 0.0);
        assert_eq!(
            threshold_value(&map(1, 1, &[f32::NAN]), Threshold::Otsu),
            0.0
        );
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f32> = (1..=10).rev().map(|v| v as f32).collect();
        let m = map(10, 1, &values);
        let at = |p| threshold_value(&m, Threshold::Percentile(p));
        assert_eq!(at(90.0), 9.0);
        assert_eq!(at(50.0), 5.0);
        // Rank ceil(4.1) = 5: nearest-rank rounds up, never to the nearer rank 4.
        assert_eq!(at(41.0), 5.0);
        assert_eq!(at(1.0), 1.0);
        assert_eq!(at(99.9), 10.0);
        assert_eq!(
            binarize(&m, at(90.0)).data.iter().filter(|&&b| b).count(),
            2
        );
    }

    #[test]
    fn percentile_ignores_nan() {
        let m = map(3, 1, &[f32::NAN, 2.0, 1.0]);
        assert_eq!(threshold_value(&m, Threshold::Percentile(99.0)), 2.0);
    }

    #[test]
    fn binarize_pads_short_data_and_drops_nan() {
        let m = map(2, 2, &[0.5, f32::NAN, 0.4]);
        let b = binarize(&m, 0.5);
        assert_eq!((b.width, b.height), (2, 2));
        assert_eq!(b.data, vec![true, false, false, false]);
    }

    #[test]
    fn bbox_is_a_json_array() {
        let b = BBox {
            x0: 1,
            y0: 2,
            x1: 3,
            y1: 4,
        };
        let json = serde_json::to_string(&b).expect("serialise");
        assert_eq!(json, "[1,2,3,4]");
        let back: BBox = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, b);
        assert!(serde_json::from_str::<BBox>("[1,2,3]").is_err());
    }

    #[test]
    fn bbox_scaled_rounds_outwards() {
        let b = BBox::from([1, 2, 3, 5]);
        assert_eq!(b.scaled(2.0, 0.5), BBox::from([2, 1, 6, 3]));
        // 25 · (224/25) is 224.00000000000003 in f64 and 11 · (480/11) is
        // 479.99999999999994; neither may spill a pixel outwards.
        let full = BBox::from([0, 0, 25, 11]);
        let scaled = full.scaled(224.0 / 25.0, 480.0 / 11.0);
        assert_eq!(scaled, BBox::from([0, 0, 224, 480]));
        let inner = BBox::from([11, 11, 11, 11]).scaled(480.0 / 11.0, 480.0 / 11.0);
        assert_eq!(inner, BBox::from([480, 480, 480, 480]));
        assert_eq!(b.scaled(-1.0, f64::NAN), BBox::from([0, 0, 0, 0]));
        assert_eq!((b.width(), b.height()), (2, 3));
    }

    #[test]
    fn largest_region_joins_diagonals() {
        // Left region (0,0),(1,0),(1,1),(2,2) is 4 pixels only with diagonal links;
        // the right column is 3.
        let m = mask(5, &["##...", ".#..#", "..#.#", "....#"]);
        let (b, n) = largest_region(&m).expect("a region");
        assert_eq!(n, 4);
        assert_eq!(b, BBox::from([0, 0, 3, 3]));
    }

    #[test]
    fn largest_region_picks_bigger_later_region() {
        let m = mask(4, &["#...", "..##", "..##"]);
        assert_eq!(largest_region(&m), Some((BBox::from([2, 1, 4, 3]), 4)));
    }

    #[test]
    fn largest_region_tie_goes_to_first_in_row_major() {
        let m = mask(3, &["..#", "#.."]);
        assert_eq!(largest_region(&m), Some((BBox::from([2, 0, 3, 1]), 1)));
    }

    #[test]
    fn largest_region_empty_masks() {
        assert_eq!(largest_region(&mask(3, &["...", "..."])), None);
        assert_eq!(largest_region(&mask(0, &[])), None);
        let short = Mask {
            width: 3,
            height: 3,
            data: vec![false, true],
        };
        assert_eq!(largest_region(&short), Some((BBox::from([1, 0, 2, 1]), 1)));
    }

    #[test]
    fn largest_region_handles_a_big_full_mask() {
        let m = Mask {
            width: 1000,
            height: 1000,
            data: vec![true; 1_000_000],
        };
        assert_eq!(
            largest_region(&m),
            Some((BBox::from([0, 0, 1000, 1000]), 1_000_000))
        );
    }
}
