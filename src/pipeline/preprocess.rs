//! Image → input tensor, following the model's [`Preprocess`] metadata.

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage};

use crate::graph::{ColorOrder, InputSpec, Preprocess};

/// Turns a decoded image into the tensor `input` expects. Errors are plain strings; the caller
/// wraps them with the frame's identity.
pub fn image_to_tensor(
    img: &DynamicImage,
    input: &InputSpec,
    device: &Device,
) -> Result<Tensor, String> {
    let pre = input.preprocess.as_ref().ok_or_else(|| {
        format!(
            "input '{}' has no image preprocessing in the model file",
            input.name
        )
    })?;
    let nhwc = match pre.layout.as_str() {
        "NCHW" => false,
        "NHWC" => true,
        other => return Err(format!("unknown layout '{other}'")),
    };
    if input.shape.len() != 4 {
        return Err(format!(
            "input '{}' has shape {:?}; images need a 4-D input",
            input.name, input.shape
        ));
    }
    let (c, h, w) = if nhwc {
        (input.shape[3], input.shape[1], input.shape[2])
    } else {
        (input.shape[1], input.shape[2], input.shape[3])
    };
    let channels = if pre.color == ColorOrder::Gray { 1 } else { 3 };
    if c != channels || pre.mean.len() != c || pre.std.len() != c {
        return Err(format!(
            "input '{}' has {c} channels but the preprocessing describes {channels} (mean {:?}, std {:?})",
            input.name, pre.mean, pre.std
        ));
    }
    if img.width() == 0 || img.height() == 0 {
        return Err("image is empty".into());
    }
    let img = fit(img, pre, w as u32, h as u32);
    let pixels: Vec<u8> = if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    };
    let plane = h * w;
    let mut data = vec![0f32; plane * c];
    for (p, px) in pixels.chunks_exact(c).enumerate() {
        for k in 0..c {
            let src = if pre.color == ColorOrder::Bgr {
                c - 1 - k
            } else {
                k
            };
            let v = (px[src] as f32 * pre.scale - pre.mean[k]) / pre.std[k];
            let dst = if nhwc { p * c + k } else { k * plane + p };
            data[dst] = v;
        }
    }
    Tensor::from_vec(data, input.shape.as_slice(), device).map_err(|e| e.to_string())
}

/// Resize-shorter-side then centre crop (torchvision's recipe), or a plain stretch.
fn fit(img: &DynamicImage, pre: &Preprocess, w: u32, h: u32) -> DynamicImage {
    let (rw, rh, x, y) = fit_plan(img.width(), img.height(), pre, w, h);
    let resized = img.resize_exact(rw, rh, FilterType::Triangle);
    if (x, y, rw, rh) == (0, 0, w, h) {
        resized
    } else {
        resized.crop_imm(x, y, w, h)
    }
}

/// The resized size and the crop offset of [`fit`].
fn fit_plan(iw: u32, ih: u32, pre: &Preprocess, w: u32, h: u32) -> (u32, u32, u32, u32) {
    match pre.resize_shorter {
        Some(short) if iw > 0 && ih > 0 => {
            let (nw, nh) = if iw <= ih {
                (
                    short,
                    ((ih as u64 * short as u64) / iw as u64).max(1) as u32,
                )
            } else {
                (
                    ((iw as u64 * short as u64) / ih as u64).max(1) as u32,
                    short,
                )
            };
            let (rw, rh) = (nw.max(w), nh.max(h));
            (rw, rh, centre_offset(rw - w), centre_offset(rh - h))
        }
        _ => (w, h, 0, 0),
    }
}

/// Where the model input lies in the frame: input pixel `u` covers frame x
/// `(u + offset_x) / scale_x` (and the same for y).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputGeometry {
    /// Resized width / frame width.
    pub scale_x: f64,
    /// Resized height / frame height.
    pub scale_y: f64,
    /// Crop offset in resized pixels.
    pub offset_x: f64,
    /// Crop offset in resized pixels.
    pub offset_y: f64,
}

impl InputGeometry {
    /// How a `frame_w × frame_h` frame becomes `input`'s tensor (`None` for a non-image input).
    pub fn of(frame_w: u32, frame_h: u32, input: &InputSpec) -> Option<Self> {
        let pre = input.preprocess.as_ref()?;
        let (h, w) = match (pre.layout.as_str(), input.shape.as_slice()) {
            ("NHWC", &[_, h, w, _]) | ("NCHW", &[_, _, h, w]) => (h as u32, w as u32),
            _ => return None,
        };
        if frame_w == 0 || frame_h == 0 {
            return None;
        }
        let (rw, rh, x, y) = fit_plan(frame_w, frame_h, pre, w, h);
        Some(InputGeometry {
            scale_x: rw as f64 / frame_w as f64,
            scale_y: rh as f64 / frame_h as f64,
            offset_x: x as f64,
            offset_y: y as f64,
        })
    }

    /// Input pixel rectangle `[x0, x1) × [y0, y1)` in frame pixels, rounded outwards and
    /// clipped to the frame.
    pub fn to_frame(&self, r: [u32; 4], frame_w: u32, frame_h: u32) -> [u32; 4] {
        let fx = |u: u32, up: bool| {
            let v = (u as f64 + self.offset_x) / self.scale_x;
            let v = if up { v.ceil() } else { v.floor() };
            (v.max(0.0) as u32).min(frame_w)
        };
        let fy = |u: u32, up: bool| {
            let v = (u as f64 + self.offset_y) / self.scale_y;
            let v = if up { v.ceil() } else { v.floor() };
            (v.max(0.0) as u32).min(frame_h)
        };
        [
            fx(r[0], false),
            fy(r[1], false),
            fx(r[2], true),
            fy(r[3], true),
        ]
    }
}

/// The frame as the model sees it (resized and cropped to the input size), in RGB: the
/// picture a heat map is drawn over.
pub fn model_view(img: &DynamicImage, input: &InputSpec) -> Option<image::RgbImage> {
    let pre = input.preprocess.as_ref()?;
    let (h, w) = match (pre.layout.as_str(), input.shape.as_slice()) {
        ("NHWC", &[_, h, w, _]) | ("NCHW", &[_, _, h, w]) => (h as u32, w as u32),
        _ => return None,
    };
    if img.width() == 0 || img.height() == 0 {
        return None;
    }
    Some(fit(img, pre, w, h).to_rgb8())
}

/// torchvision's CenterCrop offset, `round(spare / 2)` with Python's round-half-to-even, so an
/// odd spare of 2k + 1 starts the crop at whichever of k and k + 1 is even.
fn centre_offset(spare: u32) -> u32 {
    let k = spare / 2;
    if spare % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
}

#[cfg(test)]
mod tests {
    use super::centre_offset;

    #[test]
    fn centre_offset_rounds_half_to_even_like_python() {
        // Python: [round(s / 2) for s in range(8)] == [0, 0, 1, 2, 2, 2, 3, 4]
        let got: Vec<u32> = (0..8).map(centre_offset).collect();
        assert_eq!(got, [0, 0, 1, 2, 2, 2, 3, 4]);
    }
}
