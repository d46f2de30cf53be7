//! Rolling windows of recent latencies and bounded latency histograms.

/// The last `len` samples, for estimates that must follow a change quickly (a variant that
/// got slower, a method whose cost grew).
#[derive(Debug, Clone)]
pub struct Rolling {
    samples: Vec<f64>,
    next: usize,
    len: usize,
}

impl Rolling {
    /// A window of the last `len` samples (at least one).
    pub fn new(len: usize) -> Self {
        Rolling {
            samples: Vec::with_capacity(len.max(1)),
            next: 0,
            len: len.max(1),
        }
    }

    /// Adds a sample, evicting the oldest when full.
    pub fn push(&mut self, v: f64) {
        if self.samples.len() < self.len {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % self.len;
    }

    /// Samples held.
    pub fn count(&self) -> usize {
        self.samples.len()
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        self.samples.clear();
        self.next = 0;
    }

    /// The `q` quantile (0..=1, nearest rank) of the window; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
        Some(s[i])
    }
}

/// Latencies of a whole run in bounded memory: log-spaced buckets 1 % wide from 1 µs to
/// ~30 min, so a day-long soak test costs the same few kilobytes as a short run and every
/// quantile is within 1 % of the exact one.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    max: f64,
}

const MIN_MS: f64 = 1e-3;
const GROWTH: f64 = 1.01;
const BUCKETS: usize = 2200;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            n: 0,
            sum: 0.0,
            max: 0.0,
        }
    }
}

impl Histogram {
    /// Adds one latency in milliseconds.
    pub fn add(&mut self, ms: f64) {
        let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
        let b = if ms <= MIN_MS {
            0
        } else {
            ((ms / MIN_MS).ln() / GROWTH.ln()).ceil() as usize
        };
        self.counts[b.min(BUCKETS - 1)] += 1;
        self.n += 1;
        self.sum += ms;
        self.max = self.max.max(ms);
    }

    /// Samples added.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Mean, or `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The `q` quantile (nearest rank; the bucket's upper edge, capped at the maximum seen).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((self.n as f64 * q).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let edge = MIN_MS * GROWTH.powi(b as i32);
                return Some(edge.min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_forgets_old_samples() {
        let mut r = Rolling::new(4);
        for v in [100.0, 100.0, 100.0, 100.0, 1.0, 2.0, 3.0, 4.0] {
            r.push(v);
        }
        assert_eq!(r.quantile(1.0), Some(4.0));
        assert_eq!(r.quantile(0.5), Some(2.0));
        r.clear();
        assert_eq!(r.quantile(0.5), None);
    }

    #[test]
    fn histogram_quantiles_are_within_one_percent() {
        let mut h = Histogram::default();
        let vals: Vec<f64> = (1..=1000).map(|i| i as f64 * 0.37).collect();
        for &v in &vals {
            h.add(v);
        }
        for q in [0.5, 0.95, 0.99] {
            let exact = vals[((vals.len() as f64 * q).ceil() as usize) - 1];
            let got = h.quantile(q).unwrap();
            assert!(
                (got - exact).abs() <= exact * 0.011,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(370.0));
    }
}
