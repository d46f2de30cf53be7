//! Device selection with the reason recorded, so a report says why a frame ran where it did.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 when built with `cuda` and one is present, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// A specific CUDA device; an error when unavailable.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
                _ => Err(format!("unknown device '{s}' (auto, cpu, cuda:N)")),
            },
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => write!(f, "auto"),
            DeviceRequest::Cpu => write!(f, "cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device chosen and why.
#[derive(Debug, Clone)]
pub struct DeviceChoice {
    /// The candle device.
    pub device: Device,
    /// Short name for reports: `cpu` or `cuda:N`.
    pub name: String,
    /// Why this device was chosen.
    pub reason: String,
}

/// Picks the device for `req`. Auto falls back to the CPU and says why.
pub fn select(req: DeviceRequest) -> Result<DeviceChoice> {
    let cpu = |reason: String| DeviceChoice {
        device: Device::Cpu,
        name: "cpu".into(),
        reason,
    };
    match req {
        DeviceRequest::Cpu => Ok(cpu("requested".into())),
        DeviceRequest::Cuda(n) => try_cuda(n).map_err(|reason| Error::Device {
            requested: req.to_string(),
            reason,
        }),
        DeviceRequest::Auto => match try_cuda(0) {
            Ok(c) => Ok(c),
            Err(reason) => Ok(cpu(format!("auto: {reason}"))),
        },
    }
}

/// The first usable device of a preference list (a board profile's `devices`); the reason
/// says what was passed over. An error only when none is usable.
pub fn select_first(prefs: &[DeviceRequest]) -> Result<DeviceChoice> {
    if let [only] = prefs {
        return select(*only);
    }
    let mut skipped = Vec::new();
    for &req in prefs {
        match select(req) {
            Ok(mut c) => {
                if !skipped.is_empty() {
                    c.reason = format!("{}; next in the preference list", skipped.join("; "));
                }
                return Ok(c);
            }
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(Error::Device {
        requested: prefs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        reason: if skipped.is_empty() {
            "no device listed".into()
        } else {
            skipped.join("; ")
        },
    })
}

#[cfg(feature = "cuda")]
fn try_cuda(n: usize) -> std::result::Result<DeviceChoice, String> {
    match Device::new_cuda(n) {
        Ok(device) => Ok(DeviceChoice {
            device,
            name: format!("cuda:{n}"),
            reason: "CUDA device available".into(),
        }),
        // candle appends a backtrace when RUST_BACKTRACE is set: the reason is its first line.
        Err(e) => Err(format!(
            "no CUDA device {n}: {}",
            e.to_string().lines().next().unwrap_or_default()
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn try_cuda(_n: usize) -> std::result::Result<DeviceChoice, String> {
    Err("cuda feature not built (rebuild with --features cuda)".into())
}
