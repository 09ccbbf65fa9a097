//! The settings of a training run: what `kstyle train` fills, prints at the start and records
//! in the adapter's metadata.

use super::block_dims::BlockDims;
use super::buckets::{Bucketing, KohyaBuckets};
use super::captions::TokenWarmup;
use super::data::CaptionSource;
use super::dataset_config::DatasetConfig;
use super::lr::LrSchedule;
use super::lr_groups::{BlockLr, LoraPlus};
use super::noise::{Multires, NoiseOffset};
use super::optim::OptimizerKind;
use super::samples::SamplePrompt;
use super::subsets::{Group, Names, SubsetRules};
use crate::backend::cpu::optim::AdamW;
use crate::formats::adapter::Method;
use crate::models::unet::CheckpointPolicy;
use crate::nn::lora::LoraConfig;
use crate::nn::lora_dropout::LoraDropout;
use crate::sample::schedule::{HuberSchedule, LossType};
use crate::{DType, Device, Error, Result};
use std::path::PathBuf;

/// Every setting of a run (filled by `kstyle train`, printed at its start, recorded in the
/// adapter's metadata).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub config_dir: Option<PathBuf>,
    /// A VAE that replaces the model's own for encoding the pictures and decoding samples (see
    /// [`crate::sample::model_files::ModelFiles::with_vae`]).
    pub vae: Option<PathBuf>,
    /// Encode (and decode samples) in tiles, as diffusers' `enable_vae_tiling()`.
    pub vae_tiling: bool,
    /// The pictures: a folder (see [`super::data::Dataset::scan`]), or a kohya dataset config
    /// file (`.toml` / `.json`), read into `dataset_config`.
    pub data: PathBuf,
    /// `data`'s kohya dataset config: its datasets and subsets, each with its own settings
    /// where the flags below give the defaults (see [`super::dataset_config`]). None: `data`
    /// is a folder, and the flags hold for every picture.
    pub dataset_config: Option<DatasetConfig>,
    pub out: PathBuf,
    pub method: Method,
    /// CLIP ViT-B/32 folder (HF layout) for the concept embeddings.
    pub clip: Option<PathBuf>,
    pub concepts: Vec<String>,
    pub lora: LoraConfig,
    /// kohya's LoRA dropouts (`--network_dropout`, `rank_dropout`, `module_dropout`) on every
    /// adapter's training forwards; all off by default, as kohya's.
    pub lora_dropout: LoraDropout,
    /// kohya's conv LoRA (LoCon: `--network_args conv_dim=N conv_alpha=A`): plain LoRA on every
    /// child of the UNet's resnets and resamplers as well (see [`ConvLora`]). None: off.
    pub conv_lora: Option<ConvLora>,
    /// The adapters' kind: kohya's LoRA, or LyCORIS' LoHa (see [`Algo`]).
    pub algo: Algo,
    /// DoRA (LyCORIS' `dora_wd=True`, see [`crate::nn::dora`]) on every LoRA adapter.
    pub dora: bool,
    /// Suffixes of the wrapped linears (`to_q`, `to_k`, `to_v`, `to_out.0`).
    pub targets: Vec<String>,
    pub lambda: f64,
    /// Min-SNR gamma of the diffusion loss's per-sample weights (see
    /// [`crate::sample::TrainSchedule::loss_weight`]); None: unweighted, as KSTYLE.md's loss.
    pub min_snr_gamma: Option<f64>,
    /// kohya's `--debiased_estimation_loss`: each sample's loss also times 1 / sqrt(SNR)
    /// (epsilon) or 1 / (SNR + 1) (v).
    pub debiased: bool,
    /// kohya's `--scale_v_pred_loss_like_noise_pred` (v-prediction models): each sample's loss
    /// also times SNR / (SNR + 1) (see [`crate::sample::TrainSchedule::loss_weight`]).
    pub scale_v_pred_loss: bool,
    /// kohya's `--v_pred_like_loss k` (epsilon models): each sample's loss also times
    /// 1 + k (SNR + 1) / SNR.
    pub v_pred_like_loss: Option<f64>,
    /// kohya's `--loss_type` (l2 by default: KSTYLE.md's MSE).
    pub loss_type: LossType,
    /// kohya's `--huber_schedule`, `--huber_c`, `--huber_scale` (snr, 0.1, 1 when None); only
    /// for the Huber and smooth L1 losses.
    pub huber_schedule: Option<HuberSchedule>,
    pub huber_c: Option<f64>,
    pub huber_scale: Option<f64>,
    /// Noise offset (diffusers' and kohya's `--noise_offset`): each sample's noise gets
    /// `offset * n_c` added, one N(0, 1) draw `n_c` per latent channel, so the model learns to
    /// shift the mean brightness; with kohya's random strength and adaptive scale (see
    /// [`NoiseOffset`]). None: plain N(0, 1) noise.
    pub noise_offset: Option<NoiseOffset>,
    /// kohya's multi-resolution ("pyramid") noise (see [`Multires`]), after the offset.
    pub multires: Option<Multires>,
    /// Input perturbation (kohya's `--ip_noise_gamma`, diffusers' `--input_perturbation`): the
    /// noisy latents are built from `noise + gamma * xi`, one fresh N(0, 1) draw `xi` per
    /// element, while the target keeps `noise`. None (or 0): off.
    pub ip_noise_gamma: Option<f64>,
    /// kohya's `--ip_noise_gamma_random_strength`: gamma times one U[0, 1) draw per visit.
    pub ip_noise_random_strength: bool,
    /// The timesteps drawn are `[min_timestep, max_timestep)` (kohya's `--min_timestep` /
    /// `--max_timestep`), by default 0 and the schedule's length. For EDM models, indices into
    /// the training sigmas.
    pub min_timestep: Option<usize>,
    pub max_timestep: Option<usize>,
    /// Side of the pooled latent in the cultural loss; latent side / 8 when None (16 at 1024²).
    pub cultural_pool: Option<usize>,
    /// The optimizer's rate, betas, epsilon and weight decay: AdamW's names, which Prodigy and
    /// Lion share (Lion has no epsilon).
    pub adamw: AdamW,
    /// AdamW, or kohya's `--optimizer_type Prodigy` (prodigyopt) or `Lion` (lion-pytorch), with
    /// its own settings.
    pub optimizer: OptimizerKind,
    /// Clip the global norm of each step's mean gradient (every trainable together) to this, as
    /// `torch.nn.utils.clip_grad_norm_` does (kohya's and diffusers' `--max_grad_norm`). None:
    /// no clipping (KSTYLE.md's recipe).
    pub max_grad_norm: Option<f64>,
    /// kohya's `--scale_weight_norms`: after each step, every adapter whose `(alpha / r) B A`
    /// has a Frobenius norm above this has A and B scaled back onto it (see
    /// [`super::max_norm`]). None: off.
    pub scale_weight_norms: Option<f64>,
    pub schedule: LrSchedule,
    pub grad_accum: usize,
    /// Pictures per micro-batch (kohya's `--train_batch_size`): visits of one bucket and one
    /// role, stacked; each optimizer step averages `grad_accum` of them.
    pub batch_size: usize,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub resolution: usize,
    /// kohya's `--skip_image_resolution` as an area: pictures of at most this many pixels
    /// are left out (of `data` and `reg_data`).
    pub skip_image_area: Option<u64>,
    pub buckets: bool,
    /// kohya's bucketing (`--min-bucket-reso`, `--max-bucket-reso`, `--bucket-reso-steps`,
    /// `--bucket-no-upscale`) for `buckets`; None: kstyle's buckets.
    pub kohya_buckets: Option<KohyaBuckets>,
    /// Each visit trains on the picture mirrored left to right with probability 1/2 (kohya's
    /// `--flip_aug`, diffusers' `--random_flip`); both latents are cached.
    pub flip_aug: bool,
    /// Each visit cuts the bucket's window from a random place of the scaled picture (kohya's
    /// `--random_crop`, diffusers' `--random_crop`), the crop's time ids with it; such pictures
    /// are encoded by the VAE at every visit.
    pub random_crop: bool,
    /// Each visit shifts the picture's colours as kohya's `--color_aug` does (see
    /// [`crate::image::color_aug`]); such pictures are encoded by the VAE at every visit.
    pub color_aug: bool,
    /// kohya's `--alpha_mask`: each picture's alpha channel weights its diffusion loss per latent
    /// position (see [`super::data::training_mask`]); pictures without alpha train everywhere.
    pub alpha_mask: bool,
    /// A folder of mask pictures, one per `--data` picture by file stem (kohya's masked loss with
    /// conditioning images): its red channel weights the loss as `alpha_mask`'s alpha does.
    pub mask_data: Option<PathBuf>,
    pub seed: u64,
    pub save_every: Option<u64>,
    /// A checkpoint at the end of every Nth epoch instead (kohya's `--save_every_n_epochs`):
    /// the trainer turns it into `save_every` steps.
    pub save_every_epochs: Option<u64>,
    /// Keep only the newest N checkpoints of the run: older ones are removed once a newer one
    /// is written (kohya's `--save_last_n_steps` / `--save_last_n_epochs`, counted in files).
    pub keep_checkpoints: Option<usize>,
    pub resume: Option<PathBuf>,
    /// A LoRA, LoHa or LoKr file the adapters start from instead of the fresh draw (kohya's
    /// `--network_weights`; see `train::network_weights`).
    pub network_weights: Option<PathBuf>,
    /// The adapters are the file's own modules, ranks and alphas (kohya's `--dim_from_weights`).
    pub dim_from_weights: bool,
    pub sample_every: Option<u64>,
    /// Previews at the end of every Nth epoch instead (kohya's `--sample_every_n_epochs`).
    pub sample_every_epochs: Option<u64>,
    /// Previews of the starting weights too, before the first step (kohya's
    /// `--sample_at_first`).
    pub sample_at_first: bool,
    /// The previews made every `sample_every` steps (see `train::samples`).
    pub sample_prompts: Vec<SamplePrompt>,
    pub captions: CaptionSource,
    /// Gradient checkpointing; None chooses: the fastest policy that fits `memory_budget`, or
    /// no checkpointing without a budget.
    pub checkpointing: Option<CheckpointPolicy>,
    /// Bytes the run may hold on its device (`--memory-budget`); see `train::memory`.
    pub memory_budget: Option<u64>,
    pub cache_dir: Option<PathBuf>,
    pub device: Device,
    /// Compute dtype of the frozen UNet. With bf16/f16 the adapters become leaves in that dtype
    /// while the optimizer state, the losses and the written files stay f32 (mixed precision).
    pub dtype: DType,
    /// A float8 storage type for the frozen UNet's Linear and convolution weights
    /// (`--weight-dtype`, kohya's --fp8_base); None holds them in `dtype`.
    pub weight_dtype: Option<DType>,
    /// The dtype of the adapter written to `out` (kohya's `--save_precision`); checkpoints are
    /// always f32.
    pub save_precision: DType,
    /// Plain LoRA (rank and alpha of `lora`) on both text encoders' attention and MLP linears,
    /// trained with the UNet's adapters (kohya's default; `--train-text-encoder`). The text
    /// encoders then stay loaded and run every step: captions cannot be cached as embeddings.
    pub train_text_encoder: bool,
    /// Learning rate of the text encoders' adapters (kohya's `--text_encoder_lr`); the UNet's
    /// when None. The schedule scales both.
    pub text_encoder_lr: Option<f64>,
    /// kohya's LoRA+ ratios (`--network_args loraplus_*lr_ratio`): lora_up steps that many
    /// times faster than its part's rate (see `train::lr_groups`).
    pub loraplus: LoraPlus,
    /// kohya's block-wise learning rates of the UNet's adapters (`--network_args
    /// down_lr_weight / mid_lr_weight / up_lr_weight / block_lr_zero_threshold`).
    pub block_lr: BlockLr,
    /// kohya's ranks and alphas per UNet block (`--network_args block_dims / block_alphas /
    /// conv_block_dims / conv_block_alphas`).
    pub block_dims: BlockDims,
    /// Probability that a micro-batch trains on the empty caption instead of its own (kohya's
    /// `--caption_dropout_rate`), so the adapter also learns the unconditional branch that
    /// classifier-free guidance reads. None: never.
    pub caption_dropout: Option<f64>,
    /// kohya's `--shuffle_caption`: each visit reorders its caption's comma-separated tags,
    /// keeping the first `keep_tokens` in place (`--keep_tokens`). Captions are then encoded
    /// at every step (the text encoders stay loaded).
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    /// kohya's `--caption_dropout_every_n_epochs`: every caption of the Nth, 2Nth, ... epoch
    /// (counted from 1) is dropped. None: off.
    pub caption_dropout_every_epochs: Option<u64>,
    /// kohya's token warm-up (`--token_warmup_min`, `--token_warmup_step`); None: off. The
    /// trainer resolves a fractional length against the run's steps.
    pub token_warmup: Option<TokenWarmup>,
    /// kohya's `--caption_tag_dropout_rate`: each visit drops each of its caption's tags after
    /// the first `keep_tokens` with this probability (after the shuffle).
    pub caption_tag_dropout: Option<f64>,
    /// kohya's `--max_token_length` (75, 150 or 225; None: 75): captions are read in that many
    /// tokens, as windows of CLIP's 75 joined (see `text::sdxl_conditioning`).
    pub max_token_length: Option<usize>,
    /// kohya's `--weighted_captions`: captions' `(word:1.2)`, `(word)` and `[word]` weights
    /// multiply their tokens' text-encoder states (see [`super::text::weighted_caption_ids`]).
    pub weighted_captions: bool,
    /// kohya's `--caption_separator` (`,`): what splits a caption into tags.
    pub caption_separator: String,
    /// kohya's `--keep_tokens_separator`: the tags before it (and after a second one) stay in
    /// place; see [`super::captions::TagRules`].
    pub keep_tokens_separator: Option<String>,
    /// kohya's `--secondary_separator`: binds words into one tag, then becomes the separator.
    pub secondary_separator: Option<String>,
    /// Regularization pictures (kohya's `--reg_data_dir`, the same layout as `data`): DreamBooth
    /// prior preservation. They are visited as often as kohya visits them and train on their
    /// diffusion loss times `prior_loss_weight`, without the cultural term (they are not the
    /// style).
    pub reg_data: Option<PathBuf>,
    /// kohya's `--prior_loss_weight` (1 by default).
    pub prior_loss_weight: f64,
    /// Held-out pictures (the layout of `data`, repeats ignored) scored by the validation loss
    /// (see `train::validation`); they never train.
    pub val_data: Option<PathBuf>,
    /// Optimizer steps between validation losses (and always after the last); one epoch's
    /// steps when None.
    pub val_every: Option<u64>,
}

