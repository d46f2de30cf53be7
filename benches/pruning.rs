//! Latency per pruning ratio of the embedded default model (MobileNetV2), CPU, one frame.
//! `cargo bench --bench pruning`; `edgeinfer bench` is the full sweep with a report.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use edgeinfer::device::DeviceRequest;
use edgeinfer::model::ModelFile;
use edgeinfer::prune::{prune, Criterion as Rank, PruneOptions, Scope};
use edgeinfer::Runtime;

fn variants() -> Vec<(f32, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let base = root.join("models/mobilenet_v2.safetensors");
    let dir = std::env::temp_dir().join("edgeinfer-bench-pruning");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = ModelFile::open(&base).expect("the embedded model file");
    let mut out = vec![(0.0, base.clone())];
    for ratio in [0.25f32, 0.4, 0.55, 0.63] {
        let opts = PruneOptions {
            ratio,
            criterion: Rank::L1,
            scope: Scope::Global,
            round_to: 8,
            keep: Vec::new(),
        };
        let (w, _) = prune(&file, &opts).expect("pruning");
        let p = dir.join(format!("p{:.0}.safetensors", ratio * 100.0));
        w.write(&p).expect("writing a variant");
        out.push((ratio, p));
    }
    out
}

fn latency_per_ratio(c: &mut Criterion) {
    let img =
        image::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/samples/chelsea.png"))
            .expect("sample photo");
    let mut group = c.benchmark_group("mobilenet_v2_pruned");
    for (ratio, path) in variants() {
        let rt = Runtime::builder()
            .model(&path)
            .device(DeviceRequest::Cpu)
            .build()
            .expect("loading a variant");
        let feeds = [rt.image_tensor(&img).expect("preprocessing")];
        group.bench_with_input(BenchmarkId::from_parameter(ratio), &feeds, |b, feeds| {
            b.iter(|| rt.run_tensors(feeds, &[]).expect("inference"))
        });
    }
    group.finish();
}

criterion_group!(benches, latency_per_ratio);
criterion_main!(benches);
