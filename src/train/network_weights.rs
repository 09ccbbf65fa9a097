//! `--network-weights FILE`: a run starts its adapters from an existing LoRA, LoHa or LoKr
//! instead of the fresh draw (kohya's `--network_weights`), with a fresh optimizer. FILE is any
//! file `generate --lora` reads (kohya, LyCORIS, PEFT/diffusers, kstyle's own adapters and
//! exports) of the run's `--algo`, with DoRA magnitudes when the run trains DoRA.
//!
//! Each module of the file replaces the fresh factors of the run's adapter on the same weight:
//! the tensors as stored, the one the update scales with (LoRA's lora_up, LyCORIS' first)
//! times the file's scale over the run's, so the run starts from the file's update whatever
//! alpha either uses (a PEFT file with alpha folded in, or `--alpha` other than the file's).
//! Ranks and factor shapes must agree. A DoRA run from a file without magnitudes takes the row
//! norms of W + dW (PEFT's start for a DoRA layer over an existing LoRA update), so it starts at
//! the file's output. Where kohya loads the state dict leniently (a module the run does not make
//! is dropped; a mismatched alpha silently changes the saved file's scale), kstyle refuses a
//! file module the run has no adapter for and names it, since dropping it would change what the
//! file does. Run modules the file lacks start as drawn (no update until trained), and the log
//! says how many.

use super::text::TextEncoders;
use crate::formats::kohya::{Component, KohyaModel, ModuleIndex};
use crate::formats::lora_patch::{Factors, KronFactor, Magnitude, Patch};
use crate::formats::raw::{MappedFile, RawTensor};
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::LoraAdapter;
use crate::nn::lycoris::LycorisAlgo;
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
    raw: &RawTensor,
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

/// The file's factors of `p` in the order a run's adapter holds them (LoRA: lora_down, lora_up;
/// LoHa: hada_w1_a, w1_b, w2_a, w2_b; LoKr: lokr_w1, then lokr_w2 or w2_a, w2_b) and the
/// algorithm they are (None: LoRA); what kstyle does not train is a message saying what it is.
fn file_factors<'p, 'f>(
    p: &'p Patch<'f>,
) -> std::result::Result<(Option<LycorisAlgo>, Vec<&'p RawTensor<'f>>), String> {
    let tucker = |what: &str| {
        Err(format!(
            "is {what} with Tucker cores, which kstyle does not train"
        ))
    };
    match &p.factors {
        Factors::LowRank { up, down, mid } => match mid {
            None => Ok((None, vec![down, up])),
            Some(_) => tucker("LoCon (lora_mid)"),
        },
        Factors::Hadamard {
            w1a,
            w1b,
            w2a,
            w2b,
            t1,
            t2,
        } => match (t1, t2) {
            (None, None) => Ok((Some(LycorisAlgo::Loha), vec![w1a, w1b, w2a, w2b])),
            _ => tucker("LoHa (hada_t1 / hada_t2)"),
        },
        Factors::Kronecker { w1, w2 } => {
            let KronFactor::Whole(w1) = w1 else {
                return Err(
                    "is LoKr with w1 decomposed (lokr_w1_a / lokr_w1_b: LyCORIS' \
                            decompose_both), which kstyle does not train"
                        .into(),
                );
            };
            match w2 {
                KronFactor::Whole(w2) => Ok((Some(LycorisAlgo::Lokr), vec![w1, w2])),
                KronFactor::Product { a, b, t: None } => {
                    Ok((Some(LycorisAlgo::Lokr), vec![w1, a, b]))
                }
                KronFactor::Product { t: Some(_), .. } => tucker("LoKr (lokr_t2)"),
            }
        }
        Factors::Full { .. } => Err("is a whole-weight difference (diff), not factors an \
                                     adapter trains"
            .into()),
    }
}

/// How an algorithm is named to the user: its kind and its `--algo`.
fn algo_words(algo: Option<LycorisAlgo>) -> (&'static str, &'static str) {
    match algo {
        None => ("LoRA (lora_down / lora_up)", "lora"),
        Some(LycorisAlgo::Loha) => ("LoHa (hada_w1_a, ..)", "loha"),
        Some(LycorisAlgo::Lokr) => ("LoKr (lokr_w1, ..)", "lokr"),
    }
}

/// The rank a file's factors were trained at: LoRA's and LoHa's, LoKr's low-rank w2's; None
/// for LoKr with w2 whole (it runs at scale 1 at any rank).
fn file_rank(algo: Option<LycorisAlgo>, raws: &[&RawTensor]) -> Option<usize> {
    match (algo, raws.len()) {
        (None, _) => Some(raws[0].shape[0]),
        (Some(LycorisAlgo::Loha), _) => Some(raws[1].shape[0]),
        (Some(LycorisAlgo::Lokr), 3) => Some(raws[2].shape[0]),
        (Some(LycorisAlgo::Lokr), _) => None,
    }
}

