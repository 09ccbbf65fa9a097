//! K-StyleLoRA training steps on EDM models (`tests/fixtures/extra/gen_train_edm.py`):
//! train_step_kstyle's setup trained EDM-style, as diffusers' SDXL LoRA script trains a model
//! whose scheduler is an EDM one, for Playground v2.5's config (epsilon, Karras sigmas) and a
//! CosXL-style one (v-prediction, exponential sigmas); the clean latents scaled by Playground's
//! VAE statistics first. The training sigma table and timesteps, the losses and the stored
//! gradients.

use super::train_cases::{check_losses, check_stored_grads, Step};
use super::{Checker, Ctx, Row};
use crate::models::vae::VaeConfig;
use crate::sample::{SchedulerConfig, TrainSchedule};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Device, Error, Result, Tensor};

pub fn train_edm(ctx: &Ctx) -> Result<Vec<Row>> {
    let setup = SafeTensorsFile::open(ctx.reference("train_step_kstyle.safetensors"))?;
    let path = ctx.reference("../../extra/train_edm.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let mut chk = Checker::new("train_edm");
    let mut step = Step::load(ctx, &setup)?;
    let stats = |k: &str| -> Result<Vec<f64>> {
        serde_json::from_str(f.meta_str(k)?).map_err(|e| Error::msg(format!("metadata `{k}`: {e}")))
    };
    let vae = VaeConfig {
        latents_mean: Some(stats("latents_mean")?),
        latents_std: Some(stats("latents_std")?),
        scaling_factor: f.meta_f64("scaling_factor")?,
        ..VaeConfig::from_file(ctx.dir.join("sdxl/vae/config.json"))?
    };
    let raw = f
        .tensor("latent_raw")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)?;
    let x0 = vae.scale_latents(&raw)?;
    chk.check("x0_scaled", &x0, &f.tensor("x0_scaled")?, ctx.forward)?;
    step.x0 = x0;
    for case in f.meta_str("cases")?.split(',') {
        let config = SchedulerConfig::from_json_text(
            f.meta_str(&format!("{case}.scheduler_config"))?,
            &path,
        )?;
        let schedule = TrainSchedule::for_model(&config)?;
        let edm = schedule
            .edm
            .as_ref()
            .ok_or_else(|| Error::msg(format!("{case}: the config did not read as EDM")))?;
        let n = edm.sigmas.len();
        let sigmas: Vec<f64> = edm.sigmas.iter().map(|&s| s as f64).collect();
        let timesteps: Vec<f64> = (0..n).map(|i| edm.timestep(i)).collect();
        for (name, ours) in [("sigmas", sigmas), ("timesteps", timesteps)] {
            let name = format!("{case}.{name}");
            let ours = Tensor::from_vec(ours, n, Device::Cpu)?;
            chk.check(&name, &ours, &f.tensor(&name)?, ctx.forward)?;
        }
        step.t = f
            .tensor(&format!("{case}.indices"))?
            .to_vec_i64()?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let losses = step.losses(&schedule)?;
        check_losses(&mut chk, ctx, &f, &format!("{case}."), &losses)?;
        check_stored_grads(&mut chk, ctx, &f, case, &step, &losses)?;
    }
    Ok(chk.rows)
}
