//! Parsing and validation of the safetensors header.
//!
//! Everything here treats the file as hostile: lengths are checked before slicing, arithmetic is
//! checked, and nothing is indexed without `get`. The result is a list of tensors whose byte
//! ranges are known to lie inside the data section, so later accesses cannot fail.

use std::collections::{BTreeMap, HashSet};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::{DType, ModelError, TensorInfo};

/// Bytes of the little-endian header length prefix.
pub(crate) const PREFIX_LEN: usize = 8;

/// Largest accepted header, the same limit the `safetensors` crate applies, so a file we accept
/// is never refused by it for its header size (and a corrupt length cannot make us allocate).
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// Key of the free-form string map in the header.
pub(crate) const METADATA_KEY: &str = "__metadata__";

/// What a validated header yields.
pub(crate) struct Parsed {
    pub metadata: BTreeMap<String, String>,
    /// Sorted by (begin, end), i.e. file order.
    pub tensors: Vec<TensorInfo>,
    /// Offset of the data section from the start of the file.
    pub data_start: usize,
    pub data_bytes: usize,
}

/// Top-level header entries in file order, duplicates kept, so that a repeated tensor name is
/// reported instead of silently letting the last entry win (as a plain JSON map would).
struct RawHeader(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object mapping tensor names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(RawHeader(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// Validates the whole file layout and header; see the module docs of [`super`] for the rules.
pub(crate) fn parse(bytes: &[u8], label: &str) -> Result<Parsed, ModelError> {
    let file_len = bytes.len();
    let Some(prefix) = bytes.first_chunk::<PREFIX_LEN>() else {
        return Err(ModelError::Truncated {
            label: label.to_string(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*prefix);
    let available = file_len - PREFIX_LEN; // cannot underflow: the prefix was present
    let header_len_usize = match usize::try_from(header_len) {
        Ok(n) if n <= available => n,
        _ => {
            return Err(ModelError::HeaderPastEnd {
                label: label.to_string(),
                header_len,
                available,
                file_len,
            })
        }
    };
    if header_len > MAX_HEADER_LEN {
        return Err(ModelError::HeaderTooLarge {
            label: label.to_string(),
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    let data_start = PREFIX_LEN + header_len_usize; // <= file_len, checked above
    let header_bytes = bytes.get(PREFIX_LEN..data_start).unwrap_or_default();
    let data_len = file_len - data_start;

    let bad = |tensor: Option<&str>, reason: String| ModelError::BadHeader {
        label: label.to_string(),
        tensor: tensor.map(str::to_string),
        reason,
    };

    let text = std::str::from_utf8(header_bytes)
        .map_err(|e| bad(None, format!("header is not UTF-8: {e}")))?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => bad(None, format!("header is not a JSON object: {e}")),
            _ => bad(None, format!("header is not valid JSON: {e}")),
        }
    })?;

    let mut metadata = None;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if !seen.insert(name.clone()) {
            let what = if name == METADATA_KEY {
                None
            } else {
                Some(name.as_str())
            };
            return Err(bad(what, format!("key '{name}' appears more than once")));
        }
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(value).map_err(|r| bad(None, r))?);
            continue;
        }
        let entry = parse_entry(&name, value, label)?;
        tensors.push(entry);
    }

    let mut data_bytes = 0usize;
    for t in &tensors {
        check_tensor(t, data_len, label)?;
        // Overlap is checked below, so the sum of ranges is at most data_len; checked anyway.
        data_bytes = data_bytes.saturating_add(t.end - t.begin);
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    check_overlaps(&tensors, label)?;

    Ok(Parsed {
        metadata: metadata.unwrap_or_default(),
        tensors,
        data_start,
        data_bytes,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{METADATA_KEY} must be an object of strings, found {}",
            json_kind(&value)
        ));
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        match v {
            Value::String(s) => {
                out.insert(k, s);
            }
            other => {
                return Err(format!(
                    "{METADATA_KEY} value for key '{k}' must be a string, found {}",
                    json_kind(&other)
                ))
            }
        }
    }
    Ok(out)
}

/// Reads a JSON number as a non-negative integer that fits `usize`.
fn as_index(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn parse_entry(name: &str, value: Value, label: &str) -> Result<TensorInfo, ModelError> {
    let bad = |reason: String| ModelError::BadHeader {
        label: label.to_string(),
        tensor: Some(name.to_string()),
        reason,
    };
    let Value::Object(map) = value else {
        return Err(bad(format!(
            "entry must be an object with dtype, shape and data_offsets, found {}",
            json_kind(&value)
        )));
    };
    // Unknown keys are refused: the format defines exactly these three, and a key we do not
    // understand (say, a quantisation scale) would otherwise be silently ignored.
    if let Some(extra) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(bad(format!("unexpected field '{extra}'")));
    }

    let dtype_str = match map.get("dtype") {
        None => return Err(bad("missing field 'dtype'".to_string())),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(bad(format!(
                "field 'dtype' must be a string, found {}",
                json_kind(other)
            )))
        }
    };

    let shape = match map.get("shape") {
        None => return Err(bad("missing field 'shape'".to_string())),
        Some(Value::Array(dims)) => {
            let mut shape = Vec::with_capacity(dims.len());
            for (i, d) in dims.iter().enumerate() {
                match as_index(d) {
                    Some(n) => shape.push(n),
                    None => {
                        return Err(bad(format!(
                            "shape[{i}] = {d} is not a non-negative integer"
                        )))
                    }
                }
            }
            shape
        }
        Some(other) => {
            return Err(bad(format!(
                "field 'shape' must be an array, found {}",
                json_kind(other)
            )))
        }
    };

    let (begin, end) = match map.get("data_offsets") {
        None => return Err(bad("missing field 'data_offsets'".to_string())),
        Some(Value::Array(offs)) => match offs.as_slice() {
            [b, e] => match (as_index(b), as_index(e)) {
                (Some(b), Some(e)) => (b, e),
                _ => {
                    return Err(bad(format!(
                        "data_offsets [{b}, {e}] must be non-negative integers"
                    )))
                }
            },
            _ => {
                return Err(bad(format!(
                    "data_offsets must have 2 elements, found {}",
                    offs.len()
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "field 'data_offsets' must be an array, found {}",
                json_kind(other)
            )))
        }
    };

    let Some(dtype) = DType::parse(dtype_str) else {
        return Err(ModelError::UnknownDType {
            label: label.to_string(),
            tensor: name.to_string(),
            dtype: dtype_str.clone(),
        });
    };

    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

fn check_tensor(t: &TensorInfo, data_len: usize, label: &str) -> Result<(), ModelError> {
    let Some(expected) = t.byte_len() else {
        return Err(ModelError::ShapeOverflow {
            label: label.to_string(),
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
        });
    };
    if t.begin > t.end || t.end > data_len {
        return Err(ModelError::BadOffsets {
            label: label.to_string(),
            tensor: t.name.clone(),
            begin: t.begin,
            end: t.end,
            data_len,
        });
    }
    let actual = t.end - t.begin;
    if expected != actual {
        return Err(ModelError::SizeMismatch {
            label: label.to_string(),
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            expected,
            actual,
        });
    }
    Ok(())
}

/// `tensors` must be sorted by begin. Empty ranges hold no bytes and overlap nothing.
fn check_overlaps(tensors: &[TensorInfo], label: &str) -> Result<(), ModelError> {
    // The earlier non-empty tensor reaching furthest: if any earlier range overlaps the current
    // one, this one does (all earlier ranges start at or before the current begin).
    let mut furthest: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.begin < t.end) {
        if let Some(prev) = furthest {
            if t.begin < prev.end {
                return Err(ModelError::Overlap {
                    label: label.to_string(),
                    first: prev.name.clone(),
                    first_range: [prev.begin, prev.end],
                    second: t.name.clone(),
                    second_range: [t.begin, t.end],
                });
            }
        }
        if furthest.is_none_or(|p| t.end > p.end) {
            furthest = Some(t);
        }
    }
    Ok(())
}
