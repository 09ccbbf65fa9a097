//! Parity cases for the heavier families: norms, conv and pooling, attention, the fused LoRA
//! update, spatial pooling and AdamW.

use super::*;

pub(super) fn norm(r: &mut Run, dt: DType) -> Result<()> {
    // Layer norm over 320 and 77 (odd) channels; a mean far from zero checks the variance path.
    for (rows, n) in [(150, 320), (33, 77)] {
        let (xc, xg) = r.pair(&[rows, n], dt, 2.0, 5.0)?;
        let (wc, wg) = r.pair(&[n], dt, 0.5, 1.5)?;
        let (bc, bg) = r.randn(&[n], dt)?;
        let (yc, yg) = (
            xc.layer_norm(Some(&wc), Some(&bc), 1e-5)?,
            xg.layer_norm(Some(&wg), Some(&bg), 1e-5)?,
        );
        r.check(format!("layer_norm {rows}x{n}"), dt, &yg, &yc, false)?;
        let (gc, gg) = r.randn(&[rows, n], dt)?;
        let bwd = |x: &Tensor, g: &Tensor, w: &Tensor| {
            ops::norm_bwd(
                (&x.storage(), x.layout()),
                (&g.storage(), g.layout()),
                Some((&w.storage(), w.layout())),
                None,
                1e-5,
            )
        };
        let (c, gp) = (bwd(&xc, &gc, &wc)?, bwd(&xg, &gg, &wg)?);
        r.check(
            format!("layer_norm_bwd dx {rows}x{n}"),
            dt,
            &st(gp.0, (rows, n)),
            &st(c.0, (rows, n)),
            true,
        )?;
        r.check(
            format!("layer_norm_bwd dw {rows}x{n}"),
            dt,
            &st(gp.1, n),
            &st(c.1, n),
            true,
        )?;
        r.check(
            format!("layer_norm_bwd db {rows}x{n}"),
            dt,
            &st(gp.2, n),
            &st(c.2, n),
            true,
        )?;
    }
    let (n, c, h, w, g) = (2, 64, 9, 7, 32);
    let (xc, xg) = r.pair(&[n, c, h, w], dt, -1.0, 3.0)?;
    let (wc, wg) = r.pair(&[c], dt, 0.5, 1.5)?;
    let (bc, bg) = r.randn(&[c], dt)?;
    let (yc, yg) = (
        xc.group_norm(g, Some(&wc), Some(&bc), 1e-5)?,
        xg.group_norm(g, Some(&wg), Some(&bg), 1e-5)?,
    );
    r.check("group_norm".into(), dt, &yg, &yc, false)?;
    let (dc, dg) = r.randn(&[n, c, h, w], dt)?;
    for silu in [false, true] {
        let tag = if silu {
            "group_norm_silu"
        } else {
            "group_norm"
        };
        let run = |x: &Tensor,
                   w: &Tensor,
                   b: &Tensor,
                   d: &Tensor|
         -> Result<(Storage, (Storage, Storage, Storage))> {
            let (xs, ws, bs, ds) = (x.storage(), w.storage(), b.storage(), d.storage());
            let (xa, wa, ba, da) = (
                (&*xs, x.layout()),
                (&*ws, w.layout()),
                (&*bs, b.layout()),
                (&*ds, d.layout()),
            );
            if silu {
                Ok((
                    ops::group_norm_silu(xa, Some(wa), Some(ba), g, 1e-5)?,
                    ops::group_norm_silu_bwd(xa, da, Some(wa), Some(ba), g, 1e-5)?,
                ))
            } else {
                Ok((
                    ops::norm(xa, Some(wa), Some(ba), Some(g), 1e-5)?,
                    ops::norm_bwd(xa, da, Some(wa), Some(g), 1e-5)?,
                ))
            }
        };
        let (yc, gcpu) = run(&xc, &wc, &bc, &dc)?;
        let (yg, ggpu) = run(&xg, &wg, &bg, &dg)?;
        let sh = (n, c, h, w);
        r.check(format!("{tag} fwd"), dt, &st(yg, sh), &st(yc, sh), false)?;
        r.check(
            format!("{tag}_bwd dx"),
            dt,
            &st(ggpu.0, sh),
            &st(gcpu.0, sh),
            true,
        )?;
        r.check(
            format!("{tag}_bwd dw"),
            dt,
            &st(ggpu.1, c),
            &st(gcpu.1, c),
            true,
        )?;
        r.check(
            format!("{tag}_bwd db"),
            dt,
            &st(ggpu.2, c),
            &st(gcpu.2, c),
            true,
        )?;
    }
    Ok(())
}

