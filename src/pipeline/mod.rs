//! Frames, where they come from, and the scheduler that turns a stream of them into reports.
//!
//! A [`Frame`] carries its capture time: the deadline of a frame is capture time + budget, so
//! time spent waiting for the engine counts against it like any other stage.

pub mod preprocess;
pub mod raw;
pub mod scheduler;
pub mod source;
#[cfg(all(feature = "v4l2", target_os = "linux"))]
pub mod v4l2;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};

pub use raw::PixelFormat;
pub use scheduler::{Pipeline, PipelineOptions, ReportStream};
pub use source::{FileSource, FrameSource, RawSource, SourceItem, SyntheticSource};

/// One frame as it enters the runtime.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Frame number within the run.
    pub id: u64,
    /// Where it came from (file path, camera name).
    pub source: String,
    /// When it was captured (read, grabbed): the frame's deadline is this + the budget.
    pub captured: Instant,
    /// Its content.
    pub data: FrameData,
}

/// Frame content, decoded lazily so decoding is timed as part of the frame.
#[derive(Debug, Clone)]
pub enum FrameData {
    /// An image file to read and decode.
    Path(PathBuf),
    /// Encoded image bytes (PNG, JPEG).
    Encoded(Arc<[u8]>),
    /// An already decoded image (raw video frames become this without a copy where the pixel
    /// format allows, see [`Frame::from_raw`]).
    Image(Arc<image::DynamicImage>),
}

impl Frame {
    /// A frame captured now.
    pub fn new(id: u64, source: impl Into<String>, data: FrameData) -> Self {
        Frame {
            id,
            source: source.into(),
            captured: Instant::now(),
            data,
        }
    }

    /// A frame read from a file (captured now; the file is read when the frame is decoded).
    pub fn from_path(id: u64, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Frame::new(id, path.display().to_string(), FrameData::Path(path))
    }

    /// A frame from encoded bytes (PNG, JPEG).
    pub fn from_encoded(id: u64, source: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        Frame::new(id, source, FrameData::Encoded(bytes.into()))
    }

    /// A frame from a decoded image.
    pub fn from_image(id: u64, source: impl Into<String>, img: image::DynamicImage) -> Self {
        Frame::new(id, source, FrameData::Image(Arc::new(img)))
    }

    /// A frame from a raw pixel buffer of `width` × `height` in `pix`. `rgb24` and `gray8`
    /// buffers become the frame's image without a copy, `bgr24` is swapped in place, `nv12`
    /// is converted. A buffer of the wrong length is an error naming both lengths.
    pub fn from_raw(
        id: u64,
        source: impl Into<String>,
        width: u32,
        height: u32,
        pix: PixelFormat,
        bytes: Vec<u8>,
    ) -> Result<Self> {
        let source = source.into();
        let img = raw::to_image(width, height, pix, bytes).map_err(|reason| Error::Frame {
            frame: id,
            source_name: source.clone(),
            reason,
        })?;
        Ok(Frame::from_image(id, source, img))
    }

    /// Decodes the frame into an image.
    pub fn decode(&self) -> Result<Arc<image::DynamicImage>> {
        let err = |reason: String| Error::Frame {
            frame: self.id,
            source_name: self.source.clone(),
            reason,
        };
        match &self.data {
            FrameData::Image(img) => Ok(img.clone()),
            FrameData::Encoded(bytes) => image::load_from_memory(bytes)
                .map(Arc::new)
                .map_err(|e| err(format!("cannot decode image: {e}"))),
            FrameData::Path(p) => {
                let bytes = std::fs::read(p).map_err(|e| err(format!("cannot read: {e}")))?;
                image::load_from_memory(&bytes)
                    .map(Arc::new)
                    .map_err(|e| err(format!("cannot decode image: {e}")))
            }
        }
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Expands files, directories (sorted, image extensions only) and glob patterns (`*`, `?`,
/// `[..]`; sorted) into image paths, in the order given. A path that does not exist, or a
/// pattern that matches nothing, is an error naming it.
pub fn image_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        let text = p.to_string_lossy();
        if !p.exists() && text.contains(['*', '?', '[']) {
            let bad = |reason: String| Error::Io {
                path: text.to_string(),
                cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
            };
            let mut found = Vec::new();
            for entry in glob::glob(&text).map_err(|e| bad(format!("bad pattern: {e}")))? {
                let f = entry.map_err(|e| bad(e.to_string()))?;
                if f.is_file() {
                    found.push(f);
                }
            }
            if found.is_empty() {
                return Err(bad("the pattern matches no file".into()));
            }
            found.sort();
            files.extend(found);
        } else if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                cause: source,
            })?;
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && is_image(f))
                .collect();
            found.sort();
            files.extend(found);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(Error::Io {
                path: p.display().to_string(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
    }
    Ok(files)
}

/// [`image_paths`] as frames numbered from 0, all stamped now (for code that runs them one
/// after another itself; the pipeline's [`FileSource`] stamps each when it is read).
pub fn frames_from_paths(paths: &[PathBuf]) -> Result<Vec<Frame>> {
    Ok(image_paths(paths)?
        .into_iter()
        .enumerate()
        .map(|(i, f)| Frame::from_path(i as u64, f))
        .collect())
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}
