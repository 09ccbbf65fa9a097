//! The scaled-linear beta schedule and the scheduler config of a diffusers folder (the training
//! schedule built from it: [`TrainSchedule`]).
//!
//! Two precisions on purpose: samplers reproduce diffusers, which builds its tables in float32;
//! training follows `kstyle_ref.alphas_cumprod`, which is float64.

use super::edm::EdmConfig;
pub use super::loss_type::{Huber, HuberSchedule, LossType};
use super::ramps::Ramp;
pub use super::train_schedule::{EdmTrain, TrainSchedule};
use crate::{Error, Result, Tensor};
use std::path::Path;

/// What the UNet predicts (`prediction_type`): the noise, or the velocity
/// `v = alpha eps - sigma x0` (v-prediction models).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

impl Prediction {
    /// x0 from the model output at VE `sigma` (x = x0 + sigma eps, the Euler samplers' form), as
    /// diffusers computes it: for v, `out (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)`.
    pub(crate) fn x0_ve(self, x: &Tensor, out: &Tensor, sigma: f32) -> Result<Tensor> {
        match self {
            Prediction::Epsilon => x.sub(&out.scale(sigma as f64)?),
            Prediction::V => {
                let s2 = sigma * sigma + 1.0;
                out.scale((-sigma / s2.sqrt()) as f64)?
                    .add(&x.scale(1.0 / s2 as f64)?)
            }
        }
    }

    /// x0 from the model output at VP (alpha, sigma) (x = alpha x0 + sigma eps).
    pub(crate) fn x0_vp(self, x: &Tensor, out: &Tensor, alpha: f32, sigma: f32) -> Result<Tensor> {
        match self {
            Prediction::Epsilon => x.sub(&out.scale(sigma as f64)?)?.scale(1.0 / alpha as f64),
            Prediction::V => x.scale(alpha as f64)?.sub(&out.scale(sigma as f64)?),
        }
    }

