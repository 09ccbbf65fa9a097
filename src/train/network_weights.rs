//! `--network-weights FILE`: a run starts its adapters from an existing LoRA instead of the fresh
//! draw (kohya's `--network_weights`), with a fresh optimizer. FILE is any LoRA file `generate
//! --lora` reads (kohya, PEFT/diffusers, kstyle's own adapters and exports), with DoRA
//! magnitudes when the run trains DoRA.
//!
//! Each module of the file replaces the fresh factors of the run's adapter on the same weight:
//! lora_down as stored, lora_up times (the file's scale / the run's alpha / rank), so the update
//! the file makes is the one the run starts from whatever alpha either uses (a PEFT file with
//! alpha folded in, or `--alpha` other than the file's). Ranks must agree. Where kohya loads the
//! state dict leniently (a module the run does not make is dropped; a mismatched alpha silently
//! changes the saved file's scale), kstyle refuses a file module the run has no adapter for and
//! names it, since dropping it would change what the file does. Run modules the file lacks start
//! as drawn (lora_up zero: no change until trained), and the log says how many.

use super::text::TextEncoders;
use crate::formats::kohya::{Component, KohyaModel, ModuleIndex};
use crate::formats::lora_patch::{Factors, Magnitude, Patch};
use crate::formats::raw::MappedFile;
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::LoraAdapter;
use crate::sample::pipeline::unet_module_index;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The module indexes a file is read against: the UNet's, and each text encoder's adapted
/// linears when the run trains them.
fn indexes(unet: &UNet2DConditionModel, text: Option<&mut TextEncoders>) -> Vec<ModuleIndex> {
    let mut out = vec![unet_module_index(unet)];
    if let Some(te) = text {
        for (prefix, component) in [
            ("text_encoder.", Component::TextEncoder),
            ("text_encoder_2.", Component::TextEncoder2),
        ] {
            let shapes: Vec<(String, Vec<usize>)> = te
                .linears_mut()
                .into_iter()
                .filter_map(|(p, lin)| {
                    let inner = p.strip_prefix(prefix)?;
                    Some((format!("{inner}.weight"), lin.base.weight.dims().to_vec()))
                })
                .collect();
            out.push(ModuleIndex::text_encoder(
                component,
                shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
            ));
        }
    }
    out
}

/// The run's module path of a patch: the UNet's diffusers path, or the text encoder's under its
/// component name.
fn run_path(p: &Patch) -> String {
    match p.component {
        Component::Unet => p.module.clone(),
        c => format!("{}.{}", c.diffusers_name(), p.module),
    }
}

/// A raw tensor's values times `k`, as f32 on `device` with `shape`.
fn tensor(
    raw: &crate::formats::raw::RawTensor,
    k: f64,
    shape: &[usize],
    (context, key): (&str, &str),
    device: Device,
) -> Result<Tensor> {
    let v: Vec<f64> = raw
        .to_f64_vec(context, key)?
        .iter()
        .map(|x| x * k)
        .collect();
    Tensor::from_vec(v, shape.to_vec(), Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_device(device)
}

/// The LoRA-family patches of `file`, resolved against the run's model; keys that name nothing
/// it could adapt are an error listing them.
fn read<'f>(
    file: &'f MappedFile,
    context: &str,
    unet: &UNet2DConditionModel,
    text: Option<&mut TextEncoders>,
) -> Result<Vec<Patch<'f>>> {
    let trains_text = text.is_some();
    let model = KohyaModel::new(indexes(unet, text));
    let parsed = model.parse_patches(file.tensors()?, context, file.metadata())?;
    if !parsed.unknown.is_empty() {
        let text_keys = parsed
            .unknown
            .iter()
            .any(|(c, _)| matches!(c, Some(Component::TextEncoder | Component::TextEncoder2)));
        let hint = match (text_keys, trains_text) {
            (true, false) => " (text-encoder modules: pass --train-text-encoder)",
            (true, true) => " (text-encoder modules in layers this run does not train)",
            _ => "",
        };
        return Err(Error::Format(crate::formats::Error::UnexpectedKeys {
            context: format!("{context}{hint}"),
            keys: parsed.unknown.into_iter().map(|(_, k)| k).collect(),
        }));
    }
    Ok(parsed.patches)
}

