//! Training data: a folder of images with kohya-style same-name `.txt` captions and kohya's
//! `N_name` repeat folders (or a caption template), resized and centre-cropped to the training
//! resolution or an aspect-ratio bucket, and a content-addressed on-disk cache so the VAE and
//! text encoders need not stay resident.

use super::buckets::Placement;
pub use super::buckets::{buckets, nearest_bucket};
use crate::image::color_aug::ColorShift;
use crate::image::io::{
    load_rgb_alpha_upright, load_rgb_upright, resize_crop_at, rgb_to_chw, CropInfo, PixelRange,
};
use crate::tensor::{load_safetensors, save_safetensors, Rng};
use crate::{Device, Error, Result, Tensor};
use image::{GrayImage, RgbImage};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The caption-file extensions beside pictures: kstyle reads `txt` by default, kohya `caption`.
pub const CAPTION_EXTENSIONS: [&str; 2] = ["txt", "caption"];

/// Where captions come from.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionSource {
    /// Used when an image has neither a caption file nor a kohya folder caption; `{trigger}` is
    /// replaced by the trigger phrase.
    pub template: Option<String>,
    pub trigger: String,
    /// Extension of the same-name caption files, without the dot (`txt`; kohya's
    /// `--caption_extension`).
    pub extension: String,
    /// kohya's `--caption_prefix` / `--caption_suffix`: joined to every caption with a space.
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    /// kohya's `--enable_wildcard`: every line of a caption is kept (one is chosen per visit);
    /// otherwise only the first line is, as kohya reads caption files.
    pub wildcard: bool,
}

impl CaptionSource {
    /// The caption of `image`: its caption file, else the folder's (kohya's `N_name` folders
    /// caption their images `name`), else the template.
    fn caption_for(&self, image: &Path, folder: Option<&str>) -> Result<String> {
        let file = image.with_extension(&self.extension);
        let text = if file.exists() {
            std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?
        } else if let Some(f) = folder {
            f.to_string()
        } else if let Some(t) = &self.template {
            t.clone()
        } else {
            return Err(Error::file(
                image,
                format!(
                    "no caption: add a same-name .{} file, put it in a kohya `N_caption` folder \
                     or pass a caption template",
                    self.extension
                ),
            ));
        };
        Ok(self.caption_of_text(&text))
    }

    /// A caption's text as training reads it: `{trigger}` replaced, its non-empty lines (only
    /// the first without wildcards), each between the prefix and the suffix.
    pub(super) fn caption_of_text(&self, text: &str) -> String {
        let text = text.trim().replace("{trigger}", &self.trigger);
        let mut lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            lines.push("");
        }
        if !self.wildcard {
            lines.truncate(1);
        }
        let framed: Vec<String> = lines.iter().map(|l| self.framed(l)).collect();
        framed.join("\n")
    }

    /// `line` between the prefix and the suffix, each joined with a space.
    fn framed(&self, line: &str) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(3);
        parts.extend(self.prefix.as_deref());
        parts.push(line);
        parts.extend(self.suffix.as_deref());
        parts.join(" ")
    }
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub path: PathBuf,
    pub caption: String,
    /// sha256 of the image file's bytes: the cache key.
    pub hash: String,
    /// Visits per epoch (kohya's folder repeats; 1 for pictures directly in the data folder).
    pub repeats: usize,
    pub role: Role,
    /// The picture's width and height.
    pub size: (u32, u32),
    /// Index of its subset's [`super::subsets::SubsetRules`] (0 without a dataset config).
    pub rules: usize,
    /// Index of its dataset's [`super::subsets::Group`] (0 without a dataset config).
    pub group: usize,
}

