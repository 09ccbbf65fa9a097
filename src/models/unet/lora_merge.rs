//! LoRA-family files merged into frozen weights at load time: `W' = W + m * scale * ΔW` per
//! targeted Linear or conv (SDXL.md 6.1), ΔW as the file stores it (kohya LoRA / LoCon, PEFT and
//! diffusers LoRA, LyCORIS LoHa and LoKr, full differences, DoRA; `formats::lora_patch`).
//!
//! Names are resolved by `formats::kohya` against the model's own diffusers keys (so sgm- and
//! diffusers-spelled files both work); the sum is formed in f64 from the stored weight and the
//! stored factors and rounded once to the load dtype, which is how the float64 reference merges
//! on its fp16-rounded weights.

use crate::formats::kohya::{Component, KohyaModel, ModuleIndex};
use crate::formats::lora_patch::Patch;
use crate::formats::unet_layout::UnetLayout;
use crate::formats::{self, MappedFile};
use crate::{Device, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One LoRA file and its strength.
#[derive(Clone, Debug, PartialEq)]
pub struct KohyaLoraFile {
    pub path: PathBuf,
    pub multiplier: f64,
}

impl KohyaLoraFile {
    pub fn new(path: impl Into<PathBuf>, multiplier: f64) -> KohyaLoraFile {
        KohyaLoraFile {
            path: path.into(),
            multiplier,
        }
    }
}

/// What one merge did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeReport {
    /// diffusers module paths whose weight changed.
    pub merged: Vec<String>,
    /// Keys for the text encoders (`lora_te*`), left for the text-encoder loaders.
    pub not_unet: Vec<String>,
}

/// Merges `lora` into `tensors` (diffusers UNet keys). Merged weights become f64 tensors, to be
/// rounded once when the loader converts them to the model dtype. UNet keys that name no module
/// of this UNet are an error listing them; so is a file with keys of no LoRA spelling at all.
pub fn merge_kohya(
    tensors: &mut BTreeMap<String, Tensor>,
    layout: &UnetLayout,
    lora: &KohyaLoraFile,
) -> Result<MergeReport> {
    let index = ModuleIndex::unet(tensors.iter().map(|(k, t)| (k.as_str(), t.dims())), layout);
    let file = MappedFile::open(&lora.path)?;
    let (unet, not_unet) = unet_patches(index, &file, lora)?;
    Ok(MergeReport {
        merged: apply(tensors, &unet, lora)?,
        not_unet,
    })
}

/// Checks `lora` against a model's modules as the loaders will merge it, from names and shapes
/// alone (no weight is read): the UNet part against `unet`, each text-encoder part against its
/// index in `text_encoders`. Every key, factor shape and scale is checked as a merge checks it;
/// a refiner's LoRAs are checked this way before the base model runs.
pub fn check_kohya(
    unet: ModuleIndex,
    text_encoders: Vec<ModuleIndex>,
    lora: &KohyaLoraFile,
) -> Result<()> {
    let file = MappedFile::open(&lora.path)?;
    unet_patches(unet, &file, lora)?;
    for index in text_encoders {
        text_encoder_patches(index, &file, lora)?;
    }
    Ok(())
}

