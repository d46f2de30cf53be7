//! The map arithmetic of each method, on host `f32` slices. Each returns the raw map at the
//! tapped resolution, before ReLU and normalisation (the form the reference fixtures store).

use super::HeatMap;

/// A `[C, h, w]` feature map, channel-major (NCHW without the batch).
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    /// `C × h × w` values.
    pub data: &'a [f32],
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl Features<'_> {
    fn plane(&self) -> usize {
        self.height * self.width
    }

    fn channel(&self, c: usize) -> &[f32] {
        &self.data[c * self.plane()..(c + 1) * self.plane()]
    }

    fn map(&self, data: Vec<f32>) -> HeatMap {
        HeatMap {
            width: self.width,
            height: self.height,
            data,
        }
    }
}

/// Σ_c weights[c] · F[c]: the CAM of one class (weights = its row of the linear layer), and
/// Grad-CAM's combination (weights = spatially averaged gradients).
pub fn weighted_sum(f: Features<'_>, weights: &[f32]) -> HeatMap {
    let mut out = vec![0f32; f.plane()];
    for (c, &w) in weights.iter().enumerate().take(f.channels) {
        if w == 0.0 {
            continue;
        }
        for (o, &x) in out.iter_mut().zip(f.channel(c)) {
            *o += w * x;
        }
    }
    f.map(out)
}

/// Grad-CAM's channel weights: each channel's gradient averaged over the map.
pub fn mean_per_channel(grads: Features<'_>) -> Vec<f32> {
    let n = grads.plane().max(1) as f32;
    (0..grads.channels)
        .map(|c| grads.channel(c).iter().sum::<f32>() / n)
        .collect()
}

/// Eigen-CAM: the feature map projected on its first principal component. The `h·w × C`
/// matrix of positions is centred per channel, as pytorch-grad-cam does; its projection on
/// the top right-singular vector v₁ is X·v₁ = σ₁u₁. We find u₁ (or v₁) by power iteration on
/// whichever Gram matrix is smaller (`hw × hw` or `C × C`), so a 1280-channel 7 × 7 map costs
/// 49² · 1280 multiply-adds, not 1280² · 49.
///
/// A singular vector's sign is arbitrary; we orient the projection to agree with the mean
/// activation over channels (hot where the features are strong), which is what a viewer
/// expects. pytorch-grad-cam leaves the sign to LAPACK, so compare up to sign.
pub fn eigen_cam(f: Features<'_>) -> HeatMap {
    let (n, c) = (f.plane(), f.channels);
    if n == 0 || c == 0 {
        return f.map(vec![0.0; n]);
    }
    // Centred X, channel-major like the features (c planes of n positions).
    let mut x = f.data[..n * c].to_vec();
    for plane in x.chunks_exact_mut(n) {
        let mean = (plane.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
        plane.iter_mut().for_each(|v| *v -= mean);
    }
    let projection: Vec<f32> = if n <= c {
        // G = X Xᵀ (n × n) as a sum of one rank-1 update per channel (contiguous rows the
        // compiler vectorises); its top eigenvector is u₁, and X·v₁ = σ₁u₁.
        let mut g = vec![0f32; n * n];
        for plane in x.chunks_exact(n) {
            rank1(&mut g, plane);
        }
        let (u, lambda) = top_eigenvector(&g, n);
        let s = lambda.max(0.0).sqrt();
        u.iter().map(|v| v * s).collect()
    } else {
        // Cᵀ = Xᵀ X (c × c) from one rank-1 update per position; its top eigenvector is v₁.
        let mut g = vec![0f32; c * c];
        let mut column = vec![0f32; c];
        for p in 0..n {
            for (ch, v) in column.iter_mut().enumerate() {
                *v = x[ch * n + p];
            }
            rank1(&mut g, &column);
        }
        let (v, _) = top_eigenvector(&g, c);
        let mut proj = vec![0f32; n];
        for (plane, &vk) in x.chunks_exact(n).zip(&v) {
            for (o, &xv) in proj.iter_mut().zip(plane) {
                *o += vk * xv;
            }
        }
        proj
    };
    // Orient: positive correlation with the channel-mean activation.
    let mut mean_act = vec![0f64; n];
    for plane in f.data[..n * c].chunks_exact(n) {
        for (m, &v) in mean_act.iter_mut().zip(plane) {
            *m += v as f64;
        }
    }
    let m = mean_act.iter().sum::<f64>() / n as f64;
    let agree: f64 = projection
        .iter()
        .zip(&mean_act)
        .map(|(&p, &a)| p as f64 * (a - m))
        .sum();
    let sign = if agree < 0.0 { -1.0 } else { 1.0 };
    f.map(projection.iter().map(|&v| sign * v).collect())
}

/// g += v vᵀ.
fn rank1(g: &mut [f32], v: &[f32]) {
    let n = v.len();
    for (row, &vi) in g.chunks_exact_mut(n).zip(v) {
        if vi == 0.0 {
            continue;
        }
        for (gj, &vj) in row.iter_mut().zip(v) {
            *gj += vi * vj;
        }
    }
}

/// The unit eigenvector of the largest eigenvalue of the symmetric positive semi-definite
/// `n × n` matrix `a`, and that eigenvalue, by power iteration; stops when the vector moves
/// less than 1e-6 (far below what a heat map can show) or after 1000 steps.
fn top_eigenvector(a: &[f32], n: usize) -> (Vec<f32>, f32) {
    // A start vector with a component along every direction a real map could take.
    let mut v: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.618).fract()).collect();
    normalise(&mut v);
    let mut w = vec![0f32; n];
    let mut lambda = 0.0;
    for _ in 0..1000 {
        for (wi, row) in w.iter_mut().zip(a.chunks_exact(n)) {
            *wi = row.iter().zip(&v).map(|(x, y)| x * y).sum();
        }
        lambda = w.iter().zip(&v).map(|(x, y)| x * y).sum();
        if normalise(&mut w) == 0.0 {
            return (v, 0.0);
        }
        let moved: f32 = w.iter().zip(&v).map(|(x, y)| (x - y) * (x - y)).sum();
        std::mem::swap(&mut v, &mut w);
        if moved < 1e-12 {
            break;
        }
    }
    (v, lambda)
}

