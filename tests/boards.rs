//! Board profiles as a deployment uses them: shipped names and files, what they set, what
//! explicit settings override, and the memory budget refusing a model that does not fit.

mod common;

use std::process::Command;

use common::*;
use edgeinfer::board::Board;
use edgeinfer::device::DeviceRequest;
use edgeinfer::error::Error;
use edgeinfer::Runtime;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
}

fn default_model() -> std::path::PathBuf {
    root().join("models/mobilenet_v2.safetensors")
}

#[test]
fn a_board_sets_threads_budget_and_devices_and_later_calls_override_it() {
    let board = Board::load("x86-64-cpu").unwrap();
    let rt = Runtime::builder()
        .board(board.clone())
        .model(default_model())
        .build()
        .unwrap();
    assert_eq!(rt.model().exec.options().threads, Some(4));
    assert_eq!(rt.budget().as_millis(), 200);
    assert_eq!(rt.device().name, "cpu");

    let rt = Runtime::builder()
        .board(board)
        .threads(2)
        .device(DeviceRequest::Cpu)
        .budget(std::time::Duration::from_millis(50))
        .model(default_model())
        .build()
        .unwrap();
    assert_eq!(rt.model().exec.options().threads, Some(2));
    assert_eq!(rt.budget().as_millis(), 50);
}

/// A Jetson profile prefers cuda:0; without the cuda feature (or a GPU) the next device in
/// its list runs, and the reason says why.
#[test]
fn a_missing_gpu_falls_back_to_the_next_preferred_device_with_the_reason() {
    let rt = Runtime::builder()
        .board(Board::load("jetson-orin-nx-8gb").unwrap())
        .model(default_model())
        .build()
        .unwrap();
    if cfg!(feature = "cuda") && rt.device().name != "cpu" {
        return;
    }
    assert_eq!(rt.device().name, "cpu");
    assert!(
        rt.device().reason.contains("cuda:0"),
        "{}",
        rt.device().reason
    );
}

#[test]
fn a_model_over_the_memory_budget_is_refused_with_both_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small.toml");
    let text = std::fs::read_to_string(root().join("boards/raspberry-pi-5.toml"))
        .unwrap()
        .replace("memory_mb = 6144", "memory_mb = 30");
    std::fs::write(&small, text).unwrap();
    let board = Board::load(small.to_str().unwrap()).unwrap();
    let err = Runtime::builder()
        .board(board)
        .model(default_model())
        .build()
        .err()
        .expect("MobileNetV2 (14 MB of f32 weights, 6 MB of activations, 20 MB workspace) needs more than 30 MB");
    match &err {
        Error::OverMemory {
            need_mb, budget_mb, ..
        } => {
            assert_eq!(*budget_mb, 30);
            assert!(*need_mb > 30.0 && *need_mb < 60.0, "{need_mb}");
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("allows 30 MB") && msg.contains("needs about"),
        "{msg}"
    );

    // The same through the binary: a clear error, exit status 1.
    let out = bin()
        .args(["run", "--input-tensor"])
        .arg(fixture("mobilenet_v2/chelsea.input.safetensors"))
        .arg("--model")
        .arg(default_model())
        .arg("--board")
        .arg(&small)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("allows 30 MB"), "{stderr}");
}

#[test]
fn boards_lists_every_shipped_profile_and_bad_profiles_name_the_key() {
    let out = bin().arg("boards").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "jetson-orin-nx-8gb",
        "jetson-orin-nx-16gb",
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-64gb",
        "raspberry-pi-5",
        "x86-64-cpu",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(root().join("boards/x86-64-cpu.toml")).unwrap();
    std::fs::write(&bad, format!("{text}\nmax_power_w = 15\n")).unwrap();
    let out = bin()
        .args(["demo", "--board"])
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("max_power_w"), "{stderr}");
}
