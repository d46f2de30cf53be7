//! V4L2 cameras (Linux): frames from a memory-mapped capture stream.
//!
//! The camera is asked for a pixel format we can turn into an image ourselves (RGB3, BGR3,
//! YUYV, NV12, GREY) or for MJPEG, whose JPEG bytes are decoded later like any encoded frame,
//! so the decoding is timed as part of the frame.

use std::io;
use std::time::{Duration, Instant};

use v4l::buffer::{Flags as BufferFlags, Type};
use v4l::capability::Flags as CapFlags;
use v4l::format::FourCC;
use v4l::frameinterval::FrameIntervalEnum;
use v4l::framesize::FrameSizeEnum;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::capture::Parameters;
use v4l::video::Capture;
use v4l::{Device, Format, Fraction};

use super::raw::PixelFormat;
use super::source::{FrameSource, SourceItem};
use super::Frame;
use crate::error::Error;

/// How the bytes of one capture buffer become a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A layout [`Frame::from_raw`] takes as is (after dropping row padding).
    Raw(PixelFormat),
    /// Packed 4:2:2, Y0 U Y1 V: converted to RGB here.
    Yuyv,
    /// One JPEG per buffer.
    Mjpeg,
}

/// Formats we accept, best first: raw colour formats need no decoder and the least work, YUYV
/// costs one pass here, MJPEG a JPEG decode per frame, and grey loses the colour the model
/// may want, so it comes last.
const PREFERRED: &[(&[u8; 4], Layout)] = &[
    (b"RGB3", Layout::Raw(PixelFormat::Rgb24)),
    (b"BGR3", Layout::Raw(PixelFormat::Bgr24)),
    (b"YUYV", Layout::Yuyv),
    (b"NV12", Layout::Raw(PixelFormat::Nv12)),
    (b"MJPG", Layout::Mjpeg),
    (b"GREY", Layout::Raw(PixelFormat::Gray8)),
];

/// Number of mapped buffers: enough that the driver always has one to fill while we copy
/// another out, few enough that a frame does not sit long in the queue.
const BUFFERS: u32 = 4;

/// The shortest wait for a frame before the camera is declared stalled. Some USB cameras
/// stop delivering without an error when unplugged or starved of bandwidth; without a timeout
/// the source thread would block forever and the run would never end.
const MIN_DEQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// A V4L2 capture device (`/dev/videoN`) as a live frame source.
pub struct V4l2Source {
    /// `None` once the stream failed: dropping it releases the camera at once.
    stream: Option<Stream<'static>>,
    path: String,
    width: u32,
    height: u32,
    /// Bytes per row as the driver lays them out (at least the packed row length).
    stride: usize,
    layout: Layout,
    /// The negotiated format's code, for messages.
    fourcc: FourCC,
    next_id: u64,
}

