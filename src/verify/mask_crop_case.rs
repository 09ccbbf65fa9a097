//! Inpainting only the masked region (`generate --mask-crop`) against diffusers' SDXL inpaint
//! pipeline with `padding_mask_crop` (`extra/mask_crop.safetensors`, `gen_mask_crop.py`): the
//! crop regions of 300 masks, 200 fill and crop resizes (by hash), the overlay on every
//! (original, mask, generated) byte triple (by hash), and two whole runs (4- and 9-channel UNets)
//! from the processed inputs through the final latents to the composited picture.

use super::extra_cases::{inpaint9_unet, stored_rgb, EXTRA};
use super::sweep::{fnv1a, lcg_bytes};
use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::sample::mask_crop::{
    crop, crop_region, crop_resize, fill_resize, overlay, overlay_channel, CropBox,
};
use crate::sample::pipeline::{image_input, mask_input, masked_image, Inpaint, Start};
use crate::sample::{Noise, SchedulerConfig};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Error, Result, Tensor};
use image::RgbImage;
use sha2::{Digest, Sha256};

/// Rows of an (N, k) int64 table.
fn table(f: &SafeTensorsFile, name: &str) -> Result<Vec<Vec<i64>>> {
    let t = f.tensor(name)?;
    let (_, k) = t.dims2()?;
    Ok(t.to_vec_i64()?.chunks(k).map(<[i64]>::to_vec).collect())
}

