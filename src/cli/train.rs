//! `kstyle train`: K-StyleLoRA (or one of the baselines) on a folder of captioned images.

use super::DeviceArg;
mod choices;
mod previews;
use choices::{checkpoint_policy, expand_targets};
pub use choices::{AlgoArg, HuberScheduleArg, LossTypeArg, LrArg, MethodArg, OptimizerArg};
use indicatif::{ProgressBar, ProgressStyle};
use kstyle::backend::cpu::optim::AdamW;
use kstyle::formats::adapter::Method;
use kstyle::nn::lora::LoraConfig;
use kstyle::nn::lora_dropout::LoraDropout;
use kstyle::train::adafactor::AdafactorConfig;
use kstyle::train::adamw8bit::EightBitConfig;
use kstyle::train::block_dims::BlockDims;
use kstyle::train::buckets::KohyaBuckets;
use kstyle::train::captions::TokenWarmup;
use kstyle::train::concepts::{default_concepts, load_concepts};
use kstyle::train::config::{Algo, ConvLora};
use kstyle::train::data::CaptionSource;
use kstyle::train::dataset_config::DatasetConfig;
use kstyle::train::lion::LionConfig;
use kstyle::train::lr::{LrSchedule, LrShape};
use kstyle::train::lr_groups::{BlockLr, LoraPlus, Weights};
use kstyle::train::noise::{Multires, NoiseOffset};
use kstyle::train::optim::OptimizerKind;
use kstyle::train::optimizer_args::{check_adamw, merge, split_shared};
use kstyle::train::prodigy::ProdigyConfig;
use kstyle::train::trainer::{TrainConfig, Trainer};
use kstyle::Device;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers SDXL folder or an original-layout single .safetensors file.
    #[arg(long)]
    pub model: PathBuf,
    /// Architecture folder for a single-file model (default: built-in SDXL base).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A VAE to encode the pictures (and decode samples) with instead of the model's own: a
    /// single file (`sdxl_vae.safetensors`, a checkpoint's VAE, a diffusers-named file) read with
    /// the model's VAE config, or a diffusers VAE folder. Generate with the same --vae.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Encode the pictures (and decode samples) in tiles, as diffusers' `enable_vae_tiling()`:
    /// memory of one VAE tile at any resolution; slightly different latents (cached apart).
    #[arg(long)]
    pub vae_tiling: bool,
    /// Folder of png/jpg/webp images with same-name .txt captions; kohya's `N_name`
    /// sub-folders (`10_hanok style/`) add their images N times an epoch, captioned `name`
    /// where they have no caption file. Or a kohya dataset config (`--dataset-config`, a .toml or
    /// .json file of [general], [[datasets]] and [[datasets.subsets]]): each dataset with its own
    /// resolution, batch size and buckets, each subset an image_dir with its own num_repeats,
    /// class_tokens, is_reg, caption files and caption / flip settings; the flags give what the
    /// file leaves unset.
    #[arg(long, alias = "dataset-config")]
    pub data: PathBuf,
    /// The adapter file to write (.safetensors); the log, plot and samples go beside it.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "kstyle")]
    pub method: MethodArg,
    /// CLIP ViT-B/32 folder (HF layout): concept embeddings for gated / cultural methods.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Concepts file, one phrase a line (default: the built-in Korean traditional set).
    #[arg(long)]
    pub concepts: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (default: the rank).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// kohya's conv LoRA (LoCon, --network_args conv_dim=N): plain LoRA of this rank on every
    /// 3x3 convolution of the UNet's resnets, downsamplers and upsamplers too, and at --rank /
    /// --alpha on their 1x1 shortcuts and time-embedding projections
    #[arg(long)]
    pub conv_dim: Option<usize>,
    /// Alpha of the conv LoRA's 3x3 convolutions (kohya's conv_alpha; default 1)
    #[arg(long, requires = "conv_dim")]
    pub conv_alpha: Option<f64>,
    /// The adapters' kind (LyCORIS' --network_args algo=): lora; loha (LyCORIS' LoHa: the
    /// update dW = (w1_a w1_b) * (w2_a w2_b) alpha / rank, a Hadamard product of two rank
    /// products); or lokr (LyCORIS' LoKr: dW = kron(w1, w2) alpha / rank, w2 of rank --rank when
    /// that is below half its larger side). Plain methods only, with --rank, --alpha,
    /// --conv-dim as for LoRA
    #[arg(long, value_enum, default_value = "lora")]
    pub algo: AlgoArg,
    /// LoKr's factor (LyCORIS' --network_args factor=N): w1 takes N rows and columns where N
    /// divides the weight's sides; -1 (the default) splits each side as squarely as possible
    #[arg(long, allow_negative_numbers = true)]
    pub lokr_factor: Option<i64>,
    /// DoRA, weight-decomposed LoRA (LyCORIS' --network_args dora_wd=True): each adapted
    /// weight's output rows are rescaled to a trained magnitude after the LoRA update,
    /// W' = (W + dW) m / |W + dW|; files carry it as dora_scale (ComfyUI, A1111 and kstyle read
    /// it). With --algo lora and the plain methods
    #[arg(long)]
    pub dora_wd: bool,
    /// The paper's sigma: extra scale of the gated update.
    #[arg(long, default_value_t = 1.5)]
    pub guidance: f64,
    /// kohya's --network_dropout: each entry of every adapter's low-rank activation h A^T is
    /// dropped with this probability in training (the rest scaled by 1 / (1 - P)). 0: off
    #[arg(long, allow_negative_numbers = true)]
    pub network_dropout: Option<f64>,
    /// kohya's rank_dropout (--network_args): each rank of a picture's update is dropped with this
    /// probability in training, the update scaled by 1 / (1 - P). 0: off
    #[arg(long, allow_negative_numbers = true)]
    pub rank_dropout: Option<f64>,
    /// kohya's module_dropout (--network_args): a picture's whole update of an adapted linear is
    /// skipped with this probability in training (drawn per picture; kohya draws per batch, the
    /// same at batch size 1). 0: off
    #[arg(long, allow_negative_numbers = true)]
    pub module_dropout: Option<f64>,
    /// Weight of the cultural loss.
    #[arg(long = "lambda", default_value_t = 0.1)]
    pub lambda: f64,
    /// Min-SNR weighting of the diffusion loss (Hang et al. 2023), as diffusers' --snr_gamma and
    /// kohya's --min_snr_gamma: each sample's loss times min(SNR, gamma) / SNR (epsilon models)
    /// or / (SNR + 1) (v-prediction); 5 is the paper's choice. Off by default (KSTYLE.md's loss).
    #[arg(long, allow_negative_numbers = true)]
    pub min_snr_gamma: Option<f64>,
    /// kohya's --debiased_estimation_loss: each sample's loss also times 1 / sqrt(SNR)
    /// (epsilon) or 1 / (SNR + 1) (v-prediction), SNR capped at 1000.
    #[arg(long)]
    pub debiased_estimation_loss: bool,
    /// kohya's --scale_v_pred_loss_like_noise_pred, for v-prediction models: each sample's loss
    /// also times SNR / (SNR + 1) (SNR capped at 1000), the scale an epsilon model's loss has.
    #[arg(long)]
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// kohya's --v_pred_like_loss K, for epsilon models: each sample's loss also times
    /// 1 + K (SNR + 1) / SNR (SNR capped at 1000), adding K times a v-prediction-like loss.
    #[arg(long, allow_negative_numbers = true)]
    pub v_pred_like_loss: Option<f64>,
    /// The per-element diffusion loss (kohya's --loss_type): l2 (the MSE, KSTYLE.md's), l1,
    /// huber (pseudo-Huber 2c(sqrt(d^2 + c^2) - c)) or smooth-l1 (the same without the factor c).
    #[arg(long, value_enum, default_value = "l2")]
    pub loss_type: LossTypeArg,
    /// How the Huber threshold c moves with the timestep (kohya's --huber_schedule): snr (the
    /// default; near 1 at clean inputs, --huber-c at pure noise), exponential (--huber-scale x
    /// --huber-c^(t/1000)) or constant (--huber-c x --huber-scale).
    #[arg(long, value_enum)]
    pub huber_schedule: Option<HuberScheduleArg>,
    /// kohya's --huber_c (default 0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub huber_c: Option<f64>,
    /// kohya's --huber_scale (default 1; the snr schedule has no scale).
    #[arg(long, allow_negative_numbers = true)]
    pub huber_scale: Option<f64>,
    /// Noise offset, as diffusers' and kohya's --noise_offset: each sample's noise gets offset x
    /// one N(0, 1) draw per latent channel added, which lets the model learn darker and
    /// brighter pictures. Off by default.
    #[arg(long, allow_negative_numbers = true)]
    pub noise_offset: Option<f64>,
    /// Each visit's noise offset times one U[0, 1) draw (kohya's --noise_offset_random_strength)
    #[arg(long)]
    pub noise_offset_random_strength: bool,
    /// kohya's --adaptive_noise_scale: each channel's offset also gets this times |the channel's
    /// mean latent| (floored at 0), so bright and dark pictures get a larger shift; needs
    /// --noise-offset
    #[arg(long, allow_negative_numbers = true)]
    pub adaptive_noise_scale: Option<f64>,
    /// Multi-resolution ("pyramid") noise, kohya's --multires_noise_iterations: up to N levels of
    /// coarser N(0, 1) noise (each 2 to 4 times smaller than the last) resized up and added,
    /// then rescaled to unit spread, which teaches low-frequency changes (kohya suggests 6 to
    /// 10). After the noise offset. Off by default
    #[arg(long)]
    pub multires_noise_iterations: Option<usize>,
    /// The weight of level i is this to the power i (kohya's --multires_noise_discount)
    #[arg(long, allow_negative_numbers = true)]
    pub multires_noise_discount: Option<f64>,
    /// Input perturbation, as kohya's --ip_noise_gamma and diffusers' --input_perturbation
    /// (Ning et al. 2023): the noisy latents are built from noise + gamma x a fresh N(0, 1)
    /// draw while the loss still targets the noise; 0.1 is the paper's and kohya's suggestion.
    /// Off by default.
    #[arg(long, allow_negative_numbers = true)]
    pub ip_noise_gamma: Option<f64>,
    /// Each visit's gamma times one U[0, 1) draw (kohya's --ip_noise_gamma_random_strength)
    #[arg(long)]
    pub ip_noise_gamma_random_strength: bool,
    /// Draw training timesteps from [min, max) only (kohya's --min_timestep / --max_timestep;
    /// defaults 0 and the schedule's length, 1000 for SDXL): high ranges teach composition,
    /// low ranges detail.
    #[arg(long)]
    pub min_timestep: Option<usize>,
    #[arg(long)]
    pub max_timestep: Option<usize>,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Train plain LoRA (--rank, --alpha) on both text encoders too, as kohya does unless told
    /// --network_train_unet_only: every layer's self_attn q/k/v/out_proj and mlp fc1/fc2
    /// (text_encoder's last layer excepted: SDXL reads nothing it computes). The adapter file
    /// holds them as lora_te1_ / lora_te2_ modules. The text encoders stay loaded and run each
    /// step (captions are not cached as embeddings).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Learning rate of the text encoders' adapters (kohya's --text_encoder_lr); --lr unless
    /// given. The --lr-schedule scales both.
    #[arg(long)]
    pub text_encoder_lr: Option<f64>,
    /// LoRA+ (kohya's --network_args loraplus_lr_ratio): every lora_up steps at this many
    /// times its part's rate (the LoRA+ paper suggests 16); lora_down, K-StyleLoRA's gates and
    /// the cultural projection keep the plain rate.
    #[arg(long, allow_negative_numbers = true)]
    pub loraplus_lr_ratio: Option<f64>,
    /// LoRA+ ratio of the UNet's adapters alone (kohya's loraplus_unet_lr_ratio); wins over
    /// --loraplus-lr-ratio.
    #[arg(long, allow_negative_numbers = true)]
    pub loraplus_unet_lr_ratio: Option<f64>,
    /// LoRA+ ratio of the text encoders' adapters alone (kohya's loraplus_text_encoder_lr_ratio).
    #[arg(long, allow_negative_numbers = true)]
    pub loraplus_text_encoder_lr_ratio: Option<f64>,
    /// Block-wise learning rates of the UNet's adapters (kohya's --network_args
    /// down_lr_weight): a factor per sgm input block, input_blocks.0 first, as comma-separated
    /// numbers (missing ones are 1, an empty one is 0) or a curve over the blocks: cosine,
    /// sine, linear, reverse_linear or zeros, with an optional +base (`cosine+0.1`). SDXL has 9
    /// input blocks. A block at 0 gets no adapters at all.
    #[arg(long, allow_hyphen_values = true)]
    pub down_lr_weight: Option<String>,
    /// Factors of the middle block's parts (kohya's mid_lr_weight; SDXL: resnet, attention,
    /// resnet), comma-separated.
    #[arg(long, allow_hyphen_values = true)]
    pub mid_lr_weight: Option<String>,
    /// Factors of the output blocks, output_blocks.0 (the deepest) first (kohya's
    /// up_lr_weight), as --down-lr-weight takes them. SDXL has 9.
    #[arg(long, allow_hyphen_values = true)]
    pub up_lr_weight: Option<String>,
    /// Block weights at or below this become 0 (kohya's block_lr_zero_threshold; default 0).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub block_lr_zero_threshold: f64,
    /// Rank per UNet block of the linears' (and 1x1 convolutions') adapters (kohya's
    /// --network_args block_dims): comma-separated, one per block in kohya's numbering, the
    /// time embedding, input_blocks.0.., the middle block's parts, output_blocks.0.. and out
    /// (23 for SDXL; the first and last hold no adapters). 0 leaves a block without adapters.
    #[arg(long)]
    pub block_dims: Option<String>,
    /// Alpha per UNet block, as --block-dims counts them (kohya's block_alphas; default --alpha).
    #[arg(long, allow_hyphen_values = true)]
    pub block_alphas: Option<String>,
    /// Rank per UNet block of the conv LoRA's 3x3 convolutions (kohya's conv_block_dims;
    /// default --conv-dim, which must be given).
    #[arg(long)]
    pub conv_block_dims: Option<String>,
    /// Alpha per UNet block of the 3x3 convolutions (kohya's conv_block_alphas; default
    /// --conv-alpha).
    #[arg(long, allow_hyphen_values = true)]
    pub conv_block_alphas: Option<String>,
    /// The learning-rate schedule, as diffusers' and kohya's --lr_scheduler (same formulas):
    /// with --warmup the rate ramps from 0 (the first step runs at 0, as theirs does).
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrArg,
    /// Warm-up steps (every schedule but constant).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Restarts of cosine-with-restarts (kohya's --lr_scheduler_num_cycles; default 1).
    #[arg(long)]
    pub lr_cycles: Option<u64>,
    /// Power of the polynomial schedule (kohya's --lr_scheduler_power; default 1: linear to
    /// 1e-7).
    #[arg(long, allow_negative_numbers = true)]
    pub lr_power: Option<f64>,
    /// Decoupled weight decay. Default: each optimizer's own, as kohya constructs it: 0.01 for
    /// AdamW (torch) and AdamW8bit (bitsandbytes), 0 for Prodigy (prodigyopt) and Lion
    /// (lion-pytorch; the paper suggests 3 to 10 times AdamW's, with a rate as many times
    /// smaller).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// The first-moment decay (diffusers' --adam_beta1; Lion's beta1, the interpolation that
    /// gives the step's sign). Default 0.9.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// The second-moment decay (diffusers' --adam_beta2; Lion's beta2, its moment's decay).
    /// Default: 0.999, or 0.99 for Lion (lion-pytorch's).
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW's epsilon, added to the root of the second moment (diffusers' --adam_epsilon;
    /// Prodigy's too; Lion has none). Default 1e-8.
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// The optimizer: AdamW; AdamW8bit (kohya's --optimizer_type AdamW8bit, bitsandbytes), AdamW
    /// with both moments stored in one byte per element for every trainable of 4096 elements or
    /// more (2 bytes of state per element instead of 8); Prodigy (kohya's --optimizer_type
    /// Prodigy, prodigyopt), which estimates its own step size d and wants --lr 1; or Lion
    /// (kohya's --optimizer_type Lion, lion-pytorch), which steps every element by the rate in
    /// the direction of a sign and keeps one moment instead of two; or Lion8bit (bitsandbytes),
    /// Lion with that moment in one byte; or Adafactor (kohya's --optimizer_type AdaFactor,
    /// transformers), whose second moment is factored into row and column means and whose rate
    /// is by default its own relative step. All share AdamW's flags (--adam-beta1, --adam-beta2,
    /// --weight-decay; --adam-epsilon but for the Lions); Adafactor takes --weight-decay alone.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// The optimizer's settings as kohya's --optimizer_args spells them. Every optimizer:
    /// betas=0.9,0.999 eps=1e-8 weight_decay=0.01 (the flags' settings; given both ways they
    /// must agree). AdamW: foreach, fused (no effect). Prodigy: d0=1e-6
    /// d_coef=1 beta3=... growth_rate=inf use_bias_correction=False safeguard_warmup=False.
    /// Lion: decoupled_weight_decay=False (True divides the decay by --lr). AdamW8bit and
    /// Lion8bit: min_8bit_size=4096 (smaller trainables keep f32 moments), is_paged (no effect).
    /// Adafactor: scale_parameter=True relative_step=True warmup_init=False clip_threshold=1
    /// decay_rate=-0.8 beta1=None eps=1e-30,1e-3 (kohya's guide: scale_parameter=False
    /// relative_step=False warmup_init=False with --lr and constant-with-warmup).
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub optimizer_args: Vec<String>,
    /// Clip the global gradient norm (every trainable tensor together, of the mean over the
    /// micro-batches) to this before each step, as torch.nn.utils.clip_grad_norm_ (kohya's and
    /// diffusers' --max_grad_norm, which default to 1). Unset or 0: no clipping, KSTYLE.md's
    /// recipe. The norm before clipping is logged every step (grad_norm in the loss CSV)
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    /// kohya's --scale_weight_norms: after each step, an adapter whose (alpha / r) B A has a
    /// Frobenius norm above N gets A and B scaled back onto N (kohya suggests 1). Each step's
    /// count of scaled adapters and their mean and largest norm are logged. Unset or 0: off
    #[arg(long, allow_negative_numbers = true)]
    pub scale_weight_norms: Option<f64>,
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    /// Pictures per micro-batch (kohya's --train_batch_size): visits of one bucket (and one
    /// role) stacked through the UNet together; an epoch's last batch of a bucket holds the
    /// rest. Each optimizer step averages --grad-accum micro-batches.
    #[arg(long, alias = "train-batch-size", default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 10, conflicts_with = "max_steps")]
    pub epochs: u64,
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1024)]
    pub resolution: usize,
    /// Aspect-ratio buckets instead of square centre crops (kohya's --enable_bucket): kstyle's
    /// (sides in steps of 64 from half to twice the resolution, area at most the resolution's,
    /// up to 4:1, the nearest aspect in log space), or kohya's with any of the four below.
    #[arg(long, alias = "enable-bucket")]
    pub buckets: bool,
    /// kohya's --skip_image_resolution: leave out pictures whose area is at most N x N (or W x H
    /// given as W,H) pixels, e.g. to keep small originals out of a high-resolution run.
    #[arg(long, value_parser = parse_area)]
    pub skip_image_resolution: Option<u64>,
    /// kohya's --min_bucket_reso (256 when another of kohya's bucket flags is given): kohya's
    /// buckets, every side from this to --max-bucket-reso in --bucket-reso-steps with the
    /// resolution's area at most, a picture going to its own size when listed, else the
    /// smallest aspect-ratio difference.
    #[arg(long)]
    pub min_bucket_reso: Option<usize>,
    /// kohya's --max_bucket_reso (1024 by default; at least the resolution).
    #[arg(long)]
    pub max_bucket_reso: Option<usize>,
    /// kohya's --bucket_reso_steps (64 by default; a multiple of 8).
    #[arg(long)]
    pub bucket_reso_steps: Option<usize>,
    /// kohya's --bucket_no_upscale: each picture a bucket of its own size in steps (scaled down
    /// to the resolution's area when larger, never up), cropped to it.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Train each visit on the picture mirrored left to right with probability 1/2 (kohya's
    /// --flip_aug, diffusers' --random_flip), the crop's time ids mirrored with it. The mirrored
    /// latents are cached beside the plain ones. Not for styles whose pictures have a handedness
    /// (writing, asymmetric layouts).
    #[arg(long, alias = "random-flip")]
    pub flip_aug: bool,
    /// Cut each visit's bucket window from a random place of the scaled picture instead of its
    /// centre (kohya's --random_crop, diffusers' --random_crop), the crop's time ids with it.
    /// Only pictures whose scaled size exceeds their bucket can move; those are read and
    /// encoded by the VAE at every visit (their latents cannot be cached), the others train
    /// from the cache as before.
    #[arg(long)]
    pub random_crop: bool,
    /// Shift each visit's colours as kohya's --color_aug does: on a third of the visits a hue
    /// rotation of up to 8 of OpenCV's 180 steps or a gamma from 0.95 to 1.05, byte for byte as
    /// kohya's OpenCV and numpy calls compute them. Every picture is then read and encoded by
    /// the VAE at every visit.
    #[arg(long)]
    pub color_aug: bool,
    /// Weight each picture's diffusion loss by its alpha channel (kohya's --alpha_mask and
    /// masked loss): transparent parts do not train; alpha is resized and cropped with the
    /// picture and averaged over each latent's 8x8 pixels. Pictures without alpha train whole.
    #[arg(long)]
    pub alpha_mask: bool,
    /// Mask pictures for --data's, one per picture by file stem (png, jpg, jpeg or webp, the
    /// picture's size): their red channel weights the loss as --alpha-mask's alpha does (kohya's
    /// --masked_loss with conditioning images). --reg-data and --val-data pictures train whole.
    #[arg(long)]
    pub mask_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a resumable checkpoint every N optimizer steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Write a resumable checkpoint at the end of every N epochs (kohya's
    /// --save_every_n_epochs), counted in steps as the run counts its epochs.
    #[arg(long, conflicts_with = "save_every")]
    pub save_every_n_epochs: Option<u64>,
    /// Keep only the newest N checkpoints of this run: each older one is removed once a newer
    /// one is written (kohya's --save_last_n_steps and --save_last_n_epochs, in files).
    /// Checkpoints of later steps (left by a longer earlier run) are not touched.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Continue from a checkpoint written by --save-every.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start the adapters from this LoRA, LoHa or LoKr file (of the run's --algo) instead of
    /// fresh ones (kohya's --network_weights; kohya, LyCORIS, PEFT/diffusers or kstyle files),
    /// with a fresh optimizer. Its ranks must be the run's; the update is rescaled when its alpha
    /// differs from --alpha, so the run starts from the file's update; --dora-wd takes its
    /// magnitudes, or |W + dW| from a file without them. Every module of the file must have an
    /// adapter in the run.
    #[arg(long, conflicts_with = "resume")]
    pub network_weights: Option<PathBuf>,
    /// Take the adapters' modules, ranks and alphas (and LoKr factor shapes) from
    /// --network-weights (kohya's --dim_from_weights) instead of --rank, --alpha, --targets,
    /// --conv-dim and --lokr-factor.
    #[arg(
        long,
        requires = "network_weights",
        conflicts_with_all = ["rank", "alpha", "targets", "conv_dim", "conv_alpha"]
    )]
    pub dim_from_weights: bool,
    /// Make the previews (--sample-prompt or --sample-prompts) every N optimizer steps.
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Make the previews at the end of every N epochs (kohya's --sample_every_n_epochs).
    #[arg(long, conflicts_with = "sample_every")]
    pub sample_every_n_epochs: Option<u64>,
    /// Make the previews before the first step too, of the starting weights (kohya's
    /// --sample_at_first).
    #[arg(long)]
    pub sample_at_first: bool,
    #[arg(long)]
    pub sample_prompt: Option<String>,
    /// A kohya sample-prompt file. `.txt`: one prompt a line with options `--n negative --w
    /// 1024 --h 1024 --s 28 --l 5 --d seed --ss sampler`; `.toml`: a [prompt] table of shared
    /// settings and [[prompt.subset]] tables with prompt, negative_prompt, width, height,
    /// sample_steps, scale, seed, sample_sampler; `.json`: a list of prompt lines or such
    /// tables. Defaults: --resolution square, --sample-steps, guidance 5, --seed,
    /// --sample-sampler.
    #[arg(long, conflicts_with = "sample_prompt")]
    pub sample_prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub sample_steps: usize,
    /// The previews' sampler: one of generate's --sampler names (`auto`: the model's
    /// scheduler) or kohya's --sample_sampler names (euler_a, k_dpm_2, dpmsolver++, ...), run
    /// as generate runs it, on the model's scheduler config.
    #[arg(long, default_value = "euler")]
    pub sample_sampler: String,
    /// Caption for images without a .txt file; `{trigger}` is replaced by --trigger.
    #[arg(long)]
    pub caption_template: Option<String>,
    /// Extension of the same-name caption files (kohya's --caption_extension).
    #[arg(long, default_value = "txt")]
    pub caption_extension: String,
    /// Regularization pictures for DreamBooth prior preservation (kohya's --reg_data_dir; the
    /// layout of --data, e.g. `1_house/`), balanced against the training visits as kohya
    /// balances them. They train on the diffusion loss alone, times --prior-loss-weight.
    #[arg(long)]
    pub reg_data: Option<PathBuf>,
    /// Weight of the regularization pictures' loss (kohya's --prior_loss_weight).
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Held-out pictures (the layout of --data) scored by a validation loss with the live
    /// adapters: each picture's latent at four fixed noise levels with fixed noise, the plain
    /// MSE of the model's target, written to <stem>.val.csv and drawn on the loss plot.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Optimizer steps between validation losses (default: one epoch's; always after the last).
    #[arg(long)]
    pub val_every: Option<u64>,
    /// Train each micro-batch on the empty caption with this probability (kohya's
    /// --caption_dropout_rate), so the adapter also shapes the unconditional branch guidance
    /// reads. Off by default.
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// Reorder each visit's caption tags (comma-separated, kohya's --shuffle_caption), so the
    /// adapter does not learn their order; the text encoders then stay loaded and encode every
    /// step instead of using cached embeddings.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Read captions in up to 150 or 225 tokens instead of CLIP's 75 (kohya's
    /// --max_token_length): two or three 75-token windows through each text encoder, their
    /// states joined as kohya joins them. Preview prompts keep generate's 75.
    #[arg(long)]
    pub max_token_length: Option<usize>,
    /// Read weights in captions as kohya's --weighted_captions does: `(word:1.2)`, `(word)` x1.1
    /// and `[word]` /1.1 (A1111's syntax; `\(` for a literal bracket) are parsed away and
    /// multiply the text encoders' states of their tokens (no rescaling; the pooled embedding is
    /// not weighted). With --max-token-length, --train-text-encoder and --shuffle-caption too.
    #[arg(long)]
    pub weighted_captions: bool,
    /// With --shuffle-caption, keep the first N tags in place (kohya's --keep_tokens; a trigger
    /// word usually comes first).
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    /// kohya's --caption_dropout_every_n_epochs: every caption of every Nth epoch (the Nth, the
    /// 2Nth, ...; epochs count from 1) trains empty. 0: off.
    #[arg(long)]
    pub caption_dropout_every_n_epochs: Option<u64>,
    /// kohya's --token_warmup_step: during the first N optimizer steps a visit keeps only the
    /// first floor(step (n - min) / N) + min of its caption's n movable tags (after
    /// --keep-tokens), so training starts from the leading tags; below 1, N is that fraction of
    /// the run's steps. Captions are then encoded every step. 0: off.
    #[arg(long, allow_negative_numbers = true)]
    pub token_warmup_step: Option<f64>,
    /// kohya's --token_warmup_min: the movable tags a visit keeps at the warm-up's start.
    #[arg(long, default_value_t = 1)]
    pub token_warmup_min: usize,
    /// Drop each caption tag (after the first --keep-tokens) with this probability at every
    /// visit (kohya's --caption_tag_dropout_rate); like --shuffle-caption, captions are then
    /// encoded every step.
    #[arg(long)]
    pub caption_tag_dropout: Option<f64>,
    /// Split captions into tags on this (kohya's --caption_separator); tags are joined back with
    /// ", " as kohya joins them.
    #[arg(long, default_value = ",")]
    pub caption_separator: String,
    /// kohya's --keep_tokens_separator (e.g. "|||"): in a caption that holds it, the tags before it
    /// (and after a second one) stay in place when --shuffle-caption or --caption-tag-dropout
    /// rewrite the rest; it overrides --keep-tokens for that caption.
    #[arg(long)]
    pub keep_tokens_separator: Option<String>,
    /// kohya's --secondary_separator (e.g. ";;;"): joins words that move as one tag; replaced by
    /// the caption separator once the tags are placed (in every caption).
    #[arg(long)]
    pub secondary_separator: Option<String>,
    /// Joined before every caption with a space (kohya's --caption_prefix).
    #[arg(long)]
    pub caption_prefix: Option<String>,
    /// Joined after every caption with a space (kohya's --caption_suffix).
    #[arg(long)]
    pub caption_suffix: Option<String>,
    /// kohya's --enable_wildcard: each visit trains on one line of a multi-line caption and one
    /// option of each {a|b|c} ({{ and }} are literal braces); captions are then encoded every
    /// step. Without it only a caption file's first line is read, as kohya reads it.
    #[arg(long)]
    pub enable_wildcard: bool,
    /// The trigger phrase (the paper's "[v]").
    #[arg(long, default_value = "Korean traditional")]
    pub trigger: String,
    /// Wrapped linears, as suffixes of the UNet's module paths: any of to_q, to_k, to_v,
    /// to_out.0 (the attention projections, KSTYLE.md's default), ff.net.0.proj, ff.net.2 (the
    /// feed-forward) and proj_in, proj_out (SDXL's linear projections), or `all`: every linear
    /// of the spatial transformers, the set kohya's LoRA trains.
    #[arg(long, value_delimiter = ',', default_value = "to_q,to_k,to_v,to_out.0")]
    pub targets: Vec<String>,
    /// Hidden width G of the spatial-attention MLP.
    #[arg(long, default_value_t = 64)]
    pub gate_hidden: usize,
    /// Hidden width M of the modulation MLPs.
    #[arg(long, default_value_t = 32)]
    pub mod_hidden: usize,
    /// Side of the pooled latent in the cultural loss (default: latent side / 8).
    #[arg(long)]
    pub cultural_pool: Option<usize>,
    /// Gradient checkpointing: none, blocks (every transformer block), a number N (every Nth), or
    /// auto: the fastest that fits --memory-budget (none without a budget).
    #[arg(long, default_value = "auto")]
    pub checkpointing: String,
    /// Memory the run may hold on its device (e.g. 24GiB). The trainer measures one step under
    /// each checkpointing policy and uses the fastest that fits, or stops with the numbers.
    #[arg(long, value_parser = kstyle::train::memory::parse_bytes)]
    pub memory_budget: Option<u64>,
    /// Cache folder for latents and text embeddings (default: .kstyle-cache beside --out).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype of the frozen UNet. bf16/f16 halve its memory; the optimizer state, the
    /// losses and the adapter files stay f32 (mixed precision).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::generate::DTypeArg,
    /// Hold the frozen UNet's Linear and convolution weights in one byte each (kohya's
    /// --fp8_base; rounded as PyTorch rounds) and widen each to --dtype for its GEMM, forward
    /// and backward: SDXL's UNet then takes 2.6 GB instead of 5.1 GB (bf16). The adapter
    /// trains against the rounded weights. Default: the weights are held in --dtype.
    #[arg(long, value_enum)]
    pub weight_dtype: Option<super::generate::WeightDTypeArg>,
    /// Precision of the adapter written to --out (kohya's --save_precision): f16 or bf16 halve
    /// the file. Every tensor but the alphas is rounded once from the f32 values; checkpoints
    /// stay f32 so a resume is exact.
    #[arg(long, value_enum, default_value = "f32")]
    pub save_precision: super::generate::DTypeArg,
}