/// What a picture is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `--data`: the style, trained on the full loss.
    Style,
    /// `--reg-data`: a regularization picture, trained on the prior-preservation term.
    Prior,
    /// `--val-data`: never trained on; the validation loss reads it.
    Validation,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    /// For the run's log: sub-folders left out, with the reason, and caption files not read.
    pub warnings: Vec<String>,
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// kohya's DreamBooth folder name `N_name`: N repeats, `name` (underscores kept) the caption of
/// its uncaptioned images. None when the name does not start with a number.
pub fn kohya_folder(name: &str) -> Option<(usize, Option<String>)> {
    let (n, rest) = name.split_once('_').unwrap_or((name, ""));
    let repeats = n.parse().ok()?;
    Some((repeats, (!rest.trim().is_empty()).then(|| rest.to_string())))
}

/// Visits per epoch of regularization pictures whose folders repeat them `repeats` times, as
/// kohya balances them against `train_visits` training visits: each picture at its folder's
/// count in turn until the visits reach the training ones (later pictures then get 0), then one
/// more visit each in turn until they do.
pub fn prior_repeats(train_visits: usize, repeats: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; repeats.len()];
    let mut n = 0;
    let mut first = true;
    while n < train_visits && !repeats.is_empty() {
        for (count, &r) in counts.iter_mut().zip(repeats) {
            let add = if first { r } else { 1 };
            *count += add;
            n += add;
            if n >= train_visits {
                break;
            }
        }
        first = false;
    }
    counts
}

/// Sorted entries of a folder, hidden ones (`.ipynb_checkpoints`, `.DS_Store`) left out.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for e in read {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Whether `file` is named for `image`: its stem followed by `.` or `_`.
fn companion_of(file: &Path, image: &Path) -> bool {
    let (Some(name), Some(stem)) = (file.file_name(), image.file_stem()) else {
        return false;
    };
    let (name, stem) = (name.to_string_lossy(), stem.to_string_lossy());
    name.strip_prefix(stem.as_ref())
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('_'))
}

pub(super) fn is_image(p: &Path) -> bool {
    p.extension().is_some_and(|e| {
        IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
    })
}

impl Dataset {
    /// Every image of `dir` (sorted by name), and of its kohya-style `N_name` sub-folders, each
    /// image of those visited N times an epoch. Caption files and kohya's latent caches (`.npz`)
    /// beside an image are passed over; any other file is an error naming it, and so is an image
    /// that does not decode. Sub-folders whose name has no repeat count (or 0) are left out, as
    /// kohya leaves them, and named in `warnings`.
    pub fn scan(dir: &Path, captions: &CaptionSource) -> Result<Dataset> {
        let mut samples = Vec::new();
        let mut warnings = Vec::new();
        let mut folders = vec![(dir.to_path_buf(), 1, None)];
        for p in entries(dir)? {
            if !p.is_dir() {
                continue;
            }
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match kohya_folder(&name) {
                Some((0, _)) => warnings.push(format!("left out {}: 0 repeats", p.display())),
                Some((repeats, caption)) => folders.push((p, repeats, caption)),
                None => warnings.push(format!(
                    "left out {}: not a kohya `N_name` folder (N: repeats per epoch)",
                    p.display()
                )),
            }
        }
        for (folder, repeats, folder_caption) in folders {
            let nested = match folder == dir {
                true => None,
                false => Some("folders nest one level"),
            };
            let found = scan_pictures(
                &folder,
                repeats,
                folder_caption.as_deref(),
                captions,
                nested,
            )?;
            samples.extend(found.samples);
            warnings.extend(found.warnings);
        }
        if samples.is_empty() {
            return Err(Error::file(
                dir,
                "no training images found (pictures go in the folder or in kohya-style \
                 `N_name` sub-folders)",
            ));
        }
        Ok(Dataset { samples, warnings })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Example visits in one epoch: every sample times its repeats.
    pub fn epoch_len(&self) -> usize {
        self.samples.iter().map(|s| s.repeats).sum()
    }

    /// One epoch's visits in data order, each sample index `repeats` times (shuffled by the
    /// trainer).
    pub fn epoch_order(repeats: &[usize]) -> Vec<usize> {
        repeats
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i, n))
            .collect()
    }
}