/// The UNet patches of `lora` resolved against `index`, and the keys it leaves to the text
/// encoders. UNet keys that name no module of `index` are an error listing them; so is a file
/// with keys of no LoRA spelling at all.
fn unet_patches<'f>(
    index: ModuleIndex,
    file: &'f MappedFile,
    lora: &KohyaLoraFile,
) -> Result<(Vec<Patch<'f>>, Vec<String>)> {
    let context = lora.path.display().to_string();
    let model = KohyaModel::new(vec![index]);
    let parsed = model.parse_patches(file.tensors()?, &context, file.metadata())?;
    let (mut bad, mut not_unet, mut foreign) = (Vec::new(), Vec::new(), Vec::new());
    for (claimed, key) in parsed.unknown {
        match claimed {
            Some(Component::Unet) => bad.push(key),
            Some(_) => not_unet.push(key),
            None => foreign.push(key),
        }
    }
    if !bad.is_empty() {
        return Err(formats::Error::UnexpectedKeys { context, keys: bad }.into());
    }
    // Keys of no LoRA spelling at all: a checkpoint passed by mistake, or a format not read here.
    if !foreign.is_empty() {
        return Err(formats::Error::UnexpectedKeys {
            context: format!("{context} (not a LoRA file, or a LoRA variant this does not read)"),
            keys: foreign,
        }
        .into());
    }
    let (unet, te): (Vec<Patch<'_>>, Vec<Patch<'_>>) = parsed
        .patches
        .into_iter()
        .partition(|p| p.component == Component::Unet);
    not_unet.extend(te.into_iter().flat_map(|p| p.keys));
    Ok((unet, not_unet))
}

/// Merges every patch into its `<module>.weight` (and `.bias` for `diff_b`) in f64.
fn apply(
    tensors: &mut BTreeMap<String, Tensor>,
    patches: &[Patch<'_>],
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let context = lora.path.display().to_string();
    let mut merged_modules = Vec::new();
    for patch in patches {
        let key = format!("{}.weight", patch.module);
        let w = tensors.get(&key).ok_or_else(|| Error::MissingKey {
            path: lora.path.clone(),
            key: key.clone(),
        })?;
        let dims = w.dims().to_vec();
        let mut weight = w.to_vec_f64()?;
        let bias_key = format!("{}.bias", patch.module);
        let mut bias = match (&patch.bias_diff, tensors.get(&bias_key)) {
            (Some(_), Some(b)) => Some((b.to_vec_f64()?, b.dims().to_vec())),
            _ => None,
        };
        patch.apply_f64(
            &mut weight,
            bias.as_mut().map(|(v, _)| v.as_mut_slice()),
            lora.multiplier,
            &context,
        )?;
        tensors.insert(key, Tensor::from_vec(weight, dims, Device::Cpu)?);
        if let Some((v, dims)) = bias {
            tensors.insert(bias_key, Tensor::from_vec(v, dims, Device::Cpu)?);
        }
        merged_modules.push(patch.module.clone());
    }
    Ok(merged_modules)
}

/// Merges the text-encoder part (`lora_te1_`, `text_encoder.`, ...; or `lora_te2_`,
/// `text_encoder_2.`) of a LoRA file into that encoder's tensors (canonical `text_model.` keys);
/// the file's other parts are left to their own loaders. Returns the merged module paths.
pub fn merge_kohya_text_encoder(
    tensors: &mut BTreeMap<String, Tensor>,
    component: Component,
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let index = ModuleIndex::text_encoder(
        component,
        tensors.iter().map(|(k, t)| (k.as_str(), t.dims())),
    );
    let file = MappedFile::open(&lora.path)?;
    let mine = text_encoder_patches(index, &file, lora)?;
    apply(tensors, &mine, lora)
}

/// The patches of `lora` for the text encoder `index` describes; keys its prefix claims that
/// name none of that encoder's modules are an error listing them.
fn text_encoder_patches<'f>(
    index: ModuleIndex,
    file: &'f MappedFile,
    lora: &KohyaLoraFile,
) -> Result<Vec<Patch<'f>>> {
    let context = lora.path.display().to_string();
    let component = index.component();
    let model = KohyaModel::new(vec![index]);
    let parsed = model.parse_patches(file.tensors()?, &context, file.metadata())?;
    let bad: Vec<String> = parsed
        .unknown
        .into_iter()
        .filter(|(c, _)| *c == Some(component))
        .map(|(_, k)| k)
        .collect();
    if !bad.is_empty() {
        return Err(formats::Error::UnexpectedKeys { context, keys: bad }.into());
    }
    Ok(parsed
        .patches
        .into_iter()
        .filter(|p| p.component == component)
        .collect())
}
