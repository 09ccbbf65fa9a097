//! Image files in and out: decode png/jpeg/webp to RGB8, write float CHW images the way the
//! reference pipeline writes them, and the resize + centre crop used for training data.

use crate::image::resample::{resize_rgb, Filter};
use crate::{Error, Result};
use image::{GrayImage, ImageFormat, ImageReader, RgbImage};
use std::path::Path;

/// Decodes an image file to RGB8. The format is sniffed from the content, not the extension, so a
/// mislabelled `.png` that is really a JPEG still loads; alpha is dropped without compositing and
/// grey is replicated, as Pillow's `convert("RGB")` does.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let img = open_image(path)?
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?;
    Ok(img.to_rgb8())
}

/// A reader for `path` whose format is sniffed from the content.
fn open_image(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::file(
            path,
            "not an image (unrecognised format; expected png, jpeg or webp)",
        ));
    }
    Ok(reader)
}

/// [`load_rgb`] turned upright by the file's EXIF orientation (JPEG, PNG `eXIf`, WebP), as
/// diffusers' `load_image` does with `ImageOps.exif_transpose`: for pictures given to img2img
/// and inpainting, which phones store sideways with an orientation tag.
pub fn load_rgb_upright(path: impl AsRef<Path>) -> Result<RgbImage> {
    Ok(load_upright(path.as_ref())?.to_rgb8())
}

/// [`load_rgb_upright`] with the picture's alpha channel as a grey image (8 bits), None when it
/// has none. The colour channels are as stored, not composited over anything (PIL's
/// `convert("RGB")` drops alpha the same way).
pub fn load_rgb_alpha_upright(path: impl AsRef<Path>) -> Result<(RgbImage, Option<GrayImage>)> {
    let img = load_upright(path.as_ref())?;
    let alpha = img.color().has_alpha().then(|| {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([rgba.get_pixel(x, y).0[3]])
        })
    });
    Ok((img.to_rgb8(), alpha))
}

fn load_upright(path: &Path) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    let bad = |e: image::ImageError| Error::file(path, format!("cannot decode image: {e}"));
    let mut decoder = open_image(path)?.into_decoder().map_err(bad)?;
    let orientation = decoder.orientation().map_err(bad)?;
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Writes an RGB8 image as PNG, atomically (encoded in memory, then a temporary file and a
/// rename), creating the folder if needed.
pub fn save_png(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| Error::file(path, format!("cannot encode PNG: {e}")))?;
    crate::tensor::write_atomic(path, bytes.get_ref())
}

/// One float in [0, 1] to 8 bits as the reference does: `(x * 255).round()` after the clamp
/// the pipeline applies. The product is taken in f64, where `x * 255` is exact for every f32 `x`.
/// numpy rounds half to even, hence `round_ties_even`, although the only exact tie in [0, 1] is
/// x = 0.5 (x = (2k+1)/510 must be dyadic), where both rules give 128.
#[inline]
pub fn unit_to_u8(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    (x.clamp(0.0, 1.0) as f64 * 255.0).round_ties_even() as u8
}

/// A float image `(C, H, W)` with values in [0, 1] and C = 3 (RGB) or 1 (grey, replicated) to
/// RGB8.
pub fn chw_to_rgb(data: &[f32], c: usize, h: usize, w: usize) -> Result<RgbImage> {
    let shape = [c, h, w];
    if c != 1 && c != 3 {
        return Err(Error::bad_shape(
            "chw_to_rgb",
            "expected 1 or 3 channels",
            &shape,
        ));
    }
    if data.len() != c * h * w || h == 0 || w == 0 {
        return Err(Error::bad_shape(
            "chw_to_rgb",
            format!("{} values for a non-empty (C,H,W)", data.len()),
            &shape,
        ));
    }
    let (w32, h32) = (u32::try_from(w), u32::try_from(h));
    let (Ok(w32), Ok(h32)) = (w32, h32) else {
        return Err(Error::bad_shape("chw_to_rgb", "image too large", &shape));
    };
    let plane = h * w;
    let mut img = RgbImage::new(w32, h32);
    for (i, px) in img.pixels_mut().enumerate() {
        for ch in 0..3 {
            let src = if c == 3 { ch } else { 0 };
            px[ch] = unit_to_u8(data[src * plane + i]);
        }
    }
    Ok(img)
}