/// Sets `a`'s factors (and DoRA magnitude) from the patch `p` on the frozen `weight`: the
/// file's tensors as stored, the one that scales the update (LoRA's lora_up, LyCORIS' first)
/// times the file's scale over `a`'s, so `a` makes the file's update. A DoRA adapter takes the
/// file's magnitudes, or, from a file without them, the row norms of W + dW
/// ([`LoraAdapter::dora_from_update`]), so it starts at the file's output; returns whether it
/// did the latter.
fn set_factors(
    a: &mut LoraAdapter,
    p: &Patch,
    (module, weight): (&str, &Tensor),
    context: &str,
) -> Result<bool> {
    let refuse = |msg: String| Error::Config(format!("{context}: `{}` {msg}", p.spelled));
    let (algo, raws) = file_factors(p).map_err(refuse)?;
    if algo != a.lycoris_algo() {
        let (file, flag) = algo_words(algo);
        let (run, _) = algo_words(a.lycoris_algo());
        return Err(refuse(format!(
            "is {file} and this run trains {run}: pass --algo {flag}"
        )));
    }
    if p.bias_diff.is_some() {
        return Err(refuse(
            "changes the bias (diff_b), which an adapter cannot".into(),
        ));
    }
    let slots: Vec<&Tensor> = match &a.lycoris {
        Some(l) => [&a.a, &a.b].into_iter().chain(&l.rest).collect(),
        None => vec![&a.a, &a.b],
    };
    let fits = raws.len() == slots.len()
        && raws
            .iter()
            .zip(&slots)
            .all(|(r, t)| r.shape.first() == t.dims().first() && r.numel() == t.elem_count());
    if !fits {
        let rank = a.config.rank;
        return Err(refuse(match file_rank(algo, &raws) {
            Some(r) if r != rank || a.lycoris_algo() != Some(LycorisAlgo::Lokr) => format!(
                "has rank {r}, this run's adapter on `{module}` rank {rank}: pass --rank {r} \
                 (or --conv-dim / the block ranks the file was trained with, or \
                 --dim-from-weights)"
            ),
            _ => format!(
                "has LoKr factors {:?}, this run's adapter on `{module}` {:?}: pass the --rank \
                 and --lokr-factor the file was trained with (or --dim-from-weights)",
                raws.iter().map(|r| &r.shape).collect::<Vec<_>>(),
                slots.iter().map(|t| t.dims()).collect::<Vec<_>>()
            ),
        }));
    }
    let names = match algo {
        Some(l) => l.names(raws.len() == 3),
        None => &["lora_down", "lora_up"],
    };
    // LoRA's update scales with lora_up; LyCORIS' with its first factor.
    let scaled = match algo {
        None => 1,
        Some(_) => 0,
    };
    let k = p.scale / a.update_scale();
    let device = a.a.device();
    let mut new = Vec::with_capacity(raws.len());
    for (i, (raw, slot)) in raws.iter().zip(&slots).enumerate() {
        let key = format!("{}.{}", p.spelled, names[i]);
        let by = if i == scaled { k } else { 1.0 };
        new.push(tensor(raw, by, slot.dims(), (context, &key), device)?.var()?);
    }
    let rest = new.split_off(2);
    let (Some(b), Some(first)) = (new.pop(), new.pop()) else {
        unreachable!("LoRA and LyCORIS adapters hold at least two factors")
    };
    (a.a, a.b) = (first, b);
    if let Some(l) = &mut a.lycoris {
        l.rest = rest;
    }
    match (&p.magnitude, &mut a.dora) {
        (None, None) => Ok(false),
        (Some(mag), Some(d)) => {
            let out = d.magnitude.dims()[0];
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
            let key = format!("{}.dora_scale", p.spelled);
            d.magnitude = tensor(m, 1.0, &shape, (context, &key), device)?.var()?;
            Ok(false)
        }
        (Some(_), None) => Err(refuse(
            "is DoRA (it has magnitudes): train it with --dora-wd".into(),
        )),
        (None, Some(_)) => {
            a.dora_from_update(weight)?;
            Ok(true)
        }
    }
}

/// The frozen weights a run can adapt, by module path, in the model's order: the transformers'
/// linears, the conv group, the text encoders' linears when they train.
fn layers(unet: &UNet2DConditionModel, text: Option<&mut TextEncoders>) -> Vec<(String, Tensor)> {
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
    layers
}