/// A block-weight flag's text, parsed (see `train::lr_groups::Weights`).
fn weights(flag: &str, text: &Option<String>, curves: bool) -> anyhow::Result<Option<Weights>> {
    Ok(text
        .as_deref()
        .map(|t| Weights::parse(flag, t, curves))
        .transpose()?)
}

pub fn config_from(a: &Args) -> anyhow::Result<TrainConfig> {
    let method = match a.method {
        MethodArg::Kstyle => Method::Kstyle,
        MethodArg::Lora => Method::Lora,
        MethodArg::LoraCsl => Method::LoraCsl,
        MethodArg::Gating => Method::Gating,
    };
    let concepts = match &a.concepts {
        Some(p) => load_concepts(p)?,
        None => default_concepts(),
    };
    let shape = match a.lr_schedule {
        LrArg::Constant => LrShape::Constant,
        LrArg::ConstantWithWarmup => LrShape::ConstantWithWarmup,
        LrArg::Linear => LrShape::Linear,
        LrArg::Cosine => LrShape::Cosine,
        LrArg::CosineWithRestarts => LrShape::CosineWithRestarts {
            cycles: a.lr_cycles.unwrap_or(1),
        },
        LrArg::Polynomial => LrShape::Polynomial {
            power: a.lr_power.unwrap_or(1.0),
        },
    };
    if a.lr_cycles.is_some() && !matches!(shape, LrShape::CosineWithRestarts { .. }) {
        anyhow::bail!("--lr-cycles needs --lr-schedule cosine-with-restarts");
    }
    if a.lr_power.is_some() && !matches!(shape, LrShape::Polynomial { .. }) {
        anyhow::bail!("--lr-power needs --lr-schedule polynomial");
    }
    let schedule = LrSchedule {
        shape,
        warmup: a.warmup,
    };
    let (noise_offset, multires) = noise_options(a)?;
    // kohya's spelling of the shared settings (betas, eps, weight_decay) in --optimizer-args,
    // beside the flags; the rest is the optimizer's own.
    let adafactor = a.optimizer == OptimizerArg::Adafactor;
    let (shared, own_args) = split_shared(&a.optimizer_args, adafactor)?;
    let beta = |i: usize| shared.betas.map(|b| if i == 0 { b.0 } else { b.1 });
    let beta1 = merge(a.adam_beta1, beta(0), ("--adam-beta1", "betas"))?;
    let beta2 = merge(a.adam_beta2, beta(1), ("--adam-beta2", "betas"))?;
    let eps = merge(a.adam_epsilon, shared.eps, ("--adam-epsilon", "eps"))?;
    let weight_decay = merge(
        a.weight_decay,
        shared.weight_decay,
        ("--weight-decay", "weight_decay"),
    )?;
    let sample_prompts = previews::sample_prompts(a)?;
    match a.keep_checkpoints {
        Some(0) => anyhow::bail!("--keep-checkpoints must be at least 1"),
        Some(_) if a.save_every.is_none() && a.save_every_n_epochs.is_none() => {
            anyhow::bail!("--keep-checkpoints needs --save-every or --save-every-n-epochs")
        }
        _ => {}
    }
    let mut cfg = TrainConfig {
        model: a.model.clone(),
        config_dir: a.config.clone(),
        vae: a.vae.clone(),
        vae_tiling: a.vae_tiling,
        data: a.data.clone(),
        dataset_config: None,
        out: a.out.clone(),
        method,
        clip: a.clip.clone(),
        concepts,
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha.unwrap_or(a.rank as f64),
            guidance: a.guidance,
            gate_hidden: a.gate_hidden,
            mod_hidden: a.mod_hidden,
        },
        // 0 is off: no draws, so the run equals one without the flag.
        lora_dropout: LoraDropout {
            dropout: a.network_dropout.filter(|&p| p != 0.0),
            rank: a.rank_dropout.filter(|&p| p != 0.0),
            module: a.module_dropout.filter(|&p| p != 0.0),
        },
        conv_lora: a.conv_dim.map(|dim| ConvLora {
            dim,
            alpha: a.conv_alpha.unwrap_or(1.0),
        }),
        algo: match (a.algo, a.lokr_factor) {
            (AlgoArg::Lokr, factor) => Algo::Lokr {
                factor: factor.unwrap_or(-1),
            },
            (_, Some(_)) => anyhow::bail!("--lokr-factor needs --algo lokr"),
            (AlgoArg::Lora, None) => Algo::Lora,
            (AlgoArg::Loha, None) => Algo::Loha,
        },
        dora: a.dora_wd,
        targets: expand_targets(&a.targets),
        lambda: a.lambda,
        min_snr_gamma: a.min_snr_gamma,
        debiased: a.debiased_estimation_loss,
        scale_v_pred_loss: a.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss: a.v_pred_like_loss,
        loss_type: a.loss_type.into(),
        huber_schedule: a.huber_schedule.map(Into::into),
        huber_c: a.huber_c,
        huber_scale: a.huber_scale,
        noise_offset,
        multires,
        // 0 is off: no draws, so the run equals one without the flag (kohya reads 0 as off).
        ip_noise_gamma: a.ip_noise_gamma.filter(|&g| g != 0.0),
        ip_noise_random_strength: a.ip_noise_gamma_random_strength,
        min_timestep: a.min_timestep,
        max_timestep: a.max_timestep,
        cultural_pool: a.cultural_pool,
        adamw: AdamW {
            lr: a.lr,
            beta1: beta1.unwrap_or(0.9),
            beta2: beta2.unwrap_or(match a.optimizer {
                OptimizerArg::Lion | OptimizerArg::Lion8bit => 0.99,
                _ => 0.999,
            }),
            eps: eps.unwrap_or(1e-8),
            weight_decay: weight_decay.unwrap_or(match a.optimizer {
                OptimizerArg::AdamW | OptimizerArg::AdamW8bit => 1e-2,
                _ => 0.0,
            }),
        },
        optimizer: match a.optimizer {
            OptimizerArg::Prodigy => OptimizerKind::Prodigy(ProdigyConfig::parse(&own_args)?),
            OptimizerArg::Lion if eps.is_some() => {
                anyhow::bail!("--adam-epsilon: Lion has no epsilon (its step is a sign)")
            }
            OptimizerArg::Lion => OptimizerKind::Lion(LionConfig::parse(&own_args)?),
            OptimizerArg::AdamW8bit => {
                OptimizerKind::AdamW8bit(EightBitConfig::parse("AdamW8bit", &own_args)?)
            }
            OptimizerArg::Lion8bit if eps.is_some() => {
                anyhow::bail!("--adam-epsilon: Lion8bit has no epsilon (its step is a sign)")
            }
            OptimizerArg::Lion8bit => {
                OptimizerKind::Lion8bit(EightBitConfig::parse("Lion8bit", &own_args)?)
            }
            OptimizerArg::AdamW => {
                check_adamw(&own_args)?;
                OptimizerKind::AdamW
            }
            OptimizerArg::Adafactor => {
                for (given, flag) in [
                    (
                        beta1.is_some() || beta2.is_some(),
                        "--adam-beta1 / --adam-beta2 / betas",
                    ),
                    (eps.is_some(), "--adam-epsilon"),
                ] {
                    if given {
                        anyhow::bail!(
                            "{flag}: Adafactor has no AdamW betas or epsilon (its settings: \
                             --optimizer-args beta1=0.9 eps=1e-30,1e-3 decay_rate=-0.8)"
                        );
                    }
                }
                OptimizerKind::Adafactor(AdafactorConfig::parse(&own_args)?)
            }
        },
        // 0 is off, as kohya and diffusers read it.
        max_grad_norm: a.max_grad_norm.filter(|&n| n != 0.0),
        scale_weight_norms: a.scale_weight_norms.filter(|&n| n != 0.0),
        schedule,
        grad_accum: a.grad_accum,
        batch_size: a.batch_size,
        epochs: a.epochs,
        max_steps: a.max_steps,
        resolution: a.resolution,
        buckets: a.buckets,
        kohya_buckets: kohya_buckets(a),
        skip_image_area: a.skip_image_resolution,
        flip_aug: a.flip_aug,
        random_crop: a.random_crop,
        color_aug: a.color_aug,
        alpha_mask: a.alpha_mask,
        mask_data: a.mask_data.clone(),
        seed: a.seed,
        save_every: a.save_every,
        save_every_epochs: a.save_every_n_epochs,
        keep_checkpoints: a.keep_checkpoints,
        resume: a.resume.clone(),
        network_weights: a.network_weights.clone(),
        dim_from_weights: a.dim_from_weights,
        sample_every: a.sample_every,
        sample_every_epochs: a.sample_every_n_epochs,
        sample_at_first: a.sample_at_first,
        sample_prompts,
        captions: CaptionSource {
            template: a.caption_template.clone(),
            trigger: a.trigger.clone(),
            extension: a.caption_extension.trim_start_matches('.').to_string(),
            prefix: a.caption_prefix.clone(),
            suffix: a.caption_suffix.clone(),
            wildcard: a.enable_wildcard,
        },
        checkpointing: checkpoint_policy(&a.checkpointing)?,
        memory_budget: a.memory_budget,
        cache_dir: a.cache.clone(),
        device: a.device.device(),
        dtype: a.dtype.dtype(),
        weight_dtype: a.weight_dtype.map(|w| w.dtype()),
        save_precision: a.save_precision.dtype(),
        train_text_encoder: a.train_text_encoder,
        text_encoder_lr: a.text_encoder_lr,
        loraplus: LoraPlus {
            ratio: a.loraplus_lr_ratio,
            unet: a.loraplus_unet_lr_ratio,
            text_encoder: a.loraplus_text_encoder_lr_ratio,
        },
        block_lr: BlockLr {
            down: weights("--down-lr-weight", &a.down_lr_weight, true)?,
            mid: weights("--mid-lr-weight", &a.mid_lr_weight, false)?,
            up: weights("--up-lr-weight", &a.up_lr_weight, true)?,
            zero_threshold: a.block_lr_zero_threshold,
        },
        block_dims: BlockDims {
            dims: a
                .block_dims
                .as_deref()
                .map(|t| BlockDims::parse_dims("--block-dims", t))
                .transpose()?,
            alphas: a
                .block_alphas
                .as_deref()
                .map(|t| BlockDims::parse_alphas("--block-alphas", t))
                .transpose()?,
            conv_dims: a
                .conv_block_dims
                .as_deref()
                .map(|t| BlockDims::parse_dims("--conv-block-dims", t))
                .transpose()?,
            conv_alphas: a
                .conv_block_alphas
                .as_deref()
                .map(|t| BlockDims::parse_alphas("--conv-block-alphas", t))
                .transpose()?,
        },
        // 0 is off: no draws, so the run equals one without the flag.
        caption_dropout: a.caption_dropout.filter(|&p| p != 0.0),
        shuffle_caption: a.shuffle_caption,
        keep_tokens: a.keep_tokens,
        max_token_length: a.max_token_length,
        weighted_captions: a.weighted_captions,
        caption_tag_dropout: a.caption_tag_dropout.filter(|&p| p != 0.0),
        // 0 is off, as kohya reads both.
        caption_dropout_every_epochs: a.caption_dropout_every_n_epochs.filter(|&n| n != 0),
        token_warmup: a
            .token_warmup_step
            .filter(|&s| s != 0.0)
            .map(|steps| TokenWarmup {
                min: a.token_warmup_min,
                steps,
            }),
        caption_separator: a.caption_separator.clone(),
        keep_tokens_separator: a.keep_tokens_separator.clone(),
        secondary_separator: a.secondary_separator.clone(),
        reg_data: a.reg_data.clone(),
        prior_loss_weight: a.prior_loss_weight,
        val_data: a.val_data.clone(),
        val_every: a.val_every,
    };
    if cfg.data.is_file() {
        DatasetConfig::load_into(&mut cfg)?;
    }
    Ok(cfg)
}