pub(super) fn conv(r: &mut Run, dt: DType) -> Result<()> {
    // (N, C, H, W, K, R, stride, padding): 3x3 same, strided downsample, pointwise, odd sizes.
    let geoms = [
        (2, 8, 13, 11, 16, 3, 1, 1),
        (2, 5, 15, 9, 7, 3, 2, 1),
        (3, 12, 7, 5, 6, 1, 1, 0),
        (1, 3, 10, 10, 4, 4, 2, 0),
    ];
    for (n, c, h, w, k, kk, stride, padding) in geoms {
        let name = format!("conv {n}x{c}x{h}x{w} k{k} {kk}x{kk} s{stride} p{padding}");
        let g = ConvGeom {
            n,
            c,
            h,
            w,
            k,
            r: kk,
            s: kk,
            stride,
            padding,
        };
        let (oh, ow) = g.out_hw();
        let (xc, xg) = r.randn(&[n, c, h, w], dt)?;
        let (wc, wg) = r.randn(&[k, c, kk, kk], dt)?;
        same!(
            r,
            format!("{name} fwd"),
            dt,
            false,
            (n, k, oh, ow),
            [xc / xg, wc / wg],
            |x, wt| ops::conv2d(x, wt, &g)
        )?;
        let (dc, dg) = r.randn(&[n, k, oh, ow], dt)?;
        same!(
            r,
            format!("{name} d_input"),
            dt,
            true,
            (n, c, h, w),
            [dc / dg, wc / wg],
            |d, wt| { ops::conv2d_bwd_input(d, wt, &g) }
        )?;
        same!(
            r,
            format!("{name} d_weight"),
            dt,
            true,
            (k, c, kk, kk),
            [xc / xg, dc / dg],
            |x, d| { ops::conv2d_bwd_weight(x, d, &g) }
        )?;
    }
    let (xc, xg) = r.randn(&[2, 3, 7, 5], dt)?;
    for f in [2, 3] {
        same!(
            r,
            format!("upsample x{f}"),
            dt,
            false,
            (2, 3, 7 * f, 5 * f),
            [xc / xg],
            |x| ops::upsample_nearest(x, f)
        )?;
        let (dc, dg) = r.randn(&[2, 3, 7 * f, 5 * f], dt)?;
        same!(
            r,
            format!("upsample_bwd x{f}"),
            dt,
            true,
            (2, 3, 7, 5),
            [dc / dg],
            |d| ops::upsample_nearest_bwd(d, f)
        )?;
    }
    let (xc, xg) = r.randn(&[2, 3, 13, 11], dt)?;
    for (name, out, kernel) in [
        ("avg_pool 2/2", (6, 5), Some((2, 2))),
        ("adaptive_avg_pool 5x3", (5, 3), None),
    ] {
        same!(
            r,
            name.into(),
            dt,
            false,
            (2, 3, out.0, out.1),
            [xc / xg],
            |x| ops::avg_pool(x, out, kernel)
        )?;
        let (dc, dg) = r.randn(&[2, 3, out.0, out.1], dt)?;
        same!(
            r,
            format!("{name} bwd"),
            dt,
            true,
            (2, 3, 13, 11),
            [dc / dg],
            |d| ops::avg_pool_bwd(d, (13, 11), kernel)
        )?;
    }
    same!(
        r,
        "max_pool 3/2".into(),
        dt,
        false,
        (2, 3, 6, 5),
        [xc / xg],
        |x| ops::max_pool(x, 3, 2)
    )
}

