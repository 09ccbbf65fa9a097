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

/// Merges `lora` into a checkpoint's stored weights, as conversion holds them (diffusers keys:
/// the UNet's, and each text encoder's under `text_model.`): every patched weight (and bias,
/// for `diff_b`) is formed in f64 from the stored values and left as an F64 tensor, so that
/// several files sum in f64 before the caller rounds once to the stored dtypes (what the load-time
/// merge does, and A1111's and kohya's merge-and-save write). Every key of the file must land
/// in the UNet or one of `text_encoders`. kstyle adapter files are refused: their gates run live, and a
/// plain one's kohya export is the file to bake. Returns the merged module paths.
pub fn bake_raw(
    unet: &mut formats::TensorMap<'_>,
    layout: &UnetLayout,
    text_encoders: Vec<(Component, &mut formats::TensorMap<'_>)>,
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let file = MappedFile::open(&lora.path)?;
    if file
        .metadata()
        .is_some_and(|m| m.contains_key("kstyle.method"))
    {
        return Err(Error::file(
            &lora.path,
            "is a kstyle adapter: bake its `kstyle export --format kohya` (gated adapters with \
             --bake-gates), the LoRA other tools merge",
        ));
    }
    let shapes = |m: &formats::TensorMap<'_>| -> Vec<(String, Vec<usize>)> {
        m.iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect()
    };
    let unet_shapes = shapes(unet);
    let index = ModuleIndex::unet(
        unet_shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        layout,
    );
    let (patches, mut left) = unet_patches(index, &file, lora)?;
    let mut merged = apply_raw(unet, &patches, lora)?;
    for (component, map) in text_encoders {
        let te_shapes = shapes(map);
        let index = ModuleIndex::text_encoder(
            component,
            te_shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        );
        let patches = text_encoder_patches(index, &file, lora)?;
        let taken: std::collections::HashSet<&String> =
            patches.iter().flat_map(|p| &p.keys).collect();
        left.retain(|k| !taken.contains(k));
        merged.extend(
            apply_raw(map, &patches, lora)?
                .into_iter()
                .map(|m| format!("{}.{m}", component.diffusers_name())),
        );
    }
    if !left.is_empty() {
        return Err(formats::Error::UnexpectedKeys {
            context: format!(
                "{} (text-encoder modules for an encoder this model has not)",
                lora.path.display()
            ),
            keys: left,
        }
        .into());
    }
    Ok(merged)
}

/// [`apply`] on stored tensors: the key of `<module>.weight` as the map spells it (text encoders
/// may be stored without `text_model.`), merged in f64 and stored as F64.
fn apply_raw(
    map: &mut formats::TensorMap<'_>,
    patches: &[Patch<'_>],
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let context = lora.path.display().to_string();
    let stored = |map: &formats::TensorMap<'_>, key: &str| -> Option<String> {
        if map.contains_key(key) {
            return Some(key.to_string());
        }
        key.strip_prefix("text_model.")
            .filter(|k| map.contains_key(*k))
            .map(str::to_string)
    };
    let mut merged = Vec::new();
    for patch in patches {
        let key =
            stored(map, &format!("{}.weight", patch.module)).ok_or_else(|| Error::MissingKey {
                path: lora.path.clone(),
                key: format!("{}.weight", patch.module),
            })?;
        let w = &map[&key];
        let shape = w.shape.clone();
        let mut weight = w.to_f64_vec(&context, &key)?;
        let bias_key = stored(map, &format!("{}.bias", patch.module));
        let mut bias = match (&patch.bias_diff, &bias_key) {
            (Some(_), Some(k)) => {
                let b = &map[k];
                Some((k.clone(), b.to_f64_vec(&context, k)?, b.shape.clone()))
            }
            _ => None,
        };
        patch.apply_f64(
            &mut weight,
            bias.as_mut().map(|(_, v, _)| v.as_mut_slice()),
            lora.multiplier,
            &context,
        )?;
        let f64 = safetensors::Dtype::F64;
        map.insert(key, formats::RawTensor::from_f64(f64, shape, &weight)?);
        if let Some((k, v, shape)) = bias {
            map.insert(k, formats::RawTensor::from_f64(f64, shape, &v)?);
        }
        merged.push(patch.module.clone());
    }
    Ok(merged)
}
