//! Parity cases for the primitive families: elementwise, matmul, reductions.

use super::*;

const UNARY: [UnaryOp; 14] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Recip,
    UnaryOp::Sqr,
    UnaryOp::Abs,
    UnaryOp::Sigmoid,
    UnaryOp::Silu,
    UnaryOp::Tanh,
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
    UnaryOp::QuickGelu,
    UnaryOp::Relu,
];

/// f32 -> bf16 / f16 rounding, bit for bit, on the values where rounding is easy to get wrong:
/// ties in both directions, the f16 subnormal range and its underflow edge, the overflow edge
/// (65504 stays, 65520 goes to inf), signed zeros, infinities. NaN only has to stay NaN.
fn casts_bit_exact(r: &mut Run) -> Result<()> {
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65504.0,
        65519.0,
        65520.0,
        -65520.0,
        1.0e5,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-45,
        6.0e-8,
        2.0f32.powi(-24),
        2.0f32.powi(-25),
        2.0f32.powi(-25) * 1.5,
        2.0f32.powi(-14),
        2.0f32.powi(-14) * (1.0 - 2.0f32.powi(-11)),
    ];
    // Exact ties and their neighbours at the bf16 (8-bit) and f16 (11-bit) mantissa cuts.
    for m in [1.0f32, 1.5, 3.0, -1.25, 1000.0] {
        for bits in [8, 11] {
            let tie = m + m.abs() * 2.0f32.powi(-bits);
            vals.extend([
                tie,
                f32::from_bits(tie.to_bits() + 1),
                f32::from_bits(tie.to_bits() - 1),
            ]);
            let odd_tie = m + 3.0 * m.abs() * 2.0f32.powi(-bits);
            vals.push(odd_tie);
        }
    }
    for i in 0..200 {
        // Log-spaced magnitudes through both formats' whole range, both signs.
        let v = 2.0f32.powf(-30.0 + 0.23 * i as f32);
        vals.extend([v, -v * 1.37]);
    }
    let n = vals.len();
    let c = Tensor::from_vec(vals, n, Device::Cpu)?;
    let g = c.to_device(r.dev)?;
    for to in [DType::BF16, DType::F16] {
        let case = format!("to_dtype -> {to} bit-exact ({n} edge values)");
        let bits = |t: &Tensor| -> Result<Vec<(u16, bool)>> {
            let v = t.to_dtype(to)?.to_vec_f64()?;
            Ok(v.iter()
                .map(|&x| match to {
                    DType::BF16 => (half::bf16::from_f32(x as f32).to_bits(), x.is_nan()),
                    _ => (half::f16::from_f32(x as f32).to_bits(), x.is_nan()),
                })
                .collect())
        };
        let (bc, bg) = (bits(&c)?, bits(&g)?);
        let bad: Vec<usize> = (0..n)
            .filter(|&i| {
                let (a, b) = (bc[i], bg[i]);
                if a.1 || b.1 {
                    a.1 != b.1
                } else {
                    a.0 != b.0
                }
            })
            .collect();
        let wrong = bad.len();
        let case = match bad.first() {
            None => case,
            Some(&i) => format!(
                "{case}: first {:e} (f32 {:#010x}) gives {:#06x} here, {:#06x} on the CPU",
                c.to_vec_f32()?[i],
                c.to_vec_f32()?[i].to_bits(),
                bg[i].0,
                bc[i].0
            ),
        };
        r.exact(case, wrong);
    }
    Ok(())
}

/// `Tensor::full` made on the device (the fill kernel) against the CPU's, bit for bit, in `dt`:
/// values where rounding f64 -> f32 -> dtype would differ from f64 -> dtype (a bf16 / f16 tie
/// in f32 that is not one in f64), overflow, signed zero, and a size that is not a multiple of
/// the kernel's block.
fn fill_bit_exact(r: &mut Run, dt: DType) -> Result<()> {
    let just_above_tie = |bits: i32| 1.0 + 2f64.powi(-bits) + 2f64.powi(-40);
    let values = [
        0.0,
        -0.0,
        1.0,
        -2.5,
        0.1,
        1.0 / 3.0,
        just_above_tie(8),
        -just_above_tie(11),
        70000.0,
        1.0e39,
        -1.0e-30,
    ];
    let n = 1000;
    let mut wrong = 0;
    for v in values {
        let c = Tensor::full(v, (8, 125), dt, Device::Cpu)?.to_vec_f64()?;
        let g = Tensor::full(v, (8, 125), dt, r.dev)?.to_vec_f64()?;
        wrong += (0..n).filter(|&i| c[i].to_bits() != g[i].to_bits()).count();
    }
    r.exact(
        format!("full -> {dt} bit-exact ({} values x {n})", values.len()),
        wrong,
    );
    Ok(())
}

