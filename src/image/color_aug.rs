//! kohya's colour augmentation (`color_aug`, sd-scripts' `AugHelper.color_aug`): on a third of the
//! visits, either a hue rotation of up to 8 of OpenCV's 180 hue steps or a gamma between 0.95 and
//! 1.05, on the 8-bit picture.
//!
//! kohya runs it through OpenCV and numpy, and the bytes follow theirs:
//! - The hue: `cv2.cvtColor(img, COLOR_BGR2HSV)` on kohya's RGB array (so OpenCV reads the red
//!   channel as blue), the hue channel set to `(h + shift) % 180` through a float64 and cast
//!   back to uint8 (truncated), then `COLOR_HSV2BGR`. OpenCV's 8-bit RGB-to-HSV is integer
//!   arithmetic (12-bit fixed-point reciprocal tables). Its HSV-to-RGB is float32 and has two
//!   paths: rows are done in blocks of 32 pixels by its x86 AVX2 code (single-precision fused
//!   multiply-adds, the result truncated), and each row's last `width % 32` pixels by its scalar
//!   code (the same formula, rounded to nearest). Both are reproduced. OpenCV 4.8.1 (kohya's pin)
//!   and 4.10 give the same bytes; OpenCV 5.1 gives others.
//! - The gamma: `np.clip(img ** gamma, 0, 255).astype(np.uint8)`: each value raised in float64
//!   and truncated, as numpy 2 computes it (numpy 1.26 on AVX-512 machines uses a vectorised
//!   power that can land an ulp below a whole number, so its bytes can differ by one there).
//!
//! `tests/color_aug.rs` replays 158 cases that OpenCV 4.10 and numpy 2.2 produced
//! (`scripts/dev/cv2_color_aug.py`).

use crate::tensor::Rng;
use image::RgbImage;
use std::sync::OnceLock;

/// The largest hue rotation, in OpenCV's 8-bit hue units (180 to the turn).
pub const HUE_SHIFT_LIMIT: f64 = 8.0;

/// What one visit's colour augmentation does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColorShift {
    /// Nothing (two visits in three).
    None,
    /// Rotate the hue by this many of OpenCV's hue units, in [0, 8] or [172, 180) (a negative
    /// draw plus 180, as kohya writes it).
    Hue(f64),
    /// Raise each 8-bit value to this power, in [0.95, 1.05).
    Gamma(f64),
}

impl ColorShift {
    /// kohya's draws: `random() <= 0.33` to augment at all, then `random() > 0.5` for the hue
    /// (its shift `uniform(-8, 8)`), else the gamma (`uniform(0.95, 1.05)`).
    pub fn draw(rng: &mut Rng) -> ColorShift {
        if rng.uniform() > 0.33 {
            return ColorShift::None;
        }
        if rng.uniform() > 0.5 {
            let shift = -HUE_SHIFT_LIMIT + 2.0 * HUE_SHIFT_LIMIT * rng.uniform();
            ColorShift::Hue(if shift < 0.0 { 180.0 + shift } else { shift })
        } else {
            ColorShift::Gamma(0.95 + 0.1 * rng.uniform())
        }
    }

    /// Applies the shift to `img` in place.
    pub fn apply(self, img: &mut RgbImage) {
        match self {
            ColorShift::None => {}
            ColorShift::Hue(shift) => rotate_hue(img, shift),
            ColorShift::Gamma(gamma) => {
                let table: Vec<u8> = (0..=255u8)
                    .map(|v| (v as f64).powf(gamma).clamp(0.0, 255.0) as u8)
                    .collect();
                for p in img.pixels_mut() {
                    p.0 = p.0.map(|c| table[c as usize]);
                }
            }
        }
    }
}

/// Pixels per block of OpenCV's vectorised HSV-to-RGB (x86 AVX2: 4 vectors of 8 floats).
const HSV_BLOCK: usize = 32;

/// kohya's hue rotation of every pixel (see the module notes): channels in stored order are
/// OpenCV's (b, g, r).
fn rotate_hue(img: &mut RgbImage, shift: f64) {
    let width = img.width() as usize;
    let vector_end = width / HSV_BLOCK * HSV_BLOCK;
    for (i, p) in img.pixels_mut().enumerate() {
        let [b, g, r] = p.0;
        let (h, s, v) = bgr_to_hsv(b, g, r);
        let h = ((h as f64 + shift) % 180.0) as u8;
        p.0 = hsv_to_bgr(h, s, v, i % width < vector_end);
    }
}

