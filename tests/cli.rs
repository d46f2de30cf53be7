//! The binary as a user runs it.

mod common;

use std::process::Command;

use common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
}

#[test]
fn demo_runs_offline_and_writes_one_report_per_photo() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["demo", "--device", "cpu", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("chelsea.png") && stdout.contains("infer"),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(tmp.path().join("demo.jsonl")).unwrap();
    let reports: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3);
    for r in &reports {
        for key in [
            "frame",
            "source",
            "model",
            "device",
            "budget_ms",
            "total_ms",
            "verdict",
            "stages",
            "top",
            "degraded",
        ] {
            assert!(r.get(key).is_some(), "report lacks '{key}': {r}");
        }
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["top"].as_array().unwrap().len(), 3);
    }
    // Chelsea is a tabby cat: ImageNet classes 281-285 are the domestic cats.
    let chelsea = reports[0]["top"][0]["class"].as_u64().unwrap();
    assert!((281..=285).contains(&chelsea), "chelsea top-1 = {chelsea}");
    // Every photo is explained (CAM: MobileNetV2's head is GAP -> linear), with an overlay.
    for r in &reports {
        let e = &r["explain"];
        assert_eq!(e["method"], "cam", "{r}");
        assert!(r["stages"]["explain"].as_f64().is_some(), "{r}");
        let map = std::path::PathBuf::from(e["map"].as_str().unwrap());
        let img = image::open(&map).unwrap();
        assert_eq!((img.width(), img.height()), (224, 224));
    }
    // The cat's map is on the cat: the hot box of chelsea.png (451 x 300 frame pixels) lies
    // on the cat's face and chest, not on the background at the left edge of the photo.
    let b: Vec<u64> = reports[0]["explain"]["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        b[0] >= 90 && b[2] <= 400 && b[1] < b[3] && b[3] <= 300,
        "bbox {b:?}"
    );
    // The espresso's box lies on the cup (the top two thirds of the 224 crop), not the saucer
    // or the spoon below it.
    let ib: Vec<u64> = reports[1]["explain"]["input_bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        ib[1] < 60 && ib[3] <= 170 && ib[0] >= 20 && ib[2] <= 210,
        "coffee input bbox {ib:?}"
    );
}

