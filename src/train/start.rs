//! How a run's trainable state begins: read back from a checkpoint, which must match this run's
//! data and settings, or made fresh from the seed (adapters, the cultural module, the first
//! epoch's order).

use super::batch::new_epoch;
use super::block_dims::describe;
use super::checkpoint::{load_checkpoint, TrainState};
use super::config::{Algo, TrainConfig};
use super::cultural::CulturalLoss;
use super::examples::Example;
use super::optim::Optimizer;
use super::plan::UnetPlan;
use super::text::{text_encoder_trains, text_layer, TextEncoders};
use crate::formats::adapter::text_encoder_part;
use crate::formats::kohya::ModuleIndex;
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::LoraAdapter;
use crate::tensor::Rng;
use crate::{DType, Error, Result, Tensor};
use std::path::Path;

/// The trainable state a run starts from.
pub(super) struct Start {
    /// Each adapted linear's path and adapter, UNet's first.
    pub modules: Vec<(String, LoraAdapter)>,
    pub cultural: Option<CulturalLoss>,
    pub concept_embeds: Option<Tensor>,
    /// The optimizer's moments, when resuming.
    pub optimizer: Option<Optimizer>,
    pub state: TrainState,
}

/// The CLIP text embeddings of `cfg.concepts`, when the method gates or scores with them.
fn concept_embeds(cfg: &TrainConfig) -> Result<Option<Tensor>> {
    if !cfg.method.gated() && !cfg.method.cultural() {
        return Ok(None);
    }
    let clip = cfg.clip.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "method `{}` needs concept embeddings: pass --clip DIR (a CLIP ViT-B/32 folder)",
            cfg.method.name()
        ))
    })?;
    Ok(Some(super::concepts::embed_concepts(
        clip,
        &cfg.concepts,
        cfg.device,
    )?))
}

/// The checkpoint at `path`, refused unless it was written by a run with this one's method,
/// rank, text-encoder training, batch size and dataset (`epoch_len` visits of `n_train`
/// pictures an epoch).
pub(super) fn resume(
    path: &Path,
    cfg: &TrainConfig,
    index: &ModuleIndex,
    epoch_len: usize,
    n_train: usize,
    log: &mut dyn FnMut(&str),
) -> Result<Start> {
    let (adapter, opt, state) = load_checkpoint(path, index, cfg.device, cfg.adamw, cfg.optimizer)?;
    let has_text = adapter
        .modules
        .iter()
        .any(|(p, _)| text_encoder_part(p).is_some());
    if has_text != cfg.train_text_encoder {
        return Err(Error::file(
            path,
            if has_text {
                "the checkpoint trains the text encoders: resume it with --train-text-encoder"
            } else {
                "the checkpoint does not train the text encoders: resume it without --train-text-encoder"
            },
        ));
    }
    if adapter.method != cfg.method || adapter.config.rank != cfg.lora.rank {
        return Err(Error::file(
            path,
            format!(
                "checkpoint is method `{}` rank {}, this run asks for `{}` rank {}",
                adapter.method.name(),
                adapter.config.rank,
                cfg.method.name(),
                cfg.lora.rank
            ),
        ));
    }
    // Checkpoints written before --algo existed are LoRA.
    let was = adapter.settings.get("algo").map_or("lora", String::as_str);
    if was != cfg.algo.name() {
        return Err(Error::file(
            path,
            format!(
                "the checkpoint trained --algo {was}, this run asks for --algo {}: resume with the same kind of adapter",
                cfg.algo.name()
            ),
        ));
    }
    for (key, now) in [
        ("dora_wd", Some(cfg.dora.to_string())),
        (
            "lokr_factor",
            match cfg.algo {
                Algo::Lokr { factor } => Some(factor.to_string()),
                _ => None,
            },
        ),
        ("conv_dim", cfg.conv_lora.map(|c| c.dim.to_string())),
        ("conv_alpha", cfg.conv_lora.map(|c| c.alpha.to_string())),
        ("block_dims", Some(describe(&cfg.block_dims.dims))),
        ("block_alphas", Some(describe(&cfg.block_dims.alphas))),
        ("conv_block_dims", Some(describe(&cfg.block_dims.conv_dims))),
        (
            "conv_block_alphas",
            Some(describe(&cfg.block_dims.conv_alphas)),
        ),
    ] {
        // Checkpoints written before --conv-dim / --lokr-factor / --block-dims / --dora-wd
        // existed had none of them (and no DoRA).
        let absent = if key == "dora_wd" { "false" } else { "none" };
        let was = adapter.settings.get(key).map_or(absent, String::as_str);
        let now = now.unwrap_or_else(|| "none".into());
        if was != now {
            let flag = key.replace('_', "-");
            return Err(Error::file(
                path,
                format!(
                    "the checkpoint trained with --{flag} {was}, this run asks for {now}: resume with the same setting"
                ),
            ));
        }
    }
    let visits = epoch_len;
    let held: usize = state.order.iter().map(Vec::len).sum();
    if held != visits || state.order.iter().flatten().any(|&i| i >= n_train) {
        return Err(Error::file(
            path,
            format!(
                "the checkpoint's epoch has {held} visits of its dataset; {} gives {} \
                 images, {visits} visits an epoch: resume with the same --data",
                cfg.data.display(),
                n_train
            ),
        ));
    }
    // Checkpoints written before --batch-size existed batched by one.
    let was = adapter
        .settings
        .get("batch_size")
        .map_or("1", String::as_str);
    if was != cfg.batch_sizes() {
        return Err(Error::file(
            path,
            format!(
                "the checkpoint trained with --batch-size {was} (a dataset config's: each \
                 dataset's): resume it with the same batch sizes, as its epoch is already \
                 batched (this run asks for {})",
                cfg.batch_sizes()
            ),
        ));
    }
    let blocks_were = ["down_lr_weight", "mid_lr_weight", "up_lr_weight"]
        .iter()
        .any(|k| adapter.settings.get(*k).is_some_and(|v| v != "none"));
    if blocks_were && !cfg.block_lr.is_set() {
        return Err(Error::file(
            path,
            "the checkpoint trained with block-wise learning rates (--down-lr-weight, \
             --mid-lr-weight, --up-lr-weight): resume it with them, as its blocks at 0 have no \
             adapters",
        ));
    }
    log(&format!(
        "resuming from {} at step {}",
        path.display(),
        state.step
    ));
    Ok(Start {
        modules: adapter.modules,
        cultural: adapter.cultural,
        concept_embeds: adapter.concept_embeds,
        optimizer: Some(opt),
        state,
    })
}