fn normalise(v: &mut [f32]) -> f32 {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    norm
}

/// How the heads of one attention layer are fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadFusion {
    /// Mean over heads (the paper's choice).
    #[default]
    Mean,
    /// Maximum over heads.
    Max,
    /// Minimum over heads.
    Min,
}

impl std::str::FromStr for HeadFusion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(HeadFusion::Mean),
            "max" => Ok(HeadFusion::Max),
            "min" => Ok(HeadFusion::Min),
            _ => Err(format!("unknown head fusion '{s}' (mean, max, min)")),
        }
    }
}

/// Attention rollout (Abnar & Zuidema 2020) for the class token: per layer, fuse the heads,
/// zero the weakest `discard` fraction of links (never the class token's link to itself), add
/// the residual identity, renormalise rows, and multiply the layers; the map is the class
/// token's row over the patches, divided by its maximum.
///
/// Only the class token's row of `A_L ⋯ A_1` is needed, so we carry a row vector down from the
/// last layer (`r ← r·A_l`): `L·T²` multiply-adds instead of `L·T³`.
///
/// `layers[l]` is `[heads, T, T]`, row-major; `grid` is the patch grid (rows × cols = T − 1).
pub fn rollout(
    layers: &[&[f32]],
    heads: usize,
    tokens: usize,
    grid: (usize, usize),
    fusion: HeadFusion,
    discard: f32,
) -> HeatMap {
    let t = tokens;
    let mut r = vec![0f64; t];
    r[0] = 1.0;
    let mut fused = vec![0f32; t * t];
    let mut next = vec![0f64; t];
    for layer in layers.iter().rev() {
        fuse_heads(layer, heads, t, fusion, &mut fused);
        if discard > 0.0 {
            discard_weakest(&mut fused, discard);
        }
        // a = (fused + I) / 2, rows renormalised; the ½ cancels in the renormalisation.
        next.iter_mut().for_each(|x| *x = 0.0);
        for (i, &ri) in r.iter().enumerate() {
            if ri == 0.0 {
                continue;
            }
            let row = &fused[i * t..(i + 1) * t];
            let sum = row.iter().map(|&v| v as f64).sum::<f64>() + 1.0;
            let s = ri / sum;
            for (n, &v) in next.iter_mut().zip(row) {
                *n += s * v as f64;
            }
            next[i] += s;
        }
        std::mem::swap(&mut r, &mut next);
    }
    let patches = &r[1..];
    let max = patches.iter().cloned().fold(f64::MIN, f64::max);
    let data = patches
        .iter()
        .map(|&v| if max > 0.0 { (v / max) as f32 } else { 0.0 })
        .collect();
    HeatMap {
        width: grid.1,
        height: grid.0,
        data,
    }
}