pub(super) fn elementwise(r: &mut Run, dt: DType) -> Result<()> {
    if dt == DType::F32 {
        casts_bit_exact(r)?;
    }
    fill_bit_exact(r, dt)?;
    for op in UNARY {
        let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
        let (lo, hi) = if positive { (0.5, 3.0) } else { (-3.0, 3.0) };
        // A transposed (strided) input exercises the index walk.
        let (xc, xg) = r.pair(&[37, 65], dt, lo, hi)?;
        let (xc, xg) = (xc.t()?, xg.t()?);
        same!(
            r,
            format!("unary {}", op.name()),
            dt,
            false,
            (65, 37),
            [xc / xg],
            |x| ops::unary(x, op)
        )?;
        let (gc, gg) = r.randn(&[65, 37], dt)?;
        same!(
            r,
            format!("unary_bwd {}", op.name()),
            dt,
            true,
            (65, 37),
            [xc / xg, gc / gg],
            |x, g| ops::unary_bwd(x, g, op)
        )?;
    }
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
        let (ac, ag) = r.randn(&[3, 1, 65], dt)?;
        let (bc, bg) = r.pair(&[1, 77, 65], dt, 0.5, 2.0)?;
        let shape = Shape::from((3, 77, 65));
        let (ac, ag) = (ac.broadcast_as(&shape)?, ag.broadcast_as(&shape)?);
        let (bc, bg) = (bc.broadcast_as(&shape)?, bg.broadcast_as(&shape)?);
        same!(
            r,
            format!("binary {} broadcast", op.name()),
            dt,
            false,
            shape.clone(),
            [ac / ag, bc / bg],
            |x, y| { ops::binary(x, y, op) }
        )?;
    }
    let (xc, xg) = r.randn(&[5, 7, 9], dt)?;
    let (xc, xg) = (xc.permute(&[2, 0, 1])?, xg.permute(&[2, 0, 1])?);
    same!(r, "affine".into(), dt, false, (9, 5, 7), [xc / xg], |x| {
        ops::affine(x, 1.7, -0.3)
    })?;
    same!(
        r,
        "clamp_min".into(),
        dt,
        false,
        (9, 5, 7),
        [xc / xg],
        |x| ops::clamp_min(x, 0.25)
    )?;
    same!(
        r,
        "copy_strided".into(),
        dt,
        false,
        (9, 5, 7),
        [xc / xg],
        |x| x.0.copy_strided(x.1)
    )?;
    let (gc, gg) = r.randn(&[9, 5, 7], dt)?;
    same!(
        r,
        "clamp_min_bwd".into(),
        dt,
        true,
        (9, 5, 7),
        [xc / xg, gc / gg],
        |x, g| ops::clamp_min_bwd(x, g, 0.25)
    )?;
    for to in [DType::F32, DType::BF16, DType::F16] {
        same!(
            r,
            format!("to_dtype -> {to}"),
            dt,
            false,
            (9, 5, 7),
            [xc / xg],
            |x| x.0.to_dtype(x.1, to)
        )?;
    }
    let (tc, tg) = r.randn(&[50, 33], dt)?;
    let ids: Vec<i64> = (0..23).map(|i| (i * 7 % 50) as i64).collect();
    let idc = Tensor::from_vec(ids, 23usize, Device::Cpu)?;
    let idg = idc.to_device(r.dev)?;
    same!(
        r,
        "index_select".into(),
        dt,
        false,
        (23, 33),
        [tc / tg, idc / idg],
        |t, i| ops::index_select(t, i)
    )?;
    let (p1c, p1g) = r.randn(&[2, 3, 5], dt)?;
    let (p2c, p2g) = r.randn(&[2, 4, 5], dt)?;
    let cat_c = Tensor::cat(&[p1c, p2c.clone()], 1)?;
    let cat_g = Tensor::cat(&[p1g, p2g.clone()], 1)?;
    r.check("cat dim 1".into(), dt, &cat_g, &cat_c, false)?;
    let _ = (p2c, p2g);
    Ok(())
}

pub(super) fn matmul(r: &mut Run, dt: DType) -> Result<()> {
    let cases: [(&str, [usize; 4], usize, bool); 4] = [
        ("matmul batched", [2, 3, 77, 65], 33, false),
        ("matmul B transposed", [1, 1, 100, 320], 130, true),
        ("matmul large", [1, 1, 512, 768], 320, false),
        ("matmul odd", [1, 3, 1, 7], 1, true),
    ];
    for (name, [b0, b1, m, k], n, bt) in cases {
        let (ac, ag) = r.randn(&[b0, b1, m, k], dt)?;
        let (bc, bg) = if bt {
            let (c, g) = r.randn(&[b0, b1, n, k], dt)?;
            (c.transpose(2, 3)?, g.transpose(2, 3)?)
        } else {
            r.randn(&[b0, b1, k, n], dt)?
        };
        let (yc, yg) = (ac.matmul(&bc)?, ag.matmul(&bg)?);
        r.check(name.into(), dt, &yg, &yc, false)?;
    }
    linear(r, dt)?;
    // Broadcast batch: a (2, 1, 9, 17) against b (1, 4, 17, 5).
    let (ac, ag) = r.randn(&[2, 1, 9, 17], dt)?;
    let (bc, bg) = r.randn(&[1, 4, 17, 5], dt)?;
    r.check(
        "matmul broadcast batch".into(),
        dt,
        &ag.matmul(&bg)?,
        &ac.matmul(&bc)?,
        false,
    )
}

