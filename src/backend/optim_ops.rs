//! The optimizer's primitives over flat f32 buffers, re-exported by [`super::ops`]: AdamW and
//! Prodigy steps, the squared gradient norm, and the multi-tensor gather and scatter between the
//! flat buffers and the trainables' own storage. CPU oracle or CUDA kernels, as every op.

use super::cpu::optim::{
    AdafactorStep, AdamW, FactorSlot, LionStep, LrRun, Moments8, ProdigyBuffers, ProdigyMoments,
    Rule8, Slot8, State,
};
use super::cpu::{self, CpuStorage};
use super::cuda::optim as coptim;
use super::{Arg, Storage};
use crate::tensor::DType;
use crate::{Error, Result};

/// One AdamW step at 1-based step `t` over flat f32 buffers, in place, with gradient
/// `grad_scale * g` (1 / micro-batches: the accumulator holds sums).
pub fn adamw_step(
    h: &AdamW,
    t: u64,
    s: State<'_, Storage>,
    g: &Storage,
    grad_scale: f32,
) -> Result<()> {
    let range = 0..s.p.len();
    adamw_step_runs(h, t, s, g, grad_scale, &[LrRun { range, lr: h.lr }])
}

/// [`adamw_step`] over the element ranges `runs` lists, each at its own learning rate
/// (parameter groups of a flat optimizer state; `h.lr` is not read). Elements outside every
/// run are left alone; runs must not overlap.
pub fn adamw_step_runs(
    h: &AdamW,
    t: u64,
    s: State<'_, Storage>,
    g: &Storage,
    grad_scale: f32,
    runs: &[LrRun],
) -> Result<()> {
    check_runs(
        "adamw_step",
        &[s.p.len(), s.m.len(), s.v.len(), g.len()],
        runs,
    )?;
    match (s.p, g, s.m, s.v) {
        (
            Storage::Cpu(CpuStorage::F32(p)),
            Storage::Cpu(CpuStorage::F32(g)),
            Storage::Cpu(CpuStorage::F32(m)),
            Storage::Cpu(CpuStorage::F32(v)),
        ) => {
            for LrRun { range: r, lr } in runs {
                let state = State {
                    p: &mut p[r.clone()],
                    m: &mut m[r.clone()],
                    v: &mut v[r.clone()],
                };
                let h = AdamW { lr: *lr, ..*h };
                cpu::optim::adamw_step(&h, t, state, &g[r.clone()], grad_scale);
            }
            Ok(())
        }
        (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v))
            if [g.ordinal(), m.ordinal(), v.ordinal()]
                .iter()
                .all(|&o| o == p.ordinal()) =>
        {
            coptim::adamw_step_runs(h, t, State { p, m, v }, g, grad_scale, runs)
        }
        (p, ..) => Err(Error::DType {
            op: "adamw_step (flat f32 buffers on one device)",
            dtype: p.dtype(),
        }),
    }
}

/// Runs lie inside buffers of `lens` (p, m, ..., g) and do not overlap.
fn check_runs(op: &str, lens: &[usize], runs: &[LrRun]) -> Result<()> {
    let n = lens.iter().copied().min().unwrap_or(0);
    let mut sorted: Vec<&std::ops::Range<usize>> = runs.iter().map(|r| &r.range).collect();
    sorted.sort_by_key(|r| r.start);
    if let Some(r) = sorted.iter().find(|r| r.start > r.end || r.end > n) {
        return Err(Error::msg(format!(
            "{op}: elements {r:?} lie outside buffers of {lens:?} elements"
        )));
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0].end > w[1].start) {
        return Err(Error::msg(format!(
            "{op}: runs {:?} and {:?} overlap",
            w[0], w[1]
        )));
    }
    Ok(())
}