/// `get_crop_region` on masks whose nonzero pixels fill one box.
fn regions(chk: &mut Checker, f: &SafeTensorsFile) -> Result<()> {
    let rows = table(f, "regions")?;
    let mut wrong = 0;
    for r in &rows {
        let u = |i: usize| r[i] as u32;
        let mut mask = RgbImage::new(u(0), u(1));
        for y in u(3)..u(5) {
            for x in u(2)..u(4) {
                mask.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        let got = crop_region(&mask, r[6] as usize, r[7] as usize, r[8] as usize)?;
        let want = CropBox {
            x1: r[9] as usize,
            y1: r[10] as usize,
            x2: r[11] as usize,
            y2: r[12] as usize,
        };
        wrong += usize::from(got != want);
    }
    chk.check_exact(
        &format!("crop_region ({} masks)", rows.len()),
        wrong == 0,
        wrong as f64,
    );
    Ok(())
}

/// `_resize_and_fill` and `_resize_and_crop` by the hash of their bytes; where Pillow refused
/// (a side of 0 pixels) an error is expected.
fn resizes(chk: &mut Checker, f: &SafeTensorsFile) -> Result<()> {
    let rows = table(f, "resizes")?;
    let mut wrong = 0;
    for r in &rows {
        let (w, h, width, height) = (r[0] as u32, r[1] as u32, r[2] as usize, r[3] as usize);
        let src = RgbImage::from_raw(w, h, lcg_bytes((w * h * 3) as usize, r[5] as u64))
            .ok_or_else(|| Error::msg("LCG picture size"))?;
        let out = match r[4] {
            0 => fill_resize(&src, width, height),
            _ => crop_resize(&src, width, height),
        };
        let right = match (out, r[7]) {
            (Ok(img), 1) => fnv1a(img.as_raw()) == r[6] as u64,
            (Err(_), 0) => true,
            _ => false,
        };
        wrong += usize::from(!right);
    }
    chk.check_exact(
        &format!("fill and crop resizes ({})", rows.len()),
        wrong == 0,
        wrong as f64,
    );
    Ok(())
}

/// The overlay of every (original, mask, generated) grey triple, hashed as the generator hashed
/// Pillow's picture.
fn overlay_grid(chk: &mut Checker, f: &SafeTensorsFile) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut row = Vec::with_capacity(4096 * 3);
    for y in 0..4096u32 {
        row.clear();
        for x in 0..4096u32 {
            let i = y * 4096 + x;
            let v = overlay_channel((i >> 16) as u8, (i >> 8) as u8, i as u8);
            row.extend_from_slice(&[v, v, v]);
        }
        hasher.update(&row);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let want = f.meta_str("overlay_sha256")?;
    chk.check_exact(
        "overlay (2^24 triples)",
        got == want,
        f64::from(got != want),
    );
    Ok(())
}

/// Byte pictures equal, as a row with the count of differing bytes.
fn same_picture(chk: &mut Checker, name: &str, got: &RgbImage, want: &RgbImage) {
    let differing = match got.dimensions() == want.dimensions() {
        true => got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count(),
        false => got.as_raw().len().max(want.as_raw().len()),
    };
    chk.check_exact(name, differing == 0, differing as f64);
}

pub fn mask_crop(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut chk = Checker::new("mask_crop");
    let path = ctx.reference(&format!("{EXTRA}mask_crop.safetensors"));
    let f = SafeTensorsFile::open(&path)?;
    regions(&mut chk, &f)?;
    resizes(&mut chk, &f)?;
    overlay_grid(&mut chk, &f)?;

    let img2img = ctx.reference(&format!("{EXTRA}img2img.safetensors"));
    let picture = stored_rgb(&SafeTensorsFile::open(&img2img)?, "image_u8", &img2img)?;
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut other = inpaint9_unet(ctx)?;
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        let num = |k: &str| f.meta_f64(&key(k));
        let (width, height) = (num("width")? as usize, num("height")? as usize);
        let mask_picture = stored_rgb(&f, &key("mask_u8"), &path)?;
        let region = crop_region(&mask_picture, width, height, num("pad")? as usize)?;
        let want: Vec<i64> = f.tensor(&key("crop"))?.to_vec_i64()?;
        let got = [region.x1, region.y1, region.x2, region.y2].map(|v| v as i64);
        chk.check_exact(
            &key("crop"),
            got[..] == want[..],
            f64::from(got[..] != want[..]),
        );
        let input = image_input(
            &fill_resize(&crop(&picture, region), width, height)?,
            width,
            height,
            ctx.device,
        )?;
        chk.check(
            &key("image"),
            &input,
            &f.tensor(&key("image"))?,
            ctx.forward,
        )?;
        let (pixel_mask, mask) = mask_input(
            &fill_resize(&crop(&mask_picture, region), width, height)?,
            width,
            height,
            ctx.device,
        )?;
        chk.check(
            &key("mask"),
            &pixel_mask,
            &f.tensor(&key("mask"))?,
            ctx.forward,
        )?;

        pipe.scheduler =
            SchedulerConfig::from_json_text(f.meta_str(&key("scheduler_config"))?, &path)?;
        let nine = f.meta_str(&key("unet"))? == "inpaint9";
        if nine != (pipe.unet.config.in_channels == 9) {
            std::mem::swap(&mut pipe.unet, &mut other);
        }
        let mut draws = std::collections::HashMap::new();
        for (i, role) in f.meta_str(&key("roles"))?.split(',').enumerate() {
            let t = f.tensor(&key(&format!("draw.{i}")))?;
            draws.insert(
                role.to_string(),
                t.to_dtype(DType::F32)?.to_device(ctx.device)?,
            );
        }
        let draw = |role: &str| -> Result<Tensor> {
            draws.get(role).cloned().ok_or_else(|| {
                Error::file(&path, format!("{name}: no draw with the role `{role}`"))
            })
        };
        let latents = pipe.encode_image(&input, Some(&draw("image_sample")?))?;
        let masked = match nine {
            true => Some(pipe.encode_image(
                &masked_image(&input, &pixel_mask)?,
                Some(&draw("masked_sample")?),
            )?),
            false => None,
        };
        let step_noise: Vec<Tensor> = (0..)
            .map_while(|i| draws.get(&format!("step.{i}")).cloned())
            .collect();
        let req = crate::sample::pipeline::Request {
            noise: Noise::Given(step_noise),
            ..super::extra_cases::reference_request(
                &f,
                name,
                f.meta_f64(&key("guidance_scale"))?,
                (width, height),
            )?
        };
        let noise = draw("noise")?;
        let start = Start::Image {
            latents: &latents,
            noise: &noise,
            strength: num("strength")?,
            inpaint: Some(Inpaint {
                mask: &mask,
                masked: masked.as_ref(),
            }),
        };
        let out = no_grad(|| pipe.denoise_from(&req, start, |_, _| {}))?;
        chk.check(
            &key("final_latents"),
            &out,
            &f.tensor(&key("final_latents"))?,
            ctx.forward,
        )?;
        // The composite, exactly, from the picture diffusers decoded.
        let decoded = stored_rgb(&f, &key("decoded_u8"), &path)?;
        let composed = overlay(&picture, &mask_picture, &decoded, region)?;
        same_picture(
            &mut chk,
            &key("output"),
            &composed,
            &stored_rgb(&f, &key("output_u8"), &path)?,
        );
    }
    Ok(chk.rows)
}
