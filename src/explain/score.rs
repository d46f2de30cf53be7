//! Localisation scores of a heat map and its mask against a ground-truth mask, and their
//! averages over a data set.

use image::GrayImage;
use serde::Serialize;

use super::mask::Mask;
use super::HeatMap;

/// How well one heat map and its predicted mask localise the ground truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    /// `|P ∩ T| / |P ∪ T|`; 1 when both masks are empty.
    pub iou: f64,
    /// `2 |P ∩ T| / (|P| + |T|)`; 1 when both masks are empty.
    pub dice: f64,
    /// Pointing game: the heat map's maximum (the first in row-major order on ties)
    /// lies inside the truth mask.
    pub pointing_hit: bool,
    /// Share of the heat map's (non-negative) mass that falls inside the truth mask;
    /// 0 when the map has no mass.
    pub energy_in_mask: f64,
}

/// Scores `map` and its `predicted` mask against the `truth` mask.
///
/// All three must be the same size, and each must hold `width × height` values;
/// otherwise the error names the sizes involved. For the energy share, negative and
/// non-finite map values count as 0; for the pointing game NaN values are skipped.
pub fn score(map: &HeatMap, predicted: &Mask, truth: &Mask) -> Result<Scores, String> {
    check_sizes(map, predicted, truth)?;
    let (inter, union, p_count, t_count) = overlap(predicted, truth);
    Ok(Scores {
        iou: ratio_or_one(inter as f64, union as f64),
        dice: ratio_or_one(2.0 * inter as f64, (p_count + t_count) as f64),
        pointing_hit: argmax(&map.data).is_some_and(|i| truth.data[i]),
        energy_in_mask: energy_in_mask(map, truth),
    })
}

/// `Err` naming the sizes when the map and masks disagree or a data vector has the
/// wrong length.
fn check_sizes(map: &HeatMap, predicted: &Mask, truth: &Mask) -> Result<(), String> {
    let (mw, mh) = (map.width, map.height);
    for (name, w, h) in [
        ("predicted mask", predicted.width, predicted.height),
        ("truth mask", truth.width, truth.height),
    ] {
        if (w, h) != (mw, mh) {
            return Err(format!(
                "size mismatch: heat map is {mw}x{mh} but {name} is {w}x{h}"
            ));
        }
    }
    for (name, len) in [
        ("heat map", map.data.len()),
        ("predicted mask", predicted.data.len()),
        ("truth mask", truth.data.len()),
    ] {
        if len != mw * mh {
            return Err(format!(
                "{name} is {mw}x{mh} but holds {len} values, not {}",
                mw * mh
            ));
        }
    }
    Ok(())
}

/// `(|P ∩ T|, |P ∪ T|, |P|, |T|)`.
fn overlap(predicted: &Mask, truth: &Mask) -> (usize, usize, usize, usize) {
    predicted
        .data
        .iter()
        .zip(&truth.data)
        .fold((0, 0, 0, 0), |(i, u, p, t), (&a, &b)| {
            (
                i + usize::from(a && b),
                u + usize::from(a || b),
                p + usize::from(a),
                t + usize::from(b),
            )
        })
}

/// `num / den`, or 1 when `den` is 0 (two empty masks agree perfectly).
fn ratio_or_one(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        1.0
    }
}

/// Index of the largest non-NaN value, the first one on ties; `None` if there is none.
fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// `Σ_truth map / Σ map` over the clipped map; 0 when `Σ map` is 0.
fn energy_in_mask(map: &HeatMap, truth: &Mask) -> f64 {
    // Non-finite values would make both sums inf or NaN and hide every other pixel.
    let mass = |v: f32| {
        if v.is_finite() {
            f64::from(v.max(0.0))
        } else {
            0.0
        }
    };
    let (inside, total) =
        map.data
            .iter()
            .zip(&truth.data)
            .fold((0.0, 0.0), |(i, t), (&v, &in_truth)| {
                let m = mass(v);
                (if in_truth { i + m } else { i }, t + m)
            });
    if total > 0.0 {
        inside / total
    } else {
        0.0
    }
}

