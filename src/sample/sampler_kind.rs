//! Which sampler a generation runs: the names users pick (`--sampler`, A1111's and ComfyUI's
//! terms), what `auto` reads from a scheduler config, and the construction of each on a config's
//! schedule (EDM models included).

use super::pipeline::Request;
use super::ramps::Ramp;
use super::{
    Ddim, Deis, DpmPPSde, DpmSolverPP, DpmSolverSinglestep, EdmConfig, EdmEuler, EulerAncestral,
    EulerDiscrete, Heun, Kdpm2, Lcm, Lms, Sampler, SchedulerClass, SchedulerConfig, Tcd, UniPc,
};
use crate::{Error, Result};

/// The sampler names `from_name` takes besides kohya's, as error messages list them.
const SAMPLER_NAMES: &str = "euler(-karras), euler-a, ddim, dpmpp-2m(-karras), \
     dpmpp-2m-sde(-karras), dpmpp-3m(-karras), dpmpp-3m-sde(-karras), dpmpp-2s(-karras), \
     dpmpp-2s-sde(-karras), dpmpp-3s(-karras), dpmpp-sde(-karras), unipc(-karras), heun(-karras), \
     lms(-karras), dpm2(-karras), dpm2-a(-karras), deis(-karras), lcm, tcd";

/// Which sigmas a sampler steps on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sigmas {
    /// The scheduler config's (`use_karras_sigmas`, `use_exponential_sigmas`,
    /// `use_beta_sigmas`, else its timestep spacing).
    Config,
    /// Karras et al.'s rho-7 ramp.
    Karras,
    /// Evenly spaced in log sigma (ComfyUI's "exponential").
    Exponential,
    /// Beta(0.6, 0.6) quantiles (ComfyUI's "beta").
    Beta,
}

