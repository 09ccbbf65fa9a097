//! The CPU oracles of the fused backend ops (cpu/lora.rs, cpu/pool.rs, group norm + SiLU) against
//! slow compositions of primitives, values and gradients, in f64.

use kstyle::backend::cpu::lora::LoraGeom;
use kstyle::backend::ops::{self, GateArgs};
use kstyle::backend::Storage;
use kstyle::nn::lora::{POOL_EPS, POOL_LAMBDA};
use kstyle::tensor::{Layout, Rng};
use kstyle::{DType, Device, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape.to_vec(), rng, DType::F64, Device::Cpu).unwrap()
}

fn values(s: &Storage, n: usize) -> Vec<f64> {
    match s {
        Storage::Cpu(c) => c.to_f64_vec(&Layout::contiguous(n)),
        Storage::Cuda(_) => unreachable!(),
    }
}

/// Relative L2 error of `got` against the tensor `want`.
fn rel(got: &[f64], want: &Tensor) -> f64 {
    let w = want.to_vec_f64().unwrap();
    assert_eq!(got.len(), w.len());
    let num: f64 = got.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = w.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn fused_lora_matches_its_composition() {
    let mut rng = Rng::new(3);
    let (b, s, din, dout, r, scale) = (2, 5, 6, 4, 3, 0.7);
    let h = randn(&[b, s, din], &mut rng).var().unwrap();
    let a = randn(&[r, din], &mut rng).var().unwrap();
    let bm = randn(&[dout, r], &mut rng).var().unwrap();
    let wd = randn(&[b, r], &mut rng).sigmoid().unwrap().var().unwrap();
    let wu = randn(&[b, r], &mut rng).sigmoid().unwrap().var().unwrap();
    let al = randn(&[b], &mut rng).sigmoid().unwrap().var().unwrap();
    let base = randn(&[b, s, dout], &mut rng);
    let d_out = randn(&[b, s, dout], &mut rng);
    let gate = wd.mul(&wu).unwrap().unsqueeze(1).unwrap(); // (B, 1, r)
    let z = h.matmul(&a.t().unwrap()).unwrap().mul(&gate).unwrap();
    let z = z
        .mul(&al.reshape((b, 1, 1)).unwrap())
        .unwrap()
        .scale(scale)
        .unwrap();
    let out = z.matmul(&bm.t().unwrap()).unwrap().add(&base).unwrap();
    let grads = out
        .mul(&d_out)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let g = LoraGeom {
        batch: b,
        seq: s,
        d_in: din,
        d_out: dout,
        rank: r,
        scale,
    };
    let st = |t: &Tensor| t.storage().copy_strided(t.layout()).unwrap();
    let (hs, as_, bs, wds, wus, als, bases, ds) = (
        st(&h),
        st(&a),
        st(&bm),
        st(&wd),
        st(&wu),
        st(&al),
        st(&base),
        st(&d_out),
    );
    let l = |t: &Tensor| Layout::contiguous(t.shape().clone());
    let (lh, la, lb, lwd, lwu, lal, lbase, ld) = (
        l(&h),
        l(&a),
        l(&bm),
        l(&wd),
        l(&wu),
        l(&al),
        l(&base),
        l(&d_out),
    );
    let gates = GateArgs {
        w_down: Some((&wds, &lwd)),
        w_up: Some((&wus, &lwu)),
        a: Some((&als, &lal)),
    };
    let y = ops::lora_fwd(
        (&hs, &lh),
        (&as_, &la),
        (&bs, &lb),
        gates,
        Some((&bases, &lbase)),
        &g,
    )
    .unwrap();
    assert!(rel(&values(&y, b * s * dout), &out) < 1e-12);
    let gr = ops::lora_bwd((&hs, &lh), (&as_, &la), (&bs, &lb), gates, (&ds, &ld), &g).unwrap();
    assert!(rel(&values(&gr.d_h, b * s * din), grads.get(&h).unwrap()) < 1e-12);
    // d_A / d_B come back in f32 (the AdamW master): f32 rounding only.
    assert!(rel(&values(&gr.d_a, r * din), grads.get(&a).unwrap()) < 1e-6);
    assert!(rel(&values(&gr.d_b, dout * r), grads.get(&bm).unwrap()) < 1e-6);
    assert!(
        rel(
            &values(gr.d_w_down.as_ref().unwrap(), b * r),
            grads.get(&wd).unwrap()
        ) < 1e-12
    );
    assert!(
        rel(
            &values(gr.d_w_up.as_ref().unwrap(), b * r),
            grads.get(&wu).unwrap()
        ) < 1e-12
    );
    assert!(
        rel(
            &values(gr.d_alpha.as_ref().unwrap(), b),
            grads.get(&al).unwrap()
        ) < 1e-12
    );
}

#[test]
fn fused_spatial_pool_matches_its_composition() {
    let mut rng = Rng::new(4);
    let (b, s, d) = (2, 7, 5);
    let h = randn(&[b, s, d], &mut rng).var().unwrap();
    let logits = randn(&[b, s], &mut rng).var().unwrap();
    let g = randn(&[b, d], &mut rng);
    let w = logits.sigmoid().unwrap().unsqueeze(2).unwrap(); // (B, S, 1)
    let att = h.mul(&w).unwrap().sum(&[1]).unwrap();
    let att = att
        .div(&w.sum(&[1]).unwrap().add_scalar(POOL_EPS).unwrap())
        .unwrap();
    let hc = att
        .scale(POOL_LAMBDA)
        .unwrap()
        .add(&h.max(1).unwrap().scale(1.0 - POOL_LAMBDA).unwrap())
        .unwrap();
    let grads = hc.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
    let (hs, ls, gs) = (h.storage(), logits.storage(), g.storage());
    let y = ops::spatial_pool((&hs, h.layout()), (&ls, logits.layout())).unwrap();
    assert!(rel(&values(&y, b * d), &hc) < 1e-12);
    let (dh, dl) =
        ops::spatial_pool_bwd((&hs, h.layout()), (&ls, logits.layout()), (&gs, g.layout()))
            .unwrap();
    assert!(rel(&values(&dh, b * s * d), grads.get(&h).unwrap()) < 1e-12);
    assert!(rel(&values(&dl, b * s), grads.get(&logits).unwrap()) < 1e-12);
}

#[test]
fn group_norm_silu_is_silu_of_group_norm() {
    let mut rng = Rng::new(5);
    let x = randn(&[2, 8, 3, 5], &mut rng).var().unwrap();
    let w = randn(&[8], &mut rng);
    let bias = randn(&[8], &mut rng);
    let y = x
        .group_norm(4, Some(&w), Some(&bias), 1e-5)
        .unwrap()
        .silu()
        .unwrap();
    let dy = randn(&[2, 8, 3, 5], &mut rng);
    let grads = y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
    let (xs, ws, bs, ds) = (x.storage(), w.storage(), bias.storage(), dy.storage());
    let (xa, wa, ba) = (
        (&*xs, x.layout()),
        (&*ws, w.layout()),
        (&*bs, bias.layout()),
    );
    let f = ops::group_norm_silu(xa, Some(wa), Some(ba), 4, 1e-5).unwrap();
    assert!(rel(&values(&f, 240), &y) < 1e-12);
    let (dx, _, _) =
        ops::group_norm_silu_bwd(xa, (&ds, dy.layout()), Some(wa), Some(ba), 4, 1e-5).unwrap();
    assert!(rel(&values(&dx, 240), grads.get(&x).unwrap()) < 1e-10);
}
