//! Large, long-lived buffers (packed weights, the activation arena) on transparent huge pages.
//!
//! A frame streams every packed weight once (tens of MB for a ResNet-50) and walks an arena of
//! several MB: on 4 KiB pages that is one TLB miss per 4 KiB, thousands per frame, and the
//! hardware prefetchers stop at every page boundary. Linux backs anonymous memory with 2 MiB
//! pages when asked (`madvise(MADV_HUGEPAGE)`, the default `transparent_hugepage=madvise`
//! policy); the request must come before the memory is first touched.

/// Buffers smaller than one huge page gain nothing.
const HUGE: usize = 2 << 20;

/// `len` zeros, in memory the kernel is asked to back with huge pages (a hint: where it is
/// ignored, or off Linux, a plain zeroed vector).
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let bytes = len * std::mem::size_of::<f32>();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if bytes >= HUGE {
        let start = v.as_ptr() as usize;
        let lo = start.next_multiple_of(4096);
        let hi = (start + bytes) / 4096 * 4096;
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the vector's allocation (page-aligned inwards);
            // MADV_HUGEPAGE changes only how later page faults are served, never contents.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (bytes, HUGE);
    v.resize(len, 0.0);
    v
}
