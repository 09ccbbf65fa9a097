//! Every CUDA op against the CPU oracle on random and odd shapes: the body of
//! `tests/cuda_parity.rs` and of `kstyle gpu-parity` (the GPU machine has no Rust toolchain, so
//! the release binary carries the same checks).
//!
//! Rules: f32 within `Tolerance::F32_FORWARD` (forward) / `F32_GRAD` (gradients); bf16 and f16
//! within `BF16_FORWARD` / `BF16_GRAD` against the oracle run on the same rounded inputs; bf16
//! flash attention at most twice the error of the plain bf16 composition (flash-attention's rule),
//! both measured against the f32 oracle on those inputs.

use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::backend::cpu::lora::LoraGeom;
use crate::backend::cpu::optim::AdamW;
use crate::backend::cuda::attention::{sdpa_bwd_with, sdpa_with, AttnKernel};
use crate::backend::ops::{self, GateArgs};
use crate::backend::Storage;
use crate::tensor::{Rng, Shape};
use crate::tolerance::{compare, Tolerance};
use crate::{DType, Device, Result, Tensor};

/// One compared tensor.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub case: String,
    pub dtype: DType,
    /// `||gpu - cpu|| / ||cpu||`
    pub error: f64,
    /// The allowed relative error.
    pub limit: f64,
    pub passed: bool,
}

/// Whether CUDA device `ordinal` can run here; the reason when not.
pub fn available(ordinal: usize) -> std::result::Result<(), String> {
    crate::backend::cuda::device(ordinal)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

struct Run {
    dev: Device,
    rng: Rng,
    rows: Vec<ParityRow>,
    filter: Option<String>,
}

type Arg<'a> = (&'a Storage, &'a crate::tensor::Layout);

/// A storage result as an untracked tensor.
fn st(s: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(s, shape, None)
}

fn tol(dtype: DType, grad: bool) -> Tolerance {
    match (dtype, grad) {
        (DType::F32, false) => Tolerance::F32_FORWARD,
        (DType::F32, true) => Tolerance::F32_GRAD,
        (_, false) => Tolerance::BF16_FORWARD,
        (_, true) => Tolerance::BF16_GRAD,
    }
}

impl Run {
    fn wants(&self, case: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| case.contains(f))
    }

    /// Random values in [lo, hi) of `dtype` on the CPU and the same values on the GPU.
    fn pair(
        &mut self,
        shape: &[usize],
        dtype: DType,
        lo: f64,
        hi: f64,
    ) -> Result<(Tensor, Tensor)> {
        let c = Tensor::rand_uniform(shape.to_vec(), lo, hi, &mut self.rng, dtype, Device::Cpu)?;
        let g = c.to_device(self.dev)?;
        Ok((c, g))
    }

    fn randn(&mut self, shape: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        let c = Tensor::randn(shape.to_vec(), &mut self.rng, dtype, Device::Cpu)?;
        let g = c.to_device(self.dev)?;
        Ok((c, g))
    }

    fn check(
        &mut self,
        case: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        grad: bool,
    ) -> Result<()> {
        self.check_with(case, dtype, gpu, cpu, tol(dtype, grad))
    }

    fn check_with(
        &mut self,
        case: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        t: Tolerance,
    ) -> Result<()> {
        let c = compare(gpu, cpu, t)?;
        let denom = if c.ref_norm > 0.0 { c.ref_norm } else { 1.0 };
        self.rows.push(ParityRow {
            case,
            dtype,
            error: c.relative(),
            limit: c.limit / denom,
            passed: c.passed(),
        });
        Ok(())
    }

    /// A case whose op could not run at all is a failed row, not an aborted run.
    fn guard(&mut self, case: &str, dtype: DType, r: Result<()>) {
        if let Err(e) = r {
            eprintln!("gpu-parity: {case} [{dtype}] errored: {e}");
            self.rows.push(ParityRow {
                case: format!("{case} (error: {e})"),
                dtype,
                error: f64::NAN,
                limit: 0.0,
                passed: false,
            });
        }
    }
}

fn sa(
    t: &Tensor,
) -> (
    std::sync::RwLockReadGuard<'_, Storage>,
    crate::tensor::Layout,
) {
    (t.storage(), t.layout().clone())
}

fn cu(s: &Storage) -> Result<&crate::backend::cuda::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(crate::Error::msg("expected CUDA storage")),
    }
}

fn a<'a>(t: &'a Tensor, s: &'a std::sync::RwLockReadGuard<'a, Storage>) -> Arg<'a> {
    (s, t.layout())
}

/// Runs the op closure on both devices' tensors and compares.
macro_rules! same {
    ($run:expr, $case:expr, $dt:expr, $grad:expr, $shape:expr, [$($c:ident / $g:ident),*], |$($x:ident),*| $body:expr) => {{
        let cpu = {
            $(let $x = $c.storage(); let $x = a(&$c, &$x);)*
            st($body?, $shape)
        };
        let gpu = {
            $(let $x = $g.storage(); let $x = a(&$g, &$x);)*
            st($body?, $shape)
        };
        $run.check($case, $dt, &gpu, &cpu, $grad)
    }};
}

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

