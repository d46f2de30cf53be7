//! The model file format: writer/reader round trips, interoperability with the `safetensors`
//! crate, and one test per header validation rule, on hand-crafted bytes.

use candle_core::{Device, Tensor};
use edgeinfer::model::{DType, ModelError, ModelFile, ModelWriter};
use half::{bf16, f16};

/// A file from a raw header string and data section, bypassing the writer so that every
/// malformed case can be expressed.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

fn open_err(bytes: Vec<u8>) -> ModelError {
    match ModelFile::from_vec(bytes, "bad.safetensors") {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => e,
    }
}

struct Sample {
    f32s: Vec<f32>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
    i8s: Vec<i8>,
    i64s: Vec<i64>,
    bools: Vec<u8>,
}

fn sample() -> Sample {
    Sample {
        f32s: vec![1.0, -2.5, 3.25, 0.0, f32::MAX, -1e-30],
        f16s: [0.5f32, -1.0, 65504.0, 1.0e-3]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect(),
        bf16s: [1.5f32, -3.0, 1.0e20, 0.0]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect(),
        i8s: vec![-128, -1, 0, 1, 127],
        i64s: vec![i64::MIN, -1, 0, 3, i64::MAX],
        bools: vec![1, 0, 0, 1],
    }
}

fn sample_writer(s: &Sample) -> ModelWriter {
    let mut w = ModelWriter::new();
    w.set_metadata("graph", r#"{"nodes":[]}"#);
    w.set_metadata("note", "ünïcode \"quoted\"\nline");
    w.add_tensor(
        "conv.weight",
        DType::F32,
        vec![2, 3],
        le(&s.f32s, f32::to_le_bytes),
    )
    .expect("f32");
    w.add_tensor("half", DType::F16, vec![4], le(&s.f16s, f16::to_le_bytes))
        .expect("f16");
    w.add_tensor(
        "brain",
        DType::BF16,
        vec![2, 2],
        le(&s.bf16s, bf16::to_le_bytes),
    )
    .expect("bf16");
    w.add_tensor("q", DType::I8, vec![5], le(&s.i8s, i8::to_le_bytes))
        .expect("i8");
    w.add_tensor("shape", DType::I64, vec![5], le(&s.i64s, i64::to_le_bytes))
        .expect("i64");
    w.add_tensor("mask", DType::Bool, vec![2, 2], s.bools.clone())
        .expect("bool");
    w.add_tensor("scalar", DType::F64, vec![], 2.5f64.to_le_bytes().to_vec())
        .expect("scalar");
    w.add_tensor("empty", DType::I32, vec![0, 3], vec![])
        .expect("empty");
    w
}

#[test]
fn round_trip_through_a_file() {
    let s = sample();
    let w = sample_writer(&s);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    w.write(&path).expect("write");
    // Only the final file is left behind: the temporary was renamed over it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model.safetensors")]);

    let on_disk = std::fs::read(&path).expect("read");
    assert_eq!(
        on_disk,
        w.to_bytes().expect("to_bytes"),
        "write and to_bytes agree"
    );
    // The header is space-padded to a multiple of 8, as safetensors pads it.
    let n = u64::from_le_bytes(on_disk[..8].try_into().expect("8 bytes"));
    assert_eq!(n % 8, 0);

    let f = ModelFile::open(&path).expect("open");
    assert_eq!(f.label(), path.display().to_string());
    assert_eq!(f.metadata().len(), 2);
    assert_eq!(f.metadata()["graph"], r#"{"nodes":[]}"#);
    assert_eq!(f.metadata()["note"], "ünïcode \"quoted\"\nline");
    assert_eq!(f.len(), 8);
    assert!(!f.is_empty());
    assert_eq!(f.file_size(), on_disk.len());
    assert_eq!(f.data_bytes(), 24 + 8 + 8 + 5 + 40 + 4 + 8);

    let order: Vec<&str> = f.tensors().map(|t| t.name.as_str()).collect();
    assert_eq!(
        order,
        [
            "conv.weight",
            "half",
            "brain",
            "q",
            "shape",
            "mask",
            "scalar",
            "empty"
        ],
        "tensors() is in file order, which is the writer's insertion order"
    );
    let mut prev_end = 0;
    for t in f.tensors() {
        assert!(t.begin >= prev_end);
        prev_end = t.end;
    }

    let expect = [
        ("conv.weight", DType::F32, vec![2, 3]),
        ("half", DType::F16, vec![4]),
        ("brain", DType::BF16, vec![2, 2]),
        ("q", DType::I8, vec![5]),
        ("shape", DType::I64, vec![5]),
        ("mask", DType::Bool, vec![2, 2]),
        ("scalar", DType::F64, vec![]),
        ("empty", DType::I32, vec![0, 3]),
    ];
    for (name, dtype, shape) in expect {
        assert!(f.contains(name));
        let v = f.get(name).expect(name);
        assert_eq!(v.info.name, name);
        assert_eq!(v.info.dtype, dtype, "{name}");
        assert_eq!(v.info.shape, shape, "{name}");
        assert_eq!(v.data.len(), v.info.end - v.info.begin);
    }
    assert!(!f.contains("missing"));
    assert!(f.get("missing").is_none());

    assert_eq!(
        f.get("conv.weight").expect("t").data,
        le(&s.f32s, f32::to_le_bytes)
    );
    assert_eq!(f.get("mask").expect("t").data, s.bools.as_slice());

    let f32s = f.get("conv.weight").expect("t").to_f32_vec().expect("f32");
    assert_eq!(f32s, s.f32s);
    let halfs = f.get("half").expect("t").to_f32_vec().expect("f16");
    assert_eq!(halfs, s.f16s.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
    let brains = f.get("brain").expect("t").to_f32_vec().expect("bf16");
    assert_eq!(
        brains,
        s.bf16s.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    );
    let q = f.get("q").expect("t").to_f32_vec().expect("i8");
    assert_eq!(q, vec![-128.0, -1.0, 0.0, 1.0, 127.0]);
    assert_eq!(
        f.get("scalar").expect("t").to_f32_vec().expect("f64"),
        vec![2.5]
    );
    assert!(f
        .get("empty")
        .expect("t")
        .to_f32_vec()
        .expect("i32")
        .is_empty());

    assert_eq!(
        f.get("shape").expect("t").to_i64_vec().expect("i64"),
        s.i64s
    );
    assert_eq!(
        f.get("mask").expect("t").to_i64_vec().expect("bool"),
        vec![1, 0, 0, 1]
    );
    assert_eq!(
        f.get("q").expect("t").to_i64_vec().expect("i8"),
        vec![-128, -1, 0, 1, 127]
    );
    match f.get("conv.weight").expect("t").to_i64_vec() {
        Err(e @ ModelError::NotInteger { .. }) => assert!(e.to_string().contains("conv.weight")),
        other => panic!("expected NotInteger, got {other:?}"),
    }

    // Provenance hash: the file's bytes, lowercase hex.
    let sha = f.sha256_hex();
    assert_eq!(sha.len(), 64);
    assert!(sha
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(&on_disk)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sha, want);
}

#[test]
fn to_candle_maps_dtypes() {
    let s = sample();
    let f =
        ModelFile::from_vec(sample_writer(&s).to_bytes().expect("bytes"), "mem").expect("from_vec");
    let dev = Device::Cpu;
    let t = f
        .get("conv.weight")
        .expect("t")
        .to_candle(&dev)
        .expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::F32);
    assert_eq!(t.dims(), &[2, 3]);
    assert_eq!(
        t.flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec"),
        s.f32s
    );

    let t = f.get("half").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::F16);
    assert_eq!(t.to_vec1::<f16>().expect("vec"), s.f16s);

    let t = f.get("brain").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::BF16);

    let t = f.get("q").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::F32, "I8 is widened to F32");
    assert_eq!(
        t.to_vec1::<f32>().expect("vec"),
        vec![-128.0, -1.0, 0.0, 1.0, 127.0]
    );

    let t = f.get("mask").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::U8, "Bool becomes U8");
    assert_eq!(
        t.flatten_all().expect("flat").to_vec1::<u8>().expect("vec"),
        vec![1, 0, 0, 1]
    );

    let t = f.get("shape").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dtype(), candle_core::DType::I64);
    assert_eq!(t.to_vec1::<i64>().expect("vec"), s.i64s);

    let t = f.get("scalar").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dims(), &[] as &[usize]);
    assert_eq!(t.to_scalar::<f64>().expect("scalar"), 2.5);

    let t = f.get("empty").expect("t").to_candle(&dev).expect("candle");
    assert_eq!(t.dims(), &[0, 3]);
    assert_eq!(t.dtype(), candle_core::DType::I32);
}

