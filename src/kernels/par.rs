//! Data parallelism for the kernels: `par_for(n, f)` runs `f(0..n)` over the threads of the
//! frame's [`SpinPool`] when one is installed on this thread, else over rayon's pool.
//!
//! Why our own pool: a frame is a chain of ~100 short parallel regions. rayon's idle workers
//! go to sleep between them, and waking them costs tens of microseconds each time (measured:
//! ~16 % of ViT-Tiny's samples in the scheduler with 2 threads). A `SpinPool`'s workers spin
//! while a frame is running and sleep only between frames.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rayon::prelude::*;

/// One parallel region: its items are claimed through `cursors`, so a worker that arrives late
/// finds nothing left and never calls `f` after the caller returned.
struct Job {
    /// Erased-lifetime pointer to the caller's closure; only called for claimed items, all
    /// of which finish before `par_for` returns.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    /// Participant `p` (the caller is 0, worker `k` is `k`) first claims the items of its own
    /// range `[p·n/parts, (p+1)·n/parts)` through `cursors[p]`, then helps with the other
    /// ranges. Consecutive regions that split their output alike then give each thread the
    /// part it wrote last time, where items claimed from one shared counter came out
    /// interleaved between the threads at random. 2 threads, frames alternating in one
    /// process: MobileNetV2 0.97x, ViT-Tiny 0.969x, ResNet-50 0.997x, ResNet-18 1.003x; with
    /// the host giving the second vCPU little time, MobileNetV2 0.85x, ViT-Tiny 0.91x,
    /// ResNet-50 0.955x.
    parts: usize,
    cursors: [Lone; MAX_PARTS],
    /// Items not yet done: each participant takes off the ones it ran once, when it finds
    /// nothing left to claim (not once per item: see [`Lone`]).
    pending: Lone,
    /// The first panic of an item, re-raised on the caller's thread once every item is done
    /// (a worker that died instead would leave the caller waiting forever).
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// An atomic alone on its cache lines (128 bytes: a line and the neighbour the hardware
/// prefetches with it). The range cursors shared one line, and every item decremented one
/// shared counter: each claim and each finished item moved a line between the two cores. Where
/// the host puts the two vCPUs on different core complexes (a line takes ~0.2 µs to cross, as
/// measured by ping-pong), a 3 × 3 depthwise layer of 192 × 28² alone ran 19.7 µs on 2
/// threads against 22.8 on one; with the atomics apart and one subtraction per participant,
/// 12.8–13.6 µs.
#[repr(align(128))]
struct Lone(AtomicUsize);

// SAFETY: `f` is Sync and is only called while the owning `par_for` waits for it.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

struct Shared {
    job: Mutex<(u64, Option<Arc<Job>>)>,
    wake: Condvar,
    /// While set (a frame is running), idle workers spin instead of sleeping.
    spinning: AtomicBool,
    /// Bumped for every job, read without the lock by spinning workers.
    epoch: AtomicUsize,
    stop: AtomicBool,
    /// Workers waiting on `wake` (changed under `job`'s lock): a job wakes them only when
    /// there are any, since `notify_all` is a system call even with nobody waiting.
    sleepers: AtomicUsize,
}

/// Worker threads for one executor's frames.
pub struct SpinPool {
    shared: Arc<Shared>,
    /// Finished jobs, reused once no worker holds them any more: a frame runs ~100 parallel
    /// regions and none of them should cost an allocation.
    spare: Mutex<Vec<Arc<Job>>>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl SpinPool {
    /// A pool of `threads` in all: the calling thread plus `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<SpinPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: Mutex::new((0, None)),
            wake: Condvar::new(),
            spinning: AtomicBool::new(false),
            epoch: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("edgeinfer-{i}"))
                    .spawn(move || worker(&sh, i))?,
            );
        }
        Ok(SpinPool {
            shared,
            spare: Mutex::new(Vec::new()),
            workers,
            threads,
        })
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `body` with this pool installed on the calling thread and its workers spinning.
    pub fn install<R>(self: &Arc<Self>, body: impl FnOnce() -> R) -> R {
        struct Guard(Option<Arc<SpinPool>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                CURRENT.with(|c| {
                    let pool = c.replace(self.0.take());
                    if let Some(p) = pool {
                        p.shared.spinning.store(false, Ordering::Relaxed);
                    }
                });
            }
        }
        let prev = CURRENT.with(|c| c.replace(Some(self.clone())));
        let _guard = Guard(prev);
        self.shared.spinning.store(true, Ordering::Relaxed);
        // Sleeping workers start spinning now rather than at the first job.
        {
            let _slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        body()
    }

    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: erases the closure's lifetime; every call of it happens before this
        // function returns (we wait for `pending` to reach zero), see `Job`.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let fresh = Job {
            f,
            n,
            parts: self.threads.clamp(1, MAX_PARTS),
            cursors: std::array::from_fn(|_| Lone(AtomicUsize::new(0))),
            pending: Lone(AtomicUsize::new(n)),
            panic: Mutex::new(None),
        };
        let reused = {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            // Unique (no worker still holds it): safe to overwrite.
            let at = spare.iter_mut().position(|j| Arc::get_mut(j).is_some());
            at.map(|i| spare.swap_remove(i))
        };
        let job = match reused {
            Some(mut j) => match Arc::get_mut(&mut j) {
                Some(slot) => {
                    *slot = fresh;
                    j
                }
                None => Arc::new(fresh),
            },
            None => Arc::new(fresh),
        };
        let sleepers = {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            slot.0 += 1;
            slot.1 = Some(job.clone());
            self.shared.epoch.store(slot.0 as usize, Ordering::Release);
            self.shared.sleepers.load(Ordering::Relaxed)
        };
        // Spinning workers see the epoch; only sleeping ones need the (system-call) wake-up.
        // Frames alternating in one process, 2 threads: MobileNetV2 0.986x / 0.995x, ViT-Tiny
        // 0.994x, ResNet-18 1.005x.
        if sleepers > 0 {
            self.shared.wake.notify_all();
        }
        work(&job, 0);
        while job.pending.0.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // Drop the shared reference to the closure before it goes out of scope.
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            slot.1 = None;
        }
        let panicked = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(payload) = panicked {
            std::panic::resume_unwind(payload);
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < 4 {
            spare.push(job);
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Ranges of a [`Job`] at most (participants beyond share theirs).
const MAX_PARTS: usize = 16;

/// Runs items of `job` on participant `id` until none is left unclaimed: its own range first,
/// then the others' in turn.
fn work(job: &Job, id: usize) {
    // Kernels called from inside an item run serially: the pool is already busy.
    let _inside = Inside::enter();
    let parts = job.parts;
    let mut r = 0;
    let mut done = 0;
    loop {
        let mut claimed = None;
        while r < parts {
            let range = (id + r) % parts;
            let (lo, hi) = (range * job.n / parts, (range + 1) * job.n / parts);
            let i = lo + job.cursors[range].0.fetch_add(1, Ordering::AcqRel);
            if i < hi {
                claimed = Some(i);
                break;
            }
            r += 1;
        }
        let Some(i) = claimed else {
            if done > 0 {
                job.pending.0.fetch_sub(done, Ordering::Release);
            }
            return;
        };
        // SAFETY: item i was claimed, so the caller is still waiting for it (see `Job`).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job.f)(i) }));
        if let Err(payload) = ran {
            job.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(payload);
        }
        done += 1;
    }
}

fn worker(sh: &Shared, id: usize) {
    let mut seen = 0usize;
    loop {
        // While a frame runs, wait for the next job by spinning: no sleep, no wake-up cost.
        // After a while, yield between checks so candle's own threads (rayon) get the core
        // when one of its ops runs.
        let mut spins = 0u32;
        while sh.spinning.load(Ordering::Relaxed)
            && sh.epoch.load(Ordering::Acquire) == seen
            && !sh.stop.load(Ordering::Relaxed)
        {
            spins = spins.saturating_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // A frame just ended: keep spinning a little before sleeping, so frames that follow
        // each other closely (a camera's backlog, a benchmark) do not pay a futex wake-up at
        // their first parallel region. Back-to-back frames, 2 threads, seven runs of each
        // build alternating: MobileNetV2 2.09 → 2.05 ms, ResNet-18 8.16 → 8.11 ms (medians).
        if linger(sh, seen) {
            continue;
        }
        let job = {
            let mut slot = sh.job.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if sh.stop.load(Ordering::Acquire) {
                    return;
                }
                if slot.0 as usize != seen {
                    seen = slot.0 as usize;
                    break slot.1.clone();
                }
                if sh.spinning.load(Ordering::Relaxed) {
                    break None;
                }
                // Between frames: sleep until a job or a frame arrives.
                sh.sleepers.fetch_add(1, Ordering::Relaxed);
                slot = sh.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                sh.sleepers.fetch_sub(1, Ordering::Relaxed);
            }
        };
        if let Some(job) = job {
            work(&job, id);
        }
    }
}

/// How long an idle worker keeps spinning after a frame before it sleeps.
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

/// Spins while no frame runs and no job comes, for up to [`LINGER`]; true when a frame
/// started meanwhile (the caller goes back to spinning on jobs).
fn linger(sh: &Shared, seen: usize) -> bool {
    if sh.spinning.load(Ordering::Relaxed) {
        return false;
    }
    let start = std::time::Instant::now();
    let mut spins = 0u32;
    while !sh.spinning.load(Ordering::Relaxed)
        && sh.epoch.load(Ordering::Acquire) == seen
        && !sh.stop.load(Ordering::Relaxed)
    {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && start.elapsed() > LINGER {
            break;
        }
    }
    sh.spinning.load(Ordering::Relaxed)
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<SpinPool>>> = const { RefCell::new(None) };
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as running a parallel item until dropped.
struct Inside(bool);

impl Inside {
    fn enter() -> Inside {
        Inside(INSIDE.with(|c| c.replace(true)))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(self.0));
    }
}

/// Threads the next `par_for` on this thread will use.
pub fn current_threads() -> usize {
    CURRENT
        .with(|c| c.borrow().as_ref().map(|p| p.threads))
        .unwrap_or_else(rayon::current_num_threads)
}

/// Runs `f(i)` for every `i < n`, in parallel when `n > 1`.
pub fn par_for(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || INSIDE.with(|c| c.get()) {
        (0..n).for_each(f);
        return;
    }
    let pool = CURRENT.with(|c| c.borrow().clone());
    match pool {
        Some(p) if p.threads > 1 => p.run(n, &f),
        Some(_) => (0..n).for_each(f),
        // A reference: rayon wants the closure Send, and `&f` is (f is Sync).
        None => (0..n).into_par_iter().for_each(|i| {
            let _inside = Inside::enter();
            f(i)
        }),
    }
}

/// `par_for` over the `chunk`-sized pieces of `data` (the last may be shorter).
pub fn par_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = data.len();
    let ptr = SendPtr(data.as_mut_ptr());
    par_for(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunks are disjoint and inside `data`, which outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), end - start) };
        f(i, piece)
    });
}

