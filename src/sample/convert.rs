//! Model format conversion: a diffusers folder to one original-layout (sgm) file, the layout
//! A1111 and ComfyUI load, and a single file to a diffusers folder. Tensors keep their dtype and
//! bytes (only layout renames, the OpenCLIP q/k/v fusion and projection transpose, and the VAE's
//! 1x1 kernels change); ComfyUI's `v_pred` / `ztsnr` markers carry the objective across, and
//! Playground v2.5's `edm_mean` / `edm_std` its EDM scheduler and VAE latent statistics.
//! LoRA files given with the conversion are baked into the weights (each patched weight formed in
//! f64 and rounded once to its stored dtype); with them a single file may also become a new
//! single file, every tensor the LoRAs leave alone written as stored.
//! Outputs are written beside the target and renamed into place, so a failed run leaves nothing.

use super::model_files::ModelFiles;
use super::schedule::Prediction;
use crate::formats::diffusers::{ComponentDir, DiffusersFolder};
use crate::formats::kohya::Component;
use crate::formats::raw::{write_safetensors, RawTensor};
use crate::formats::single_file::{
    self, SplitCheckpoint, VaeLayout, EDM_MEAN_MARKER, EDM_STD_MARKER, V_PRED_MARKER, ZTSNR_MARKER,
};
use crate::formats::to_single_file::to_sgm;
use crate::formats::unet_layout::UnetLayout;
use crate::formats::MappedFile;
use crate::models::unet::lora_merge::bake_raw;
use crate::models::unet::KohyaLoraFile;
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What a conversion wrote.
#[derive(Debug)]
pub struct Converted {
    pub tensors: usize,
    pub markers: Vec<&'static str>,
    /// Module weights the LoRA files changed.
    pub merged: usize,
}

/// Bakes `loras` into `split`: every file's update summed in f64 on the stored weights, then
/// each patched tensor rounded once to its stored dtype (as the load-time merge rounds).
fn bake(
    split: &mut SplitCheckpoint<'_>,
    layout: &UnetLayout,
    loras: &[KohyaLoraFile],
) -> Result<usize> {
    let dtypes = |m: &crate::formats::TensorMap<'_>| -> HashMap<String, safetensors::Dtype> {
        m.iter().map(|(k, t)| (k.clone(), t.dtype)).collect()
    };
    let before = [
        dtypes(&split.unet),
        dtypes(&split.text_encoder),
        dtypes(&split.text_encoder_2),
    ];
    let mut merged = HashSet::new();
    for lora in loras {
        let SplitCheckpoint {
            unet,
            text_encoder,
            text_encoder_2,
            ..
        } = split;
        let mut text = Vec::new();
        if !text_encoder.is_empty() {
            text.push((Component::TextEncoder, text_encoder));
        }
        text.push((Component::TextEncoder2, text_encoder_2));
        merged.extend(bake_raw(unet, layout, text, lora)?);
    }
    let maps = [
        &mut split.unet,
        &mut split.text_encoder,
        &mut split.text_encoder_2,
    ];
    for (map, stored) in maps.into_iter().zip(&before) {
        for (key, t) in map.iter_mut() {
            let Some(&was) = stored.get(key) else {
                continue;
            };
            if t.dtype != was {
                let v = t.to_f64_vec("baked LoRA", key)?;
                *t = RawTensor::from_f64(was, t.shape.clone(), &v)?;
            }
        }
    }
    Ok(merged.len())
}

/// A diffusers folder's weight components (no text_encoder for a refiner), opened.
struct FolderComponents {
    unet: ComponentDir,
    text_encoder: Option<ComponentDir>,
    text_encoder_2: ComponentDir,
    vae: ComponentDir,
}

impl FolderComponents {
    fn open(folder: &DiffusersFolder) -> Result<Self> {
        let has_te1 = folder.index.components.contains_key("text_encoder");
        Ok(FolderComponents {
            unet: folder.component("unet", None)?,
            text_encoder: has_te1
                .then(|| folder.component("text_encoder", None))
                .transpose()?,
            text_encoder_2: folder.component("text_encoder_2", None)?,
            vae: folder.component("vae", None)?,
        })
    }

