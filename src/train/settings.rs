//! The settings a run records in its adapter's metadata (`kstyle.train.*`), as kohya records
//! its `ss_*` keys.

use super::block_dims;
use super::config::{Algo, TrainConfig};
use super::lr_groups::Weights;
use crate::sample::schedule::Huber;
use std::collections::BTreeMap;

impl TrainConfig {
    /// The settings recorded in the adapter (`kstyle.train.*`) after `steps` optimizer steps:
    /// file and folder names without their paths, as kohya's `ss_*` keys.
    pub fn settings(&self, steps: u64) -> BTreeMap<String, String> {
        let c = self;
        BTreeMap::from([
            ("optimizer".to_string(), c.optimizer.describe()),
            ("lr".to_string(), c.adamw.lr.to_string()),
            ("lr_schedule".to_string(), c.schedule.name()),
            ("warmup".to_string(), c.schedule.warmup.to_string()),
            ("grad_accum".to_string(), c.grad_accum.to_string()),
            // With a dataset config: each dataset's, comma-separated (the per-subset caption
            // and flip settings below are then the flags' defaults; the file holds the rest).
            ("batch_size".to_string(), c.batch_sizes()),
            (
                "resolution".to_string(),
                c.groups()
                    .iter()
                    .map(|g| g.resolution.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "dataset_config".to_string(),
                match &c.dataset_config {
                    Some(d) => format!(
                        "{}: {} datasets, {} subsets",
                        c.data.file_name().unwrap_or_default().to_string_lossy(),
                        d.datasets.len(),
                        d.rules().len()
                    ),
                    None => "none".into(),
                },
            ),
            ("flip_aug".to_string(), c.flip_aug.to_string()),
            ("random_crop".to_string(), c.random_crop.to_string()),
            ("color_aug".to_string(), c.color_aug.to_string()),
            ("alpha_mask".to_string(), c.alpha_mask.to_string()),
            (
                "weighted_captions".to_string(),
                c.weighted_captions.to_string(),
            ),
            (
                "mask_data".to_string(),
                c.mask_data
                    .as_ref()
                    .and_then(|v| v.file_name())
                    .map_or("none".into(), |n| n.to_string_lossy().into_owned()),
            ),
            ("lambda".to_string(), c.lambda.to_string()),
            (
                "min_snr_gamma".to_string(),
                c.min_snr_gamma.map_or("none".into(), |g| g.to_string()),
            ),
            ("debiased_estimation".to_string(), c.debiased.to_string()),
            (
                "scale_v_pred_loss".to_string(),
                c.scale_v_pred_loss.to_string(),
            ),
            (
                "v_pred_like_loss".to_string(),
                c.v_pred_like_loss.map_or("none".into(), |k| k.to_string()),
            ),
            ("loss_type".to_string(), c.loss_type.name().to_string()),
            (
                "huber".to_string(),
                match c.loss_type.uses_threshold() {
                    false => "none".into(),
                    true => {
                        let h = Huber::default();
                        format!(
                            "{} c {} scale {}",
                            c.huber_schedule.unwrap_or(h.schedule).name(),
                            c.huber_c.unwrap_or(h.c),
                            c.huber_scale.unwrap_or(h.scale)
                        )
                    }
                },
            ),
            (
                "noise_offset".to_string(),
                c.noise_offset.map_or("none".into(), |o| {
                    let random = if o.random_strength { " random" } else { "" };
                    let adaptive = o
                        .adaptive
                        .map_or(String::new(), |a| format!(" adaptive {a}"));
                    format!("{}{random}{adaptive}", o.offset)
                }),
            ),
            (
                "multires_noise".to_string(),
                c.multires.map_or("none".into(), |m| {
                    format!("{} discount {}", m.iterations, m.discount)
                }),
            ),
            (
                "reg_data".to_string(),
                c.reg_data
                    .as_ref()
                    .and_then(|v| v.file_name())
                    .map_or("none".into(), |n| n.to_string_lossy().into_owned()),
            ),
            (
                "prior_loss_weight".to_string(),
                c.prior_loss_weight.to_string(),
            ),
            (
                "val_data".to_string(),
                c.val_data
                    .as_ref()
                    .and_then(|v| v.file_name())
                    .map_or("none".into(), |n| n.to_string_lossy().into_owned()),
            ),
            ("shuffle_caption".to_string(), c.shuffle_caption.to_string()),
            (
                "max_token_length".to_string(),
                (75 * c.caption_chunks()).to_string(),
            ),
            (
                "caption_dropout_every_n_epochs".to_string(),
                c.caption_dropout_every_epochs
                    .map_or("none".into(), |n| n.to_string()),
            ),
            (
                "token_warmup".to_string(),
                c.token_warmup.map_or("none".into(), |w| {
                    format!("min={} steps={}", w.min, w.steps)
                }),
            ),
            (
                "caption_prefix".to_string(),
                c.captions.prefix.clone().unwrap_or("none".into()),
            ),
            (
                "caption_suffix".to_string(),
                c.captions.suffix.clone().unwrap_or("none".into()),
            ),
            ("caption_separator".to_string(), c.caption_separator.clone()),
            (
                "keep_tokens_separator".to_string(),
                c.keep_tokens_separator.clone().unwrap_or("none".into()),
            ),
            (
                "secondary_separator".to_string(),
                c.secondary_separator.clone().unwrap_or("none".into()),
            ),
            (
                "enable_wildcard".to_string(),
                c.captions.wildcard.to_string(),
            ),
            ("keep_tokens".to_string(), c.keep_tokens.to_string()),
            (
                "caption_tag_dropout".to_string(),
                c.caption_tag_dropout
                    .map_or("none".into(), |p| p.to_string()),
            ),
            (
                "caption_dropout".to_string(),
                c.caption_dropout.map_or("none".into(), |p| p.to_string()),
            ),
            (
                "ip_noise_gamma".to_string(),
                c.ip_noise_gamma
                    .map_or("none".into(), |g| match c.ip_noise_random_strength {
                        true => format!("{g} random"),
                        false => g.to_string(),
                    }),
            ),
            (
                "timesteps".to_string(),
                format!(
                    "{}..{}",
                    c.min_timestep.unwrap_or(0),
                    c.max_timestep.map_or("end".into(), |t| t.to_string())
                ),
            ),
            ("seed".to_string(), c.seed.to_string()),
            ("dtype".to_string(), c.dtype.to_string()),
            (
                "weight_dtype".to_string(),
                c.weight_dtype.unwrap_or(c.dtype).to_string(),
            ),
            ("steps".to_string(), steps.to_string()),
            ("save_precision".to_string(), c.save_precision.to_string()),
            ("targets".to_string(), c.targets.join(",")),
            (
                "conv_dim".to_string(),
                c.conv_lora.map_or("none".into(), |v| v.dim.to_string()),
            ),
            (
                "conv_alpha".to_string(),
                c.conv_lora.map_or("none".into(), |v| v.alpha.to_string()),
            ),
            ("algo".to_string(), c.algo.name().to_string()),
            ("dora_wd".to_string(), c.dora.to_string()),
            (
                "dim_from_weights".to_string(),
                c.dim_from_weights.to_string(),
            ),
            // The file name alone, as for the VAE: no local paths.
            (
                "network_weights".to_string(),
                c.network_weights
                    .as_ref()
                    .and_then(|v| v.file_name())
                    .map_or("none".into(), |n| n.to_string_lossy().into_owned()),
            ),
            (
                "lokr_factor".to_string(),
                match c.algo {
                    Algo::Lokr { factor } => factor.to_string(),
                    _ => "none".into(),
                },
            ),
            ("vae_tiling".to_string(), c.vae_tiling.to_string()),
            ("trigger".to_string(), c.captions.trigger.clone()),
            // The file or folder name alone, as kohya's `ss_vae_name`: no local paths.
            (
                "vae".to_string(),
                c.vae
                    .as_ref()
                    .and_then(|v| v.file_name())
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
            ),
            ("weight_decay".to_string(), c.adamw.weight_decay.to_string()),
            (
                "adam_betas".to_string(),
                format!("{},{}", c.adamw.beta1, c.adamw.beta2),
            ),
            ("adam_epsilon".to_string(), c.adamw.eps.to_string()),
            (
                "max_grad_norm".to_string(),
                c.max_grad_norm.map_or("none".into(), |n| n.to_string()),
            ),
            (
                "scale_weight_norms".to_string(),
                c.scale_weight_norms
                    .map_or("none".into(), |n| n.to_string()),
            ),
            (
                "network_dropout".to_string(),
                c.lora_dropout
                    .dropout
                    .map_or("none".into(), |p| p.to_string()),
            ),
            (
                "rank_dropout".to_string(),
                c.lora_dropout.rank.map_or("none".into(), |p| p.to_string()),
            ),
            (
                "module_dropout".to_string(),
                c.lora_dropout
                    .module
                    .map_or("none".into(), |p| p.to_string()),
            ),
            (
                "train_text_encoder".to_string(),
                c.train_text_encoder.to_string(),
            ),
            (
                "text_encoder_lr".to_string(),
                match (c.train_text_encoder, c.text_encoder_lr) {
                    (false, _) => "none".into(),
                    (true, lr) => lr.unwrap_or(c.adamw.lr).to_string(),
                },
            ),
            (
                "loraplus_unet_lr_ratio".to_string(),
                c.loraplus
                    .unet_ratio()
                    .map_or("none".into(), |r| r.to_string()),
            ),
            (
                "loraplus_text_encoder_lr_ratio".to_string(),
                match c.train_text_encoder {
                    false => "none".into(),
                    true => c
                        .loraplus
                        .text_encoder_ratio()
                        .map_or("none".into(), |r| r.to_string()),
                },
            ),
            (
                "down_lr_weight".to_string(),
                c.block_lr
                    .down
                    .as_ref()
                    .map_or("none".into(), Weights::describe),
            ),
            (
                "mid_lr_weight".to_string(),
                c.block_lr
                    .mid
                    .as_ref()
                    .map_or("none".into(), Weights::describe),
            ),
            (
                "up_lr_weight".to_string(),
                c.block_lr
                    .up
                    .as_ref()
                    .map_or("none".into(), Weights::describe),
            ),
            (
                "block_lr_zero_threshold".to_string(),
                c.block_lr.zero_threshold.to_string(),
            ),
            (
                "block_dims".to_string(),
                block_dims::describe(&c.block_dims.dims),
            ),
            (
                "block_alphas".to_string(),
                block_dims::describe(&c.block_dims.alphas),
            ),
            (
                "conv_block_dims".to_string(),
                block_dims::describe(&c.block_dims.conv_dims),
            ),
            (
                "conv_block_alphas".to_string(),
                block_dims::describe(&c.block_dims.conv_alphas),
            ),
        ])
    }
}