impl V4l2Source {
    /// Opens `device` (a path such as `/dev/video0`, or an index such as `0`) and negotiates
    /// a pixel format from RGB3, BGR3, YUYV, NV12, MJPG and GREY, preferring one that offers
    /// `size` (default: the camera's current size) at `fps`. The frame rate is a request:
    /// when the driver refuses it, the camera's own rate is kept and a warning logged.
    ///
    /// Errors name the device; when the camera offers none of those formats, the error lists
    /// what it does offer.
    pub fn open(device: &str, size: Option<(u32, u32)>, fps: Option<f64>) -> crate::Result<Self> {
        let path = device_path(device);
        let fail = |kind: io::ErrorKind, msg: String| Error::Io {
            path: path.clone(),
            cause: io::Error::new(kind, msg),
        };
        let os = |what: &str, e: io::Error| fail(e.kind(), format!("{what}: {e}"));

        let dev = Device::with_path(&path).map_err(|e| os("cannot open camera", e))?;
        let caps = dev
            .query_caps()
            .map_err(|e| os("not a V4L2 device (VIDIOC_QUERYCAP failed)", e))?;
        if !caps.capabilities.contains(CapFlags::VIDEO_CAPTURE) {
            // Multi-planar-only devices (many SoC ISPs) land here too: the v4l crate's mmap
            // stream only speaks the single-planar API.
            return Err(fail(
                io::ErrorKind::Unsupported,
                format!(
                    "{} ({}) is not a single-planar video capture device (capabilities: {})",
                    caps.card, caps.driver, caps.capabilities
                ),
            ));
        }
        if !caps.capabilities.contains(CapFlags::STREAMING) {
            return Err(fail(
                io::ErrorKind::Unsupported,
                format!(
                    "{} ({}) cannot stream to memory-mapped buffers",
                    caps.card, caps.driver
                ),
            ));
        }

        let offered = dev
            .enum_formats()
            .map_err(|e| os("cannot list the camera's pixel formats", e))?;
        let offered_codes: Vec<FourCC> = offered.iter().map(|d| d.fourcc).collect();
        let candidates = candidates(&offered_codes);
        if candidates.is_empty() {
            let list: Vec<String> = offered
                .iter()
                .map(|d| format!("{} ({})", d.fourcc, d.description))
                .collect();
            return Err(fail(
                io::ErrorKind::Unsupported,
                format!(
                    "the camera offers none of the pixel formats we can use (RGB3, BGR3, YUYV, \
                     NV12, MJPG, GREY); it offers: {}",
                    if list.is_empty() {
                        "nothing".to_string()
                    } else {
                        list.join(", ")
                    }
                ),
            ));
        }

        let (w, h) = match size {
            Some(s) => s,
            None => {
                let cur = dev
                    .format()
                    .map_err(|e| os("cannot read the current format", e))?;
                (cur.width, cur.height)
            }
        };
        let (fmt, layout) = negotiate(&dev, &candidates, (w, h), fps).map_err(|e| match e {
            Negotiation::Io(e) => os("cannot set the capture format", e),
            Negotiation::Refused(tried) => fail(
                io::ErrorKind::Unsupported,
                format!(
                    "the driver refused every pixel format we asked for ({})",
                    tried.join(", ")
                ),
            ),
        })?;
        if (fmt.width, fmt.height) != (w, h) {
            tracing::warn!(
                "{path}: asked for {w}x{h}, the camera gives {}x{}",
                fmt.width,
                fmt.height
            );
        }
        let row = row_bytes(layout, fmt.width);
        let stride = (fmt.stride as usize).max(row);

        if let Some(fps) = fps {
            set_frame_rate(&dev, &path, fps);
        }

        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, BUFFERS)
            .map_err(|e| os("cannot map capture buffers (is the camera in use?)", e))?;
        let period = fps.map(|f| Duration::from_secs_f64(1.0 / f));
        stream.set_timeout(dequeue_timeout(period));

        tracing::info!(
            "{path}: {} ({}), {}x{} {} stride {stride}",
            caps.card,
            caps.driver,
            fmt.width,
            fmt.height,
            fmt.fourcc
        );
        Ok(V4l2Source {
            stream: Some(stream),
            path,
            width: fmt.width,
            height: fmt.height,
            stride,
            layout,
            fourcc: fmt.fourcc,
            next_id: 0,
        })
    }

    /// The negotiated frame size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Turns one dequeued buffer into a frame, or into the reason it is unusable.
    fn frame(&self, id: u64, bytes: &[u8]) -> Result<Frame, String> {
        let name = self.name();
        let (w, h) = (self.width, self.height);
        let short = |need: usize| {
            format!(
                "short buffer: {} bytes, a {w}x{h} {} frame needs {need}",
                bytes.len(),
                self.fourcc
            )
        };
        match self.layout {
            Layout::Mjpeg => {
                if bytes.is_empty() {
                    return Err("empty MJPEG buffer".into());
                }
                Ok(Frame::from_encoded(id, name, bytes.to_vec()))
            }
            Layout::Yuyv => {
                let row = row_bytes(self.layout, w);
                let need = plane_bytes(self.stride, row, h as usize);
                if bytes.len() < need {
                    return Err(short(need));
                }
                let rgb = yuyv_to_rgb(w as usize, h as usize, self.stride, bytes);
                Frame::from_raw(id, name, w, h, PixelFormat::Rgb24, rgb).map_err(|e| e.to_string())
            }
            Layout::Raw(pix) => {
                let row = row_bytes(self.layout, w);
                let luma_rows = h as usize;
                // NV12's chroma plane follows the luma plane at the same stride.
                let chroma_rows = if pix == PixelFormat::Nv12 {
                    luma_rows / 2
                } else {
                    0
                };
                let need = if chroma_rows > 0 {
                    self.stride * luma_rows + plane_bytes(self.stride, row, chroma_rows)
                } else {
                    plane_bytes(self.stride, row, luma_rows)
                };
                if bytes.len() < need {
                    return Err(short(need));
                }
                let mut out = compact(bytes, self.stride, row, luma_rows);
                if chroma_rows > 0 {
                    out.extend(compact(
                        &bytes[self.stride * luma_rows..],
                        self.stride,
                        row,
                        chroma_rows,
                    ));
                }
                Frame::from_raw(id, name, w, h, pix, out).map_err(|e| e.to_string())
            }
        }
    }
}

