//! Layers built from tensor ops, laid out like the checkpoint key tree they load from.

pub mod dora;
pub mod lora;
pub mod lora_dropout;
pub mod lycoris;
pub mod weights;

pub use weights::Weights;

use crate::tensor::{ConvParams, Rng};
use crate::{DType, Device, Result, Tensor};

/// `y = x W^T + b`, weight (out, in).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: &Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        let weight = vb.get_matrix(&[d_out, d_in], "weight")?;
        let bias = if bias {
            Some(vb.get(&[d_out], "bias")?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// PyTorch's default `nn.Linear` init (kaiming-uniform with a = sqrt 5, i.e. U(±1/sqrt(in))
    /// for weight and bias), as trainable variables.
    pub fn init(
        d_in: usize,
        d_out: usize,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<Linear> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight =
            Tensor::rand_uniform((d_out, d_in), -bound, bound, rng, dtype, device)?.var()?;
        let bias = Tensor::rand_uniform(d_out, -bound, bound, rng, dtype, device)?.var()?;
        Ok(Linear {
            weight,
            bias: Some(bias),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Weight and bias in PyTorch's `named_parameters` order.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            v.push(("bias", b));
        }
        v
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: ConvParams,
}

impl Conv2d {
    pub fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        params: ConvParams,
    ) -> Result<Conv2d> {
        let weight = vb.get_matrix(&[c_out, c_in, kernel, kernel], "weight")?;
        let bias = vb.get_opt(&[c_out], "bias")?;
        Ok(Conv2d {
            weight,
            bias,
            params,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), self.params)
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: vb.get(&[dim], "weight")?,
            bias: vb.get(&[dim], "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)
    }
}

#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub groups: usize,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm {
            groups,
            weight: vb.get(&[channels], "weight")?,
            bias: vb.get(&[channels], "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps)
    }
}