/// One Lion step (see `train::lion`) over the element ranges `runs` lists, each at its own
/// learning rate, with gradient `grad_scale * g`, in place on the masters `p` and the moment
/// `m`. Elements outside every run are left alone.
pub fn lion_step_runs(
    h: &LionStep,
    p: &mut Storage,
    m: &mut Storage,
    g: &Storage,
    grad_scale: f32,
    runs: &[LrRun],
) -> Result<()> {
    check_runs("lion_step", &[p.len(), m.len(), g.len()], runs)?;
    match (p, m, g) {
        (
            Storage::Cpu(CpuStorage::F32(p)),
            Storage::Cpu(CpuStorage::F32(m)),
            Storage::Cpu(CpuStorage::F32(g)),
        ) => {
            for LrRun { range: r, lr } in runs {
                let (p, m) = (&mut p[r.clone()], &mut m[r.clone()]);
                cpu::optim::lion_step(h, *lr, p, m, &g[r.clone()], grad_scale);
            }
            Ok(())
        }
        (Storage::Cuda(p), Storage::Cuda(m), Storage::Cuda(g))
            if m.ordinal() == p.ordinal() && g.ordinal() == p.ordinal() =>
        {
            coptim::lion_step_runs(h, p, m, g, grad_scale, runs)
        }
        (p, ..) => Err(Error::DType {
            op: "lion_step (flat f32 buffers on one device)",
            dtype: p.dtype(),
        }),
    }
}

/// One Adafactor step (see `train::adafactor`) of every trainable `slots` lists, each at its
/// own rate, with gradient `grad_scale * g`, in place on the masters `p`, the first moment `m`
/// (read only with `h.beta1`; it may be empty otherwise) and the second moments `v`.
pub fn adafactor_step(
    h: &AdafactorStep,
    p: &mut Storage,
    m: &mut Storage,
    v: &mut Storage,
    g: &Storage,
    grad_scale: f32,
    slots: &[FactorSlot],
) -> Result<()> {
    for slot in slots {
        let end = slot.offset + slot.len;
        let shaped = !slot.factored() || slot.lead * slot.rows * slot.cols == slot.len;
        let inside = end <= p.len().min(g.len())
            && (h.beta1.is_none() || end <= m.len())
            && slot.state + slot.state_len() <= v.len();
        if !inside || !shaped {
            return Err(Error::msg(format!(
                "Adafactor step: slot {slot:?} lies outside its buffers or its shape (masters \
                 {}, gradient {}, first moment {}, second moments {})",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            )));
        }
    }
    use CpuStorage::F32;
    use Storage::{Cpu, Cuda};
    match (p, m, v, g) {
        (Cpu(F32(p)), Cpu(F32(m)), Cpu(F32(v)), Cpu(F32(g))) => {
            for s in slots {
                let r = s.offset..s.offset + s.len;
                let m = match h.beta1 {
                    Some(_) => &mut m[r.clone()],
                    None => &mut [],
                };
                let v = &mut v[s.state..s.state + s.state_len()];
                cpu::optim::adafactor_slot(h, s, &mut p[r.clone()], m, v, &g[r], grad_scale);
            }
            Ok(())
        }
        (Cuda(p), Cuda(m), Cuda(v), Cuda(g))
            if [&*m, &*v, g].iter().all(|b| b.ordinal() == p.ordinal()) =>
        {
            coptim::adafactor_step(h, p, m, v, g, grad_scale, slots)
        }
        (p, ..) => Err(Error::DType {
            op: "adafactor_step (flat f32 buffers on one device)",
            dtype: p.dtype(),
        }),
    }
}

/// Every slot of an 8-bit step lies inside its buffers: the masters and gradient, the f32
/// moments or the codes and their absmax (the second moment's only when the rule keeps one).
fn check_slots8(
    p: usize,
    g: usize,
    s: &Moments8<'_, Storage, Storage>,
    two: bool,
    slots: &[Slot8],
) -> Result<()> {
    let dtypes = [
        (s.m.dtype(), DType::F32),
        (s.v.dtype(), DType::F32),
        (s.absmax1.dtype(), DType::F32),
        (s.absmax2.dtype(), DType::F32),
        (s.q1.dtype(), DType::U8),
        (s.q2.dtype(), DType::U8),
    ];
    if let Some(&(got, _)) = dtypes.iter().find(|(got, want)| got != want) {
        return Err(Error::DType {
            op: "8-bit optimizer step (f32 moments and absmax, u8 codes)",
            dtype: got,
        });
    }
    // With one moment the second's buffers are not read: any length will do.
    let second = |n: usize| if two { n } else { usize::MAX };
    for slot in slots {
        let inside = match slot.block {
            None => slot.state + slot.len <= s.m.len().min(second(s.v.len())),
            Some(b) => {
                slot.state + slot.len <= s.q1.len().min(second(s.q2.len()))
                    && b + slot.len.div_ceil(cpu::optim::BLOCK_8BIT)
                        <= s.absmax1.len().min(second(s.absmax2.len()))
            }
        };
        if !inside || slot.offset + slot.len > p.min(g) {
            return Err(Error::msg(format!(
                "8-bit optimizer step: slot {slot:?} lies outside its buffers (masters {p}, \
                 gradient {g}, f32 moments {}, codes {}, absmax {})",
                s.m.len(),
                s.q1.len(),
                s.absmax1.len()
            )));
        }
    }
    Ok(())
}