/// A mask from a grey image: pixels brighter than 127 are in.
pub fn mask_from_luma(img: &GrayImage) -> Mask {
    Mask {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.pixels().map(|p| p.0[0] > 127).collect(),
    }
}

/// Averages of [`Scores`] over a data set.
///
/// Feed it with [`ScoreStats::add`] (or `collect()` an iterator of `&Scores`); the means
/// are kept up to date after every `add`, so there is no separate finishing step and the
/// struct can be read or serialised at any time. With `n == 0` every mean is 0.
#[derive(Default, Debug, Clone, Serialize)]
pub struct ScoreStats {
    /// Number of scored samples.
    pub n: usize,
    /// Mean of [`Scores::iou`].
    pub mean_iou: f64,
    /// Mean of [`Scores::dice`].
    pub mean_dice: f64,
    /// Share of samples with [`Scores::pointing_hit`].
    pub pointing_rate: f64,
    /// Mean of [`Scores::energy_in_mask`].
    pub mean_energy_in_mask: f64,
}

impl ScoreStats {
    /// Adds one sample and updates every mean.
    pub fn add(&mut self, s: &Scores) {
        self.n += 1;
        let n = self.n as f64;
        // The running-mean update `m += (x − m) / n` needs no separate sums, so the
        // public fields are always the current means.
        let update = |mean: &mut f64, x: f64| *mean += (x - *mean) / n;
        update(&mut self.mean_iou, s.iou);
        update(&mut self.mean_dice, s.dice);
        update(&mut self.pointing_rate, f64::from(u8::from(s.pointing_hit)));
        update(&mut self.mean_energy_in_mask, s.energy_in_mask);
    }
}

impl<'a> FromIterator<&'a Scores> for ScoreStats {
    /// The stats of all the scores, as if each were [`ScoreStats::add`]ed in turn.
    fn from_iter<I: IntoIterator<Item = &'a Scores>>(iter: I) -> Self {
        let mut stats = ScoreStats::default();
        iter.into_iter().for_each(|s| stats.add(s));
        stats
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

