//! The K-StyleLoRA adapter file (KSTYLE.md "Adapter file"): one safetensors file whose LoRA
//! tensors use the kohya layout other tools load (`lora_unet_<sgm path>.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; plain LoRA on the text encoders, when trained, as
//! `lora_te1_text_model_encoder_layers_N_self_attn_q_proj` and `lora_te2_…`), with the gating
//! MLPs, the cultural projection and the concept embeddings under their own `kstyle.` prefix, and
//! every setting in the metadata.

use crate::formats::kohya::{Component, ModuleIndex};
use crate::nn::dora::Dora;
use crate::nn::lora::{Gates, LoraAdapter, LoraConfig, Mlp};
use crate::nn::lycoris::LycorisAlgo;
use crate::nn::Linear;
use crate::tensor::{save_safetensors, SafeTensorsFile};
use crate::train::cultural::CulturalLoss;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The four methods of the paper's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Standard LoRA.
    Lora,
    /// LoRA + cultural loss.
    LoraCsl,
    /// CLIP gating only.
    Gating,
    /// K-StyleLoRA: gating + cultural loss.
    Kstyle,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::LoraCsl => "lora-csl",
            Method::Gating => "gating",
            Method::Kstyle => "kstyle",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        [
            Method::Lora,
            Method::LoraCsl,
            Method::Gating,
            Method::Kstyle,
        ]
        .into_iter()
        .find(|m| m.name() == s)
    }

    pub fn gated(self) -> bool {
        matches!(self, Method::Gating | Method::Kstyle)
    }

    pub fn cultural(self) -> bool {
        matches!(self, Method::LoraCsl | Method::Kstyle)
    }
}

/// Everything an adapter file holds.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub method: Method,
    pub config: LoraConfig,
    pub concepts: Vec<String>,
    /// Unit CLIP text embeddings of the concepts (K, E); present for gated or cultural methods.
    pub concept_embeds: Option<Tensor>,
    /// (module path of the wrapped linear, its adapter), in a fixed order: the UNet's diffusers
    /// path (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), or a text encoder's
    /// under its component name (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`,
    /// `text_encoder_2.…`; see [`text_encoder_part`]).
    pub modules: Vec<(String, LoraAdapter)>,
    pub cultural: Option<CulturalLoss>,
    /// Training settings recorded for provenance (`kstyle.train.*` in the metadata).
    pub settings: BTreeMap<String, String>,
}

/// The text encoder an adapter module path belongs to and the path inside it (`text_model.…`);
/// None for a UNet module.
pub fn text_encoder_part(path: &str) -> Option<(Component, &str)> {
    if let Some(rest) = path.strip_prefix("text_encoder_2.") {
        return Some((Component::TextEncoder2, rest));
    }
    path.strip_prefix("text_encoder.")
        .map(|rest| (Component::TextEncoder, rest))
}

/// The linears of a CLIP text layer a kstyle adapter may hold LoRA on, as (kohya spelling, path
/// under the layer): kohya's `CLIPAttention` and `CLIPMLP` targets.
const TEXT_LINEARS: [(&str, &str); 6] = [
    ("self_attn_q_proj", "self_attn.q_proj"),
    ("self_attn_k_proj", "self_attn.k_proj"),
    ("self_attn_v_proj", "self_attn.v_proj"),
    ("self_attn_out_proj", "self_attn.out_proj"),
    ("mlp_fc1", "mlp.fc1"),
    ("mlp_fc2", "mlp.fc2"),
];

/// The kohya module name an adapter module is written under (`lora_unet_…` through the UNet's
/// `index`, `lora_te1_…` / `lora_te2_…` for the text encoders, whose kohya spelling is the path
/// with `.` as `_`).
pub fn kohya_module_name(index: &ModuleIndex, path: &str) -> Result<String> {
    match text_encoder_part(path) {
        Some((c, rest)) => Ok(format!("{}_{}", c.kohya_prefix(), rest.replace('.', "_"))),
        None => Ok(index.kohya_name(path)?),
    }
}