/// The adapters' kind (LyCORIS' `--network_args algo=`): every adapter of a run, the text
/// encoders' and the conv group's too, is of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algo {
    /// kohya's LoRA (`networks.lora`), plain or K-StyleLoRA's gated form.
    #[default]
    Lora,
    /// LyCORIS' LoHa (`lycoris.kohya`, `algo=loha`): dW = (w1_a w1_b) ⊙ (w2_a w2_b) alpha / r,
    /// always plain (see [`crate::nn::lycoris`]).
    Loha,
    /// LyCORIS' LoKr (`algo=lokr factor=N`): dW = kron(w1, w2) alpha / r, each side of the
    /// weight split by LyCORIS' `factorization(dim, factor)` (-1: as square as possible); always
    /// plain.
    Lokr { factor: i64 },
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Lora => "lora",
            Algo::Loha => "loha",
            Algo::Lokr { .. } => "lokr",
        }
    }

    /// The LyCORIS algorithm; None for LoRA.
    pub fn lycoris(self) -> Option<crate::nn::lycoris::LycorisAlgo> {
        use crate::nn::lycoris::LycorisAlgo;
        match self {
            Algo::Lora => None,
            Algo::Loha => Some(LycorisAlgo::Loha),
            Algo::Lokr { .. } => Some(LycorisAlgo::Lokr),
        }
    }
}

