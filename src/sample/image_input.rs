//! Pictures and masks as diffusers' SDXL image pipelines prepare them (`VaeImageProcessor` and
//! the inpainting mask processor): Pillow-exact Lanczos resizes to the output size, the VAE's
//! [-1, 1] input, binarised masks at pixel and latent resolution.

use crate::{Device, Error, Result, Tensor};

/// A picture at the output size, as diffusers' `VaeImageProcessor` resizes it: straight to
/// `width` x `height` (aspect not kept) with Pillow's Lanczos when its size differs.
fn processor_resize(
    img: &image::RgbImage,
    width: usize,
    height: usize,
) -> Result<std::borrow::Cow<'_, image::RgbImage>> {
    if width == 0 || height == 0 || width % 8 != 0 || height % 8 != 0 {
        return Err(Error::Config(format!(
            "width and height must be positive multiples of 8, got {width}x{height}"
        )));
    }
    if (img.width() as usize, img.height() as usize) == (width, height) {
        return Ok(std::borrow::Cow::Borrowed(img));
    }
    Ok(std::borrow::Cow::Owned(crate::image::resample::resize_rgb(
        img,
        width as u32,
        height as u32,
        crate::image::resample::Filter::Lanczos,
    )?))
}

/// A mask picture as diffusers' inpainting mask processor reads it, at the output size: resized
/// with Pillow's Lanczos when its size differs, converted to Pillow's "L" (ITU-R 601-2 luma in
/// 16-bit fixed point), then binarised (values of 128 and above, 0.5 after / 255, repaint).
/// Returns the pixel mask (1, 1, height, width) and the latent mask (1, 1, height/8, width/8),
/// the nearest pixel of each 8x8 block (`interpolate`'s default mode: its top-left), both 0 or
/// 1.
pub fn mask_input(
    img: &image::RgbImage,
    width: usize,
    height: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let img = processor_resize(img, width, height)?;
    let pixels: Vec<f32> = img
        .pixels()
        .map(|p| {
            if luma(p) as f32 / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let (h, w) = (height / 8, width / 8);
    let latent: Vec<f32> = (0..h * w)
        .map(|i| pixels[(i / w) * 8 * width + (i % w) * 8])
        .collect();
    Ok((
        Tensor::from_vec(pixels, (1, 1, height, width), Device::Cpu)?.to_device(device)?,
        Tensor::from_vec(latent, (1, 1, h, w), Device::Cpu)?.to_device(device)?,
    ))
}

/// Pillow's "L" value of an RGB pixel: ITU-R 601-2 luma in 16-bit fixed point.
pub fn luma(p: &image::Rgb<u8>) -> u8 {
    let [r, g, b] = p.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// The picture with the repainted region blanked, as inpainting UNets see it:
/// `image x (mask < 0.5)` (0, mid grey in [-1, 1], under the mask).
pub fn masked_image(image: &Tensor, pixel_mask: &Tensor) -> Result<Tensor> {
    image.mul(&pixel_mask.affine(-1.0, 1.0)?)
}

/// The size diffusers' img2img pipeline processes an image at when none is asked for: its own,
/// each side rounded down to a multiple of 8 (`VaeImageProcessor.get_default_height_width`), as
/// (width, height).
pub fn image_input_size(img: &image::RgbImage) -> Result<(usize, usize)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < 8 || h < 8 {
        return Err(Error::Config(format!(
            "img2img needs an image of at least 8x8 pixels, got {w}x{h}"
        )));
    }
    Ok((w - w % 8, h - h % 8))
}

/// An RGB image as the VAE's input (1, 3, height, width) in [-1, 1], as diffusers'
/// `VaeImageProcessor` prepares it: resized straight to `width` x `height` (aspect not kept)
/// with Pillow's Lanczos when its size differs, then `v / 255 * 2 - 1`.
pub fn image_input(
    img: &image::RgbImage,
    width: usize,
    height: usize,
    device: Device,
) -> Result<Tensor> {
    let img = processor_resize(img, width, height)?;
    let chw = crate::image::io::rgb_to_chw(&img, crate::image::io::PixelRange::Signed);
    Tensor::from_vec(chw, (1, 3, height, width), Device::Cpu)?.to_device(device)
}