/// [`chw_to_rgb`] then [`save_png`]: how a decoded `(3, H, W)` image in [0, 1] is written.
pub fn save_chw_png(
    path: impl AsRef<Path>,
    data: &[f32],
    c: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    save_png(path, &chw_to_rgb(data, c, h, w)?)
}

/// Value range of a float image made from 8-bit pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelRange {
    /// `v / 255`, for CLIP-like consumers and image metrics.
    Unit,
    /// `v / 255 * 2 - 1`, the VAE's input range.
    Signed,
}

/// RGB8 to f32 `(3, H, W)`.
pub fn rgb_to_chw(img: &RgbImage, range: PixelRange) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane]; // (3, H, W)
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let u = px[c] as f32 / 255.0;
            out[c * plane + i] = match range {
                PixelRange::Unit => u,
                PixelRange::Signed => u * 2.0 - 1.0,
            };
        }
    }
    out
}

/// Where a training image came from, in SDXL's micro-conditioning terms (SDXL.md 1.4): the
/// original size, the top-left corner of the crop in the resized image, and the target size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropInfo {
    pub orig_h: u32,
    pub orig_w: u32,
    pub crop_top: u32,
    pub crop_left: u32,
    pub target_h: u32,
    pub target_w: u32,
    /// Width of the resized picture the crop was cut from.
    pub resized_w: u32,
}

impl CropInfo {
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, the order of SDXL's time ids.
    pub fn time_ids(&self) -> [f32; 6] {
        [
            self.orig_h,
            self.orig_w,
            self.crop_top,
            self.crop_left,
            self.target_h,
            self.target_w,
        ]
        .map(|v| v as f32)
    }

    /// The crop of the mirrored picture (kohya's flip augmentation): the same window mirrored,
    /// so its left edge is the distance from the window's right edge to the resized picture's.
    pub fn mirrored(&self) -> CropInfo {
        CropInfo {
            crop_left: self.resized_w - self.target_w - self.crop_left,
            ..*self
        }
    }
}

/// The size a `w x h` picture is scaled to so that it covers `target_w x target_h` with its
/// aspect kept: the covering side is rounded to nearest (never below the target) to keep the
/// aspect error under half a pixel.
pub fn cover_size(w: u32, h: u32, target_w: u32, target_h: u32) -> (u32, u32) {
    // Compare aspects in integers: w / h >= tw / th  <=>  w * th >= h * tw.
    if w as u64 * target_h as u64 >= h as u64 * target_w as u64 {
        let nw = (w as f64 * target_h as f64 / h as f64).round() as u32;
        (nw.max(target_w), target_h)
    } else {
        let nh = (h as f64 * target_w as f64 / w as f64).round() as u32;
        (target_w, nh.max(target_h))
    }
}

/// Scales `img` (Pillow-exact bicubic) so that it covers `target_w x target_h` with its aspect
/// kept ([`cover_size`]), then centre-crops with floored margins like CLIP.
pub fn resize_center_crop(
    img: &RgbImage,
    target_w: u32,
    target_h: u32,
) -> Result<(RgbImage, CropInfo)> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || target_w == 0 || target_h == 0 {
        return Err(Error::bad_shape(
            "resize_center_crop",
            format!("cannot map {w}x{h} to {target_w}x{target_h}"),
            &[h as usize, w as usize, 3],
        ));
    }
    resize_crop(
        img,
        cover_size(w, h, target_w, target_h),
        (target_w, target_h),
    )
}

/// Scales `img` (Pillow-exact bicubic; not at all when it already has that size) to
/// `resized`, then centre-crops `target` from it with floored margins. `resized` must hold
/// `target` (kohya's `--bucket_no_upscale` sizes are not a cover of their bucket, so callers
/// may give their own).
pub fn resize_crop(
    img: &RgbImage,
    resized: (u32, u32),
    target: (u32, u32),
) -> Result<(RgbImage, CropInfo)> {
    resize_crop_at(img, resized, target, None)
}