/// kohya's conv LoRA (sd-scripts networks/lora.py with `conv_dim`): the UNet's `ResnetBlock2D`,
/// `Downsample2D` and `Upsample2D` join the targets. Their 3x3 convolutions get rank `dim` and
/// alpha `alpha`; the 1x1 `conv_shortcut`s and the `time_emb_proj` linears get the network's own
/// rank and alpha (kohya's `is_linear or is_conv2d_1x1` rule). Always plain LoRA, whatever the
/// method: the gates pool a token sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvLora {
    pub dim: usize,
    /// kohya's default is 1.
    pub alpha: f64,
}

impl ConvLora {
    /// The rank and alpha of the adapter on a layer whose frozen weight is `dims`.
    pub fn config_for(&self, dims: &[usize], network: LoraConfig) -> LoraConfig {
        match dims {
            [_, _, kh, kw] if (*kh, *kw) != (1, 1) => LoraConfig {
                rank: self.dim,
                alpha: self.alpha,
                ..network
            },
            _ => network,
        }
    }
}

impl TrainConfig {
    /// What LoHa and LoKr cannot do, refused before anything runs rather than silently changed:
    /// the gated methods modulate LoRA's rank-r activation, which they have not (they build a
    /// weight); LyCORIS' LoHa and LoKr have no network dropout, and their rank dropout drops rows
    /// of dW once a batch (kstyle's drops a rank of each picture's update); their max-norm scales
    /// a separate scalar kept through training; and LoRA+ raises lora_up's rate, a factor they
    /// have not.
    fn check_lycoris(&self) -> Result<()> {
        let algo = self.algo.name();
        if let Algo::Lokr { factor } = self.algo {
            if factor == 0 || factor < -1 {
                return Err(Error::Config(format!(
                    "--lokr-factor is a positive number or -1 (as square as possible), got {factor}"
                )));
            }
        }
        let refuse = |what: &str| {
            Err(Error::Config(format!(
                "--algo {algo} {what}; leave it out or use --algo lora"
            )))
        };
        self.check_weight_space(
            &refuse,
            "LyCORIS' LoHa and LoKr have no network dropout, and its rank dropout",
        )?;
        if self.loraplus.unet_ratio().is_some() || self.loraplus.text_encoder_ratio().is_some() {
            return refuse("has no lora_up for --loraplus-*-ratio to raise (LyCORIS' LoRA+ moves none of its factors)");
        }
        Ok(())
    }