#[test]
fn add_candle_round_trips_every_dtype() {
    let dev = Device::Cpu;
    let f32t = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).expect("t");
    let tensors = vec![
        ("u8", Tensor::new(&[0u8, 7, 255], &dev).expect("t")),
        ("i16", Tensor::new(&[-3i16, 300], &dev).expect("t")),
        ("i32", Tensor::new(&[-70000i32, 5], &dev).expect("t")),
        ("i64", Tensor::new(&[i64::MIN, 9], &dev).expect("t")),
        ("f16", f32t.to_dtype(candle_core::DType::F16).expect("t")),
        ("bf16", f32t.to_dtype(candle_core::DType::BF16).expect("t")),
        ("f32", f32t.clone()),
        // A non-contiguous view must be written in logical (row-major) order.
        ("f32_t", f32t.t().expect("t")),
        ("f64", f32t.to_dtype(candle_core::DType::F64).expect("t")),
    ];
    let mut w = ModelWriter::default();
    for (name, t) in &tensors {
        w.add_candle(*name, t).expect(name);
    }
    let f = ModelFile::from_vec(w.to_bytes().expect("bytes"), "candle").expect("read");
    for (name, t) in &tensors {
        let back = f.get(name).expect(name).to_candle(&dev).expect(name);
        assert_eq!(back.dtype(), t.dtype(), "{name}");
        assert_eq!(back.dims(), t.dims(), "{name}");
        let a = back.to_dtype(candle_core::DType::F64).expect("f64");
        let b = t.to_dtype(candle_core::DType::F64).expect("f64");
        let diff = (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f64>()
            .expect("scalar");
        assert_eq!(diff, 0.0, "{name}");
    }
    assert_eq!(f.get("u8").expect("t").info.dtype, DType::U8, "U8 stays U8");
    assert_eq!(
        f.get("f32_t").expect("t").to_f32_vec().expect("f32"),
        vec![1.0, 3.0, 2.0, 4.0]
    );

    let u32t = Tensor::new(&[1u32, 2], &dev).expect("t");
    assert!(matches!(
        w.add_candle("u32", &u32t),
        Err(ModelError::UnsupportedCandleDType { .. })
    ));
}

