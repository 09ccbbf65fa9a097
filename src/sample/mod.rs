//! Noise schedules and samplers (SDXL.md section 4).

pub mod bake;
pub mod ddim;
pub mod dpmpp;
pub mod euler;
pub mod model_files;
pub mod pipeline;
pub mod schedule;

pub use ddim::Ddim;
pub use dpmpp::DpmSolverPP2M;
pub use euler::{EulerAncestral, EulerDiscrete, Noise};
pub use schedule::{SchedulerClass, SchedulerConfig, Spacing, TrainSchedule};

/// A sampler's plan for one generation: the timesteps the UNet sees and how to step.
pub trait Sampler {
    /// Timesteps passed to the UNet, in order.
    fn timesteps(&self) -> &[f64];
    /// Factor on N(0,1) initial latents.
    fn init_noise_sigma(&self) -> f64;
    /// Multiplier on the latents before they enter the UNet at step `i`.
    fn input_scale(&self, i: usize) -> f64;
    /// The latents after step `i` given the (guided) epsilon prediction. Steps run in order;
    /// multistep samplers keep what they need of earlier steps.
    fn step(
        &mut self,
        i: usize,
        x: &crate::Tensor,
        eps: &crate::Tensor,
    ) -> crate::Result<crate::Tensor>;
}
