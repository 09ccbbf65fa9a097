//! Where an SDXL model's components come from: a diffusers folder, or an original-layout single
//! file read with an architecture folder (given, or the built-in SDXL base). Each component loads
//! on its own, so the trainer can keep only the UNet resident.

use crate::formats::diffusers::{DiffusersFolder, ModelIndex};
use crate::formats::single_file::{self, SplitCheckpoint, VaeLayout};
use crate::formats::MappedFile;
use crate::models::clip::config::ClipTextConfig;
use crate::models::clip::text::ClipTextModel;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::unet::lora_merge::KohyaLoraFile;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{config::VaeConfig, AutoencoderKL};
use crate::nn::Weights;
use crate::sample::SchedulerConfig;
use crate::{DType, Device, Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The folder or the single file.
    pub model: PathBuf,
    /// Configs, tokenizers and scheduler: the model folder itself, or the architecture folder.
    pub config_dir: PathBuf,
    pub single_file: bool,
}

fn load_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.into(),
        msg: e.to_string(),
    })
}

impl ModelFiles {
    pub fn resolve(model: &Path, config: Option<&Path>) -> Result<ModelFiles> {
        if !model.exists() {
            return Err(Error::file(model, "no such model folder or file"));
        }
        if model.is_dir() {
            return Ok(ModelFiles {
                model: model.into(),
                config_dir: model.into(),
                single_file: false,
            });
        }
        let config_dir = match config {
            Some(d) => d.to_path_buf(),
            None => {
                crate::models::presets::materialize_sdxl_base(&crate::models::presets::cache_dir())?
            }
        };
        Ok(ModelFiles {
            model: model.into(),
            config_dir,
            single_file: true,
        })
    }

    pub fn index(&self) -> Result<ModelIndex> {
        Ok(ModelIndex::from_file(
            self.config_dir.join("model_index.json"),
        )?)
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        UNetConfig::from_file(self.config_dir.join("unet/config.json"))
    }

    fn vae_config(&self) -> Result<VaeConfig> {
        VaeConfig::from_file(self.config_dir.join("vae/config.json"))
    }

    fn split<'f>(&self, file: &'f MappedFile) -> Result<SplitCheckpoint<'f>> {
        let levels = self.vae_config()?.block_out_channels.len();
        Ok(single_file::convert_file(
            file,
            &self.unet_config()?.layout(),
            VaeLayout { levels },
        )?)
    }

    pub fn unet(
        &self,
        kohya: &[KohyaLoraFile],
        dtype: DType,
        device: Device,
    ) -> Result<UNet2DConditionModel> {
        Ok(if self.single_file {
            UNet2DConditionModel::from_single_file(
                &self.model,
                &self.unet_config()?,
                kohya,
                dtype,
                device,
            )?
            .model
        } else {
            UNet2DConditionModel::from_diffusers(&self.model, kohya, dtype, device)?.model
        })
    }

    /// The VAE, always f32 (SDXL's VAE overflows in fp16).
    pub fn vae(&self, device: Device) -> Result<AutoencoderKL> {
        if !self.single_file {
            return AutoencoderKL::from_diffusers(
                &DiffusersFolder::open(&self.model)?,
                DType::F32,
                device,
            );
        }
        let file = MappedFile::open(&self.model)?;
        let split = self.split(&file)?;
        let vb = Weights::from_raw(&split.vae, self.model.clone(), DType::F32, device)?;
        let vae = AutoencoderKL::load(&vb, self.vae_config()?)?;
        vb.ensure_all_used(|_| false)?;
        Ok(vae)
    }

    /// (text_encoder, text_encoder_2).
    pub fn text_encoders(
        &self,
        dtype: DType,
        device: Device,
    ) -> Result<(ClipTextModel, ClipTextModel)> {
        if !self.single_file {
            let folder = DiffusersFolder::open(&self.model)?;
            return Ok((
                ClipTextModel::from_diffusers(&folder, "text_encoder", dtype, device)?,
                ClipTextModel::from_diffusers(&folder, "text_encoder_2", dtype, device)?,
            ));
        }
        let te1_cfg = ClipTextConfig::from_json(&load_json(
            &self.config_dir.join("text_encoder/config.json"),
        )?)?;
        let te2_cfg = ClipTextConfig::from_json(&load_json(
            &self.config_dir.join("text_encoder_2/config.json"),
        )?)?;
        let file = MappedFile::open(&self.model)?;
        let split = self.split(&file)?;
        let vb1 = Weights::from_raw(&split.text_encoder, self.model.clone(), dtype, device)?;
        let te1 = ClipTextModel::load(&vb1, &te1_cfg)?;
        vb1.ensure_all_used(|_| false)?;
        let vb2 = Weights::from_raw(&split.text_encoder_2, self.model.clone(), dtype, device)?;
        let te2 = ClipTextModel::load_with_projection(&vb2, &te2_cfg)?;
        vb2.ensure_all_used(|_| false)?;
        Ok((te1, te2))
    }

    pub fn tokenizers(&self) -> Result<(ClipTokenizer, ClipTokenizer)> {
        Ok((
            ClipTokenizer::from_folder(self.config_dir.join("tokenizer"))?,
            ClipTokenizer::from_folder(self.config_dir.join("tokenizer_2"))?,
        ))
    }

    pub fn scheduler(&self) -> Result<SchedulerConfig> {
        let p = self.config_dir.join("scheduler/scheduler_config.json");
        if p.exists() {
            SchedulerConfig::from_file(&p)
        } else {
            Ok(SchedulerConfig::default())
        }
    }

    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        Ok(self
            .index()?
            .options
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(true))
    }

    /// A string that changes when the model's weights change: cache keys for latents and text
    /// embeddings include it.
    pub fn identity(&self) -> String {
        fn walk(p: &Path, acc: &mut Vec<String>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
                entries.sort_by_key(|e| e.file_name());
                for e in entries {
                    walk(&e.path(), acc);
                }
            } else if let Ok(m) = std::fs::metadata(p) {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                acc.push(format!("{}:{}:{mtime}", p.display(), m.len()));
            }
        }
        let mut acc = Vec::new();
        walk(&self.model, &mut acc);
        acc.join("|")
    }
}