/// A fresh plain adapter of the run's kind (`--algo`, `--dora-wd`) on the frozen `weight`.
fn plain(
    cfg: &TrainConfig,
    weight: &Tensor,
    config: crate::nn::lora::LoraConfig,
    rng: &mut Rng,
) -> Result<LoraAdapter> {
    let dims = weight.dims();
    let a = match cfg.algo {
        Algo::Lora => LoraAdapter::init_plain(dims, config, rng, DType::F32, cfg.device)?,
        Algo::Loha => LoraAdapter::init_loha(dims, config, rng, DType::F32, cfg.device)?,
        Algo::Lokr { factor } => {
            LoraAdapter::init_lokr(dims, config, factor, rng, DType::F32, cfg.device)?
        }
    };
    match cfg.dora {
        true => a.with_dora(weight),
        false => Ok(a),
    }
}

/// Fresh adapters on every targeted transformer linear of `unet` (and on its conv group with
/// `--conv-dim`) as `plan` places them, on the text encoders' linears when they train, the
/// cultural module and the first epoch's order, all drawn from `cfg.seed` in that order.
pub(super) fn fresh(
    cfg: &TrainConfig,
    unet: &UNet2DConditionModel,
    plan: &UnetPlan,
    text_encoders: Option<&mut TextEncoders>,
    examples: &[Example],
) -> Result<Start> {
    let concept_embeds = concept_embeds(cfg)?;
    let mut rng = Rng::new(cfg.seed);
    let mut modules = Vec::new();
    for (path, lin) in unet.adaptable_linears() {
        let dims = lin.base.weight.dims();
        let config = plan.config(&path, dims, cfg.lora);
        if targeted(&cfg.targets, &path) && config.rank > 0 {
            let a = match (&concept_embeds, cfg.method.gated()) {
                (Some(t), true) => LoraAdapter::init(
                    lin.base.in_features(),
                    lin.base.out_features(),
                    config,
                    Some(t),
                    &mut rng,
                    DType::F32,
                    cfg.device,
                )?,
                _ => plain(cfg, &lin.base.weight, config, &mut rng)?,
            };
            // Drawn all the same, so zeroing a block leaves every other draw of the run as it was.
            if !plan.zeroed(&path) {
                modules.push((path, a));
            }
        }
    }
    // Then kohya's conv LoRA on the resnets and resamplers, when asked for.
    if let Some(conv) = &cfg.conv_lora {
        for layer in unet.conv_group() {
            let dims = layer.weight.dims();
            let config = plan.config(&layer.path, dims, conv.config_for(dims, cfg.lora));
            if config.rank == 0 {
                continue;
            }
            let a = plain(cfg, layer.weight, config, &mut rng)?;
            if !plan.zeroed(&layer.path) {
                modules.push((layer.path, a));
            }
        }
    }
    // Then the text encoders' plain LoRA, text_encoder's before text_encoder_2's.
    if let Some(te) = text_encoders {
        let layers = [
            ("text_encoder", te.te1.config().encoder.num_hidden_layers),
            ("text_encoder_2", te.te2.config().encoder.num_hidden_layers),
        ];
        for (path, lin) in te.linears_mut() {
            let (component, inner) = path.split_once('.').unwrap_or_default();
            let n = layers
                .iter()
                .find(|(c, _)| *c == component)
                .map_or(0, |l| l.1);
            if text_layer(inner).is_some_and(|l| text_encoder_trains(component, l, n)) {
                let a = plain(cfg, &lin.base.weight, cfg.lora, &mut rng)?;
                modules.push((path, a));
            }
        }
    }
    let cultural = match (&concept_embeds, cfg.method.cultural()) {
        (Some(t), true) => {
            let c = examples.first().map_or(4, |e| e.mean.dims()[1]);
            let side = examples.first().map_or(cfg.resolution / 8, |e| {
                e.mean.dims()[2].min(e.mean.dims()[3])
            });
            let pool = cfg.cultural_pool.unwrap_or((side / 8).max(1));
            Some(CulturalLoss::init(
                c,
                pool,
                t,
                &mut rng,
                DType::F32,
                cfg.device,
            )?)
        }
        _ => None,
    };
    let order = new_epoch(examples, &mut rng);
    Ok(Start {
        modules,
        cultural,
        concept_embeds,
        optimizer: None,
        state: TrainState {
            step: 0,
            epoch: 0,
            pos: 0,
            order,
            rng,
        },
    })
}

