//! The value choices of `kstyle generate`'s flags (prompt style, emphasis, sampler, sigmas,
//! precisions; eval and train share some) and what they map to.

use super::Args;
use anyhow::Context;
use kstyle::sample::pipeline::{SamplerKind, Sigmas};
use kstyle::sample::prompt_syntax::{self, editing, Emphasis, PromptStyle};
use kstyle::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptStyleArg {
    Diffusers,
    A1111,
    Comfy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EmphasisArg {
    Original,
    NoNorm,
    Ignore,
    None,
}

/// The prompt style the flags ask for; refuses A1111's options without `--prompt-style a1111`
/// and prompts that style cannot read (a weight that is not a number, a stray bracket next to
/// prompt editing), at every step's text.
pub(super) fn prompt_style(a: &Args) -> anyhow::Result<PromptStyle> {
    if a.prompt_style != PromptStyleArg::A1111 {
        for (flag, given) in [
            ("--emphasis", a.emphasis.is_some()),
            ("--comma-backtrack", a.comma_backtrack.is_some()),
        ] {
            if given {
                anyhow::bail!("{flag} applies to A1111's prompt syntax: add --prompt-style a1111");
            }
        }
    }
    if a.prompt_style == PromptStyleArg::Comfy {
        return Ok(PromptStyle::Comfy);
    }
    if a.prompt_style == PromptStyleArg::Diffusers {
        for (flag, text) in [
            ("--prompt", Some(&a.prompt)),
            ("--negative", a.negative.as_ref()),
        ] {
            if text.is_some_and(|t| prompt_syntax::uses_syntax(t)) {
                eprintln!(
                    "note: {flag} looks like A1111's syntax (weights in brackets, BREAK, prompt \
                     editing or AND), which diffusers reads as plain text; pass --prompt-style \
                     a1111 to read it as A1111 does"
                );
            }
        }
        return Ok(PromptStyle::Diffusers);
    }
    let emphasis = match a.emphasis.unwrap_or(EmphasisArg::Original) {
        EmphasisArg::Original => Emphasis::Original,
        EmphasisArg::NoNorm => Emphasis::NoNorm,
        EmphasisArg::Ignore => Emphasis::Ignore,
        EmphasisArg::None => Emphasis::None,
    };
    for (flag, text) in [
        ("--prompt", Some(&a.prompt)),
        ("--negative", a.negative.as_ref()),
    ] {
        let Some(t) = text else { continue };
        let parts = match flag {
            "--prompt" => editing::composable(t).into_iter().map(|p| p.text).collect(),
            _ => vec![t.clone()],
        };
        for part in parts {
            for (_, step_text) in editing::schedule(&part, a.steps).with_context(|| flag)? {
                prompt_syntax::fragments(&step_text, emphasis).with_context(|| flag)?;
            }
        }
    }
    Ok(PromptStyle::A1111 {
        emphasis,
        comma_backtrack: a
            .comma_backtrack
            .unwrap_or(prompt_syntax::DEFAULT_COMMA_BACKTRACK),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SigmasArg {
    Config,
    Karras,
    Exponential,
    Beta,
}

impl SigmasArg {
    pub(crate) fn sigmas(self) -> Sigmas {
        match self {
            SigmasArg::Config => Sigmas::Config,
            SigmasArg::Karras => Sigmas::Karras,
            SigmasArg::Exponential => Sigmas::Exponential,
            SigmasArg::Beta => Sigmas::Beta,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DTypeArg {
    /// kohya's `float` / PyTorch's float32.
    #[value(alias = "float", alias = "fp32")]
    F32,
    Bf16,
    /// kohya's `fp16`.
    #[value(alias = "fp16")]
    F16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// `--weight-dtype`: a float8 storage type for the UNet's Linear and convolution weights.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum WeightDTypeArg {
    /// `torch.float8_e4m3fn` (ComfyUI's fp8_e4m3fn, kohya's --fp8_base): 3 mantissa bits.
    #[value(name = "fp8-e4m3fn")]
    Fp8E4m3fn,
    /// `torch.float8_e5m2`: 2 mantissa bits, a wider range.
    #[value(name = "fp8-e5m2")]
    Fp8E5m2,
}

impl WeightDTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            WeightDTypeArg::Fp8E4m3fn => DType::F8E4M3,
            WeightDTypeArg::Fp8E5m2 => DType::F8E5M2,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SamplerArg {
    /// The model folder's scheduler (`scheduler/scheduler_config.json`).
    Auto,
    /// diffusers' EulerDiscreteScheduler (SDXL base's).
    Euler,
    /// Euler on Karras sigmas.
    EulerKarras,
    /// Euler ancestral ("Euler a"): fresh noise each step, from the seed.
    #[value(name = "euler-a")]
    EulerAncestral,
    /// DDIM; --eta above 0 (diffusers' eta) adds fresh noise each step, from the seed.
    Ddim,
    /// DPM-Solver++ 2M ("DPM++ 2M"), the model's timestep spacing.
    #[value(name = "dpmpp-2m")]
    DpmPP2M,
    /// DPM-Solver++ 2M on Karras sigmas ("DPM++ 2M Karras").
    #[value(name = "dpmpp-2m-karras")]
    DpmPP2MKarras,
    /// DPM-Solver++ 2M SDE ("DPM++ 2M SDE"): fresh noise each step, from the seed.
    #[value(name = "dpmpp-2m-sde")]
    DpmPP2MSde,
    /// DPM-Solver++ 2M SDE on Karras sigmas ("DPM++ 2M SDE Karras").
    #[value(name = "dpmpp-2m-sde-karras")]
    DpmPP2MSdeKarras,
    /// DPM-Solver++ 3M ("DPM++ 3M"), third order multistep.
    #[value(name = "dpmpp-3m")]
    DpmPP3M,
    /// DPM-Solver++ 3M on Karras sigmas.
    #[value(name = "dpmpp-3m-karras")]
    DpmPP3MKarras,
    /// DPM-Solver++ 3M SDE ("DPM++ 3M SDE"): fresh noise each step, from the seed.
    #[value(name = "dpmpp-3m-sde")]
    DpmPP3MSde,
    /// DPM-Solver++ 3M SDE on Karras sigmas ("DPM++ 3M SDE Karras").
    #[value(name = "dpmpp-3m-sde-karras")]
    DpmPP3MSdeKarras,
    /// Singlestep DPM-Solver++ of order 2 ("DPM++ 2S", diffusers' DPMSolverSinglestepScheduler;
    /// not A1111's ancestral "DPM++ 2S a"): cycles of a first- and a second-order step.
    #[value(name = "dpmpp-2s")]
    DpmPP2S,
    /// DPM++ 2S on Karras sigmas.
    #[value(name = "dpmpp-2s-karras")]
    DpmPP2SKarras,
    /// DPM++ 2S SDE: fresh noise each step, from the seed.
    #[value(name = "dpmpp-2s-sde")]
    DpmPP2SSde,
    /// DPM++ 2S SDE on Karras sigmas.
    #[value(name = "dpmpp-2s-sde-karras")]
    DpmPP2SSdeKarras,
    /// Singlestep DPM-Solver++ of order 3 ("DPM++ 3S"): cycles of first-, second- and
    /// third-order steps.
    #[value(name = "dpmpp-3s")]
    DpmPP3S,
    /// DPM++ 3S on Karras sigmas.
    #[value(name = "dpmpp-3s-karras")]
    DpmPP3SKarras,
    /// UniPC (bh2), with the model's scheduler settings (order 2 by default).
    #[value(name = "unipc")]
    UniPc,
    /// UniPC on Karras sigmas.
    #[value(name = "unipc-karras")]
    UniPcKarras,
    /// The latent consistency sampler, for LCM models and LCM-LoRA (4-8 steps, --cfg 1 to 2):
    /// fresh noise each step, from the seed.
    Lcm,
    /// Trajectory consistency distillation's sampler, for TCD models and TCD-LoRA (4-8 steps,
    /// low --cfg; --eta sets its stochasticity, gamma): fresh noise each step, from the seed.
    Tcd,
    /// Heun's second-order method: two UNet evaluations a step (2 x steps - 1 in all).
    Heun,
    /// Heun on Karras sigmas.
    #[value(name = "heun-karras")]
    HeunKarras,
    /// Linear multistep, order 4 ("LMS").
    Lms,
    /// LMS on Karras sigmas ("LMS Karras").
    #[value(name = "lms-karras")]
    LmsKarras,
    /// DPM-Solver-2 ("DPM2"): two UNet evaluations a step.
    Dpm2,
    /// DPM2 on Karras sigmas ("DPM2 Karras").
    #[value(name = "dpm2-karras")]
    Dpm2Karras,
    /// DPM2 ancestral ("DPM2 a"): two UNet evaluations and fresh noise a step, from the seed.
    #[value(name = "dpm2-a")]
    Dpm2Ancestral,
    /// DPM2 ancestral on Karras sigmas ("DPM2 a Karras").
    #[value(name = "dpm2-a-karras")]
    Dpm2AncestralKarras,
    /// Stochastic second-order DPM-Solver++ ("DPM++ SDE"): two UNet evaluations a step, Brownian
    /// noise from the seed.
    #[value(name = "dpmpp-sde")]
    DpmPPSde,
    /// DPM++ SDE on Karras sigmas ("DPM++ SDE Karras").
    #[value(name = "dpmpp-sde-karras")]
    DpmPPSdeKarras,
    /// DEIS, log-rho multistep of the model's solver order (2 by default).
    Deis,
    /// DEIS on Karras sigmas.
    #[value(name = "deis-karras")]
    DeisKarras,
}

impl SamplerArg {
    /// The sampler this value names (`SamplerKind::from_name` reads every name of this enum;
    /// the test below holds that).
    pub(crate) fn kind(self) -> SamplerKind {
        let value = clap::ValueEnum::to_possible_value(&self);
        let name = value.as_ref().map_or("", |v| v.get_name());
        SamplerKind::from_name(name).unwrap_or(SamplerKind::Auto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_sampler_value_names_a_sampler() {
        for v in SamplerArg::value_variants() {
            let name = v.to_possible_value().unwrap().get_name().to_string();
            let kind = SamplerKind::from_name(&name);
            assert!(kind.is_ok(), "--sampler {name}: {kind:?}");
            assert_eq!(
                v.kind() == SamplerKind::Auto,
                name == "auto",
                "--sampler {name}"
            );
        }
        assert_eq!(
            SamplerArg::Dpm2AncestralKarras.kind(),
            SamplerKind::Dpm2 {
                ancestral: true,
                sigmas: Sigmas::Karras
            }
        );
        assert_eq!(
            SamplerArg::DpmPP2SSde.kind(),
            SamplerKind::DpmPPSingle {
                order: 2,
                sde: true,
                sigmas: Sigmas::Config
            }
        );
    }
}