pub(super) fn attention(r: &mut Run, dt: DType) -> Result<()> {
    // (B*NH, Sq, Skv, D, Dv, causal): self, cross (Skv = 77), causal text, HD 40, the VAE's 512;
    // causal with Sq != Skv on the flash kernels (HD 16) and on the composition (HD 24), and the
    // tiny CLIP text encoder's causal HD 8 (composition). HD 32 and 80 across several ragged
    // 64-row tiles of both sides, causal with Sq > Skv (the bf16 backward's tiles are 64).
    let cases = [
        (4, 96, 96, 64, 64, false),
        (3, 100, 77, 64, 64, false),
        (2, 77, 77, 64, 64, true),
        (2, 70, 50, 40, 40, false),
        (1, 65, 140, 32, 32, false),
        (2, 130, 129, 80, 80, true),
        (1, 200, 150, 64, 64, true),
        (1, 64, 64, 512, 512, false),
        (3, 50, 70, 16, 16, true),
        (2, 40, 33, 24, 24, true),
        (2, 77, 77, 8, 8, true),
    ];
    for (bh, sq, skv, d, dv, causal) in cases {
        let name = format!(
            "sdpa bh{bh} {sq}x{skv} d{d}{}",
            if causal { " causal" } else { "" }
        );
        let g = AttnGeom {
            bh,
            sq,
            skv,
            d,
            dv,
            scale: 1.0 / (d as f64).sqrt(),
            causal,
        };
        let (qc, qg) = r.randn(&[bh, sq, d], dt)?;
        let (kc, kg) = r.randn(&[bh, skv, d], dt)?;
        let (vc, vg) = r.randn(&[bh, skv, dv], dt)?;
        let (oc, ogr) = r.randn(&[bh, sq, dv], dt)?;
        // The oracle runs in f32 on the same rounded inputs, whatever the device dtype.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (q32, k32, v32, o32) = (f(&qc)?, f(&kc)?, f(&vc)?, f(&oc)?);
        let cpu_out = {
            let (q, k, v) = (sa(&q32), sa(&k32), sa(&v32));
            st(
                ops::sdpa((&q.0, &q.1), (&k.0, &k.1), (&v.0, &v.1), &g, false)?.0,
                (bh, sq, dv),
            )
        };
        let cpu_grads = {
            let (q, k, v, o) = (sa(&q32), sa(&k32), sa(&v32), sa(&o32));
            ops::sdpa_bwd(
                (&q.0, &q.1),
                (&k.0, &k.1),
                (&v.0, &v.1),
                (&o.0, &o.1),
                &g,
                None,
            )?
        };
        let cpu_grads = [
            st(cpu_grads.0, (bh, sq, d)),
            st(cpu_grads.1, (bh, skv, d)),
            st(cpu_grads.2, (bh, skv, dv)),
        ];
        // `keep`: the backward takes the forward's O and LSE (training's path) rather than running
        // the forward again.
        let run = |which: AttnKernel, keep: bool| -> Result<(Tensor, [Tensor; 3])> {
            let (qs, ks, vs, os) = (qg.storage(), kg.storage(), vg.storage(), ogr.storage());
            let (q, k, v, o) = (
                (cu(&qs)?, qg.layout()),
                (cu(&ks)?, kg.layout()),
                (cu(&vs)?, vg.layout()),
                (cu(&os)?, ogr.layout()),
            );
            let (out, lse) = sdpa_with(q, k, v, &g, which, keep)?;
            let out_layout = Layout::contiguous((bh, sq, dv));
            let saved = lse.as_ref().map(|lse| Saved {
                out: (&out, &out_layout),
                lse,
            });
            let (a, b, c) = sdpa_bwd_with(q, k, v, o, &g, which, saved)?;
            Ok((
                st(Storage::Cuda(out), (bh, sq, dv)),
                [
                    st(Storage::Cuda(a), (bh, sq, d)),
                    st(Storage::Cuda(b), (bh, skv, d)),
                    st(Storage::Cuda(c), (bh, skv, dv)),
                ],
            ))
        };
        let (out, grads) = run(AttnKernel::Auto, true)?;
        // The same kernels on the same O and LSE: recomputing them must not change a bit.
        let (_, again) = run(AttnKernel::Auto, false)?;
        for (i, name_i) in ["dq", "dk", "dv"].iter().enumerate() {
            r.check_with(
                format!("{name} {name_i} saved = recomputed"),
                dt,
                &grads[i],
                &again[i],
                Tolerance { rel: 0.0, abs: 0.0 },
            )?;
        }
        let names = ["dq", "dk", "dv"];
        if dt == DType::F32 || causal {
            r.check(format!("{name} fwd"), dt, &out, &cpu_out, false)?;
            for i in 0..3 {
                r.check(
                    format!("{name} {}", names[i]),
                    dt,
                    &grads[i],
                    &cpu_grads[i],
                    true,
                )?;
            }
            continue;
        }
        // Low precision: flash may err at most twice as much as the plain composition.
        let (cout, cgrads) = run(AttnKernel::Composed, true)?;
        let rule = |r: &mut Run,
                    case: String,
                    flash: &Tensor,
                    composed: &Tensor,
                    reference: &Tensor|
         -> Result<()> {
            let base = compare(composed, reference, Tolerance { rel: 0.0, abs: 0.0 })?;
            r.check_with(
                case,
                dt,
                flash,
                reference,
                Tolerance {
                    rel: 2.0 * base.relative(),
                    abs: 0.0,
                },
            )
        };
        rule(
            r,
            format!("{name} fwd (2x composed)"),
            &out,
            &cout,
            &cpu_out,
        )?;
        for i in 0..3 {
            rule(
                r,
                format!("{name} {} (2x composed)", names[i]),
                &grads[i],
                &cgrads[i],
                &cpu_grads[i],
            )?;
        }
    }
    Ok(())
}