/// The pictures directly in `folder`, each visited `repeats` times an epoch and captioned by
/// its caption file, else `folder_caption`, else the template. Caption files and kohya's latent
/// caches (`.npz`) beside a picture are passed over; any other file is an error naming it, and
/// so is a picture that does not decode. Sub-folders are named in `warnings` with `nested` as
/// the reason (None: passed over silently), and so are caption files of the other extension
/// (`.txt` or `.caption`) beside pictures that have none of `captions.extension`: kohya's own
/// default is `.caption`, so a config written for it may name neither.
pub fn scan_pictures(
    folder: &Path,
    repeats: usize,
    folder_caption: Option<&str>,
    captions: &CaptionSource,
    nested: Option<&str>,
) -> Result<Dataset> {
    let mut samples = Vec::new();
    let mut warnings = Vec::new();
    // Caption files of another extension beside pictures that have none of `captions`'.
    let mut unread: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::new();
    let paths = entries(folder)?;
    for p in &paths {
        if p.is_dir() {
            if let Some(why) = nested {
                warnings.push(format!("left out {}: {why}", p.display()));
            }
            continue;
        }
        if !is_image(p) {
            let ext = p
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            let ext = ext.as_deref().unwrap_or("");
            // Captions and kohya's caches (`a.npz`, `a_1024x1024_sdxl.npz`,
            // `a_te_outputs.npz`) beside a picture.
            let companion = (CAPTION_EXTENSIONS.contains(&ext) || ext == "npz")
                && paths.iter().any(|q| is_image(q) && companion_of(p, q));
            if ext == captions.extension || companion {
                continue;
            }
            return Err(Error::file(
                p,
                format!(
                    "not an image (dataset folders hold {} pictures, .{} captions and \
                     kohya `N_name` sub-folders)",
                    IMAGE_EXTENSIONS.join("/"),
                    captions.extension
                ),
            ));
        }
        // Decode once now so a broken image fails before hours of training, not in the
        // middle.
        let size = load_training_picture(p)?.dimensions();
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        if !p.with_extension(&captions.extension).exists() {
            for ext in CAPTION_EXTENSIONS {
                if ext != captions.extension && p.with_extension(ext).exists() {
                    unread.entry(ext).or_default().push(p.with_extension(ext));
                }
            }
        }
        samples.push(Sample {
            size,
            caption: captions.caption_for(p, folder_caption)?,
            hash: sha256_hex(&bytes),
            path: p.clone(),
            repeats,
            role: Role::Style,
            rules: 0,
            group: 0,
        });
    }
    for (ext, files) in unread {
        warnings.push(format!(
            "not read: {} .{ext} caption file(s) in {} (the first: {}): captions are read from \
             .{} files (--caption-extension, a subset's caption_extension), and pictures without \
             one take the folder's caption or the template",
            files.len(),
            folder.display(),
            files[0].display(),
            captions.extension
        ));
    }
    Ok(Dataset { samples, warnings })
}

/// Visits grouped by `key` (a batch must share one latent size, and one role), the groups in
/// the order their first visit appears in `order`, each keeping `order`'s order.
pub fn group_visits<K: PartialEq>(order: &[usize], key: impl Fn(usize) -> K) -> Vec<Vec<usize>> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for &i in order {
        let k = key(i);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, visits)) => visits.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups.into_iter().map(|(_, v)| v).collect()
}

/// One epoch's batches from its shuffled visits, as kohya batches its buckets: the visits
/// grouped by `key` (the trainer's adds the role and the dataset to the bucket; kohya batches
/// each dataset apart too, not by role), each group cut into batches of `size` of its visits'
/// example (one per group: the key must decide it; a group's last batch holds the rest), and
/// the batches shuffled. When every size is 1 every visit is a batch of its own, in `order`'s
/// order, and nothing is drawn from `rng`.
pub fn epoch_batches<K: PartialEq>(
    order: &[usize],
    key: impl Fn(usize) -> K,
    size: impl Fn(usize) -> usize,
    rng: &mut Rng,
) -> Vec<Vec<usize>> {
    if order.iter().all(|&i| size(i) <= 1) {
        return order.iter().map(|&i| vec![i]).collect();
    }
    let mut batches: Vec<Vec<usize>> = group_visits(order, key)
        .iter()
        .flat_map(|g| g.chunks(size(g[0]).max(1)).map(<[usize]>::to_vec))
        .collect();
    rng.shuffle(&mut batches);
    batches
}