pub(super) fn targeted(targets: &[String], path: &str) -> bool {
    targets.iter().any(|t| path.ends_with(&format!(".{t}")))
}

/// A resumed run's UNet adapters sit exactly where `plan` puts them: none in a block whose
/// learning-rate weight is 0 or whose rank is 0, every targeted projection (and conv-group
/// layer with `--conv-dim`) elsewhere (the blocks a run trains are fixed when it starts).
pub(super) fn check_planned_blocks(
    cfg: &TrainConfig,
    unet: &UNet2DConditionModel,
    modules: &[(String, LoraAdapter)],
    plan: &UnetPlan,
) -> Result<()> {
    let held: std::collections::HashSet<&str> = modules.iter().map(|(p, _)| p.as_str()).collect();
    let linears = unet
        .adaptable_linears()
        .into_iter()
        .filter(|(p, _)| targeted(&cfg.targets, p))
        .map(|(p, l)| {
            let rank = plan.config(&p, l.base.weight.dims(), cfg.lora).rank;
            (p, rank)
        });
    let convs = cfg.conv_lora.iter().flat_map(|conv| {
        unet.conv_group().into_iter().map(move |l| {
            let dims = l.weight.dims();
            let rank = plan
                .config(&l.path, dims, conv.config_for(dims, cfg.lora))
                .rank;
            (l.path, rank)
        })
    });
    for (path, rank) in linears.chain(convs) {
        let sgm = plan
            .keys
            .module_to_sgm(&path)
            .unwrap_or_else(|| path.clone());
        let planned = rank > 0 && !plan.zeroed(&path);
        if planned != held.contains(path.as_str()) {
            return Err(Error::Config(format!(
                "the checkpoint {} adapter on `{path}` ({sgm}), where this run's block settings \
                 put {}: resume with the block learning-rate weights (a block at 0 gets no \
                 adapters) and block ranks it started with",
                if planned { "has no" } else { "has an" },
                if planned { "one" } else { "none" },
            )));
        }
    }
    Ok(())
}