    /// Their tensors as stored (text encoders under canonical keys).
    fn split(&self) -> Result<SplitCheckpoint<'_>> {
        Ok(SplitCheckpoint {
            unet: self.unet.tensors()?,
            text_encoder: self
                .text_encoder
                .as_ref()
                .map(|c| c.tensors())
                .transpose()?
                .unwrap_or_default(),
            text_encoder_2: self.text_encoder_2.tensors()?,
            vae: self.vae.tensors()?,
        })
    }
}

fn refuse_existing(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        return Err(Error::file(
            out,
            "already exists; convert writes a new file or folder and never replaces one",
        ));
    }
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .or_else(|_| std::fs::remove_file(&partial))
            .map_err(|e| Error::io(&partial, e))?;
    }
    Ok(partial)
}

/// A diffusers folder (base, refiner or inpainting model) as one sgm file at `out`, `loras`
/// baked in.
pub fn folder_to_single_file(
    files: &ModelFiles,
    loras: &[KohyaLoraFile],
    out: &Path,
) -> Result<Converted> {
    if files.single_file {
        return Err(Error::file(&files.model, "is a single file already"));
    }
    let partial = refuse_existing(out)?;
    let folder = DiffusersFolder::open(&files.model)?;
    let components = FolderComponents::open(&folder)?;
    let mut split = components.split()?;
    let mut vae_layout = folder.vae_layout()?;
    if let Some((map, dir)) = files.replacement_vae()? {
        if let Some(dir) = dir {
            vae_layout = VaeLayout::from_config_file(dir.join("config.json"))?;
        }
        split.vae = map;
    }
    let context = files.model.display().to_string();
    let layout = folder.unet_layout()?;
    let merged = bake(&mut split, &layout, loras)?;
    let mut sgm = to_sgm(&split, &layout, vae_layout, &context)?;
    let scheduler = files.scheduler()?;
    let mut markers = Vec::new();
    if scheduler.prediction == Prediction::V {
        markers.push(V_PRED_MARKER);
    }
    if scheduler.zero_snr {
        markers.push(ZTSNR_MARKER);
    }
    for m in &markers {
        sgm.insert(
            m.to_string(),
            RawTensor::new(safetensors::Dtype::F32, vec![0], vec![])?,
        );
    }
    if let Some(edm) = scheduler.edm {
        let vae_cfg = crate::models::vae::config::VaeConfig::from_file(
            files.config_dir.join("vae/config.json"),
        )?;
        let playground = super::SchedulerConfig::from_json_text(
            super::edm::PLAYGROUND_SCHEDULER,
            Path::new("(Playground v2.5's scheduler)"),
        )?;
        let (Some(mean), Some(std)) = (&vae_cfg.latents_mean, &vae_cfg.latents_std) else {
            return Err(Error::file(
                &files.model,
                "is an EDM model whose VAE config has no latents_mean / latents_std: a single \
                 file marks EDM only by Playground v2.5's edm_mean / edm_std, so it would load \
                 as a beta-schedule model",
            ));
        };
        if Some(edm) != playground.edm || scheduler.prediction != Prediction::Epsilon {
            return Err(Error::file(
                &files.model,
                format!(
                    "is an EDM model with settings other than Playground v2.5's ({edm:?}, \
                     {:?}): a single file's edm_mean / edm_std markers stand for Playground's \
                     alone, so its own would be lost",
                    scheduler.prediction
                ),
            ));
        }
        for (key, values) in [(EDM_MEAN_MARKER, mean), (EDM_STD_MARKER, std)] {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            sgm.insert(
                key.to_string(),
                RawTensor::new(safetensors::Dtype::F32, vec![values.len()], bytes)?,
            );
            markers.push(key);
        }
    }
    write_safetensors(&partial, &sgm, None)?;
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(Converted {
        tensors: sgm.len(),
        markers,
        merged,
    })
}