/// One step of an optimizer with 8-bit moments (see `train::adamw8bit`): AdamW8bit or Lion8bit
/// as `rule` says, over the trainables `slots` lists, each at its own rate, with gradient
/// `grad_scale * g`, in place on the f32 masters `p` and the moments (Lion's one moment in `m`
/// and `q1` / `absmax1`; `v`, `q2`, `absmax2` unused). `maps` is the (512,) f32 signed and
/// unsigned maps.
#[allow(clippy::too_many_arguments)]
pub fn step_8bit(
    rule: &Rule8,
    maps: &Storage,
    p: &mut Storage,
    s: Moments8<'_, Storage, Storage>,
    g: &Storage,
    grad_scale: f32,
    slots: &[Slot8],
) -> Result<()> {
    let two = matches!(rule, Rule8::AdamW { .. });
    check_slots8(p.len(), g.len(), &s, two, slots)?;
    if let Rule8::AdamW { t: 0, .. } = rule {
        return Err(Error::msg("8-bit AdamW step: steps count from 1"));
    }
    use CpuStorage::{F32, U8};
    use Storage::{Cpu, Cuda};
    let Moments8 {
        m,
        v,
        q1,
        q2,
        absmax1,
        absmax2,
    } = s;
    match (p, g, maps, m, v, q1, q2, absmax1, absmax2) {
        (
            Cpu(F32(p)),
            Cpu(F32(g)),
            Cpu(F32(maps)),
            Cpu(F32(m)),
            Cpu(F32(v)),
            Cpu(U8(q1)),
            Cpu(U8(q2)),
            Cpu(F32(a1)),
            Cpu(F32(a2)),
        ) if maps.len() == 512 => {
            let mut signed = [0f32; 256];
            let mut unsigned = [0f32; 256];
            signed.copy_from_slice(&maps[..256]);
            unsigned.copy_from_slice(&maps[256..]);
            for slot in slots {
                let (at, n, lr) = (slot.offset, slot.len, slot.lr);
                let (p, g) = (&mut p[at..at + n], &g[at..at + n]);
                let st = slot.state..slot.state + n;
                let Some(b0) = slot.block else {
                    match rule {
                        Rule8::AdamW { h, t } => {
                            let state = State {
                                p,
                                m: &mut m[st.clone()],
                                v: &mut v[st],
                            };
                            cpu::optim::adamw_step(&AdamW { lr, ..*h }, *t, state, g, grad_scale);
                        }
                        Rule8::Lion(h) => {
                            cpu::optim::lion_step(h, lr, p, &mut m[st], g, grad_scale)
                        }
                    }
                    continue;
                };
                let chunks = (0..n).step_by(cpu::optim::BLOCK_8BIT).enumerate();
                for (k, start) in chunks {
                    let r = start..(start + cpu::optim::BLOCK_8BIT).min(n);
                    let q = slot.state + r.start..slot.state + r.end;
                    match rule {
                        Rule8::AdamW { h, t } => cpu::optim::adamw8bit_block(
                            h,
                            *t,
                            lr,
                            (&signed, &unsigned),
                            &mut p[r.clone()],
                            &g[r],
                            grad_scale,
                            (&mut q1[q.clone()], &mut q2[q]),
                            (&mut a1[b0 + k], &mut a2[b0 + k]),
                        ),
                        Rule8::Lion(h) => cpu::optim::lion8bit_block(
                            h,
                            lr,
                            &signed,
                            &mut p[r.clone()],
                            &g[r],
                            grad_scale,
                            &mut q1[q],
                            &mut a1[b0 + k],
                        ),
                    }
                }
            }
            Ok(())
        }
        (
            Cuda(p),
            Cuda(g),
            Cuda(maps),
            Cuda(m),
            Cuda(v),
            Cuda(q1),
            Cuda(q2),
            Cuda(absmax1),
            Cuda(absmax2),
        ) if maps.len() == 512
            && [g, maps, &*m, &*v, &*q1, &*q2, &*absmax1, &*absmax2]
                .iter()
                .all(|b| b.ordinal() == p.ordinal()) =>
        {
            let moments = Moments8 {
                m,
                v,
                q1,
                q2,
                absmax1,
                absmax2,
            };
            coptim::step_8bit(rule, maps, p, moments, g, grad_scale, slots)
        }
        (p, ..) => Err(Error::DType {
            op: "8-bit optimizer step (the masters, gradient, moments and 512 map values on one \
                 device)",
            dtype: p.dtype(),
        }),
    }
}

