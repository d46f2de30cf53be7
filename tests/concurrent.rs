//! One loaded model serving several threads at once: each concurrent frame gets its own
//! activation arena, so results never mix.

mod common;

use common::*;
use edgeinfer::device::DeviceRequest;
use edgeinfer::Runtime;

#[test]
fn concurrent_frames_get_their_own_arena_and_the_same_answers() {
    let rt = Runtime::builder()
        .model(root().join("models/mobilenet_v2.safetensors"))
        .device(DeviceRequest::Cpu)
        .threads(2)
        .build()
        .unwrap();
    let photos = ["chelsea", "coffee", "astronaut"];
    let inputs: Vec<_> = photos
        .iter()
        .map(|p| read_tensors(&fixture(&format!("mobilenet_v2/{p}.input.safetensors"))))
        .collect();
    let alone: Vec<_> = inputs
        .iter()
        .map(|i| rt.run_tensors(i, &[]).unwrap().outputs[0].1.clone())
        .collect();
    std::thread::scope(|s| {
        for t in 0..3 {
            let (rt, inputs, alone) = (&rt, &inputs, &alone);
            s.spawn(move || {
                for round in 0..15 {
                    let i = (t + round) % inputs.len();
                    let got = rt.run_tensors(&inputs[i], &[]).unwrap();
                    let d = max_abs_diff(&got.outputs[0].1, &alone[i]);
                    assert_eq!(d, 0.0, "thread {t} round {round}: photo {i} differs by {d}");
                }
            });
        }
    });
}
