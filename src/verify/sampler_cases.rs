//! The sampler references (`tests/fixtures/extra/pipeline_<name>.safetensors`, made by
//! `gen_samplers.py`): whole CFG runs of the tiny pipeline with every diffusers scheduler class
//! kstyle implements, on its spacings and sigma ramps, the stochastic ones replaying PyTorch's
//! recorded noise.

use super::extra_cases::extra;
use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::sample::pipeline::{Request, SamplerKind, Sigmas};
use crate::sample::{Noise, SchedulerConfig};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Result};

/// The sampler references: (file stem, sampler). `None` runs `--sampler auto` on the scheduler
/// config the reference stores in its `scheduler_config` metadata, exactly as diffusers saved it.
const SAMPLER_CASES: [(&str, Option<SamplerKind>); 58] = [
    (
        "dpmpp_2m",
        Some(SamplerKind::DpmPP {
            order: 2,
            sde: false,
            sigmas: Sigmas::Config,
        }),
    ),
    (
        "dpmpp_2m_karras",
        Some(SamplerKind::DpmPP {
            order: 2,
            sde: false,
            sigmas: Sigmas::Karras,
        }),
    ),
    ("ddim", Some(SamplerKind::Ddim { eta: 0.0 })),
    ("euler_karras", Some(SamplerKind::Euler(Sigmas::Karras))),
    ("euler_a", Some(SamplerKind::EulerAncestral)),
    (
        "dpmpp_2m_sde_karras",
        Some(SamplerKind::DpmPP {
            order: 2,
            sde: true,
            sigmas: Sigmas::Karras,
        }),
    ),
    ("dpmpp_2m_heun", None),
    ("dpmpp_3m", None),
    ("dpmpp_3m_sde_karras", None),
    ("dpmpp_1", None),
    ("unipc", None),
    ("unipc_3_karras", None),
    ("unipc_3_skip_corrector", None),
    ("lcm", None),
    ("heun", None),
    ("heun_karras", None),
    ("vpred_euler_zsnr", None),
    ("vpred_euler_a_zsnr", None),
    ("vpred_ddim_zsnr", None),
    ("vpred_unipc_zsnr", None),
    ("vpred_dpmpp_2m_karras", None),
    ("lms", None),
    ("lms_karras", None),
    ("kdpm2", None),
    ("kdpm2_karras", None),
    ("vpred_kdpm2", None),
    ("kdpm2_a", None),
    ("dpmpp_sde_karras", None),
    ("dpmpp_sde", None),
    ("deis", None),
    ("deis_3", None),
    ("deis_karras", None),
    ("euler_linspace", None),
    ("dpm2_a_karras_linspace", None),
    (
        "dpmpp_2s",
        Some(SamplerKind::DpmPPSingle {
            order: 2,
            sde: false,
            sigmas: Sigmas::Config,
        }),
    ),
    (
        "dpmpp_2s_karras",
        Some(SamplerKind::DpmPPSingle {
            order: 2,
            sde: false,
            sigmas: Sigmas::Karras,
        }),
    ),
    (
        "dpmpp_2s_sde_karras",
        Some(SamplerKind::DpmPPSingle {
            order: 2,
            sde: true,
            sigmas: Sigmas::Karras,
        }),
    ),
    ("dpmpp_3s", None),
    ("dpmpp_3s_heun", None),
    ("tcd", None),
    ("tcd_gamma_0", Some(SamplerKind::Tcd { gamma: 0.0 })),
    ("vpred_tcd", None),
    ("ddim_eta", None),
    // The exponential and beta ramps: by name (as --sigmas asks), or from the stored config.
    ("euler_exponential", None),
    ("euler_beta", Some(SamplerKind::Euler(Sigmas::Beta))),
    ("dpmpp_2m_exponential", None),
    (
        "dpmpp_2m_beta",
        Some(SamplerKind::DpmPP {
            order: 2,
            sde: false,
            sigmas: Sigmas::Beta,
        }),
    ),
    ("dpmpp_2s_exponential", None),
    ("unipc_beta", None),
    ("deis_beta", Some(SamplerKind::Deis(Sigmas::Beta))),
    ("heun_beta", None),
    (
        "lms_exponential",
        Some(SamplerKind::Lms(Sigmas::Exponential)),
    ),
    ("kdpm2_beta", None),
    ("kdpm2_a_exponential", None),
    ("dpmpp_sde_beta", None),
    // Euler's final_sigmas_type sigma_min; Euler's and UniPC's sigma_min / sigma_max ramp ends.
    ("euler_final_sigma_min", None),
    ("euler_karras_range", None),
    ("unipc_exponential_range", None),
];

/// Every sampler reference: the final latents of the whole CFG run from its initial latents.
pub fn samplers(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let folder_scheduler = pipe.scheduler.clone();
    let mut chk = Checker::new("samplers");
    for (name, kind) in SAMPLER_CASES {
        let path = extra(ctx, &format!("pipeline_{name}.safetensors"));
        let f = SafeTensorsFile::open(&path)?;
        let num = |k: &str| f.meta_f64(k);
        let negative = f.meta_str("negative_prompt")?.to_string();
        let steps = num("steps")? as usize;
        pipe.scheduler = match kind {
            Some(_) => folder_scheduler.clone(),
            None => SchedulerConfig::from_json_text(f.meta_str("scheduler_config")?, &path)?,
        };
        // The stochastic runs replay PyTorch's recorded noise (one draw a step, two for DPM++
        // SDE; LCM and DPM2 a draw none after their last).
        let noise = if f.contains("noise.0") {
            Noise::Given(
                (0..)
                    .map(|i| format!("noise.{i}"))
                    .take_while(|name| f.contains(name))
                    .map(|name| f.tensor(&name))
                    .collect::<Result<_>>()?,
            )
        } else {
            Noise::default()
        };
        let req = Request {
            prompt: f.meta_str("prompt")?.to_string(),
            negative: (!negative.is_empty()).then_some(negative),
            steps,
            guidance: num("guidance_scale")?,
            guidance_rescale: if f.metadata().contains_key("guidance_rescale") {
                num("guidance_rescale")?
            } else {
                0.0
            },
            width: num("width")? as usize,
            height: num("height")? as usize,
            // The pipeline's `eta` (`--eta`): DDIM's, TCD's gamma.
            sampler: match (kind, f.metadata().contains_key("eta")) {
                (None, true) => SamplerKind::Auto
                    .resolve(&pipe.scheduler)?
                    .with_eta(num("eta")?, &pipe.scheduler)?,
                (kind, _) => kind.unwrap_or(SamplerKind::Auto),
            },
            noise,
            denoising_end: None,
            micro: Default::default(),
        };
        let init = f
            .tensor("init_latents")?
            .to_dtype(DType::F32)?
            .to_device(ctx.device)?;
        let latents = no_grad(|| pipe.denoise(&req, &init, |_, _| {}))?;
        chk.check(
            &format!("{name}.final_latents"),
            &latents,
            &f.tensor("final_latents")?,
            ctx.forward,
        )?;
    }
    Ok(chk.rows)
}
