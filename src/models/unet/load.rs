//! Loading a UNet from a diffusers folder or an original-layout single file, with any number
//! of kohya LoRAs merged into the frozen weights on the way. Keys are renamed by `formats`
//! before anything here sees them; the model then takes every tensor by diffusers name and the
//! load fails on a missing, mis-shaped or left-over tensor.

use super::lora_merge::{merge_kohya, KohyaLoraFile, MergeReport};
use super::{UNet2DConditionModel, UNetConfig};
use crate::formats::diffusers::DiffusersFolder;
use crate::formats::single_file::{self, VaeLayout};
use crate::formats::{MappedFile, TensorMap};
use crate::nn::weights::tensor_from_raw;
use crate::nn::weights::Precision;
use crate::nn::Weights;
use crate::{Device, Result, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A loaded UNet and what the LoRA merges did.
pub struct LoadedUNet {
    pub model: UNet2DConditionModel,
    /// One report per LoRA file, in the order given.
    pub merges: Vec<MergeReport>,
}

fn decode(map: &TensorMap<'_>, origin: &Path) -> Result<BTreeMap<String, Tensor>> {
    map.iter()
        .map(|(k, r)| Ok((k.clone(), tensor_from_raw(r, origin, k)?)))
        .collect()
}

/// Merges the LoRAs, builds the model and rejects unused tensors.
fn build(
    mut tensors: BTreeMap<String, Tensor>,
    origin: PathBuf,
    cfg: &UNetConfig,
    loras: &[KohyaLoraFile],
    precision: Precision,
    device: Device,
) -> Result<LoadedUNet> {
    let layout = cfg.layout();
    let merges = loras
        .iter()
        .map(|l| merge_kohya(&mut tensors, &layout, l))
        .collect::<Result<Vec<_>>>()?;
    let vb = Weights::from_map(tensors, origin, precision.compute, device)
        .with_matrix_dtype(precision.matrices);
    let model = UNet2DConditionModel::load(&vb, cfg)?;
    vb.ensure_all_used(|_| false)?;
    Ok(LoadedUNet { model, merges })
}

impl UNet2DConditionModel {
    /// The `unet` component of a diffusers pipeline folder, architecture from its config.json.
    pub fn from_diffusers(
        root: impl AsRef<Path>,
        loras: &[KohyaLoraFile],
        dtype: impl Into<Precision>,
        device: Device,
    ) -> Result<LoadedUNet> {
        let folder = DiffusersFolder::open(root)?;
        let comp = folder.component("unet", None)?;
        let cfg = UNetConfig::from_json(&comp.config)
            .map_err(|e| crate::Error::file(comp.dir.join("config.json"), e.to_string()))?;
        let map = comp.tensors()?;
        let tensors = decode(&map, &comp.dir)?;
        build(tensors, comp.dir.clone(), &cfg, loras, dtype.into(), device)
    }

    /// The `unet` component's architecture and decoded tensors, for building a variant of it in
    /// memory (with [`Self::from_tensors`]).
    pub fn diffusers_tensors(
        root: impl AsRef<Path>,
    ) -> Result<(UNetConfig, BTreeMap<String, Tensor>, PathBuf)> {
        let folder = DiffusersFolder::open(root)?;
        let comp = folder.component("unet", None)?;
        let cfg = UNetConfig::from_json(&comp.config)
            .map_err(|e| crate::Error::file(comp.dir.join("config.json"), e.to_string()))?;
        let tensors = decode(&comp.tensors()?, &comp.dir)?;
        Ok((cfg, tensors, comp.dir.clone()))
    }

    /// A UNet from diffusers-named tensors; `origin` names them in errors.
    pub fn from_tensors(
        tensors: BTreeMap<String, Tensor>,
        origin: PathBuf,
        cfg: &UNetConfig,
        dtype: impl Into<Precision>,
        device: Device,
    ) -> Result<UNet2DConditionModel> {
        Ok(build(tensors, origin, cfg, &[], dtype.into(), device)?.model)
    }

    /// The UNet of an sgm single file (`model.diffusion_model.*`), for an architecture the file
    /// itself does not record (`UNetConfig::sdxl_base()` for SDXL checkpoints).
    pub fn from_single_file(
        path: impl AsRef<Path>,
        cfg: &UNetConfig,
        loras: &[KohyaLoraFile],
        dtype: impl Into<Precision>,
        device: Device,
    ) -> Result<LoadedUNet> {
        let path = path.as_ref();
        let file = MappedFile::open(path)?;
        // Only the VAE part of the conversion needs its level count; SDXL's is 4 and a wrong
        // guess there cannot affect the UNet keys.
        let split = single_file::convert_file(&file, &cfg.layout(), VaeLayout::sdxl())?;
        let tensors = decode(&split.unet, path)?;
        build(
            tensors,
            path.to_path_buf(),
            cfg,
            loras,
            dtype.into(),
            device,
        )
    }
}
