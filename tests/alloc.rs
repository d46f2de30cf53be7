//! The planned executor's promise: after the first frame, a frame allocates no activation
//! memory. Every value lives in the arena planned at load and kernels take their scratch from
//! per-thread pools, so the heap sees only the frame's bookkeeping (its output tensors, a few
//! small vectors), whatever the number of nodes.
//!
//! A counting global allocator observes every allocation of the process (all threads).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use common::*;
use edgeinfer::device::DeviceRequest;
use edgeinfer::model::DType;
use edgeinfer::Runtime;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
/// One test at a time: the counters see every thread of the process, and the harness runs
/// tests on several.
static SERIAL: Mutex<()> = Mutex::new(());

// SAFETY: forwards to the system allocator; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes of each of ten frames after warming up.
fn frame_allocations(
    rt: &Runtime,
    inputs: &[(String, candle_core::Tensor)],
) -> Vec<(usize, usize)> {
    // A few frames first: each worker thread's scratch grows to the largest piece of work it
    // has been handed, and which pieces a thread gets varies from frame to frame.
    for _ in 0..10 {
        rt.run_tensors(inputs, &[]).unwrap();
    }
    (0..10)
        .map(|_| {
            ALLOCS.store(0, Ordering::SeqCst);
            BYTES.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            let out = rt.run_tensors(inputs, &[]).unwrap();
            COUNTING.store(false, Ordering::SeqCst);
            drop(out);
            (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst))
        })
        .collect()
}

fn check(name: &str, rt: &Runtime, inputs: &[(String, candle_core::Tensor)]) {
    let exec = &rt.model().exec;
    let nodes = exec.node_count();
    assert_eq!(
        exec.native_nodes(),
        nodes,
        "{name}: every node should run on a native kernel: {:?}",
        exec.kernel_counts()
    );
    assert!(exec.arena_bytes() > 0);
    let frames = frame_allocations(rt, inputs);
    let mut bytes: Vec<usize> = frames.iter().map(|f| f.1).collect();
    bytes.sort_unstable();
    eprintln!(
        "{name}: {nodes} nodes, arena {:.1} MB, per frame (allocations, bytes): {frames:?}",
        exec.arena_bytes() as f64 / 1e6
    );
    // Bookkeeping only: a handful of small vectors and the output tensors (4 KB of logits),
    // nothing per node. A worker's scratch may still grow once in a while (one reallocation,
    // when it is first handed a bigger piece), so the bytes are judged on the median frame.
    for (allocs, _) in &frames {
        assert!(
            *allocs <= 24,
            "{name}: {allocs} allocations in one frame of {nodes} nodes"
        );
    }
    let median = bytes[bytes.len() / 2];
    assert!(
        median <= 64 << 10,
        "{name}: {median} bytes allocated in the median frame"
    );
}

#[test]
fn mobilenet_v2_frames_allocate_no_activations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inputs = read_tensors(&fixture("mobilenet_v2/chelsea.input.safetensors"));
    for threads in [1, 2] {
        let rt = Runtime::builder()
            .model(root().join("models/mobilenet_v2.safetensors"))
            .device(DeviceRequest::Cpu)
            .threads(threads)
            .build()
            .unwrap();
        check(&format!("mobilenet_v2, {threads} threads"), &rt, &inputs);
    }
}

#[test]
fn vit_frames_allocate_no_activations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model = import_to(tmp.path(), &fixture("vit_tiny/model.onnx"), DType::F32);
    let rt = Runtime::builder()
        .model(&model)
        .device(DeviceRequest::Cpu)
        .threads(2)
        .build()
        .unwrap();
    let inputs = read_tensors(&fixture("vit_tiny/input.safetensors"));
    check("vit_tiny", &rt, &inputs);
}