    /// epsilon from the model output at VP (alpha, sigma).
    pub(crate) fn eps_vp(self, x: &Tensor, out: &Tensor, alpha: f32, sigma: f32) -> Result<Tensor> {
        match self {
            Prediction::Epsilon => Ok(out.clone()),
            Prediction::V => out.scale(alpha as f64)?.add(&x.scale(sigma as f64)?),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The fields of `scheduler/scheduler_config.json` the samplers use.
/// The scheduler class a folder ships (`_class_name`): which sampler `--sampler auto` runs.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerClass {
    EulerDiscrete,
    EulerAncestral,
    Ddim,
    DpmSolverMultistep,
    DpmSolverSinglestep,
    UniPcMultistep,
    Lcm,
    Tcd,
    HeunDiscrete,
    LmsDiscrete,
    Kdpm2Discrete,
    Kdpm2AncestralDiscrete,
    DpmSolverSde,
    DeisMultistep,
    /// EDMDPMSolverMultistepScheduler (Playground v2.5).
    EdmDpmSolverMultistep,
    EdmEuler,
    Other(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub class: SchedulerClass,
    /// `use_karras_sigmas`, `use_exponential_sigmas` or `use_beta_sigmas`: the sigma schedulers
    /// step on that ramp instead of the spaced timesteps' sigmas.
    pub ramp: Ramp,
    /// `prediction_type`: epsilon or v_prediction.
    pub prediction: Prediction,
    /// `rescale_betas_zero_snr`: the betas rescaled so the last timestep has zero SNR (Lin et
    /// al. 2023), as v-prediction models trained that way need.
    pub zero_snr: bool,
    /// DPMSolverMultistepScheduler's `algorithm_type` is `sde-dpmsolver++` (DPM++ 2M SDE).
    pub dpm_sde: bool,
    /// `solver_order` of the multistep samplers (DPM-Solver++ and UniPC; 2 when absent).
    pub solver_order: usize,
    /// `lower_order_final`: fall back to lower orders over the last steps of short (< 15 step)
    /// DPM runs, and over UniPC's last steps.
    pub lower_order_final: bool,
    /// DPM-Solver++'s second-order `solver_type` is `heun` (else `midpoint`; UniPC's `bh1`/`bh2`
    /// and `logrho` read as midpoint, as DPMSolverMultistepScheduler maps them).
    pub dpm_heun: bool,
    /// UniPC's `solver_type` is `bh1` (else `bh2`; DPM's `midpoint`/`heun` and `logrho` read as
    /// bh2, as UniPCMultistepScheduler maps them).
    pub unipc_bh1: bool,
    /// UniPC's `predict_x0` (true when absent): solve for the data prediction, not the noise.
    pub unipc_predict_x0: bool,
    /// UniPC's `disable_corrector`: steps whose corrector is skipped.
    pub unipc_disable_corrector: Vec<usize>,
    /// LCMScheduler's `original_inference_steps` (50 when absent): the distillation schedule.
    pub lcm_original_steps: usize,
    /// LCMScheduler's `timestep_scaling` (10 when absent) in the boundary-condition scalings.
    pub lcm_timestep_scaling: f64,
    /// The x0 clamp of LCMScheduler and HeunDiscreteScheduler, whose `clip_sample` is off when
    /// absent (DDIM's is on), with `clip_sample_range`.
    pub clip_sample_opt_in: Option<f64>,
    /// DPMSolverMultistepScheduler settings other than those DPM-Solver++ implements here
    /// (algorithm_type (sde-)dpmsolver++, solver_order 1-3, final sigma zero), as `key: value`; a
    /// DPM++ or UniPC sampler built from this config refuses them by name.
    pub dpm_unsupported: Vec<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// DDIM: whether the step past t = 0 uses alpha_cumprod = 1 (absent from a config: true,
    /// `DDIMScheduler`'s default; SDXL base ships false).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 to [-clip_sample_range, clip_sample_range]. Absent from a
    /// config it is on, as `DDIMScheduler.from_config` of an Euler config leaves it (SDXL base
    /// ships `clip_sample: false`).
    pub clip_sample: Option<f64>,
    /// An EDM model's preconditioning and sigmas (the EDM scheduler classes); None for the
    /// beta-schedule models.
    pub edm: Option<EdmConfig>,
    /// Settings only EulerDiscreteScheduler (and, for the ramp ends, UniPC) registers: the
    /// samplers built on Euler's schedule for other classes (Heun, LMS, Euler a) clear them, as
    /// diffusers' `from_config` drops them for those classes.
    pub euler: EulerExtras,
}

/// EulerDiscreteScheduler's own settings beyond the shared ones.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EulerExtras {
    /// `final_sigmas_type: "sigma_min"`: the last step lands on the table's smallest sigma
    /// instead of 0 (DPM-Solver++ and UniPC refuse it).
    pub final_sigma_min: bool,
    /// `sigma_min` / `sigma_max` (Euler and UniPC): where a ramp (Karras, exponential, beta) ends
    /// and starts instead of the spaced schedule's own smallest and largest sigma.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// `timestep_type: "continuous"` (the UNet sees 0.25 log sigma): not implemented, refused
    /// by Euler.
    pub continuous: bool,
}

impl Default for SchedulerConfig {
    /// SDXL base's shipped scheduler (SDXL.md 4.2).
    fn default() -> Self {
        SchedulerConfig {
            class: SchedulerClass::EulerDiscrete,
            ramp: Ramp::Spaced,
            prediction: Prediction::Epsilon,
            zero_snr: false,
            dpm_sde: false,
            solver_order: 2,
            lower_order_final: true,
            dpm_heun: false,
            unipc_bh1: false,
            unipc_predict_x0: true,
            unipc_disable_corrector: Vec::new(),
            lcm_original_steps: 50,
            lcm_timestep_scaling: 10.0,
            clip_sample_opt_in: None,
            dpm_unsupported: Vec::new(),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: None,
            edm: None,
            euler: EulerExtras::default(),
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<SchedulerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_text(&text, path)
    }

    /// A `scheduler_config.json`'s text; `path` names it in errors.
    pub fn from_json_text(text: &str, path: &Path) -> Result<SchedulerConfig> {
        let v: serde_json::Value =
            crate::formats::python_json::parse(text).map_err(|e| Error::Json {
                path: path.into(),
                msg: e.to_string(),
            })?;
        let d = SchedulerConfig::default();
        let bad = |msg: String| Error::file(path, msg);
        if let Some(s) = v.get("beta_schedule").and_then(|s| s.as_str()) {
            if s != "scaled_linear" {
                return Err(bad(format!(
                    "beta_schedule `{s}` is not supported (only scaled_linear)"
                )));
            }
        }
        let prediction = match v.get("prediction_type").and_then(|s| s.as_str()) {
            None | Some("epsilon") => Prediction::Epsilon,
            Some("v_prediction") => Prediction::V,
            Some(p) => {
                return Err(bad(format!(
                    "prediction_type `{p}` is not supported (epsilon or v_prediction)"
                )))
            }
        };
        if v.get("thresholding").and_then(|b| b.as_bool()) == Some(true) {
            return Err(bad("`thresholding: true` is not supported".into()));
        }
        if v.get("trained_betas").is_some_and(|b| !b.is_null()) {
            return Err(bad(
                "`trained_betas` (a listed beta schedule) is not supported: only scaled_linear \
                 betas from beta_start and beta_end"
                    .into(),
            ));
        }
        let ramps: Vec<(&str, Ramp)> = [
            ("use_karras_sigmas", Ramp::Karras),
            ("use_exponential_sigmas", Ramp::Exponential),
            ("use_beta_sigmas", Ramp::Beta),
        ]
        .into_iter()
        .filter(|(flag, _)| v.get(*flag).and_then(|b| b.as_bool()) == Some(true))
        .collect();
        if ramps.len() > 1 {
            let flags: Vec<&str> = ramps.iter().map(|(f, _)| *f).collect();
            return Err(bad(format!(
                "{} are all true; diffusers allows only one sigma ramp",
                flags.join(" and ")
            )));
        }
        let ramp = ramps.first().map_or(Ramp::Spaced, |(_, r)| *r);
        let class = match v.get("_class_name").and_then(|s| s.as_str()) {
            None | Some("EulerDiscreteScheduler") => SchedulerClass::EulerDiscrete,
            Some("DDIMScheduler") => SchedulerClass::Ddim,
            Some("EulerAncestralDiscreteScheduler") => SchedulerClass::EulerAncestral,
            Some("DPMSolverMultistepScheduler") => SchedulerClass::DpmSolverMultistep,
            Some("DPMSolverSinglestepScheduler") => SchedulerClass::DpmSolverSinglestep,
            Some("UniPCMultistepScheduler") => SchedulerClass::UniPcMultistep,
            Some("LCMScheduler") => SchedulerClass::Lcm,
            Some("TCDScheduler") => SchedulerClass::Tcd,
            Some("HeunDiscreteScheduler") => SchedulerClass::HeunDiscrete,
            Some("LMSDiscreteScheduler") => SchedulerClass::LmsDiscrete,
            Some("KDPM2DiscreteScheduler") => SchedulerClass::Kdpm2Discrete,
            Some("KDPM2AncestralDiscreteScheduler") => SchedulerClass::Kdpm2AncestralDiscrete,
            Some("DPMSolverSDEScheduler") => SchedulerClass::DpmSolverSde,
            Some("DEISMultistepScheduler") => SchedulerClass::DeisMultistep,
            Some("EDMDPMSolverMultistepScheduler") => SchedulerClass::EdmDpmSolverMultistep,
            Some("EDMEulerScheduler") => SchedulerClass::EdmEuler,
            Some(other) => SchedulerClass::Other(other.to_string()),
        };
        // Absent, the spacing is the class's own default (configs older than diffusers 0.16 have
        // no `timestep_spacing`): `leading` for DDIM and LCM, `linspace` for the others.
        let default_spacing = match class {
            SchedulerClass::Ddim | SchedulerClass::Lcm => "leading",
            _ => "linspace",
        };
        let spacing = match v
            .get("timestep_spacing")
            .and_then(|s| s.as_str())
            .unwrap_or(default_spacing)
        {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => return Err(bad(format!("timestep_spacing `{other}` is not supported"))),
        };
        let num = |k: &str, dv: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(dv);
        let train_steps = num("num_train_timesteps", d.num_train_timesteps as f64);
        if !(2.0..=1e6).contains(&train_steps) || train_steps.fract() != 0.0 {
            return Err(bad(format!(
                "num_train_timesteps must be a whole number from 2 to 1000000, got {train_steps}"
            )));
        }
        if let Some(t) = v.get("interpolation_type").and_then(|s| s.as_str()) {
            if t != "linear" {
                return Err(bad(format!(
                    "interpolation_type `{t}` is not supported (only linear)"
                )));
            }
        }
        // DPMSolverMultistepScheduler's keys, with its defaults where absent.
        let mut dpm_unsupported = Vec::new();
        let text = |k: &str, dv: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or(dv).to_string();
        // "deis" runs as dpmsolver++, as DPMSolverMultistepScheduler registers it.
        let algorithm = match text("algorithm_type", "dpmsolver++").as_str() {
            "deis" => "dpmsolver++".to_string(),
            a => a.to_string(),
        };
        if algorithm != "dpmsolver++" && algorithm != "sde-dpmsolver++" {
            dpm_unsupported.push(format!("algorithm_type: {algorithm}"));
        }
        let final_sigmas = text("final_sigmas_type", "zero");
        if final_sigmas != "zero" && final_sigmas != "sigma_min" {
            return Err(bad(format!(
                "final_sigmas_type `{final_sigmas}` is not one of diffusers' (zero, sigma_min)"
            )));
        }
        if final_sigmas != "zero" {
            dpm_unsupported.push(format!("final_sigmas_type: {final_sigmas}"));
        }
        let solver_type = text("solver_type", "midpoint");
        if !["midpoint", "heun", "logrho", "bh1", "bh2"].contains(&solver_type.as_str()) {
            dpm_unsupported.push(format!("solver_type: {solver_type}"));
        }
        let order = num("solver_order", 2.0);
        let solver_order = if order.fract() == 0.0 && (1.0..=3.0).contains(&order) {
            order as usize
        } else {
            dpm_unsupported.push(format!("solver_order: {order}"));
            2
        };
        for flag in ["use_flow_sigmas", "use_dynamic_shifting"] {
            if v.get(flag).and_then(|b| b.as_bool()) == Some(true) {
                dpm_unsupported.push(format!("{flag}: true"));
            }
        }
        let flag = |k: &str, dv: bool| v.get(k).and_then(|b| b.as_bool()).unwrap_or(dv);
        let unipc_disable_corrector = match v.get("disable_corrector") {
            None => Vec::new(),
            Some(list) => list
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|i| i as usize)).collect())
                .ok_or_else(|| {
                    bad(format!(
                        "disable_corrector must be a list of steps, got {list}"
                    ))
                })?,
        };
        if v.get("use_lu_lambdas").and_then(|b| b.as_bool()) == Some(true) {
            dpm_unsupported.push("use_lu_lambdas: true".into());
        }
        if let Some(l) = v.get("lambda_min_clipped").and_then(|x| x.as_f64()) {
            if l.is_finite() {
                dpm_unsupported.push(format!("lambda_min_clipped: {l}"));
            }
        }
        if let Some(t) = v.get("variance_type").and_then(|x| x.as_str()) {
            dpm_unsupported.push(format!("variance_type: {t}"));
        }
        let edm = match class {
            SchedulerClass::EdmDpmSolverMultistep | SchedulerClass::EdmEuler => {
                let d = EdmConfig::playground();
                let exponential = match text("sigma_schedule", "karras").as_str() {
                    "karras" => false,
                    "exponential" => true,
                    other => {
                        return Err(bad(format!(
                            "sigma_schedule `{other}` is not supported (karras or exponential)"
                        )))
                    }
                };
                let edm = EdmConfig {
                    sigma_min: num("sigma_min", d.sigma_min),
                    sigma_max: num("sigma_max", d.sigma_max),
                    sigma_data: num("sigma_data", d.sigma_data),
                    rho: num("rho", d.rho),
                    exponential,
                };
                let ok = |x: f64| x.is_finite() && x > 0.0;
                if !(ok(edm.sigma_min) && ok(edm.sigma_data) && ok(edm.rho))
                    || edm.sigma_max <= edm.sigma_min
                    || !edm.sigma_max.is_finite()
                {
                    return Err(bad(format!(
                        "EDM settings need 0 < sigma_min < sigma_max and positive sigma_data and \
                         rho, got sigma_min {}, sigma_max {}, sigma_data {}, rho {}",
                        edm.sigma_min, edm.sigma_max, edm.sigma_data, edm.rho
                    )));
                }
                Some(edm)
            }
            _ => None,
        };
        Ok(SchedulerConfig {
            prediction,
            zero_snr: flag("rescale_betas_zero_snr", false),
            dpm_sde: algorithm == "sde-dpmsolver++",
            solver_order,
            lower_order_final: flag("lower_order_final", true),
            dpm_heun: solver_type == "heun",
            unipc_bh1: solver_type == "bh1",
            unipc_predict_x0: flag("predict_x0", true),
            unipc_disable_corrector,
            lcm_original_steps: num("original_inference_steps", 50.0) as usize,
            lcm_timestep_scaling: num("timestep_scaling", 10.0),
            clip_sample_opt_in: flag("clip_sample", false).then(|| num("clip_sample_range", 1.0)),
            class,
            ramp,
            dpm_unsupported,
            num_train_timesteps: train_steps as usize,
            beta_start: num("beta_start", d.beta_start),
            beta_end: num("beta_end", d.beta_end),
            spacing,
            steps_offset: num("steps_offset", 0.0) as usize,
            // DDIM's own defaults where the config (say an Euler one) has no such key.
            set_alpha_to_one: v
                .get("set_alpha_to_one")
                .and_then(|b| b.as_bool())
                .unwrap_or(true),
            clip_sample: v
                .get("clip_sample")
                .and_then(|b| b.as_bool())
                .unwrap_or(true)
                .then(|| num("clip_sample_range", 1.0)),
            euler: match edm {
                // The EDM classes' sigma_min / sigma_max are their own schedule's.
                Some(_) => EulerExtras::default(),
                None => EulerExtras {
                    final_sigma_min: final_sigmas == "sigma_min",
                    sigma_min: v.get("sigma_min").and_then(|x| x.as_f64()),
                    sigma_max: v.get("sigma_max").and_then(|x| x.as_f64()),
                    continuous: text("timestep_type", "discrete") == "continuous",
                },
            },
            edm,
        })
    }