/// Replaces the factors (and DoRA magnitudes) of `modules` with `path`'s. Returns how many
/// modules the file set.
pub(super) fn load(
    path: &Path,
    modules: &mut [(String, LoraAdapter)],
    unet: &UNet2DConditionModel,
    mut text: Option<&mut TextEncoders>,
    log: &mut dyn FnMut(&str),
) -> Result<usize> {
    let context = format!("--network-weights {}", path.display());
    let file = MappedFile::open(path)?;
    let patches = read(&file, &context, unet, text.as_deref_mut())?;
    let weights: HashMap<String, Tensor> = layers(unet, text).into_iter().collect();
    let mut by_path: HashMap<String, &mut LoraAdapter> =
        modules.iter_mut().map(|(p, a)| (p.clone(), a)).collect();
    let mut not_trained = Vec::new();
    let (mut set, mut magnitudes) = (0, 0);
    for p in &patches {
        let module = run_path(p);
        let (Some(a), Some(w)) = (by_path.remove(&module), weights.get(&module)) else {
            not_trained.push(p.spelled.clone());
            continue;
        };
        magnitudes += set_factors(a, p, (&module, w), &context)? as usize;
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
    log(&format!(
        "--network-weights: {set} adapters start from {}{}{}",
        path.display(),
        match by_path.len() {
            0 => String::new(),
            n => format!("; {n} the file lacks start fresh (no update until trained)"),
        },
        magnitudes_note(magnitudes)
    ));
    Ok(set)
}

/// The log's note on DoRA magnitudes a file without them left to the run.
fn magnitudes_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!("; {n} DoRA magnitudes start at the row norms of W + dW (the file has none)"),
    }
}

/// `--dim-from-weights` (kohya's `--dim_from_weights`): the run's adapters are the file's, one
/// on each module it patches, of its algorithm (the run's --algo must be it), at its rank and
/// alpha (alpha = its scale times its rank, so a PEFT file's folded scale stays) and, for LoKr,
/// its factors' shapes whatever --lokr-factor says; in the model's order (transformer linears,
/// the conv group, the text encoders'); DoRA with `--dora-wd`. A module kstyle cannot adapt is an
/// error naming it.
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
    let mut by_module: HashMap<String, &Patch> = patches.iter().map(|p| (run_path(p), p)).collect();
    if cfg.train_text_encoder && !by_module.keys().any(|m| m.starts_with("text_encoder")) {
        return Err(Error::Config(format!(
            "{context} has no text-encoder modules to train: leave --train-text-encoder out"
        )));
    }
    // LoRA's factors are overwritten; the draw only shapes each adapter.
    let mut rng = crate::tensor::Rng::new(cfg.seed);
    let (mut out, mut magnitudes) = (Vec::new(), 0);
    for (path, weight) in layers(unet, text) {
        let Some(p) = by_module.remove(&path) else {
            continue;
        };
        let refuse = |msg: String| Error::Config(format!("{context}: `{}` {msg}", p.spelled));
        let (algo, raws) = file_factors(p).map_err(refuse)?;
        if algo != cfg.algo.lycoris() {
            let (file, flag) = algo_words(algo);
            return Err(refuse(format!(
                "is {file}: pass --algo {flag} to take its modules"
            )));
        }
        let rank = file_rank(algo, &raws).unwrap_or(cfg.lora.rank);
        let config = crate::nn::lora::LoraConfig {
            rank,
            alpha: p.scale * rank as f64,
            ..cfg.lora
        };
        let dims = weight.dims();
        let a = match algo {
            None => LoraAdapter::init_plain(dims, config, &mut rng, DType::F32, cfg.device)?,
            Some(algo) => {
                // Matrices, but LoKr's whole w2 keeps the kernel dims (b, d, kh, kw).
                let whole_w2 = algo == LycorisAlgo::Lokr && raws.len() == 2;
                let zeros = raws
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let rows = r.shape.first().copied().unwrap_or(0);
                        let mut shape = vec![rows, r.numel() / rows.max(1)];
                        if whole_w2 && i == 1 {
                            let kernel: usize = dims[2..].iter().product();
                            shape[1] /= kernel.max(1);
                            shape.extend(&dims[2..]);
                        }
                        Tensor::zeros(shape, DType::F32, cfg.device)?.var()
                    })
                    .collect::<Result<Vec<_>>>()?;
                LoraAdapter::from_lycoris(algo, config, dims, zeros)
                    .map_err(|e| refuse(e.to_string()))?
            }
        };
        let mut a = match cfg.dora {
            true => a.with_dora(&weight)?,
            false => a,
        };
        magnitudes += set_factors(&mut a, p, (&path, &weight), &context)? as usize;
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
        "--dim-from-weights: {} adapters from {} (ranks {ranks:?}){}",
        out.len(),
        path.display(),
        magnitudes_note(magnitudes)
    ));
    Ok(out)
}