/// OpenCV's fixed-point reciprocal tables: `round((255 << 12) / v)` for the saturation and
/// `round((180 << 12) / (6 diff))` for the hue (index 0 holds 0).
fn hsv_tables() -> &'static ([i32; 256], [i32; 256]) {
    static TABLES: OnceLock<([i32; 256], [i32; 256])> = OnceLock::new();
    TABLES.get_or_init(|| {
        let (mut sdiv, mut hdiv) = ([0; 256], [0; 256]);
        for i in 1..256 {
            sdiv[i] = ((255 << SHIFT) as f64 / i as f64).round_ties_even() as i32;
            hdiv[i] = ((180 << SHIFT) as f64 / (6 * i) as f64).round_ties_even() as i32;
        }
        (sdiv, hdiv)
    })
}

/// Fixed-point fraction bits of OpenCV's 8-bit HSV tables.
const SHIFT: i32 = 12;

/// OpenCV's 8-bit BGR to HSV (hue in [0, 180), saturation and value in [0, 255]).
fn bgr_to_hsv(b: u8, g: u8, r: u8) -> (u8, u8, u8) {
    let (sdiv, hdiv) = hsv_tables();
    let (b, g, r) = (b as i32, g as i32, r as i32);
    let v = b.max(g).max(r);
    let diff = v - b.min(g).min(r);
    let half = 1 << (SHIFT - 1);
    let s = (diff * sdiv[v as usize] + half) >> SHIFT;
    let h = if v == r {
        g - b
    } else if v == g {
        b - r + 2 * diff
    } else {
        r - g + 4 * diff
    };
    let h = (h * hdiv[diff as usize] + half) >> SHIFT;
    let h = if h < 0 { h + 180 } else { h };
    (h as u8, s as u8, v as u8)
}

/// OpenCV's 8-bit HSV to BGR: the vector path (`vector`, truncating) or the scalar one
/// (rounding half to even, as `cvRound`).
fn hsv_to_bgr(h: u8, s: u8, v: u8, vector: bool) -> [u8; 3] {
    let scale = 1.0f32 / 255.0;
    let (s, v) = (s as f32 * scale, v as f32 * scale);
    let to_u8 = |x: f32| {
        let x = x * 255.0;
        (if vector {
            x.trunc()
        } else {
            x.round_ties_even()
        })
        .clamp(0.0, 255.0) as u8
    };
    if !vector && s == 0.0 {
        return [to_u8(v); 3];
    }
    let h = h as f32 * (6.0f32 / 180.0);
    let sector = h.floor();
    let f = h - sector;
    // 1 - s f and 1 - s (1 - f) are single fused multiply-adds in OpenCV's AVX2 build.
    let tab = [
        v,
        v * (1.0 - s),
        v * (-s).mul_add(f, 1.0),
        v * (-s).mul_add(1.0 - f, 1.0),
    ];
    const SECTORS: [[usize; 3]; 6] = [
        [1, 3, 0],
        [1, 0, 2],
        [3, 0, 1],
        [0, 2, 1],
        [0, 1, 3],
        [2, 1, 0],
    ];
    let [bi, gi, ri] = SECTORS[sector as usize % 6];
    [to_u8(tab[bi]), to_u8(tab[gi]), to_u8(tab[ri])]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_kohyas_probabilities_and_ranges() {
        let mut rng = Rng::new(9);
        let (mut none, mut hue, mut gamma) = (0, 0, 0);
        for _ in 0..30_000 {
            match ColorShift::draw(&mut rng) {
                ColorShift::None => none += 1,
                ColorShift::Hue(s) => {
                    assert!(
                        (0.0..=8.0).contains(&s) || (172.0..180.0).contains(&s),
                        "{s}"
                    );
                    hue += 1;
                }
                ColorShift::Gamma(g) => {
                    assert!((0.95..1.05).contains(&g), "{g}");
                    gamma += 1;
                }
            }
        }
        // 0.67, 0.165, 0.165 of 30,000: each within 5 standard deviations.
        assert!((none as f64 - 20_100.0).abs() < 410.0, "{none}");
        assert!((hue as f64 - 4_950.0).abs() < 330.0, "{hue}");
        assert!((gamma as f64 - 4_950.0).abs() < 330.0, "{gamma}");
    }

    #[test]
    fn greys_keep_their_bytes() {
        // A grey has no hue, and OpenCV round-trips it on both paths (40 = a block and a tail).
        let mut img = RgbImage::from_fn(40, 1, |x, _| image::Rgb([x as u8 * 6; 3]));
        let before = img.clone();
        ColorShift::Hue(5.0).apply(&mut img);
        assert_eq!(img, before);
    }
}
