//! Board profiles: what a deployment target offers (devices in order of preference, CPU
//! threads, memory, the default frame budget), read from `boards/*.toml`. The profiles in
//! the repository are compiled in, so `--board jetson-orin-nx-8gb` works from any directory;
//! a path loads any other file.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::DeviceRequest;
use crate::error::{Error, Result};

/// The element type a board computes in where the device supports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// Half precision (Jetson GPUs).
    F16,
    /// bfloat16.
    Bf16,
}

impl ComputeDtype {
    /// candle's element type.
    pub fn candle(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::F16 => candle_core::DType::F16,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ComputeDtype::F32),
            "f16" => Ok(ComputeDtype::F16),
            "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(format!("unknown compute dtype '{other}' (f32, f16, bf16)")),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::F16 => "f16",
            ComputeDtype::Bf16 => "bf16",
        })
    }
}

/// A board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// Short name (`jetson-orin-nx-8gb`).
    pub name: String,
    /// One line for `edgeinfer boards`.
    pub description: String,
    /// Rust target triple of the binary for this board.
    pub target: String,
    /// Devices in order of preference (`cuda:0`, `cpu`): the first usable one runs.
    pub devices: Vec<String>,
    /// Element type to compute in where the device supports it.
    pub compute_dtype: ComputeDtype,
    /// Threads per frame on the CPU.
    pub cpu_threads: usize,
    /// Memory the model may use, in MB (CPU and GPU together on Jetson's shared memory).
    pub memory_mb: u64,
    /// Default per-frame latency budget in ms.
    pub budget_ms: f64,
    /// Setup advice (power mode, clocks, cooling).
    #[serde(default)]
    pub notes: String,
}

/// The profiles shipped in `boards/`, by name.
const BUILTIN: &[(&str, &str)] = &[
    (
        "jetson-orin-nx-8gb",
        include_str!("../boards/jetson-orin-nx-8gb.toml"),
    ),
    (
        "jetson-orin-nx-16gb",
        include_str!("../boards/jetson-orin-nx-16gb.toml"),
    ),
    (
        "jetson-orin-nano-8gb",
        include_str!("../boards/jetson-orin-nano-8gb.toml"),
    ),
    (
        "jetson-agx-orin-64gb",
        include_str!("../boards/jetson-agx-orin-64gb.toml"),
    ),
    (
        "raspberry-pi-5",
        include_str!("../boards/raspberry-pi-5.toml"),
    ),
    ("x86-64-cpu", include_str!("../boards/x86-64-cpu.toml")),
];

impl Board {
    /// Parses and checks a profile; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Board> {
        let bad = |reason: String| Error::Board {
            board: source.to_string(),
            reason,
        };
        // toml's message names the offending key (unknown ones included) and its line.
        let board: Board = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if board.devices.is_empty() {
            return Err(bad("key `devices`: no device listed".into()));
        }
        for d in &board.devices {
            board_device(d).map_err(|e| bad(format!("key `devices`: {e}")))?;
        }
        if board.cpu_threads == 0 || board.cpu_threads > 1024 {
            return Err(bad(format!(
                "key `cpu_threads`: {} (expected 1 to 1024)",
                board.cpu_threads
            )));
        }
        if board.memory_mb == 0 {
            return Err(bad("key `memory_mb`: 0 (expected a size in MB)".into()));
        }
        if !(board.budget_ms.is_finite() && board.budget_ms > 0.0) {
            return Err(bad(format!(
                "key `budget_ms`: {} (expected a positive number of ms)",
                board.budget_ms
            )));
        }
        if board.name.trim().is_empty() {
            return Err(bad("key `name`: empty".into()));
        }
        Ok(board)
    }

    /// A shipped profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<Board> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Board::parse(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.exists() || name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
                path: path.display().to_string(),
                cause: e,
            })?;
            return Board::parse(&text, name_or_path);
        }
        Err(Error::Board {
            board: name_or_path.to_string(),
            reason: format!(
                "no such board (shipped: {}; or give a path to a .toml profile)",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    /// Every shipped profile.
    pub fn builtin() -> Result<Vec<Board>> {
        BUILTIN.iter().map(|(n, t)| Board::parse(t, n)).collect()
    }

    /// The device preference as requests, in order.
    pub fn device_requests(&self) -> Vec<DeviceRequest> {
        self.devices
            .iter()
            .filter_map(|d| board_device(d).ok())
            .collect()
    }

    /// The memory budget in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1 << 20)
    }
}

/// A device name as profiles write it: `cpu` or `cuda:N` (no `auto`: a profile is explicit).
fn board_device(s: &str) -> std::result::Result<DeviceRequest, String> {
    match DeviceRequest::from_str(s)? {
        DeviceRequest::Auto => Err("'auto' is not a device; list them in order instead".into()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse_and_are_named_after_their_files() {
        let boards = Board::builtin().unwrap();
        assert_eq!(boards.len(), BUILTIN.len());
        for (b, (file, _)) in boards.iter().zip(BUILTIN) {
            assert_eq!(&b.name, file);
            assert!(!b.device_requests().is_empty());
        }
        let nx = Board::load("jetson-orin-nx-8gb").unwrap();
        assert_eq!(
            nx.device_requests(),
            vec![DeviceRequest::Cuda(0), DeviceRequest::Cpu]
        );
        assert_eq!(nx.compute_dtype, ComputeDtype::F16);
    }

    fn err(text: &str) -> String {
        Board::parse(text, "test.toml").unwrap_err().to_string()
    }

    const GOOD: &str = r#"
name = "b"
description = "d"
target = "aarch64-unknown-linux-gnu"
devices = ["cpu"]
compute_dtype = "f32"
cpu_threads = 4
memory_mb = 1024
budget_ms = 100.0
"#;

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_key() {
        assert!(Board::parse(GOOD, "good").is_ok());
        let e = err(&format!("{GOOD}cpu_thread = 3\n"));
        assert!(e.contains("cpu_thread") && e.contains("test.toml"), "{e}");
        let e = err(&GOOD.replace("cpu_threads = 4", "cpu_threads = 0"));
        assert!(e.contains("cpu_threads"), "{e}");
        let e = err(&GOOD.replace("\"f32\"", "\"f8\""));
        assert!(e.contains("compute_dtype") || e.contains("f8"), "{e}");
        let e = err(&GOOD.replace("[\"cpu\"]", "[\"tpu:0\"]"));
        assert!(e.contains("devices") && e.contains("tpu:0"), "{e}");
        let e = err(&GOOD.replace("[\"cpu\"]", "[\"auto\"]"));
        assert!(e.contains("devices"), "{e}");
        let e = err(&GOOD.replace("budget_ms = 100.0", "budget_ms = -1.0"));
        assert!(e.contains("budget_ms"), "{e}");
        let e = err(&GOOD.replace("memory_mb = 1024\n", ""));
        assert!(e.contains("memory_mb"), "{e}");
        let e = err(&GOOD.replace("cpu_threads = 4", "cpu_threads = \"four\""));
        assert!(e.contains("cpu_threads"), "{e}");
    }

    #[test]
    fn unknown_board_lists_the_shipped_ones() {
        let e = Board::load("jetson-tx9").unwrap_err().to_string();
        assert!(
            e.contains("jetson-orin-nx-8gb") && e.contains("x86-64-cpu"),
            "{e}"
        );
        let e = Board::load("/nonexistent/board.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/board.toml"), "{e}");
    }
}
