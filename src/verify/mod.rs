//! `kstyle verify DIR`: run every reference case present in a fixtures directory against that
//! directory's own models and report one row per checked tensor. The format is the contract of
//! the fixtures README; nothing here assumes the sizes of the shipped tiny models.

mod adafactor_case;
mod clip_cases;
pub mod cuda_parity;
mod eight_bit_case;
pub mod extra_cases;
mod layer_cases;
mod lion_case;
mod mask_crop_case;
mod optim_steps;
mod pipeline_case;
mod prodigy_case;
mod prompt_case;
mod sampler_cases;
pub mod sweep;
mod train_cases;
mod train_edm_case;
mod train_te_case;
mod unet_cases;
mod vae_cases;

use crate::tensor::SafeTensorsFile;
use crate::tolerance::{compare, Tolerance};
use crate::{Device, Error, Result, Tensor};
use std::path::{Path, PathBuf};

/// One checked tensor.
#[derive(Clone, Debug)]
pub struct Row {
    pub case: String,
    pub tensor: String,
    /// `||out - ref|| / ||ref||`
    pub error: f64,
    /// The allowed relative error (including any absolute floor, divided by `||ref||`).
    pub tolerance: f64,
    pub passed: bool,
}

/// Everything one run found.
#[derive(Default, Debug)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Cases present in the directory that could not run, with the reason.
    pub failed_cases: Vec<(String, String)>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.rows.iter().filter(|r| r.passed).count()
    }
    pub fn failed(&self) -> usize {
        self.rows.len() - self.passed() + self.failed_cases.len()
    }
    pub fn ok(&self) -> bool {
        self.failed() == 0 && !self.rows.is_empty()
    }
}

/// Where one case's inputs live and how it runs.
pub struct Ctx {
    pub dir: PathBuf,
    pub device: Device,
    /// Forward and gradient tolerances for this device (f32 on CPU, bf16 presets on CUDA).
    pub forward: Tolerance,
    pub grad: Tolerance,
}

impl Ctx {
    pub fn new(dir: impl Into<PathBuf>, device: Device) -> Ctx {
        let (forward, grad) = match device {
            Device::Cpu => (Tolerance::F32_FORWARD, Tolerance::F32_GRAD),
            Device::Cuda(_) => (Tolerance::BF16_FORWARD, Tolerance::BF16_GRAD),
        };
        Ctx {
            dir: dir.into(),
            device,
            forward,
            grad,
        }
    }

    pub fn reference(&self, file: &str) -> PathBuf {
        self.dir.join("reference").join(file)
    }
}

/// Collects rows for one case.
pub struct Checker {
    case: String,
    pub rows: Vec<Row>,
}

impl Checker {
    pub fn new(case: &str) -> Checker {
        Checker {
            case: case.to_string(),
            rows: Vec::new(),
        }
    }

    pub fn check(
        &mut self,
        name: &str,
        out: &Tensor,
        reference: &Tensor,
        tol: Tolerance,
    ) -> Result<()> {
        let c = compare(out, reference, tol)?;
        let denom = if c.ref_norm > 0.0 { c.ref_norm } else { 1.0 };
        self.rows.push(Row {
            case: self.case.clone(),
            tensor: name.into(),
            error: c.relative(),
            tolerance: c.limit / denom,
            passed: c.passed(),
        });
        Ok(())
    }

    /// Exact equality (token ids, bit-for-bit weights).
    pub fn check_exact(&mut self, name: &str, equal: bool, mismatches: f64) {
        self.rows.push(Row {
            case: self.case.clone(),
            tensor: name.into(),
            error: mismatches,
            tolerance: 0.0,
            passed: equal,
        });
    }
}

/// The gradient tolerance floor of the fixtures README: `1e-9 * max_k ||ref_k||` over the
/// tensors of one kind (all `grad.*`, all `after_adamw.*`) in a file.
pub fn max_norm(f: &SafeTensorsFile, prefix: &str) -> Result<f64> {
    let mut m: f64 = 0.0;
    for n in f.names().filter(|n| n.starts_with(prefix)) {
        m = m.max(crate::tolerance::l2(&f.tensor(n)?.to_vec_f64()?));
    }
    Ok(m)
}