/// An area from `N` (N x N) or `W,H`.
fn parse_area(s: &str) -> Result<u64, String> {
    let sides: Result<Vec<u64>, _> = s.split(',').map(|v| v.trim().parse::<u64>()).collect();
    match sides.as_deref() {
        Ok([n]) => Ok(n * n),
        Ok([w, h]) => Ok(w * h),
        _ => Err(format!("expected N or W,H in pixels, got `{s}`")),
    }
}

/// kohya's bucketing when any of its flags is given, kohya's defaults for the rest.
fn kohya_buckets(a: &Args) -> Option<KohyaBuckets> {
    let given = a.min_bucket_reso.is_some()
        || a.max_bucket_reso.is_some()
        || a.bucket_reso_steps.is_some()
        || a.bucket_no_upscale;
    given.then(|| {
        let d = KohyaBuckets::default();
        KohyaBuckets {
            min: a.min_bucket_reso.unwrap_or(d.min),
            max: a.max_bucket_reso.unwrap_or(d.max),
            steps: a.bucket_reso_steps.unwrap_or(d.steps),
            no_upscale: a.bucket_no_upscale,
        }
    })
}

/// The noise offset (with its random strength and adaptive scale) and the multi-resolution
/// noise of `a`. 0 turns the offset and the pyramid off, as kohya reads 0; the modifiers of an
/// option that is off are refused, not ignored.
fn noise_options(a: &Args) -> anyhow::Result<(Option<NoiseOffset>, Option<Multires>)> {
    let offset = a.noise_offset.filter(|&o| o != 0.0);
    if offset.is_none() && (a.noise_offset_random_strength || a.adaptive_noise_scale.is_some()) {
        anyhow::bail!(
            "--noise-offset-random-strength and --adaptive-noise-scale modify --noise-offset, \
             which is not set"
        );
    }
    if let Some(s) = a.adaptive_noise_scale.filter(|s| !s.is_finite()) {
        anyhow::bail!("--adaptive-noise-scale must be a number, got {s}");
    }
    let iterations = a.multires_noise_iterations.filter(|&n| n != 0);
    if iterations.is_none() && a.multires_noise_discount.is_some() {
        anyhow::bail!("--multires-noise-discount needs --multires-noise-iterations");
    }
    let discount = a.multires_noise_discount.unwrap_or(0.3);
    if !(discount.is_finite() && discount >= 0.0) {
        anyhow::bail!("--multires-noise-discount must be a number of 0 or more, got {discount}");
    }
    let offset = offset.map(|offset| NoiseOffset {
        offset,
        random_strength: a.noise_offset_random_strength,
        adaptive: a.adaptive_noise_scale,
    });
    let multires = iterations.map(|iterations| Multires {
        iterations,
        discount,
    });
    Ok((offset, multires))
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    let cfg = config_from(&a)?;
    eprintln!("kstyle train: {cfg:#?}");
    let device = cfg.device;
    let mut log = |m: &str| eprintln!("{m}");
    let mut trainer = Trainer::new(cfg, &mut log)?;
    let bar = ProgressBar::new(trainer.total_steps());
    bar.set_position(trainer.state.step);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps {elapsed} (eta {eta}) {msg}")?
            .progress_chars("=> "),
    );
    // On a GPU: the device's counters after the first step and after the last, and the steps
    // between, for the transfer summary below.
    let mut stats = None;
    let mut steps_after_first = 0u64;
    trainer.run(|s| {
        if let Device::Cuda(i) = device {
            if let Ok(now) = kstyle::backend::cuda::device(i).map(|d| d.mem_stats()) {
                match &mut stats {
                    None => stats = Some((now, now)),
                    Some((_, last)) => {
                        *last = now;
                        steps_after_first += 1;
                    }
                }
            }
        }
        bar.set_position(s.step);
        let val = s.val.map_or(String::new(), |v| format!(" val {v:.4}"));
        let norms = s.weight_norms.map_or(String::new(), |w| {
            format!(" scaled {} (norm mean {:.3})", w.keys_scaled, w.mean_norm)
        });
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} grad norm {:.3e}{norms}{val}",
            s.loss, s.lr, s.grad_norm
        ));
    })?;
    bar.finish();
    if let Some((visits, ahead)) = trainer.live_reads() {
        eprintln!(
            "live pictures: {visits} visits read and cut their picture, {ahead} of them read ahead \
             on a background thread (an epoch's first batches are read when drawn)"
        );
    }
    if let Some((first, last)) = stats {
        // Steps after the first: the first also uploads what the run sets up lazily.
        let steps = steps_after_first.max(1) as f64;
        eprintln!(
            "{device}: peak {:.1} MiB; host uploads per step after the first: {:.1} ({:.2} MiB)",
            last.peak as f64 / 1048576.0,
            (last.uploads - first.uploads) as f64 / steps,
            (last.uploaded - first.uploaded) as f64 / steps / 1048576.0
        );
    }
    let o = &trainer.outputs;
    println!("adapter: {}", o.adapter.display());
    println!("log: {}\nplot: {}", o.log_csv.display(), o.plot.display());
    Ok(ExitCode::SUCCESS)
}
