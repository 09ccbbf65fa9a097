//! The VAE and LPIPS cases. Sizes come from the fixtures' own configs and files: the VAE is the
//! `sdxl/vae` component of the directory, the LPIPS weights are `reference/lpips_alex.safetensors`.

use super::{Checker, Ctx, Row};
use crate::formats::diffusers::DiffusersFolder;
use crate::models::lpips::Lpips;
use crate::models::vae::AutoencoderKL;
use crate::tensor::SafeTensorsFile;
use crate::{DType, Result, Tensor};

/// VAE weights load as f32 on every device: fp16 overflows in the SDXL VAE (SDXL.md 3.3), and
/// the case checks numerics against float64 references.
fn load(f: &SafeTensorsFile, name: &str, ctx: &Ctx) -> Result<Tensor> {
    f.tensor(name)?.to_dtype(DType::F32)?.to_device(ctx.device)
}

/// `latents` -> `decoded` = decode(latents / scaling_factor); `image` -> `enc_mean`, `enc_logvar`.
pub fn vae(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("vae.safetensors"))?;
    let folder = DiffusersFolder::open(ctx.dir.join("sdxl"))?;
    let vae = AutoencoderKL::from_diffusers(&folder, DType::F32, ctx.device)?;
    let mut chk = Checker::new("vae");
    let decoded = vae.decode_scaled(&load(&f, "latents", ctx)?)?;
    chk.check("decoded", &decoded, &f.tensor("decoded")?, ctx.forward)?;
    let (mean, logvar) = vae.encode(&load(&f, "image", ctx)?)?;
    chk.check("enc_mean", &mean, &f.tensor("enc_mean")?, ctx.forward)?;
    chk.check("enc_logvar", &logvar, &f.tensor("enc_logvar")?, ctx.forward)?;
    Ok(chk.rows)
}

/// `a`, `b` in [-1, 1] -> `distance`, one per pair.
pub fn lpips(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("lpips.safetensors"))?;
    let net = Lpips::from_file(ctx.reference("lpips_alex.safetensors"), ctx.device)?;
    let mut chk = Checker::new("lpips");
    let d = net.distance(&load(&f, "a", ctx)?, &load(&f, "b", ctx)?)?;
    chk.check("distance", &d, &f.tensor("distance")?, ctx.forward)?;
    Ok(chk.rows)
}
