//! Parity cases for the heavier families: norms, conv and pooling, attention, the fused LoRA
//! update and spatial pooling (the optimizers' are in `optim.rs`).

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
    // 64-row tiles of both sides, causal with Sq > Skv (the bf16 backward's tiles are 64). HD 64
    // over six key tiles and three 128-row query blocks, plain and causal: the bf16 forward's
    // double buffer alternates several times.
    let cases = [
        (4, 96, 96, 64, 64, false),
        (3, 100, 77, 64, 64, false),
        (2, 77, 77, 64, 64, true),
        (2, 70, 50, 40, 40, false),
        (1, 65, 140, 32, 32, false),
        (2, 130, 129, 80, 80, true),
        (1, 200, 150, 64, 64, true),
        (2, 300, 333, 64, 64, false),
        (1, 333, 300, 64, 64, true),
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
    // 1x4096x64 and 1x700x40 have too few (batch, 32-channel) blocks to fill a device, so they
    // take the split-row path (partials, then a combine), on the emulator's 2 SMs too.
    for (b, s, d) in [(2, 77, 320), (3, 50, 33), (1, 4096, 64), (1, 700, 40)] {
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
