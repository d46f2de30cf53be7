//! Frame sources: image files, raw video on a reader (stdin), and a synthetic camera.
//!
//! A source is a blocking producer; the scheduler runs it on a thread of its own. Live
//! sources (cameras, pipes, the synthetic one) produce at their own pace and the newest frame
//! wins; other sources (files) hand out the next frame only when the engine asks.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::{DynamicImage, RgbImage};

use super::raw::{parse_size, PixelFormat};
use super::Frame;

/// What a source yields: a frame, or a frame that could not be captured whole.
#[derive(Debug)]
pub enum SourceItem {
    /// A captured frame.
    Frame(Frame),
    /// A frame that entered but is unusable (e.g. a truncated last raw frame): it gets an
    /// `error` report.
    Failed {
        /// Frame number.
        id: u64,
        /// Source name.
        source: String,
        /// When it was read.
        captured: Instant,
        /// What is wrong with it.
        reason: String,
    },
}

/// A producer of frames, run on a thread of its own.
pub trait FrameSource: Send + 'static {
    /// Name for reports and logs.
    fn name(&self) -> String;
    /// Live sources produce at their own pace (the scheduler keeps the newest frame and drops
    /// older waiting ones); others produce when asked.
    fn is_live(&self) -> bool;
    /// Blocks until the next frame; `None` at the end of input.
    fn next_item(&mut self) -> Option<SourceItem>;
}

/// A source chosen at run time.
impl FrameSource for Box<dyn FrameSource> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn is_live(&self) -> bool {
        (**self).is_live()
    }
    fn next_item(&mut self) -> Option<SourceItem> {
        (**self).next_item()
    }
}

/// Image files in a fixed order, each read when the engine is ready for it.
pub struct FileSource {
    paths: std::vec::IntoIter<PathBuf>,
    next_id: u64,
}

impl FileSource {
    /// Files, directories and glob patterns, expanded by [`super::image_paths`].
    pub fn new(inputs: &[PathBuf]) -> crate::Result<Self> {
        Ok(FileSource {
            paths: super::image_paths(inputs)?.into_iter(),
            next_id: 0,
        })
    }

    /// How many files are left.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True when no file is left.
    pub fn is_empty(&self) -> bool {
        self.paths.len() == 0
    }
}

impl FrameSource for FileSource {
    fn name(&self) -> String {
        "files".into()
    }
    fn is_live(&self) -> bool {
        false
    }
    fn next_item(&mut self) -> Option<SourceItem> {
        let p = self.paths.next()?;
        let f = Frame::from_path(self.next_id, p);
        self.next_id += 1;
        Some(SourceItem::Frame(f))
    }
}

/// Sleeps so that frame `i` is released at `start + i / fps`, without drift.
#[derive(Debug, Clone, Copy)]
struct Pacer {
    start: Instant,
    period: Duration,
}

impl Pacer {
    fn new(fps: f64) -> Self {
        Pacer {
            start: Instant::now(),
            period: Duration::from_secs_f64(1.0 / fps),
        }
    }

    fn wait(&self, i: u64) {
        let due = self.start + self.period.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Parses a frame rate: positive, at most 1000.
pub fn parse_fps(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1000.0 => Ok(v),
        _ => Err(format!("'{s}' is not a frame rate (0 < fps <= 1000)")),
    }
}

/// Raw video frames of one size and pixel format, back to back on a reader (stdin from
/// `ffmpeg -f rawvideo -` or a GStreamer `fdsink`).
pub struct RawSource<R> {
    reader: R,
    name: String,
    width: u32,
    height: u32,
    pix: PixelFormat,
    frame_bytes: usize,
    pacer: Option<Pacer>,
    next_id: u64,
    done: bool,
}

impl<R: Read + Send + 'static> RawSource<R> {
    /// Frames of `width` × `height` in `pix` from `reader`; with `fps`, released no faster
    /// than that (replaying a recording as a camera would send it).
    pub fn new(
        reader: R,
        name: impl Into<String>,
        (width, height): (u32, u32),
        pix: PixelFormat,
        fps: Option<f64>,
    ) -> Result<Self, String> {
        let frame_bytes = pix
            .frame_bytes(width, height)
            .ok_or_else(|| format!("{width}x{height} cannot be held in {pix}"))?;
        Ok(RawSource {
            reader,
            name: name.into(),
            width,
            height,
            pix,
            frame_bytes,
            pacer: fps.map(Pacer::new),
            next_id: 0,
            done: false,
        })
    }

    /// Reads until `buf` is full or the input ends; returns how much was read.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

impl<R: Read + Send + 'static> FrameSource for RawSource<R> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn is_live(&self) -> bool {
        true
    }
    fn next_item(&mut self) -> Option<SourceItem> {
        if self.done {
            return None;
        }
        if let Some(p) = &self.pacer {
            p.wait(self.next_id);
        }
        let id = self.next_id;
        let mut buf = vec![0u8; self.frame_bytes];
        let got = self.fill(&mut buf);
        let captured = Instant::now();
        let failed = |reason: String| SourceItem::Failed {
            id,
            source: self.name.clone(),
            captured,
            reason,
        };
        let item = match got {
            Ok(0) => {
                self.done = true;
                return None;
            }
            Ok(n) if n < self.frame_bytes => {
                self.done = true;
                failed(format!(
                    "truncated frame at the end of the input: {n} of {} bytes ({}x{} {})",
                    self.frame_bytes, self.width, self.height, self.pix
                ))
            }
            Ok(_) => {
                match Frame::from_raw(id, &self.name, self.width, self.height, self.pix, buf) {
                    Ok(mut f) => {
                        f.captured = captured;
                        SourceItem::Frame(f)
                    }
                    Err(e) => failed(e.to_string()),
                }
            }
            Err(e) => {
                self.done = true;
                failed(format!("cannot read: {e}"))
            }
        };
        self.next_id += 1;
        Some(item)
    }
}

