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

/// Allocations and bytes of one warmed-up frame, and the arena's size.
fn frame_allocations(rt: &Runtime, inputs: &[(String, candle_core::Tensor)]) -> (usize, usize) {
    // A few frames first: each worker thread's scratch grows to the largest piece of work it
    // has been handed, and which pieces a thread gets varies from frame to frame.
    for _ in 0..10 {
        rt.run_tensors(inputs, &[]).unwrap();
    }
    ALLOCS.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = rt.run_tensors(inputs, &[]).unwrap();
    COUNTING.store(false, Ordering::SeqCst);
    drop(out);
    (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst))
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
    let (allocs, bytes) = frame_allocations(rt, inputs);
    eprintln!(
        "{name}: {nodes} nodes, arena {:.1} MB, one frame: {allocs} allocations, {bytes} bytes",
        exec.arena_bytes() as f64 / 1e6
    );
    // Bookkeeping only: a handful of small vectors and the output tensors (4 KB of logits),
    // nothing per node and nothing the size of an activation.
    assert!(
        allocs <= 24,
        "{name}: {allocs} allocations in one frame of {nodes} nodes"
    );
    assert!(
        bytes <= 64 << 10,
        "{name}: {bytes} bytes allocated in one frame"
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