#[test]
fn writer_output_is_read_by_safetensors_crate() {
    let s = sample();
    let bytes = sample_writer(&s).to_bytes().expect("bytes");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors accepts our file");
    let ours = ModelFile::from_vec(bytes.clone(), "mem").expect("ours");
    assert_eq!(st.len(), ours.len());
    for info in ours.tensors() {
        let t = st.tensor(&info.name).expect(&info.name);
        assert_eq!(
            format!("{:?}", t.dtype()),
            info.dtype.as_str(),
            "{}",
            info.name
        );
        assert_eq!(t.shape(), info.shape.as_slice(), "{}", info.name);
        assert_eq!(
            t.data(),
            ours.get(&info.name).expect("t").data,
            "{}",
            info.name
        );
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
    let meta = meta.metadata().clone().expect("__metadata__ present");
    assert_eq!(meta.len(), 2);
    assert_eq!(meta["graph"], ours.metadata()["graph"]);
}

#[test]
fn reads_safetensors_crate_output() {
    use safetensors::tensor::{Dtype, TensorView};
    let a = le(&[1.0f32, 2.0, 3.0], f32::to_le_bytes);
    let b = le(&[-5i64, 6], i64::to_le_bytes);
    let c = vec![1u8, 0, 1];
    let views = vec![
        ("a", TensorView::new(Dtype::F32, vec![3], &a).expect("a")),
        ("b", TensorView::new(Dtype::I64, vec![2, 1], &b).expect("b")),
        ("c", TensorView::new(Dtype::BOOL, vec![3], &c).expect("c")),
    ];
    let meta = std::collections::HashMap::from([("k".to_string(), "v".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).expect("serialize");
    let f = ModelFile::from_vec(bytes, "st").expect("we read safetensors' output");
    assert_eq!(f.metadata()["k"], "v");
    assert_eq!(
        f.get("a").expect("a").to_f32_vec().expect("f32"),
        vec![1.0, 2.0, 3.0]
    );
    assert_eq!(f.get("b").expect("b").info.shape, vec![2, 1]);
    assert_eq!(
        f.get("b").expect("b").to_i64_vec().expect("i64"),
        vec![-5, 6]
    );
    assert_eq!(
        f.get("c").expect("c").to_i64_vec().expect("bool"),
        vec![1, 0, 1]
    );
}

#[test]
fn unaligned_data_is_decoded() {
    // A 9-byte header (not a multiple of 8) and a 1-byte tensor first put the F32 and I64
    // tensors at odd addresses; decoding must not assume alignment.
    let header = r#"{"p":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]},"i":{"dtype":"I64","shape":[1],"data_offsets":[9,17]}}"#;
    let header = format!("{header} ");
    let mut data = vec![42u8];
    data.extend(le(&[1.5f32, -0.25], f32::to_le_bytes));
    data.extend((-7i64).to_le_bytes());
    let f = ModelFile::from_vec(raw_file(&header, &data), "odd").expect("valid");
    assert_eq!(
        f.get("f").expect("f").to_f32_vec().expect("f32"),
        vec![1.5, -0.25]
    );
    assert_eq!(f.get("i").expect("i").to_i64_vec().expect("i64"), vec![-7]);
}

#[test]
fn gaps_and_trailing_bytes_are_accepted() {
    let header = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},"b":{"dtype":"U8","shape":[0],"data_offsets":[5,5]}}"#;
    let f = ModelFile::from_vec(raw_file(header, &[0, 0, 0, 0, 9, 8, 0, 0, 0]), "gappy")
        .expect("gaps, empty tensors and trailing bytes are fine");
    assert_eq!(f.get("a").expect("a").data, &[9, 8]);
    assert_eq!(f.data_bytes(), 2);
    assert!(
        f.metadata().is_empty(),
        "a missing __metadata__ is an empty map"
    );
}

#[test]
fn empty_model_round_trips() {
    let mut w = ModelWriter::new();
    w.set_metadata("only", "metadata");
    let f = ModelFile::from_vec(w.to_bytes().expect("bytes"), "empty").expect("read");
    assert!(f.is_empty());
    assert_eq!(f.len(), 0);
    assert_eq!(f.data_bytes(), 0);
    assert_eq!(f.metadata()["only"], "metadata");
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = ModelWriter::new();
    match w.add_tensor("w", DType::F32, vec![2, 2], vec![0; 15]) {
        Err(e @ ModelError::InvalidTensor { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("'w'") && msg.contains("16") && msg.contains("15"),
                "{msg}"
            );
        }
        other => panic!("expected InvalidTensor, got {other:?}"),
    }
    assert!(matches!(
        w.add_tensor("big", DType::F32, vec![usize::MAX, 4], vec![]),
        Err(ModelError::InvalidTensor { .. })
    ));
    assert!(matches!(
        w.add_tensor("__metadata__", DType::U8, vec![1], vec![0]),
        Err(ModelError::InvalidTensor { .. })
    ));
    w.add_tensor("w", DType::U8, vec![1], vec![0])
        .expect("first");
    assert!(matches!(
        w.add_tensor("w", DType::U8, vec![1], vec![0]),
        Err(ModelError::DuplicateTensor { .. })
    ));
}

// ---- one test per validation rule ----

#[test]
fn truncated_file() {
    let e = open_err(vec![1, 2, 3]);
    assert!(matches!(e, ModelError::Truncated { len: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("bad.safetensors"), "{e}");

    // Through `open` too, which must report it before trying to map.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("short.safetensors");
    std::fs::write(&path, [0u8; 3]).expect("write");
    let e = ModelFile::open(&path).expect_err("truncated");
    assert!(matches!(e, ModelError::Truncated { len: 3, .. }), "{e:?}");
    assert!(e.to_string().contains("short.safetensors"), "{e}");
}

#[test]
fn missing_file_is_io_error() {
    let e = ModelFile::open("/nonexistent/dir/model.safetensors").expect_err("missing");
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains("/nonexistent/dir/model.safetensors"),
        "{e}"
    );
}

#[test]
fn header_past_end() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}        ");
    let e = open_err(bytes);
    assert!(
        matches!(
            e,
            ModelError::HeaderPastEnd {
                header_len: 1000,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("1000"),
        "{msg}"
    );

    let e = open_err(u64::MAX.to_le_bytes().to_vec());
    assert!(matches!(e, ModelError::HeaderPastEnd { .. }), "{e:?}");
}

#[test]
fn header_too_large() {
    // The zeroed allocation is lazy, so this costs little; the header is never parsed.
    let mut bytes = vec![0u8; 100_000_016];
    bytes[..8].copy_from_slice(&100_000_001u64.to_le_bytes());
    let e = open_err(bytes);
    assert!(
        matches!(
            e,
            ModelError::HeaderTooLarge {
                header_len: 100_000_001,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("100000001"), "{e}");
}

#[test]
fn header_not_json() {
    let e = open_err(raw_file("this is not json", &[]));
    assert!(
        matches!(e, ModelError::BadHeader { tensor: None, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad.safetensors"), "{e}");

    let mut bytes = 2u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let e = open_err(bytes);
    assert!(matches!(e, ModelError::BadHeader { .. }), "{e:?}");
    assert!(e.to_string().contains("UTF-8"), "{e}");

    let e = open_err(raw_file("[1, 2]", &[]));
    assert!(matches!(e, ModelError::BadHeader { .. }), "{e:?}");

    let e = open_err(raw_file(r#"{"__metadata__": {"k": 1}}"#, &[]));
    assert!(matches!(e, ModelError::BadHeader { .. }), "{e:?}");
    assert!(e.to_string().contains("'k'"), "{e}");

    let e = open_err(raw_file(r#"{"__metadata__": ["k"]}"#, &[]));
    assert!(matches!(e, ModelError::BadHeader { .. }), "{e:?}");
}

#[test]
fn tensor_entry_with_bad_fields() {
    let cases = [
        r#"{"layer1.bias": 5}"#,
        r#"{"layer1.bias": {"shape": [1], "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1]}}"#,
        r#"{"layer1.bias": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "scale": 1}}"#,
        r#"{"layer1.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "layer1.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
    ];
    for header in cases {
        let e = open_err(raw_file(header, &[0; 4]));
        match &e {
            ModelError::BadHeader {
                tensor: Some(t), ..
            } => assert_eq!(t, "layer1.bias", "{header}"),
            other => panic!("{header}: expected BadHeader naming the tensor, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("layer1.bias") && msg.contains("bad.safetensors"),
            "{msg}"
        );
    }
}

#[test]
fn unknown_dtype() {
    let header = r#"{"fc.weight": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}"#;
    let e = open_err(raw_file(header, &[0; 4]));
    assert!(
        matches!(&e, ModelError::UnknownDType { tensor, dtype, .. } if tensor == "fc.weight" && dtype == "Q7"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("fc.weight") && msg.contains("Q7") && msg.contains("bad.safetensors"),
        "{msg}"
    );
}

#[test]
fn shape_times_dtype_differs_from_byte_range() {
    let header = r#"{"conv2.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#;
    let e = open_err(raw_file(header, &[0; 24]));
    assert!(
        matches!(&e, ModelError::SizeMismatch { tensor, expected: 24, actual: 20, .. } if tensor == "conv2.weight"),
        "{e:?}"
    );
    let msg = e.to_string();
    for part in [
        "conv2.weight",
        "[2, 3]",
        "F32",
        "24",
        "20",
        "bad.safetensors",
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn offsets_past_end_of_data() {
    let header = r#"{"bn.running_mean": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#;
    let e = open_err(raw_file(header, &[0; 4]));
    assert!(
        matches!(&e, ModelError::BadOffsets { tensor, begin: 0, end: 8, data_len: 4, .. } if tensor == "bn.running_mean"),
        "{e:?}"
    );
    let msg = e.to_string();
    for part in ["bn.running_mean", "[0, 8]", "4 bytes", "bad.safetensors"] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }

    // begin > end is the same rule.
    let header = r#"{"bn.var": {"dtype": "U8", "shape": [0], "data_offsets": [3, 2]}}"#;
    let e = open_err(raw_file(header, &[0; 4]));
    assert!(
        matches!(
            &e,
            ModelError::BadOffsets {
                begin: 3,
                end: 2,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("bn.var"), "{e}");
}

#[test]
fn overlapping_ranges() {
    let header = r#"{"first": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "second": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#;
    let e = open_err(raw_file(header, &[0; 12]));
    assert!(
        matches!(&e, ModelError::Overlap { first, second, .. } if first == "first" && second == "second"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("'first'") && msg.contains("'second'") && msg.contains("bad.safetensors"),
        "{msg}"
    );

    // An overlap with an earlier, longer tensor that is not the immediately preceding one.
    let header = r#"{"big": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                     "small": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
                     "late": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}}"#;
    let e = open_err(raw_file(header, &[0; 10]));
    assert!(
        matches!(&e, ModelError::Overlap { first, .. } if first == "big"),
        "{e:?}"
    );
}

#[test]
fn overflowing_shape() {
    let header = format!(
        r#"{{"huge": {{"dtype": "F32", "shape": [{}, 4], "data_offsets": [0, 16]}}}}"#,
        usize::MAX
    );
    let e = open_err(raw_file(&header, &[0; 16]));
    assert!(
        matches!(&e, ModelError::ShapeOverflow { tensor, .. } if tensor == "huge"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("huge") && msg.contains(&usize::MAX.to_string()),
        "{msg}"
    );

    // Overflow only through the dtype size must be caught too.
    let header = format!(
        r#"{{"huge2": {{"dtype": "F64", "shape": [{}], "data_offsets": [0, 16]}}}}"#,
        usize::MAX / 4
    );
    let e = open_err(raw_file(&header, &[0; 16]));
    assert!(matches!(&e, ModelError::ShapeOverflow { .. }), "{e:?}");
}

#[test]
fn reads_python_written_fixtures() {
    // The reference fixtures are written by the Python `safetensors` package; where they are
    // present, both readers must agree on them.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return;
    };
    let mut seen = 0;
    for dir in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let ours = ModelFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            let bytes = std::fs::read(&path).expect("read");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
            assert_eq!(ours.len(), st.len(), "{}", path.display());
            for info in ours.tensors() {
                let t = st.tensor(&info.name).expect("tensor");
                assert_eq!(t.shape(), info.shape.as_slice());
                assert_eq!(t.data(), ours.get(&info.name).expect("view").data);
            }
            seen += 1;
        }
    }
    eprintln!("checked {seen} fixture files");
}