impl FrameSource for V4l2Source {
    fn name(&self) -> String {
        format!("v4l2:{}", self.path)
    }

    fn is_live(&self) -> bool {
        true
    }

    fn next_item(&mut self) -> Option<SourceItem> {
        let stream = self.stream.as_mut()?;
        let id = self.next_id;
        self.next_id += 1;
        let got = match CaptureStream::next(stream) {
            Ok((buf, meta)) => {
                let captured = Instant::now();
                let used = (meta.bytesused as usize).min(buf.len());
                let corrupt = meta.flags.contains(BufferFlags::ERROR);
                // Copied out at once: the buffer goes back to the driver on the next call.
                Ok((captured, buf[..used].to_vec(), corrupt))
            }
            Err(e) => Err((Instant::now(), e)),
        };
        let failed = |captured: Instant, reason: String| SourceItem::Failed {
            id,
            source: self.name(),
            captured,
            reason,
        };
        match got {
            Ok((captured, _, true)) => Some(failed(
                captured,
                "the driver flagged the buffer as corrupt (V4L2_BUF_FLAG_ERROR)".into(),
            )),
            Ok((captured, bytes, false)) => Some(match self.frame(id, &bytes) {
                Ok(mut f) => {
                    f.captured = captured;
                    SourceItem::Frame(f)
                }
                Err(reason) => failed(captured, reason),
            }),
            Err((captured, e)) => {
                let item = failed(captured, format!("cannot dequeue a frame: {e}"));
                self.stream = None;
                Some(item)
            }
        }
    }
}

/// `"0"` means `/dev/video0`; anything else is a path.
fn device_path(device: &str) -> String {
    let d = device.trim();
    if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) {
        format!("/dev/video{d}")
    } else {
        d.to_string()
    }
}

/// The formats we can use among those offered, in our order of preference.
fn candidates(offered: &[FourCC]) -> Vec<(FourCC, Layout)> {
    PREFERRED
        .iter()
        .map(|&(code, layout)| (FourCC::new(code), layout))
        .filter(|(cc, _)| offered.contains(cc))
        .collect()
}

enum Negotiation {
    Io(io::Error),
    /// The driver answered every request with some other format; the formats tried.
    Refused(Vec<String>),
}

/// Sets the first candidate that offers the size and rate asked for, or failing that the
/// first that offers the size, or failing that the first the driver accepts at all (it then
/// picks the nearest size itself). Checking ahead matters for USB cameras, which often give
/// full-size YUYV at a few frames a second but MJPEG at full rate.
fn negotiate(
    dev: &Device,
    candidates: &[(FourCC, Layout)],
    (w, h): (u32, u32),
    fps: Option<f64>,
) -> Result<(Format, Layout), Negotiation> {
    let score = |cc: FourCC| {
        let size_ok = offers_size(dev, cc, w, h);
        let fps_ok = size_ok && fps.is_none_or(|f| reaches_fps(dev, cc, w, h, f));
        u8::from(size_ok) + u8::from(fps_ok)
    };
    let mut ranked: Vec<(u8, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, &(cc, _))| (score(cc), i))
        .collect();
    // Stable on the preference order among equal scores.
    ranked.sort_by_key(|&(s, i)| (std::cmp::Reverse(s), i));

    let mut tried = Vec::new();
    for (_, i) in ranked {
        let (cc, layout) = candidates[i];
        let got = dev
            .set_format(&Format::new(w, h, cc))
            .map_err(Negotiation::Io)?;
        if got.fourcc == cc {
            return Ok((got, layout));
        }
        tried.push(format!("{cc} -> {}", got.fourcc));
    }
    Err(Negotiation::Refused(tried))
}