    /// What DoRA cannot do, refused as for LoHa and LoKr: the gated methods (DoRA trains a
    /// weight, not a rank-r activation to gate), the network and rank dropouts (LyCORIS ignores
    /// the first with DoRA and drops rows of dW with the second) and max-norm (LyCORIS scales a
    /// separate scalar). On LoHa and LoKr it is LyCORIS' DoHa / DoKr.
    fn check_dora(&self) -> Result<()> {
        let refuse = |what: &str| {
            Err(Error::Config(format!(
                "--dora-wd {what}; leave --dora-wd out for plain LoRA"
            )))
        };
        self.check_weight_space(
            &refuse,
            "LyCORIS ignores the network dropout with DoRA, and its rank dropout",
        )
    }

    /// `--network-weights` starts LoRA (and DoRA) factors of a fresh run: not a resumed one (the
    /// checkpoint holds its own), not the gated methods' adapters (a plain LoRA file has no gates
    /// and its update is not theirs), not LoHa or LoKr.
    fn check_network_weights(&self) -> Result<()> {
        let refuse = |what: &str| {
            Err(Error::Config(format!(
                "--network-weights starts a fresh run's LoRA from a file, {what}"
            )))
        };
        if self.resume.is_some() {
            return refuse(
                "and --resume continues a checkpoint, which holds its own: pass one of them",
            );
        }
        if self.method.gated() {
            return refuse(&format!(
                "and method `{}` gates LoRA's rank (a plain LoRA's update is not a gated one): \
                 use --method lora or lora-csl",
                self.method.name()
            ));
        }
        if self.dim_from_weights && (self.block_dims.is_set() || self.block_lr.is_set()) {
            return refuse(
                "and --dim-from-weights takes its modules and ranks as they are: leave the block \
                 ranks and block learning-rate weights out",
            );
        }
        Ok(())
    }

