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
    match pre.resize_shorter {
        Some(short) => {
            let (iw, ih) = (img.width(), img.height());
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
            let resized = img.resize_exact(nw.max(w), nh.max(h), FilterType::Triangle);
            let x = centre_offset(resized.width() - w);
            let y = centre_offset(resized.height() - h);
            resized.crop_imm(x, y, w, h)
        }
        None => img.resize_exact(w, h, FilterType::Triangle),
    }
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
