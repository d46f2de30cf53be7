//! Raw video pixel formats (what `ffmpeg -f rawvideo` and GStreamer `fdsink` write) and their
//! conversion into images.

use std::fmt;
use std::str::FromStr;

use image::{DynamicImage, GrayImage, RgbImage};

/// A raw frame's pixel layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 8-bit R, G, B interleaved.
    Rgb24,
    /// 8-bit B, G, R interleaved (OpenCV's order).
    Bgr24,
    /// 8-bit luma.
    Gray8,
    /// 4:2:0: a full-resolution Y plane, then one half-resolution plane of interleaved U, V
    /// (what most camera ISPs and hardware decoders emit).
    Nv12,
}

impl PixelFormat {
    /// Bytes of one `width` × `height` frame (`None` when it overflows, or for `nv12` with odd
    /// sides, which the format cannot hold).
    pub fn frame_bytes(self, width: u32, height: u32) -> Option<usize> {
        let (w, h) = (width as usize, height as usize);
        let px = w.checked_mul(h)?;
        match self {
            PixelFormat::Rgb24 | PixelFormat::Bgr24 => px.checked_mul(3),
            PixelFormat::Gray8 => Some(px),
            PixelFormat::Nv12 if w % 2 == 0 && h % 2 == 0 => px.checked_add(px / 2),
            PixelFormat::Nv12 => None,
        }
    }
}

impl FromStr for PixelFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "rgb24" => PixelFormat::Rgb24,
            "bgr24" => PixelFormat::Bgr24,
            "gray8" | "gray" => PixelFormat::Gray8,
            "nv12" => PixelFormat::Nv12,
            other => {
                return Err(format!(
                    "unknown pixel format '{other}' (rgb24, bgr24, gray8, nv12)"
                ))
            }
        })
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PixelFormat::Rgb24 => "rgb24",
            PixelFormat::Bgr24 => "bgr24",
            PixelFormat::Gray8 => "gray8",
            PixelFormat::Nv12 => "nv12",
        })
    }
}

/// Parses `WxH` (e.g. `1280x720`).
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WxH (e.g. 1280x720)"))?;
    let dim = |v: &str| match v.trim().parse::<u32>() {
        Ok(n) if (1..=16384).contains(&n) => Ok(n),
        _ => Err(format!("'{s}': sides must be 1..=16384 pixels")),
    };
    Ok((dim(w)?, dim(h)?))
}

/// Turns one raw frame into an image: `rgb24` / `gray8` take the buffer as is, `bgr24` swaps
/// in place, `nv12` converts (BT.601 limited range, as cameras send it).
pub fn to_image(
    width: u32,
    height: u32,
    pix: PixelFormat,
    mut bytes: Vec<u8>,
) -> Result<DynamicImage, String> {
    let want = pix
        .frame_bytes(width, height)
        .ok_or_else(|| format!("{width}x{height} cannot be held in {pix}"))?;
    if bytes.len() != want {
        return Err(format!(
            "a {width}x{height} {pix} frame is {want} bytes, got {}",
            bytes.len()
        ));
    }
    let wrong = || format!("{width}x{height} {pix}: buffer does not fit");
    Ok(match pix {
        PixelFormat::Rgb24 => {
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, bytes).ok_or_else(wrong)?)
        }
        PixelFormat::Bgr24 => {
            for px in bytes.chunks_exact_mut(3) {
                px.swap(0, 2);
            }
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, bytes).ok_or_else(wrong)?)
        }
        PixelFormat::Gray8 => {
            DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, bytes).ok_or_else(wrong)?)
        }
        PixelFormat::Nv12 => {
            let rgb = nv12_to_rgb(width as usize, height as usize, &bytes);
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, rgb).ok_or_else(wrong)?)
        }
    })
}

/// NV12 → RGB24 (see [`yuv_to_rgb`]).
fn nv12_to_rgb(w: usize, h: usize, src: &[u8]) -> Vec<u8> {
    let (luma, chroma) = src.split_at(w * h);
    let mut out = vec![0u8; w * h * 3];
    for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
        let yrow = &luma[y * w..(y + 1) * w];
        let crow = &chroma[(y / 2) * w..(y / 2) * w + w];
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&yuv_to_rgb(yrow[x], crow[x & !1], crow[(x & !1) + 1]));
        }
    }
    out
}

/// One BT.601 limited-range pixel (what cameras send) to RGB, in 16.16 fixed point; every YUV
/// layout (NV12 here, YUYV from V4L2) converts through it, so all camera paths agree.
pub(crate) fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let clamp = |x: i32| (x >> 16).clamp(0, 255) as u8;
    let c = 298 * 256 * (y as i32 - 16);
    let (u, v) = (u as i32 - 128, v as i32 - 128);
    [
        clamp(c + 409 * 256 * v + (1 << 15)),
        clamp(c - 100 * 256 * u - 208 * 256 * v + (1 << 15)),
        clamp(c + 516 * 256 * u + (1 << 15)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_formats_parse() {
        assert_eq!(parse_size("1280x720"), Ok((1280, 720)));
        assert!(parse_size("1280").is_err());
        assert!(parse_size("0x10").is_err());
        assert_eq!("NV12".parse::<PixelFormat>(), Ok(PixelFormat::Nv12));
        assert!("yuyv".parse::<PixelFormat>().is_err());
        assert_eq!(PixelFormat::Nv12.frame_bytes(4, 2), Some(12));
        assert_eq!(PixelFormat::Nv12.frame_bytes(3, 2), None);
    }

    #[test]
    fn bgr_is_swapped_and_wrong_lengths_refused() {
        let img = to_image(2, 1, PixelFormat::Bgr24, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(img.to_rgb8().into_raw(), vec![3, 2, 1, 6, 5, 4]);
        let e = to_image(2, 1, PixelFormat::Rgb24, vec![0; 5]).unwrap_err();
        assert!(e.contains("6 bytes, got 5"), "{e}");
    }

    #[test]
    fn nv12_matches_the_bt601_formula() {
        // 2x2: Y = 16 (black), 235 (white), 81, 145; one chroma pair, red-ish (U=90, V=240).
        let bytes = vec![16, 235, 81, 145, 90, 240];
        let rgb = to_image(2, 2, PixelFormat::Nv12, bytes).unwrap().to_rgb8();
        for (i, &y) in [16u8, 235, 81, 145].iter().enumerate() {
            let c = 1.164 * (y as f32 - 16.0);
            let (u, v) = (90.0 - 128.0, 240.0 - 128.0);
            let want = [c + 1.596 * v, c - 0.391 * u - 0.813 * v, c + 2.018 * u];
            let got = rgb.as_raw()[i * 3..i * 3 + 3].to_vec();
            for k in 0..3 {
                let w = want[k].round().clamp(0.0, 255.0);
                assert!(
                    (got[k] as f32 - w).abs() <= 1.0,
                    "px {i} ch {k}: {} vs {w}",
                    got[k]
                );
            }
        }
    }
}