pub(super) fn lora(r: &mut Run, dt: DType) -> Result<()> {
    for (gated, b, s, din, dout, rank) in [
        (true, 2, 77, 320, 640, 4),
        (true, 3, 45, 130, 70, 64),
        (false, 1, 33, 65, 97, 8),
    ] {
        let name = format!(
            "lora {} {b}x{s} {din}->{dout} r{rank}",
            if gated { "gated" } else { "plain" }
        );
        let g = LoraGeom {
            batch: b,
            seq: s,
            d_in: din,
            d_out: dout,
            rank,
            scale: 0.75,
        };
        let (hc, hg) = r.randn(&[b, s, din], dt)?;
        let (ac, ag) = r.randn(&[rank, din], dt)?;
        let (bc, bg) = r.randn(&[dout, rank], dt)?;
        let (wdc, wdg) = r.pair(&[b, rank], dt, 0.0, 1.0)?;
        let (wuc, wug) = r.pair(&[b, rank], dt, 0.0, 1.0)?;
        let (alc, alg) = r.pair(&[b], dt, 0.0, 1.0)?;
        let (basec, baseg) = r.randn(&[b, s, dout], dt)?;
        let (dc, dg) = r.randn(&[b, s, dout], dt)?;
        let both = |h: &Tensor,
                    a: &Tensor,
                    bm: &Tensor,
                    wd: &Tensor,
                    wu: &Tensor,
                    al: &Tensor,
                    base: &Tensor,
                    d: &Tensor| {
            let ts = [h, a, bm, wd, wu, al, base, d];
            let ss: Vec<_> = ts.iter().map(|t| t.storage()).collect();
            let x: Vec<Arg> = ss.iter().zip(ts).map(|(s, t)| (&**s, t.layout())).collect();
            let gates = if gated {
                GateArgs {
                    w_down: Some(x[3]),
                    w_up: Some(x[4]),
                    a: Some(x[5]),
                }
            } else {
                GateArgs::default()
            };
            let y = ops::lora_fwd(x[0], x[1], x[2], gates, Some(x[6]), &g)?;
            let grads = ops::lora_bwd(x[0], x[1], x[2], gates, x[7], &g)?;
            Ok::<_, crate::Error>((y, grads))
        };
        let (yc, gcpu) = both(&hc, &ac, &bc, &wdc, &wuc, &alc, &basec, &dc)?;
        let (yg, ggpu) = both(&hg, &ag, &bg, &wdg, &wug, &alg, &baseg, &dg)?;
        r.check(
            format!("{name} fwd"),
            dt,
            &st(yg, (b, s, dout)),
            &st(yc, (b, s, dout)),
            false,
        )?;
        r.check(
            format!("{name} d_h"),
            dt,
            &st(ggpu.d_h, (b, s, din)),
            &st(gcpu.d_h, (b, s, din)),
            true,
        )?;
        r.check(
            format!("{name} d_A"),
            dt,
            &st(ggpu.d_a, (rank, din)),
            &st(gcpu.d_a, (rank, din)),
            true,
        )?;
        r.check(
            format!("{name} d_B"),
            dt,
            &st(ggpu.d_b, (dout, rank)),
            &st(gcpu.d_b, (dout, rank)),
            true,
        )?;
        let pairs = [
            (ggpu.d_w_down, gcpu.d_w_down, "d_w_down", b * rank),
            (ggpu.d_w_up, gcpu.d_w_up, "d_w_up", b * rank),
            (ggpu.d_alpha, gcpu.d_alpha, "d_a", b),
        ];
        for (gp, cp, what, n) in pairs {
            if let (Some(gp), Some(cp)) = (gp, cp) {
                r.check(format!("{name} {what}"), dt, &st(gp, n), &st(cp, n), true)?;
            }
        }
    }
    Ok(())
}

pub(super) fn pool(r: &mut Run, dt: DType) -> Result<()> {
    for (b, s, d) in [(2, 77, 320), (3, 50, 33)] {
        let (hc, hg) = r.randn(&[b, s, d], dt)?;
        let (lc, lg) = r.randn(&[b, s], dt)?;
        same!(
            r,
            format!("spatial_pool {b}x{s}x{d}"),
            dt,
            false,
            (b, d),
            [hc / hg, lc / lg],
            |h, l| ops::spatial_pool(h, l)
        )?;
        let (gc, gg) = r.randn(&[b, d], dt)?;
        let run = |h: &Tensor, l: &Tensor, g: &Tensor| {
            ops::spatial_pool_bwd(
                (&h.storage(), h.layout()),
                (&l.storage(), l.layout()),
                (&g.storage(), g.layout()),
            )
        };
        let (c, gp) = (run(&hc, &lc, &gc)?, run(&hg, &lg, &gg)?);
        r.check(
            format!("spatial_pool_bwd d_h {b}x{s}x{d}"),
            dt,
            &st(gp.0, (b, s, d)),
            &st(c.0, (b, s, d)),
            true,
        )?;
        r.check(
            format!("spatial_pool_bwd d_logits {b}x{s}x{d}"),
            dt,
            &st(gp.1, (b, s)),
            &st(c.1, (b, s)),
            true,
        )?;
    }
    Ok(())
}

