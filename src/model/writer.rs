//! Writing model files.
//!
//! Tensors are packed back to back in insertion order starting at data offset 0, with no
//! alignment padding: the `safetensors` crate (and so the Python package, which wraps it)
//! refuses files whose tensors leave gaps or do not cover the data section exactly.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::header::{MAX_HEADER_LEN, METADATA_KEY, PREFIX_LEN};
use super::{element_count, DType, ModelError};

struct Pending {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Builds a model file: a string metadata map plus named tensors, written atomically.
#[derive(Default)]
pub struct ModelWriter {
    metadata: BTreeMap<String, String>,
    tensors: Vec<Pending>,
    names: HashSet<String>,
}

impl std::fmt::Debug for ModelWriter {
    // The tensor bytes are omitted: they can be hundreds of megabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWriter")
            .field("metadata", &self.metadata)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Shared by the file and in-memory outputs so both produce identical bytes.
struct Layout {
    /// Length prefix + padded JSON header.
    head: Vec<u8>,
    total_len: usize,
}

impl ModelWriter {
    /// An empty model: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of tensor data added so far.
    pub fn data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes.len()).sum()
    }

    /// Sets (or replaces) a metadata entry; the graph and provenance live here.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Adds a tensor from its little-endian bytes. The length is checked here, at the point the
    /// mistake is made, rather than surfacing later as an unreadable file.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<(), ModelError> {
        let name = name.into();
        if name == METADATA_KEY {
            return Err(ModelError::InvalidTensor {
                tensor: name,
                reason: format!("'{METADATA_KEY}' is reserved for the metadata map"),
            });
        }
        if self.names.contains(&name) {
            return Err(ModelError::DuplicateTensor { tensor: name });
        }
        let expected = element_count(&shape).and_then(|n| n.checked_mul(dtype.size()));
        match expected {
            None => {
                return Err(ModelError::InvalidTensor {
                    reason: format!("shape {shape:?} of {dtype} overflows the byte count"),
                    tensor: name,
                })
            }
            Some(expected) if expected != bytes.len() => {
                return Err(ModelError::InvalidTensor {
                    reason: format!(
                        "shape {shape:?} of {dtype} needs {expected} bytes, got {}",
                        bytes.len()
                    ),
                    tensor: name,
                })
            }
            Some(_) => {}
        }
        self.names.insert(name.clone());
        self.tensors.push(Pending {
            name,
            dtype,
            shape,
            bytes,
        });
        Ok(())
    }

    /// Adds a candle tensor (copied to the host if needed) with the same dtype.
    pub fn add_candle(
        &mut self,
        name: impl Into<String>,
        tensor: &candle_core::Tensor,
    ) -> Result<(), ModelError> {
        use candle_core::DType as C;
        let name = name.into();
        let shape = tensor.dims().to_vec();
        let candle_err = |name: &str, e: candle_core::Error| ModelError::Candle {
            tensor: name.to_string(),
            source: Box::new(e),
        };
        let flat = tensor.flatten_all().map_err(|e| candle_err(&name, e))?;
        let (dtype, bytes) = match tensor.dtype() {
            C::U8 => (DType::U8, flat.to_vec1::<u8>()),
            C::I16 => (
                DType::I16,
                flat.to_vec1::<i16>()
                    .map(|v| le_bytes(&v, i16::to_le_bytes)),
            ),
            C::I32 => (
                DType::I32,
                flat.to_vec1::<i32>()
                    .map(|v| le_bytes(&v, i32::to_le_bytes)),
            ),
            C::I64 => (
                DType::I64,
                flat.to_vec1::<i64>()
                    .map(|v| le_bytes(&v, i64::to_le_bytes)),
            ),
            C::F16 => (
                DType::F16,
                flat.to_vec1::<half::f16>()
                    .map(|v| le_bytes(&v, half::f16::to_le_bytes)),
            ),
            C::BF16 => (
                DType::BF16,
                flat.to_vec1::<half::bf16>()
                    .map(|v| le_bytes(&v, half::bf16::to_le_bytes)),
            ),
            C::F32 => (
                DType::F32,
                flat.to_vec1::<f32>()
                    .map(|v| le_bytes(&v, f32::to_le_bytes)),
            ),
            C::F64 => (
                DType::F64,
                flat.to_vec1::<f64>()
                    .map(|v| le_bytes(&v, f64::to_le_bytes)),
            ),
            other => {
                return Err(ModelError::UnsupportedCandleDType {
                    tensor: name,
                    dtype: other,
                })
            }
        };
        let bytes = bytes.map_err(|e| candle_err(&name, e))?;
        self.add_tensor(name, dtype, shape, bytes)
    }

    /// The whole file in memory; `write` streams instead, to avoid a second copy of the weights.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let layout = self.layout("ModelWriter output")?;
        let mut out = Vec::with_capacity(layout.total_len);
        out.extend_from_slice(&layout.head);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
        }
        Ok(out)
    }

    /// Writes to a temporary file in the destination directory and renames it over `path`, so
    /// a reader (or a crash) never sees a half-written model.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let layout = self.layout(&label)?;
        let tmp = temp_path(path);
        let io_err = |action: &'static str, source: std::io::Error| ModelError::Io {
            label: label.clone(),
            action,
            cause: source,
        };

        let result = (|| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err("create the temporary file", e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            w.write_all(&layout.head).map_err(|e| io_err("write", e))?;
            for t in &self.tensors {
                w.write_all(&t.bytes).map_err(|e| io_err("write", e))?;
            }
            let file = w
                .into_inner()
                .map_err(|e| io_err("write", e.into_error()))?;
            file.sync_all().map_err(|e| io_err("sync", e))?;
            drop(file);
            std::fs::rename(&tmp, path).map_err(|e| io_err("rename the temporary file", e))
        })();
        if result.is_err() {
            // Best effort: the original error is the one worth reporting.
            let _ = std::fs::remove_file(&tmp);
            return result;
        }
        // Make the rename itself durable; failure here loses nothing already written.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn layout(&self, label: &str) -> Result<Layout, ModelError> {
        let overflow = |what: &str| ModelError::InvalidTensor {
            tensor: what.to_string(),
            reason: "total model size overflows usize".to_string(),
        };
        let mut header = Map::new();
        let meta: Map<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert(METADATA_KEY.to_string(), Value::Object(meta));
        let mut offset = 0usize;
        for t in &self.tensors {
            let end = offset
                .checked_add(t.bytes.len())
                .ok_or_else(|| overflow(&t.name))?;
            let mut entry = Map::new();
            entry.insert("dtype".into(), Value::String(t.dtype.as_str().into()));
            entry.insert("shape".into(), Value::from(t.shape.clone()));
            entry.insert("data_offsets".into(), Value::from(vec![offset, end]));
            header.insert(t.name.clone(), Value::Object(entry));
            offset = end;
        }
        let mut json = serde_json::to_vec(&Value::Object(header))?;
        // Pad with spaces (valid JSON whitespace) as safetensors does, so the data section
        // starts 8-byte aligned relative to the file start.
        let padded = json.len().next_multiple_of(PREFIX_LEN);
        json.resize(padded, b' ');
        let header_len = padded as u64;
        if header_len > MAX_HEADER_LEN {
            return Err(ModelError::HeaderTooLarge {
                label: label.to_string(),
                header_len,
                limit: MAX_HEADER_LEN,
            });
        }
        let mut head = Vec::with_capacity(PREFIX_LEN + padded);
        head.extend_from_slice(&header_len.to_le_bytes());
        head.extend_from_slice(&json);
        let total_len = head
            .len()
            .checked_add(offset)
            .ok_or_else(|| overflow("(all)"))?;
        Ok(Layout { head, total_len })
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&f(v));
    }
    out
}

/// A fresh name beside `path`: same directory (so rename is atomic, never a cross-device copy),
/// unique per process and call (so concurrent writers do not clobber each other's temp file).
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    let tmp_name = format!(".{file_name}.{}.{n}.tmp", std::process::id());
    match path.parent() {
        Some(dir) => dir.join(tmp_name),
        None => PathBuf::from(tmp_name),
    }
}
