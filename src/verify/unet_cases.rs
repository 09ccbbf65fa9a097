//! The UNet cases: the plain forward (`unet`), the forward with the directory's kohya LoRA merged
//! at load (`unet_kohya_lora`), and the single-file conversion against the diffusers folder
//! (`single_file`). Sizes come from the directory's configs and reference files.

use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::formats::diffusers::DiffusersFolder;
use crate::formats::single_file::convert_file;
use crate::formats::{MappedFile, TensorMap};
use crate::models::unet::{KohyaLoraFile, UNet2DConditionModel};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Result};

/// The diffusers pipeline folder of a fixtures directory.
const PIPELINE: &str = "sdxl";
const KOHYA_LORA: &str = "kohya_lora.safetensors";
const SINGLE_FILE: &str = "sdxl_single_file.safetensors";

fn forward_case(ctx: &Ctx, case: &str, file: &str, loras: &[KohyaLoraFile]) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference(file))?;
    let model = UNet2DConditionModel::from_diffusers(
        ctx.dir.join(PIPELINE),
        loras,
        DType::F32,
        ctx.device,
    )?
    .model;
    let input = |name: &str| f.tensor(name)?.to_dtype(DType::F32)?.to_device(ctx.device);
    let out = no_grad(|| {
        model.forward(
            &input("sample")?,
            &input("timestep")?,
            &input("encoder_hidden_states")?,
            &input("text_embeds")?,
            &input("time_ids")?,
        )
    })?;
    let mut chk = Checker::new(case);
    chk.check("out", &out, &f.tensor("out")?, ctx.forward)?;
    Ok(chk.rows)
}

pub fn unet(ctx: &Ctx) -> Result<Vec<Row>> {
    forward_case(ctx, "unet", "unet.safetensors", &[])
}

pub fn unet_kohya_lora(ctx: &Ctx) -> Result<Vec<Row>> {
    let file = "unet_kohya_lora.safetensors";
    let f = SafeTensorsFile::open(ctx.reference(file))?;
    let multiplier = f.meta_f64("multiplier")?;
    let lora = KohyaLoraFile::new(ctx.dir.join(KOHYA_LORA), multiplier);
    forward_case(ctx, "unet_kohya_lora", file, &[lora])
}

/// Keys present on one side only, plus keys whose dtype, shape or bytes differ.
fn mismatches(got: &TensorMap<'_>, want: &TensorMap<'_>) -> usize {
    let one_sided = got.keys().filter(|k| !want.contains_key(*k)).count()
        + want.keys().filter(|k| !got.contains_key(*k)).count();
    let differing = want
        .iter()
        .filter_map(|(k, w)| got.get(k).map(|g| (g, w)))
        .filter(|(g, w)| g.dtype != w.dtype || g.shape != w.shape || g.data != w.data)
        .count();
    one_sided + differing
}

/// Every tensor the single file converts to must equal the diffusers folder's, bit for bit.
pub fn single_file(ctx: &Ctx) -> Result<Vec<Row>> {
    let folder = DiffusersFolder::open(ctx.dir.join(PIPELINE))?;
    let file = MappedFile::open(ctx.dir.join(SINGLE_FILE))?;
    let split = convert_file(&file, &folder.unet_layout()?, folder.vae_layout()?)?;
    let mut chk = Checker::new("single_file");
    for (name, got) in [
        ("unet", &split.unet),
        ("text_encoder", &split.text_encoder),
        ("text_encoder_2", &split.text_encoder_2),
        ("vae", &split.vae),
    ] {
        let want = folder.component(name, None)?;
        let n = mismatches(got, &want.tensors()?);
        chk.check_exact(
            &format!("{name} ({} tensors, mismatches)", got.len()),
            n == 0,
            n as f64,
        );
    }
    Ok(chk.rows)
}