/// Batches in an epoch of `order`'s visits: what [`epoch_batches`] makes, without the draws.
pub fn batches_per_epoch<K: PartialEq>(
    order: &[usize],
    key: impl Fn(usize) -> K,
    size: impl Fn(usize) -> usize,
) -> usize {
    group_visits(order, key)
        .iter()
        .map(|g| g.len().div_ceil(size(g[0]).max(1)))
        .sum()
}

/// A training picture, turned upright by its EXIF orientation as it is displayed (phones store
/// portraits sideways with an orientation tag), as diffusers' DreamBooth scripts load theirs
/// (`exif_transpose`).
pub fn load_training_picture(path: &Path) -> Result<RgbImage> {
    load_rgb_upright(path)
}

/// [`load_training_picture`] with its alpha channel (`--alpha-mask`), None when it has none.
pub fn load_training_picture_alpha(path: &Path) -> Result<(RgbImage, Option<GrayImage>)> {
    load_rgb_alpha_upright(path)
}

/// The mask picture of training picture `path` in `dir` (`--mask-data`): the file of the same
/// stem (png, jpg, jpeg or webp), turned upright, of the picture's size `dims`; its red channel,
/// as kohya reads a conditioning image's mask. A missing or mis-sized mask is an error naming it.
pub fn mask_picture(dir: &Path, path: &Path, dims: (u32, u32)) -> Result<GrayImage> {
    let stem = path
        .file_stem()
        .ok_or_else(|| Error::file(path, "a picture without a file name"))?;
    let found = ["png", "jpg", "jpeg", "webp"]
        .iter()
        .map(|ext| dir.join(stem).with_extension(ext))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "no mask in --mask-data {} (looked for {}.png, .jpg, .jpeg, .webp)",
                    dir.display(),
                    stem.to_string_lossy()
                ),
            )
        })?;
    let img = load_rgb_upright(&found)?;
    if img.dimensions() != dims {
        return Err(Error::file(
            &found,
            format!(
                "the mask is {}x{}, its picture {} is {}x{}",
                img.width(),
                img.height(),
                path.display(),
                dims.0,
                dims.1
            ),
        ));
    }
    Ok(GrayImage::from_fn(img.width(), img.height(), |x, y| {
        image::Luma([img.get_pixel(x, y).0[0]])
    }))
}

/// `values` (B, H, W) averaged over blocks to (B, oh, ow): PyTorch's
/// `interpolate(mode="area")` where H and W are multiples of oh and ow (a picture and its
/// latents: 8). Sums in f64.
pub fn area_downsample(
    values: &[f32],
    (b, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f32>> {
    if values.len() != b * h * w || oh == 0 || ow == 0 || h % oh != 0 || w % ow != 0 {
        return Err(Error::msg(format!(
            "area_downsample: {} values as ({b}, {h}, {w}) to ({oh}, {ow}) blocks",
            values.len()
        )));
    }
    let (fy, fx) = (h / oh, w / ow);
    let mut out = Vec::with_capacity(b * oh * ow);
    for img in values.chunks(h * w) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = 0.0f64;
                for y in oy * fy..(oy + 1) * fy {
                    let row = &img[y * w + ox * fx..y * w + (ox + 1) * fx];
                    sum += row.iter().map(|&v| v as f64).sum::<f64>();
                }
                out.push((sum / (fy * fx) as f64) as f32);
            }
        }
    }
    Ok(out)
}

