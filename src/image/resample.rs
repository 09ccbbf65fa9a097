//! Pillow-exact 8-bit separable resampling (`Image.resize` with BILINEAR, BICUBIC or LANCZOS).
//!
//! CLIP's reference preprocessing resizes through Pillow, and a float bicubic misses its output by
//! one 8-bit level in places (enough to move CLIP embeddings past the fixture tolerance), so this
//! reproduces Pillow's integer pipeline step by step:
//!
//! 1. Per output pixel, the source window is centred at `(x + 0.5) * scale` with the filter's
//!    support widened by `scale` when downscaling (the filter then acts as an anti-alias low pass).
//!    The window ends are rounded with `(int)(v + 0.5)` (C truncation, then clamped to the image).
//! 2. Tap weights are evaluated in f64, normalised to sum to one, then stored as fixed point with
//!    22 fractional bits, rounding half away from zero.
//! 3. Two 1-D passes, horizontal then vertical (vertical first for images whose height shrinks
//!    much more than their width, see `vertical_first`). Each accumulates in integers starting
//!    from `1 << 21` (round half up), shifts right by 22 and clamps to 0..=255, so the
//!    intermediate image is itself 8-bit.
//!
//! A pass whose output size equals its input size is skipped, as Pillow does (an identity pass
//! would give the same bytes anyway). Channels are independent and interleaved (HWC); Pillow
//! premultiplies alpha for RGBA/LA before resampling, which this module does not, so use it for
//! L and RGB data.

use crate::{Error, Result};
use image::RgbImage;

/// Fractional bits of the fixed-point weights: 32 - 8 (pixel) - 2 (headroom for weight sums
/// above one from negative lobes), Pillow's `PRECISION_BITS`.
const PRECISION_BITS: u32 = 22;
/// Largest target accepted (16384^2): far past any SDXL/CLIP size, small enough to allocate.
const MAX_OUTPUT_PIXELS: usize = 1 << 28;

/// Pillow's resampling filters (the subset a diffusion/CLIP pipeline uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1 (Pillow `BILINEAR`, code 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (Pillow `BICUBIC`, code 3).
    Bicubic,
    /// Lanczos-3 windowed sinc, support 3 (Pillow `LANCZOS`, code 1).
    Lanczos,
}