pub(super) fn adamw(r: &mut Run) -> Result<()> {
    let n = 10_007;
    let h = AdamW::default();
    let mut bufs = Vec::new();
    for _ in 0..4 {
        bufs.push(r.randn(&[n], DType::F32)?);
    }
    let v_pos = bufs[3].0.abs()?;
    bufs[3] = (v_pos.clone(), v_pos.to_device(r.dev)?);
    let take = |t: &Tensor| t.storage().copy_strided(t.layout());
    let (mut pc, gc, mut mc, mut vc) = (
        take(&bufs[0].0)?,
        take(&bufs[1].0)?,
        take(&bufs[2].0)?,
        take(&bufs[3].0)?,
    );
    let (mut pg, gg, mut mg, mut vg) = (
        take(&bufs[0].1)?,
        take(&bufs[1].1)?,
        take(&bufs[2].1)?,
        take(&bufs[3].1)?,
    );
    // 1/3 is not a power of two: the scaled gradient's rounding is part of the contract.
    for t in 1..=3 {
        let (p, m, v) = (&mut pc, &mut mc, &mut vc);
        ops::adamw_step(&h, t, State { p, m, v }, &gc, 1.0 / 3.0)?;
        let (p, m, v) = (&mut pg, &mut mg, &mut vg);
        ops::adamw_step(&h, t, State { p, m, v }, &gg, 1.0 / 3.0)?;
    }
    for (name, g, c) in [("p", &pg, &pc), ("m", &mg, &mc), ("v", &vg, &vc)] {
        check_flat(r, format!("adamw {name}"), g, c)?;
    }
    // Interleaved rates (LoRA+, block weights): the pieces kernel, with a run longer than one
    // block's piece, runs of one element, a rate of 0, and a gap no run covers (left alone).
    // Rates near 1 move p by about the rate, so a wrong rate shows far above the tolerance.
    let runs = [
        (0..1, 0.3),
        (1..5_000, 0.7),
        (5_000..5_001, 1.5),
        (5_001..7_000, 0.0),
        (7_100..10_007, 0.2),
    ]
    .map(|(range, lr)| LrRun { range, lr });
    for t in 4..=5 {
        let (p, m, v) = (&mut pc, &mut mc, &mut vc);
        ops::adamw_step_runs(&h, t, State { p, m, v }, &gc, 0.5, &runs)?;
        let (p, m, v) = (&mut pg, &mut mg, &mut vg);
        ops::adamw_step_runs(&h, t, State { p, m, v }, &gg, 0.5, &runs)?;
    }
    for (name, g, c) in [
        ("adamw runs p", pg, pc),
        ("adamw runs m", mg, mc),
        ("adamw runs v", vg, vc),
    ] {
        r.check(name.into(), DType::F32, &st(g, n), &st(c, n), true)?;
    }
    Ok(())
}

/// A flat f32 optimizer buffer after the CUDA steps against the CPU oracle's, at the gradient
/// tolerance (an optimizer state is a function of gradients).
fn check_flat(r: &mut Run, name: String, gpu: &Storage, cpu: &Storage) -> Result<()> {
    let whole = |s: &Storage| -> Result<Tensor> {
        let n = s.len();
        Ok(st(
            s.copy_strided(&crate::tensor::Layout::contiguous(n))?,
            n,
        ))
    };
    r.check(name, DType::F32, &whole(gpu)?, &whole(cpu)?, true)
}

/// The squared global norm of flat gradients (clipping and the loss log): one element, one
/// block's worth and one past it, and enough for every one of the 1,024 partial sums to take
/// several grid strides.
pub(super) fn sqnorm(r: &mut Run) -> Result<()> {
    for n in [1usize, 256, 257, 3_000_017] {
        let (c, g) = r.randn(&[n], DType::F32)?;
        let norm = |t: &Tensor| -> Result<Tensor> {
            let v = ops::sqnorm(&t.storage())?;
            Tensor::from_vec(vec![v as f32], 1, Device::Cpu)
        };
        r.check(
            format!("sqnorm of {n}"),
            DType::F32,
            &norm(&g)?,
            &norm(&c)?,
            false,
        )?;
    }
    Ok(())
}

/// The optimizer's multi-tensor passes: gradients of odd sizes (one element, exactly one piece,
/// one past it, several pieces) summed into a flat buffer at gapped offsets, twice, and the flat
/// buffer copied back out into f32, bf16 and f16 tensors.
pub(super) fn multi_tensor(r: &mut Run) -> Result<()> {
    let sizes = [1usize, 4096, 4097, 10_000, 333, 8197];
    let mut offsets = Vec::new();
    let mut end = 3;
    for n in sizes {
        offsets.push(end);
        end += n + 5;
    }
    let (mut fc, mut fg) = r.randn(&[end], DType::F32)?;
    for _ in 0..2 {
        let mut parts = Vec::new();
        for n in sizes {
            parts.push(r.randn(&[n], DType::F32)?);
        }
        for (flat, gpu) in [(&mut fc, false), (&mut fg, true)] {
            let ts: Vec<&Tensor> = parts
                .iter()
                .map(|p| if gpu { &p.1 } else { &p.0 })
                .collect();
            let guards: Vec<_> = ts.iter().map(|t| t.storage()).collect();
            let args: Vec<_> = guards
                .iter()
                .zip(&ts)
                .zip(&offsets)
                .map(|((s, t), &off)| ((&**s, t.layout()), off))
                .collect();
            ops::gather_add(&mut flat.storage_mut(), &args)?;
        }
    }
    r.check(
        format!("gather_add {} parts into {end}", sizes.len()),
        DType::F32,
        &fg,
        &fc,
        false,
    )?;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let make = |dev| -> Result<Vec<Tensor>> {
            sizes.iter().map(|&n| Tensor::zeros(n, dt, dev)).collect()
        };
        let (tc, tg) = (make(Device::Cpu)?, make(r.dev)?);
        for (flat, ts) in [(&fc, &tc), (&fg, &tg)] {
            let mut guards: Vec<_> = ts.iter().map(|t| t.storage_mut()).collect();
            let mut targets: Vec<_> = guards
                .iter_mut()
                .zip(&offsets)
                .map(|(g, &off)| (&mut **g, off))
                .collect();
            ops::scatter(&flat.storage(), &mut targets)?;
        }
        let join = |ts: &[Tensor]| Tensor::cat(ts, 0);
        r.check(
            format!("scatter {} parts to {dt}", sizes.len()),
            dt,
            &join(&tg)?,
            &join(&tc)?,
            false,
        )?;
    }
    Ok(())
}

