//! The activation arena: every f32 value of the planned graph gets a fixed region of one
//! buffer, chosen from the values' lifetimes so that values alive at the same step never
//! share memory. A frame then writes each value into its region; the buffer is allocated at
//! the first frame and reused by every frame after it.
//!
//! Placement is greedy by size (largest first, each at the lowest offset that is free for its
//! whole lifetime), the usual heuristic for this interval-packing problem; the result is
//! checked pairwise before use, because the executor's unchecked slicing relies on it.

/// Regions are aligned to this many f32 (64 bytes, one cache line, one AVX-512 vector).
const ALIGN: usize = 16;

/// Where each value lives in the arena.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArenaPlan {
    /// Per slot: (offset, length) in f32 elements, for planned values.
    pub regions: Vec<Option<(usize, usize)>>,
    /// The arena's length in f32 elements.
    pub len: usize,
}

impl ArenaPlan {
    /// Places the values with `sizes[s] = Some(len)`, alive from step `live[s].0` through step
    /// `live[s].1` (inclusive). Returns an empty plan (nothing placed) if the placement fails
    /// its check, which would be a bug here; the executor then keeps every value as a tensor.
    pub(crate) fn new(sizes: &[Option<usize>], live: &[(usize, usize)]) -> ArenaPlan {
        let mut order: Vec<usize> = (0..sizes.len()).filter(|&s| sizes[s].is_some()).collect();
        // Largest first; ties by birth, so equal sizes stack in program order.
        order.sort_by_key(|&s| (std::cmp::Reverse(sizes[s].unwrap_or(0)), live[s].0));
        let mut regions: Vec<Option<(usize, usize)>> = vec![None; sizes.len()];
        let mut placed: Vec<usize> = Vec::with_capacity(order.len());
        let mut len = 0;
        let mut busy: Vec<(usize, usize)> = Vec::new();
        for &s in &order {
            let size = sizes[s].unwrap_or(0);
            busy.clear();
            for &p in &placed {
                if overlaps(live[s], live[p]) {
                    if let Some(r) = regions[p] {
                        busy.push(r);
                    }
                }
            }
            busy.sort_unstable();
            // The lowest aligned gap that holds `size`.
            let mut at = 0;
            for &(off, l) in &busy {
                if at + size <= off {
                    break;
                }
                at = at.max((off + l).div_ceil(ALIGN) * ALIGN);
            }
            regions[s] = Some((at, size));
            len = len.max(at + size);
            placed.push(s);
        }
        let plan = ArenaPlan { regions, len };
        if plan.is_sound(live) {
            plan
        } else {
            ArenaPlan {
                regions: vec![None; sizes.len()],
                len: 0,
            }
        }
    }

    /// No two values alive at a common step share an element.
    pub(crate) fn is_sound(&self, live: &[(usize, usize)]) -> bool {
        let placed: Vec<(usize, (usize, usize))> = self
            .regions
            .iter()
            .enumerate()
            .filter_map(|(s, r)| r.map(|r| (s, r)))
            .collect();
        for (i, &(s, (a, la))) in placed.iter().enumerate() {
            if a + la > self.len {
                return false;
            }
            for &(t, (b, lb)) in &placed[i + 1..] {
                let disjoint = a + la <= b || b + lb <= a || la == 0 || lb == 0;
                if overlaps(live[s], live[t]) && !disjoint {
                    return false;
                }
            }
        }
        true
    }
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::below;

    #[test]
    fn a_chain_reuses_two_buffers() {
        // v0 -> v1 -> v2 -> v3, each consumed by the next step only.
        let sizes = [Some(100), Some(100), Some(100), Some(100)];
        let live = [(0, 1), (1, 2), (2, 3), (3, 4)];
        let plan = ArenaPlan::new(&sizes, &live);
        assert!(plan.is_sound(&live));
        assert_eq!(plan.len, 112 + 100, "two aligned slots of 100");
    }

    #[test]
    fn random_lifetimes_are_packed_soundly_and_tightly() {
        let mut pick = below(99);
        for _ in 0..200 {
            let n = 1 + pick(60);
            let sizes: Vec<Option<usize>> =
                (0..n).map(|_| (pick(5) > 0).then(|| pick(5000))).collect();
            let live: Vec<(usize, usize)> = (0..n)
                .map(|_| {
                    let a = pick(40);
                    (a, a + pick(10))
                })
                .collect();
            let plan = ArenaPlan::new(&sizes, &live);
            assert!(plan.is_sound(&live));
            assert!(plan
                .regions
                .iter()
                .zip(&sizes)
                .all(|(r, s)| r.is_some() == s.is_some()));
            // Never more than everything side by side (with alignment), never less than the
            // largest set alive at one step.
            let sum: usize = sizes
                .iter()
                .flatten()
                .map(|s| s.div_ceil(ALIGN) * ALIGN)
                .sum();
            let peak = (0..50)
                .map(|t| {
                    (0..n)
                        .filter(|&s| live[s].0 <= t && t <= live[s].1)
                        .filter_map(|s| sizes[s])
                        .sum::<usize>()
                })
                .max()
                .unwrap_or(0);
            assert!(
                plan.len <= sum && plan.len >= peak,
                "{} not in {peak}..={sum}",
                plan.len
            );
        }
    }

    #[test]
    fn an_unsound_plan_is_detected() {
        let plan = ArenaPlan {
            regions: vec![Some((0, 10)), Some((5, 10))],
            len: 15,
        };
        assert!(!plan.is_sound(&[(0, 2), (1, 3)]));
        assert!(plan.is_sound(&[(0, 1), (2, 3)]));
    }
}
