//! The cultural semantic loss (KSTYLE.md eqs 11-16): pool the predicted clean latent, project it
//! into CLIP space, and reward alignment with the concept embeddings, weighted by a softmax over
//! the concept scores.

use crate::nn::lora::NORMALIZE_EPS;
use crate::nn::Linear;
use crate::tensor::Rng;
use crate::{DType, Device, Result, Tensor};

#[derive(Clone, Debug)]
pub struct CulturalLoss {
    /// Linear(C * P * P, E), trainable.
    pub proj: Linear,
    /// Side of the pooled latent (16 for SDXL at 1024², 4 in the fixtures).
    pub pool: usize,
    /// Unit concept embeddings T (K, E).
    pub concepts: Tensor,
    pub tau: f64,
}

impl CulturalLoss {
    pub fn init(
        channels: usize,
        pool: usize,
        concepts: &Tensor,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<CulturalLoss> {
        let (_, e) = concepts.dims2()?;
        let proj = Linear::init(channels * pool * pool, e, rng, dtype, device)?;
        Ok(CulturalLoss {
            proj,
            pool,
            concepts: concepts.clone(),
            tau: 1.0,
        })
    }

    /// `-mean_b sum_k s_bk softmax(s_b / tau)_k` for predicted clean latents (B, C, H, W).
    pub fn forward(&self, x0_hat: &Tensor) -> Result<Tensor> {
        let zd = x0_hat.adaptive_avg_pool2d((self.pool, self.pool))?; // (B, C, P, P)
        let f = self
            .proj
            .forward(&zd.flatten(1, 3)?)?
            .normalize_l2(1, NORMALIZE_EPS)?; // (B, E)
        let s = f.matmul(&self.concepts.t()?)?; // (B, K)
        let w = s.scale(1.0 / self.tau)?.softmax(1)?; // (B, K)
        s.mul(&w)?.sum(&[1])?.mean_all()?.neg()
    }

    /// The trainable tensors under their adapter-file names (`cultural.proj.*`), as the trainer,
    /// the optimizer and adapter files list them after the LoRA modules'.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.named()
            .into_iter()
            .map(|(n, t)| (format!("cultural.{n}"), t))
            .collect()
    }

    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.proj
            .tensors()
            .into_iter()
            .map(|(n, t)| (format!("proj.{n}"), t.clone()))
            .collect()
    }
}
