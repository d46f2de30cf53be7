//! The model file: one safetensors file holding every weight, with the graph and provenance as
//! strings in its `__metadata__` map.
//!
//! Layout (standard safetensors): an 8-byte little-endian header length N, N bytes of JSON
//! header, then the data section. Each header entry other than `__metadata__` is
//! `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}` with offsets relative to the
//! data section.
//!
//! [`ModelFile`] validates the whole header before exposing anything: lengths, UTF-8, JSON
//! shape, dtype names, shape × dtype size against the byte range (with checked arithmetic),
//! ranges inside the data section, and no two ranges overlapping. Gaps between tensors and
//! trailing bytes are accepted because other writers pad. After that, every [`TensorView`] is
//! guaranteed to hold exactly its tensor's bytes.
//!
//! Tensor bytes are never reinterpreted in place: data in a memory map (or after an odd-sized
//! header) need not be aligned for `f32`/`i64`, so values are decoded with `from_le_bytes`.

mod error;
mod header;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use error::ModelError;
pub use writer::ModelWriter;

/// Element types a model file can hold, spelled as safetensors spells them.
///
/// Serde uses the same spelling as the header ("F32", "BOOL", ...), so a graph stored in the
/// metadata names dtypes exactly as the tensor entries beside it do.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    /// One byte, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer (quantised weights; the scale is stored separately).
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer (ONNX shapes and indices).
    I64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl DType {
    /// `vals` stored as little-endian f16 or bf16 when `self` is one of them, else as f32;
    /// returns the dtype written with the bytes.
    pub fn encode_floats(self, vals: &[f32]) -> (DType, Vec<u8>) {
        match self {
            DType::F16 => (
                DType::F16,
                vals.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                DType::BF16,
                vals.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            _ => (
                DType::F32,
                vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        }
    }

    /// Every dtype, so callers can enumerate them (tests, CLI help).
    pub const ALL: [DType; 10] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// The candle dtype that holds values of this element type while the graph runs: bool as
    /// u8 (0/1), int8 widened to i16 (candle has no i8); the rest as they are.
    pub fn compute_dtype(self) -> candle_core::DType {
        use candle_core::DType as C;
        match self {
            DType::Bool | DType::U8 => C::U8,
            DType::I8 | DType::I16 => C::I16,
            DType::I32 => C::I32,
            DType::I64 => C::I64,
            DType::F16 => C::F16,
            DType::BF16 => C::BF16,
            DType::F32 => C::F32,
            DType::F64 => C::F64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The header spelling, which other safetensors readers require exactly.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Inverse of [`DType::as_str`]; case-sensitive, like other safetensors readers, so a file
    /// we accept is one they accept.
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// True for F16, BF16, F32 and F64.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// product(shape), or None on overflow; the empty shape (a scalar) has one element.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// One header entry. In a [`ModelFile`] these are validated: `end - begin` equals
/// [`TensorInfo::byte_len`] and the range lies inside the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (the header key).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<usize>,
    /// Start offset, relative to the data section, as in the header.
    pub begin: usize,
    /// End offset (exclusive), relative to the data section.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements, or None if the shape overflows `usize` (never for a validated file).
    pub fn numel(&self) -> Option<usize> {
        element_count(&self.shape)
    }

    /// Bytes the shape and dtype need, or None on overflow (never for a validated file).
    pub fn byte_len(&self) -> Option<usize> {
        self.numel()?.checked_mul(self.dtype.size())
    }
}

/// A tensor's header entry and its bytes, borrowed from the file.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The header entry.
    pub info: &'a TensorInfo,
    /// Exactly the tensor's little-endian bytes (possibly unaligned).
    pub data: &'a [u8],
}

/// Decodes fixed-size little-endian elements; the caller has checked the length is a multiple
/// of `N`, and `chunks_exact` ignores any remainder rather than panicking.
fn decode<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

impl<'a> TensorView<'a> {
    /// The fields are public, so a view may be hand-built; conversions check it is consistent
    /// rather than silently truncating.
    fn check(&self) -> Result<(), ModelError> {
        let expected = self.info.byte_len();
        if expected != Some(self.data.len()) {
            return Err(ModelError::ViewMismatch {
                tensor: self.info.name.clone(),
                shape: self.info.shape.clone(),
                dtype: self.info.dtype,
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    /// Copies into a candle tensor on `device`. F32/F16/BF16/F64/I64/I32/I16/U8 keep their
    /// dtype; Bool becomes U8 (0/1) and I8 becomes F32 holding the integer value, because
    /// candle has neither; int8 dequantisation with a scale is done elsewhere.
    pub fn to_candle(
        &self,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor, ModelError> {
        use candle_core::Tensor;
        self.check()?;
        let shape = self.info.shape.as_slice();
        let d = self.data;
        let t = match self.info.dtype {
            DType::Bool => Tensor::from_vec(
                d.iter().map(|&b| u8::from(b != 0)).collect::<Vec<u8>>(),
                shape,
                device,
            ),
            DType::U8 => Tensor::from_vec(d.to_vec(), shape, device),
            DType::I8 => Tensor::from_vec(
                decode(d, |b: [u8; 1]| f32::from(i8::from_le_bytes(b))),
                shape,
                device,
            ),
            DType::I16 => Tensor::from_vec(decode(d, i16::from_le_bytes), shape, device),
            DType::I32 => Tensor::from_vec(decode(d, i32::from_le_bytes), shape, device),
            DType::I64 => Tensor::from_vec(decode(d, i64::from_le_bytes), shape, device),
            DType::F16 => Tensor::from_vec(decode(d, half::f16::from_le_bytes), shape, device),
            DType::BF16 => Tensor::from_vec(decode(d, half::bf16::from_le_bytes), shape, device),
            DType::F32 => Tensor::from_vec(decode(d, f32::from_le_bytes), shape, device),
            DType::F64 => Tensor::from_vec(decode(d, f64::from_le_bytes), shape, device),
        };
        t.map_err(|e| ModelError::Candle {
            tensor: self.info.name.clone(),
            source: Box::new(e),
        })
    }

    /// All elements as f32 (row-major). Bool gives 0.0/1.0; I64/I32/F64 values beyond f32's
    /// precision are rounded, which is fine for the weights and constants this is used on.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, ModelError> {
        self.check()?;
        let d = self.data;
        Ok(match self.info.dtype {
            DType::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
            DType::U8 => d.iter().map(|&b| f32::from(b)).collect(),
            DType::I8 => decode(d, |b: [u8; 1]| f32::from(i8::from_le_bytes(b))),
            DType::I16 => decode(d, |b| f32::from(i16::from_le_bytes(b))),
            DType::I32 => decode(d, |b| i32::from_le_bytes(b) as f32),
            DType::I64 => decode(d, |b| i64::from_le_bytes(b) as f32),
            DType::F16 => decode(d, |b| half::f16::from_le_bytes(b).to_f32()),
            DType::BF16 => decode(d, |b| half::bf16::from_le_bytes(b).to_f32()),
            DType::F32 => decode(d, f32::from_le_bytes),
            DType::F64 => decode(d, |b| f64::from_le_bytes(b) as f32),
        })
    }

    /// All elements as i64 (row-major), for shapes, indices and axes. Floats are refused rather
    /// than truncated, since a float where an integer is expected means a broken graph.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, ModelError> {
        self.check()?;
        let d = self.data;
        Ok(match self.info.dtype {
            DType::Bool => d.iter().map(|&b| i64::from(b != 0)).collect(),
            DType::U8 => d.iter().map(|&b| i64::from(b)).collect(),
            DType::I8 => decode(d, |b: [u8; 1]| i64::from(i8::from_le_bytes(b))),
            DType::I16 => decode(d, |b| i64::from(i16::from_le_bytes(b))),
            DType::I32 => decode(d, |b| i64::from(i32::from_le_bytes(b))),
            DType::I64 => decode(d, i64::from_le_bytes),
            dtype @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64) => {
                return Err(ModelError::NotInteger {
                    tensor: self.info.name.clone(),
                    dtype,
                })
            }
        })
    }
}

/// Where the file's bytes live. All three are immutable for the life of the [`ModelFile`].
enum Storage {
    Mmap(memmap2::Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Static(b) => b,
            Storage::Owned(v) => v,
        }
    }
}

/// A validated model file. Tensor bytes are borrowed, not copied, until converted.
pub struct ModelFile {
    storage: Storage,
    label: String,
    metadata: BTreeMap<String, String>,
    /// Sorted by (begin, end): file order.
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
    data_bytes: usize,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("label", &self.label)
            .field("file_size", &self.file_size())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl ModelFile {
    /// Memory-maps `path` read-only, so opening a large model costs no copy and pages are
    /// loaded on first use; the file is validated before this returns.
    ///
    /// The file must not be truncated or rewritten in place while the returned value (or any
    /// view from it) is alive: the bytes are read straight from the mapping. Replacing it by
    /// rename, as [`ModelWriter::write`] does, is safe.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile, ModelError> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let io_err = |action: &'static str, source: std::io::Error| ModelError::Io {
            label: label.clone(),
            action,
            cause: source,
        };
        let file = std::fs::File::open(path).map_err(|e| io_err("open", e))?;
        let len = file.metadata().map_err(|e| io_err("stat", e))?.len();
        if len < header::PREFIX_LEN as u64 {
            // Reported before mapping: a zero-length mapping is an error on some platforms, and
            // this is the more useful message anyway.
            return Err(ModelError::Truncated {
                label,
                len: len as usize, // < 8, fits
            });
        }
        // SAFETY: the map is read-only (PROT_READ) and we never create a mutable reference into
        // it. What Rust cannot guarantee is that no other process truncates or rewrites the
        // file while it is mapped; that would change or remove bytes under our `&[u8]` (or
        // raise SIGBUS). The documented contract is that
        // a model file must not be modified while a ModelFile maps it; ModelWriter::write
        // replaces files by rename, which leaves an existing mapping on the old inode intact.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err("memory-map", e))?;
        Self::from_storage(Storage::Mmap(mmap), label)
    }

    /// Tells the kernel the mapped pages are not needed now (after the weights were copied or
    /// packed at load), so they leave the process's resident set; a later read faults them
    /// back in from the file. No effect on embedded or owned bytes.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mmap(m) = &self.storage {
            // SAFETY: the map is read-only and file-backed: DontNeed only drops clean pages,
            // which later reads fetch again from the file, unchanged.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// As [`ModelFile::release_pages`] for one tensor's bytes, once they were copied or packed:
    /// only whole 64 KiB blocks inside the tensor are released (a multiple of every page size
    /// in use), so neighbouring tensors keep their pages.
    pub fn release_tensor(&self, name: &str) {
        #[cfg(unix)]
        if let (Storage::Mmap(m), Some(info)) = (
            &self.storage,
            self.index.get(name).and_then(|&i| self.tensors.get(i)),
        ) {
            const BLOCK: usize = 64 << 10;
            let (begin, end) = (self.data_start + info.begin, self.data_start + info.end);
            let (a, b) = (begin.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
            if b > a && b <= m.len() {
                // SAFETY: as in release_pages; the range lies inside the map.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }

    /// For a model embedded with `include_bytes!`: no file system needed, nothing copied.
    pub fn from_static(
        bytes: &'static [u8],
        label: impl Into<String>,
    ) -> Result<ModelFile, ModelError> {
        Self::from_storage(Storage::Static(bytes), label.into())
    }

    /// For a model already in memory (downloaded, decrypted, generated in a test).
    pub fn from_vec(bytes: Vec<u8>, label: impl Into<String>) -> Result<ModelFile, ModelError> {
        Self::from_storage(Storage::Owned(bytes), label.into())
    }

    fn from_storage(storage: Storage, label: String) -> Result<ModelFile, ModelError> {
        let parsed = header::parse(storage.bytes(), &label)?;
        let index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(ModelFile {
            storage,
            label,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index,
            data_start: parsed.data_start,
            data_bytes: parsed.data_bytes,
        })
    }

    /// The path or label given at load time; every error message starts with it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The header's `__metadata__` map (empty if the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Header entries in file order (by begin offset), which is also the cheapest order to
    /// read an mmap in.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.iter()
    }

    /// The named tensor's entry and bytes, or None if the file has no such tensor.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.tensors.get(*self.index.get(name)?)?;
        let begin = self.data_start.checked_add(info.begin)?;
        let end = self.data_start.checked_add(info.end)?;
        // In range by validation; `get` keeps even a logic error from panicking.
        let data = self.storage.bytes().get(begin..end)?;
        Some(TensorView { info, data })
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True if the file has no tensors (metadata only).
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total file length in bytes, header included.
    pub fn file_size(&self) -> usize {
        self.storage.bytes().len()
    }

    /// Sum of tensor byte lengths (excludes header, gaps and trailing padding).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// SHA-256 of the whole file, lowercase hex, to record which exact file produced a result.
    /// Computed on each call (it reads every byte), so callers should keep the result.
    pub fn sha256_hex(&self) -> String {
        use sha2::{Digest, Sha256};
        use std::fmt::Write;
        let digest = Sha256::digest(self.storage.bytes());
        let mut s = String::with_capacity(64);
        for b in digest {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A hand-made file: header {"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} padded
    // to 56 bytes, then 1.0f32 and -2.5f32 little-endian.
    static EMBEDDED: &[u8] = b"\x38\0\0\0\0\0\0\0\
        {\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  \
        \x00\x00\x80\x3f\x00\x00\x20\xc0";

    #[test]
    fn from_static_reads_embedded_model() {
        let f = ModelFile::from_static(EMBEDDED, "embedded").expect("valid embedded model");
        assert_eq!(f.label(), "embedded");
        assert_eq!(f.len(), 1);
        assert!(f.metadata().is_empty());
        let v = f.get("x").expect("tensor x");
        assert_eq!(v.info.shape, vec![2]);
        assert_eq!(v.to_f32_vec().expect("f32"), vec![1.0, -2.5]);
        assert_eq!(f.file_size(), EMBEDDED.len());
        assert_eq!(f.data_bytes(), 8);
    }

    #[test]
    fn dtype_strings_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::parse("f32"), None);
    }

    #[test]
    fn dtype_serde_uses_header_spelling() {
        for d in DType::ALL {
            let json = serde_json::to_string(&d).expect("serialise");
            assert_eq!(json, format!("\"{}\"", d.as_str()));
            assert_eq!(serde_json::from_str::<DType>(&json).expect("parse"), d);
        }
    }

    #[test]
    fn model_file_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ModelFile>();
    }
}