fn fuse_heads(layer: &[f32], heads: usize, t: usize, fusion: HeadFusion, out: &mut [f32]) {
    let tt = t * t;
    out.copy_from_slice(&layer[..tt]);
    for h in 1..heads {
        let src = &layer[h * tt..(h + 1) * tt];
        for (o, &v) in out.iter_mut().zip(src) {
            *o = match fusion {
                HeadFusion::Mean => *o + v,
                HeadFusion::Max => o.max(v),
                HeadFusion::Min => o.min(v),
            };
        }
    }
    if fusion == HeadFusion::Mean {
        let inv = 1.0 / heads as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Zeroes the `⌊ratio·T²⌋` smallest entries (ties broken by position, as a stable sort would),
/// except entry 0: the class token attending to itself.
fn discard_weakest(m: &mut [f32], ratio: f32) {
    // A ratio ≥ 1 drops every link but the class token's own; a negative one drops none.
    let k = (((m.len() as f64) * ratio as f64) as usize).min(m.len());
    if k == 0 {
        return;
    }
    let mut order: Vec<u32> = (0..m.len() as u32).collect();
    let key = |i: &u32| (m[*i as usize], *i);
    order.select_nth_unstable_by(k - 1, |a, b| {
        let (va, ia) = key(a);
        let (vb, ib) = key(b);
        va.total_cmp(&vb).then(ia.cmp(&ib))
    });
    for &i in &order[..k] {
        if i != 0 {
            m[i as usize] = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(data: &[f32], c: usize, h: usize, w: usize) -> Features<'_> {
        Features {
            data,
            channels: c,
            height: h,
            width: w,
        }
    }

    #[test]
    fn weighted_sum_combines_channels() {
        let data = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        let m = weighted_sum(feats(&data, 2, 2, 2), &[1.0, -0.5]);
        assert_eq!(m.data, vec![-4.0, -8.0, -12.0, -16.0]);
        assert_eq!((m.width, m.height), (2, 2));
    }

    #[test]
    fn eigen_cam_finds_the_dominant_pattern_through_both_gram_forms() {
        // Channels are multiples of one spatial pattern plus tiny noise: the first principal
        // component is that pattern (centred), oriented to the mean activation.
        let pattern = [0.0f32, 1.0, 4.0, 9.0, 1.0, 0.0];
        for channels in [3usize, 12] {
            let mut data = Vec::new();
            for c in 0..channels {
                let a = 1.0 + c as f32;
                data.extend(
                    pattern
                        .iter()
                        .enumerate()
                        .map(|(i, p)| a * p + 1e-3 * ((i * 7 + c * 3) % 5) as f32),
                );
            }
            let m = eigen_cam(feats(&data, channels, 2, 3));
            let mean = pattern.iter().sum::<f32>() / 6.0;
            let centred: Vec<f32> = pattern.iter().map(|p| p - mean).collect();
            let dot: f32 = m.data.iter().zip(&centred).map(|(a, b)| a * b).sum();
            let na: f32 = m.data.iter().map(|a| a * a).sum::<f32>().sqrt();
            let nb: f32 = centred.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!(
                dot / (na * nb) > 0.9999,
                "channels {channels}: {:?}",
                m.data
            );
        }
    }

    fn numpy_rollout(layers: &[Vec<f32>], heads: usize, t: usize, discard: f32) -> Vec<f64> {
        // The reference algorithm, literally: full matrices, result = a @ result.
        let mut result: Vec<f64> = (0..t * t)
            .map(|i| if i / t == i % t { 1.0 } else { 0.0 })
            .collect();
        for layer in layers {
            let mut fused = vec![0f32; t * t];
            fuse_heads(layer, heads, t, HeadFusion::Mean, &mut fused);
            if discard > 0.0 {
                discard_weakest(&mut fused, discard);
            }
            let mut a: Vec<f64> = fused.iter().map(|&v| v as f64).collect();
            for i in 0..t {
                a[i * t + i] += 1.0;
                let s: f64 = a[i * t..(i + 1) * t].iter().map(|v| v / 2.0).sum();
                for j in 0..t {
                    a[i * t + j] = a[i * t + j] / 2.0 / s;
                }
            }
            let mut next = vec![0f64; t * t];
            for i in 0..t {
                for k in 0..t {
                    for j in 0..t {
                        next[i * t + j] += a[i * t + k] * result[k * t + j];
                    }
                }
            }
            result = next;
        }
        let row = &result[1..t];
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        row.iter().map(|v| v / max).collect()
    }

    #[test]
    fn rollout_row_vector_form_equals_the_full_matrix_product() {
        let (heads, t) = (2, 5);
        let mut seed = 7u32;
        let mut rand = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32
        };
        let layers: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                let mut m: Vec<f32> = (0..heads * t * t).map(|_| rand()).collect();
                for row in m.chunks_mut(t) {
                    let s: f32 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= s);
                }
                m
            })
            .collect();
        let refs: Vec<&[f32]> = layers.iter().map(|l| l.as_slice()).collect();
        for discard in [0.0, 0.5] {
            let got = rollout(&refs, heads, t, (2, 2), HeadFusion::Mean, discard);
            let want = numpy_rollout(&layers, heads, t, discard);
            for (g, w) in got.data.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6,
                    "discard {discard}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn rollout_with_out_of_range_discard_ratios_does_not_panic() {
        let layer = vec![0.25f32; 2 * 5 * 5];
        for discard in [1.0, 7.5, -1.0, f32::NAN] {
            let m = rollout(&[&layer], 2, 5, (2, 2), HeadFusion::Max, discard);
            assert_eq!(m.data.len(), 4);
            assert!(
                m.data.iter().all(|v| v.is_finite()),
                "{discard}: {:?}",
                m.data
            );
        }
    }
}
