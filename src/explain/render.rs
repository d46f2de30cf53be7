//! Turning heat maps into pictures: resizing, the jet colour map, overlays, boxes and
//! panel layouts.

use image::{Rgb, RgbImage};

use super::mask::BBox;
use super::HeatMap;

/// Resizes `map` to `width × height` with bilinear interpolation.
///
/// Sampling matches OpenCV `cv2.resize(..., interpolation=INTER_LINEAR)` and torch
/// `interpolate(mode="bilinear", align_corners=False)` (without antialiasing): output
/// pixel `d` reads source coordinate `(d + 0.5) · src/dst − 0.5`, clamped to the edge
/// pixels. A zero-sized target gives an empty map; an empty source gives zeros.
/// Values missing from a short `map.data` read as 0.
pub fn resize_bilinear(map: &HeatMap, width: usize, height: usize) -> HeatMap {
    let mut data = vec![0f32; width * height];
    if map.width > 0 && map.height > 0 && width > 0 {
        let cols = taps(map.width, width);
        let rows = taps(map.height, height);
        let at = |x: usize, y: usize| map.data.get(y * map.width + x).copied().unwrap_or(0.0);
        // Every source row resized horizontally once; an output row is then a blend of two
        // of them, a loop the compiler vectorises. (A 7 × 7 map to 224 × 224 is 7 rows of
        // horizontal work instead of 224.)
        let wide: Vec<f32> = (0..map.height)
            .flat_map(|y| {
                cols.iter()
                    .map(move |&(x0, x1, fx)| at(x0, y) * (1.0 - fx) + at(x1, y) * fx)
            })
            .collect();
        for (out, &(y0, y1, fy)) in data.chunks_exact_mut(width).zip(&rows) {
            let top = &wide[y0 * width..(y0 + 1) * width];
            let bottom = &wide[y1 * width..(y1 + 1) * width];
            for ((o, &t), &b) in out.iter_mut().zip(top).zip(bottom) {
                *o = t * (1.0 - fy) + b * fy;
            }
        }
    }
    HeatMap {
        width,
        height,
        data,
    }
}

/// For each of `dst` output positions along one axis: the two source indices to blend
/// and the weight of the second.
fn taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f64 / dst as f64;
    let last = src - 1;
    (0..dst)
        .map(|d| {
            let s = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i = s.floor() as usize;
            if i >= last {
                (last, last, 0.0)
            } else {
                (i, i + 1, (s - i as f64) as f32)
            }
        })
        .collect()
}