/// Prodigy's first pass over the element ranges `ranges` (see `train::prodigy`), in place:
/// returns (sum g (p0 - p), sum |s|) in f64.
pub fn prodigy_moments(
    h: &ProdigyMoments,
    b: ProdigyBuffers<'_, Storage>,
    g: &Storage,
    grad_scale: f32,
    ranges: &[std::ops::Range<usize>],
) -> Result<(f64, f64)> {
    let ProdigyBuffers { p, p0, m, v, s } = b;
    let n = [p.len(), p0.len(), m.len(), v.len(), s.len(), g.len()]
        .into_iter()
        .min()
        .unwrap_or(0);
    if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > n) {
        return Err(Error::msg(format!(
            "prodigy: elements {r:?} lie outside buffers of {n}"
        )));
    }
    match (p, p0, m, v, s, g) {
        (
            Storage::Cpu(CpuStorage::F32(p)),
            Storage::Cpu(CpuStorage::F32(p0)),
            Storage::Cpu(CpuStorage::F32(m)),
            Storage::Cpu(CpuStorage::F32(v)),
            Storage::Cpu(CpuStorage::F32(s)),
            Storage::Cpu(CpuStorage::F32(g)),
        ) => {
            let (mut num, mut den) = (0.0, 0.0);
            for r in ranges {
                let b = ProdigyBuffers {
                    p: &p[r.clone()],
                    p0: &p0[r.clone()],
                    m: &mut m[r.clone()],
                    v: &mut v[r.clone()],
                    s: &mut s[r.clone()],
                };
                let (a, d) = cpu::optim::prodigy_moments(h, b, &g[r.clone()], grad_scale);
                num += a;
                den += d;
            }
            Ok((num, den))
        }
        (
            Storage::Cuda(p),
            Storage::Cuda(p0),
            Storage::Cuda(m),
            Storage::Cuda(v),
            Storage::Cuda(s),
            Storage::Cuda(g),
        ) if [
            p0.ordinal(),
            m.ordinal(),
            v.ordinal(),
            s.ordinal(),
            g.ordinal(),
        ]
        .iter()
        .all(|&o| o == p.ordinal()) =>
        {
            let b = ProdigyBuffers { p, p0, m, v, s };
            coptim::prodigy_moments(h, b, g, grad_scale, ranges)
        }
        (p, ..) => Err(Error::DType {
            op: "prodigy (flat f32 buffers on one device)",
            dtype: p.dtype(),
        }),
    }
}

/// Prodigy's second pass over `ranges`: p <- p - wd dlr p - dlr m / (sqrt(v) + d_eps), with
/// `step` = [dlr, wd, d_eps].
pub fn prodigy_update(
    p: &mut Storage,
    m: &Storage,
    v: &Storage,
    step: [f64; 3],
    ranges: &[std::ops::Range<usize>],
) -> Result<()> {
    let n = [p.len(), m.len(), v.len()].into_iter().min().unwrap_or(0);
    if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > n) {
        return Err(Error::msg(format!(
            "prodigy: elements {r:?} lie outside buffers of {n}"
        )));
    }
    match (p, m, v) {
        (
            Storage::Cpu(CpuStorage::F32(p)),
            Storage::Cpu(CpuStorage::F32(m)),
            Storage::Cpu(CpuStorage::F32(v)),
        ) => {
            let [dlr, wd, d_eps] = step;
            for r in ranges {
                let (m, v) = (&m[r.clone()], &v[r.clone()]);
                cpu::optim::prodigy_update(&mut p[r.clone()], m, v, dlr, wd, d_eps);
            }
            Ok(())
        }
        (Storage::Cuda(p), Storage::Cuda(m), Storage::Cuda(v))
            if m.ordinal() == p.ordinal() && v.ordinal() == p.ordinal() =>
        {
            coptim::prodigy_update(p, m, v, step, ranges)
        }
        (p, ..) => Err(Error::DType {
            op: "prodigy (flat f32 buffers on one device)",
            dtype: p.dtype(),
        }),
    }
}