/// [`resize_crop`] with the window's top-left corner `at` = (left, top) in the scaled picture
/// (a random crop), or centred when None. The window must lie inside the scaled picture.
pub fn resize_crop_at(
    img: &RgbImage,
    resized: (u32, u32),
    target: (u32, u32),
    at: Option<(u32, u32)>,
) -> Result<(RgbImage, CropInfo)> {
    let (w, h) = img.dimensions();
    let ((nw, nh), (target_w, target_h)) = (resized, target);
    if w == 0 || h == 0 || target_w == 0 || target_h == 0 || nw < target_w || nh < target_h {
        return Err(Error::bad_shape(
            "resize_crop",
            format!("cannot crop {target_w}x{target_h} from {w}x{h} scaled to {nw}x{nh}"),
            &[h as usize, w as usize, 3],
        ));
    }
    let resized = match (nw, nh) == (w, h) {
        true => img.clone(),
        false => resize_rgb(img, nw, nh, Filter::Bicubic)?,
    };
    let (left, top) = at.unwrap_or(((nw - target_w) / 2, (nh - target_h) / 2));
    if left > nw - target_w || top > nh - target_h {
        return Err(Error::bad_shape(
            "resize_crop",
            format!("a {target_w}x{target_h} window at ({left}, {top}) is not inside {nw}x{nh}"),
            &[nh as usize, nw as usize, 3],
        ));
    }
    let out = image::imageops::crop_imm(&resized, left, top, target_w, target_h).to_image();
    let info = CropInfo {
        orig_h: h,
        orig_w: w,
        crop_top: top,
        crop_left: left,
        target_h,
        target_w,
        resized_w: nw,
    };
    Ok((out, info))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_fixtures::{read_f32, tiny, TempDir};

    #[test]
    fn unit_to_u8_rounds_half_to_even_like_numpy() {
        assert_eq!(unit_to_u8(0.5), 128); // 127.5, the only exact tie
        assert_eq!(unit_to_u8(1.0), 255);
        assert_eq!(unit_to_u8(0.0), 0);
        assert_eq!(unit_to_u8(-1.0), 0);
        assert_eq!(unit_to_u8(2.0), 255);
        assert_eq!(unit_to_u8(f32::NAN), 0);
        // Just either side of the 0.5 / 255 rounding boundary.
        assert_eq!(unit_to_u8(0.499 / 255.0), 0);
        assert_eq!(unit_to_u8(0.501 / 255.0), 1);
    }

    #[test]
    fn saved_pipeline_image_matches_reference_png() {
        // The reference wrote pipeline.png from the float64 image; its float32 copy must give the
        // same bytes.
        let (img, shape) = read_f32(&tiny().join("reference/pipeline.safetensors"), "image");
        assert_eq!(shape, vec![1, 3, 128, 128]);
        let dir = TempDir::new("io_save");
        let out = dir.path().join("pipeline.png");
        save_chw_png(&out, &img, 3, 128, 128).unwrap();
        let ours = load_rgb(&out).unwrap();
        let reference = load_rgb(tiny().join("reference/pipeline.png")).unwrap();
        assert_eq!(ours.dimensions(), reference.dimensions());
        let diff = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{diff} bytes differ");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = TempDir::new("io_err");
        let txt = dir.path().join("notes.png");
        std::fs::write(&txt, "definitely not a png").unwrap();
        let e = load_rgb(&txt).unwrap_err();
        assert!(matches!(e, Error::File { .. }), "{e:?}");
        assert!(e.to_string().contains("notes.png"), "{e}");

        let truncated = dir.path().join("cut.png");
        let bytes = std::fs::read(tiny().join("reference/clip_input.png")).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_rgb(&truncated).unwrap_err();
        assert!(e.to_string().contains("cut.png"), "{e}");

        let e = load_rgb(dir.path().join("missing.jpg")).unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }) && e.to_string().contains("missing.jpg"),
            "{e}"
        );
    }

    #[test]
    fn jpeg_and_webp_load() {
        let dir = TempDir::new("io_fmt");
        let src = load_rgb(tiny().join("reference/clip_input.png")).unwrap();
        for (name, fmt) in [("a.jpg", ImageFormat::Jpeg), ("b.webp", ImageFormat::WebP)] {
            let p = dir.path().join(name);
            src.save_with_format(&p, fmt).unwrap();
            let back = load_rgb(&p).unwrap();
            assert_eq!(back.dimensions(), src.dimensions(), "{name}");
        }
        // Lossless WebP round-trips exactly.
        let back = load_rgb(dir.path().join("b.webp")).unwrap();
        assert_eq!(back.as_raw(), src.as_raw());
    }

    #[test]
    fn chw_round_trip_and_shape_errors() {
        let src = load_rgb(tiny().join("reference/clip_input.png")).unwrap();
        let (w, h) = (src.width() as usize, src.height() as usize);
        let chw = rgb_to_chw(&src, PixelRange::Unit);
        assert_eq!(chw_to_rgb(&chw, 3, h, w).unwrap().as_raw(), src.as_raw());
        let signed = rgb_to_chw(&src, PixelRange::Signed);
        assert!(signed.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(matches!(
            chw_to_rgb(&chw, 3, h, w + 1),
            Err(Error::BadShape { .. })
        ));
        assert!(matches!(
            chw_to_rgb(&chw, 2, h, w),
            Err(Error::BadShape { .. })
        ));
        let grey = chw_to_rgb(&[0.0, 1.0], 1, 1, 2).unwrap();
        assert_eq!(grey.as_raw(), &vec![0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn resize_center_crop_covers_and_reports_crop() {
        let src = load_rgb(tiny().join("reference/clip_input.png")).unwrap(); // 80 x 96
        let (out, info) = resize_center_crop(&src, 64, 32).unwrap();
        assert_eq!(out.dimensions(), (64, 32));
        // 80x96 covering 64x32: width binds, 64 x round(96 * 64 / 80) = 64 x 77, top = 45 / 2.
        assert_eq!(
            info,
            CropInfo {
                orig_h: 96,
                orig_w: 80,
                crop_top: 22,
                crop_left: 0,
                target_h: 32,
                target_w: 64,
                resized_w: 64,
            }
        );
        assert_eq!(info.time_ids(), [96.0, 80.0, 22.0, 0.0, 32.0, 64.0]);
        let (sq, info) = resize_center_crop(&src, 40, 40).unwrap();
        assert_eq!(sq.dimensions(), (40, 40));
        assert_eq!((info.crop_top, info.crop_left), (4, 0)); // 40 x 48
        assert!(resize_center_crop(&src, 0, 40).is_err());
    }

    /// A PNG whose `eXIf` chunk says "orientation 6" (stored rotated: show it turned 90 degrees
    /// clockwise) loads upright with `load_rgb_upright`, as PIL's `exif_transpose` turns it, and
    /// as stored with `load_rgb`.
    #[test]
    fn exif_orientation_turns_pictures_upright() {
        // 3 x 2, every pixel distinct.
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 200, 7]));
        let tagged = png_turned_clockwise(&img);
        let dir = TempDir::new("exif");
        let path = dir.path().join("turned.png");
        std::fs::write(&path, tagged).unwrap();
        assert_eq!(load_rgb(&path).unwrap(), img);
        let upright = load_rgb_upright(&path).unwrap();
        assert_eq!(upright.dimensions(), (2, 3));
        // Turned clockwise: the stored bottom-left pixel is now the top-left one.
        for (x, y) in [(0, 0), (1, 0), (0, 2), (1, 2)] {
            assert_eq!(
                upright.get_pixel(x, y),
                img.get_pixel(y, 1 - x),
                "({x}, {y})"
            );
        }
    }

    /// `img` as a PNG whose `eXIf` chunk holds orientation 6 (shown turned 90 degrees
    /// clockwise).
    pub(crate) fn png_turned_clockwise(img: &RgbImage) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = 0xFFFF_FFFFu32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, ImageFormat::Png).unwrap();
        let png = png.into_inner();
        // Big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1 value: 6.
        let exif: Vec<u8> = [
            &b"MM\0\x2a\0\0\0\x08"[..],
            &[
                0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0,
            ][..],
        ]
        .concat();
        let mut chunk = (exif.len() as u32).to_be_bytes().to_vec();
        let body = [&b"eXIf"[..], &exif].concat();
        chunk.extend_from_slice(&body);
        chunk.extend_from_slice(&crc32(&body).to_be_bytes());
        // After the signature (8 bytes) and IHDR (4 + 4 + 13 + 4 bytes).
        let at = 8 + 25;
        [&png[..at], &chunk, &png[at..]].concat()
    }
}
