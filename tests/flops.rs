//! The dispatch FLOP counter (`backend::flops`, behind every rate `kstyle bench` prints) against
//! the analytic count from the parameter list (`models::unet::flops`): one UNet forward must issue
//! exactly what the architecture implies, on odd latent sizes, with linear and 1×1-conv
//! projections, with any number of text tokens. Alone in its binary: the counter is global.

use std::collections::BTreeMap;

use kstyle::autograd::no_grad;
use kstyle::backend::flops;
use kstyle::models::unet::flops::forward_flops;
use kstyle::models::unet::{param_shapes, UNet2DConditionModel, UNetConfig};
use kstyle::nn::Weights;
use kstyle::tensor::Rng;
use kstyle::{DType, Device, Tensor};

const TINY_UNET: &str = include_str!("fixtures/tiny/sdxl/unet/config.json");

fn config(edit: impl FnOnce(&mut serde_json::Value)) -> UNetConfig {
    let mut v: serde_json::Value = serde_json::from_str(TINY_UNET).unwrap();
    edit(&mut v);
    UNetConfig::from_json(&v).unwrap()
}

fn random_unet(cfg: &UNetConfig, rng: &mut Rng) -> UNet2DConditionModel {
    let map: BTreeMap<String, Tensor> = param_shapes(cfg)
        .0
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(shape, rng, DType::F32, Device::Cpu).unwrap();
            (name, t.affine(0.05, 0.0).unwrap())
        })
        .collect();
    let vb = Weights::from_map(map, "<random>", DType::F32, Device::Cpu);
    UNet2DConditionModel::load(&vb, cfg).unwrap()
}

/// Operations one forward issues, counted at dispatch.
fn counted(unet: &UNet2DConditionModel, batch: usize, hw: (usize, usize), tokens: usize) -> u64 {
    let cfg = &unet.config;
    let tt = cfg.text_time.as_ref().unwrap();
    let mut rng = Rng::new(3);
    let mut randn = |shape: Vec<usize>| Tensor::randn(shape, &mut rng, DType::F32, Device::Cpu);
    let x = randn(vec![batch, cfg.in_channels, hw.0, hw.1]).unwrap();
    let ctx = randn(vec![batch, tokens, cfg.cross_attention_dim[0]]).unwrap();
    let pooled = randn(vec![batch, tt.input_dim - 6 * tt.time_embed_dim]).unwrap();
    let ids = randn(vec![batch, 6]).unwrap();
    let t = Tensor::from_vec(vec![500.0f32; batch], batch, Device::Cpu).unwrap();
    flops::reset();
    let out = no_grad(|| unet.forward(&x, &t, &ctx, &pooled, &ids)).unwrap();
    let issued = flops::issued();
    assert_eq!(out.dims(), [batch, cfg.out_channels, hw.0, hw.1]);
    issued
}

#[test]
fn a_unet_forward_issues_exactly_its_analytic_flops() {
    let mut rng = Rng::new(11);
    let linear = config(|_| {});
    let conv_proj = config(|v| v["use_linear_projection"] = false.into());
    for (what, cfg) in [
        ("linear projections", linear),
        ("1x1 conv projections", conv_proj),
    ] {
        let unet = random_unet(&cfg, &mut rng);
        for (batch, hw, tokens) in [(1, (8, 8), 77), (2, (13, 7), 77), (3, (6, 10), 5)] {
            let want = forward_flops(&cfg, batch, hw, tokens);
            let got = counted(&unet, batch, hw, tokens);
            assert_eq!(
                got, want,
                "{what}, batch {batch}, latent {hw:?}, {tokens} tokens: counted {got}, analytic {want}"
            );
        }
    }
}