    /// This config for a class that registers none of EulerDiscreteScheduler's own settings
    /// (Heun, LMS, Euler ancestral, built on Euler's schedule).
    pub(crate) fn without_euler_extras(&self) -> SchedulerConfig {
        SchedulerConfig {
            euler: EulerExtras::default(),
            ..self.clone()
        }
    }

    /// Refuses zero-terminal-SNR betas for `class`, a diffusers scheduler without
    /// `rescale_betas_zero_snr` (diffusers would ignore the key and run the plain schedule).
    pub(crate) fn refuse_zero_snr(&self, class: &str) -> Result<()> {
        if !self.zero_snr {
            return Ok(());
        }
        Err(Error::Config(format!(
            "{class} has no rescale_betas_zero_snr (diffusers would ignore it and run the plain \
             schedule); choose euler, euler-a, ddim, dpmpp-2m/3m(-sde) or unipc for this model"
        )))
    }

    /// alphas_cumprod exactly as diffusers builds it: a float32 linspace of sqrt(beta), squared,
    /// and PyTorch's CPU cumprod, which carries the running product in double and stores float32.
    /// With `zero_snr` the betas are first rescaled (`rescale_zero_terminal_snr`, in float32 as
    /// diffusers does it), and the last value is exactly 0.
    pub fn alphas_cumprod_f32(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let (a, b) = (self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32);
        let betas: Vec<f32> = (0..n)
            .map(|i| {
                let t = linspace_f32(a, b, n, i);
                t * t
            })
            .collect();
        let betas = if self.zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        cumprod_f32(betas.iter().map(|&b| 1.0 - b))
    }

