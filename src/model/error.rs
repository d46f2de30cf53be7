//! Errors from reading and writing model files.
//!
//! Each validation rule has its own variant so that callers (and tests) can tell a truncated
//! download from a lying header without parsing message text. Every message starts with the
//! file label and, where a tensor is involved, names it and the numbers that disagree, so a
//! user can act on the message alone.

use super::DType;

/// Why a model file could not be read, or a model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The operating system refused an operation on the file (open, map, write, rename).
    // The OS error is part of the message (not a `source`), so `{:#}` chains print it once.
    #[error("{label}: cannot {action}: {cause}")]
    Io {
        /// The path the operation was about.
        label: String,
        /// What was being attempted ("open", "memory-map", "write", ...).
        action: &'static str,
        /// The underlying error.
        cause: std::io::Error,
    },

    /// The file cannot even hold the 8-byte header length prefix.
    #[error(
        "{label}: file is truncated: {len} bytes, shorter than the 8-byte header length prefix"
    )]
    Truncated {
        /// The file's path or label.
        label: String,
        /// The file's length in bytes.
        len: usize,
    },

    /// The header length prefix claims more bytes than the file has after the prefix.
    #[error(
        "{label}: header length {header_len} runs past the end of the file \
         (only {available} bytes follow the 8-byte prefix; file is {file_len} bytes)"
    )]
    HeaderPastEnd {
        /// The file's path or label.
        label: String,
        /// The header length read from the prefix.
        header_len: u64,
        /// Bytes available after the prefix.
        available: usize,
        /// The file's length in bytes.
        file_len: usize,
    },

    /// The header is larger than any sane header (safetensors' own 100 MB limit), so the file is
    /// corrupt or hostile; parsing it would waste memory.
    #[error("{label}: header length {header_len} bytes exceeds the {limit}-byte limit")]
    HeaderTooLarge {
        /// The file's path or label.
        label: String,
        /// The header length that was read or would have been written.
        header_len: u64,
        /// The largest accepted header length.
        limit: u64,
    },

    /// The header is not UTF-8, not JSON, not an object, or an entry is malformed.
    #[error("{label}: bad header{}: {reason}", tensor_suffix(.tensor))]
    BadHeader {
        /// The file's path or label.
        label: String,
        /// The tensor entry at fault, when the problem is inside one.
        tensor: Option<String>,
        /// What is wrong, in words.
        reason: String,
    },

    /// A tensor's dtype string is not one this crate knows.
    #[error("{label}: tensor '{tensor}' has unknown dtype \"{dtype}\"")]
    UnknownDType {
        /// The file's path or label.
        label: String,
        /// The tensor.
        tensor: String,
        /// The dtype string as found in the header.
        dtype: String,
    },

    /// The byte size implied by a tensor's shape does not fit in `usize`.
    #[error("{label}: tensor '{tensor}': shape {shape:?} of {dtype} overflows the byte count")]
    ShapeOverflow {
        /// The file's path or label.
        label: String,
        /// The tensor.
        tensor: String,
        /// The shape as found in the header.
        shape: Vec<usize>,
        /// The tensor's dtype.
        dtype: DType,
    },

    /// A tensor's shape and dtype imply a byte length other than its data_offsets span.
    #[error(
        "{label}: tensor '{tensor}': shape {shape:?} of {dtype} needs {expected} bytes, \
         but data_offsets span {actual} bytes"
    )]
    SizeMismatch {
        /// The file's path or label.
        label: String,
        /// The tensor.
        tensor: String,
        /// The shape as found in the header.
        shape: Vec<usize>,
        /// The tensor's dtype.
        dtype: DType,
        /// product(shape) * dtype size.
        expected: usize,
        /// end - begin.
        actual: usize,
    },

    /// A tensor's data_offsets are reversed or reach past the data section.
    #[error(
        "{label}: tensor '{tensor}': data_offsets [{begin}, {end}] {} (data section is {data_len} bytes)",
        offsets_problem(.begin, .end)
    )]
    BadOffsets {
        /// The file's path or label.
        label: String,
        /// The tensor.
        tensor: String,
        /// Start offset, relative to the data section.
        begin: usize,
        /// End offset (exclusive), relative to the data section.
        end: usize,
        /// Length of the data section.
        data_len: usize,
    },

    /// Two tensors claim some of the same bytes, so at least one of them would be garbage.
    #[error(
        "{label}: tensors '{first}' [{}, {}) and '{second}' [{}, {}) overlap",
        .first_range[0], .first_range[1], .second_range[0], .second_range[1]
    )]
    Overlap {
        /// The file's path or label.
        label: String,
        /// The tensor that starts first.
        first: String,
        /// Its data_offsets.
        first_range: [usize; 2],
        /// The tensor that starts inside the first one.
        second: String,
        /// Its data_offsets.
        second_range: [usize; 2],
    },

    /// An integer conversion was asked of a floating-point tensor.
    #[error("tensor '{tensor}': {dtype} is not an integer dtype")]
    NotInteger {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },

    /// A hand-built [`super::TensorView`] whose byte slice does not match its info.
    #[error("tensor '{tensor}': view holds {actual} bytes, but shape {shape:?} of {dtype} needs {}", expected_text(.expected))]
    ViewMismatch {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype.
        dtype: DType,
        /// Bytes the shape needs (None when that overflows).
        expected: Option<usize>,
        /// Bytes the view holds.
        actual: usize,
    },

    /// The tensor engine refused to build or read a tensor.
    #[error("tensor '{tensor}': {source}")]
    Candle {
        /// The tensor.
        tensor: String,
        /// The engine's error (boxed: it is large and errors are rare).
        #[source]
        source: Box<candle_core::Error>,
    },

    /// The writer was given the same tensor name twice.
    #[error("tensor '{tensor}' was added twice")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
    },

    /// The writer was given a tensor it cannot store (length mismatch, reserved name, ...).
    #[error("tensor '{tensor}': {reason}")]
    InvalidTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong, with the numbers involved.
        reason: String,
    },

    /// A candle tensor of a dtype the model file cannot hold (U32, 8-bit floats, ...).
    #[error("tensor '{tensor}': candle dtype {dtype:?} cannot be stored in a model file")]
    UnsupportedCandleDType {
        /// The tensor.
        tensor: String,
        /// The candle dtype.
        dtype: candle_core::DType,
    },

    /// The header could not be serialised (should not happen with string maps and integers).
    #[error("cannot serialise the model header: {0}")]
    Serialize(#[from] serde_json::Error),
}

fn tensor_suffix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(" (tensor '{t}')"),
        None => String::new(),
    }
}

fn offsets_problem(begin: &usize, end: &usize) -> &'static str {
    if begin > end {
        "are reversed (begin > end)"
    } else {
        "reach past the end of the data section"
    }
}

fn expected_text(expected: &Option<usize>) -> String {
    match expected {
        Some(n) => format!("{n}"),
        None => "more bytes than fit in usize".to_string(),
    }
}