/// The loss mask of a training picture at bucket `size` (`--alpha-mask`), as kohya makes it
/// from the alpha channel: alpha / 255 resized and cropped as the picture is
/// ([`training_tensor`]), mirrored with it, then averaged over each latent position's 8x8
/// pixels (kohya's `interpolate(mode="area")`): (1, 1, H / 8, W / 8). A picture without alpha
/// trains everywhere (all ones), as kohya's.
pub fn training_mask(
    alpha: Option<&GrayImage>,
    place: Placement,
    mirrored: bool,
    device: Device,
) -> Result<Tensor> {
    let (w, h) = place.bucket;
    let (lh, lw) = (h / 8, w / 8);
    let Some(alpha) = alpha else {
        return Tensor::ones((1, 1, lh, lw), crate::DType::F32, device);
    };
    let mut cropped = scale_mask(alpha, place.resized, (w as u32, h as u32), place.at)?;
    if mirrored {
        image::imageops::flip_horizontal_in_place(&mut cropped);
    }
    let unit: Vec<f32> = cropped.pixels().map(|p| p.0[0] as f32 / 255.0).collect();
    let pooled = area_downsample(&unit, (1, h, w), (lh, lw))?;
    Tensor::from_vec(pooled, (1, 1, lh, lw), device)
}

/// A loss mask's source (alpha or mask picture) scaled to `resized` and cut to `target` at `at`
/// (see [`resize_crop_at`]), exactly as the picture is: resampled as a grey RGB picture.
pub fn scale_mask(
    alpha: &GrayImage,
    resized: (u32, u32),
    target: (u32, u32),
    at: Option<(u32, u32)>,
) -> Result<GrayImage> {
    let grey = RgbImage::from_fn(alpha.width(), alpha.height(), |x, y| {
        let a = alpha.get_pixel(x, y).0[0];
        image::Rgb([a, a, a])
    });
    let (cut, _) = resize_crop_at(&grey, resized, target, at)?;
    Ok(GrayImage::from_fn(cut.width(), cut.height(), |x, y| {
        image::Luma([cut.get_pixel(x, y).0[0]])
    }))
}

/// One training picture as the VAE wants it at its placement (its bucket (width, height),
/// cropped from the picture scaled to `place.resized`, at `place.at`): (1, 3, H, W) in [-1, 1],
/// plus its crop record (the SDXL time ids).
///
/// `mirrored` (`--flip-aug`) flips the cropped picture left to right, as kohya flips it, and
/// gives the mirrored crop's time ids.
pub fn training_tensor(
    img: &RgbImage,
    place: Placement,
    mirrored: bool,
    device: Device,
) -> Result<(Tensor, CropInfo)> {
    training_tensor_with(img, place, mirrored, ColorShift::None, device)
}