/// The adapter module path for a text encoder's kohya name (the part after `lora_te1_` /
/// `lora_te2_`): only the linears of [`TEXT_LINEARS`] are read.
fn text_module_path(component: Component, spelled: &str) -> Option<String> {
    let rest = spelled.strip_prefix("text_model_encoder_layers_")?;
    let (layer, linear) = rest.split_once('_')?;
    let layer: usize = layer.parse().ok()?;
    let (_, dotted) = TEXT_LINEARS.iter().find(|(k, _)| *k == linear)?;
    Some(format!(
        "{}.text_model.encoder.layers.{layer}.{dotted}",
        component.diffusers_name()
    ))
}

const GATE_PREFIX: &str = "kstyle.gate";
const CULTURAL_PREFIX: &str = "kstyle.cultural";
const CONCEPTS_KEY: &str = "kstyle.concepts";

impl Adapter {
    /// Every trainable tensor with a stable name (`<module>.lora_A`, ..., `cultural.proj.weight`),
    /// the naming of the training fixtures and of optimizer checkpoints.
    pub fn trainables(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (path, a) in &self.modules {
            v.extend(
                a.named()
                    .into_iter()
                    .map(|(n, t)| (format!("{path}.{n}"), t)),
            );
        }
        if let Some(c) = &self.cultural {
            v.extend(c.parameters());
        }
        v
    }