/// Whether the camera lists `w`×`h` for `cc`; a driver that cannot enumerate sizes gets the
/// benefit of the doubt.
fn offers_size(dev: &Device, cc: FourCC, w: u32, h: u32) -> bool {
    let Ok(sizes) = dev.enum_framesizes(cc) else {
        return true;
    };
    sizes.iter().any(|s| match &s.size {
        FrameSizeEnum::Discrete(d) => d.width == w && d.height == h,
        FrameSizeEnum::Stepwise(s) => {
            let on_step = |v: u32, min: u32, step: u32| step == 0 || (v - min).is_multiple_of(step);
            (s.min_width..=s.max_width).contains(&w)
                && (s.min_height..=s.max_height).contains(&h)
                && on_step(w, s.min_width, s.step_width)
                && on_step(h, s.min_height, s.step_height)
        }
    })
}

/// Whether the camera can deliver `fps` (within 1 %) at `w`×`h` in `cc`; unknown counts as
/// yes.
fn reaches_fps(dev: &Device, cc: FourCC, w: u32, h: u32, fps: f64) -> bool {
    let Ok(intervals) = dev.enum_frameintervals(cc, w, h) else {
        return true;
    };
    let rate = |f: &Fraction| {
        if f.numerator == 0 {
            f64::INFINITY
        } else {
            f.denominator as f64 / f.numerator as f64
        }
    };
    intervals.iter().any(|i| match &i.interval {
        FrameIntervalEnum::Discrete(f) => rate(f) >= fps * 0.99,
        FrameIntervalEnum::Stepwise(s) => rate(&s.min) >= fps * 0.99,
    })
}

/// Asks for `fps`; a refusal is not fatal (many drivers run at a fixed rate), only logged.
fn set_frame_rate(dev: &Device, path: &str, fps: f64) {
    // Milliframes keep fractional NTSC-style rates (29.97) exact enough.
    let interval = Fraction::new(1000, (fps * 1000.0).round().max(1.0) as u32);
    match dev.set_params(&Parameters::new(interval)) {
        Ok(p) => {
            let got = p.interval;
            if got.numerator == 0 || got.denominator == 0 {
                tracing::warn!("{path}: asked for {fps} fps, the driver reports no frame rate");
            } else {
                let actual = got.denominator as f64 / got.numerator as f64;
                if (actual - fps).abs() > fps * 0.01 {
                    tracing::warn!("{path}: asked for {fps} fps, the camera runs at {actual:.2}");
                }
            }
        }
        Err(e) => tracing::warn!("{path}: cannot set {fps} fps, keeping the camera's rate: {e}"),
    }
}

/// How long to wait for one frame: generous against slow starts (auto exposure) and low
/// rates.
fn dequeue_timeout(period: Option<Duration>) -> Duration {
    period
        .map(|p| p.saturating_mul(5))
        .unwrap_or_default()
        .max(MIN_DEQUEUE_TIMEOUT)
}

/// Bytes in one unpadded row (of the luma plane for NV12).
fn row_bytes(layout: Layout, width: u32) -> usize {
    let w = width as usize;
    match layout {
        Layout::Raw(PixelFormat::Rgb24 | PixelFormat::Bgr24) => w * 3,
        Layout::Raw(PixelFormat::Gray8 | PixelFormat::Nv12) => w,
        // A macropixel of two pixels is 4 bytes; an odd width still needs a whole one.
        Layout::Yuyv => w.div_ceil(2) * 4,
        Layout::Mjpeg => 0,
    }
}

/// Bytes needed for `rows` rows of `row` bytes at `stride` (the last row needs no padding).
fn plane_bytes(stride: usize, row: usize, rows: usize) -> usize {
    if rows == 0 {
        0
    } else {
        stride * (rows - 1) + row
    }
}