/// Prodigy's two passes (moments with their two sums, then the update) over ranges with a gap,
/// a piece longer than one block's and a range of one element, at d and rates near the ones a run
/// sees after its first steps.
pub(super) fn prodigy(r: &mut Run) -> Result<()> {
    let n = 10_007;
    let mut bufs = Vec::new();
    for _ in 0..6 {
        bufs.push(r.randn(&[n], DType::F32)?);
    }
    let v_pos = bufs[4].0.abs()?;
    bufs[4] = (v_pos.clone(), v_pos.to_device(r.dev)?);
    let take = |t: &Tensor| t.storage().copy_strided(t.layout());
    let mut cpu: Vec<Storage> = bufs.iter().map(|b| take(&b.0)).collect::<Result<_>>()?;
    let mut gpu: Vec<Storage> = bufs.iter().map(|b| take(&b.1)).collect::<Result<_>>()?;
    let ranges = [0..1, 1..5_000, 5_100..10_007];
    let h = ProdigyMoments {
        beta1: 0.9,
        beta2: 0.999,
        beta3: 0.999f64.sqrt(),
        d: 3e-4,
        s_coef: 3e-4 / 1e-6 * 3e-4,
    };
    let mut sums = Vec::new();
    for bufs in [&mut cpu, &mut gpu] {
        // p, p0, g, m, v, s
        let [p, p0, g, m, v, s] = &mut bufs[..] else {
            unreachable!()
        };
        let b = ProdigyBuffers {
            p: &*p,
            p0: &*p0,
            m,
            v,
            s,
        };
        let (num, den) = ops::prodigy_moments(&h, b, g, 0.5, &ranges)?;
        sums.push([num, den]);
        let [p, _, _, m, v, _] = &mut bufs[..] else {
            unreachable!()
        };
        ops::prodigy_update(p, m, v, [0.4, 0.01, 3e-4 * 1e-8], &ranges)?;
    }
    for (i, what) in ["sum g (p0 - p)", "sum |s|"].into_iter().enumerate() {
        let one = |x: f64| Tensor::from_vec(vec![x as f32], 1, Device::Cpu);
        let (g, c) = (one(sums[1][i])?, one(sums[0][i])?);
        r.check(format!("prodigy {what}"), DType::F32, &g, &c, true)?;
    }
    for (i, name) in [(0, "p"), (3, "m"), (4, "v"), (5, "s")] {
        check_flat(r, format!("prodigy {name}"), &gpu[i], &cpu[i])?;
    }
    Ok(())
}

/// Lion's step over interleaved rates (a run longer than one block's piece, runs of one element,
/// a rate of 0, a gap no run covers), three steps so the moment feeds the sign, with a stretch
/// where gradient and moment are both 0 (sgn(0) = 0: those elements only decay). Rates near 1
/// move p by about the rate, so a wrong rate or sign shows far above the tolerance.
pub(super) fn lion(r: &mut Run) -> Result<()> {
    let n = 10_007;
    let zeroed = 9_000..9_010;
    let mut host = Vec::new();
    for _ in 0..3 {
        let (c, _) = r.randn(&[n], DType::F32)?;
        let mut v = c.to_vec_f32()?;
        v[zeroed.clone()].fill(0.0);
        host.push(Tensor::from_vec(v, n, Device::Cpu)?);
    }
    let take = |t: &Tensor| t.storage().copy_strided(t.layout());
    let mut cpu: Vec<Storage> = host.iter().map(take).collect::<Result<_>>()?;
    let mut gpu: Vec<Storage> = host
        .iter()
        .map(|t| take(&t.to_device(r.dev)?))
        .collect::<Result<_>>()?;
    let runs = [
        (0..1, 0.3),
        (1..5_000, 0.7),
        (5_000..5_001, 1.5),
        (5_001..7_000, 0.0),
        (7_100..10_007, 0.2),
    ]
    .map(|(range, lr)| LrRun { range, lr });
    let h = LionStep {
        beta1: 0.9,
        beta2: 0.99,
        weight_decay: 0.1,
    };
    for _ in 0..3 {
        for bufs in [&mut cpu, &mut gpu] {
            let [p, g, m] = &mut bufs[..] else {
                unreachable!()
            };
            ops::lion_step_runs(&h, p, m, g, 0.5, &runs)?;
        }
    }
    for (i, name) in [(0, "p"), (2, "m")] {
        check_flat(r, format!("lion {name}"), &gpu[i], &cpu[i])?;
    }
    Ok(())
}

