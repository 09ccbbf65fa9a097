//! Every backward rule against central finite differences in f64.
//!
//! Each case builds a function of trainable inputs, reduces it to `sum(f(x) * r)` with a fixed
//! random `r`, and compares every analytic gradient element with `(L(x+h) - L(x-h)) / 2h`.

// The case list reads best as `&[x.clone()]` literals next to each other.
#![allow(clippy::cloned_ref_to_slice_refs)]

use kstyle::autograd::{checkpoint, no_grad};
use kstyle::tensor::{ConvParams, Rng};
use kstyle::{DType, Device, Result, Tensor};

const H: f64 = 1e-5;
/// Central differences in f64 with h = 1e-5 err by O(h^2 f''') ~ 1e-10; 1e-6 leaves room for
/// kinks-free but steep functions (softmax of scaled scores, normalisation) without hiding a
/// wrong rule, which errs at O(1).
const TOL: f64 = 1e-6;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), &mut Rng::new(seed), DType::F64, Device::Cpu).unwrap()
}

fn with_element(t: &Tensor, i: usize, delta: f64) -> Tensor {
    let mut v = t.to_vec_f64().unwrap();
    v[i] += delta;
    Tensor::from_vec(v, t.dims().to_vec(), Device::Cpu).unwrap()
}

fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.var().unwrap()).collect();
    let y = f(&vars).unwrap();
    let r = randn(y.dims(), 99);
    let loss = |xs: &[Tensor]| -> f64 {
        no_grad(|| {
            f(xs)
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        })
    };
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, x) in vars.iter().enumerate() {
        let g = grads
            .get(x)
            .unwrap_or_else(|| panic!("{name}: no gradient for input {k}"))
            .to_vec_f64()
            .unwrap();
        assert_eq!(
            g.len(),
            x.elem_count(),
            "{name}: gradient {k} has the wrong size"
        );
        for (i, &gi) in g.iter().enumerate() {
            let mut plus: Vec<Tensor> = inputs.to_vec();
            let mut minus: Vec<Tensor> = inputs.to_vec();
            plus[k] = with_element(&inputs[k], i, H);
            minus[k] = with_element(&inputs[k], i, -H);
            let fd = (loss(&plus) - loss(&minus)) / (2.0 * H);
            assert!(
                (gi - fd).abs() <= TOL * fd.abs().max(1.0),
                "{name}: d/dinput{k}[{i}] analytic {gi} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn unary_activations() {
    let x = randn(&[3, 4], 1);
    let pos = x.abs().unwrap().add_scalar(0.5).unwrap();
    check("exp", &[x.clone()], |v| v[0].exp());
    check("log", &[pos.clone()], |v| v[0].log());
    check("sqrt", &[pos.clone()], |v| v[0].sqrt());
    check("recip", &[pos.clone()], |v| v[0].recip());
    check("sqr", &[x.clone()], |v| v[0].sqr());
    check("neg", &[x.clone()], |v| v[0].neg());
    check("sigmoid", &[x.clone()], |v| v[0].sigmoid());
    check("silu", &[x.clone()], |v| v[0].silu());
    check("tanh", &[x.clone()], |v| v[0].tanh());
    check("gelu", &[x.clone()], |v| v[0].gelu());
    check("gelu_tanh", &[x.clone()], |v| v[0].gelu_tanh());
    check("quick_gelu", &[x.clone()], |v| v[0].quick_gelu());
    check("affine", &[x.clone()], |v| v[0].affine(-1.5, 0.25));
    check("clamp_min", &[x.clone()], |v| v[0].clamp_min(0.1));
}

#[test]
fn abs_and_relu_away_from_the_kink() {
    let x = randn(&[3, 4], 2);
    // Shift every element at least 0.1 away from 0 so the finite difference never straddles it.
    let v: Vec<f64> = x
        .to_vec_f64()
        .unwrap()
        .into_iter()
        .map(|a| if a >= 0.0 { a + 0.1 } else { a - 0.1 })
        .collect();
    let x = Tensor::from_vec(v, (3, 4), Device::Cpu).unwrap();
    check("abs", &[x.clone()], |v| v[0].abs());
    check("relu", &[x.clone()], |v| v[0].relu());
}

#[test]
fn binary_with_broadcasting() {
    let a = randn(&[2, 3, 4], 3);
    let b = randn(&[3, 1], 4);
    let c = randn(&[4], 5).abs().unwrap().add_scalar(0.5).unwrap();
    check("add", &[a.clone(), b.clone()], |v| v[0].add(&v[1]));
    check("sub", &[a.clone(), b.clone()], |v| v[0].sub(&v[1]));
    check("mul", &[a.clone(), b.clone()], |v| v[0].mul(&v[1]));
    check("div", &[a.clone(), c.clone()], |v| v[0].div(&v[1]));
}

#[test]
fn matmul_batched_and_broadcast() {
    check("matmul 2d", &[randn(&[3, 5], 6), randn(&[5, 2], 7)], |v| {
        v[0].matmul(&v[1])
    });
    check(
        "matmul batched",
        &[randn(&[2, 3, 5], 8), randn(&[2, 5, 4], 9)],
        |v| v[0].matmul(&v[1]),
    );
    check(
        "matmul weight broadcast",
        &[randn(&[2, 3, 5], 10), randn(&[4, 5], 11)],
        |v| v[0].matmul(&v[1].t()?),
    );
    check(
        "linear",
        &[randn(&[2, 3, 5], 12), randn(&[4, 5], 13), randn(&[4], 14)],
        |v| v[0].linear(&v[1], Some(&v[2])),
    );
}

#[test]
fn reductions() {
    let x = randn(&[2, 3, 4], 15);
    check("sum", &[x.clone()], |v| v[0].sum(&[1]));
    check("sum many", &[x.clone()], |v| v[0].sum_keepdim(&[0, 2]));
    check("mean", &[x.clone()], |v| v[0].mean(&[2]));
    check("mean_all", &[x.clone()], |v| v[0].mean_all());
    check("max", &[x.clone()], |v| v[0].max(1));
    check("max last", &[x.clone()], |v| v[0].max_keepdim(2));
    check("softmax last", &[x.clone()], |v| v[0].softmax(2));
    check("softmax inner", &[x.clone()], |v| v[0].softmax(1));
    check("normalize_l2", &[x.clone()], |v| {
        v[0].normalize_l2(2, 1e-12)
    });
}

#[test]
fn norms() {
    let x = randn(&[2, 3, 5], 16);
    let (w, b) = (randn(&[5], 17), randn(&[5], 18));
    check("layer_norm", &[x.clone(), w.clone(), b.clone()], |v| {
        v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5)
    });
    check("layer_norm plain", &[x.clone()], |v| {
        v[0].layer_norm(None, None, 1e-5)
    });
    let x = randn(&[2, 6, 3, 2], 19);
    let (w, b) = (randn(&[6], 20), randn(&[6], 21));
    check("group_norm", &[x.clone(), w, b], |v| {
        v[0].group_norm(3, Some(&v[1]), Some(&v[2]), 1e-6)
    });
    check("group_norm silu", &[x], |v| {
        v[0].group_norm(2, None, None, 1e-6)?.silu()
    });
}

#[test]
fn convolutions() {
    let x = randn(&[2, 3, 6, 5], 22);
    let w3 = randn(&[4, 3, 3, 3], 23);
    let b = randn(&[4], 24);
    check("conv 3x3 pad 1", &[x.clone(), w3.clone(), b.clone()], |v| {
        v[0].conv2d(
            &v[1],
            Some(&v[2]),
            ConvParams {
                stride: 1,
                padding: 1,
            },
        )
    });
    check("conv 3x3 stride 2", &[x.clone(), w3.clone()], |v| {
        v[0].conv2d(
            &v[1],
            None,
            ConvParams {
                stride: 2,
                padding: 1,
            },
        )
    });
    check("conv 1x1", &[x.clone(), randn(&[4, 3, 1, 1], 25)], |v| {
        v[0].conv2d(&v[1], None, ConvParams::default())
    });
    check(
        "conv 2x3 kernel",
        &[x.clone(), randn(&[2, 3, 2, 3], 26)],
        |v| v[0].conv2d(&v[1], None, ConvParams::default()),
    );
}

#[test]
fn spatial() {
    let x = randn(&[1, 2, 5, 4], 27);
    check("upsample", &[x.clone()], |v| v[0].upsample_nearest2d(2));
    check("avg_pool", &[x.clone()], |v| v[0].avg_pool2d(2, 2));
    check("adaptive_avg_pool", &[x.clone()], |v| {
        v[0].adaptive_avg_pool2d((3, 3))
    });
}

#[test]
fn attention() {
    let (q, k, v) = (
        randn(&[2, 2, 5, 4], 28),
        randn(&[2, 2, 7, 4], 29),
        randn(&[2, 2, 7, 3], 30),
    );
    check("sdpa cross", &[q.clone(), k.clone(), v.clone()], |t| {
        Tensor::sdpa(&t[0], &t[1], &t[2], 0.5, false)
    });
    let (k, v) = (randn(&[2, 2, 5, 4], 31), randn(&[2, 2, 5, 4], 32));
    check("sdpa causal", &[q, k, v], |t| {
        Tensor::sdpa(&t[0], &t[1], &t[2], 0.5, true)
    });
}

#[test]
fn views_and_concatenation() {
    let x = randn(&[2, 3, 4], 33);
    check("reshape", &[x.clone()], |v| v[0].reshape((6, 4)));
    check("permute", &[x.clone()], |v| {
        v[0].permute(&[2, 0, 1])?.contiguous()
    });
    check("transpose reshape", &[x.clone()], |v| {
        v[0].transpose(1, 2)?.reshape((2, 12))
    });
    check("narrow", &[x.clone()], |v| v[0].narrow(2, 1, 2));
    check("chunk", &[x.clone()], |v| Ok(v[0].chunk(2, 2)?[1].clone()));
    check("broadcast", &[randn(&[3, 1], 34)], |v| {
        v[0].broadcast_as(&kstyle::Shape::from((2, 3, 4)))
    });
    check("cat", &[x.clone(), randn(&[2, 1, 4], 35)], |v| {
        Tensor::cat(&[v[0].clone(), v[1].clone()], 1)
    });
    check("squeeze unsqueeze", &[x], |v| v[0].unsqueeze(1)?.squeeze(1));
}

#[test]
fn checkpointed_segment() {
    let x = randn(&[2, 3], 36);
    let w = randn(&[4, 3], 37);
    check("checkpoint", &[x, w], |v| {
        let w = v[1].clone();
        checkpoint(&[v[0].clone()], move |i| i[0].linear(&w, None)?.silu())
    });
}

#[test]
fn fused_gated_lora_update_and_spatial_pool() {
    use kstyle::tensor::LoraGates;
    let (h, a, b) = (
        randn(&[2, 5, 4], 40),
        randn(&[3, 4], 41),
        randn(&[6, 3], 42),
    );
    let (wd, wu, al) = (
        randn(&[2, 3], 43).sigmoid().unwrap(),
        randn(&[2, 3], 44).sigmoid().unwrap(),
        randn(&[2, 1], 45).sigmoid().unwrap(),
    );
    let base = randn(&[2, 5, 6], 46);
    check(
        "lora_update gated",
        &[h.clone(), a.clone(), b.clone(), wd, wu, al, base],
        |v| {
            let g = LoraGates {
                w_down: v[3].clone(),
                w_up: v[4].clone(),
                a: v[5].clone(),
            };
            Tensor::lora_update(&v[0], &v[1], &v[2], Some(&g), Some(&v[6]), 0.75)
        },
    );
    check("lora_update plain", &[h.clone(), a, b], |v| {
        Tensor::lora_update(&v[0], &v[1], &v[2], None, None, 1.5)
    });
    // Distinct values per channel keep the max away from ties under the perturbation.
    check("spatial_pool", &[h, randn(&[2, 5], 47)], |v| {
        Tensor::spatial_pool(&v[0], &v[1])
    });
}