impl Filter {
    /// Maps Pillow's numeric resample codes, as stored in `preprocessor_config.json`.
    pub fn from_pil_code(code: u64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // The expressions keep Pillow's operation order so the f64 weights round alike.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fixed-point taps of one 1-D pass: output pixel `i` reads `len[i]` source pixels starting at
/// `start[i]` with weights `weights[i * ksize ..][.. len[i]]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the window `[in0, in1)` of an axis
/// of `in_size` pixels mapped onto `out_size` pixels.
fn precompute_taps(in_size: usize, in0: f64, in1: f64, out_size: usize, filter: Filter) -> Taps {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;

    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        // `as i64` truncates toward zero exactly like C's `(int)` cast on these values.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            total += v;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, out) in row.iter_mut().enumerate().take(n) {
            let k = if total != 0.0 { w[x] / total } else { w[x] };
            let fixed = k * (1u32 << PRECISION_BITS) as f64;
            *out = if k < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        start.push(xmin as usize);
        len.push(n);
    }
    Taps {
        ksize,
        start,
        len,
        weights,
    }
}

/// Rounds a fixed-point accumulator (which already carries the +0.5 bias) back to 8 bits.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved 8-bit pixels (`h` rows of `w * channels` bytes) to `out_w x out_h`
/// exactly as Pillow's `Image.resize((out_w, out_h), filter)` does for L/RGB images.
pub fn resize_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Result<Vec<u8>> {
    let full = [0.0, 0.0, w as f64, h as f64];
    resize_box_u8(src, w, h, channels, full, out_w, out_h, filter)
}

/// [`resize_u8`] of the source region `bx` = (left, upper, right, lower), in pixels and possibly
/// fractional, as Pillow's `Image.resize(size, filter, box=bx)`. A box of zero width or height is
/// allowed (Pillow then spreads the filter window around that edge: diffusers' "fill" resize pads
/// with it); one reaching outside the image or of negative extent is an error.
#[allow(clippy::too_many_arguments)]
pub fn resize_box_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    bx: [f64; 4],
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Result<Vec<u8>> {
    let shape = [h, w, channels];
    if channels == 0 || w == 0 || h == 0 {
        return Err(Error::bad_shape("resize", "empty source image", &shape));
    }
    let expected = w.checked_mul(h).and_then(|n| n.checked_mul(channels));
    if expected != Some(src.len()) {
        return Err(Error::bad_shape(
            "resize",
            format!("buffer has {} bytes, expected h*w*c", src.len()),
            &shape,
        ));
    }
    // Refuse absurd targets with an error instead of an allocation abort.
    let out_px = out_w
        .checked_mul(out_h)
        .filter(|&n| n > 0 && n <= MAX_OUTPUT_PIXELS);
    if out_px.is_none() {
        return Err(Error::bad_shape(
            "resize",
            format!(
                "target size {out_w}x{out_h} must be positive and at most {MAX_OUTPUT_PIXELS} px"
            ),
            &shape,
        ));
    }
    let [x0, y0, x1, y1] = bx;
    let inside = |a: f64, b: f64, size: usize| 0.0 <= a && a <= b && b <= size as f64;
    if !(inside(x0, x1, w) && inside(y0, y1, h)) {
        return Err(Error::bad_shape(
            "resize",
            format!("box {bx:?} is not a region of the {w}x{h} image"),
            &shape,
        ));
    }

    let horiz = precompute_taps(w, x0, x1, out_w, filter);
    let vert = precompute_taps(h, y0, y1, out_h, filter);
    // Pillow skips a pass only when it maps the whole axis onto itself.
    let need_h = out_w != w || x0 != 0.0 || x1 != w as f64;
    let need_v = out_h != h || y0 != 0.0 || y1 != h as f64;
    Ok(match (need_h, need_v) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal_pass(src, w, channels, 0..h, &horiz),
        (false, true) => vertical_pass(src, w * channels, 0, &vert),
        (true, true) if vertical_first(w, h, out_w, out_h) => {
            let tmp = vertical_pass(src, w * channels, 0, &vert);
            horizontal_pass(&tmp, w, channels, 0..out_h, &horiz)
        }
        (true, true) => {
            // Only the source rows the vertical taps touch.
            let first = vert.start[0];
            let last = vert.start[out_h - 1] + vert.len[out_h - 1];
            let tmp = horizontal_pass(src, w, channels, first..last, &horiz);
            vertical_pass(&tmp, out_w * channels, first, &vert)
        }
    })
}