/// Sets `a`'s factors (and DoRA magnitude) from the patch `p`: lora_down as stored, lora_up
/// times the file's scale over `a`'s alpha / rank.
fn set_factors(a: &mut LoraAdapter, p: &Patch, module: &str, context: &str) -> Result<()> {
    let refuse = |msg: String| Error::Config(format!("{context}: `{}` {msg}", p.spelled));
    let (up, down) =
        match &p.factors {
            Factors::LowRank {
                up,
                down,
                mid: None,
            } => (up, down),
            Factors::LowRank { mid: Some(_), .. } => {
                return Err(refuse(
                    "is LoCon with a Tucker core (lora_mid), which kstyle does not train".into(),
                ))
            }
            _ => return Err(refuse(
                "is not LoRA (lora_down / lora_up): --network-weights starts LoRA and DoRA runs"
                    .into(),
            )),
        };
    if p.bias_diff.is_some() {
        return Err(refuse(
            "changes the bias (diff_b), which a LoRA adapter cannot".into(),
        ));
    }
    let rank = a.config.rank;
    if down.shape[0] != rank {
        return Err(refuse(format!(
            "has rank {}, this run's adapter on `{module}` rank {rank}: pass --rank {} (or \
             --conv-dim / the block ranks the file was trained with, or --dim-from-weights)",
            down.shape[0], down.shape[0]
        )));
    }
    let run_scale = a.config.alpha / rank as f64;
    let keys = |role: &str| format!("{}.{role}", p.spelled);
    let a_dims = a.a.dims().to_vec();
    let b_dims = a.b.dims().to_vec();
    let device = a.a.device();
    let new_a = tensor(down, 1.0, &a_dims, (context, &keys("lora_down")), device)?;
    let new_b = tensor(
        up,
        p.scale / run_scale,
        &b_dims,
        (context, &keys("lora_up")),
        device,
    )?;
    match (&p.magnitude, &mut a.dora) {
        (None, None) => {}
        (Some(mag), Some(d)) => {
            let out = b_dims[0];
            // PEFT's vector is always per output row; a dora_scale may be (1, in, ..).
            let (m, rows) = match mag {
                Magnitude::Peft(m) => (m, true),
                Magnitude::DoraScale(m) => (m, m.shape[0] == out && m.numel() == out),
            };
            if !rows {
                return Err(refuse(format!(
                    "decomposes DoRA by input columns ({:?}); kstyle trains it by output rows \
                     (LyCORIS' wd_on_out)",
                    m.shape
                )));
            }
            let shape = d.magnitude.dims().to_vec();
            d.magnitude = tensor(m, 1.0, &shape, (context, &keys("dora_scale")), device)?.var()?;
        }
        (Some(_), None) => {
            return Err(refuse(
                "is DoRA (it has magnitudes): train it with --dora-wd".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(refuse(
                "is plain LoRA (no magnitudes): leave --dora-wd out to continue it".into(),
            ))
        }
    }
    a.a = new_a.var()?;
    a.b = new_b.var()?;
    Ok(())
}

/// Replaces the factors (and DoRA magnitudes) of `modules` with `path`'s. Returns how many
/// modules the file set.
pub(super) fn load(
    path: &Path,
    modules: &mut [(String, LoraAdapter)],
    unet: &UNet2DConditionModel,
    text: Option<&mut TextEncoders>,
    log: &mut dyn FnMut(&str),
) -> Result<usize> {
    let context = format!("--network-weights {}", path.display());
    let file = MappedFile::open(path)?;
    let patches = read(&file, &context, unet, text)?;
    let mut by_path: HashMap<String, &mut LoraAdapter> =
        modules.iter_mut().map(|(p, a)| (p.clone(), a)).collect();
    let mut not_trained = Vec::new();
    let mut set = 0;
    for p in &patches {
        let module = run_path(p);
        let Some(a) = by_path.remove(&module) else {
            not_trained.push(p.spelled.clone());
            continue;
        };
        set_factors(a, p, &module, &context)?;
        set += 1;
    }
    if !not_trained.is_empty() {
        return Err(Error::Config(format!(
            "{context}: {} module(s) of the file have no adapter in this run (first: {}): widen \
             --targets, add --conv-dim, or train the text encoders (or take the file's modules \
             with --dim-from-weights), so nothing of the file is dropped",
            not_trained.len(),
            not_trained
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let fresh = by_path.len();
    log(&format!(
        "--network-weights: {set} adapters start from {}{}",
        path.display(),
        match fresh {
            0 => String::new(),
            n => format!("; {n} the file lacks start fresh (lora_up zero)"),
        }
    ));
    Ok(set)
}

/// `--dim-from-weights` (kohya's `--dim_from_weights`): the run's adapters are the file's, one
/// on each module it patches, at its rank and alpha (alpha = its scale times its rank, so a PEFT
/// file's folded scale stays), in the model's order (transformer linears, the conv group, the
/// text encoders'); DoRA with `dora`. A module kstyle cannot adapt is an error naming it.
pub(super) fn from_file(
    path: &Path,
    unet: &UNet2DConditionModel,
    mut text: Option<&mut TextEncoders>,
    cfg: &super::config::TrainConfig,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<(String, LoraAdapter)>> {
    let context = format!("--network-weights {}", path.display());
    let file = MappedFile::open(path)?;
    let patches = read(&file, &context, unet, text.as_deref_mut())?;
    let mut layers: Vec<(String, Tensor)> = unet
        .adaptable_linears()
        .into_iter()
        .map(|(p, l)| (p, l.base.weight.clone()))
        .collect();
    layers.extend(
        unet.conv_group()
            .into_iter()
            .map(|l| (l.path, l.weight.clone())),
    );
    if let Some(te) = text {
        layers.extend(
            te.linears_mut()
                .into_iter()
                .map(|(p, l)| (p, l.base.weight.clone())),
        );
    }
    let mut by_module: HashMap<String, &Patch> = patches.iter().map(|p| (run_path(p), p)).collect();
    if cfg.train_text_encoder && !by_module.keys().any(|m| m.starts_with("text_encoder")) {
        return Err(Error::Config(format!(
            "{context} has no text-encoder modules to train: leave --train-text-encoder out"
        )));
    }
    // The factors are overwritten; the draw only shapes each adapter.
    let mut rng = crate::tensor::Rng::new(cfg.seed);
    let mut out = Vec::new();
    for (path, weight) in layers {
        let Some(p) = by_module.remove(&path) else {
            continue;
        };
        let rank = match &p.factors {
            Factors::LowRank { down, .. } => down.shape[0],
            _ => 1, // refused by set_factors
        };
        let config = crate::nn::lora::LoraConfig {
            rank,
            alpha: p.scale * rank as f64,
            ..cfg.lora
        };
        let a = LoraAdapter::init_plain(weight.dims(), config, &mut rng, DType::F32, cfg.device)?;
        let mut a = match cfg.dora {
            true => a.with_dora(&weight)?,
            false => a,
        };
        set_factors(&mut a, p, &path, &context)?;
        out.push((path, a));
    }
    if !by_module.is_empty() {
        let mut names: Vec<&str> = by_module.values().map(|p| p.spelled.as_str()).collect();
        names.sort();
        return Err(Error::Config(format!(
            "{context}: {} module(s) of the file patch layers kstyle does not train adapters on \
             (first: {}); it trains the transformers' linears, the resnets' and samplers' \
             convolutions and the text encoders' linears",
            names.len(),
            names[..names.len().min(3)].join(", ")
        )));
    }
    let mut ranks: Vec<usize> = out.iter().map(|(_, a)| a.config.rank).collect();
    ranks.sort();
    ranks.dedup();
    log(&format!(
        "--dim-from-weights: {} adapters from {} (ranks {ranks:?})",
        out.len(),
        path.display()
    ));
    Ok(out)
}
