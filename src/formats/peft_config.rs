//! PEFT's scaling of a LoRA file as diffusers saves it: the `lora_adapter_metadata` JSON in the
//! safetensors header, with each component's LoraConfig under `unet.`, `text_encoder.` and
//! `text_encoder_2.` (plain PEFT writes them unprefixed).

use super::error::{Error, Result};
use super::kohya::Component;
use std::collections::HashMap;

/// PEFT's scale settings per component, from diffusers' `lora_adapter_metadata` (keys prefixed
/// `unet.`, `text_encoder.`, `text_encoder_2.`; plain PEFT writes them unprefixed).
#[derive(Default)]
pub(super) struct PeftScales {
    by_component: HashMap<Option<Component>, PeftConfig>,
}

#[derive(Clone, Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftScales {
    pub(super) fn from_metadata(
        meta: Option<&HashMap<String, String>>,
        context: &str,
    ) -> Result<Self> {
        let Some(raw) = meta.and_then(|m| m.get("lora_adapter_metadata")) else {
            return Ok(Self::default());
        };
        let bad = |msg: String| Error::Lora {
            context: context.into(),
            module: "lora_adapter_metadata".into(),
            msg,
        };
        let json: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let mut out = Self::default();
        for (prefix, c) in [
            ("", None),
            ("unet.", Some(Component::Unet)),
            ("text_encoder.", Some(Component::TextEncoder)),
            ("text_encoder_2.", Some(Component::TextEncoder2)),
        ] {
            let get = |k: &str| obj.get(&format!("{prefix}{k}"));
            let mut cfg = PeftConfig {
                lora_alpha: get("lora_alpha").and_then(|v| v.as_f64()),
                use_rslora: get("use_rslora").and_then(|v| v.as_bool()) == Some(true),
                ..PeftConfig::default()
            };
            if let Some(p) = get("alpha_pattern").and_then(|v| v.as_object()) {
                for (k, v) in p {
                    let a = v
                        .as_f64()
                        .ok_or_else(|| bad(format!("alpha_pattern `{k}` is not a number")))?;
                    cfg.alpha_pattern.push((k.clone(), a));
                }
            }
            if cfg.lora_alpha.is_some() || !cfg.alpha_pattern.is_empty() {
                out.by_component.insert(c, cfg);
            }
        }
        Ok(out)
    }

    /// PEFT's scale for a module of rank `r`: `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA),
    /// where an `alpha_pattern` entry naming the module (whole dotted path or a dotted tail of
    /// it; PEFT's patterns are regular expressions, and the literal names diffusers writes are
    /// what this matches) overrides `lora_alpha`. `None` without settings for the component.
    pub(super) fn scale(&self, c: Component, module: &str, r: usize) -> Option<f64> {
        let cfg = self
            .by_component
            .get(&Some(c))
            .or_else(|| self.by_component.get(&None))?;
        let pattern = cfg
            .alpha_pattern
            .iter()
            .filter(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, a)| *a);
        let alpha = pattern.or(cfg.lora_alpha)?;
        let denom = if cfg.use_rslora {
            (r as f64).sqrt()
        } else {
            r as f64
        };
        Some(alpha / denom)
    }
}
