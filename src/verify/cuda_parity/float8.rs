//! Parity cases for float8 weight storage (`--weight-dtype`): the casts bit for bit, then a
//! Linear and a convolution whose weight is float8, forward and through the tape, against the
//! CPU oracle (which widens the same bytes).

use super::*;
use crate::tensor::float8::{F8E4M3, F8E5M2};

/// Every element's exact value (widening to f64 is exact for every float dtype and keeps the
/// sign of zero), for a bit-for-bit comparison in which NaN only has to stay NaN: PTX's cvt
/// returns the canonical NaN where the CPU keeps the payload.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(Device::Cpu)?.to_vec_f64()
}

/// Every rounding case of both formats: each finite value, each midpoint between neighbours
/// and one f32 ulp either side of it, the overflow edges, zeros, infinities, NaN.
fn edge_values() -> Vec<f32> {
    let mut vals = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        448.0,
        464.0,
        465.0,
        480.0,
        57344.0,
        61439.0,
        61440.0,
        65536.0,
        1.0e-45,
        -1.0e-30,
    ];
    for decode in [(|b: u8| F8E4M3(b).to_f32()) as fn(u8) -> f32, |b: u8| {
        F8E5M2(b).to_f32()
    }] {
        let mut finite: Vec<f32> = (0..=255u8).map(decode).filter(|v| v.is_finite()).collect();
        finite.sort_by(f32::total_cmp);
        finite.dedup();
        for w in finite.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            // One f32 ulp either side (the midpoints are never zero).
            let b = mid.to_bits();
            vals.extend([w[0], mid, f32::from_bits(b + 1), f32::from_bits(b - 1)]);
        }
    }
    vals
}

fn casts_bit_exact(r: &mut Run) -> Result<()> {
    let vals = edge_values();
    let n = vals.len();
    let c = Tensor::from_vec(vals, n, Device::Cpu)?;
    for from in [DType::F32, DType::BF16, DType::F16] {
        let (cf, gf) = (c.to_dtype(from)?, c.to_dtype(from)?.to_device(r.dev)?);
        for to in [DType::F8E4M3, DType::F8E5M2] {
            let (bc, bg) = (values(&cf.to_dtype(to)?)?, values(&gf.to_dtype(to)?)?);
            push_exact(
                r,
                format!("{from} -> {to} bit-exact ({n} edge values)"),
                &bc,
                &bg,
            );
        }
    }
    // Decoding: all 256 bytes of each format, widened to every compute dtype.
    for (name, c8) in [
        (
            "f8e4m3",
            Tensor::from_vec((0..=255u8).map(F8E4M3).collect(), 256, Device::Cpu)?,
        ),
        (
            "f8e5m2",
            Tensor::from_vec((0..=255u8).map(F8E5M2).collect(), 256, Device::Cpu)?,
        ),
    ] {
        let g8 = c8.to_device(r.dev)?;
        for to in [DType::F32, DType::BF16, DType::F16] {
            let (bc, bg) = (values(&c8.to_dtype(to)?)?, values(&g8.to_dtype(to)?)?);
            push_exact(
                r,
                format!("{name} -> {to} bit-exact (all 256 bytes)"),
                &bc,
                &bg,
            );
        }
    }
    Ok(())
}

fn push_exact(r: &mut Run, case: String, cpu: &[f64], gpu: &[f64]) {
    let same = |a: &f64, b: &f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
    let wrong =
        cpu.iter().zip(gpu).filter(|(a, b)| !same(a, b)).count() + cpu.len().abs_diff(gpu.len());
    r.exact(case, wrong);
}

/// A float8 weight meeting `dt` activations: Linear (with and without bias), the gradient of x
/// through the tape (backward widens the weight again), a 3x3 convolution and its input
/// gradient.
pub(super) fn float8(r: &mut Run, dt: DType) -> Result<()> {
    if dt == DType::F32 {
        casts_bit_exact(r)?;
    }
    for store in [DType::F8E4M3, DType::F8E5M2] {
        let (xc, xg) = r.randn(&[2, 19, 40], dt)?;
        let wc = Tensor::randn((24, 40), &mut r.rng, DType::F32, Device::Cpu)?
            .affine(0.2, 0.0)?
            .to_dtype(store)?;
        let wg = wc.to_device(r.dev)?;
        let (bc, bg) = r.randn(&[24], dt)?;
        r.check(
            format!("linear {store} weight"),
            dt,
            &xg.linear(&wg, None)?,
            &xc.linear(&wc, None)?,
            false,
        )?;
        r.check(
            format!("linear+bias {store} weight"),
            dt,
            &xg.linear(&wg, Some(&bg))?,
            &xc.linear(&wc, Some(&bc))?,
            false,
        )?;
        let (uc, ug) = r.randn(&[2, 19, 24], dt)?;
        let dx = |x: &Tensor, w: &Tensor, b: &Tensor, u: &Tensor| -> Result<Tensor> {
            let x = x.var()?;
            let g = x.linear(w, Some(b))?.mul(u)?.sum_all()?.backward()?;
            g.get(&x)
                .cloned()
                .ok_or_else(|| crate::Error::Backward("float8 linear: dx is missing".into()))
        };
        r.check(
            format!("linear {store} weight backward dx"),
            dt,
            &dx(&xg, &wg, &bg, &ug)?,
            &dx(&xc, &wc, &bc, &uc)?,
            true,
        )?;
        let (xc, xg) = r.randn(&[2, 8, 9, 11], dt)?;
        let kc = Tensor::randn((12, 8, 3, 3), &mut r.rng, DType::F32, Device::Cpu)?
            .affine(0.1, 0.0)?
            .to_dtype(store)?;
        let kg = kc.to_device(r.dev)?;
        let p = crate::tensor::ConvParams {
            stride: 1,
            padding: 1,
        };
        r.check(
            format!("conv2d {store} weight"),
            dt,
            &xg.conv2d(&kg, None, p)?,
            &xc.conv2d(&kc, None, p)?,
            false,
        )?;
        let (uc, ug) = r.randn(&[2, 12, 9, 11], dt)?;
        let dx = |x: &Tensor, k: &Tensor, u: &Tensor| -> Result<Tensor> {
            let x = x.var()?;
            let g = x.conv2d(k, None, p)?.mul(u)?.sum_all()?.backward()?;
            g.get(&x)
                .cloned()
                .ok_or_else(|| crate::Error::Backward("float8 conv2d: dx is missing".into()))
        };
        r.check(
            format!("conv2d {store} weight backward dx"),
            dt,
            &dx(&xg, &kg, &ug)?,
            &dx(&xc, &kc, &uc)?,
            true,
        )?;
    }
    Ok(())
}
