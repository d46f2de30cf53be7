//! The model-variant ladder: most accurate variant first, lighter ones after it. When the
//! rolling p95 of the variant in use does not fit the budget, frames move one step down; a
//! heavier variant is probed now and then, and frames move back up once its estimate fits with
//! a margin (hysteresis), so the runtime does not flap between two variants.

use serde::Serialize;

use super::Rolling;

/// When to switch variants.
#[derive(Debug, Clone)]
pub struct LadderOptions {
    /// Switch down when the current variant's p95 exceeds this fraction of the budget (the
    /// rest is left for the wait between capture and the engine). Default 0.9.
    pub switch_at: f64,
    /// Switch back up only when the heavier variant's p95 × (1 + hysteresis) fits. Default 0.2.
    pub hysteresis: f64,
    /// Latencies kept per variant. Default 30.
    pub window: usize,
    /// Frames a variant must have run before its p95 can move it down. Default 5.
    pub min_samples: usize,
    /// While on a lighter variant, run one frame in this many on the next heavier one to see
    /// whether it fits again. Default 30; 0 never probes (the ladder then only goes down).
    pub probe_every: u64,
    /// Probes a heavier variant needs before it can be chosen again: the slowest of its last
    /// this many probes must fit with the hysteresis margin. Default 3.
    pub probe_samples: usize,
}

impl Default for LadderOptions {
    fn default() -> Self {
        LadderOptions {
            switch_at: 0.9,
            hysteresis: 0.2,
            window: 30,
            min_samples: 5,
            probe_every: 30,
            probe_samples: 3,
        }
    }
}

/// A change of variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Switch {
    /// Variant index before.
    pub from: usize,
    /// Variant index after.
    pub to: usize,
    /// The estimate (ms) that decided it: the rolling p95 of `from` when going down, the
    /// slowest of `to`'s last probes when going up.
    pub p95_ms: f64,
}

/// Which variant runs the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Variant index (0 = most accurate).
    pub variant: usize,
    /// True when this frame probes a heavier variant than the current one.
    pub probe: bool,
}

/// The ladder's state.
#[derive(Debug, Clone)]
pub struct Ladder {
    budget_ms: f64,
    options: LadderOptions,
    current: usize,
    /// Latencies of frames each variant ran while in use.
    windows: Vec<Rolling>,
    /// The last few probes of each variant (recent evidence only: a variant that was slow
    /// for a while must not need a window's worth of fast probes to come back).
    probes: Vec<Rolling>,
    since_probe: u64,
}

impl Ladder {
    /// A ladder over `variants` variants (most accurate first) for a frame budget in ms.
    pub fn new(variants: usize, budget_ms: f64, options: LadderOptions) -> Self {
        Ladder {
            budget_ms,
            current: 0,
            windows: (0..variants.max(1))
                .map(|_| Rolling::new(options.window))
                .collect(),
            probes: (0..variants.max(1))
                .map(|_| Rolling::new(options.probe_samples))
                .collect(),
            since_probe: 0,
            options,
        }
    }

    /// The variant in use.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The rolling p95 (ms) of a variant, when it has samples.
    pub fn p95(&self, variant: usize) -> Option<f64> {
        self.windows.get(variant)?.quantile(0.95)
    }

    /// The rolling median (ms) of a variant, when it has samples.
    pub fn median(&self, variant: usize) -> Option<f64> {
        self.windows.get(variant)?.quantile(0.5)
    }

    fn limit(&self) -> f64 {
        self.budget_ms * self.options.switch_at
    }

    /// Chooses the variant for the next frame.
    pub fn pick(&mut self) -> Pick {
        if self.current > 0 && self.options.probe_every > 0 {
            self.since_probe += 1;
            if self.since_probe >= self.options.probe_every {
                self.since_probe = 0;
                return Pick {
                    variant: self.current - 1,
                    probe: true,
                };
            }
        }
        Pick {
            variant: self.current,
            probe: false,
        }
    }

    /// Records how long a frame took on `variant` (ms, processing only); returns the switch
    /// it caused, if any.
    pub fn record(&mut self, variant: usize, ms: f64) -> Option<Switch> {
        let cur = self.current;
        if variant < cur {
            self.probes.get_mut(variant)?.push(ms);
        } else {
            self.windows.get_mut(variant)?.push(ms);
        }
        let limit = self.limit();
        if variant == cur
            && cur + 1 < self.windows.len()
            && self.windows[cur].count() >= self.options.min_samples
        {
            if let Some(p) = self.p95(cur).filter(|&p| p > limit) {
                // What made this variant too slow may pass; only probes taken from now on
                // can bring it back.
                self.windows[cur].clear();
                self.probes[cur].clear();
                self.current = cur + 1;
                self.since_probe = 0;
                return Some(Switch {
                    from: cur,
                    to: cur + 1,
                    p95_ms: p,
                });
            }
        }
        let up = cur.checked_sub(1);
        if let Some(up) = up.filter(|&u| self.probes[u].count() >= self.options.probe_samples) {
            if let Some(p) = self.probes[up]
                .quantile(1.0)
                .filter(|&p| p * (1.0 + self.options.hysteresis) <= limit)
            {
                // The probes are the variant's record from here on.
                let w = &mut self.windows[up];
                w.clear();
                for _ in 0..self.options.probe_samples {
                    w.push(p);
                }
                self.probes[up].clear();
                self.current = up;
                self.since_probe = 0;
                // The lighter variant's record stays: it is the first step down next time.
                return Some(Switch {
                    from: cur,
                    to: cur - 1,
                    p95_ms: p,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LadderOptions {
        LadderOptions {
            probe_every: 4,
            ..LadderOptions::default()
        }
    }

    /// Drives the ladder with a latency per variant that the closure decides, for `n` frames;
    /// returns the variant of each frame.
    fn drive(l: &mut Ladder, n: usize, ms: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let p = l.pick();
                l.record(p.variant, ms(p.variant));
                p.variant
            })
            .collect()
    }

    #[test]
    fn goes_down_when_slow_and_back_when_probes_fit() {
        let mut l = Ladder::new(3, 50.0, opts());
        // Heavy too slow (60 > 45), middle fits.
        let v = drive(&mut l, 12, |v| [60.0, 30.0, 10.0][v]);
        assert_eq!(&v[..5], &[0; 5]);
        assert_eq!(l.current(), 1);
        // Middle fits, heavy probes still slow: stays on 1, probing 0 every 4th frame.
        let v = drive(&mut l, 20, |v| [60.0, 30.0, 10.0][v]);
        assert!(v.iter().all(|&x| x <= 1) && v.contains(&0));
        assert_eq!(l.current(), 1);
        // The heavy one recovers: three probes later it is back.
        drive(&mut l, 16, |v| [20.0, 30.0, 10.0][v]);
        assert_eq!(l.current(), 0);
    }

    #[test]
    fn hysteresis_keeps_a_borderline_variant_away() {
        let mut l = Ladder::new(2, 50.0, opts());
        drive(&mut l, 6, |v| [60.0, 10.0][v]);
        assert_eq!(l.current(), 1);
        // 40 ms fits 45 but not with 20 % margin (48 > 45): never returns.
        drive(&mut l, 40, |v| [40.0, 10.0][v]);
        assert_eq!(l.current(), 1);
    }

    #[test]
    fn the_lightest_variant_stays_even_when_slow() {
        let mut l = Ladder::new(2, 50.0, opts());
        drive(&mut l, 30, |_| 80.0);
        assert_eq!(l.current(), 1);
    }
}
