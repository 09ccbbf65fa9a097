//! The tape's contracts: frozen weights never get gradients (nor history), checkpointed segments
//! give bit-identical gradients, casts pass gradients through, and the layer fixtures hold.

use kstyle::autograd::{checkpoint, no_grad};
use kstyle::nn::lora::{AdaptedLinear, LoraAdapter, LoraConfig};
use kstyle::nn::Linear;
use kstyle::tensor::{ConvParams, Rng};
use kstyle::{DType, Device, Result, Tensor};
use std::path::Path;

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape.to_vec(), rng, DType::F32, Device::Cpu).unwrap()
}

/// A tiny attention block with frozen weights everywhere and a gated LoRA on two projections,
/// standing in for a UNet transformer block.
struct Block {
    norm_w: Tensor,
    norm_b: Tensor,
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: Linear,
    out: AdaptedLinear,
    conv: Tensor,
}

impl Block {
    fn new(d: usize, concepts: &Tensor, rng: &mut Rng) -> Block {
        let lin = |rng: &mut Rng| Linear {
            weight: randn(&[d, d], rng),
            bias: Some(randn(&[d], rng)),
        };
        let cfg = LoraConfig {
            rank: 2,
            alpha: 2.0,
            guidance: 1.5,
            gate_hidden: 8,
            mod_hidden: 4,
        };
        let adapted = |gated: bool, rng: &mut Rng| {
            let mut a = AdaptedLinear::new(lin(rng));
            let mut ad = LoraAdapter::init(
                d,
                d,
                cfg,
                gated.then_some(concepts),
                rng,
                DType::F32,
                Device::Cpu,
            )
            .unwrap();
            // B starts at zero; random values everywhere give every parameter a real gradient.
            ad.assign(|_, shape| randn(shape, rng).scale(0.3)).unwrap();
            a.adapter = Some(ad);
            a
        };
        let q = adapted(true, rng);
        let k = adapted(false, rng);
        let v = lin(rng);
        let out = adapted(true, rng);
        Block {
            norm_w: randn(&[d], rng),
            norm_b: randn(&[d], rng),
            q,
            k,
            v,
            out,
            conv: randn(&[2, 2, 3, 3], rng),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let h = x.layer_norm(Some(&self.norm_w), Some(&self.norm_b), 1e-5)?;
        let split = |t: Tensor| t.reshape((b, s, 2, d / 2))?.transpose(1, 2);
        let (q, k, v) = (
            split(self.q.forward(&h)?)?,
            split(self.k.forward(&h)?)?,
            split(self.v.forward(&h)?)?,
        );
        let a = Tensor::sdpa(&q, &k, &v, 0.5, false)?
            .transpose(1, 2)?
            .reshape((b, s, d))?;
        let y = x.add(&self.out.forward(&a)?)?;
        // A frozen conv on top, viewing (B, S, D) as (B, 2, S, D/2) images.
        let img = y.reshape((b, s, 2, d / 2))?.transpose(1, 2)?.contiguous()?;
        let c = img
            .conv2d(
                &self.conv,
                None,
                ConvParams {
                    stride: 1,
                    padding: 1,
                },
            )?
            .group_norm(1, None, None, 1e-5)?
            .silu()?;
        c.transpose(1, 2)?.reshape((b, s, d))?.add(&y)
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        [&self.q, &self.k, &self.out]
            .iter()
            .flat_map(|a| a.adapter.as_ref().unwrap().named())
            .collect()
    }

    fn frozen(&self) -> Vec<Tensor> {
        let mut v = vec![
            self.norm_w.clone(),
            self.norm_b.clone(),
            self.conv.clone(),
            self.v.weight.clone(),
        ];
        for a in [&self.q, &self.k, &self.out] {
            v.push(a.base.weight.clone());
            v.extend(a.base.bias.clone());
        }
        v
    }
}

fn setup() -> (Vec<Block>, Tensor) {
    let mut rng = Rng::new(11);
    let concepts = randn(&[3, 5], &mut rng).normalize_l2(1, 1e-12).unwrap();
    let blocks = (0..3).map(|_| Block::new(8, &concepts, &mut rng)).collect();
    (blocks, randn(&[2, 6, 8], &mut rng))
}

#[test]
fn frozen_weights_get_no_gradient_and_no_history() {
    let (blocks, x) = setup();
    let mut h = x.clone();
    for b in &blocks {
        h = b.forward(&h).unwrap();
    }
    let loss = h.sqr().unwrap().mean_all().unwrap();
    assert!(loss.tracks(), "the loss must depend on the adapters");
    let grads = loss.backward().unwrap();
    let trainable: Vec<Tensor> = blocks
        .iter()
        .flat_map(|b| b.trainable())
        .map(|(_, t)| t)
        .collect();
    for b in &blocks {
        for w in b.frozen() {
            assert!(!w.tracks(), "a frozen weight carries autograd state");
            assert!(
                grads.get(&w).is_none(),
                "a frozen weight got a gradient buffer"
            );
        }
    }
    for t in &trainable {
        assert!(grads.get(t).is_some(), "a trainable tensor got no gradient");
    }
    // The store holds exactly the trainable tensors: nothing for frozen weights or the input.
    assert_eq!(grads.len(), trainable.len());
    assert!(grads.get(&x).is_none());
}

#[test]
fn ops_on_frozen_inputs_record_nothing() {
    let mut rng = Rng::new(3);
    let (w, x) = (randn(&[4, 4], &mut rng), randn(&[2, 4], &mut rng));
    let y = x
        .linear(&w, None)
        .unwrap()
        .silu()
        .unwrap()
        .softmax(1)
        .unwrap();
    assert!(y.op().is_none() && !y.tracks());
    let y = no_grad(|| x.linear(&w.var().unwrap(), None).unwrap());
    assert!(!y.tracks(), "no_grad must not record");
}

fn grads_bits(checkpointed: bool) -> Vec<(String, Vec<u32>)> {
    let (blocks, x) = setup();
    let blocks: Vec<std::sync::Arc<Block>> = blocks.into_iter().map(std::sync::Arc::new).collect();
    let x = x.var().unwrap();
    let mut h = x.clone();
    for b in &blocks {
        h = if checkpointed {
            let b = b.clone();
            checkpoint(&[h.clone()], move |i| b.forward(&i[0])).unwrap()
        } else {
            b.forward(&h).unwrap()
        };
    }
    let grads = h.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let mut out = vec![("x".to_string(), bits(grads.get(&x).unwrap()))];
    for (i, b) in blocks.iter().enumerate() {
        for (name, t) in b.trainable() {
            out.push((format!("{i}.{name}"), bits(grads.get(&t).unwrap())));
        }
    }
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn checkpointed_gradients_are_bit_identical() {
    let plain = grads_bits(false);
    let ckpt = grads_bits(true);
    assert_eq!(plain.len(), ckpt.len());
    for ((n, a), (_, b)) in plain.iter().zip(&ckpt) {
        assert_eq!(a, b, "gradient of {n} differs under checkpointing");
    }
}

#[test]
fn cast_passes_gradient_through() {
    let x = Tensor::from_vec(vec![0.25f64, -1.5, 3.0], 3, Device::Cpu)
        .unwrap()
        .var()
        .unwrap();
    let up = Tensor::from_vec(vec![1.0f32, 2.0, -0.5], 3, Device::Cpu).unwrap();
    let g = x
        .to_dtype(DType::F32)
        .unwrap()
        .mul(&up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get(&x).unwrap();
    assert_eq!(gx.dtype(), DType::F64);
    assert_eq!(gx.to_vec_f64().unwrap(), vec![1.0, 2.0, -0.5]);
}

#[test]
fn gated_layer_and_cultural_loss_match_the_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let only = vec!["gated_lora_layer".to_string(), "cultural_loss".to_string()];
    let report = kstyle::verify::run(&dir, Device::Cpu, Some(&only)).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert!(
        report.rows.len() >= 30,
        "expected every tensor of both cases, got {}",
        report.rows.len()
    );
    for r in &report.rows {
        assert!(
            r.passed,
            "{} {}: error {:e} > {:e}",
            r.case, r.tensor, r.error, r.tolerance
        );
    }
}

/// The fused layer path (one-pass gated update and pooling) against the composition of
/// primitives it replaces: values and every gradient, f64, to rounding.
#[test]
fn fused_lora_path_matches_the_composition() {
    let mut rng = Rng::new(21);
    let f64n = |shape: &[usize], rng: &mut Rng| {
        Tensor::randn(shape.to_vec(), rng, DType::F64, Device::Cpu).unwrap()
    };
    let concepts = f64n(&[4, 6], &mut rng).normalize_l2(1, 1e-12).unwrap();
    for gated in [true, false] {
        let cfg = LoraConfig {
            rank: 3,
            alpha: 3.0,
            guidance: 1.5,
            gate_hidden: 5,
            mod_hidden: 4,
        };
        let mut ad = LoraAdapter::init(
            7,
            9,
            cfg,
            gated.then_some(&concepts),
            &mut rng,
            DType::F64,
            Device::Cpu,
        )
        .unwrap();
        ad.assign(|_, shape| {
            f64n(shape, &mut Rng::new(shape.iter().product::<usize>() as u64)).scale(0.4)
        })
        .unwrap();
        let h = f64n(&[2, 5, 7], &mut rng).var().unwrap();
        let up = f64n(&[2, 5, 9], &mut rng);
        let run = |fused: bool| {
            let y = if fused {
                ad.delta(&h).unwrap()
            } else {
                ad.delta_composed(&h).unwrap()
            };
            let g = y.mul(&up).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![
                y.to_vec_f64().unwrap(),
                g.get(&h).unwrap().to_vec_f64().unwrap(),
            ];
            for (_, t) in ad.named() {
                out.push(g.get(&t).unwrap().to_vec_f64().unwrap());
            }
            out
        };
        let (fused, composed) = (run(true), run(false));
        for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let scale = b.iter().map(|y| y.abs()).fold(1e-300, f64::max);
            // d_A and d_B come out of the fused backward as f32 (they feed the AdamW masters).
            assert!(
                err <= 1e-6 * scale,
                "gated={gated} tensor {i}: max error {err} (scale {scale})"
            );
        }
    }
}