/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width does (a speed heuristic from python-pillow/Pillow#9549; older Pillow always
/// went horizontal first). Since each pass rounds to 8 bits, the order changes output bytes. The
/// rule was fitted to Pillow 13.0.0, the version that made the fixtures: full (ow, oh) sweeps of
/// 60x60, 90x40 and 40x90 sources put the boundary exactly here, and it then matched all 1026
/// cases of `tools/pillow_xcheck.py` (without it, 96 of the first 318 random cases differed).
/// For CLIP's aspect-preserving shortest-side resize it only triggers on downscaled images
/// taller than 2:1.
fn vertical_first(w: usize, h: usize, out_w: usize, out_h: usize) -> bool {
    out_h < h && (h - out_h) as i64 > 2 * (w as i64 - out_w as i64)
}

/// Resamples rows `rows` of `src` (rows of `w` pixels) along x; output has `rows.len()` rows.
fn horizontal_pass(
    src: &[u8],
    w: usize,
    channels: usize,
    rows: std::ops::Range<usize>,
    taps: &Taps,
) -> Vec<u8> {
    let out_w = taps.start.len();
    let (in_row, out_row) = (w * channels, out_w * channels);
    let mut out = vec![0u8; rows.len() * out_row];
    for (dst_row, y) in out.chunks_exact_mut(out_row).zip(rows) {
        let src_row = &src[y * in_row..(y + 1) * in_row];
        for xx in 0..out_w {
            let k = &taps.weights[xx * taps.ksize..][..taps.len[xx]];
            let x0 = taps.start[xx];
            for c in 0..channels {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kw) in k.iter().enumerate() {
                    acc += src_row[(x0 + i) * channels + c] as i64 * kw as i64;
                }
                dst_row[xx * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// Resamples along y. `src` holds rows of `row_len` bytes whose first row is source row
/// `row_shift` (after a cropped horizontal pass).
fn vertical_pass(src: &[u8], row_len: usize, row_shift: usize, taps: &Taps) -> Vec<u8> {
    let out_h = taps.start.len();
    let mut out = vec![0u8; out_h * row_len];
    for (yy, dst_row) in out.chunks_exact_mut(row_len).enumerate() {
        let k = &taps.weights[yy * taps.ksize..][..taps.len[yy]];
        let y0 = taps.start[yy] - row_shift;
        for (j, dst) in dst_row.iter_mut().enumerate() {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kw) in k.iter().enumerate() {
                acc += src[(y0 + i) * row_len + j] as i64 * kw as i64;
            }
            *dst = clip8(acc);
        }
    }
    out
}

/// [`resize_u8`] for an RGB image.
pub fn resize_rgb(img: &RgbImage, out_w: u32, out_h: u32, filter: Filter) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    let data = resize_u8(
        img.as_raw(),
        w as usize,
        h as usize,
        3,
        out_w as usize,
        out_h as usize,
        filter,
    )?;
    RgbImage::from_raw(out_w, out_h, data).ok_or_else(|| {
        Error::bad_shape(
            "resize",
            "output buffer size",
            &[out_h as usize, out_w as usize, 3],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            assert_eq!(resize_u8(&src, 5, 4, 3, 5, 4, f).unwrap(), src);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalised taps sum to 1 << 22 up to rounding of each tap; a flat field must survive
        // both passes unchanged in every direction of scaling.
        let src = vec![200u8; 13 * 7 * 3];
        for (ow, oh) in [(4, 3), (29, 17), (13, 20), (1, 1)] {
            let out = resize_u8(&src, 13, 7, 3, ow, oh, Filter::Bicubic).unwrap();
            assert!(out.iter().all(|&v| v == 200), "{ow}x{oh}: {out:?}");
        }
    }

    #[test]
    fn taps_are_normalised_fixed_point() {
        for (n_in, n_out) in [(128, 64), (80, 64), (7, 19), (96, 76)] {
            let t = precompute_taps(n_in, 0.0, n_in as f64, n_out, Filter::Bicubic);
            for i in 0..n_out {
                let s: i64 = t.weights[i * t.ksize..][..t.len[i]]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!(
                    (s - (1 << 22)).abs() <= t.len[i] as i64,
                    "{n_in}->{n_out} px {i}: {s}"
                );
                assert!(t.start[i] + t.len[i] <= n_in);
            }
        }
    }

    #[test]
    fn bicubic_filter_shape() {
        let f = Filter::Bicubic;
        assert_eq!(f.eval(0.0), 1.0);
        assert_eq!(f.eval(1.0), 0.0);
        assert_eq!(f.eval(2.0), 0.0);
        assert_eq!(f.eval(-0.5), f.eval(0.5));
        // Keys a = -0.5 at 1.5: (((1.5 - 5) 1.5 + 8) 1.5 - 4) * -0.5 = -0.0625
        assert_eq!(f.eval(1.5), -0.0625);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            resize_u8(&[0; 5], 2, 1, 3, 1, 1, Filter::Bicubic),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            resize_u8(&[0; 6], 2, 1, 3, 0, 1, Filter::Bicubic),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            resize_u8(&[0; 3], 1, 1, 3, 1 << 20, 1 << 20, Filter::Bicubic),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            resize_u8(&[0; 3], usize::MAX, 2, 3, 1, 1, Filter::Bicubic),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            resize_u8(&[], 0, 0, 3, 1, 1, Filter::Bicubic),
            Err(Error::BadShape { .. })
        ));
        // Boxes must be regions of the image with no negative extent.
        for bx in [
            [0.0, 0.0, 3.0, 1.0],
            [-0.5, 0.0, 1.0, 1.0],
            [1.5, 0.0, 1.0, 1.0],
            [0.0, 0.0, f64::NAN, 1.0],
        ] {
            assert!(
                matches!(
                    resize_box_u8(&[0; 6], 2, 1, 3, bx, 1, 1, Filter::Lanczos),
                    Err(Error::BadShape { .. })
                ),
                "{bx:?}"
            );
        }
    }
}