impl Sigmas {
    /// The `--sigmas` word.
    pub fn name(self) -> &'static str {
        match self {
            Sigmas::Config => "config",
            Sigmas::Karras => "karras",
            Sigmas::Exponential => "exponential",
            Sigmas::Beta => "beta",
        }
    }

    /// The ramp these sigmas name under `config`.
    pub fn ramp(self, config: &SchedulerConfig) -> Ramp {
        match self {
            Sigmas::Config => config.ramp,
            Sigmas::Karras => Ramp::Karras,
            Sigmas::Exponential => Ramp::Exponential,
            Sigmas::Beta => Ramp::Beta,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerKind {
    /// The sampler the model folder's scheduler config names (as diffusers' pipeline runs it).
    Auto,
    /// Euler discrete.
    Euler(Sigmas),
    /// Euler ancestral ("Euler a"), noise from `Request::noise`.
    EulerAncestral,
    /// DDIM at `eta` (0: deterministic; above 0, fresh noise each step from `Request::noise`).
    Ddim { eta: f64 },
    /// DPM-Solver++ of `order` 1-3 ("DPM++ 2M", "DPM++ 3M"); `sde`: fresh noise each step from
    /// `Request::noise` ("DPM++ 2M SDE", "DPM++ 3M SDE").
    DpmPP {
        order: usize,
        sde: bool,
        sigmas: Sigmas,
    },
    /// Singlestep DPM-Solver++ of `order` 1-3 ("DPM++ 2S", "DPM++ 3S"; diffusers'
    /// `DPMSolverSinglestepScheduler`); `sde`: fresh noise each step from `Request::noise`.
    DpmPPSingle {
        order: usize,
        sde: bool,
        sigmas: Sigmas,
    },
    /// UniPC (bh2, data prediction) with the config's order and corrector settings.
    UniPc(Sigmas),
    /// The latent consistency sampler (LCM models and LCM-LoRA), fresh noise each step from
    /// `Request::noise`.
    Lcm,
    /// Trajectory consistency distillation's sampler (TCD models and TCD-LoRA) at stochasticity
    /// `gamma` (diffusers' `eta`), fresh noise each step but the last from `Request::noise`.
    Tcd { gamma: f64 },
    /// Heun's second-order method on Euler's sigmas (two UNet evaluations a step).
    Heun(Sigmas),
    /// Linear multistep of order 4 on Euler's sigmas ("LMS").
    Lms(Sigmas),
    /// DPM-Solver-2 on Euler's sigmas ("DPM2"; two UNet evaluations a step); `ancestral`: noise
    /// from `Request::noise` after each step ("DPM2 a").
    Dpm2 { ancestral: bool, sigmas: Sigmas },
    /// Stochastic second-order DPM-Solver++ ("DPM++ SDE"; two UNet evaluations a step), its
    /// Brownian noise from `Request::noise` (two draws a step).
    DpmPPSde(Sigmas),
    /// DEIS (log-rho multistep) with the config's order.
    Deis(Sigmas),
}

impl SamplerKind {
    /// The sampler a name asks for, case-insensitively: `kstyle generate --sampler`'s names
    /// (`euler`, `euler-a`, `dpmpp-2m-karras`, ...: a `-karras` suffix on the samplers with a
    /// choice of sigmas) and kohya's `--sample_sampler` names (`k_euler`, `euler_a`,
    /// `k_euler_a`, `k_lms`, `dpm_2`, `k_dpm_2`, `dpm_2_a`, `k_dpm_2_a`, `dpmsolver++`,
    /// `dpmsingle`). kohya's names pick kstyle's sampler of that algorithm; it steps on the
    /// model's scheduler config, as generate's does (kohya builds its schedulers from
    /// diffusers' defaults instead). kohya's `ddpm`, `pndm` and `dpmsolver` are not implemented
    /// and say so.
    pub fn from_name(name: &str) -> Result<SamplerKind> {
        let lower = name.trim().to_ascii_lowercase();
        let name = match lower.as_str() {
            "k_euler" => "euler",
            "euler_a" | "k_euler_a" => "euler-a",
            "k_lms" => "lms",
            "dpm_2" | "k_dpm_2" => "dpm2",
            "dpm_2_a" | "k_dpm_2_a" => "dpm2-a",
            // diffusers' DPMSolverMultistep / Singlestep defaults: order 2, dpmsolver++.
            "dpmsolver++" => "dpmpp-2m",
            "dpmsingle" => "dpmpp-2s",
            "ddpm" | "pndm" | "dpmsolver" => {
                return Err(Error::Config(format!(
                    "kohya's sampler `{lower}` is not implemented (kohya's euler, euler_a, ddim, \
                     lms, heun, dpm_2, dpm_2_a, dpmsolver++ and dpmsingle are)"
                )))
            }
            other => other,
        };
        let (base, sigmas) = match name.strip_suffix("-karras") {
            Some(base) => (base, Sigmas::Karras),
            None => (name, Sigmas::Config),
        };
        let dpm = |order, sde| SamplerKind::DpmPP { order, sde, sigmas };
        let single = |order, sde| SamplerKind::DpmPPSingle { order, sde, sigmas };
        let kind = match base {
            "auto" => Some(SamplerKind::Auto),
            "euler" => Some(SamplerKind::Euler(sigmas)),
            "euler-a" => Some(SamplerKind::EulerAncestral),
            "ddim" => Some(SamplerKind::Ddim { eta: 0.0 }),
            "dpmpp-2m" => Some(dpm(2, false)),
            "dpmpp-2m-sde" => Some(dpm(2, true)),
            "dpmpp-3m" => Some(dpm(3, false)),
            "dpmpp-3m-sde" => Some(dpm(3, true)),
            "dpmpp-2s" => Some(single(2, false)),
            "dpmpp-2s-sde" => Some(single(2, true)),
            "dpmpp-3s" => Some(single(3, false)),
            "unipc" => Some(SamplerKind::UniPc(sigmas)),
            "lcm" => Some(SamplerKind::Lcm),
            "tcd" => Some(SamplerKind::Tcd {
                gamma: super::tcd::DEFAULT_GAMMA,
            }),
            "heun" => Some(SamplerKind::Heun(sigmas)),
            "lms" => Some(SamplerKind::Lms(sigmas)),
            "dpm2" => Some(SamplerKind::Dpm2 {
                ancestral: false,
                sigmas,
            }),
            "dpm2-a" => Some(SamplerKind::Dpm2 {
                ancestral: true,
                sigmas,
            }),
            "dpmpp-sde" => Some(SamplerKind::DpmPPSde(sigmas)),
            "deis" => Some(SamplerKind::Deis(sigmas)),
            _ => None,
        };
        // A -karras suffix names only the samplers with a choice of sigmas.
        kind.filter(|k| sigmas == Sigmas::Config || k.sigmas().is_some())
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown sampler `{lower}`: choose one of kstyle generate's --sampler names \
                     ({SAMPLER_NAMES}) or kohya's (euler, euler_a, ddim, lms, heun, dpm_2, \
                     dpm_2_a, dpmsolver++, dpmsingle, with or without k_)"
                ))
            })
    }

    /// `Auto` as the scheduler config's class and settings; the others as they are.
    pub fn resolve(self, config: &SchedulerConfig) -> Result<SamplerKind> {
        if self != SamplerKind::Auto {
            return Ok(self);
        }
        match &config.class {
            SchedulerClass::EulerDiscrete => Ok(SamplerKind::Euler(Sigmas::Config)),
            SchedulerClass::Ddim => Ok(SamplerKind::Ddim { eta: 0.0 }),
            SchedulerClass::EulerAncestral => Ok(SamplerKind::EulerAncestral),
            SchedulerClass::DpmSolverMultistep => Ok(SamplerKind::DpmPP {
                order: config.solver_order,
                sde: config.dpm_sde,
                sigmas: Sigmas::Config,
            }),
            SchedulerClass::DpmSolverSinglestep => Ok(SamplerKind::DpmPPSingle {
                order: config.solver_order,
                sde: config.dpm_sde,
                sigmas: Sigmas::Config,
            }),
            SchedulerClass::UniPcMultistep => Ok(SamplerKind::UniPc(Sigmas::Config)),
            SchedulerClass::Lcm => Ok(SamplerKind::Lcm),
            SchedulerClass::Tcd => Ok(SamplerKind::Tcd {
                gamma: super::tcd::DEFAULT_GAMMA,
            }),
            SchedulerClass::HeunDiscrete => Ok(SamplerKind::Heun(Sigmas::Config)),
            SchedulerClass::LmsDiscrete => Ok(SamplerKind::Lms(Sigmas::Config)),
            SchedulerClass::Kdpm2Discrete => Ok(SamplerKind::Dpm2 {
                ancestral: false,
                sigmas: Sigmas::Config,
            }),
            SchedulerClass::Kdpm2AncestralDiscrete => Ok(SamplerKind::Dpm2 {
                ancestral: true,
                sigmas: Sigmas::Config,
            }),
            SchedulerClass::DpmSolverSde => Ok(SamplerKind::DpmPPSde(Sigmas::Config)),
            SchedulerClass::EdmDpmSolverMultistep => Ok(SamplerKind::DpmPP {
                order: config.solver_order,
                sde: config.dpm_sde,
                sigmas: Sigmas::Config,
            }),
            SchedulerClass::EdmEuler => Ok(SamplerKind::Euler(Sigmas::Config)),
            SchedulerClass::DeisMultistep => Ok(SamplerKind::Deis(Sigmas::Config)),
            SchedulerClass::Other(name) => Err(Error::Config(format!(
                "the model's scheduler `{name}` is not implemented: choose --sampler \
                 {SAMPLER_NAMES}"
            ))),
        }
    }

    /// The sigmas this sampler steps on, for those with a choice.
    pub fn sigmas(self) -> Option<Sigmas> {
        match self {
            SamplerKind::Euler(s)
            | SamplerKind::UniPc(s)
            | SamplerKind::Heun(s)
            | SamplerKind::Lms(s)
            | SamplerKind::DpmPPSde(s)
            | SamplerKind::Deis(s)
            | SamplerKind::DpmPP { sigmas: s, .. }
            | SamplerKind::DpmPPSingle { sigmas: s, .. }
            | SamplerKind::Dpm2 { sigmas: s, .. } => Some(s),
            SamplerKind::Auto
            | SamplerKind::EulerAncestral
            | SamplerKind::Ddim { .. }
            | SamplerKind::Lcm
            | SamplerKind::Tcd { .. } => None,
        }
    }

    /// This (resolved) sampler on the ramp `sigmas` (`--sigmas`). Samplers without a choice of
    /// sigmas, and a `-karras` name asked for another ramp, are errors naming the sampler.
    pub fn with_sigmas(self, sigmas: Sigmas, config: &SchedulerConfig) -> Result<SamplerKind> {
        let refuse = |why: &str| {
            Err(Error::Config(format!(
                "--sigmas {}: {} {why}",
                sigmas.name(),
                self.describe(config)
            )))
        };
        match self.sigmas() {
            None => refuse(
                "has no choice of sigmas (Euler, DPM++, UniPC, DEIS, Heun, LMS and DPM2 have)",
            ),
            Some(Sigmas::Karras) if sigmas != Sigmas::Karras => {
                refuse("was asked for by its -karras name")
            }
            Some(_) => Ok(match self {
                SamplerKind::Euler(_) => SamplerKind::Euler(sigmas),
                SamplerKind::UniPc(_) => SamplerKind::UniPc(sigmas),
                SamplerKind::Heun(_) => SamplerKind::Heun(sigmas),
                SamplerKind::Lms(_) => SamplerKind::Lms(sigmas),
                SamplerKind::DpmPPSde(_) => SamplerKind::DpmPPSde(sigmas),
                SamplerKind::Deis(_) => SamplerKind::Deis(sigmas),
                SamplerKind::DpmPP { order, sde, .. } => SamplerKind::DpmPP { order, sde, sigmas },
                SamplerKind::DpmPPSingle { order, sde, .. } => {
                    SamplerKind::DpmPPSingle { order, sde, sigmas }
                }
                SamplerKind::Dpm2 { ancestral, .. } => SamplerKind::Dpm2 { ancestral, sigmas },
                other => other,
            }),
        }
    }

    /// This sampler with diffusers' pipeline `eta`: DDIM's stochasticity, TCD's gamma. Other
    /// samplers have none, and say so naming the one they are.
    pub fn with_eta(self, eta: f64, config: &SchedulerConfig) -> Result<SamplerKind> {
        match self {
            SamplerKind::Ddim { .. } => Ok(SamplerKind::Ddim { eta }),
            SamplerKind::Tcd { .. } => Ok(SamplerKind::Tcd { gamma: eta }),
            other => Err(Error::Config(format!(
                "eta applies to DDIM and TCD, and this run uses {}",
                other.describe(config)
            ))),
        }
    }

    /// The name A1111 and ComfyUI users know, with " Karras" (" exponential", " beta") when it
    /// steps on that ramp under `config`, and " (EDM)" on an EDM model.
    pub fn describe(self, config: &SchedulerConfig) -> String {
        let edm_karras = config.edm.is_some_and(|e| !e.exponential);
        let karras = |s: Sigmas| match (s.ramp(config), edm_karras) {
            (_, true) => Ramp::Karras,
            (ramp, false) => ramp,
        };
        let (name, k) = match self {
            SamplerKind::Auto => ("auto".to_string(), Ramp::Spaced),
            SamplerKind::Euler(s) => ("Euler".to_string(), karras(s)),
            SamplerKind::EulerAncestral => ("Euler a".to_string(), Ramp::Spaced),
            SamplerKind::Ddim { eta: 0.0 } => ("DDIM".to_string(), Ramp::Spaced),
            SamplerKind::Ddim { eta } => (format!("DDIM (eta {eta})"), Ramp::Spaced),
            SamplerKind::DpmPP { order, sde, sigmas } => {
                let sde = if sde { " SDE" } else { "" };
                let heun = if order == 2 && config.dpm_heun {
                    " (heun)"
                } else {
                    ""
                };
                (format!("DPM++ {order}M{sde}{heun}"), karras(sigmas))
            }
            SamplerKind::DpmPPSingle { order, sde, sigmas } => {
                let sde = if sde { " SDE" } else { "" };
                let heun = if order > 1 && config.dpm_heun {
                    " (heun)"
                } else {
                    ""
                };
                (format!("DPM++ {order}S{sde}{heun}"), karras(sigmas))
            }
            SamplerKind::UniPc(s) => (
                format!("UniPC (bh2, order {})", config.solver_order),
                karras(s),
            ),
            SamplerKind::Lcm => ("LCM".to_string(), Ramp::Spaced),
            SamplerKind::Tcd { gamma } => (format!("TCD (gamma {gamma})"), Ramp::Spaced),
            SamplerKind::Heun(s) => ("Heun".to_string(), karras(s)),
            SamplerKind::Lms(s) => ("LMS".to_string(), karras(s)),
            SamplerKind::Dpm2 { ancestral, sigmas } => {
                let a = if ancestral { " a" } else { "" };
                (format!("DPM2{a}"), karras(sigmas))
            }
            SamplerKind::DpmPPSde(s) => ("DPM++ SDE".to_string(), karras(s)),
            SamplerKind::Deis(s) => (format!("DEIS (order {})", config.solver_order), karras(s)),
        };
        let name = match k.label() {
            Some(label) => format!("{name} {label}"),
            None => name,
        };
        if config.edm.is_some() {
            format!("{name} (EDM)")
        } else {
            name
        }
    }
}