/// The 8-bit AdamW step (one launch over every slot's chunks) against the CPU oracle: quantized
/// slots of 5,000 elements (a partial last block), exactly 16 blocks, and 257 (one element in a
/// second block), f32 slots of 300 and 1 between them, each at its own rate; one whole block of
/// the first slot never gets a gradient (absmax 0, the code of 0). Three steps, so the codes and
/// absmax written by one step are read by the next. The masters, the f32 moments, the absmax and
/// the dequantized moments at the gradient tolerance (a code on the other side of a midpoint
/// shows as one code's difference in one element).
pub(super) fn adamw8bit(r: &mut Run) -> Result<()> {
    step_8bit(r, false)
}

/// [`adamw8bit`]'s layout stepped by Lion8bit: one moment, its sign the update (rates near 1e-2
/// move p by about the rate, so a wrong sign shows far above the tolerance).
pub(super) fn lion8bit(r: &mut Run) -> Result<()> {
    step_8bit(r, true)
}

fn step_8bit(r: &mut Run, lion: bool) -> Result<()> {
    use crate::backend::cpu::optim::{dynamic_map, LionStep, Moments8, Rule8, Slot8, BLOCK_8BIT};
    let tag = if lion { "lion8bit" } else { "adamw8bit" };
    // Lion keeps no second moment: its buffers stay empty.
    let second = |n: usize| if lion { 0 } else { n };
    // (len, quantized, rate)
    let layout = [
        (5_000usize, true, 0.01),
        (300, false, 0.02),
        (4_096, true, 0.04),
        (1, false, 0.01),
        (257, true, 0.0),
    ];
    let (mut slots, mut at, mut floats, mut bytes, mut blocks) = (vec![], 0, 0, 0, 0);
    for (len, quantized, lr) in layout {
        let (state, block) = match quantized {
            true => (bytes, Some(blocks)),
            false => (floats, None),
        };
        slots.push(Slot8 {
            offset: at,
            len,
            state,
            block,
            lr,
        });
        at += len;
        match quantized {
            true => {
                bytes += len;
                blocks += len.div_ceil(BLOCK_8BIT);
            }
            false => floats += len,
        }
    }
    let silent = 512..768;
    let mut maps = dynamic_map(true).to_vec();
    maps.extend(dynamic_map(false));
    let zeros = |n: usize, dtype: DType| Tensor::zeros(n, dtype, Device::Cpu);
    let (p0, _) = r.randn(&[at], DType::F32)?;
    let host = [
        p0,
        Tensor::from_vec(maps, 512, Device::Cpu)?,
        zeros(floats, DType::F32)?,
        zeros(second(floats), DType::F32)?,
        zeros(bytes, DType::U8)?,
        zeros(second(bytes), DType::U8)?,
        zeros(blocks, DType::F32)?,
        zeros(second(blocks), DType::F32)?,
    ];
    let take = |t: &Tensor| t.storage().copy_strided(t.layout());
    let mut cpu: Vec<Storage> = host.iter().map(take).collect::<Result<_>>()?;
    let mut gpu: Vec<Storage> = host
        .iter()
        .map(|t| take(&t.to_device(r.dev)?))
        .collect::<Result<_>>()?;
    let h = crate::backend::cpu::optim::AdamW {
        lr: f64::NAN,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for t in 1..=3 {
        let (c, _) = r.randn(&[at], DType::F32)?;
        let mut g = c.to_vec_f32()?;
        g[silent.clone()].fill(0.0);
        let g = Tensor::from_vec(g, at, Device::Cpu)?;
        for (bufs, g) in [(&mut cpu, g.clone()), (&mut gpu, g.to_device(r.dev)?)] {
            let [p, maps, m, v, q1, q2, absmax1, absmax2] = &mut bufs[..] else {
                unreachable!()
            };
            let s = Moments8 {
                m,
                v,
                q1,
                q2,
                absmax1,
                absmax2,
            };
            let rule = match lion {
                false => Rule8::AdamW { h, t },
                true => Rule8::Lion(LionStep {
                    beta1: 0.9,
                    beta2: 0.99,
                    weight_decay: 0.1,
                }),
            };
            ops::step_8bit(&rule, maps, p, s, &g.storage(), 0.5, &slots)?;
        }
    }
    let mut compared = vec![(0, "p"), (2, "m (f32 slots)"), (6, "absmax1")];
    if !lion {
        compared.extend([(3, "v (f32 slots)"), (7, "absmax2")]);
    }
    for (i, name) in compared {
        check_flat(r, format!("{tag} {name}"), &gpu[i], &cpu[i])?;
    }
    // Dequantized moments of the quantized slots.
    for (k, (q, a)) in [(4, 6), (5, 7)]
        .into_iter()
        .take(2 - lion as usize)
        .enumerate()
    {
        let map = dynamic_map(k == 0);
        let values = |bufs: &[Storage]| -> Result<Storage> {
            let codes = st(
                bufs[q].copy_strided(&crate::tensor::Layout::contiguous(bytes))?,
                bytes,
            )
            .to_vec::<u8>()?;
            let absmax = st(
                bufs[a].copy_strided(&crate::tensor::Layout::contiguous(blocks))?,
                blocks,
            )
            .to_vec_f32()?;
            let mut out = Vec::with_capacity(bytes);
            for (s, b0) in slots.iter().filter_map(|s| s.block.map(|b| (s, b))) {
                for j in 0..s.len {
                    let c = codes[s.state + j] as usize;
                    out.push(map[c] * absmax[b0 + j / BLOCK_8BIT]);
                }
            }
            Ok(Storage::Cpu(crate::backend::cpu::CpuStorage::F32(out)))
        };
        let name = format!("{tag} {} (dequantized)", ["m", "v"][k]);
        check_flat(r, name, &values(&gpu)?, &values(&cpu)?)?;
    }
    Ok(())
}

/// Adafactor's step (one block per trainable) against the CPU oracle: matrices of many rows and
/// few columns and the reverse (the row and column means one warp per line), a 4-d conv factor
/// (6 matrices of 3 x 3), a vector (a whole second moment), a matrix of one column, a slot at
/// rate 0, and a zero-start trainable (RMS(p) = 0: the parameter scale's floor); a first moment,
/// weight decay and a clip threshold the updates pass. Three steps, so the state one step writes
/// is read by the next; the third's gradient carries an outlier so the clip acts.
pub(super) fn adafactor(r: &mut Run) -> Result<()> {
    use crate::backend::cpu::optim::{AdafactorStep, FactorSlot};
    // (lead, rows, cols; rows 0 for a vector), rate
    let layout = [
        ((1usize, 700usize, 4usize), 0.02),
        ((1, 4, 1_300), 0.01),
        ((6, 3, 3), 0.03),
        ((1, 0, 0), 0.01),
        ((1, 50, 1), 0.02),
        ((1, 9, 33), 0.0),
        ((1, 16, 16), 0.05),
    ];
    let lens = [2_800usize, 5_200, 54, 333, 50, 297, 256];
    let (mut slots, mut at, mut state) = (vec![], 0, 0);
    for (((lead, rows, cols), rate), len) in layout.into_iter().zip(lens) {
        let slot = FactorSlot {
            offset: at,
            len,
            lead,
            rows,
            cols,
            state,
            rate,
        };
        at += len;
        state += slot.state_len();
        slots.push(slot);
    }
    let (p0, _) = r.randn(&[at], DType::F32)?;
    let mut p0 = p0.to_vec_f32()?;
    let last = slots[6].offset..slots[6].offset + slots[6].len;
    p0[last].fill(0.0);
    let host = [
        Tensor::from_vec(p0, at, Device::Cpu)?,
        Tensor::zeros(at, DType::F32, Device::Cpu)?,
        Tensor::zeros(state, DType::F32, Device::Cpu)?,
    ];
    let take = |t: &Tensor| t.storage().copy_strided(t.layout());
    let mut cpu: Vec<Storage> = host.iter().map(take).collect::<Result<_>>()?;
    let mut gpu: Vec<Storage> = host
        .iter()
        .map(|t| take(&t.to_device(r.dev)?))
        .collect::<Result<_>>()?;
    for t in 1..=3u32 {
        let (c, _) = r.randn(&[at], DType::F32)?;
        let mut g = c.to_vec_f32()?;
        if t == 3 {
            g[100] = 40.0;
        }
        let g = Tensor::from_vec(g, at, Device::Cpu)?;
        let h = AdafactorStep {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 0.8,
            beta2t: 1.0 - (t as f64).powf(-0.8),
            beta1: Some(0.9),
            weight_decay: 0.1,
            scale_parameter: true,
        };
        for (bufs, g) in [(&mut cpu, g.clone()), (&mut gpu, g.to_device(r.dev)?)] {
            let [p, m, v] = &mut bufs[..] else {
                unreachable!()
            };
            ops::adafactor_step(&h, p, m, v, &g.storage(), 0.5, &slots)?;
        }
    }
    for (i, name) in [(0, "p"), (1, "m"), (2, "row and column means, v")] {
        check_flat(r, format!("adafactor {name}"), &gpu[i], &cpu[i])?;
    }
    Ok(())
}