/// The jet colour map as RGB: dark blue (0, 0, 128) at 0, through blue, cyan, yellow
/// and red, to dark red (128, 0, 0) at 1.
///
/// This is the GNU Octave `jet` that `cv2.COLORMAP_JET` samples (OpenCV interpolates a
/// 64-entry table, so its bytes can differ from these by a level or two). `v` is clamped
/// to `[0, 1]`; NaN maps like 0.
pub fn jet(v: f32) -> [u8; 3] {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    // Each channel is a trapezoid of height 1.5 centred a quarter apart.
    let channel = |centre: f32| {
        let c = (1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0);
        (c * 255.0).round() as u8
    };
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// `image` with `map` (values in `0..=1`) drawn over it in jet colours:
/// `out = (1 − alpha) · image + alpha · jet(map)`, per channel, rounded.
///
/// The map is resized bilinearly to the image when the sizes differ. `alpha` is clamped
/// to `[0, 1]` (NaN counts as 0, leaving the image unchanged).
pub fn overlay(image: &RgbImage, map: &HeatMap, alpha: f32) -> RgbImage {
    let alpha = if alpha.is_nan() {
        0.0
    } else {
        alpha.clamp(0.0, 1.0)
    };
    let heat = heat_image(map, image.width(), image.height());
    let mut out = image.clone();
    for (px, hp) in out.pixels_mut().zip(heat.pixels()) {
        for (c, &h) in px.0.iter_mut().zip(&hp.0) {
            let mixed = (1.0 - alpha) * f32::from(*c) + alpha * f32::from(h);
            *c = mixed.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `map` (values in `0..=1`) alone in jet colours, resized bilinearly to
/// `width × height`.
pub fn heat_image(map: &HeatMap, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let sized;
    // A map already at size is used as is (a short data vector still goes through the
    // resize, which pads it).
    let map = if (map.width, map.height) == (w, h) && map.data.len() == w * h {
        map
    } else {
        sized = resize_bilinear(map, w, h);
        &sized
    };
    let mut out = RgbImage::new(width, height);
    for (px, &v) in out.pixels_mut().zip(&map.data) {
        *px = Rgb(jet(v));
    }
    out
}

/// Draws the outline of `b` in `colour`, `thickness` pixels wide, on the inside of the
/// box (so the outline never grows the box). Parts outside the image are skipped; an
/// empty box or zero thickness draws nothing.
pub fn draw_bbox(image: &mut RgbImage, b: &BBox, colour: [u8; 3], thickness: u32) {
    if b.x1 <= b.x0 || b.y1 <= b.y0 || thickness == 0 {
        return;
    }
    let inner_x = b.x0.saturating_add(thickness).min(b.x1);
    let inner_y = b.y0.saturating_add(thickness).min(b.y1);
    let far_x = b.x1.saturating_sub(thickness).max(b.x0);
    let far_y = b.y1.saturating_sub(thickness).max(b.y0);
    let colour = Rgb(colour);
    fill_rect(image, (b.x0, b.y0), (b.x1, inner_y), colour);
    fill_rect(image, (b.x0, far_y), (b.x1, b.y1), colour);
    fill_rect(image, (b.x0, b.y0), (inner_x, b.y1), colour);
    fill_rect(image, (far_x, b.y0), (b.x1, b.y1), colour);
}

/// Fills `[x0, x1) × [y0, y1)`, clipped to the image.
fn fill_rect(image: &mut RgbImage, (x0, y0): (u32, u32), (x1, y1): (u32, u32), colour: Rgb<u8>) {
    for y in y0..y1.min(image.height()) {
        for x in x0..x1.min(image.width()) {
            image.put_pixel(x, y, colour);
        }
    }
}

/// `panels` left to right, `gap` pixels apart, top-aligned on a white background as tall
/// as the tallest panel. No panels give a 0×0 image.
pub fn side_by_side(panels: &[&RgbImage], gap: u32) -> RgbImage {
    let gaps =
        gap.saturating_mul(u32::try_from(panels.len().saturating_sub(1)).unwrap_or(u32::MAX));
    let width = panels.iter().fold(gaps, |w, p| w.saturating_add(p.width()));
    let height = panels.iter().map(|p| p.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut x = 0i64;
    for panel in panels {
        image::imageops::replace(&mut out, *panel, x, 0);
        x += i64::from(panel.width()) + i64::from(gap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(width: usize, height: usize, data: &[f32]) -> HeatMap {
        HeatMap {
            width,
            height,
            data: data.to_vec(),
        }
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn resize_2x2_to_4x4_matches_half_pixel_sampling() {
        // Source x for d = 0..4 is -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1),
        // giving weights 0, 0.25, 0.75, 1 along each axis; torch gives the same table.
        let m = map(2, 2, &[1.0, 2.0, 3.0, 4.0]);
        let r = resize_bilinear(&m, 4, 4);
        assert_eq!((r.width, r.height), (4, 4));
        #[rustfmt::skip]
        let want = [
            1.0, 1.25, 1.75, 2.0,
            1.5, 1.75, 2.25, 2.5,
            2.5, 2.75, 3.25, 3.5,
            3.0, 3.25, 3.75, 4.0,
        ];
        assert_close(&r.data, &want);
    }

    #[test]
    fn resize_down_averages_pairs_and_identity_is_exact() {
        // Source x = (d + 0.5)·2 − 0.5 = 0.5, 2.5: midway between neighbours.
        let m = map(4, 1, &[1.0, 2.0, 3.0, 4.0]);
        assert_close(&resize_bilinear(&m, 2, 1).data, &[1.5, 3.5]);
        assert_eq!(resize_bilinear(&m, 4, 1), m);
    }

    #[test]
    fn resize_odd_and_empty_sizes() {
        let m = map(2, 1, &[0.0, 3.0]);
        // Source x = (d + 0.5)·2/3 − 0.5 = -1/6 → 0, 0.5, 7/6 → 1.
        assert_close(&resize_bilinear(&m, 3, 1).data, &[0.0, 1.5, 3.0]);
        assert_eq!(resize_bilinear(&m, 0, 5).data, Vec::<f32>::new());
        assert_eq!(resize_bilinear(&map(0, 0, &[]), 2, 1).data, vec![0.0, 0.0]);
        // A short data vector reads missing values as 0 instead of panicking.
        assert_close(&resize_bilinear(&map(2, 1, &[3.0]), 1, 1).data, &[1.5]);
    }

    #[test]
    fn jet_key_points() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(0.25), [0, 128, 255]);
        assert_eq!(jet(0.5), [128, 255, 128]);
        assert_eq!(jet(0.75), [255, 128, 0]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(-3.0), jet(0.0));
        assert_eq!(jet(7.0), jet(1.0));
        assert_eq!(jet(f32::NAN), jet(0.0));
    }

    #[test]
    fn overlay_blends_per_channel() {
        let img = RgbImage::from_pixel(1, 1, Rgb([100, 100, 100]));
        // jet(1) = (128, 0, 0): 0.5·100 + 0.5·128 = 114, 0.5·100 = 50.
        let out = overlay(&img, &map(1, 1, &[1.0]), 0.5);
        assert_eq!(out.get_pixel(0, 0).0, [114, 50, 50]);
        assert_eq!(overlay(&img, &map(1, 1, &[1.0]), 0.0), img);
        assert_eq!(
            overlay(&img, &map(1, 1, &[1.0]), 2.0).get_pixel(0, 0).0,
            [128, 0, 0]
        );
    }

    #[test]
    fn overlay_resizes_the_map() {
        let img = RgbImage::from_pixel(4, 2, Rgb([0, 0, 0]));
        let out = overlay(&img, &map(2, 1, &[0.0, 1.0]), 1.0);
        assert_eq!((out.width(), out.height()), (4, 2));
        assert_eq!(out.get_pixel(0, 1).0, jet(0.0));
        // Column 1 samples x = 0.25 → value 0.25.
        assert_eq!(out.get_pixel(1, 0).0, jet(0.25));
        assert_eq!(out.get_pixel(3, 0).0, jet(1.0));
    }

    #[test]
    fn heat_image_sizes() {
        let img = heat_image(&map(1, 1, &[0.5]), 3, 2);
        assert_eq!((img.width(), img.height()), (3, 2));
        assert!(img.pixels().all(|p| p.0 == [128, 255, 128]));
        let empty = heat_image(&map(1, 1, &[0.5]), 0, 0);
        assert_eq!((empty.width(), empty.height()), (0, 0));
    }

    fn coloured(img: &RgbImage) -> Vec<(u32, u32)> {
        img.enumerate_pixels()
            .filter(|(_, _, p)| p.0 == [255, 0, 0])
            .map(|(x, y, _)| (x, y))
            .collect()
    }

    #[test]
    fn draw_bbox_outlines_inside_the_box() {
        let mut img = RgbImage::new(5, 5);
        draw_bbox(&mut img, &BBox::from([1, 1, 4, 4]), [255, 0, 0], 1);
        let hit = coloured(&img);
        assert_eq!(hit.len(), 8);
        assert!(!hit.contains(&(2, 2)));
        assert!(hit.contains(&(1, 1)) && hit.contains(&(3, 3)));
        assert!(!hit.contains(&(4, 4)) && !hit.contains(&(0, 0)));

        let mut img = RgbImage::new(5, 5);
        draw_bbox(&mut img, &BBox::from([1, 1, 4, 4]), [255, 0, 0], 2);
        assert_eq!(coloured(&img).len(), 9);
    }

    #[test]
    fn draw_bbox_clips_and_ignores_empty() {
        let mut img = RgbImage::new(5, 5);
        draw_bbox(&mut img, &BBox::from([3, 3, 10, 10]), [255, 0, 0], 1);
        assert_eq!(coloured(&img), vec![(3, 3), (4, 3), (3, 4)]);

        let mut img = RgbImage::new(5, 5);
        draw_bbox(&mut img, &BBox::from([3, 3, 3, 9]), [255, 0, 0], 1);
        draw_bbox(&mut img, &BBox::from([0, 0, 5, 5]), [255, 0, 0], 0);
        draw_bbox(&mut img, &BBox::from([9, 9, 12, 12]), [255, 0, 0], 1);
        assert!(coloured(&img).is_empty());
    }

    #[test]
    fn side_by_side_lays_out_with_gap() {
        let red = RgbImage::from_pixel(2, 1, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(1, 3, Rgb([0, 0, 255]));
        let out = side_by_side(&[&red, &blue], 1);
        assert_eq!((out.width(), out.height()), (4, 3));
        assert_eq!(out.get_pixel(1, 0).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(2, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(3, 0).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(3, 2).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(0, 1).0, [255, 255, 255]);
        let none = side_by_side(&[], 5);
        assert_eq!((none.width(), none.height()), (0, 0));
    }
}