#[test]
fn explain_writes_a_side_by_side_picture_and_run_dumps_raw_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("models/mobilenet_v2.safetensors");
    let out = bin()
        .args([
            "explain", "--device", "cpu", "--method", "gradcam", "--model",
        ])
        .arg(&model)
        .arg("--input")
        .arg(root().join("models/samples/coffee.png"))
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["method"], "gradcam");
    assert_eq!(j["label"], "espresso");
    let pic = image::open(tmp.path().join("coffee.explain.png")).unwrap();
    assert_eq!((pic.width(), pic.height()), (3 * 224 + 2 * 8, 224));

    let dump = tmp.path().join("maps.safetensors");
    let jsonl = tmp.path().join("r.jsonl");
    let out = bin()
        .args(["run", "--device", "cpu", "--explain", "eigencam", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(root().join("models/samples/chelsea.png"))
        .arg(root().join("models/samples/astronaut.png"))
        .arg("--dump-maps")
        .arg(&dump)
        .arg("--jsonl")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let maps: std::collections::HashMap<String, candle_core::Tensor> =
        read_tensors(&dump).into_iter().collect();
    let reports: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for f in 0..2 {
        assert_eq!(maps[&format!("frame{f}.raw")].dims(), &[7, 7]);
        assert_eq!(maps[&format!("frame{f}.input")].dims(), &[224, 224]);
        // The mask is the map at or above the report's threshold.
        let input = maps[&format!("frame{f}.input")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mask = maps[&format!("frame{f}.mask")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let thr = reports[f]["explain"]["threshold"]["value"]
            .as_f64()
            .unwrap() as f32;
        assert!(input
            .iter()
            .zip(&mask)
            .all(|(&v, &m)| (v >= thr && v > 0.0) == (m == 1)));
        let hot = mask.iter().filter(|&&m| m == 1).count() as f64 / mask.len() as f64;
        let reported = reports[f]["explain"]["hot_fraction"].as_f64().unwrap();
        assert!((hot - reported).abs() < 1e-9, "{hot} vs {reported}");
    }
    let text = std::fs::read_to_string(&jsonl).unwrap();
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["explain"]["method"], "eigencam", "{r}");
        assert!(
            r["explain"].get("map").is_none(),
            "no --out, no picture: {r}"
        );
    }
}

#[test]
fn explain_flags_that_cannot_work_are_refused_up_front() {
    let model = root().join("models/mobilenet_v2.safetensors");
    let photo = root().join("models/samples/chelsea.png");
    for (flags, want) in [
        (vec!["--explain", "rollout"], "softmax"),
        (vec!["--explain", "cam", "--target-class", "1000"], "1000"),
        (
            vec!["--explain", "gradcam", "--target-layer", "nope"],
            "nope",
        ),
        (vec!["--explain", "sparkles"], "sparkles"),
    ] {
        let out = bin()
            .args(["run", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&photo)
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{flags:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn inspect_json_reports_sizes_and_costs() {
    let out = bin()
        .args(["inspect", "--json"])
        .arg(root().join("models/mobilenet_v2.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // torchvision's MobileNetV2 has 3,504,872 parameters; the export folds its 52 BatchNorms
    // (2·C parameters each) into conv biases (C each), leaving 3,487,816. ~0.30 GMACs.
    assert_eq!(j["params"].as_u64().unwrap(), 3_487_816);
    let macs = j["macs"].as_u64().unwrap();
    assert!((290_000_000..320_000_000).contains(&macs), "macs {macs}");
    assert!(j["weight_bytes"].as_u64().unwrap() > 6_000_000);
    assert!(j["peak_activation_bytes"].as_u64().unwrap() > 1_000_000);
    assert!(j["provenance"]["source_sha256"].is_string());
}

#[test]
fn import_then_run_input_tensor_dumps_outputs_matching_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("sq.safetensors");
    let st = bin()
        .arg("import")
        .arg(fixture("squeezenet/model.onnx"))
        .arg("-o")
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    let dumped = tmp.path().join("out.safetensors");
    let out = bin()
        .args(["run", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--input-tensor")
        .arg(fixture("squeezenet/input.safetensors"))
        .arg("--dump-outputs")
        .arg(&dumped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = read_tensors(&dumped);
    let want = read_tensors(&fixture("squeezenet/expected.safetensors"));
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let g = &got
            .iter()
            .find(|(n, _)| n == name)
            .expect("output by ONNX name")
            .1;
        assert!(max_abs_diff(g, w) <= 1e-3);
    }
}

#[test]
fn run_over_a_folder_with_a_corrupt_image_reports_every_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("frames");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(root().join("models/samples/coffee.png"), dir.join("a.png")).unwrap();
    std::fs::write(dir.join("b.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    std::fs::copy(root().join("models/samples/chelsea.png"), dir.join("c.png")).unwrap();
    let jsonl = tmp.path().join("r.jsonl");
    let out = bin()
        .args(["run", "--device", "cpu", "--budget", "5s", "--model"])
        .arg(root().join("models/mobilenet_v2.safetensors"))
        .arg("--input")
        .arg(&dir)
        .arg("--jsonl")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0]["verdict"], "ok");
    assert_eq!(reports[1]["verdict"], "error");
    assert!(reports[1]["error"].as_str().unwrap().contains("b.png"));
    assert_eq!(reports[2]["verdict"], "ok");
}

#[test]
fn unknown_op_import_fails_with_a_message_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.onnx");
    std::fs::write(&bad, b"definitely not onnx").unwrap();
    let out = bin()
        .arg("import")
        .arg(&bad)
        .arg("-o")
        .arg(tmp.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.onnx") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_frame_budget_too_short_for_gradcam_degrades_to_cam_then_skips_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("r.jsonl");
    let photo = root().join("models/samples/coffee.png");
    let out = bin()
        .args([
            "run",
            "--device",
            "cpu",
            "--explain",
            "gradcam",
            "--budget",
            "0.001ms",
        ])
        .arg("--model")
        .arg(root().join("models/mobilenet_v2.safetensors"))
        .arg("--input")
        .args([&photo, &photo, &photo, &photo])
        .arg("--jsonl")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(String, String)> = reports
        .iter()
        .map(|r| {
            (
                r["explain"]["method"].as_str().unwrap_or("-").to_string(),
                r["degraded"].to_string(),
            )
        })
        .collect();
    // Each method gets one measured try; after that its cost no longer fits. The pipeline's
    // warm-up frame measured Grad-CAM, so the first frame already falls back to CAM (its one
    // try), then the explanation is skipped. Never silently.
    let want = [
        ("cam", r#"["explain:gradcam->cam"]"#),
        ("-", r#"["explain_skipped"]"#),
        ("-", r#"["explain_skipped"]"#),
        ("-", r#"["explain_skipped"]"#),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(seen, want);
    for r in &reports {
        assert_eq!(r["verdict"], "over_budget", "{r}");
    }
}

#[test]
fn eval_scores_the_defect_set_like_the_python_checker() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("eval.json");
    let d = root().join("tests/fixtures/defects");
    let out = bin()
        .args(["eval", "--device", "cpu", "--model"])
        .arg(root().join("models/defect_cnn.safetensors"))
        .arg("--data")
        .arg(d.join("images"))
        .arg("--masks")
        .arg(d.join("masks"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // models/defects/cam_quality.py on the same frames through onnxruntime: same CAM, same
    // upsampling, same Otsu threshold, same scores.
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("info.json")).unwrap()).unwrap();
    let want = &info["heldout_onnxruntime"];
    assert_eq!(got["frames"], want["accuracy"]["images"]);
    let acc = got["accuracy"].as_f64().unwrap();
    assert!(
        (acc - want["accuracy"]["all"].as_f64().unwrap()).abs() < 1e-9,
        "accuracy {acc}"
    );
    let methods = got["methods"].as_array().unwrap();
    let by = |m: &str| {
        methods
            .iter()
            .find(|r| r["method"] == m)
            .unwrap_or_else(|| panic!("no {m} in {got}"))["scored"]
            .clone()
    };
    let cam = by("cam");
    assert_eq!(cam["n"], want["cam"]["all"]["images"]);
    for (ours, theirs) in [
        ("mean_dice", "dice"),
        ("mean_iou", "iou"),
        ("pointing_rate", "pointing"),
    ] {
        let (a, b) = (
            cam[ours].as_f64().unwrap(),
            want["cam"]["all"][theirs].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 0.01, "cam {ours}: ours {a}, python {b}");
    }
    // With a GAP -> linear head Grad-CAM is CAM up to a positive scale: identical masks.
    assert_eq!(by("gradcam")["mean_dice"], cam["mean_dice"]);
    // Eigen-CAM is scored too, and localises (better than chance, i.e. the defect's area).
    assert!(by("eigencam")["mean_dice"].as_f64().unwrap() > 0.3, "{got}");
}

#[test]
fn bench_sweeps_ratios_and_dtypes_into_a_report_with_a_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r");
    let d = root().join("tests/fixtures/defects/images");
    let out = bin()
        .args(["bench", "--device", "cpu", "--threads", "1", "--runs", "3"])
        .args(["--ratios", "0,0.4", "--dtypes", "f16,int8", "--model"])
        .arg(root().join("models/defect_cnn.safetensors"))
        .arg("--eval")
        .arg(&d)
        .arg("--input")
        .arg(d.join("crack/0000.png"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["p0-f16", "p0-int8", "p40-f16", "p40-int8"]);
    for r in &rows {
        assert!(r["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
    }
    // Pruning removes work and bytes; int8 removes bytes.
    let f = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    assert!(f(2, "macs") < 0.8 * f(0, "macs"));
    assert!(f(2, "params") < f(0, "params"));
    assert!(f(1, "file_bytes") < f(0, "file_bytes"));
    // The unpruned f16 variant is the model itself: its accuracy is the held-out accuracy
    // that models/defects/cam_quality.py measured through onnxruntime.
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/defects/info.json")).unwrap(),
    )
    .unwrap();
    let want = info["heldout_onnxruntime"]["accuracy"]["all"]
        .as_f64()
        .unwrap();
    assert!(
        (f(0, "accuracy") - want).abs() < 1e-9,
        "{} vs {want}",
        f(0, "accuracy")
    );
    let svg = std::fs::read_to_string(report.join("latency_vs_ratio.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("budget 200 ms"),
        "{svg}"
    );
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| p40-int8 |"), "{md}");
}

/// Runs the binary with `args` (paths as strings), asserting success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &std::path::Path) -> String {
    p.to_str().expect("a UTF-8 path").to_string()
}

fn accuracy_line(model: &std::path::Path, data: &std::path::Path) -> f64 {
    let (m, d, none) = (s(model), s(data), s(&data.join("no-masks")));
    let args = ["eval", "--device", "cpu", "--methods", "cam", "--model", &m];
    let out = ok(&[&args[..], &["--data", &d, "--masks", &none]].concat());
    // "accuracy 93.0 % (93/100); ..."
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn variant_of(path: &std::path::Path) -> String {
    let f = edgeinfer::model::ModelFile::open(path).unwrap();
    let prov: serde_json::Value =
        serde_json::from_str(&f.metadata()["edgeinfer.provenance"]).unwrap();
    prov["variant"].as_str().unwrap().to_string()
}

#[test]
fn prune_finetune_quantize_and_bench_run_end_to_end_on_fashion_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("models/fashion_resnet.safetensors");
    let test = root().join("tests/fixtures/fashion/test");
    let train = s(&root().join("tests/fixtures/fashion/train"));
    let p = |n: &str| tmp.path().join(n);
    let (m, p55, p55ft, p55q) = (
        s(&model),
        s(&p("p55.safetensors")),
        s(&p("p55-ft.safetensors")),
        s(&p("p55-ft-int8.safetensors")),
    );
    let bag = s(&test
        .join("bag")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path());
    let base = accuracy_line(&model, &test);
    assert!(base >= 85.0, "the unpruned classifier: {base} %");
    ok(&[
        "prune",
        &m,
        "--ratio",
        "0.55",
        "--round-to",
        "8",
        "-o",
        &p55,
    ]);
    let pruned = accuracy_line(&p("p55.safetensors"), &test);
    ok(&[
        "finetune", &p55, "--data", &train, "--epochs", "3", "-o", &p55ft,
    ]);
    let tuned = accuracy_line(&p("p55-ft.safetensors"), &test);
    eprintln!("fashion accuracy: base {base} %, p55 {pruned} %, p55 fine-tuned {tuned} %");
    assert!(
        tuned > pruned + 5.0,
        "fine-tuning did not recover: {pruned} -> {tuned}"
    );
    ok(&[
        "quantize",
        &p55ft,
        "--to",
        "int8",
        "-o",
        &p55q,
        "--calibration",
        &bag,
    ]);
    let q = accuracy_line(&p("p55-ft-int8.safetensors"), &test);
    assert!(
        (q - tuned).abs() <= 3.0,
        "int8 moved accuracy {tuned} -> {q}"
    );
    assert_eq!(variant_of(&p("p55-ft-int8.safetensors")), "p55-ft-int8");
    let (t, report) = (s(&test), s(&p("report")));
    let run = ["bench", "--device", "cpu", "--threads", "1", "--runs", "3"];
    let sweep = [
        "--ratios", "0,0.4", "--dtypes", "int8", "--model", &m, "--eval", &t,
    ];
    let ft = ["--finetune-epochs", "1", "--train", &train];
    ok(&[
        &run[..],
        &sweep,
        &ft,
        &["--input", &bag, "--report", &report],
    ]
    .concat());
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(p("report/report.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[1]["macs"].as_f64().unwrap() < rows[0]["macs"].as_f64().unwrap());
}

#[test]
fn prune_finetune_quantize_and_bench_run_end_to_end_on_the_embedded_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&root().join("models/mobilenet_v2.safetensors"));
    let p = |n: &str| tmp.path().join(n);
    // Two labelled photos, folders named by their ImageNet labels.
    for (label, photo) in [("Egyptian cat", "chelsea.png"), ("espresso", "coffee.png")] {
        std::fs::create_dir_all(p("data").join(label)).unwrap();
        std::fs::copy(
            root().join("models/samples").join(photo),
            p("data").join(label).join(photo),
        )
        .unwrap();
    }
    let (p25, p25ft, p25q, data, report) = (
        s(&p("p25.safetensors")),
        s(&p("p25-ft.safetensors")),
        s(&p("p25-ft-int8.safetensors")),
        s(&p("data")),
        s(&p("report")),
    );
    ok(&[
        "prune",
        &model,
        "--ratio",
        "0.25",
        "--keep",
        "first,last",
        "-o",
        &p25,
    ]);
    ok(&[
        "finetune", &p25, "--data", &data, "--epochs", "1", "-o", &p25ft,
    ]);
    let out = ok(&["quantize", &p25ft, "--to", "int8", "-o", &p25q]);
    assert!(out.contains("max |diff|"), "{out}");
    assert_eq!(variant_of(&p("p25-ft-int8.safetensors")), "p25-ft-int8");
    let run = [
        "bench", "--device", "cpu", "--runs", "2", "--ratios", "0,0.25",
    ];
    ok(&[&run[..], &["--dtypes", "int8", "--report", &report]].concat());
    assert!(p("report/latency_vs_ratio.svg").exists());
}

fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}")))
        .collect()
}

#[test]
fn raw_video_on_stdin_reports_every_whole_frame_and_one_error_for_a_truncated_tail() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("r.jsonl");
    let summary = tmp.path().join("s.json");
    // Three 64x48 NV12 frames of the cat (as a camera would send), then half a frame.
    let img = image::open(root().join("models/samples/chelsea.png"))
        .unwrap()
        .resize_exact(64, 48, image::imageops::FilterType::Triangle)
        .to_luma8();
    let mut frame = img.into_raw();
    frame.extend(std::iter::repeat_n(128u8, 64 * 48 / 2));
    let mut bytes = Vec::new();
    for _ in 0..3 {
        bytes.extend_from_slice(&frame);
    }
    bytes.extend_from_slice(&frame[..frame.len() / 2]);
    let mut child = bin()
        .args([
            "run",
            "--device",
            "cpu",
            "--raw",
            "64x48",
            "--pix",
            "nv12",
            "--every-frame",
        ])
        .arg("--jsonl")
        .arg(&out_path)
        .arg("--summary")
        .arg(&summary)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reports = jsonl(&out_path);
    assert_eq!(reports.len(), 4, "{reports:?}");
    for r in &reports[..3] {
        assert_ne!(r["verdict"], "error", "{r}");
        assert_eq!(r["source"], "stdin");
    }
    assert_eq!(reports[3]["verdict"], "error");
    let msg = reports[3]["error"].as_str().unwrap();
    assert!(
        msg.contains("truncated") && msg.contains("2304 of 4608 bytes"),
        "{msg}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["frames_in"], 4);
    assert_eq!(s["errors"], 1);
    assert!(stderr.contains("frames in 4"), "{stderr}");
}

#[test]
fn ctrl_c_drains_the_run_and_leaves_whole_lines_that_match_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("r.jsonl");
    let summary = tmp.path().join("s.json");
    let trace = tmp.path().join("trace.json");
    let child = bin()
        .args(["run", "--device", "cpu", "--synthetic", "320x240@30"])
        .arg("--jsonl")
        .arg(&out_path)
        .arg("--summary")
        .arg(&summary)
        .arg("--trace-chrome")
        .arg(&trace)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the run to be under way (reports flowing), then interrupt it.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&out_path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 10
    {
        assert!(started.elapsed().as_secs() < 60, "no reports after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let reports = jsonl(&out_path);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["frames_in"].as_u64().unwrap(), reports.len() as u64);
    let ids: std::collections::BTreeSet<u64> = reports
        .iter()
        .map(|r| r["frame"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (0..reports.len() as u64).collect(),
        "a frame missing or twice"
    );
    // The Chrome trace holds a span per frame and stage.
    let trace = std::fs::read_to_string(&trace).unwrap();
    let events: serde_json::Value = serde_json::from_str(&trace).unwrap();
    let names: std::collections::BTreeSet<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for stage in ["frame", "decode", "preprocess", "infer", "post"] {
        assert!(names.contains(stage), "no '{stage}' span in {names:?}");
    }
}

#[test]
fn a_model_ladder_on_the_cli_names_each_variant_and_refuses_a_repeated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let light = tmp.path().join("fashion-p40.safetensors");
    let model = root().join("models/fashion_resnet.safetensors");
    let out = bin()
        .args(["prune", "--ratio", "0.4"])
        .arg(&model)
        .arg("-o")
        .arg(&light)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ladder = format!("{},{}", model.display(), light.display());
    let out_path = tmp.path().join("r.jsonl");
    let out = bin()
        .args([
            "run",
            "--device",
            "cpu",
            "--model",
            &ladder,
            "--synthetic",
            "28x28@200:40",
        ])
        .arg("--jsonl")
        .arg(&out_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("variants: fashion_resnet, fashion-p40"),
        "{stderr}"
    );
    let reports = jsonl(&out_path);
    assert_eq!(reports.len(), 40);
    let twice = format!("{},{}", model.display(), model.display());
    let out = bin()
        .args([
            "run",
            "--device",
            "cpu",
            "--model",
            &twice,
            "--synthetic",
            "28x28@200:4",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("twice"));
}

#[test]
fn bad_source_flags_are_refused_with_the_reason() {
    for (args, want) in [
        (vec!["--synthetic", "640x480"], "WxH@FPS"),
        (vec!["--raw", "640"], "WxH"),
        (vec!["--raw", "63x48", "--pix", "nv12"], "nv12"),
        (vec!["--raw", "64x48", "--pix", "yuyv"], "yuyv"),
        (vec!["--input", "no/such/*.png"], "matches no file"),
        (vec!["--v4l2", "/dev/video0"], "v4l2"),
    ] {
        let out = bin()
            .args(["run", "--device", "cpu"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
