//! kohya LoRA files merged into the frozen UNet weights at load time:
//! `W' = W + m * (alpha / r) * up @ down` per targeted Linear or conv (SDXL.md 6.1).
//!
//! Names are resolved by `formats::kohya` against the UNet's own diffusers keys (so sgm- and
//! diffusers-spelled files both work); the sum is formed in f64 from the stored weight and the
//! stored factors and rounded once to the load dtype, which is how the float64 reference merges
//! on its fp16-rounded weights.

use crate::formats::kohya::{Component, KohyaModel, ModuleIndex};
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
/// of this UNet, or use a LoRA variant not implemented here, are an error listing them.
pub fn merge_kohya(
    tensors: &mut BTreeMap<String, Tensor>,
    layout: &UnetLayout,
    lora: &KohyaLoraFile,
) -> Result<MergeReport> {
    let context = lora.path.display().to_string();
    let index = ModuleIndex::unet(tensors.iter().map(|(k, t)| (k.as_str(), t.dims())), layout);
    let model = KohyaModel::new(vec![index]);
    let file = MappedFile::open(&lora.path)?;
    let parsed = model.parse(file.tensors()?, &context)?;
    let (bad, not_unet): (Vec<String>, Vec<String>) = parsed
        .unknown
        .into_iter()
        .partition(|k| k.starts_with(Component::Unet.kohya_prefix()));
    if !bad.is_empty() {
        return Err(formats::Error::UnexpectedKeys { context, keys: bad }.into());
    }
    // Keys of no known LoRA prefix at all: not a kohya LoRA file (a checkpoint passed by mistake).
    let foreign: Vec<String> = not_unet
        .iter()
        .filter(|k| !k.starts_with("lora_te"))
        .cloned()
        .collect();
    if !foreign.is_empty() {
        return Err(formats::Error::UnexpectedKeys {
            context: format!("{context} (not a kohya LoRA file)"),
            keys: foreign,
        }
        .into());
    }
    let mut report = MergeReport {
        not_unet,
        ..MergeReport::default()
    };
    report.merged = apply(
        tensors,
        parsed
            .entries
            .iter()
            .filter(|e| e.component == Component::Unet),
        lora,
    )?;
    Ok(report)
}

/// Adds every entry's `m * (alpha / r) * up @ down` to its `<module>.weight` in f64.
fn apply<'a, 'b: 'a>(
    tensors: &mut BTreeMap<String, Tensor>,
    entries: impl Iterator<Item = &'a formats::kohya::LoraEntry<'b>>,
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let mut merged_modules = Vec::new();
    for entry in entries {
        let key = format!("{}.weight", entry.module);
        let w = tensors.get(&key).ok_or_else(|| Error::MissingKey {
            path: lora.path.clone(),
            key: key.clone(),
        })?;
        let delta = entry.delta_f64(lora.multiplier)?;
        let mut merged = w.to_vec_f64()?;
        if merged.len() != delta.len() {
            return Err(Error::WrongShape {
                path: lora.path.clone(),
                key,
                got: entry.target_shape(),
                expected: w.dims().to_vec(),
            });
        }
        for (m, d) in merged.iter_mut().zip(&delta) {
            *m += d;
        }
        let t = Tensor::from_vec(merged, w.dims().to_vec(), Device::Cpu)?;
        tensors.insert(key, t);
        merged_modules.push(entry.module.clone());
    }
    Ok(merged_modules)
}

/// Merges the `lora_te1_` (or `lora_te2_`) part of a kohya file into a text encoder's tensors
/// (canonical `text_model.` keys); the file's other parts are left to their own loaders.
/// Returns the merged module paths.
pub fn merge_kohya_text_encoder(
    tensors: &mut BTreeMap<String, Tensor>,
    component: Component,
    lora: &KohyaLoraFile,
) -> Result<Vec<String>> {
    let context = lora.path.display().to_string();
    let index = ModuleIndex::text_encoder(
        component,
        tensors.iter().map(|(k, t)| (k.as_str(), t.dims())),
    );
    let model = KohyaModel::new(vec![index]);
    let file = MappedFile::open(&lora.path)?;
    let parsed = model.parse(file.tensors()?, &context)?;
    let bad: Vec<String> = parsed
        .unknown
        .into_iter()
        .filter(|k| k.starts_with(component.kohya_prefix()))
        .collect();
    if !bad.is_empty() {
        return Err(formats::Error::UnexpectedKeys { context, keys: bad }.into());
    }
    apply(
        tensors,
        parsed.entries.iter().filter(|e| e.component == component),
        lora,
    )
}