/// Drops the row padding; the caller checked that `src` holds `rows` rows.
fn compact(src: &[u8], stride: usize, row: usize, rows: usize) -> Vec<u8> {
    if stride == row {
        return src[..row * rows].to_vec();
    }
    let mut out = Vec::with_capacity(row * rows);
    for r in 0..rows {
        out.extend_from_slice(&src[r * stride..r * stride + row]);
    }
    out
}

/// YUYV (4:2:2, Y0 U Y1 V) → RGB24 through the same BT.601 pixel conversion as NV12
/// ([`super::raw::yuv_to_rgb`]). The caller
/// checked that `src` holds `h` rows of `stride` bytes (the last one unpadded).
fn yuyv_to_rgb(w: usize, h: usize, stride: usize, src: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; w * h * 3];
    for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
        let line = &src[y * stride..];
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let m = (x / 2) * 4;
            px.copy_from_slice(&super::raw::yuv_to_rgb(
                line[m + (x & 1) * 2],
                line[m + 1],
                line[m + 3],
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bt601(y: u8, u: u8, v: u8) -> [f32; 3] {
        let c = 1.164 * (y as f32 - 16.0);
        let (u, v) = (u as f32 - 128.0, v as f32 - 128.0);
        [c + 1.596 * v, c - 0.391 * u - 0.813 * v, c + 2.018 * u]
    }

    #[test]
    fn yuyv_matches_the_bt601_formula() {
        // 3x2 with 4 bytes of row padding: two macropixels a row, the last one half used.
        let rows: [[u8; 8]; 2] = [
            [16, 90, 235, 240, 81, 128, 99, 128],
            [145, 200, 60, 30, 250, 54, 7, 255],
        ];
        let stride = 12;
        let mut src = Vec::new();
        for r in &rows {
            src.extend_from_slice(r);
            src.extend_from_slice(&[0xAA; 4]);
        }
        let rgb = yuyv_to_rgb(3, 2, stride, &src);
        assert_eq!(rgb.len(), 3 * 2 * 3);
        for (yi, r) in rows.iter().enumerate() {
            for x in 0..3 {
                let m = (x / 2) * 4;
                let want = bt601(r[m + (x & 1) * 2], r[m + 1], r[m + 3]);
                let at = (yi * 3 + x) * 3;
                for k in 0..3 {
                    let w = want[k].round().clamp(0.0, 255.0);
                    let got = rgb[at + k] as f32;
                    assert!((got - w).abs() <= 1.0, "px ({x},{yi}) ch {k}: {got} vs {w}");
                }
            }
        }
    }

    #[test]
    fn padding_is_dropped_and_formats_are_ranked() {
        let src = [1, 2, 9, 9, 3, 4];
        assert_eq!(compact(&src, 4, 2, 2), vec![1, 2, 3, 4]);
        assert_eq!(plane_bytes(4, 2, 2), 6);
        assert_eq!(row_bytes(Layout::Yuyv, 3), 8);
        let offered = [
            FourCC::new(b"GREY"),
            FourCC::new(b"MJPG"),
            FourCC::new(b"YUYV"),
        ];
        let got: Vec<Layout> = candidates(&offered).into_iter().map(|(_, l)| l).collect();
        assert_eq!(
            got,
            vec![Layout::Yuyv, Layout::Mjpeg, Layout::Raw(PixelFormat::Gray8)]
        );
        assert!(candidates(&[FourCC::new(b"H264")]).is_empty());
        assert_eq!(device_path("2"), "/dev/video2");
        assert_eq!(device_path("/dev/video1"), "/dev/video1");
        assert_eq!(dequeue_timeout(None), MIN_DEQUEUE_TIMEOUT);
        assert_eq!(
            dequeue_timeout(Some(Duration::from_secs(2))),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn a_missing_device_is_an_error_naming_it() {
        let dev = "/dev/video-does-not-exist";
        let e = match V4l2Source::open(dev, Some((640, 480)), Some(30.0)) {
            Ok(_) => panic!("{dev} opened"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.contains(dev), "{msg}");
        assert!(matches!(&e, Error::Io { cause, .. } if cause.kind() == io::ErrorKind::NotFound));
    }
}