/// `x W^T + b`: on CUDA one cuBLASLt call with the bias in its epilogue when the operands are
/// plain, the composition otherwise (a bias at an address that is not 16-byte aligned, a strided
/// x); the CPU always composes. Then the gradients of all three through the tape.
fn linear(r: &mut Run, dt: DType) -> Result<()> {
    let cases: [(&str, &[usize], usize); 3] = [
        ("linear+bias 3-D", &[2, 77, 40], 24),
        ("linear+bias 2-D", &[130, 96], 160),
        ("linear+bias one row", &[1, 7], 5),
    ];
    for (name, xs, n) in cases {
        let k = xs[xs.len() - 1];
        let (xc, xg) = r.randn(xs, dt)?;
        let (wc, wg) = r.randn(&[n, k], dt)?;
        let (bc, bg) = r.randn(&[n], dt)?;
        let (yc, yg) = (xc.linear(&wc, Some(&bc))?, xg.linear(&wg, Some(&bg))?);
        r.check(name.into(), dt, &yg, &yc, false)?;
    }
    // A bias one element into its buffer, and x transposed: both take the composed path.
    let (xc, xg) = r.randn(&[33, 20], dt)?;
    let (wc, wg) = r.randn(&[9, 33], dt)?;
    let (bc, bg) = r.randn(&[10], dt)?;
    let (bc, bg) = (bc.narrow(0, 1, 9)?, bg.narrow(0, 1, 9)?);
    let (xc, xg) = (xc.t()?, xg.t()?);
    r.check(
        "linear+bias strided x, offset bias".into(),
        dt,
        &xg.linear(&wg, Some(&bg))?,
        &xc.linear(&wc, Some(&bc))?,
        false,
    )?;
    // Gradients: loss = sum(y * u) for a fixed random u, so dy = u.
    let (xc, xg) = r.randn(&[3, 21, 40], dt)?;
    let (wc, wg) = r.randn(&[24, 40], dt)?;
    let (bc, bg) = r.randn(&[24], dt)?;
    let (uc, ug) = r.randn(&[3, 21, 24], dt)?;
    let grads = |x: &Tensor, w: &Tensor, b: &Tensor, u: &Tensor| -> Result<Vec<Tensor>> {
        let (x, w, b) = (x.var()?, w.var()?, b.var()?);
        let g = x.linear(&w, Some(&b))?.mul(u)?.sum_all()?.backward()?;
        [&x, &w, &b]
            .iter()
            .map(|t| {
                g.get(t)
                    .cloned()
                    .ok_or_else(|| crate::Error::Backward("linear: a gradient is missing".into()))
            })
            .collect()
    };
    let (gc, gg) = (grads(&xc, &wc, &bc, &uc)?, grads(&xg, &wg, &bg, &ug)?);
    for ((what, c), g) in ["dx", "dw", "db"].iter().zip(&gc).zip(&gg) {
        r.check(format!("linear+bias backward {what}"), dt, g, c, true)?;
    }
    Ok(())
}

pub(super) fn reduce(r: &mut Run, dt: DType) -> Result<()> {
    let (xc, xg) = r.randn(&[6, 77, 33], dt)?;
    same!(
        r,
        "sum dim 1".into(),
        dt,
        false,
        (6, 1, 33),
        [xc / xg],
        |x| ops::sum_keepdim(x, &[1])
    )?;
    same!(
        r,
        "sum dims 0,2".into(),
        dt,
        false,
        (1, 77, 1),
        [xc / xg],
        |x| ops::sum_keepdim(x, &[0, 2])
    )?;
    let (mc, ic) = xc.max_argmax_keepdim(1)?;
    let (mg, ig) = xg.max_argmax_keepdim(1)?;
    r.check("max dim 1".into(), dt, &mg, &mc, false)?;
    r.check("argmax dim 1".into(), DType::I64, &ig, &ic, false)?;
    let (gc, gg) = r.randn(&[6, 1, 33], dt)?;
    let shape = Shape::from((6, 77, 33));
    same!(
        r,
        "max_bwd dim 1".into(),
        dt,
        true,
        shape.clone(),
        [gc / gg, ic / ig],
        |g, i| ops::max_bwd(g, i, &shape, 1)
    )?;
    for n in [77, 1000, 4096] {
        let (xc, xg) = r.pair(&[37, n], dt, -4.0, 4.0)?;
        same!(
            r,
            format!("softmax n={n}"),
            dt,
            false,
            (37, n),
            [xc / xg],
            |x| ops::softmax_last(x)
        )?;
        let yc = st(ops::softmax_last((&xc.storage(), xc.layout()))?, (37, n));
        let yg = yc.to_device(r.dev)?;
        let (gc, gg) = r.randn(&[37, n], dt)?;
        same!(
            r,
            format!("softmax_bwd n={n}"),
            dt,
            true,
            (37, n),
            [yc / yg, gc / gg],
            |y, g| { ops::softmax_last_bwd(y, g) }
        )?;
    }
    Ok(())
}