/// A deterministic moving test pattern at a fixed rate, for soak tests and benchmarks without
/// a camera: a colour gradient that drifts, a bright square that travels, and the frame
/// number as a bar code along the top edge, so every frame differs and frame `i` is always the
/// same picture.
pub struct SyntheticSource {
    width: u32,
    height: u32,
    fps: f64,
    count: Option<u64>,
    pacer: Option<Pacer>,
    next_id: u64,
}

impl SyntheticSource {
    /// `count` frames (endless when `None`) of `width` × `height` at `fps`.
    pub fn new(width: u32, height: u32, fps: f64, count: Option<u64>) -> Self {
        SyntheticSource {
            width,
            height,
            fps,
            count,
            pacer: None,
            next_id: 0,
        }
    }

    /// Parses `WxH@FPS[:N]` (e.g. `640x480@30`, `640x480@30:300`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (size, rest) = spec
            .split_once('@')
            .ok_or_else(|| format!("'{spec}' is not WxH@FPS[:N] (e.g. 640x480@30:300)"))?;
        let (w, h) = parse_size(size)?;
        let (fps, count) = match rest.split_once(':') {
            Some((f, n)) => (
                parse_fps(f)?,
                Some(
                    n.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("'{n}' is not a frame count"))?,
                ),
            ),
            None => (parse_fps(rest)?, None),
        };
        Ok(SyntheticSource::new(w, h, fps, count))
    }

    /// Frame `i` of the pattern.
    pub fn picture(&self, i: u64) -> DynamicImage {
        let (w, h) = (self.width, self.height);
        let side = (w.min(h) / 4).max(1);
        let span_x = w.saturating_sub(side).max(1) as u64;
        let span_y = h.saturating_sub(side).max(1) as u64;
        // A triangle wave so the square bounces instead of jumping back.
        let bounce = |t: u64, span: u64| {
            let p = t % (2 * span);
            (if p < span { p } else { 2 * span - p }) as u32
        };
        let (sx, sy) = (bounce(i * 7, span_x), bounce(i * 5, span_y));
        let shift = (i * 3) as u32;
        let img = RgbImage::from_fn(w, h, |x, y| {
            if y < 4 && x / 8 < 32 {
                let bit = (i >> (x / 8)) & 1;
                let v = if bit == 1 { 255 } else { 0 };
                return image::Rgb([v, v, v]);
            }
            if (sx..sx + side).contains(&x) && (sy..sy + side).contains(&y) {
                return image::Rgb([250, 240, 60]);
            }
            let r = ((x + shift) * 255 / w.max(1)) as u8;
            let g = (y * 255 / h.max(1)) as u8;
            image::Rgb([r, g, 128u8.wrapping_add(shift as u8)])
        });
        DynamicImage::ImageRgb8(img)
    }
}

impl FrameSource for SyntheticSource {
    fn name(&self) -> String {
        format!("synthetic:{}x{}@{}", self.width, self.height, self.fps)
    }
    fn is_live(&self) -> bool {
        true
    }
    fn next_item(&mut self) -> Option<SourceItem> {
        if self.count.is_some_and(|n| self.next_id >= n) {
            return None;
        }
        let pacer = *self.pacer.get_or_insert_with(|| Pacer::new(self.fps));
        pacer.wait(self.next_id);
        let id = self.next_id;
        self.next_id += 1;
        Some(SourceItem::Frame(Frame::from_image(
            id,
            self.name(),
            self.picture(id),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_moves() {
        let s = SyntheticSource::parse("64x48@1000:3").unwrap();
        assert_eq!(s.picture(5).to_rgb8(), s.picture(5).to_rgb8());
        assert_ne!(s.picture(5).to_rgb8(), s.picture(6).to_rgb8());
        assert!(SyntheticSource::parse("64x48").is_err());
        assert!(SyntheticSource::parse("64x48@0").is_err());
        let mut s = s;
        let mut n = 0;
        while let Some(SourceItem::Frame(f)) = s.next_item() {
            assert_eq!(f.id, n);
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn raw_reports_a_truncated_last_frame() {
        let bytes = vec![7u8; 2 * 2 * 3 * 2 + 5];
        let mut s = RawSource::new(
            std::io::Cursor::new(bytes),
            "stdin",
            (2, 2),
            PixelFormat::Rgb24,
            None,
        )
        .unwrap();
        assert!(matches!(s.next_item(), Some(SourceItem::Frame(f)) if f.id == 0));
        assert!(matches!(s.next_item(), Some(SourceItem::Frame(f)) if f.id == 1));
        match s.next_item() {
            Some(SourceItem::Failed { id, reason, .. }) => {
                assert_eq!(id, 2);
                assert!(reason.contains("5 of 12 bytes"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(s.next_item().is_none());
    }
}
