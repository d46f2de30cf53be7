//! Asking the memory system for weights before a kernel reads them.
//!
//! A model's weights outgrow the caches (ResNet-50's are 100 MB), so every frame reads them
//! from memory once. A kernel that multiplies a block of weights against few positions (a
//! 7 × 7 map, a ViT's 197 tokens) reads the block much faster than memory delivers it and then
//! reuses it from cache, so the first pass over each block stalls while the hardware
//! prefetcher, which runs only a little ahead of a stream, catches up. Instead the driver hands
//! each kernel call the cache lines of a block it will read *later* (an [`Ahead`]), and the
//! kernel asks for them a few at a time as its loop runs (a [`Drip`]): memory streams steadily
//! under the products instead of in bursts between them.
//!
//! Measured on a Zen 5 host (AVX-512, 1 MB L2), whole frames alternating in one process with
//! the rule before (the next A panel asked for at once, nothing for B or the by-taps
//! kernel): ResNet-50 0.92× of the time at 1 thread and 0.91× at 2, ResNet-18 0.91× and
//! 0.90×, ViT-Tiny 0.96× and 0.97×, MobileNetV2 0.97× and 0.99×; with the AVX2 kernels
//! (`EDGEINFER_ISA=avx2`, 1 thread) 0.97×, 0.92×, 0.97× and 1.00×. By node (ResNet-18, 1
//! thread): its 3 × 3 layers at 7 × 7 1.25 → 1.03 ms.

use std::marker::PhantomData;

/// Cache lines a kernel call should ask for while it runs: `lines` lines from `at`.
#[derive(Debug, Clone, Copy)]
pub struct Ahead<'a> {
    at: *const f32,
    lines: usize,
    /// Into L2 rather than L1: a block read after the next kernel call (larger than L1).
    far: bool,
    data: PhantomData<&'a [f32]>,
}

/// Values per 64-byte cache line.
const LINE: usize = 16;

impl<'a> Ahead<'a> {
    /// Nothing to ask for.
    pub const NONE: Ahead<'static> = Ahead {
        at: std::ptr::null(),
        lines: 0,
        far: false,
        data: PhantomData,
    };

    /// `v`, read by the next kernel call: asked for into L1.
    pub fn near(v: &'a [f32]) -> Ahead<'a> {
        Ahead {
            at: v.as_ptr(),
            lines: v.len().div_ceil(LINE),
            far: false,
            data: PhantomData,
        }
    }

    /// `v`, read after the next kernel call (a whole block of weights): asked for into L2.
    pub fn far(v: &'a [f32]) -> Ahead<'a> {
        Ahead {
            far: true,
            ..Ahead::near(v)
        }
    }

    /// Share `t` of `parts` (consecutive lines), for one of `parts` calls that split the work.
    pub fn share(self, t: usize, parts: usize) -> Ahead<'a> {
        if parts == 0 {
            return Ahead { lines: 0, ..self };
        }
        let (l0, l1) = (t * self.lines / parts, (t + 1) * self.lines / parts);
        Ahead {
            at: self.at.wrapping_add(l0 * LINE),
            lines: l1.saturating_sub(l0),
            ..self
        }
    }

    /// Whether the lines go to L2 (see [`Ahead::far`]).
    pub fn is_far(&self) -> bool {
        self.far
    }

    /// Asks for every line at once (for a call without a [`Drip`] in its loop).
    pub fn all_now(self) {
        for i in 0..self.lines {
            fetch(self.at.wrapping_add(i * LINE), self.far);
        }
    }
}

/// Issues an [`Ahead`]'s lines over the `trips` trips of a kernel's loop: one line every
/// `trips / lines` trips, or several a trip when there are more lines than trips.
pub struct Drip {
    at: *const f32,
    left: usize,
    far: bool,
    next: usize,
    every: usize,
    per: usize,
}

impl Drip {
    /// Spreads `ahead` over a loop of `trips` trips.
    #[inline(always)]
    pub fn new(ahead: Ahead, trips: usize) -> Drip {
        let trips = trips.max(1);
        let lines = ahead.lines;
        Drip {
            at: ahead.at,
            left: lines,
            far: ahead.far,
            next: if lines == 0 { usize::MAX } else { 0 },
            every: (trips / lines.max(1)).max(1),
            per: lines.div_ceil(trips),
        }
    }

    /// Called at the top of trip `trip` (counting from 0): asks for this trip's lines, if any.
    #[inline(always)]
    pub fn tick(&mut self, trip: usize) {
        if trip == self.next {
            self.issue();
        }
    }

    // Inlined: a call inside a micro-kernel's loop would spill its accumulators (every vector
    // register is caller-saved).
    #[inline(always)]
    fn issue(&mut self) {
        let n = self.per.min(self.left);
        for _ in 0..n {
            fetch(self.at, self.far);
            self.at = self.at.wrapping_add(LINE);
        }
        self.left -= n;
        self.next = if self.left > 0 {
            self.next + self.every
        } else {
            usize::MAX
        };
    }
}

/// Asks for the cache line holding `p` (a hint: never faults, no effect on results).
#[inline(always)]
fn fetch(p: *const f32, far: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            if far {
                _mm_prefetch::<_MM_HINT_T1>(p.cast());
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, far);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares cover every line once, and a drip issues exactly its lines within the loop, for
    /// fewer and for more lines than trips.
    #[test]
    fn shares_and_drips_cover_every_line_once() {
        let v = vec![0f32; 1000];
        let all = Ahead::far(&v);
        assert_eq!(all.lines, 63);
        for parts in [1, 2, 7, 63, 100] {
            let mut at = v.as_ptr();
            let mut total = 0;
            for t in 0..parts {
                let s = all.share(t, parts);
                if s.lines > 0 {
                    assert_eq!(s.at, at);
                }
                at = at.wrapping_add(s.lines * LINE);
                total += s.lines;
                assert!(s.far);
            }
            assert_eq!(total, 63, "{parts} parts");
        }
        for trips in [1, 5, 62, 63, 64, 256] {
            let mut d = Drip::new(Ahead::near(&v), trips);
            for t in 0..trips {
                d.tick(t);
            }
            assert_eq!(d.left, 0, "{trips} trips");
            assert_eq!(d.at, v.as_ptr().wrapping_add(63 * LINE));
        }
        let mut none = Drip::new(Ahead::NONE, 10);
        (0..10).for_each(|t| none.tick(t));
        assert_eq!(none.left, 0);
    }
}