/// A raw pointer that may cross threads, for tasks that each write their own disjoint part
/// of one buffer (the caller's SAFETY comment says why the parts are disjoint).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: used only to hand disjoint chunks to tasks.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// A method, so closures capture the whole (Sync) wrapper rather than the raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking item reaches the caller as a panic (after every other item ran), instead
    /// of killing a worker and leaving the caller waiting; the pool keeps working after it.
    #[test]
    fn a_panicking_item_panics_the_caller_and_the_pool_survives() {
        let pool = Arc::new(SpinPool::new(2).unwrap());
        let done = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                par_for(64, |i| {
                    if i == 17 {
                        panic!("item 17");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
        }));
        let msg = r.expect_err("the panic reaches the caller");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"item 17"));
        assert_eq!(done.load(Ordering::Relaxed), 63);
        let hits = AtomicUsize::new(0);
        pool.install(|| {
            par_for(100, |_| {
                hits.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(hits.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn every_item_runs_once_on_the_pool_and_without_it() {
        let pool = Arc::new(SpinPool::new(3).unwrap());
        for round in 0..200 {
            assert!(each_item_once(&pool, round % 37), "round {round}");
        }
        let mut v = vec![0u32; 1000];
        pool.install(|| {
            par_chunks_mut(&mut v, 64, |i, c| c.iter_mut().for_each(|x| *x = i as u32))
        });
        assert!(v.iter().enumerate().all(|(j, &x)| x as usize == j / 64));
        par_chunks_mut(&mut v, 100, |i, c| {
            c.iter_mut().for_each(|x| *x = i as u32 + 1)
        });
        assert!(v
            .iter()
            .enumerate()
            .all(|(j, &x)| x as usize == j / 100 + 1));
        assert_eq!(pool.install(current_threads), 3);
    }

    /// More threads than ranges: the extra workers share ranges, and every item still runs once.
    #[test]
    fn more_threads_than_ranges_run_every_item_once() {
        let pool = Arc::new(SpinPool::new(MAX_PARTS + 3).unwrap());
        for n in [0, 1, 5, MAX_PARTS + 1, 3 * MAX_PARTS + 7] {
            assert!(each_item_once(&pool, n), "n = {n}");
        }
    }

    /// Whether `par_for(n)` on `pool` ran each item exactly once.
    fn each_item_once(pool: &Arc<SpinPool>, n: usize) -> bool {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        pool.install(|| {
            par_for(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            })
        });
        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1)
    }
}