/// A single sgm file, read with its architecture folder, as a diffusers folder at `out`: the
/// folder's configs, tokenizers and scheduler (the UNet's `in_channels` from the file's
/// `conv_in`, the scheduler's objective from its markers) and one weights file per component,
/// `loras` baked in.
pub fn single_file_to_folder(
    files: &ModelFiles,
    loras: &[KohyaLoraFile],
    out: &Path,
) -> Result<Converted> {
    if !files.single_file {
        return Err(Error::file(&files.model, "is a folder, not a single file"));
    }
    let partial = refuse_existing(out)?;
    let file = MappedFile::open(&files.model)?;
    let ckpt = file.tensors()?;
    let markers = single_file::Markers::of(&ckpt);
    let unet_cfg = files.unet_config()?;
    let vae_levels =
        crate::models::vae::config::VaeConfig::from_file(files.config_dir.join("vae/config.json"))?
            .block_out_channels
            .len();
    let mut split = single_file::convert(
        ckpt,
        &unet_cfg.layout(),
        VaeLayout { levels: vae_levels },
        &files.model.display().to_string(),
    )?;
    copy_configs_and_vae(files, &files.config_dir, &partial, &mut split)?;
    let merged = bake(&mut split, &unet_cfg.layout(), loras)?;
    let patch = |rel: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let path = partial.join(rel);
        let mut v: serde_json::Value = crate::formats::python_json::read_file(&path)?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| Error::file(&path, "expected a JSON object"))?;
        edit(obj);
        let text =
            serde_json::to_string_pretty(&v).map_err(|e| Error::file(&path, e.to_string()))?;
        crate::tensor::write_atomic(&path, text.as_bytes())
    };
    patch("unet/config.json", &|o| {
        o.insert("in_channels".into(), unet_cfg.in_channels.into());
    })?;
    if markers.edm {
        let (mean, std) = single_file::edm_latent_stats(
            &file.tensors()?,
            crate::models::vae::config::VaeConfig::from_file(
                files.config_dir.join("vae/config.json"),
            )?
            .latent_channels,
            &files.model,
        )?
        .ok_or_else(|| Error::file(&files.model, "edm_mean / edm_std disappeared"))?;
        patch("vae/config.json", &|o| {
            o.insert("latents_mean".into(), mean.clone().into());
            o.insert("latents_std".into(), std.clone().into());
            o.insert("scaling_factor".into(), 0.5.into());
        })?;
        let path = partial.join("scheduler/scheduler_config.json");
        crate::tensor::write_atomic(&path, super::edm::PLAYGROUND_SCHEDULER.as_bytes())?;
    }
    if markers.v_prediction || markers.zero_snr {
        patch("scheduler/scheduler_config.json", &|o| {
            if markers.v_prediction {
                o.insert("prediction_type".into(), "v_prediction".into());
            }
            if markers.zero_snr {
                o.insert("rescale_betas_zero_snr".into(), true.into());
            }
        })?;
    }
    let tensors = write_components(&partial, &split)?;
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::new();
    if markers.v_prediction {
        written.push(V_PRED_MARKER);
    }
    if markers.zero_snr {
        written.push(ZTSNR_MARKER);
    }
    if markers.edm {
        written.extend([EDM_MEAN_MARKER, EDM_STD_MARKER]);
    }
    Ok(Converted {
        tensors,
        markers: written,
        merged,
    })
}

/// Each component's weights as one file in its folder under `root` (no text_encoder folder for
/// a refiner). Returns the tensor count.
fn write_components(root: &Path, split: &SplitCheckpoint<'_>) -> Result<usize> {
    let mut tensors = 0;
    for (dir, name, map) in [
        ("unet", "diffusion_pytorch_model.safetensors", &split.unet),
        ("text_encoder", "model.safetensors", &split.text_encoder),
        ("text_encoder_2", "model.safetensors", &split.text_encoder_2),
        ("vae", "diffusion_pytorch_model.safetensors", &split.vae),
    ] {
        if map.is_empty() && dir == "text_encoder" {
            continue;
        }
        let d = root.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        write_safetensors(d.join(name), map, None)?;
        tensors += map.len();
    }
    Ok(tensors)
}

/// A diffusers folder with `loras` (and `--vae`'s tensors, if given) baked in, as a new folder:
/// the input's configs, tokenizers and scheduler, one weights file per component (text encoders
/// under canonical `text_model.` keys, as every folder kstyle writes).
pub fn folder_with_loras(
    files: &ModelFiles,
    loras: &[KohyaLoraFile],
    out: &Path,
) -> Result<Converted> {
    if files.single_file {
        return Err(Error::file(&files.model, "is a single file, not a folder"));
    }
    if loras.is_empty() && files.vae.is_none() {
        return Err(Error::file(
            &files.model,
            "is a diffusers folder already: give --lora (or --vae) to bake into a new one, or \
             --to single-file",
        ));
    }
    let partial = refuse_existing(out)?;
    let folder = DiffusersFolder::open(&files.model)?;
    let components = FolderComponents::open(&folder)?;
    let mut split = components.split()?;
    copy_configs_and_vae(files, &files.model, &partial, &mut split)?;
    let merged = bake(&mut split, &folder.unet_layout()?, loras)?;
    let tensors = write_components(&partial, &split)?;
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(Converted {
        tensors,
        markers: Vec::new(),
        merged,
    })
}

