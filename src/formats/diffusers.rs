//! diffusers pipeline folders (SDXL.md 5.1): `model_index.json`, one folder per component with
//! its `config.json` and weights (single file or shards, optionally the `fp16` variant).
//!
//! The two spellings that differ between library versions are unified here, once: CLIP text
//! encoder keys with or without `text_model.` (transformers >= 5 drops it for CLIPTextModel,
//! keeps it for CLIPTextModelWithProjection) and the pre-0.17 VAE attention names. Model code
//! then sees a single canonical key tree whatever wrote the files.

use super::error::{Error, Result};
use super::raw::{TensorMap, WeightFiles};
use super::single_file::{conv1x1_to_linear, VaeLayout};
use super::unet_layout::UnetLayout;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Canonical CLIP text-encoder key: `text_model.`-prefixed (the spelling of every released
/// SDXL file), `text_projection.*` at the top level, `position_ids` buffers dropped (`None`).
pub fn canonical_text_encoder_key(key: &str) -> Option<String> {
    if key.ends_with("position_ids") {
        None
    } else if key.starts_with("text_model.") || key.starts_with("text_projection.") {
        Some(key.to_string())
    } else {
        Some(format!("text_model.{key}"))
    }
}

/// Applies [`canonical_text_encoder_key`] to a whole map.
pub fn normalize_text_encoder<'a>(map: TensorMap<'a>, context: &str) -> Result<TensorMap<'a>> {
    let mut out = TensorMap::new();
    for (k, t) in map {
        let Some(k) = canonical_text_encoder_key(&k) else {
            continue;
        };
        if out.contains_key(&k) {
            return Err(Error::DuplicateKey {
                context: context.into(),
                key: k,
            });
        }
        out.insert(k, t);
    }
    Ok(out)
}

/// diffusers < 0.17 VAEs name the mid-block attention `query/key/value/proj_attn`; some store
/// its projections as 1x1 convs. Both become today's `to_q/to_k/to_v/to_out.0` Linear weights.
pub fn normalize_vae<'a>(map: TensorMap<'a>, context: &str) -> Result<TensorMap<'a>> {
    const OLD: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    let mut out = TensorMap::new();
    for (k, t) in map {
        let mut name = k.clone();
        let mut t = t;
        if k.contains(".mid_block.attentions.") {
            for (old, new) in OLD {
                name = name.replace(old, new);
            }
            let proj = [".to_q.", ".to_k.", ".to_v.", ".to_out.0."]
                .iter()
                .any(|p| name.contains(p));
            if proj && name.ends_with(".weight") {
                t = conv1x1_to_linear(t, context, &k)?;
            }
        }
        if out.contains_key(&name) {
            return Err(Error::DuplicateKey {
                context: context.into(),
                key: name,
            });
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// `model_index.json`: which components exist and which class each is.
#[derive(Clone, Debug)]
pub struct ModelIndex {
    pub class_name: String,
    /// component name -> (library, class), e.g. `unet` -> (`diffusers`, `UNet2DConditionModel`).
    /// `[null, null]` entries (optional components not shipped) are left out.
    pub components: BTreeMap<String, (String, String)>,
    /// Remaining non-underscore entries, e.g. `force_zeros_for_empty_prompt`.
    pub options: BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = crate::formats::python_json::read_file::<serde_json::Value>(path)?;
        let serde_json::Value::Object(obj) = json else {
            return Err(Error::file(path, "expected a JSON object"));
        };
        let mut class_name = None;
        let mut components = BTreeMap::new();
        let mut options = BTreeMap::new();
        for (k, v) in obj {
            if k == "_class_name" {
                class_name = v.as_str().map(str::to_string);
                continue;
            }
            if k.starts_with('_') {
                continue;
            }
            match v.as_array().map(Vec::as_slice) {
                Some([lib, class]) if lib.is_string() && class.is_string() => {
                    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                    components.insert(k, (s(lib), s(class)));
                }
                Some([a, b]) if a.is_null() && b.is_null() => {}
                _ => {
                    options.insert(k, v);
                }
            }
        }
        let class_name = class_name.ok_or_else(|| Error::file(path, "missing `_class_name`"))?;
        Ok(ModelIndex {
            class_name,
            components,
            options,
        })
    }
}

/// An opened pipeline folder.
#[derive(Clone, Debug)]
pub struct DiffusersFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
}

