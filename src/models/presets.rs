//! The built-in SDXL base and refiner configurations: what a single-file checkpoint (which
//! records no architecture) is read with when no `--config DIR` is given. Materialised as
//! diffusers-style folders without weights, so the single-file path and the folder path share
//! every loader.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// CLIP ViT-L/14 text tower (SDXL.md 2.1). The legacy ids (eos 2) select argmax pooling, which
/// equals first-EOS pooling for CLIP BPE ids.
const TEXT_ENCODER: &str = r#"{
  "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
  "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
  "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "projection_dim": 768,
  "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1
}"#;

/// OpenCLIP ViT-bigG/14 text tower with its projection (SDXL.md 2.1).
const TEXT_ENCODER_2: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
  "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
  "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "projection_dim": 1280,
  "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1
}"#;

/// The refiner (`sd_xl_refiner_1.0.safetensors`): no first text encoder or tokenizer, five time
/// ids with aesthetic scores, and no zeroed negative for an empty prompt (diffusers'
/// `StableDiffusionXLImg2ImgPipeline` as the refiner's folder declares it).
const REFINER_MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLImg2ImgPipeline",
  "force_zeros_for_empty_prompt": false,
  "requires_aesthetics_score": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": [null, null],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": [null, null],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// Base and refiner share it: sgm's refiner config has the base's `LegacyDDPMDiscretization`
/// (1000 scaled-linear steps) and `EpsScaling`.
const SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
  "interpolation_type": "linear", "timestep_spacing": "leading", "steps_offset": 1,
  "use_karras_sigmas": false, "set_alpha_to_one": false, "clip_sample": false
}"#;

// The full-size UNet and VAE configs and the real CLIP BPE tokenizer files are the vendored
// fixtures' own (tests/fixtures is copied unchanged from the reference generator): one source.
const UNET: &str = include_str!("../../tests/fixtures/tiny/sdxl_base_configs/unet/config.json");
const VAE: &str = include_str!("../../tests/fixtures/tiny/sdxl_base_configs/vae/config.json");
/// Derived by diffusers from sgm's `sd_xl_refiner.yaml` (tests/fixtures/extra/gen_refiner_single_file.py).
const REFINER_UNET: &str =
    include_str!("../../tests/fixtures/extra/sdxl_refiner_configs/unet/config.json");
const TOKENIZER_JSON: &str =
    include_str!("../../tests/fixtures/tiny/sdxl/tokenizer/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../tests/fixtures/tiny/sdxl/tokenizer/tokenizer_config.json");
const TOKENIZER_2_JSON: &str =
    include_str!("../../tests/fixtures/tiny/sdxl/tokenizer_2/tokenizer.json");
const TOKENIZER_2_CONFIG: &str =
    include_str!("../../tests/fixtures/tiny/sdxl/tokenizer_2/tokenizer_config.json");

/// A built-in architecture, for single files without `--config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    SdxlBase,
    /// Same VAE, text_encoder_2, tokenizer_2 and scheduler as the base (sgm's refiner config
    /// shares the base's first stage, OpenCLIP bigG tower and discretization).
    SdxlRefiner,
}

impl Preset {
    /// (relative path, content) of every file of the config folder.
    pub fn files(self) -> Vec<(&'static str, &'static str)> {
        let shared = [
            ("text_encoder_2/config.json", TEXT_ENCODER_2),
            ("scheduler/scheduler_config.json", SCHEDULER),
            ("vae/config.json", VAE),
            ("tokenizer_2/tokenizer.json", TOKENIZER_2_JSON),
            ("tokenizer_2/tokenizer_config.json", TOKENIZER_2_CONFIG),
        ];
        let own: &[(&str, &str)] = match self {
            Preset::SdxlBase => &[
                ("model_index.json", MODEL_INDEX),
                ("unet/config.json", UNET),
                ("text_encoder/config.json", TEXT_ENCODER),
                ("tokenizer/tokenizer.json", TOKENIZER_JSON),
                ("tokenizer/tokenizer_config.json", TOKENIZER_CONFIG),
            ],
            Preset::SdxlRefiner => &[
                ("model_index.json", REFINER_MODEL_INDEX),
                ("unet/config.json", REFINER_UNET),
            ],
        };
        own.iter().copied().chain(shared).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::SdxlBase => "the built-in SDXL base 1.0",
            Preset::SdxlRefiner => "the built-in SDXL refiner 1.0",
        }
    }

    fn folder_name(self) -> &'static str {
        match self {
            Preset::SdxlBase => "sdxl-base-1.0-config",
            Preset::SdxlRefiner => "sdxl-refiner-1.0-config",
        }
    }

    /// Write the config folder under `root` (idempotent; files written atomically) and return
    /// its path.
    pub fn materialize(self, root: &Path) -> Result<PathBuf> {
        let dir = root.join(self.folder_name());
        for (rel, content) in self.files() {
            let path = dir.join(rel);
            if std::fs::read_to_string(&path).is_ok_and(|c| c == content) {
                continue;
            }
            let parent = path
                .parent()
                .ok_or_else(|| Error::file(&path, "no parent folder"))?;
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            crate::tensor::write_atomic(&path, content.as_bytes())?;
        }
        Ok(dir)
    }
}

/// The per-user cache folder (`$XDG_CACHE_HOME/kstyle` or `~/.cache/kstyle`, else the temp dir).
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("kstyle");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("kstyle"),
        None => std::env::temp_dir().join("kstyle"),
    }
}
