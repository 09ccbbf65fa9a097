//! Exporting an adapter for other tools: kohya (`lora_unet_*.lora_down/up.weight` + `.alpha`,
//! and `lora_te1_*` / `lora_te2_*` for trained text encoders: what ComfyUI and A1111 load) or
//! diffusers/PEFT (`unet.<module>.lora_A/B.weight`, `text_encoder.<module>…`,
//! `text_encoder_2.<module>…`, the scale folded into B since that layout carries no alpha; DoRA's
//! magnitudes as PEFT's `lora_magnitude_vector.weight`). Gated adapters export with their gates
//! baked in: B's columns scaled by the mean effective gate over a calibration set.

use super::adapter::{kohya_module_name, text_encoder_part, Adapter};
use super::kohya::ModuleIndex;
use crate::tensor::save_safetensors;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Kohya,
    Diffusers,
}

/// B with column j multiplied by `scale[j]`.
fn scale_columns(b: &Tensor, scale: &[f64]) -> Result<Tensor> {
    let (_, r) = b.dims2()?;
    if scale.len() != r {
        return Err(Error::msg(format!(
            "baked gate has {} values for rank {r}",
            scale.len()
        )));
    }
    let s = Tensor::from_vec(scale.to_vec(), (1, r), Device::Cpu)?
        .to_dtype(b.dtype())?
        .to_device(b.device())?;
    b.mul(&s)
}

/// A `dora_scale` (out, 1) or (out, 1, 1, 1) in PEFT's layout: (out,) for a linear, (1, out, 1, 1)
/// for a convolution (PEFT keeps the convolution's norms transposed). With alpha folded into
/// lora_B (PEFT scaling 1) the norm PEFT takes, of W + B A, is the one DoRA trained with. The
/// key ends `lora_magnitude_vector.weight`, the module's parameter: PEFT loads it as it loads its
/// own `lora_magnitude_vector`, and diffusers 0.42.1 with transformers 5.24 loads only this
/// spelling into the text encoders (the other is dropped there, leaving fresh magnitudes).
fn peft_magnitude(m: &Tensor) -> Result<Tensor> {
    let out = m.dims()[0];
    match m.rank() {
        4 => m.reshape((1, out, 1, 1)),
        _ => m.reshape(out),
    }
}

/// Write `adapter` in `format`. `baked` maps module paths to the mean `a * w_down * w_up` per rank
/// (required for gated adapters); `dtype` is the stored precision (kohya files are usually f16).
pub fn export_adapter(
    adapter: &Adapter,
    index: &ModuleIndex,
    format: ExportFormat,
    baked: Option<&HashMap<String, Vec<f64>>>,
    dtype: DType,
    path: &Path,
) -> Result<()> {
    if adapter.method.gated() && baked.is_none() {
        return Err(Error::Config(format!(
            "a `{}` adapter has live gates other tools cannot run: export it with --bake-gates PROMPTS_FILE",
            adapter.method.name()
        )));
    }
    if let (Some(algo), ExportFormat::Diffusers) = (adapter.lycoris_algo(), format) {
        return Err(Error::Config(format!(
            "a {} adapter has no diffusers/PEFT LoRA form here (kstyle writes LoRA and DoRA in \
             that layout): export it with --format kohya, LyCORIS' layout ComfyUI and A1111 load",
            algo.name()
        )));
    }
    let mut out = Vec::new();
    for (module, a) in &adapter.modules {
        if a.lycoris.is_some() {
            let k = kohya_module_name(index, module)?;
            for (n, t) in a.named() {
                out.push((format!("{k}.{n}"), t.to_dtype(dtype)?));
            }
            out.push((
                format!("{k}.alpha"),
                Tensor::scalar(a.config.alpha, dtype, Device::Cpu)?,
            ));
            continue;
        }
        let up = match (baked, a.is_gated()) {
            (Some(bk), true) => {
                let mean = bk.get(module).ok_or_else(|| {
                    Error::msg(format!("no calibration gates recorded for {module}"))
                })?;
                let s: Vec<f64> = mean.iter().map(|m| m * a.config.guidance).collect();
                scale_columns(&a.b, &s)?
            }
            _ => a.b.clone(),
        };
        let r = a.config.rank as f64;
        match format {
            ExportFormat::Kohya => {
                let k = kohya_module_name(index, module)?;
                out.push((format!("{k}.lora_down.weight"), a.a.to_dtype(dtype)?));
                out.push((format!("{k}.lora_up.weight"), up.to_dtype(dtype)?));
                out.push((
                    format!("{k}.alpha"),
                    Tensor::scalar(a.config.alpha, dtype, Device::Cpu)?,
                ));
                if let Some(d) = &a.dora {
                    out.push((format!("{k}.dora_scale"), d.magnitude.to_dtype(dtype)?));
                }
            }
            ExportFormat::Diffusers => {
                // Text-encoder paths already start with their component's name.
                let name = match text_encoder_part(module) {
                    Some(_) => module.clone(),
                    None => format!("unet.{module}"),
                };
                out.push((format!("{name}.lora_A.weight"), a.a.to_dtype(dtype)?));
                out.push((
                    format!("{name}.lora_B.weight"),
                    up.scale(a.config.alpha / r)?.to_dtype(dtype)?,
                ));
                if let Some(d) = &a.dora {
                    out.push((
                        format!("{name}.lora_magnitude_vector.weight"),
                        peft_magnitude(&d.magnitude)?.to_dtype(dtype)?,
                    ));
                }
            }
        }
    }
    let c = &adapter.config;
    let mut meta = HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), c.rank.to_string()),
        ("ss_network_alpha".to_string(), c.alpha.to_string()),
        (
            "ss_base_model_version".to_string(),
            "sdxl_base_v1-0".to_string(),
        ),
        (
            "kstyle.exported_from".to_string(),
            adapter.method.name().to_string(),
        ),
        (
            "kstyle.baked_gates".to_string(),
            (baked.is_some() && adapter.method.gated()).to_string(),
        ),
    ]);
    meta.extend(adapter.network_labels());
    save_safetensors(path, &out, Some(meta))
}
