//! Training data: a folder of images with kohya-style same-name `.txt` captions (or a caption
//! template), resized and centre-cropped to the training resolution or an aspect-ratio bucket,
//! and a content-addressed on-disk cache so the VAE and text encoders need not stay resident.

use crate::image::io::{load_rgb_upright, resize_center_crop, rgb_to_chw, CropInfo, PixelRange};
use crate::tensor::{load_safetensors, save_safetensors};
use crate::{Device, Error, Result, Tensor};
use image::RgbImage;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Where captions come from.
#[derive(Clone, Debug)]
pub struct CaptionSource {
    /// Used when an image has no `.txt`; `{trigger}` is replaced by the trigger phrase.
    pub template: Option<String>,
    pub trigger: String,
}

impl CaptionSource {
    fn caption_for(&self, image: &Path) -> Result<String> {
        let txt = image.with_extension("txt");
        if txt.exists() {
            let text = std::fs::read_to_string(&txt).map_err(|e| Error::io(&txt, e))?;
            return Ok(text.trim().replace("{trigger}", &self.trigger));
        }
        match &self.template {
            Some(t) => Ok(t.replace("{trigger}", &self.trigger)),
            None => Err(Error::file(
                image,
                "no caption: add a same-name .txt file or pass a caption template",
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub path: PathBuf,
    pub caption: String,
    /// sha256 of the image file's bytes: the cache key.
    pub hash: String,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub samples: Vec<Sample>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Dataset {
    /// Every image of `dir` (sorted by name). Hidden files and `.txt` captions are skipped; any
    /// other file is an error naming it, and so is an image that does not decode.
    pub fn scan(dir: &Path, captions: &CaptionSource) -> Result<Dataset> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        let mut samples = Vec::new();
        for p in paths {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ext = p
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if name.starts_with('.') || ext == "txt" {
                continue;
            }
            if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                return Err(Error::file(
                    &p,
                    format!(
                        "not an image (dataset folders hold {} and .txt captions)",
                        IMAGE_EXTENSIONS.join("/")
                    ),
                ));
            }
            // Decode once now so a broken image fails before hours of training, not in the middle.
            load_training_picture(&p)?;
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            samples.push(Sample {
                caption: captions.caption_for(&p)?,
                hash: sha256_hex(&bytes),
                path: p,
            });
        }
        if samples.is_empty() {
            return Err(Error::file(dir, "no training images found"));
        }
        Ok(Dataset { samples })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// SDXL-style aspect-ratio buckets for a base resolution: sides multiples of 64, area at most
/// resolution², aspect ratios up to 4:1 either way.
pub fn buckets(resolution: usize) -> Vec<(usize, usize)> {
    let area = resolution * resolution;
    let mut out = Vec::new();
    let mut w = (resolution / 2).max(64) / 64 * 64;
    while w <= resolution * 2 {
        let h = (area / w) / 64 * 64;
        if h >= 64 && w * 4 >= h && h * 4 >= w {
            out.push((w, h));
        }
        w += 64;
    }
    if !out.contains(&(resolution, resolution)) {
        out.push((resolution, resolution));
    }
    out
}

/// The bucket whose aspect ratio is closest to (w, h) in log space.
pub fn nearest_bucket(w: usize, h: usize, buckets: &[(usize, usize)]) -> (usize, usize) {
    let target = (w as f64 / h as f64).ln();
    *buckets
        .iter()
        .min_by(|a, b| {
            let da = ((a.0 as f64 / a.1 as f64).ln() - target).abs();
            let db = ((b.0 as f64 / b.1 as f64).ln() - target).abs();
            da.total_cmp(&db)
        })
        .expect("bucket list is never empty")
}

/// A training picture, turned upright by its EXIF orientation as it is displayed (phones store
/// portraits sideways with an orientation tag), as diffusers' DreamBooth scripts load theirs
/// (`exif_transpose`).
pub fn load_training_picture(path: &Path) -> Result<RgbImage> {
    load_rgb_upright(path)
}

/// One training picture as the VAE wants it at bucket `size` (width, height): (1, 3, H, W) in
/// [-1, 1], plus its crop record (the SDXL time ids).
pub fn training_tensor(
    img: &RgbImage,
    size: (usize, usize),
    device: Device,
) -> Result<(Tensor, CropInfo)> {
    let (cropped, crop) = resize_center_crop(img, size.0 as u32, size.1 as u32)?;
    let chw = rgb_to_chw(&cropped, PixelRange::Signed);
    Ok((Tensor::from_vec(chw, (1, 3, size.1, size.0), device)?, crop))
}

/// A content-addressed cache of tensors (latent distributions, text embeddings) in a folder.
#[derive(Clone, Debug)]
pub struct TensorCache {
    pub dir: PathBuf,
}

impl TensorCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<TensorCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(TensorCache { dir })
    }

    /// A stable key from parts (content hashes, sizes, model identity).
    pub fn key(parts: &[&str]) -> String {
        sha256_hex(parts.join("\u{1f}").as_bytes())
    }

    /// The cached tensors for `key`, computing and storing them (atomically) on a miss.
    pub fn get_or_insert(
        &self,
        key: &str,
        compute: impl FnOnce() -> Result<Vec<(String, Tensor)>>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let path = self.dir.join(format!("{key}.safetensors"));
        if path.exists() {
            // A damaged entry (a crash cannot leave one, but a full disk or a user can) is
            // recomputed rather than trusted.
            if let Ok(map) = load_safetensors(&path) {
                return Ok(map);
            }
        }
        let tensors = compute()?;
        save_safetensors(&path, &tensors, None)?;
        Ok(tensors.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A portrait stored sideways with EXIF orientation 6 trains as the upright portrait: the
    /// same pixels, so the same portrait bucket and the same tensor as the picture saved upright.
    #[test]
    fn sideways_pictures_train_upright() {
        let dir = crate::test_fixtures::TempDir::new("exif-train");
        // Stored 48 wide and 32 high; shown 32 wide and 48 high.
        let stored = RgbImage::from_fn(48, 32, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 90]));
        let sideways = dir.path().join("sideways.png");
        std::fs::write(
            &sideways,
            crate::image::io::tests::png_turned_clockwise(&stored),
        )
        .unwrap();
        let upright = load_training_picture(&sideways).unwrap();
        assert_eq!(upright.dimensions(), (32, 48));
        let saved = dir.path().join("upright.png");
        crate::image::io::save_png(&saved, &upright).unwrap();
        let list = buckets(256);
        let size = nearest_bucket(upright.width() as usize, upright.height() as usize, &list);
        assert!(size.1 > size.0, "{size:?}");
        let (a, ca) = training_tensor(&upright, size, Device::Cpu).unwrap();
        let again = load_training_picture(&saved).unwrap();
        let (b, cb) = training_tensor(&again, size, Device::Cpu).unwrap();
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        assert_eq!(ca.time_ids(), cb.time_ids());
        // As stored, the picture would have gone to a landscape bucket.
        let (w, h) = nearest_bucket(48, 32, &list);
        assert!(w > h);
    }

    #[test]
    fn buckets_cover_square_and_wide() {
        let b = buckets(1024);
        assert!(b.contains(&(1024, 1024)));
        assert!(b
            .iter()
            .all(|&(w, h)| w * h <= 1024 * 1024 && w % 64 == 0 && h % 64 == 0));
        let (w, h) = nearest_bucket(1600, 900, &b);
        assert!(w > h);
        assert_eq!(nearest_bucket(500, 500, &b), (1024, 1024));
    }
}