/// A single sgm file with `loras` baked in (and `--vae`'s tensors, if given), as a new single
/// file at `out`: the input's tensors and metadata, each tensor the bake changed replaced under
/// its own key (the OpenCLIP q/k/v fusion and transposes redone), everything else as stored.
pub fn single_file_with_loras(
    files: &ModelFiles,
    loras: &[KohyaLoraFile],
    out: &Path,
) -> Result<Converted> {
    if !files.single_file {
        return Err(Error::file(&files.model, "is a folder, not a single file"));
    }
    if loras.is_empty() && files.vae.is_none() {
        return Err(Error::file(
            &files.model,
            "is a single file already: give --lora (or --vae) to bake into a new one, or --to \
             diffusers",
        ));
    }
    let partial = refuse_existing(out)?;
    let file = MappedFile::open(&files.model)?;
    let context = files.model.display().to_string();
    let ckpt = file.tensors()?;
    let layout = files.unet_config()?.layout();
    let vae = VaeLayout {
        levels: crate::models::vae::config::VaeConfig::from_file(
            files.config_dir.join("vae/config.json"),
        )?
        .block_out_channels
        .len(),
    };
    let mut split = single_file::convert(ckpt.clone(), &layout, vae, &context)?;
    if let Some((map, _)) = files.replacement_vae()? {
        split.vae = map;
    }
    let merged = bake(&mut split, &layout, loras)?;
    let mut sgm = ckpt;
    for (key, t) in to_sgm(&split, &layout, vae, &context)? {
        let Some(old) = sgm.get(&key) else {
            return Err(Error::file(
                &files.model,
                format!("has no `{key}`, which its converted weights do: not rewritten in place"),
            ));
        };
        if old.data[..] == t.data[..] && old.dtype == t.dtype {
            continue;
        }
        // Changed values under the input's own shape (the VAE's attention kernels may be stored
        // 2-D or 1x1 4-D).
        if old.dtype != t.dtype || old.numel() != t.numel() {
            return Err(Error::file(
                &files.model,
                format!(
                    "`{key}` is {:?} {:?}, its baked form {:?} {:?}",
                    old.dtype, old.shape, t.dtype, t.shape
                ),
            ));
        }
        let shape = old.shape.clone();
        sgm.insert(key, RawTensor::new(t.dtype, shape, t.data.into_owned())?);
    }
    write_safetensors(&partial, &sgm, file.metadata().cloned())?;
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(Converted {
        tensors: sgm.len(),
        markers: Vec::new(),
        merged,
    })
}

/// The non-weight files of the folder `from` copied into the new folder `to`, and `--vae`'s
/// tensors in `split` in place of the model's (a VAE folder brings its own config; a file is
/// read with the model's, already copied).
fn copy_configs_and_vae(
    files: &ModelFiles,
    from: &Path,
    to: &Path,
    split: &mut SplitCheckpoint<'_>,
) -> Result<()> {
    let replacement = files.replacement_vae()?;
    copy_configs(from, to)?;
    if let Some((map, dir)) = replacement {
        if let Some(dir) = dir {
            let (src, dst) = (dir.join("config.json"), to.join("vae/config.json"));
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
        split.vae = map;
    }
    Ok(())
}

/// The architecture folder's non-weight files (model_index.json, configs, tokenizers,
/// scheduler), copied to `to`.
fn copy_configs(from: &Path, to: &Path) -> Result<()> {
    fn walk(from: &Path, to: &Path, depth: usize) -> Result<()> {
        let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
        std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(from, e))?;
            let (src, name) = (e.path(), e.file_name());
            let dst = to.join(&name);
            let name = name.to_string_lossy();
            if src.is_dir() {
                if depth == 0 {
                    walk(&src, &dst, depth + 1)?;
                }
                continue;
            }
            let weights = name.ends_with(".safetensors")
                || name.ends_with(".bin")
                || name.ends_with(".index.json")
                || name.ends_with(".ckpt");
            if !weights {
                std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
            }
        }
        Ok(())
    }
    walk(from, to, 0)
}