fn elementwise(r: &mut Run, dt: DType) -> Result<()> {
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

fn matmul(r: &mut Run, dt: DType) -> Result<()> {
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

fn reduce(r: &mut Run, dt: DType) -> Result<()> {
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

fn norm(r: &mut Run, dt: DType) -> Result<()> {
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

fn conv(r: &mut Run, dt: DType) -> Result<()> {
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

fn attention(r: &mut Run, dt: DType) -> Result<()> {
    // (B*NH, Sq, Skv, D, Dv, causal): self, cross (Skv = 77), causal text, HD 40, the VAE's 512.
    let cases = [
        (4, 96, 96, 64, 64, false),
        (3, 100, 77, 64, 64, false),
        (2, 77, 77, 64, 64, true),
        (2, 70, 50, 40, 40, false),
        (1, 64, 64, 512, 512, false),
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
                ops::sdpa((&q.0, &q.1), (&k.0, &k.1), (&v.0, &v.1), &g)?,
                (bh, sq, dv),
            )
        };
        let cpu_grads = {
            let (q, k, v, o) = (sa(&q32), sa(&k32), sa(&v32), sa(&o32));
            ops::sdpa_bwd((&q.0, &q.1), (&k.0, &k.1), (&v.0, &v.1), (&o.0, &o.1), &g)?
        };
        let cpu_grads = [
            st(cpu_grads.0, (bh, sq, d)),
            st(cpu_grads.1, (bh, skv, d)),
            st(cpu_grads.2, (bh, skv, dv)),
        ];
        let run = |which: AttnKernel| -> Result<(Tensor, [Tensor; 3])> {
            let (qs, ks, vs, os) = (qg.storage(), kg.storage(), vg.storage(), ogr.storage());
            let (q, k, v, o) = (
                (cu(&qs)?, qg.layout()),
                (cu(&ks)?, kg.layout()),
                (cu(&vs)?, vg.layout()),
                (cu(&os)?, ogr.layout()),
            );
            let out = st(Storage::Cuda(sdpa_with(q, k, v, &g, which)?), (bh, sq, dv));
            let (a, b, c) = sdpa_bwd_with(q, k, v, o, &g, which)?;
            Ok((
                out,
                [
                    st(Storage::Cuda(a), (bh, sq, d)),
                    st(Storage::Cuda(b), (bh, skv, d)),
                    st(Storage::Cuda(c), (bh, skv, dv)),
                ],
            ))
        };
        let (out, grads) = run(AttnKernel::Auto)?;
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
        let (cout, cgrads) = run(AttnKernel::Composed)?;
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

fn lora(r: &mut Run, dt: DType) -> Result<()> {
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

fn pool(r: &mut Run, dt: DType) -> Result<()> {
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

fn adamw(r: &mut Run) -> Result<()> {
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
    for t in 1..=3 {
        ops::adamw_step(&h, t, &mut pc, &gc, &mut mc, &mut vc)?;
        ops::adamw_step(&h, t, &mut pg, &gg, &mut mg, &mut vg)?;
    }
    for (name, g, c) in [
        ("adamw p", pg, pc),
        ("adamw m", mg, mc),
        ("adamw v", vg, vc),
    ] {
        r.check(name.into(), DType::F32, &st(g, n), &st(c, n), true)?;
    }
    Ok(())
}

type Family = fn(&mut Run, DType) -> Result<()>;

/// Runs every case (or those whose name contains `filter`) on CUDA device `ordinal`.
pub fn run(ordinal: usize, filter: Option<&str>, seed: u64) -> Result<Vec<ParityRow>> {
    let mut r = Run {
        dev: Device::Cuda(ordinal),
        rng: Rng::new(seed),
        rows: Vec::new(),
        filter: filter.map(str::to_owned),
    };
    let families: [(&str, Family, &[DType]); 8] = [
        (
            "elementwise",
            elementwise,
            &[DType::F32, DType::BF16, DType::F16],
        ),
        ("matmul", matmul, &[DType::F32, DType::BF16, DType::F16]),
        ("reduce", reduce, &[DType::F32, DType::BF16]),
        ("norm", norm, &[DType::F32, DType::BF16]),
        ("conv", conv, &[DType::F32, DType::BF16]),
        ("attention", attention, &[DType::F32, DType::BF16]),
        ("lora", lora, &[DType::F32, DType::BF16]),
        ("pool", pool, &[DType::F32, DType::BF16]),
    ];
    for (name, f, dtypes) in families {
        if !r.wants(name) {
            continue;
        }
        for &dt in dtypes {
            let res = f(&mut r, dt);
            r.guard(name, dt, res);
        }
    }
    if r.wants("optim") {
        let res = adamw(&mut r);
        r.guard("optim", DType::F32, res);
    }
    Ok(r.rows)
}
