//! Parity cases for the optimizers' kernels: AdamW (flat and multi-tensor), the squared norm
//! behind max-norm clipping, Prodigy, Lion, the 8-bit AdamW and Lion, and Adafactor.

use super::*;

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
