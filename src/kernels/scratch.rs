//! Per-thread scratch buffers that outlive a frame, so kernels that need a temporary (a packed
//! operand, a transformed tile row, a phase-split plane) take one that the previous frame
//! already grew instead of asking the allocator (and the kernel, for fresh pages) again.
//!
//! `take(len)` hands out a buffer of `len` values with unspecified contents; `give` returns
//! it. Nested takes get distinct buffers. A buffer that is never given back is simply freed.

use std::cell::RefCell;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// At most this many idle buffers are kept per thread (a kernel nests a handful at most).
const KEEP: usize = 16;

/// A buffer of `len` values from this thread's pool. Its contents are whatever the last user
/// left (zero when new): callers that need zeros fill it.
pub fn take(len: usize) -> Vec<f32> {
    let found = FREE.with(|free| {
        let mut free = free.borrow_mut();
        // The smallest buffer that fits, else the largest (grown below): big buffers stay
        // with the big users, and the pool converges on the frame's needs.
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let pick = fit.or_else(|| {
            free.iter()
                .enumerate()
                .max_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
        });
        pick.map(|i| free.swap_remove(i))
    });
    let mut v = found.unwrap_or_default();
    if v.capacity() < len {
        v.reserve_exact(len - v.len());
    }
    // SAFETY-free resize: growing writes zeros only into the new tail; shrinking drops nothing
    // but plain floats.
    v.resize(len, 0.0);
    v
}

/// Returns a buffer from [`take`] to this thread's pool.
pub fn give(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEEP {
            free.push(v);
        } else if let Some(small) = free.iter_mut().min_by_key(|b| b.capacity()) {
            // Keep the bigger of the two: it is the one that would be expensive to regrow.
            if small.capacity() < v.capacity() {
                *small = v;
            }
        }
    });
}

/// Runs `f` with a scratch buffer of `len` values (contents unspecified), then returns it.
pub fn with<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = take(len);
    let r = f(&mut v);
    give(v);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_nested_takes_are_distinct() {
        let a = take(1000);
        let pa = a.as_ptr();
        give(a);
        let b = take(500);
        assert_eq!(b.as_ptr(), pa, "a fitting idle buffer is reused");
        let c = take(500);
        assert_ne!(c.as_ptr(), b.as_ptr());
        assert_eq!((b.len(), c.len()), (500, 500));
        give(b);
        give(c);
        // A bigger request grows an idle buffer rather than leaving it behind.
        let d = take(4000);
        assert_eq!(d.len(), 4000);
        give(d);
        with(10, |s| assert_eq!(s.len(), 10));
    }
}
