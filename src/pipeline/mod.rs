//! Frames and their sources, and preprocessing from the model's metadata.

pub mod preprocess;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One frame as it enters the runtime.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Frame number within the run.
    pub id: u64,
    /// Where it came from (file path, camera name).
    pub source: String,
    /// Its content.
    pub data: FrameData,
}

/// Frame content, decoded lazily so decoding is timed as part of the frame.
#[derive(Debug, Clone)]
pub enum FrameData {
    /// An image file to read and decode.
    Path(PathBuf),
    /// Encoded image bytes (PNG, JPEG).
    Encoded(std::sync::Arc<[u8]>),
    /// An already decoded image.
    Image(std::sync::Arc<image::DynamicImage>),
}

impl Frame {
    /// A frame read from a file.
    pub fn from_path(id: u64, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Frame {
            id,
            source: path.display().to_string(),
            data: FrameData::Path(path),
        }
    }

    /// Decodes the frame into an image.
    pub fn decode(&self) -> Result<std::sync::Arc<image::DynamicImage>> {
        let err = |reason: String| Error::Frame {
            frame: self.id,
            source_name: self.source.clone(),
            reason,
        };
        match &self.data {
            FrameData::Image(img) => Ok(img.clone()),
            FrameData::Encoded(bytes) => image::load_from_memory(bytes)
                .map(std::sync::Arc::new)
                .map_err(|e| err(format!("cannot decode image: {e}"))),
            FrameData::Path(p) => {
                let bytes = std::fs::read(p).map_err(|e| err(format!("cannot read: {e}")))?;
                image::load_from_memory(&bytes)
                    .map(std::sync::Arc::new)
                    .map_err(|e| err(format!("cannot decode image: {e}")))
            }
        }
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Expands files and directories (sorted, image extensions only inside directories) into frames.
pub fn frames_from_paths(paths: &[PathBuf]) -> Result<Vec<Frame>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
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
    Ok(files
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
