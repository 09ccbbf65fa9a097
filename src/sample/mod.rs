//! Noise schedules and samplers (SDXL.md section 4).

pub mod bake;
pub mod convert;
pub mod ddim;
pub mod deis;
pub mod dpmpp;
pub mod dpmpp_sde;
pub mod dpmpp_single;
pub mod edm;
pub mod euler;
pub mod heun;
pub mod image_input;
pub mod kdpm2;
pub mod lcm;
pub mod lms;
mod loss_type;
pub mod mask_crop;
pub mod model_files;
pub mod pipeline;
pub mod prompt_syntax;
pub mod ramps;
pub mod sampler_kind;
pub mod schedule;
pub mod tcd;
mod train_schedule;
pub mod unipc;

pub use ddim::Ddim;
pub use deis::Deis;
pub use dpmpp::DpmSolverPP;
pub use dpmpp_sde::DpmPPSde;
pub use dpmpp_single::DpmSolverSinglestep;
pub use edm::{EdmConfig, EdmEuler};
pub use euler::{EulerAncestral, EulerDiscrete};
pub use heun::Heun;
pub use kdpm2::Kdpm2;
pub use lcm::Lcm;
pub use lms::Lms;
pub use tcd::Tcd;
pub use unipc::UniPc;

/// Where a stochastic sampler's per-step noise comes from.
#[derive(Clone, Debug)]
pub enum Noise {
    /// N(0, 1) draws from `Rng::new(seed)`, one latent-shaped tensor per step.
    Seed(u64),
    /// Given tensors, one per step (reference runs replay PyTorch's draws).
    Given(Vec<crate::Tensor>),
}

impl Noise {
    /// The step noise of the picture drawn from `seed` (`kstyle generate`, eval and training
    /// previews): a stream of its own, apart from the initial latents' `Rng::new(seed)`.
    pub fn for_seed(seed: u64) -> Noise {
        Noise::Seed(seed ^ 0x5EED_A0CE_5757_0001)
    }

    /// The refiner's step noise for the picture of `seed`: apart from the base run's.
    pub fn for_refiner_seed(seed: u64) -> Noise {
        Noise::Seed(seed ^ 0x5EED_A0CE_5757_0002)
    }
}

impl Default for Noise {
    fn default() -> Self {
        Noise::Seed(0)
    }
}

/// The per-step noise of one generation.
pub(crate) struct NoiseStream {
    rng: Option<crate::tensor::Rng>,
    given: std::collections::VecDeque<crate::Tensor>,
}

impl NoiseStream {
    pub(crate) fn new(noise: &Noise) -> NoiseStream {
        match noise {
            Noise::Seed(s) => NoiseStream {
                rng: Some(crate::tensor::Rng::new(*s)),
                given: Default::default(),
            },
            Noise::Given(v) => NoiseStream {
                rng: None,
                given: v.iter().cloned().collect(),
            },
        }
    }

    /// The next f32 draw shaped and placed like `x`.
    pub(crate) fn next_like(&mut self, x: &crate::Tensor) -> crate::Result<crate::Tensor> {
        use crate::DType;
        match &mut self.rng {
            Some(rng) => crate::Tensor::randn(x.dims().to_vec(), rng, DType::F32, x.device()),
            None => {
                let n = self.given.pop_front().ok_or_else(|| {
                    crate::Error::Config("fewer given noise tensors than sampling steps".into())
                })?;
                n.to_dtype(DType::F32)?.to_device(x.device())
            }
        }
    }
}
pub use schedule::{SchedulerClass, SchedulerConfig, Spacing, TrainSchedule};

/// A sampler's plan for one generation: the timesteps the UNet sees and how to step.
pub trait Sampler {
    /// Timesteps passed to the UNet, in order.
    fn timesteps(&self) -> &[f64];
    /// Factor on N(0,1) initial latents (1 for the samplers that keep VP latents).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Multiplier on the latents before they enter the UNet at step `i` (1 for VP latents).
    fn input_scale(&self, _i: usize) -> f64 {
        1.0
    }
    /// UNet evaluations per step (diffusers' `scheduler.order`): 2 for Heun, whose timesteps
    /// list every evaluation.
    fn order(&self) -> usize {
        1
    }
    /// The index of the first step run when the first `skipped` steps of the schedule are skipped
    /// (img2img): `skipped` evaluations per step of the sampler's order.
    fn first_index(&self, skipped: usize) -> usize {
        skipped * self.order()
    }
    /// `x0` noised with `noise` to the level of step `index`, as diffusers' `add_noise` does at
    /// a scheduler's begin index: where img2img starts (no `init_noise_sigma` factor applies).
    fn add_noise(
        &self,
        index: usize,
        x0: &crate::Tensor,
        noise: &crate::Tensor,
    ) -> crate::Result<crate::Tensor>;
    /// The latents after step `i` given the (guided) epsilon prediction. Steps run in order
    /// from the first index; multistep samplers keep what they need of earlier steps and warm
    /// up from first order wherever they start.
    fn step(
        &mut self,
        i: usize,
        x: &crate::Tensor,
        eps: &crate::Tensor,
    ) -> crate::Result<crate::Tensor>;
}

/// `x0 + sigma noise`: noising for the samplers that keep VE latents (Euler, Heun), at the
/// schedule's float32 sigma.
pub(crate) fn ve_add_noise(
    x0: &crate::Tensor,
    noise: &crate::Tensor,
    sigma: f32,
) -> crate::Result<crate::Tensor> {
    x0.add(&noise.scale(sigma as f64)?)
}

/// `sqrt(abar) x0 + sqrt(1 - abar) noise`: DDPM's forward process, as DDIM and LCM noise, with
/// float32 square roots of the float32 table entry.
pub(crate) fn vp_add_noise(
    x0: &crate::Tensor,
    noise: &crate::Tensor,
    abar: f32,
) -> crate::Result<crate::Tensor> {
    x0.scale(abar.sqrt() as f64)?
        .add(&noise.scale((1.0 - abar).sqrt() as f64)?)
}