type CaseFn = fn(&Ctx) -> Result<Vec<Row>>;

/// Every case: its name, the reference file whose presence enables it, and its runner.
pub fn cases() -> Vec<(&'static str, &'static str, CaseFn)> {
    vec![
        // The single file sits beside reference/, not in it.
        (
            "single_file",
            "../sdxl_single_file.safetensors",
            unet_cases::single_file,
        ),
        ("tokenizer", "tokenizer_cases.json", clip_cases::tokenizer),
        (
            "text_encoders",
            "text_encoders.safetensors",
            clip_cases::text_encoders,
        ),
        ("unet", "unet.safetensors", unet_cases::unet),
        (
            "unet_kohya_lora",
            "unet_kohya_lora.safetensors",
            unet_cases::unet_kohya_lora,
        ),
        ("vae", "vae.safetensors", vae_cases::vae),
        ("pipeline", "pipeline.safetensors", pipeline_case::pipeline),
        ("clip", "clip.safetensors", clip_cases::clip),
        ("lpips", "lpips.safetensors", vae_cases::lpips),
        (
            "gated_lora_layer",
            "gated_lora_layer.safetensors",
            layer_cases::gated_lora_layer,
        ),
        (
            "cultural_loss",
            "cultural_loss.safetensors",
            layer_cases::cultural_loss,
        ),
        (
            "train_step_kstyle",
            "train_step_kstyle.safetensors",
            train_cases::train_step_kstyle,
        ),
        (
            "train_step_lora",
            "train_step_lora.safetensors",
            train_cases::train_step_lora,
        ),
        // The project's own references, in extra/ beside the fixtures folder.
        (
            "samplers",
            "../../extra/pipeline_dpmpp_2m.safetensors",
            sampler_cases::samplers,
        ),
        (
            "img2img",
            "../../extra/img2img.safetensors",
            extra_cases::img2img,
        ),
        (
            "inpaint",
            "../../extra/inpaint.safetensors",
            extra_cases::inpaint,
        ),
        (
            "mask_crop",
            "../../extra/mask_crop.safetensors",
            mask_crop_case::mask_crop,
        ),
        (
            "refiner",
            "../../extra/refiner.safetensors",
            extra_cases::refiner,
        ),
        (
            "micro_conditioning",
            "../../extra/micro_conditioning.safetensors",
            extra_cases::micro_conditioning,
        ),
        ("edm", "../../extra/edm.safetensors", extra_cases::edm),
        (
            "textual_inversion",
            "../../extra/textual_inversion.safetensors",
            extra_cases::textual_inversion,
        ),
        (
            "refiner_lora",
            "../../extra/refiner_lora_reference.safetensors",
            extra_cases::refiner_lora,
        ),
        (
            "train_vpred",
            "../../extra/train_vpred.safetensors",
            train_cases::train_vpred,
        ),
        (
            "train_min_snr",
            "../../extra/train_min_snr.safetensors",
            train_cases::train_min_snr,
        ),
        (
            "train_ip_noise",
            "../../extra/train_ip_noise.safetensors",
            train_cases::train_ip_noise,
        ),
        (
            "train_loss_types",
            "../../extra/train_loss_types.safetensors",
            train_cases::train_loss_types,
        ),
        (
            "train_clip_grad",
            "../../extra/train_clip_grad.safetensors",
            train_cases::train_clip_grad,
        ),
        (
            "lora_dropout",
            "../../extra/lora_dropout.safetensors",
            layer_cases::lora_dropout,
        ),
        (
            "max_norm",
            "../../extra/max_norm.safetensors",
            layer_cases::max_norm_regularization,
        ),
        (
            "prodigy",
            "../../extra/prodigy.safetensors",
            prodigy_case::prodigy,
        ),
        ("lion", "../../extra/lion.safetensors", lion_case::lion),
        (
            "adafactor",
            "../../extra/adafactor.safetensors",
            adafactor_case::adafactor,
        ),
        (
            "adamw8bit",
            "../../extra/adamw8bit.safetensors",
            eight_bit_case::adamw8bit,
        ),
        (
            "lion8bit",
            "../../extra/lion8bit.safetensors",
            eight_bit_case::lion8bit,
        ),
        (
            "train_targets",
            "../../extra/train_targets_lora.safetensors",
            train_cases::train_targets,
        ),
        (
            "train_locon",
            "../../extra/train_locon.safetensors",
            train_cases::train_locon,
        ),
        (
            "train_loha",
            "../../extra/train_loha.safetensors",
            train_cases::train_loha,
        ),
        (
            "train_lokr",
            "../../extra/train_lokr.safetensors",
            train_cases::train_lokr,
        ),
        (
            "train_dora",
            "../../extra/train_dora.safetensors",
            train_cases::train_dora,
        ),
        (
            "train_doha",
            "../../extra/train_doha.safetensors",
            train_cases::train_doha,
        ),
        (
            "train_dokr",
            "../../extra/train_dokr.safetensors",
            train_cases::train_dokr,
        ),
        (
            "train_edm",
            "../../extra/train_edm.safetensors",
            train_edm_case::train_edm,
        ),
        (
            "train_text_encoder",
            "../../extra/train_text_encoder.safetensors",
            train_te_case::train_text_encoder,
        ),
        (
            "lora_lycoris",
            "../../extra/lycoris_reference.safetensors",
            extra_cases::lora_lycoris,
        ),
        (
            "lora_peft",
            "../../extra/peft_reference.safetensors",
            extra_cases::lora_peft,
        ),
        (
            "lora_export",
            "../../extra/export_reference.safetensors",
            extra_cases::lora_export,
        ),
        (
            "vae_latent_stats",
            "../../extra/vae_latent_stats.safetensors",
            extra_cases::vae_latent_stats,
        ),
        (
            "vae_file",
            "../../extra/vae_file_reference.safetensors",
            extra_cases::vae_file,
        ),
        (
            "vae_tiling",
            "../../extra/vae_tiling.safetensors",
            extra_cases::vae_tiling,
        ),
        (
            "clip_skip",
            "../../extra/clip_skip.safetensors",
            extra_cases::clip_skip,
        ),
        (
            "long_captions",
            "../../extra/long_captions.safetensors",
            train_te_case::long_captions,
        ),
        (
            "weighted_captions",
            "../../extra/weighted_captions.safetensors",
            train_te_case::weighted_captions,
        ),
        (
            "prompt_weighting",
            "../../extra/prompt_weighting.safetensors",
            prompt_case::prompt_weighting,
        ),
        (
            "prompt_editing",
            "../../extra/prompt_editing.safetensors",
            prompt_case::prompt_editing,
        ),
    ]
}

/// Run the cases present in `dir` (all of them, or those named in `only`).
/// The names of every reference case, in the order `run` runs them.
pub fn case_names() -> Vec<&'static str> {
    cases().into_iter().map(|(name, _, _)| name).collect()
}

pub fn run(dir: &Path, device: Device, only: Option<&[String]>) -> Result<Report> {
    if !dir.join("reference").is_dir() {
        return Err(Error::file(
            dir,
            "not a fixtures directory (no reference/ folder)",
        ));
    }
    let ctx = Ctx::new(dir, device);
    let mut report = Report::default();
    for (name, file, f) in cases() {
        if only.is_some_and(|o| !o.iter().any(|n| n == name)) || !ctx.reference(file).exists() {
            continue;
        }
        match f(&ctx) {
            Ok(rows) => report.rows.extend(rows),
            Err(e) => report.failed_cases.push((name.to_string(), e.to_string())),
        }
    }
    Ok(report)
}