/// The sum of squares of a whole flat f32 buffer, read back to the host: the squared global
/// gradient norm (clipping, the loss log). The CPU sums in f64; CUDA in f32 per block.
pub fn sqnorm(flat: &Storage) -> Result<f64> {
    match flat {
        Storage::Cpu(CpuStorage::F32(x)) => Ok(cpu::optim::sqnorm(x)),
        Storage::Cuda(x) if x.dtype() == DType::F32 => coptim::sqnorm(x.dev(), x),
        f => Err(Error::DType {
            op: "sqnorm (flat f32 buffer)",
            dtype: f.dtype(),
        }),
    }
}

/// `flat[offset .. offset + n] += part` for every `(part, offset)`: contiguous f32 parts
/// summed into a flat f32 buffer on the same device (one launch on CUDA, however many parts).
pub fn gather_add(flat: &mut Storage, parts: &[(Arg, usize)]) -> Result<()> {
    for &((s, l), off) in parts {
        if s.dtype() != DType::F32 || !l.is_contiguous() {
            return Err(Error::msg(format!(
                "gather_add: parts must be contiguous f32, got {} {:?}",
                s.dtype(),
                l.dims()
            )));
        }
        if off + l.shape().elem_count() > flat.len() {
            return Err(Error::msg(format!(
                "gather_add: part [{off}, {}) lies outside the {}-element flat buffer",
                off + l.shape().elem_count(),
                flat.len()
            )));
        }
    }
    match flat {
        Storage::Cpu(CpuStorage::F32(f)) => {
            for &((s, l), off) in parts {
                let Storage::Cpu(CpuStorage::F32(src)) = s else {
                    return Err(Error::msg("gather_add: a part on another device"));
                };
                let n = l.shape().elem_count();
                cpu::optim::gather_add(f, &src[l.offset()..l.offset() + n], off);
            }
            Ok(())
        }
        Storage::Cuda(f) => {
            let mut addrs = Vec::with_capacity(parts.len());
            for &((s, l), off) in parts {
                match s {
                    Storage::Cuda(c) if c.ordinal() == f.ordinal() => {
                        addrs.push((c.ptr_at(l.offset()), off, l.shape().elem_count()))
                    }
                    _ => return Err(Error::msg("gather_add: a part on another device")),
                }
            }
            coptim::gather_add(f, &addrs)
        }
        f => Err(Error::DType {
            op: "gather_add (flat f32 buffer)",
            dtype: f.dtype(),
        }),
    }
}

/// Every `(target, offset)` storage is overwritten in place with `flat[offset .. offset + n]`
/// rounded to its dtype (one launch per dtype on CUDA, however many targets).
pub fn scatter(flat: &Storage, targets: &mut [(&mut Storage, usize)]) -> Result<()> {
    if let Some((t, off)) = targets.iter().find(|(t, off)| off + t.len() > flat.len()) {
        return Err(Error::msg(format!(
            "scatter: target [{off}, {}) lies outside the {}-element flat buffer",
            *off + t.len(),
            flat.len()
        )));
    }
    match flat {
        Storage::Cpu(CpuStorage::F32(f)) => {
            for (t, off) in targets.iter_mut() {
                let n = t.len();
                let Storage::Cpu(c) = &mut **t else {
                    return Err(Error::msg("scatter: a target on another device"));
                };
                *c = CpuStorage::from_f32(f[*off..*off + n].to_vec(), c.dtype());
            }
            Ok(())
        }
        Storage::Cuda(f) => {
            let mut cuda = Vec::with_capacity(targets.len());
            for (t, off) in targets.iter() {
                match &**t {
                    Storage::Cuda(c) if c.ordinal() == f.ordinal() => cuda.push((c, *off)),
                    _ => return Err(Error::msg("scatter: a target on another device")),
                }
            }
            coptim::scatter(f, &cuda)
        }
        f => Err(Error::DType {
            op: "scatter (flat f32 buffer)",
            dtype: f.dtype(),
        }),
    }
}