/// One component with its config and (memory-mapped) weights.
pub struct ComponentDir {
    pub name: String,
    /// Class from model_index.json, e.g. `CLIPTextModelWithProjection`.
    pub class: String,
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub weights: WeightFiles,
}

impl ComponentDir {
    /// All tensors with the canonical key spelling for this class.
    pub fn tensors(&self) -> Result<TensorMap<'_>> {
        let map = self.weights.tensors()?;
        let context = self.dir.display().to_string();
        match self.class.as_str() {
            "CLIPTextModel" | "CLIPTextModelWithProjection" => {
                normalize_text_encoder(map, &context)
            }
            "AutoencoderKL" => normalize_vae(map, &context),
            _ => Ok(map),
        }
    }
}

impl DiffusersFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let index = ModelIndex::from_file(root.join("model_index.json"))?;
        Ok(DiffusersFolder { root, index })
    }

    fn class_of(&self, name: &str) -> Result<&str> {
        self.index
            .components
            .get(name)
            .map(|(_, class)| class.as_str())
            .ok_or_else(|| {
                Error::file(
                    self.root.join("model_index.json"),
                    format!(
                        "no component `{name}` (have: {:?})",
                        self.index.components.keys().collect::<Vec<_>>()
                    ),
                )
            })
    }

    /// The component's config (`config.json`, or `scheduler_config.json` for schedulers).
    pub fn config(&self, name: &str) -> Result<serde_json::Value> {
        self.class_of(name)?;
        let dir = self.root.join(name);
        let scheduler = dir.join("scheduler_config.json");
        crate::formats::python_json::read_file::<serde_json::Value>(&if scheduler.exists() {
            scheduler
        } else {
            dir.join("config.json")
        })
    }

    /// Opens a component with weights; `variant` is e.g. `Some("fp16")`.
    pub fn component(&self, name: &str, variant: Option<&str>) -> Result<ComponentDir> {
        let class = self.class_of(name)?.to_string();
        let dir = self.root.join(name);
        let config =
            crate::formats::python_json::read_file::<serde_json::Value>(&dir.join("config.json"))?;
        let weights = WeightFiles::open(find_weights(&dir, variant)?)?;
        Ok(ComponentDir {
            name: name.into(),
            class,
            dir,
            config,
            weights,
        })
    }

    pub fn unet_layout(&self) -> Result<UnetLayout> {
        UnetLayout::from_config_file(self.root.join("unet").join("config.json"))
    }

    pub fn vae_layout(&self) -> Result<VaeLayout> {
        VaeLayout::from_config_file(self.root.join("vae").join("config.json"))
    }
}

/// The weights file of a component folder. diffusers names its models
/// `diffusion_pytorch_model.*`, transformers `model.*`; variants insert `.fp16` before the
/// last extension, which for sharded weights gives `*.safetensors.index.fp16.json` (the
/// `*.fp16.safetensors.index.json` spelling some converters write is accepted as well).
pub fn find_weights(dir: &Path, variant: Option<&str>) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for stem in ["diffusion_pytorch_model", "model"] {
        let names = match variant {
            Some(v) => vec![
                format!("{stem}.{v}.safetensors"),
                format!("{stem}.safetensors.index.{v}.json"),
                format!("{stem}.{v}.safetensors.index.json"),
            ],
            None => vec![
                format!("{stem}.safetensors"),
                format!("{stem}.safetensors.index.json"),
            ],
        };
        for n in names {
            let p = dir.join(&n);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(n);
        }
    }
    let pickles = ["diffusion_pytorch_model.bin", "pytorch_model.bin"]
        .iter()
        .any(|n| dir.join(n).is_file());
    let hint = if pickles {
        "; only pickled .bin weights exist, which are not supported (convert them to safetensors)"
    } else {
        ""
    };
    Err(Error::file(
        dir,
        format!("no weights found (looked for {}){hint}", tried.join(", ")),
    ))
}