    /// The file's tensors under their on-disk names.
    pub fn file_tensors(&self, index: &ModuleIndex) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (path, a) in &self.modules {
            let k = kohya_module_name(index, path)?;
            if a.lycoris.is_some() {
                // LyCORIS' names, which ComfyUI, A1111 and kstyle's own merge read.
                out.extend(a.named().into_iter().map(|(n, t)| (format!("{k}.{n}"), t)));
            } else {
                out.push((format!("{k}.lora_down.weight"), a.a.clone()));
                out.push((format!("{k}.lora_up.weight"), a.b.clone()));
                if let Some(d) = &a.dora {
                    out.push((format!("{k}.dora_scale"), d.magnitude.clone()));
                }
            }
            out.push((
                format!("{k}.alpha"),
                Tensor::scalar(a.config.alpha, DType::F32, a.a.device())?,
            ));
            if let Some(g) = &a.gates {
                for (n, t) in g.named() {
                    out.push((format!("{GATE_PREFIX}.{k}.{n}"), t));
                }
            }
        }
        if let Some(c) = &self.cultural {
            for (n, t) in c.named() {
                out.push((format!("{CULTURAL_PREFIX}.{n}"), t));
            }
        }
        if let Some(t) = &self.concept_embeds {
            out.push((CONCEPTS_KEY.to_string(), t.clone()));
        }
        Ok(out)
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        let c = &self.config;
        let mut m = HashMap::from([
            ("kstyle.format".to_string(), "1".to_string()),
            ("kstyle.method".to_string(), self.method.name().to_string()),
            ("kstyle.rank".to_string(), c.rank.to_string()),
            ("kstyle.alpha".to_string(), c.alpha.to_string()),
            ("kstyle.guidance".to_string(), c.guidance.to_string()),
            ("kstyle.gate_hidden".to_string(), c.gate_hidden.to_string()),
            ("kstyle.mod_hidden".to_string(), c.mod_hidden.to_string()),
            (
                "kstyle.concepts".to_string(),
                serde_json::to_string(&self.concepts).unwrap_or_default(),
            ),
            // What kohya-aware tools read to label the file.
            ("ss_network_module".to_string(), "networks.lora".to_string()),
            ("ss_network_dim".to_string(), c.rank.to_string()),
            ("ss_network_alpha".to_string(), c.alpha.to_string()),
            (
                "ss_base_model_version".to_string(),
                "sdxl_base_v1-0".to_string(),
            ),
        ]);
        if let Some(algo) = self.lycoris_algo() {
            m.insert("kstyle.algo".into(), algo.name().into());
        }
        if self.is_dora() {
            m.insert("kstyle.dora".into(), "true".into());
        }
        m.extend(self.network_labels());
        if let Some(cl) = &self.cultural {
            m.insert("kstyle.cultural_pool".into(), cl.pool.to_string());
            m.insert("kstyle.cultural_tau".into(), cl.tau.to_string());
        }
        for (k, v) in &self.settings {
            m.insert(format!("kstyle.train.{k}"), v.clone());
        }
        m
    }

    /// The LyCORIS algorithm of the adapter's modules (every module is of it); None for LoRA.
    pub fn lycoris_algo(&self) -> Option<LycorisAlgo> {
        self.modules.iter().find_map(|(_, a)| a.lycoris_algo())
    }

    /// Whether the adapter's modules are DoRA (LyCORIS' `dora_wd`).
    pub fn is_dora(&self) -> bool {
        self.modules.iter().any(|(_, a)| a.dora.is_some())
    }

    /// kohya's `ss_network_module` / `ss_network_args` for LyCORIS' kinds (LoHa, LoKr, DoRA),
    /// which label the file for the tools that read them; none for kohya's own LoRA.
    pub fn network_labels(&self) -> Vec<(String, String)> {
        let args = match (self.lycoris_algo(), self.is_dora()) {
            (Some(algo), false) => format!(r#"{{"algo": "{}"}}"#, algo.name()),
            (Some(algo), true) => format!(r#"{{"algo": "{}", "dora_wd": "True"}}"#, algo.name()),
            (None, true) => r#"{"algo": "lora", "dora_wd": "True"}"#.to_string(),
            (None, false) => return Vec::new(),
        };
        vec![
            ("ss_network_module".into(), "lycoris.kohya".into()),
            ("ss_network_args".into(), args),
        ]
    }

    /// Write atomically (temporary file + rename).
    pub fn save(&self, path: &Path, index: &ModuleIndex) -> Result<()> {
        save_safetensors(path, &self.file_tensors(index)?, Some(self.metadata()))
    }

    /// [`Adapter::save`] with every tensor but the alphas stored in `dtype` (f16 or bf16 halve
    /// the file). The alphas stay f32: they set each module's scale, which must not move.
    pub fn save_in(&self, path: &Path, index: &ModuleIndex, dtype: DType) -> Result<()> {
        let tensors = self
            .file_tensors(index)?
            .into_iter()
            .map(|(name, t)| match name.ends_with(".alpha") {
                true => Ok((name, t)),
                false => Ok((name, t.to_dtype(dtype)?)),
            })
            .collect::<Result<Vec<_>>>()?;
        save_safetensors(path, &tensors, Some(self.metadata()))
    }

    /// Whether a safetensors file is a kstyle adapter (as opposed to a plain kohya LoRA).
    pub fn is_adapter_file(path: &Path) -> Result<bool> {
        Ok(SafeTensorsFile::open(path)?
            .metadata()
            .contains_key("kstyle.method"))
    }

    /// Read an adapter written by [`Adapter::save`]; tensors become trainable variables (so a
    /// checkpoint can continue training) in f32 on `device`.
    pub fn load(path: &Path, index: &ModuleIndex, device: Device) -> Result<Adapter> {
        let f = SafeTensorsFile::open(path)?;
        let meta = f.metadata();
        let get = |k: &str| {
            meta.get(k).ok_or_else(|| {
                Error::file(
                    path,
                    format!("metadata `{k}` missing: not a kstyle adapter"),
                )
            })
        };
        let num = |k: &str| -> Result<f64> {
            get(k)?
                .parse::<f64>()
                .map_err(|_| Error::file(path, format!("metadata `{k}` is not a number")))
        };
        let method = Method::parse(get("kstyle.method")?)
            .ok_or_else(|| Error::file(path, "unknown kstyle.method"))?;
        let config = LoraConfig {
            rank: num("kstyle.rank")? as usize,
            alpha: num("kstyle.alpha")?,
            guidance: num("kstyle.guidance")?,
            gate_hidden: num("kstyle.gate_hidden")? as usize,
            mod_hidden: num("kstyle.mod_hidden")? as usize,
        };
        let concepts: Vec<String> =
            serde_json::from_str(get("kstyle.concepts")?).map_err(|e| Error::Json {
                path: path.into(),
                msg: format!("kstyle.concepts: {e}"),
            })?;
        let load =
            |k: &str| -> Result<Tensor> { f.tensor(k)?.to_dtype(DType::F32)?.to_device(device) };
        let var = |k: &str| -> Result<Tensor> { load(k)?.var() };
        // DoRA's magnitude, where the module has one (LoRA, LoHa or LoKr).
        let dora_of = |key: &str| -> Result<Option<Dora>> {
            match f.contains(key) {
                true => Ok(Some(Dora {
                    magnitude: var(key)?,
                    strength: 1.0,
                })),
                false => Ok(None),
            }
        };
        let concept_embeds = if f.contains(CONCEPTS_KEY) {
            Some(load(CONCEPTS_KEY)?)
        } else {
            None
        };
        if method.gated() && concept_embeds.is_none() {
            return Err(Error::MissingKey {
                path: path.into(),
                key: CONCEPTS_KEY.into(),
            });
        }
        let mut modules = Vec::new();
        let mut names: Vec<&str> = f
            .names()
            // A checkpoint's optimizer state (`kstyle.optim.*`) reuses the factors' names.
            .filter(|n| !n.starts_with("kstyle."))
            .filter_map(|n| {
                n.strip_suffix(".lora_down.weight")
                    .or_else(|| n.strip_suffix(".hada_w1_a"))
                    .or_else(|| n.strip_suffix(".lokr_w1"))
            })
            .collect();
        names.sort();
        for k in names {
            let text = [Component::TextEncoder, Component::TextEncoder2]
                .into_iter()
                .find_map(|c| {
                    k.strip_prefix(c.kohya_prefix())
                        .and_then(|r| r.strip_prefix('_'))
                        .map(|r| (c, r))
                });
            let module = match (text, k.strip_prefix("lora_unet_")) {
                (Some((c, spelled)), _) => text_module_path(c, spelled).ok_or_else(|| {
                    Error::file(
                        path,
                        format!(
                            "`{k}`: adapters hold text-encoder LoRA on the layers' \
                             self_attn.{{q,k,v,out}}_proj and mlp.fc1 / fc2 only"
                        ),
                    )
                })?,
                (None, Some(spelled)) => index
                    .resolve(spelled)
                    .ok_or_else(|| {
                        Error::file(path, format!("`{k}` names no module of this UNet"))
                    })?
                    .to_string(),
                (None, None) => {
                    return Err(Error::file(
                        path,
                        format!("`{k}`: neither a UNet (lora_unet_) nor a text-encoder (lora_te1_, lora_te2_) module"),
                    ))
                }
            };
            let text_module = text.is_some();
            let alpha_key = format!("{k}.alpha");
            let lycoris = [LycorisAlgo::Loha, LycorisAlgo::Lokr]
                .into_iter()
                .find(|algo| f.contains(&format!("{k}.{}", algo.names(false)[0])));
            if let Some(algo) = lycoris {
                let low_rank = f.contains(&format!("{k}.lokr_w2_a"));
                let t = algo
                    .names(low_rank)
                    .iter()
                    .map(|n| var(&format!("{k}.{n}")))
                    .collect::<Result<Vec<_>>>()?;
                // Read without indexing: a malformed file fails the fit check below instead.
                let rows = |t: &Tensor| t.dims().first().copied().unwrap_or(0);
                let cols = |t: &Tensor| t.dims().iter().skip(1).product::<usize>();
                let shape = match (text_module, algo) {
                    (false, _) => index
                        .weight_shape(&module)
                        .ok_or_else(|| {
                            Error::file(path, format!("`{k}`: no weight shape for {module}"))
                        })?
                        .to_vec(),
                    (true, LycorisAlgo::Loha) => vec![rows(&t[0]), cols(&t[1])],
                    (true, LycorisAlgo::Lokr) => {
                        let w2 = t.last().expect("LoKr's w2");
                        vec![rows(&t[0]) * rows(&t[1]), cols(&t[0]) * cols(w2)]
                    }
                };
                // LoKr with both factors whole has no rank of its own (it runs at scale 1).
                let rank = match (algo, low_rank) {
                    (LycorisAlgo::Loha, _) => rows(&t[1]),
                    (LycorisAlgo::Lokr, true) => cols(&t[1]),
                    (LycorisAlgo::Lokr, false) => config.rank,
                };
                let alpha = match f.contains(&alpha_key) {
                    true => load(&alpha_key)?.to_scalar()?,
                    false => rank as f64,
                };
                let config = LoraConfig {
                    rank,
                    alpha,
                    ..config
                };
                let mut adapter = LoraAdapter::from_lycoris(algo, config, &shape, t)
                    .map_err(|e| Error::file(path, format!("`{k}`: {e}")))?;
                adapter.dora = dora_of(&format!("{k}.dora_scale"))?;
                if !adapter.fits(&shape) {
                    return Err(Error::file(
                        path,
                        format!("`{k}.dora_scale` does not fit the weight {shape:?}"),
                    ));
                }
                modules.push((module, adapter));
                continue;
            }
            let a = var(&format!("{k}.lora_down.weight"))?;
            let b = var(&format!("{k}.lora_up.weight"))?;
            let alpha = if f.contains(&format!("{k}.alpha")) {
                load(&format!("{k}.alpha"))?.to_scalar()?
            } else {
                config.rank as f64
            };
            // Text-encoder modules are plain LoRA in every method (the gates read UNet
            // features), and so is kohya's conv group (the gates pool the token sequence of a
            // transformer's linear).
            let gates = if method.gated() && !text_module && module.contains(".attentions.") {
                let g = |n: &str| format!("{GATE_PREFIX}.{k}.{n}");
                let lin = |n: &str| -> Result<Linear> {
                    Ok(Linear {
                        weight: var(&g(&format!("{n}.weight")))?,
                        bias: Some(var(&g(&format!("{n}.bias")))?),
                    })
                };
                let mlp = |n: &str| -> Result<Mlp> {
                    Ok(Mlp {
                        fc0: lin(&format!("{n}.0"))?,
                        fc2: lin(&format!("{n}.2"))?,
                    })
                };
                Some(Gates {
                    attn_mlp: mlp("attn_mlp")?,
                    proj: lin("proj")?,
                    down_mlp: mlp("down_mlp")?,
                    up_mlp: mlp("up_mlp")?,
                    gate_mlp: mlp("gate_mlp")?,
                })
            } else {
                None
            };
            let cfg = LoraConfig {
                rank: a.dims()[0],
                alpha,
                ..config
            };
            let dora = dora_of(&format!("{k}.dora_scale"))?;
            let concepts = gates.as_ref().and(concept_embeds.clone());
            modules.push((
                module,
                LoraAdapter {
                    a,
                    b,
                    config: cfg,
                    gates,
                    concepts,
                    recorder: None,
                    dropout: None,
                    lycoris: None,
                    dora,
                },
            ));
        }
        if modules.is_empty() {
            return Err(Error::file(path, "adapter holds no LoRA modules"));
        }
        let cultural = if method.cultural() {
            let proj = Linear {
                weight: var(&format!("{CULTURAL_PREFIX}.proj.weight"))?,
                bias: Some(var(&format!("{CULTURAL_PREFIX}.proj.bias"))?),
            };
            let embeds = concept_embeds.clone().ok_or_else(|| Error::MissingKey {
                path: path.into(),
                key: CONCEPTS_KEY.into(),
            })?;
            Some(CulturalLoss {
                proj,
                pool: num("kstyle.cultural_pool")? as usize,
                concepts: embeds,
                tau: num("kstyle.cultural_tau")?,
            })
        } else {
            None
        };
        let settings = meta
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("kstyle.train.")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        Ok(Adapter {
            method,
            config,
            concepts,
            concept_embeds,
            modules,
            cultural,
            settings,
        })
    }
}
