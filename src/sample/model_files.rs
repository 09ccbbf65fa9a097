//! Where an SDXL model's components come from: a diffusers folder, or an original-layout single
//! file read with an architecture folder (given, or the built-in SDXL base). Each component loads
//! on its own, so the trainer can keep only the UNet resident.

use crate::formats::diffusers::{find_weights, normalize_vae, DiffusersFolder, ModelIndex};
use crate::formats::kohya::{Component, ModuleIndex};
use crate::formats::single_file::{self, SplitCheckpoint, VaeLayout};
use crate::formats::{MappedFile, TensorMap, WeightFiles};
use crate::models::clip::config::ClipTextConfig;
use crate::models::clip::text::ClipTextModel;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::presets::{self, Preset};
use crate::models::unet::lora_merge::{merge_kohya_text_encoder, KohyaLoraFile};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{config::VaeConfig, AutoencoderKL};
use crate::nn::weights::tensor_from_raw;
use crate::nn::Weights;
use crate::sample::SchedulerConfig;
use crate::{DType, Device, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The folder or the single file.
    pub model: PathBuf,
    /// Configs, tokenizers and scheduler: the model folder itself, or the architecture folder.
    pub config_dir: PathBuf,
    pub single_file: bool,
    /// The built-in architecture a single file is read with when no folder was given.
    pub preset: Option<Preset>,
    /// A VAE from elsewhere that replaces the model's own (`generate --vae`), see
    /// [`ModelFiles::with_vae`].
    pub vae: Option<PathBuf>,
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
                preset: None,
                vae: None,
            });
        }
        let (config_dir, preset) = match config {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let file = MappedFile::open(model)?;
                let preset = match single_file::is_refiner(&file.tensors()?) {
                    true => Preset::SdxlRefiner,
                    false => Preset::SdxlBase,
                };
                (preset.materialize(&presets::cache_dir())?, Some(preset))
            }
        };
        Ok(ModelFiles {
            model: model.into(),
            config_dir,
            single_file: true,
            preset,
            vae: None,
        })
    }

    /// Replaces the model's VAE with another: a diffusers VAE folder (read with its own config),
    /// a pipeline folder (its `vae/`), or one file (`sdxl_vae.safetensors` with the original
    /// names, a checkpoint's `first_stage_model.` part, or a diffusers-named file), which is read
    /// with the model's VAE config (its scaling factor and latent statistics included).
    pub fn with_vae(self, vae: Option<PathBuf>) -> Result<ModelFiles> {
        if let Some(path) = &vae {
            if !path.exists() {
                return Err(Error::file(path, "no such VAE folder or file"));
            }
        }
        Ok(ModelFiles { vae, ..self })
    }

    /// Adds to a loading error which built-in architecture the file was read with, if any:
    /// a fine-tune with other shapes fails against it, and the fix is naming its own folder.
    pub fn explain(&self, e: Error) -> Error {
        match self.preset {
            Some(p) => Error::Config(format!(
                "{e} (a single file records no architecture; this one was read as {}, \
                 and another needs its diffusers config folder named)",
                p.name()
            )),
            None => e,
        }
    }

    pub fn index(&self) -> Result<ModelIndex> {
        Ok(ModelIndex::from_file(
            self.config_dir.join("model_index.json"),
        )?)
    }

    /// The UNet's architecture. For a single file, the architecture folder's, with the input
    /// channels its `conv_in` weight has: inpainting checkpoints are SDXL with a 9-input
    /// `conv_in` (latents, mask, masked-picture latents).
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let mut cfg = UNetConfig::from_file(self.config_dir.join("unet/config.json"))?;
        if self.single_file {
            let file = MappedFile::open(&self.model)?;
            let tensors = file.tensors()?;
            if let Some(t) = tensors.get("model.diffusion_model.input_blocks.0.0.weight") {
                if t.shape.len() == 4 {
                    cfg.in_channels = t.shape[1];
                }
            }
        }
        Ok(cfg)
    }

    fn vae_config(&self) -> Result<VaeConfig> {
        VaeConfig::from_file(self.config_dir.join("vae/config.json"))
    }

    fn split<'f>(&self, file: &'f MappedFile) -> Result<SplitCheckpoint<'f>> {
        // A refiner file read with a base folder (or the reverse) would otherwise fail on
        // whichever tensor comes first; say what does not match.
        let refiner = single_file::is_refiner(&file.tensors()?);
        if refiner == self.has_text_encoder_1()? {
            let (file_is, folder_has) = match refiner {
                true => ("an SDXL refiner (no first text encoder)", "declares one"),
                false => ("not an SDXL refiner", "declares no first text encoder"),
            };
            return Err(Error::file(
                &self.model,
                format!(
                    "is {file_is}, but the architecture folder {} {folder_has}: name a folder \
                     of the same kind, or none",
                    self.config_dir.display()
                ),
            ));
        }
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
        dtype: impl Into<crate::nn::weights::Precision>,
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

    /// The VAE, always f32 (SDXL's VAE overflows in fp16): the model's own, or the one named
    /// with [`ModelFiles::with_vae`].
    pub fn vae(&self, device: Device) -> Result<AutoencoderKL> {
        if let Some(path) = &self.vae {
            let vae = self.vae_from(path, device)?;
            let unet = self.unet_config()?;
            if vae.config.latent_channels != unet.out_channels {
                return Err(Error::file(
                    path,
                    format!(
                        "this VAE has {} latent channels, the model's UNet denoises {}",
                        vae.config.latent_channels, unet.out_channels
                    ),
                ));
            }
            return Ok(vae);
        }
        if !self.single_file {
            return AutoencoderKL::from_diffusers(
                &DiffusersFolder::open(&self.model)?,
                DType::F32,
                device,
            );
        }
        let file = MappedFile::open(&self.model)?;
        let split = self.split(&file)?;
        load_vae(&split.vae, &self.model, self.vae_config_of(&file)?, device)
    }

    /// The VAE config a single file is read with: the architecture folder's, with the latent
    /// statistics Playground v2.5 files carry (diffusers' single-file loader then scales by 0.5,
    /// PLAYGROUND_VAE_SCALING_FACTOR, as the released folder's config does).
    fn vae_config_of(&self, file: &MappedFile) -> Result<VaeConfig> {
        let mut config = self.vae_config()?;
        let stats =
            single_file::edm_latent_stats(&file.tensors()?, config.latent_channels, &self.model)?;
        if let Some((mean, std)) = stats {
            config.latents_mean = Some(mean);
            config.latents_std = Some(std);
            config.scaling_factor = 0.5;
        }
        Ok(config)
    }

    /// The VAE named with [`ModelFiles::with_vae`] as stored (diffusers names; dtypes and bytes
    /// kept), after a full load checks it against this model, with the VAE folder whose config
    /// describes it when it came from one: what `convert --vae` writes in place of the model's
    /// VAE. None without a replacement.
    pub fn replacement_vae(&self) -> Result<Option<(TensorMap<'static>, Option<PathBuf>)>> {
        let Some(path) = &self.vae else {
            return Ok(None);
        };
        self.vae(Device::Cpu)?;
        let folder = vae_folder(path);
        let map = self.read_vae(path, |map, _, _| {
            Ok(map
                .iter()
                .map(|(k, t)| (k.clone(), t.clone().into_owned()))
                .collect::<TensorMap<'static>>())
        })?;
        Ok(Some((map, folder)))
    }

    /// The config the VAE loads with, without loading it: a VAE folder's own, or the model's
    /// (with a single file's latent statistics).
    pub fn vae_config_in_use(&self) -> Result<VaeConfig> {
        match self.vae.as_deref().and_then(vae_folder) {
            Some(dir) => VaeConfig::from_file(dir.join("config.json")),
            None => self.model_vae_config(),
        }
    }

    /// The model's own VAE config.
    fn model_vae_config(&self) -> Result<VaeConfig> {
        match self.single_file {
            true => self.vae_config_of(&MappedFile::open(&self.model)?),
            false => self.vae_config(),
        }
    }

    /// A VAE from `path` (see [`ModelFiles::with_vae`]).
    fn vae_from(&self, path: &Path, device: Device) -> Result<AutoencoderKL> {
        self.read_vae(path, |map, config, origin| {
            load_vae(map, origin, config, device)
        })
    }

    /// The tensors of the VAE at `path`, diffusers-named, with the config they are read with and
    /// the path that config came from (the VAE folder; for a file, the file itself), to `f`.
    fn read_vae<R>(
        &self,
        path: &Path,
        f: impl FnOnce(&TensorMap<'_>, VaeConfig, &Path) -> Result<R>,
    ) -> Result<R> {
        if let Some(dir) = vae_folder(path) {
            let config = VaeConfig::from_file(dir.join("config.json"))?;
            let weights = WeightFiles::open(find_weights(&dir, None)?)?;
            let map = normalize_vae(weights.tensors()?, &dir.display().to_string())?;
            return f(&map, config, &dir);
        }
        // A file has no config: its latent space must be the model's.
        let config = self.model_vae_config()?;
        let file = MappedFile::open(path)?;
        let layout = VaeLayout {
            levels: config.block_out_channels.len(),
        };
        let map =
            single_file::vae_file_tensors(file.tensors()?, layout, &path.display().to_string())?;
        f(&map, config, path)
    }

    /// Whether the model ships a first text encoder and tokenizer: SDXL's refiner (whose
    /// model_index.json has no `text_encoder`) conditions on text_encoder_2 alone.
    pub fn has_text_encoder_1(&self) -> Result<bool> {
        Ok(self.index()?.components.contains_key("text_encoder"))
    }

    /// (text_encoder, text_encoder_2), with the `lora_te1_` / `lora_te2_` parts of kohya files
    /// merged into their weights; no text_encoder for a refiner.
    pub fn text_encoders(
        &self,
        kohya: &[KohyaLoraFile],
        dtype: DType,
        device: Device,
    ) -> Result<(Option<ClipTextModel>, ClipTextModel)> {
        let te1 = self.has_text_encoder_1()?;
        let te1_cfg = match te1 {
            true => Some(ClipTextConfig::from_json(
                &self.component_config("text_encoder")?,
            )?),
            false => None,
        };
        let te2_cfg = ClipTextConfig::from_json(&self.component_config("text_encoder_2")?)?;
        let build = |name: &str,
                     component: Component,
                     map: &TensorMap<'_>,
                     origin: PathBuf,
                     cfg: &ClipTextConfig,
                     projection: bool| {
            let mut tensors = map
                .iter()
                .map(|(k, r)| Ok((k.clone(), tensor_from_raw(r, &origin, k)?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            for l in kohya {
                merge_kohya_text_encoder(&mut tensors, component, l)?;
            }
            let vb = Weights::from_map(tensors, origin, dtype, device);
            let model = if projection {
                ClipTextModel::load_with_projection(&vb, cfg)?
            } else {
                ClipTextModel::load(&vb, cfg)?
            };
            vb.ensure_all_used(|_| false)
                .map_err(|e| Error::Config(format!("{name}: {e}")))?;
            Ok::<_, Error>(model)
        };
        if !self.single_file {
            let folder = DiffusersFolder::open(&self.model)?;
            let projection = |name: &str| -> Result<bool> {
                match folder.index.components.get(name).map(|(_, c)| c.as_str()) {
                    Some("CLIPTextModelWithProjection") => Ok(true),
                    Some("CLIPTextModel") => Ok(false),
                    other => Err(Error::Config(format!(
                        "component `{name}` is a {other:?}, not a CLIP text model"
                    ))),
                }
            };
            let te1 = match &te1_cfg {
                Some(cfg) => {
                    let c1 = folder.component("text_encoder", None)?;
                    Some(build(
                        "text_encoder",
                        Component::TextEncoder,
                        &c1.tensors()?,
                        c1.dir.clone(),
                        cfg,
                        projection("text_encoder")?,
                    )?)
                }
                None => None,
            };
            let c2 = folder.component("text_encoder_2", None)?;
            let te2 = build(
                "text_encoder_2",
                Component::TextEncoder2,
                &c2.tensors()?,
                c2.dir.clone(),
                &te2_cfg,
                projection("text_encoder_2")?,
            )?;
            return Ok((te1, te2));
        }
        let file = MappedFile::open(&self.model)?;
        let split = self.split(&file)?;
        let te1 = match &te1_cfg {
            Some(cfg) => Some(build(
                "text_encoder",
                Component::TextEncoder,
                &split.text_encoder,
                self.model.clone(),
                cfg,
                false,
            )?),
            None => None,
        };
        let te2 = build(
            "text_encoder_2",
            Component::TextEncoder2,
            &split.text_encoder_2,
            self.model.clone(),
            &te2_cfg,
            true,
        )?;
        Ok((te1, te2))
    }

    /// The kohya naming indexes of the text encoders (the first one, where the model has it,
    /// then the second), from the weights' names and shapes alone: nothing is decoded.
    pub fn text_encoder_indexes(&self) -> Result<Vec<ModuleIndex>> {
        let mut parts = Vec::new();
        if self.has_text_encoder_1()? {
            parts.push(("text_encoder", Component::TextEncoder));
        }
        parts.push(("text_encoder_2", Component::TextEncoder2));
        let index = |c: Component, map: &TensorMap<'_>| {
            ModuleIndex::text_encoder(c, map.iter().map(|(k, t)| (k.as_str(), t.shape.as_slice())))
        };
        if !self.single_file {
            let folder = DiffusersFolder::open(&self.model)?;
            return parts
                .into_iter()
                .map(|(name, c)| Ok(index(c, &folder.component(name, None)?.tensors()?)))
                .collect();
        }
        let file = MappedFile::open(&self.model)?;
        let split = self.split(&file)?;
        Ok(parts
            .into_iter()
            .map(|(_, c)| match c {
                Component::TextEncoder => index(c, &split.text_encoder),
                _ => index(c, &split.text_encoder_2),
            })
            .collect())
    }

    /// The layer counts of the text encoders (text_encoder_2's alone for a refiner), from their
    /// configs.
    pub fn text_encoder_layers(&self) -> Result<Vec<usize>> {
        let mut names = vec!["text_encoder_2"];
        if self.has_text_encoder_1()? {
            names.push("text_encoder");
        }
        names
            .into_iter()
            .map(|n| {
                let cfg = ClipTextConfig::from_json(&self.component_config(n)?)?;
                Ok(cfg.encoder.num_hidden_layers)
            })
            .collect()
    }

    fn component_config(&self, name: &str) -> Result<serde_json::Value> {
        Ok(crate::formats::python_json::read_file(
            &self.config_dir.join(name).join("config.json"),
        )?)
    }

    /// (tokenizer, tokenizer_2); no tokenizer for a refiner.
    pub fn tokenizers(&self) -> Result<(Option<ClipTokenizer>, ClipTokenizer)> {
        let first = match self.has_text_encoder_1()? {
            true => Some(ClipTokenizer::from_folder(
                self.config_dir.join("tokenizer"),
            )?),
            false => None,
        };
        Ok((
            first,
            ClipTokenizer::from_folder(self.config_dir.join("tokenizer_2"))?,
        ))
    }

    /// The folder's scheduler config. A single file's `v_pred` / `ztsnr` markers (see
    /// [`single_file::Markers`]) switch on v-prediction and the zero-terminal-SNR betas, and its
    /// `edm_mean` / `edm_std` make it an EDM model with Playground v2.5's scheduler (diffusers'
    /// single-file loader's `EDMDPMSolverMultistepScheduler` config): the file knows how it was
    /// trained, and an architecture folder (the built-in base included) only describes shapes.
    pub fn scheduler(&self) -> Result<SchedulerConfig> {
        let p = self.config_dir.join("scheduler/scheduler_config.json");
        let mut cfg = if p.exists() {
            SchedulerConfig::from_file(&p)?
        } else {
            SchedulerConfig::default()
        };
        if self.single_file {
            let file = MappedFile::open(&self.model)?;
            let markers = single_file::Markers::of(&file.tensors()?);
            if markers.edm && cfg.edm.is_none() {
                cfg = SchedulerConfig::from_json_text(
                    crate::sample::edm::PLAYGROUND_SCHEDULER,
                    Path::new("(Playground v2.5's scheduler)"),
                )?;
            }
            if markers.v_prediction {
                cfg.prediction = crate::sample::schedule::Prediction::V;
            }
            cfg.zero_snr |= markers.zero_snr;
        }
        Ok(cfg)
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
        identity_of(&self.model)
    }

    /// What the latents depend on: the model's [`ModelFiles::identity`], and the VAE named with
    /// [`ModelFiles::with_vae`] if any.
    pub fn latent_identity(&self) -> String {
        match &self.vae {
            Some(vae) => format!("{}|vae|{}", self.identity(), identity_of(vae)),
            None => self.identity(),
        }
    }
}

/// `identity_of` from the canonical path, so that two spellings of one file agree: what a
/// record of the files behind an output compares.
pub fn file_identity(path: &Path) -> String {
    identity_of(&std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// Paths, sizes and modification times of a file or of every file under a folder.
fn identity_of(path: &Path) -> String {
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
    walk(path, &mut acc);
    acc.join("|")
}

/// The VAE folder a `--vae` path names: the folder itself, or a pipeline folder's `vae/`; None
/// for a file.
fn vae_folder(path: &Path) -> Option<PathBuf> {
    if !path.is_dir() {
        return None;
    }
    Some(match path.join("model_index.json").is_file() {
        true => path.join("vae"),
        false => path.to_path_buf(),
    })
}

/// Builds an f32 VAE from converted tensors; every tensor must be used.
fn load_vae(
    map: &TensorMap<'_>,
    origin: &Path,
    config: VaeConfig,
    device: Device,
) -> Result<AutoencoderKL> {
    let vb = Weights::from_raw(map, origin.to_path_buf(), DType::F32, device)?;
    let vae = AutoencoderKL::load(&vb, config)?;
    vb.ensure_all_used(|_| false)?;
    Ok(vae)
}
