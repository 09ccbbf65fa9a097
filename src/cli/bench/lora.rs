//! The gated LoRA update (`ops::lora_fwd` / `ops::lora_bwd`) on the two shapes SDXL training
//! gives it most: a self-attention projection (8,192 rows of 640) and a cross-attention key or
//! value projection (77 text tokens of 2,048 into 1,280, where a kernel that splits work by rows
//! has almost nothing to split), beside the unfused tensor composition on the first.

use kstyle::backend::cpu::lora::LoraGeom;
use kstyle::backend::ops::{self, GateArgs};
use kstyle::tensor::Rng;
use kstyle::{DType, Device, Tensor};

use super::{Bench, Size};

pub(super) fn run(b: &mut Bench, size: Size, rng: &mut Rng) -> anyhow::Result<()> {
    let gpu = Device::Cuda(0);
    let shapes = size.pick(
        [(2, 4096, 640, 640, 4), (1, 77, 2048, 1280, 4)],
        [(2, 1024, 640, 640, 4), (1, 77, 2048, 1280, 4)],
        [(2, 40, 24, 16, 4), (1, 7, 24, 40, 4)],
    );
    for (i, (bsz, seq, din, dout, r)) in shapes.into_iter().enumerate() {
        let geom = LoraGeom {
            batch: bsz,
            seq,
            d_in: din,
            d_out: dout,
            rank: r,
            scale: 0.25,
        };
        let h = Tensor::randn((bsz, seq, din), rng, DType::BF16, gpu)?;
        let am = Tensor::randn((r, din), rng, DType::BF16, gpu)?;
        let bm = Tensor::randn((dout, r), rng, DType::BF16, gpu)?;
        let wd = Tensor::rand_uniform((bsz, r), 0.0, 1.0, rng, DType::BF16, gpu)?;
        let wu = Tensor::rand_uniform((bsz, r), 0.0, 1.0, rng, DType::BF16, gpu)?;
        let al = Tensor::rand_uniform((bsz, 1, 1), 0.0, 1.0, rng, DType::BF16, gpu)?;
        let base = Tensor::randn((bsz, seq, dout), rng, DType::BF16, gpu)?;
        let d_out = Tensor::randn((bsz, seq, dout), rng, DType::BF16, gpu)?;
        let rows = (bsz * seq) as f64;
        let (din_f, dout_f, r_f) = (din as f64, dout as f64, r as f64);
        // Bytes (docs/KERNELS.md's roofline): forward reads h and base and writes out; the
        // backward reads d_out (twice: du and d_B) and h (twice: z and d_A) and writes d_h.
        let fwd_bytes = 2.0 * rows * (din_f + 2.0 * dout_f);
        let bwd_bytes = 2.0 * rows * (2.0 * dout_f + 3.0 * din_f);
        let fwd_flops = 2.0 * rows * r_f * (din_f + dout_f);
        let bwd_flops = 2.0 * rows * r_f * (3.0 * din_f + 2.0 * dout_f);
        let shape = format!("{bsz}x{seq} {din}->{dout} r{r} bf16");
        let (hs, as_, bs, ws, us, als, bases, ds) = (
            h.storage(),
            am.storage(),
            bm.storage(),
            wd.storage(),
            wu.storage(),
            al.storage(),
            base.storage(),
            d_out.storage(),
        );
        let gates = GateArgs {
            w_down: Some((&ws, wd.layout())),
            w_up: Some((&us, wu.layout())),
            a: Some((&als, al.layout())),
        };
        let fwd = || {
            ops::lora_fwd(
                (&hs, h.layout()),
                (&as_, am.layout()),
                (&bs, bm.layout()),
                gates,
                Some((&bases, base.layout())),
                &geom,
            )
            .map(|_| ())
        };
        let s = b.time(fwd)?;
        b.report(&format!("lora gated fwd {shape}"), s, fwd_bytes, fwd_flops);
        let s = b.time(|| {
            fwd()?;
            ops::lora_bwd(
                (&hs, h.layout()),
                (&as_, am.layout()),
                (&bs, bm.layout()),
                gates,
                (&ds, d_out.layout()),
                &geom,
            )
            .map(|_| ())
        })?;
        b.report(
            &format!("lora gated fwd+bwd {shape}"),
            s,
            fwd_bytes + bwd_bytes,
            fwd_flops + bwd_flops,
        );
        if i == 0 {
            // The same update as tensor ops, as candle's baseline composes it.
            let (at, bt, gate) = (am.t()?, bm.t()?, wd.mul(&wu)?.unsqueeze(1)?);
            let s = b.time(|| {
                let z = h.matmul(&at)?.mul(&gate)?.mul(&al)?.scale(0.25)?;
                z.matmul(&bt)?.add(&base).map(|_| ())
            })?;
            b.report(
                &format!("lora unfused fwd {shape}"),
                s,
                fwd_bytes,
                fwd_flops,
            );
        }
    }
    Ok(())
}
