//! Pillow-exact Gaussian blur (`ImageFilter.GaussianBlur(radius)`, what diffusers'
//! `VaeImageProcessor.blur` runs on a mask): three passes of an extended box blur along x, then
//! three along y, each rounding back to 8 bits.
//!
//! The box has an integer radius r and a fractional one, chosen so that three passes have the
//! Gaussian's variance (Gwosdek et al. 2011, as Pillow computes it in float32). One pass gives
//! `(ww * (sum of the 2r + 1 pixels around x) + fw * (the two pixels just beyond) + 2^23) >> 24`
//! with `ww = floor(2^24 / (2 radius + 1))` (float32 division) and `fw` the rest of 2^24 split
//! between the two ends; pixels beyond the edge repeat the edge.

use crate::{Error, Result};

/// Pillow's passes per axis.
const PASSES: usize = 3;

/// The extended box radius whose three passes approximate a Gaussian of `radius`, in float32
/// as Pillow's `_gaussian_blur_radius` computes it.
fn box_radius(radius: f32) -> f32 {
    let sigma2 = radius * radius / PASSES as f32;
    let l_len = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((l_len as f64 - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    let a = a / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// One horizontal pass over `rows` rows of `w` pixels of `channels` bytes.
fn box_pass(src: &[u8], w: usize, channels: usize, radius: f32) -> Vec<u8> {
    let r = radius as usize;
    let ww = ((1u32 << 24) as f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (r as u32 * 2 + 1) * ww) / 2;
    let row_len = w * channels;
    let mut out = vec![0u8; src.len()];
    let at = |x: isize| x.clamp(0, w as isize - 1) as usize;
    let r = r as isize;
    for (row, dst) in src.chunks_exact(row_len).zip(out.chunks_exact_mut(row_len)) {
        for c in 0..channels {
            let px = |i: isize| row[at(i) * channels + c] as u32;
            // The 2r + 1 pixels around x, slid along the row (exact integer sums).
            let mut near: u32 = (-r..=r).map(px).sum();
            for x in 0..w as isize {
                if x > 0 {
                    near = near + px(x + r) - px(x - r - 1);
                }
                let far = px(x - r - 1) + px(x + r + 1);
                let bulk = near * ww + far * fw;
                dst[x as usize * channels + c] = ((bulk + (1 << 23)) >> 24) as u8;
            }
        }
    }
    out
}

fn transpose(src: &[u8], w: usize, h: usize, channels: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        for x in 0..w {
            let (s, d) = ((y * w + x) * channels, (x * h + y) * channels);
            out[d..d + channels].copy_from_slice(&src[s..s + channels]);
        }
    }
    out
}

/// `ImageFilter.GaussianBlur(radius)` of interleaved 8-bit pixels (`h` rows of `w * channels`
/// bytes; L or RGB). A radius of 0 is a copy; a negative or non-finite one is an error.
pub fn gaussian_blur_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    radius: f32,
) -> Result<Vec<u8>> {
    if !(radius.is_finite() && radius >= 0.0) {
        return Err(Error::Config(format!(
            "a blur radius must be a finite number of pixels, 0 or more, got {radius}"
        )));
    }
    if channels == 0 || w.checked_mul(h).and_then(|n| n.checked_mul(channels)) != Some(src.len()) {
        return Err(Error::bad_shape(
            "gaussian_blur",
            format!("buffer has {} bytes, expected h*w*c", src.len()),
            &[h, w, channels],
        ));
    }
    let b = box_radius(radius);
    if b == 0.0 || src.is_empty() {
        return Ok(src.to_vec());
    }
    let mut out = src.to_vec();
    for _ in 0..PASSES {
        out = box_pass(&out, w, channels, b);
    }
    let mut t = transpose(&out, w, h, channels);
    for _ in 0..PASSES {
        t = box_pass(&t, h, channels, b);
    }
    Ok(transpose(&t, h, w, channels))
}

/// [`gaussian_blur_u8`] of an RGB image.
pub fn gaussian_blur_rgb(img: &image::RgbImage, radius: f32) -> Result<image::RgbImage> {
    let (w, h) = img.dimensions();
    let bytes = gaussian_blur_u8(img.as_raw(), w as usize, h as usize, 3, radius)?;
    image::RgbImage::from_raw(w, h, bytes)
        .ok_or_else(|| Error::bad_shape("gaussian_blur", "output size", &[h as usize, w as usize]))
}