/// The sampler `req` asks for on `scheduler`'s schedule.
pub(crate) fn build_sampler(
    scheduler: &SchedulerConfig,
    req: &Request,
) -> Result<Box<dyn Sampler>> {
    let ramp = |s: Sigmas| s.ramp(scheduler);
    let with_ramp = |s: Sigmas| SchedulerConfig {
        ramp: ramp(s),
        ..scheduler.clone()
    };
    let noise = Some(&req.noise);
    let kind = req.sampler.resolve(scheduler)?;
    if let Some(edm) = scheduler.edm {
        if let Some(s @ (Sigmas::Exponential | Sigmas::Beta)) = kind.sigmas() {
            return Err(Error::Config(format!(
                "{} sigmas are not implemented for EDM models (Playground v2.5, CosXL): they \
                 step on their config's sigma_schedule, or on Karras sigmas with a -karras name",
                s.name()
            )));
        }
        match kind {
            SamplerKind::Euler(s) => {
                let edm = EdmConfig {
                    exponential: edm.exponential && s != Sigmas::Karras,
                    ..edm
                };
                return Ok(Box::new(EdmEuler::new(
                    edm,
                    scheduler.prediction,
                    req.steps,
                )?));
            }
            // DPM-Solver++ carries its EDM form: the construction below.
            SamplerKind::DpmPP { .. } => {}
            other => {
                return Err(Error::Config(format!(
                    "{} is not implemented for EDM models (Playground v2.5, CosXL); choose \
                     --sampler euler, dpmpp-2m, dpmpp-2m-sde or dpmpp-3m",
                    other.describe(&SchedulerConfig {
                        edm: None,
                        ..scheduler.clone()
                    })
                )))
            }
        }
    }
    Ok(match kind {
        SamplerKind::Euler(s) => Box::new(EulerDiscrete::new(&with_ramp(s), req.steps)?),
        SamplerKind::EulerAncestral => {
            Box::new(EulerAncestral::new(scheduler, req.steps, &req.noise)?)
        }
        SamplerKind::Ddim { eta } => {
            Box::new(Ddim::with_eta(scheduler, req.steps, eta, &req.noise)?)
        }
        SamplerKind::DpmPP { order, sde, sigmas } => Box::new(DpmSolverPP::with_noise(
            scheduler,
            req.steps,
            order,
            ramp(sigmas),
            noise.filter(|_| sde),
        )?),
        SamplerKind::DpmPPSingle { order, sde, sigmas } => Box::new(DpmSolverSinglestep::new(
            scheduler,
            req.steps,
            order,
            ramp(sigmas),
            noise.filter(|_| sde),
        )?),
        SamplerKind::UniPc(s) => Box::new(UniPc::new(scheduler, req.steps, ramp(s))?),
        SamplerKind::Lcm => Box::new(Lcm::new(scheduler, req.steps, &req.noise)?),
        SamplerKind::Tcd { gamma } => Box::new(Tcd::new(scheduler, req.steps, gamma, &req.noise)?),
        SamplerKind::Heun(s) => Box::new(Heun::new(&with_ramp(s), req.steps)?),
        SamplerKind::Lms(s) => Box::new(Lms::new(&with_ramp(s), req.steps)?),
        SamplerKind::Dpm2 { ancestral, sigmas } => Box::new(Kdpm2::new(
            &with_ramp(sigmas),
            req.steps,
            noise.filter(|_| ancestral),
        )?),
        SamplerKind::DpmPPSde(s) => Box::new(DpmPPSde::new(&with_ramp(s), req.steps, &req.noise)?),
        SamplerKind::Deis(s) => Box::new(Deis::new(scheduler, req.steps, ramp(s))?),
        SamplerKind::Auto => unreachable!("resolve() names a sampler"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_of_kstyle_and_kohya() {
        let dpm2 = |ancestral, sigmas| SamplerKind::Dpm2 { ancestral, sigmas };
        for (name, kind) in [
            ("euler", SamplerKind::Euler(Sigmas::Config)),
            ("Euler-Karras", SamplerKind::Euler(Sigmas::Karras)),
            ("k_euler", SamplerKind::Euler(Sigmas::Config)),
            ("euler_a", SamplerKind::EulerAncestral),
            ("k_euler_a", SamplerKind::EulerAncestral),
            ("ddim", SamplerKind::Ddim { eta: 0.0 }),
            ("k_lms", SamplerKind::Lms(Sigmas::Config)),
            ("dpm_2", dpm2(false, Sigmas::Config)),
            ("k_dpm_2_a", dpm2(true, Sigmas::Config)),
            ("dpm2-a-karras", dpm2(true, Sigmas::Karras)),
            (
                "dpmsolver++",
                SamplerKind::DpmPP {
                    order: 2,
                    sde: false,
                    sigmas: Sigmas::Config,
                },
            ),
            (
                "dpmsingle",
                SamplerKind::DpmPPSingle {
                    order: 2,
                    sde: false,
                    sigmas: Sigmas::Config,
                },
            ),
            (
                "dpmpp-3m-sde-karras",
                SamplerKind::DpmPP {
                    order: 3,
                    sde: true,
                    sigmas: Sigmas::Karras,
                },
            ),
            ("tcd", SamplerKind::Tcd { gamma: 0.3 }),
        ] {
            assert_eq!(SamplerKind::from_name(name).unwrap(), kind, "{name}");
        }
        for (bad, needle) in [
            ("pndm", "kohya's sampler `pndm` is not implemented"),
            ("dpmsolver", "`dpmsolver` is not implemented"),
            ("euler-a-karras", "unknown sampler `euler-a-karras`"),
            ("ddim-karras", "unknown sampler"),
            ("dpmpp-3s-sde", "unknown sampler"),
            ("", "unknown sampler"),
        ] {
            let e = SamplerKind::from_name(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