    /// The refusals LoHa, LoKr and DoRA share, each worded by `refuse`: the gated methods, the
    /// network and rank dropouts (`dropouts` says what LyCORIS does with them) and max-norm.
    fn check_weight_space(
        &self,
        refuse: &dyn Fn(&str) -> Result<()>,
        dropouts: &str,
    ) -> Result<()> {
        if self.method.gated() {
            return refuse(&format!(
                "trains plain adapters, and method `{}` gates LoRA's rank: use --method lora or lora-csl",
                self.method.name()
            ));
        }
        if self.lora_dropout.dropout.is_some() || self.lora_dropout.rank.is_some() {
            return refuse(&format!(
                "takes --module-dropout only: {dropouts} (rows of dW, once a batch) is not kstyle's \
                 (a rank of each picture)"
            ));
        }
        if self.scale_weight_norms.is_some() {
            return refuse("has no --scale-weight-norms (LyCORIS scales a separate scalar)");
        }
        Ok(())
    }

    /// Refuses settings that are wrong on their own, before anything is read or written: counts
    /// of 0, probabilities and decays out of range, non-finite or negative weights, a compute
    /// dtype training cannot use, options that modify one that is off.
    pub fn check(&self) -> Result<()> {
        if let Some(c) = &self.conv_lora {
            if c.dim == 0 || !c.alpha.is_finite() {
                return Err(Error::Config(format!(
                    "--conv-dim must be at least 1 and --conv-alpha a number (got {} and {}); leave --conv-dim out for no conv LoRA",
                    c.dim, c.alpha
                )));
            }
        }
        let b = &self.block_dims;
        if self.conv_lora.is_none() && (b.conv_dims.is_some() || b.conv_alphas.is_some()) {
            return Err(Error::Config(
                "--conv-block-dims / --conv-block-alphas set the conv LoRA's 3x3 ranks per block: \
                 turn the conv group on with --conv-dim (the rank of blocks they leave out)"
                    .into(),
            ));
        }
        if b.conv_alphas.is_some() && b.conv_dims.is_none() {
            return Err(Error::Config(
                "--conv-block-alphas goes with --conv-block-dims (kohya reads it only then); \
                 --conv-alpha sets one alpha for every block"
                    .into(),
            ));
        }
        if self.dora {
            self.check_dora()?;
        }
        if self.network_weights.is_some() {
            self.check_network_weights()?;
        } else if self.dim_from_weights {
            return Err(Error::Config(
                "--dim-from-weights takes the modules, ranks and alphas of --network-weights FILE: pass one"
                    .into(),
            ));
        }
        if self.algo != Algo::Lora {
            self.check_lycoris()?;
        }
        if let Some(k) = &self.kohya_buckets {
            if !self.buckets && self.dataset_config.is_none() {
                return Err(Error::Config(
                    "--min-bucket-reso, --max-bucket-reso, --bucket-reso-steps and \
                     --bucket-no-upscale shape --buckets' buckets: pass --buckets"
                        .into(),
                ));
            }
            if self.dataset_config.is_none() {
                k.check(self.resolution, Names::Flags)
                    .map_err(Error::Config)?;
            }
        }
        if self.grad_accum == 0 {
            return Err(Error::Config("--grad-accum must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("--batch-size must be at least 1".into()));
        }
        if let Some(n) = self.max_token_length {
            if ![75, 150, 225].contains(&n) {
                return Err(Error::Config(format!(
                    "--max-token-length {n}: kohya's are 75, 150 and 225 (one, two or three of \
                     CLIP's 75-token windows)"
                )));
            }
        }
        if self.dataset_config.is_none() {
            // A dataset config checks each subset's own rules as it is read.
            self.subset_rules()
                .check(self.token_warmup, Names::Flags)
                .map_err(Error::Config)?;
        }
        if let Some(w) = self.token_warmup {
            if !(w.steps.is_finite() && w.steps > 0.0) {
                return Err(Error::Config(format!(
                    "--token-warmup-step must be a positive number of steps (below 1: a fraction \
                     of the run; 0 turns the warm-up off), got {}",
                    w.steps
                )));
            }
        }
        let adam = &self.adamw;
        for (name, beta) in [("--adam-beta1", adam.beta1), ("--adam-beta2", adam.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::Config(format!(
                    "{name} is a decay from 0 up to (not including) 1, got {beta}"
                )));
            }
        }
        if !(adam.eps.is_finite() && adam.eps > 0.0) {
            return Err(Error::Config(format!(
                "--adam-epsilon must be a positive number, got {}",
                adam.eps
            )));
        }
        let d = self.lora_dropout;
        for (p, flag) in [
            (d.dropout, "--network-dropout"),
            (d.rank, "--rank-dropout"),
            (d.module, "--module-dropout"),
        ] {
            if let Some(p) = p.filter(|p| !(p.is_finite() && *p > 0.0 && *p < 1.0)) {
                return Err(Error::Config(format!(
                    "{flag} is a probability below 1 (0 turns it off), got {p}"
                )));
            }
        }
        if let Some(n) = self
            .scale_weight_norms
            .filter(|n| !(n.is_finite() && *n > 0.0))
        {
            return Err(Error::Config(format!(
                "--scale-weight-norms must be a positive number (0 turns it off), got {n}"
            )));
        }
        if let Some(n) = self.max_grad_norm.filter(|n| !(n.is_finite() && *n > 0.0)) {
            return Err(Error::Config(format!(
                "--max-grad-norm must be a positive number (0 turns clipping off), got {n}"
            )));
        }
        if !(adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return Err(Error::Config(format!(
                "--weight-decay must be a number of 0 or more, got {}",
                adam.weight_decay
            )));
        }
        if !self.dtype.is_float() || self.dtype == DType::F64 || self.dtype.is_storage_only() {
            return Err(Error::Config(format!(
                "training computes in f32, bf16 or f16, not {}",
                self.dtype
            )));
        }
        if let Some(w) = self.weight_dtype.filter(|w| !w.is_storage_only()) {
            return Err(Error::Config(format!(
                "--weight-dtype stores weights as float8 (f8e4m3, f8e5m2), not {w}; the \
                 compute dtype is --dtype"
            )));
        }
        if self.resolution % 8 != 0 || self.resolution == 0 {
            return Err(Error::Config(format!(
                "--resolution must be a positive multiple of 8, got {}",
                self.resolution
            )));
        }
        if let Some(o) = self.noise_offset.map(|o| o.offset) {
            if !(o.is_finite() && o >= 0.0) {
                return Err(Error::Config(format!(
                    "--noise-offset must be a number of 0 or more, got {o}"
                )));
            }
        }
        if let Some(g) = self.ip_noise_gamma {
            if !(g.is_finite() && g >= 0.0) {
                return Err(Error::Config(format!(
                    "--ip-noise-gamma must be a number of 0 or more, got {g}"
                )));
            }
        } else if self.ip_noise_random_strength {
            return Err(Error::Config(
                "--ip-noise-gamma-random-strength modifies --ip-noise-gamma, which is not set"
                    .into(),
            ));
        }
        if let Some(k) = self.v_pred_like_loss {
            if !(k.is_finite() && k > 0.0) {
                return Err(Error::Config(format!(
                    "--v-pred-like-loss must be a positive number, got {k}"
                )));
            }
        }
        if let Some(g) = self.min_snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::Config(format!(
                    "--min-snr-gamma must be a positive number, got {g}"
                )));
            }
        }
        if let Some(dir) = &self.mask_data {
            if self.alpha_mask {
                return Err(Error::Config(
                    "--alpha-mask and --mask-data both give the loss mask: pass one".into(),
                ));
            }
            if !dir.is_dir() {
                return Err(Error::file(dir, "--mask-data: not a folder"));
            }
        }
        let reg_subsets = self
            .dataset_config
            .as_ref()
            .is_some_and(DatasetConfig::has_reg);
        if self.reg_data.is_some() && self.dataset_config.is_some() {
            return Err(Error::file(
                &self.data,
                "--reg-data with a dataset config: list the regularization pictures in it as a \
                 subset with `is_reg = true` (kohya ignores --reg_data_dir there)",
            ));
        }
        if self.prior_loss_weight != 1.0 && self.reg_data.is_none() && !reg_subsets {
            let m = "--prior-loss-weight weights --reg-data's pictures";
            return Err(match self.dataset_config {
                Some(_) => Error::file(
                    &self.data,
                    format!("{m}: the dataset config has no subset with `is_reg = true`"),
                ),
                None => Error::Config(format!("{m}: pass --reg-data DIR")),
            });
        }
        if !(self.prior_loss_weight.is_finite() && self.prior_loss_weight >= 0.0) {
            return Err(Error::Config(format!(
                "--prior-loss-weight must be a number of 0 or more, got {}",
                self.prior_loss_weight
            )));
        }
        self.schedule.check(self.adamw.lr)?;
        if let Some(lr) = self.text_encoder_lr {
            if !self.train_text_encoder {
                return Err(Error::Config(
                    "--text-encoder-lr needs --train-text-encoder".into(),
                ));
            }
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(Error::Config(format!(
                    "--text-encoder-lr must be a number of 0 or more, got {lr}"
                )));
            }
        }
        self.loraplus.check()?;
        if let OptimizerKind::Adafactor(c) = &self.optimizer {
            c.check()?;
            // The relative step replaces the rate: nothing that sets a rate would act.
            let rates = [
                (
                    self.schedule != super::lr::LrSchedule::CONSTANT,
                    "--lr-schedule / --warmup",
                ),
                (self.loraplus.unet_ratio().is_some(), "--loraplus-*-ratio"),
                (
                    self.loraplus.text_encoder_ratio().is_some(),
                    "--loraplus-*-ratio",
                ),
                (self.text_encoder_lr.is_some(), "--text-encoder-lr"),
                (self.block_lr.is_set(), "--down/mid/up-lr-weight"),
            ];
            if let (true, Some((_, flag))) = (c.relative_step, rates.iter().find(|r| r.0)) {
                return Err(Error::Config(format!(
                    "{flag}: Adafactor's relative step sets its own rate, min(1e-2, 1/sqrt(t)) \
                     times RMS(p), so no rate, schedule or rate ratio acts on it; pass \
                     --optimizer-args relative_step=False to train at --lr"
                )));
            }
        }
        if let OptimizerKind::Lion(l) = &self.optimizer {
            if l.decoupled_weight_decay && self.adamw.lr <= 0.0 {
                return Err(Error::Config(format!(
                    "Lion's decoupled_weight_decay divides the decay by --lr, which is {}",
                    self.adamw.lr
                )));
            }
        }
        if let Some(p) = &self.optimizer.prodigy() {
            p.check()?;
            if self.loraplus.unet_ratio().is_some() || self.loraplus.text_encoder_ratio().is_some()
            {
                return Err(Error::Config(
                    "LoRA+ gives lora_up its own learning rate, and Prodigy steps every \
                     trainable at one rate: drop --loraplus-*-ratio or use --optimizer adamw"
                        .into(),
                ));
            }
            if let Some(lr) = self
                .text_encoder_lr
                .filter(|&l| l != 0.0 && l != self.adamw.lr)
            {
                return Err(Error::Config(format!(
                    "Prodigy steps every trainable at one rate (or 0): --text-encoder-lr {lr} \
                     differs from --lr {}",
                    self.adamw.lr
                )));
            }
        }
        if self.loraplus.text_encoder.is_some() && !self.train_text_encoder {
            return Err(Error::Config(
                "--loraplus-text-encoder-lr-ratio needs --train-text-encoder".into(),
            ));
        }
        if !self.block_lr.zero_threshold.is_finite() {
            return Err(Error::Config(format!(
                "--block-lr-zero-threshold must be a number, got {}",
                self.block_lr.zero_threshold
            )));
        }
        if self.block_lr.zero_threshold != 0.0 && !self.block_lr.is_set() {
            return Err(Error::Config(
                "--block-lr-zero-threshold applies to --down-lr-weight, --mid-lr-weight or \
                 --up-lr-weight: pass one of those"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether the run makes previews (every N steps, every N epochs, or at first).
    pub fn previews(&self) -> bool {
        self.sample_every.is_some() || self.sample_every_epochs.is_some() || self.sample_at_first
    }

    /// Whether pictures carry a loss mask (`--alpha-mask` or `--mask-data`).
    pub fn masked_loss(&self) -> bool {
        self.alpha_mask || self.mask_data.is_some()
    }

    /// CLIP windows a caption is read in: `--max-token-length` / 75 (1 by default).
    pub fn caption_chunks(&self) -> usize {
        self.max_token_length.map_or(1, |n| n / 75)
    }

    /// The flags' rules for the pictures of a run without a dataset config.
    pub fn subset_rules(&self) -> SubsetRules {
        SubsetRules {
            flip_aug: self.flip_aug,
            random_crop: self.random_crop,
            color_aug: self.color_aug,
            caption_dropout: self.caption_dropout,
            caption_dropout_every_epochs: self.caption_dropout_every_epochs,
            shuffle_caption: self.shuffle_caption,
            keep_tokens: self.keep_tokens,
            caption_tag_dropout: self.caption_tag_dropout,
            caption_separator: self.caption_separator.clone(),
            keep_tokens_separator: self.keep_tokens_separator.clone(),
            secondary_separator: self.secondary_separator.clone(),
            wildcard: self.captions.wildcard,
        }
    }

    /// The flags' resolution, batch size and buckets, for a run without a dataset config.
    pub fn group(&self) -> Group {
        Group {
            resolution: self.resolution,
            batch_size: self.batch_size,
            skip_area: self.skip_image_area,
            buckets: match (self.buckets, self.kohya_buckets) {
                (false, _) => Bucketing::Off,
                (true, None) => Bucketing::Kstyle,
                (true, Some(k)) => Bucketing::Kohya(k),
            },
        }
    }

    /// Every dataset's resolution, batch size and buckets: the dataset config's, or the flags'.
    pub fn groups(&self) -> Vec<Group> {
        match &self.dataset_config {
            Some(d) => d.datasets.iter().map(|g| g.group.clone()).collect(),
            None => vec![self.group()],
        }
    }

    /// Every subset's rules: the dataset config's, or the flags' alone.
    pub fn all_rules(&self) -> Vec<SubsetRules> {
        match &self.dataset_config {
            Some(d) => d.rules(),
            None => vec![self.subset_rules()],
        }
    }

    /// Whether any caption is rewritten per visit (captions are then encoded every step).
    pub fn live_captions(&self) -> bool {
        self.all_rules().iter().any(|r| r.live(self.token_warmup))
    }

    /// Whether any picture is ever mirrored.
    pub fn any_flip(&self) -> bool {
        self.all_rules().iter().any(|r| r.flip_aug)
    }

    /// Whether any caption ever drops out.
    pub fn any_caption_dropout(&self) -> bool {
        self.all_rules().iter().any(SubsetRules::drops)
    }

    /// The batch sizes as the adapter records them (and a resume compares them): the run's, or
    /// each dataset's in the config's order, comma-separated.
    pub fn batch_sizes(&self) -> String {
        match &self.dataset_config {
            Some(_) => {
                let sizes: Vec<String> = self
                    .groups()
                    .iter()
                    .map(|g| g.batch_size.to_string())
                    .collect();
                sizes.join(",")
            }
            None => self.batch_size.to_string(),
        }
    }
}