/// [`training_tensor`] with kohya's colour augmentation `color` applied to the cut picture
/// before the mirror, in kohya's order.
pub fn training_tensor_with(
    img: &RgbImage,
    place: Placement,
    mirrored: bool,
    color: ColorShift,
    device: Device,
) -> Result<(Tensor, CropInfo)> {
    let size = place.bucket;
    let target = (size.0 as u32, size.1 as u32);
    let (mut cropped, mut crop) = resize_crop_at(img, place.resized, target, place.at)?;
    color.apply(&mut cropped);
    if mirrored {
        image::imageops::flip_horizontal_in_place(&mut cropped);
        crop = crop.mirrored();
    }
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

    #[test]
    fn area_downsample_averages_blocks() {
        // (1, 2, 4) to (1, 2): the means of the left and right 2x2 blocks.
        let v = [1.0, 3.0, 0.0, 0.0, 5.0, 7.0, 0.0, 4.0];
        assert_eq!(area_downsample(&v, (1, 2, 4), (1, 2)).unwrap(), [4.0, 1.0]);
        assert!(area_downsample(&v, (1, 2, 4), (1, 3)).is_err());
    }

    #[test]
    fn training_masks_follow_the_crop_and_the_mirror() {
        // A 64x32 picture, its left half transparent, at bucket 64x32: latent columns 0..3 are
        // masked, 4..7 kept; mirrored, the other way round. No alpha: all ones.
        let alpha = GrayImage::from_fn(64, 32, |x, _| image::Luma([if x < 32 { 0 } else { 255 }]));
        let row = |m: &Tensor| m.to_vec_f32().unwrap()[..8].to_vec();
        let m = training_mask(
            Some(&alpha),
            Placement::cover(64, 32, (64, 32)),
            false,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(m.dims(), [1, 1, 4, 8]);
        assert_eq!(row(&m), [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        let m = training_mask(
            Some(&alpha),
            Placement::cover(64, 32, (64, 32)),
            true,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(row(&m), [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let ones =
            training_mask(None, Placement::cover(64, 32, (64, 32)), false, Device::Cpu).unwrap();
        assert!(ones.to_vec_f32().unwrap().iter().all(|&v| v == 1.0));
    }

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
        let place = Placement::cover(upright.width(), upright.height(), size);
        let (a, ca) = training_tensor(&upright, place, false, Device::Cpu).unwrap();
        let again = load_training_picture(&saved).unwrap();
        let (b, cb) = training_tensor(&again, place, false, Device::Cpu).unwrap();
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        assert_eq!(ca.time_ids(), cb.time_ids());
        // As stored, the picture would have gone to a landscape bucket.
        let (w, h) = nearest_bucket(48, 32, &list);
        assert!(w > h);
    }

    /// Batches never mix keys, hold every visit once, and cut each group in visit order; size
    /// 1 keeps the order and draws nothing.
    #[test]
    fn batches_group_by_key_and_cover_every_visit() {
        // Visits of examples 0..6; examples 0, 2, 4 share one key, 1 and 3 another, 5 a third.
        let key = |i: usize| if i == 5 { 2 } else { i % 2 };
        let order = [4, 1, 0, 5, 2, 3, 4, 0];
        let mut rng = Rng::new(7);
        let before = rng.clone();
        let singles = epoch_batches(&order, key, |_| 1, &mut rng);
        assert_eq!(singles, order.map(|i| vec![i]).to_vec());
        assert_eq!(rng, before, "batch size 1 draws nothing");
        assert_eq!(
            group_visits(&order, key),
            vec![vec![4, 0, 2, 4, 0], vec![1, 3], vec![5]]
        );
        let batches = epoch_batches(&order, key, |_| 2, &mut rng);
        assert_eq!(batches.len(), batches_per_epoch(&order, key, |_| 2));
        let mut sorted = batches.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![vec![0], vec![1, 3], vec![2, 4], vec![4, 0], vec![5]]
        );
        assert_eq!(batches_per_epoch(&order, key, |_| 3), 4);
        assert_eq!(batches_per_epoch(&order, key, |_| 8), 3);
        assert_eq!(batches_per_epoch(&order, key, |_| 1), order.len());
        // Each group at its own size (a dataset config's per-dataset batch sizes); a size-1
        // group among larger ones is still shuffled with them.
        let size = |i: usize| [3, 1, 2][key(i)];
        let mut mixed = epoch_batches(&order, key, size, &mut rng);
        assert_eq!(mixed.len(), batches_per_epoch(&order, key, size));
        mixed.sort();
        assert_eq!(
            mixed,
            vec![vec![1], vec![3], vec![4, 0], vec![4, 0, 2], vec![5]]
        );
    }

    /// A kohya no-upscale placement crops the bucket from the picture at its own size: the
    /// tensor is the picture's centre, pixel for pixel, not a rescaled copy.
    #[test]
    fn no_upscale_placements_crop_without_scaling() {
        use super::super::buckets::{Bucketer, Bucketing, KohyaBuckets};
        let img = image::RgbImage::from_fn(100, 70, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, (x * y % 251) as u8])
        });
        let k = KohyaBuckets {
            steps: 32,
            no_upscale: true,
            ..KohyaBuckets::default()
        };
        let place = Bucketer::new(1024, Bucketing::Kohya(k))
            .place(100, 70)
            .unwrap();
        assert_eq!((place.bucket, place.resized), ((96, 64), (100, 70)));
        let (t, crop) = training_tensor(&img, place, false, Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 64, 96]);
        assert_eq!((crop.crop_top, crop.crop_left), (3, 2));
        let v = t.to_vec_f32().unwrap();
        for (x, y) in [(0, 0), (95, 63), (40, 17)] {
            let src = img.get_pixel(x + 2, y + 3).0;
            for c in 0..3 {
                let got = v[(c * 64 + y as usize) * 96 + x as usize];
                assert_eq!(
                    got,
                    src[c] as f32 / 255.0 * 2.0 - 1.0,
                    "({x}, {y}) channel {c}"
                );
            }
        }
    }

    /// The mirrored tensor is the plain one read right to left, and its crop starts where the
    /// plain crop's window ends, counted from the right: one pixel apart when the margin is odd.
    #[test]
    fn mirrored_pictures_mirror_the_crop_window() {
        let img = image::RgbImage::from_fn(101, 64, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, (x * y % 251) as u8])
        });
        let place = Placement::cover(img.width(), img.height(), (64, 64));
        let (plain, crop) = training_tensor(&img, place, false, Device::Cpu).unwrap();
        let (mirror, mcrop) = training_tensor(&img, place, true, Device::Cpu).unwrap();
        assert_eq!(
            (crop.resized_w, crop.crop_left, mcrop.crop_left),
            (101, 18, 19)
        );
        assert_eq!(mcrop.time_ids()[..3], crop.time_ids()[..3]);
        assert_eq!(mcrop.time_ids()[4..], crop.time_ids()[4..]);
        let (p, m) = (plain.to_vec_f32().unwrap(), mirror.to_vec_f32().unwrap());
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    let at = |x: usize| (c * 64 + y) * 64 + x;
                    assert_eq!(m[at(x)], p[at(63 - x)]);
                }
            }
        }
        assert_ne!(p, m);
    }

    /// kohya's balancing, worked by hand from its loop.
    #[test]
    fn prior_visits_balance_the_training_visits_as_kohya_does() {
        assert_eq!(prior_repeats(3, &[1, 1]), [2, 1]);
        assert_eq!(prior_repeats(5, &[1, 1, 1]), [2, 2, 1]);
        assert_eq!(prior_repeats(2, &[5, 5]), [5, 0]);
        assert_eq!(prior_repeats(7, &[2]), [7]);
        assert_eq!(prior_repeats(10, &[3, 1, 2]), [5, 2, 3]);
        assert_eq!(prior_repeats(4, &[]), Vec::<usize>::new());
    }

    #[test]
    fn kohya_folder_names_give_repeats_and_captions() {
        assert_eq!(
            kohya_folder("10_sks dog"),
            Some((10, Some("sks dog".into())))
        );
        assert_eq!(
            kohya_folder("20_eir_niflheimr"),
            Some((20, Some("eir_niflheimr".into())))
        );
        assert_eq!(kohya_folder("3"), Some((3, None)));
        assert_eq!(kohya_folder("3_ "), Some((3, None)));
        assert_eq!(kohya_folder("0_off"), Some((0, Some("off".into()))));
        assert_eq!(kohya_folder("hanok_10"), None);
        assert_eq!(kohya_folder("x_y"), None);
        assert_eq!(Dataset::epoch_order(&[2, 1, 0, 3]), [0, 0, 1, 3, 3, 3]);
    }

    fn picture(path: &Path) {
        RgbImage::from_fn(16, 12, |x, y| image::Rgb([x as u8 * 9, y as u8 * 11, 60]))
            .save(path)
            .unwrap();
    }

    /// A kohya DreamBooth layout: top-level pictures once an epoch, `N_name` folders N times,
    /// captioned by file, then folder, then template; caches and hidden folders passed over,
    /// folders without a repeat count left out and reported, a stray file an error naming it.
    #[test]
    fn kohya_folders_repeat_and_caption_their_pictures() {
        let dir = crate::test_fixtures::TempDir::new("kohya-data");
        let root = dir.path();
        let hanok = root.join("3_hanok roof");
        let other = root.join("notes");
        for d in [&hanok, &other, &root.join(".ipynb_checkpoints")] {
            std::fs::create_dir_all(d).unwrap();
        }
        picture(&root.join("top.png"));
        picture(&hanok.join("a.png"));
        std::fs::write(hanok.join("a.txt"), "a {trigger} gate").unwrap();
        picture(&hanok.join("b.jpg"));
        std::fs::write(hanok.join("b_1024x1024_sdxl.npz"), b"cache").unwrap();
        std::fs::write(hanok.join("b.caption"), "kohya's other caption file").unwrap();
        picture(&other.join("c.png"));
        picture(&root.join(".ipynb_checkpoints/d.png"));
        let captions = CaptionSource {
            template: Some("a {trigger} thing".into()),
            trigger: "[v]".into(),
            extension: "txt".into(),
            prefix: None,
            suffix: None,
            wildcard: false,
        };
        let data = Dataset::scan(root, &captions).unwrap();
        let got: Vec<(String, String, usize)> = data
            .samples
            .iter()
            .map(|s| {
                let rel = s.path.strip_prefix(root).unwrap().display().to_string();
                (rel, s.caption.clone(), s.repeats)
            })
            .collect();
        let want = [
            ("top.png", "a [v] thing", 1),
            ("3_hanok roof/a.png", "a [v] gate", 3),
            ("3_hanok roof/b.jpg", "hanok roof", 3),
        ];
        let want: Vec<(String, String, usize)> = want
            .iter()
            .map(|(p, c, n)| (p.to_string(), c.to_string(), *n))
            .collect();
        assert_eq!(got, want);
        assert_eq!(data.epoch_len(), 7);
        assert_eq!(data.warnings.len(), 2, "{:?}", data.warnings);
        assert!(data.warnings[0].contains("notes"), "{:?}", data.warnings);
        // b's kohya-default .caption file is not read, and the log says so.
        let unread = &data.warnings[1];
        assert!(
            unread.starts_with("not read: 1 .caption caption file(s)")
                && unread.contains("b.caption")
                && unread.contains("read from .txt files"),
            "{unread}"
        );
        // A cache file that belongs to no picture is not silently trained around.
        std::fs::write(hanok.join("zzz.npz"), b"stray").unwrap();
        let e = Dataset::scan(root, &captions).unwrap_err().to_string();
        assert!(e.contains("zzz.npz") && e.contains("not an image"), "{e}");
        std::fs::remove_file(hanok.join("zzz.npz")).unwrap();
        // With --caption-extension caption, the .caption file captions b.
        let by_caption = CaptionSource {
            extension: "caption".into(),
            ..captions.clone()
        };
        let data = Dataset::scan(root, &by_caption).unwrap();
        assert_eq!(data.samples[2].caption, "kohya's other caption file");
        let unread: Vec<&String> = data
            .warnings
            .iter()
            .filter(|w| w.starts_with("not read"))
            .collect();
        assert_eq!(unread.len(), 1, "{unread:?}");
        assert!(unread[0].contains(".txt caption file(s)") && unread[0].contains("a.txt"));
        // Only folders without repeats: nothing to train on, and the error says where they go.
        let empty = crate::test_fixtures::TempDir::new("kohya-empty");
        std::fs::create_dir_all(empty.path().join("hanok")).unwrap();
        picture(&empty.path().join("hanok/x.png"));
        let e = Dataset::scan(empty.path(), &captions)
            .unwrap_err()
            .to_string();
        assert!(e.contains("N_name"), "{e}");
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