    fn mask(width: usize, height: usize, data: &[u8]) -> Mask {
        Mask {
            width,
            height,
            data: data.iter().map(|&b| b != 0).collect(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn score_hand_computed_2x2() {
        // P = {0, 1}, T = {1, 2}: ∩ = 1, ∪ = 3. Argmax is pixel 1 (0.9), inside T.
        // Clipped mass 0.1 + 0.9 + 0.3 + 0 = 1.3, of which 0.9 + 0.3 = 1.2 inside T.
        let m = map(2, 2, &[0.1, 0.9, 0.3, -0.5]);
        let s =
            score(&m, &mask(2, 2, &[1, 1, 0, 0]), &mask(2, 2, &[0, 1, 1, 0])).expect("sizes match");
        assert!(close(s.iou, 1.0 / 3.0), "{s:?}");
        assert!(close(s.dice, 0.5), "{s:?}");
        assert!(s.pointing_hit);
        assert!(close(s.energy_in_mask, 1.2 / 1.3), "{s:?}");
    }

    #[test]
    fn score_empty_masks_agree_and_zero_map_has_no_energy() {
        let m = map(2, 1, &[0.0, 0.0]);
        let none = mask(2, 1, &[0, 0]);
        let s = score(&m, &none, &none).expect("sizes match");
        assert_eq!((s.iou, s.dice), (1.0, 1.0));
        assert!(!s.pointing_hit);
        assert_eq!(s.energy_in_mask, 0.0);

        let empty = score(&map(0, 0, &[]), &mask(0, 0, &[]), &mask(0, 0, &[]))
            .expect("zero-sized inputs are consistent");
        assert_eq!(
            (empty.iou, empty.dice, empty.pointing_hit),
            (1.0, 1.0, false)
        );
    }

    #[test]
    fn score_disjoint_masks() {
        let m = map(3, 1, &[1.0, 0.0, 3.0]);
        let s = score(&m, &mask(3, 1, &[1, 0, 0]), &mask(3, 1, &[0, 1, 0])).expect("ok");
        assert_eq!((s.iou, s.dice, s.pointing_hit), (0.0, 0.0, false));
        assert_eq!(s.energy_in_mask, 0.0);
    }

    #[test]
    fn pointing_ties_take_the_first_and_skip_nan() {
        let truth = mask(4, 1, &[0, 1, 0, 0]);
        let pred = mask(4, 1, &[0, 0, 0, 0]);
        let s = score(&map(4, 1, &[1.0, 1.0, 0.0, 0.0]), &pred, &truth).expect("ok");
        assert!(!s.pointing_hit);
        let s = score(&map(4, 1, &[f32::NAN, 1.0, 0.0, 0.5]), &pred, &truth).expect("ok");
        assert!(s.pointing_hit);
    }

    #[test]
    fn energy_ignores_non_finite() {
        let m = map(3, 1, &[f32::INFINITY, 1.0, 3.0]);
        let none = mask(3, 1, &[0, 0, 0]);
        let s = score(&m, &none, &mask(3, 1, &[1, 1, 0])).expect("ok");
        assert!(close(s.energy_in_mask, 0.25), "{s:?}");
    }

    #[test]
    fn score_size_errors_name_both_sizes() {
        let m = map(2, 2, &[0.0; 4]);
        let err = score(&m, &mask(2, 2, &[0; 4]), &mask(3, 2, &[0; 6])).expect_err("mismatch");
        assert!(err.contains("2x2") && err.contains("3x2"), "{err}");
        let err = score(&m, &mask(3, 1, &[0; 3]), &mask(2, 2, &[0; 4])).expect_err("mismatch");
        assert!(err.contains("2x2") && err.contains("3x1"), "{err}");
        let short = map(2, 2, &[0.0; 3]);
        let err = score(&short, &mask(2, 2, &[0; 4]), &mask(2, 2, &[0; 4])).expect_err("short");
        assert!(err.contains("heat map") && err.contains('3'), "{err}");
    }

    #[test]
    fn mask_from_luma_cuts_above_127() {
        let img = GrayImage::from_raw(3, 1, vec![127, 128, 0]).expect("3 pixels");
        let m = mask_from_luma(&img);
        assert_eq!((m.width, m.height), (3, 1));
        assert_eq!(m.data, vec![false, true, false]);
    }

    #[test]
    fn stats_average_and_rate() {
        let a = Scores {
            iou: 0.5,
            dice: 0.6,
            pointing_hit: true,
            energy_in_mask: 0.2,
        };
        let b = Scores {
            iou: 1.0,
            dice: 0.8,
            pointing_hit: false,
            energy_in_mask: 0.4,
        };
        let c = Scores { iou: 0.0, ..a };
        let stats: ScoreStats = [a, b, c].iter().collect();
        assert_eq!(stats.n, 3);
        assert!(close(stats.mean_iou, 0.5), "{stats:?}");
        assert!(close(stats.mean_dice, 2.0 / 3.0), "{stats:?}");
        assert!(close(stats.pointing_rate, 2.0 / 3.0), "{stats:?}");
        assert!(close(stats.mean_energy_in_mask, 0.8 / 3.0), "{stats:?}");

        let empty = ScoreStats::default();
        assert_eq!(
            (empty.n, empty.mean_iou, empty.pointing_rate),
            (0, 0.0, 0.0)
        );
    }

    #[test]
    fn stats_serialise_as_plain_means() {
        let mut stats = ScoreStats::default();
        stats.add(&Scores {
            iou: 1.0,
            dice: 1.0,
            pointing_hit: true,
            energy_in_mask: 0.5,
        });
        let json = serde_json::to_value(&stats).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({
                "n": 1,
                "mean_iou": 1.0,
                "mean_dice": 1.0,
                "pointing_rate": 1.0,
                "mean_energy_in_mask": 0.5,
            })
        );
    }
}