    /// alphas_cumprod as the sigma-based samplers (Euler, Euler ancestral, DPM-Solver++, UniPC)
    /// hold it: with `zero_snr` its last value is 2^-24 instead of 0, so the largest sigma is
    /// finite (4096).
    pub fn sigma_alphas_cumprod_f32(&self) -> Vec<f32> {
        let mut ac = self.alphas_cumprod_f32();
        if self.zero_snr {
            if let Some(last) = ac.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        ac
    }

    /// Timesteps for `steps` inference steps, largest first, as integers.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let n = self.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Config(format!(
                "steps must be in 1..={n}, got {steps}"
            )));
        }
        Ok(match self.spacing {
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                // np.round(np.arange(n, 0, -n/steps)) - 1
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| {
                        ((n as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                    })
                    .collect()
            }
            Spacing::Linspace => {
                // np.linspace(0, n - 1, steps)[::-1].round()
                (0..steps)
                    .rev()
                    .map(|i| {
                        if steps == 1 {
                            0
                        } else {
                            ((n - 1) as f64 * i as f64 / (steps - 1) as f64).round_ties_even()
                                as usize
                        }
                    })
                    .collect()
            }
        })
    }
}

/// The timesteps and VE sigmas (float32, then a final 0) of diffusers' multistep schedulers
/// (DPMSolverMultistep, UniPCMultistep, DEIS, singlestep DPM-Solver), which share
/// `set_timesteps`: the config's spacing over the float32 sigma table, or a [`Ramp`] between the
/// table's ends (or `ends`, [min, max], where given: UniPC's sigma_min / sigma_max) with each
/// sigma's fractional timestep rounded (Karras) or truncated by the cast to int64 (exponential,
/// beta: diffusers rounds only Karras'). `what` names the sampler in errors.
pub(crate) fn multistep_schedule(
    config: &SchedulerConfig,
    steps: usize,
    ramp: Ramp,
    ends: [Option<f64>; 2],
    what: &str,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let n = config.num_train_timesteps;
    if steps == 0 || steps >= n {
        return Err(Error::Config(format!(
            "steps must be in 1..{n} for {what}, got {steps}"
        )));
    }
    let table: Vec<f32> = config
        .sigma_alphas_cumprod_f32()
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if let Some(sig) = ramp.sigmas(
        ends[0].unwrap_or(table[0] as f64),
        ends[1].unwrap_or(table[n - 1] as f64),
        steps,
    ) {
        let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let ts = sig
            .iter()
            .map(|&s| match ramp {
                Ramp::Karras => sigma_to_t(s, &log_table).round_ties_even(),
                _ => sigma_to_t(s, &log_table).trunc(),
            })
            .collect();
        (ts, sig.iter().map(|&s| s as f32).collect())
    } else {
        let ts: Vec<f64> = match config.spacing {
            Spacing::Linspace => (1..=steps)
                .rev()
                .map(|i| linspace((n - 1) as f64, steps + 1, i).round_ties_even())
                .collect(),
            Spacing::Leading => {
                let ratio = n / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
        };
        if let Some(&t) = ts.iter().find(|&&t| t < 0.0 || t >= n as f64) {
            return Err(Error::Config(format!(
                "{what} timestep {t} outside the {n}-step schedule ({steps} steps, offset {})",
                config.steps_offset
            )));
        }
        let sig = ts.iter().map(|&t| table[t as usize]).collect();
        (ts, sig)
    };
    sigmas.push(0.0);
    Ok((timesteps, sigmas))
}

/// The spaced timesteps and sigmas of diffusers' sigma-table schedulers (EulerDiscrete,
/// EulerAncestralDiscrete, HeunDiscrete, LMSDiscrete, KDPM2(Ancestral)Discrete, DPMSolverSDE)
/// before any Karras ramp, with the float32 log-sigma table `_sigma_to_t` reads.
pub(crate) struct SigmaSchedule {
    /// The config's spacing: whole numbers for `leading` and `trailing`, fractional for
    /// `linspace` (float32 values, or float64 where the scheduler builds them so).
    pub timesteps: Vec<f64>,
    /// numpy's linear interpolation of the float32 sigma table at those timesteps (float64, as
    /// numpy holds them until the schedulers cast to float32).
    pub sigmas: Vec<f64>,
    pub log_table: Vec<f32>,
}

/// The [`SigmaSchedule`] of `steps` steps; `linspace_f64`: the scheduler spaces `linspace`
/// timesteps in float64 (DPMSolverSDEScheduler) rather than float32 (the others).
pub(crate) fn sigma_schedule(
    config: &SchedulerConfig,
    steps: usize,
    linspace_f64: bool,
) -> Result<SigmaSchedule> {
    let table: Vec<f32> = config
        .sigma_alphas_cumprod_f32()
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let n = table.len();
    let timesteps: Vec<f64> = match config.spacing {
        Spacing::Linspace => {
            if steps == 0 || steps > n {
                return Err(Error::Config(format!(
                    "steps must be in 1..={n}, got {steps}"
                )));
            }
            (0..steps)
                .rev()
                .map(|i| {
                    let t = linspace((n - 1) as f64, steps, i);
                    if linspace_f64 {
                        t
                    } else {
                        t as f32 as f64
                    }
                })
                .collect()
        }
        Spacing::Leading | Spacing::Trailing => config
            .timesteps(steps)?
            .into_iter()
            .map(|t| t as f64)
            .collect(),
    };
    let sigmas = timesteps.iter().map(|&t| interp_table(&table, t)).collect();
    Ok(SigmaSchedule {
        timesteps,
        sigmas,
        log_table: table.iter().map(|s| s.ln()).collect(),
    })
}

/// numpy's `interp(t, arange(len), table)`: `slope (t - j) + table[j]` on the float32 values in
/// float64, clamped to the table's ends.
fn interp_table(table: &[f32], t: f64) -> f64 {
    let last = table.len() - 1;
    if t <= 0.0 {
        return table[0] as f64;
    }
    if t >= last as f64 {
        return table[last] as f64;
    }
    let j = t.floor() as usize;
    let (a, b) = (table[j] as f64, table[j + 1] as f64);
    (b - a) * (t - j as f64) + a
}

/// torch.cumprod of float32 values on the CPU: the running product in double, each value stored
/// as float32.
fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` in float32: sqrt(alphas_cumprod) shifted so the last
/// is 0 and scaled so the first is unchanged, then turned back into betas.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
    let mut s: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let c = s0 / (s0 - st);
    for v in &mut s {
        *v -= st;
        *v *= c;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    (0..bar.len())
        .map(|i| {
            let alpha = if i == 0 { bar[0] } else { bar[i] / bar[i - 1] };
            1.0 - alpha
        })
        .collect()
}

/// `rescale_zero_terminal_snr` in float64, from and to alphas_cumprod: the betas it rescales are
/// `1 - ab_i / ab_(i-1)`, and the result's cumulative product is formed as diffusers' training
/// code forms it (`cumprod(1 - betas)`), so the last value is exactly 0.
pub(super) fn rescale_zero_terminal_snr_f64(ab: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = ab.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    for v in &mut s {
        *v -= st;
        *v *= s0 / (s0 - st);
    }
    let bar: Vec<f64> = s.iter().map(|v| v * v).collect();
    let mut acc = 1.0;
    (0..bar.len())
        .map(|i| {
            let alpha = if i == 0 { bar[0] } else { bar[i] / bar[i - 1] };
            acc *= 1.0 - (1.0 - alpha);
            acc
        })
        .collect()
}

/// torch.linspace in float64, as [`linspace_f32`] computes it.
pub(crate) fn linspace_f64(start: f64, end: f64, n: usize, i: usize) -> f64 {
    if n == 1 {
        return start;
    }
    let step = (end - start) / (n - 1) as f64;
    if i < n / 2 {
        start + step * i as f64
    } else {
        end - step * (n - 1 - i) as f64
    }
}

/// torch.linspace in float32: start + i*step for the first half, end - (n-1-i)*step after, which
/// is how PyTorch keeps both ends exact.
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize, i: usize) -> f32 {
    if n == 1 {
        return start;
    }
    let step = (end - start) / (n - 1) as f32;
    if i < n / 2 {
        start + step * i as f32
    } else {
        end - step * (n - 1 - i) as f32
    }
}

/// numpy's `linspace(0, stop, num)[i]`: i * (stop / (num - 1)), the last element exactly `stop`.
pub(crate) fn linspace(stop: f64, num: usize, i: usize) -> f64 {
    super::ramps::np_linspace(0.0, stop, num, i)
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `sigma` by linear interpolation of the
/// float32 log-sigma table (ascending in t), clipped to the table.
pub(crate) fn sigma_to_t(sigma: f64, log_table: &[f32]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_table.len();
    // The last index whose log sigma is <= ls (0 when none is), at most n - 2.
    let low = log_table
        .iter()
        .rposition(|&l| ls - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (l, h) = (log_table[low] as f64, log_table[low + 1] as f64);
    let w = ((l - ls) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// [`sigma_to_t`] as diffusers evaluates it on a float32 torch scalar (KDPM2's interpolated
/// sigmas): the logarithm, the weight and the blend in float32.
pub(crate) fn sigma_to_t_f32(sigma: f32, log_table: &[f32]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_table.len();
    let low = log_table
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (l, h) = (log_table[low], log_table[low + 1]);
    let w = ((l - ls) / (l - h)).clamp(0.0, 1.0);
    ((1.0 - w) * low as f32 + w * (low + 1) as f32) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_timesteps_match_diffusers() {
        let c = SchedulerConfig::default();
        let t50 = c.timesteps(50).unwrap();
        assert_eq!((t50[0], t50[1], t50[48], t50[49]), (981, 961, 21, 1));
        let t30 = c.timesteps(30).unwrap();
        assert_eq!((t30[0], t30[1], t30[29]), (958, 925, 1));
        assert!(c.timesteps(0).is_err());
    }

    #[test]
    fn table_ends() {
        let s = TrainSchedule::sdxl();
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-12);
        let sigma_max = ((1.0 - s.alphas_cumprod[999]) / s.alphas_cumprod[999]).sqrt();
        assert!((sigma_max - 14.61464).abs() < 1e-4);
        let f = SchedulerConfig::default().alphas_cumprod_f32();
        assert!((f[999] as f64 - s.alphas_cumprod[999]).abs() / s.alphas_cumprod[999] < 1e-5);
    }
}
