//! CLIP image preprocessing (SDXL.md 7.3), matching OpenAI CLIP's Pillow-based transform:
//! shortest side -> `size` with Pillow's 8-bit bicubic (long side truncated), centre crop with
//! floored margins, 1/255, per-channel mean/std. Output is f32 `(3, crop_h, crop_w)`.
//!
//! The arithmetic after the resize is done in f64 and rounded once to f32, because that is how the
//! float64 references were made (numpy float64, then a float32 copy): the fixture's
//! `pixel_values` are then reproduced bit for bit instead of to within an ulp.

use crate::image::resample::{resize_rgb, Filter};
use crate::{Error, Result};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The settings of a `CLIPImageProcessor` that matter for the image tower.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipPreprocess {
    /// Target of the shortest side (224 for ViT-B/32, 64 in the tiny fixture).
    pub shortest_edge: usize,
    pub crop_h: usize,
    pub crop_w: usize,
    pub filter: Filter,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ClipPreprocess {
    /// OpenAI's preprocessing at `size`: bicubic, square crop, OpenAI mean/std.
    pub fn openai(size: usize) -> Self {
        Self {
            shortest_edge: size,
            crop_h: size,
            crop_w: size,
            filter: Filter::Bicubic,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }

    /// Reads a transformers `preprocessor_config.json`. Missing keys take the OpenAI defaults
    /// (224, bicubic, OpenAI mean/std), as `CLIPImageProcessor` does.
    pub fn from_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let j: Value = crate::formats::python_json::read_file(path)?;
        let bad = |msg: String| Error::file(path, msg);
        let mut p = Self::openai(224);
        if let Some(size) = j.get("size") {
            p.shortest_edge = match size.get("shortest_edge").and_then(Value::as_u64) {
                Some(n) => n as usize,
                None if size.is_u64() => size.as_u64().unwrap_or(224) as usize,
                None => {
                    return Err(bad(format!(
                        "size {size} has no shortest_edge (only that mode is supported)"
                    )))
                }
            };
        }
        p.crop_h = p.shortest_edge;
        p.crop_w = p.shortest_edge;
        if let Some(crop) = j.get("crop_size") {
            if let (Some(h), Some(w)) = (
                crop.get("height").and_then(Value::as_u64),
                crop.get("width").and_then(Value::as_u64),
            ) {
                p.crop_h = h as usize;
                p.crop_w = w as usize;
            } else if let Some(n) = crop.as_u64() {
                p.crop_h = n as usize;
                p.crop_w = n as usize;
            }
        }
        if j.get("do_center_crop").and_then(Value::as_bool) == Some(false) {
            return Err(bad("do_center_crop = false is not supported".into()));
        }
        if let Some(code) = j.get("resample").and_then(Value::as_u64) {
            p.filter = Filter::from_pil_code(code)
                .ok_or_else(|| bad(format!("unsupported resample code {code}")))?;
        }
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match j.get(key).and_then(Value::as_array) {
                None => Ok(default),
                Some(a) if a.len() == 3 && a.iter().all(Value::is_number) => Ok([
                    a[0].as_f64().unwrap_or(0.0),
                    a[1].as_f64().unwrap_or(0.0),
                    a[2].as_f64().unwrap_or(0.0),
                ]),
                Some(a) => Err(bad(format!("{key} must hold 3 numbers, got {a:?}"))),
            }
        };
        p.mean = triple("image_mean", OPENAI_CLIP_MEAN)?;
        p.std = triple("image_std", OPENAI_CLIP_STD)?;
        if p.shortest_edge == 0 || p.crop_h > p.shortest_edge || p.crop_w > p.shortest_edge {
            return Err(bad(format!(
                "crop {}x{} must be positive and fit in shortest edge {}",
                p.crop_h, p.crop_w, p.shortest_edge
            )));
        }
        if p.std.contains(&0.0) {
            return Err(bad("image_std has a zero".into()));
        }
        Ok(p)
    }

    /// Size `(w, h)` after the shortest-edge resize: the long side is
    /// `int(size * long / short)`, truncated, as torchvision/OpenAI and the fixtures compute it.
    pub fn resized_dims(&self, w: usize, h: usize) -> (usize, usize) {
        let s = self.shortest_edge;
        if w <= h {
            (s, ((s * h) as f64 / w as f64) as usize)
        } else {
            (((s * w) as f64 / h as f64) as usize, s)
        }
    }

    /// One RGB image -> f32 `(3, crop_h, crop_w)`, channel-major.
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::bad_shape(
                "clip_preprocess",
                "empty image",
                &[h, w, 3],
            ));
        }
        let (nw, nh) = self.resized_dims(w, h);
        // Pillow returns a copy when the size is unchanged; resize_rgb does the same.
        let r = resize_rgb(img, nw as u32, nh as u32, self.filter)?;
        let (top, left) = ((nh - self.crop_h) / 2, (nw - self.crop_w) / 2);
        let (ch, cw) = (self.crop_h, self.crop_w);
        let mut out = vec![0f32; 3 * ch * cw]; // (3, H, W)
        for c in 0..3 {
            let plane = &mut out[c * ch * cw..(c + 1) * ch * cw];
            for y in 0..ch {
                for x in 0..cw {
                    let v = r.get_pixel((left + x) as u32, (top + y) as u32)[c] as f64;
                    plane[y * cw + x] = ((v / 255.0 - self.mean[c]) / self.std[c]) as f32;
                }
            }
        }
        Ok(out)
    }

    /// A batch of images -> f32 `(B, 3, crop_h, crop_w)`.
    pub fn apply_batch(&self, imgs: &[RgbImage]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(imgs.len() * 3 * self.crop_h * self.crop_w);
        for img in imgs {
            out.extend(self.apply(img)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::io::load_rgb;
    use crate::test_fixtures::{read_f32, tiny, TempDir};

    #[test]
    fn reproduces_reference_pixel_values_bit_for_bit() {
        let p = ClipPreprocess::from_config(tiny().join("clip/preprocessor_config.json")).unwrap();
        assert_eq!(p, ClipPreprocess::openai(64));
        let imgs: Vec<RgbImage> = ["pipeline.png", "clip_input.png"]
            .iter()
            .map(|n| load_rgb(tiny().join("reference").join(n)).unwrap())
            .collect();
        assert_eq!(imgs[1].dimensions(), (80, 96)); // exercises truncation (76.8 -> 76) and a crop
        assert_eq!(p.resized_dims(80, 96), (64, 76));
        assert_eq!(p.resized_dims(128, 128), (64, 64));
        let ours = p.apply_batch(&imgs).unwrap();
        let (want, shape) = read_f32(&tiny().join("reference/clip.safetensors"), "pixel_values");
        assert_eq!(shape, vec![2, 3, 64, 64]);
        let max_abs = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let num: f64 = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        assert!(rel <= 1e-4, "relative L2 {rel}");
        // Stronger than the README's 1e-4: every value identical, so any drift in the 8-bit
        // resample (one level = 0.015 after normalisation) fails loudly.
        assert_eq!(max_abs, 0.0, "max abs error {max_abs}, rel L2 {rel}");
    }

    #[test]
    fn config_defaults_and_errors() {
        let dir = TempDir::new("preproc");
        let cfg = dir.path().join("preprocessor_config.json");
        std::fs::write(&cfg, "{}").unwrap();
        assert_eq!(
            ClipPreprocess::from_config(&cfg).unwrap(),
            ClipPreprocess::openai(224)
        );
        std::fs::write(
            &cfg,
            r#"{"size": {"shortest_edge": 32}, "crop_size": {"height": 48, "width": 32}}"#,
        )
        .unwrap();
        assert!(matches!(
            ClipPreprocess::from_config(&cfg),
            Err(Error::File { .. })
        ));
        std::fs::write(&cfg, r#"{"resample": 0}"#).unwrap();
        assert!(ClipPreprocess::from_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("resample"));
        std::fs::write(&cfg, r#"{"image_mean": [0.5]}"#).unwrap();
        assert!(ClipPreprocess::from_config(&cfg).is_err());
        std::fs::write(&cfg, "not json").unwrap();
        assert!(matches!(
            ClipPreprocess::from_config(&cfg),
            Err(Error::Format(crate::formats::Error::Json { .. }))
        ));
        assert!(matches!(
            ClipPreprocess::from_config(dir.path().join("nope.json")),
            Err(Error::Format(crate::formats::Error::Io { .. }))
        ));
    }

    #[test]
    fn wide_tall_and_tiny_images() {
        let p = ClipPreprocess::openai(8);
        for (w, h) in [(1, 1), (3, 50), (50, 3), (8, 8), (9, 8)] {
            let img =
                RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
            let out = p.apply(&img).unwrap();
            assert_eq!(out.len(), 3 * 8 * 8, "{w}x{h}");
            assert!(out.iter().all(|v| v.is_finite()));
        }
        assert_eq!(p.resized_dims(3, 50), (8, 133));
        assert_eq!(p.resized_dims(50, 3), (133, 8));
        assert!(p.apply(&RgbImage::new(0, 4)).is_err());
    }
}
