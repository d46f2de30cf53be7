//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use edgeinfer::import::{import_onnx, ImportOptions};
use edgeinfer::model::{DType, ModelFile};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// Reads every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    let f = ModelFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let names: Vec<String> = f.tensors().map(|t| t.name.clone()).collect();
    names
        .into_iter()
        .map(|n| {
            let t = f.get(&n).unwrap().to_candle(&Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

/// Imports an ONNX fixture into a model file inside `dir` and returns its path.
pub fn import_to(dir: &Path, onnx: &Path, dtype: DType) -> PathBuf {
    let imported = import_onnx(onnx, &ImportOptions::default())
        .unwrap_or_else(|e| panic!("import {}: {e}", onnx.display()));
    let out = dir.join("model.safetensors");
    imported.to_writer(dtype).unwrap().write(&out).unwrap();
    out
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (to_f32(a), to_f32(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest |x| of a tensor: the scale an error is judged against.
pub fn max_abs(t: &Tensor) -> f32 {
    to_f32(t).iter().fold(0f32, |m, x| m.max(x.abs()))
}

pub fn argmax(t: &Tensor) -> usize {
    let v = to_f32(t);
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Pearson correlation of two maps (heat maps against a reference), in f64.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt()
}
