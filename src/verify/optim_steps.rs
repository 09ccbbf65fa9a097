//! What the optimizer reference cases (`prodigy`, `lion`, `adamw8bit`, `lion8bit`) share: their settings as JSON
//! metadata, the parameters a case starts from, and one step through the trainer's optimizer
//! (`Optimizer::step_rates`) checked as an update against the reference's.

use super::{Checker, Ctx};
use crate::tensor::SafeTensorsFile;
use crate::train::optim::Optimizer;
use crate::{DType, Device, Error, Result, Tensor};

pub(super) fn json<T: serde::de::DeserializeOwned>(f: &SafeTensorsFile, key: &str) -> Result<T> {
    serde_json::from_str(f.meta_str(key)?).map_err(|e| Error::Json {
        path: f.path().into(),
        msg: format!("metadata `{key}`: {e}"),
    })
}

/// `v` as a host (N,) tensor.
pub(super) fn host(v: Vec<f64>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, Device::Cpu)
}

/// Named trainables, as the optimizer takes them.
pub(super) type Params = Vec<(String, Tensor)>;

/// A case's `n` parameters (`<case>.p.<i>`) as f32 trainables `p<i>` on the run's device, and
/// their float64 values.
pub(super) fn start(
    ctx: &Ctx,
    f: &SafeTensorsFile,
    case: &str,
    n: usize,
) -> Result<(Params, Vec<Vec<f64>>)> {
    let mut params = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let t = f.tensor(&format!("{case}.p.{i}"))?;
        values.push(t.to_vec_f64()?);
        params.push((
            format!("p{i}"),
            t.to_dtype(DType::F32)?.to_device(ctx.device)?.var()?,
        ));
    }
    Ok((params, values))
}

/// Step `opt` once with the case's gradients of step `step` (`<case>.g.<step>.<i>`) at `rates`,
/// and check the update of every parameter, as one vector (the values themselves are dominated
/// by where they started), against the reference's move from `reference` to
/// `<case>.after.<step>.<i>`; `reference` then holds the latter.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_step(
    chk: &mut Checker,
    ctx: &Ctx,
    f: &SafeTensorsFile,
    case: &str,
    step: usize,
    opt: &mut Optimizer,
    params: &[(String, Tensor)],
    rates: &[f64],
    reference: &mut [Vec<f64>],
) -> Result<()> {
    let before: Vec<Vec<f64>> = params
        .iter()
        .map(|(_, p)| p.to_vec_f64())
        .collect::<Result<_>>()?;
    let grads: Vec<Tensor> = (0..params.len())
        .map(|i| {
            let g = f.tensor(&format!("{case}.g.{step}.{i}"))?;
            let n = g.elem_count();
            g.to_dtype(DType::F32)?.to_device(ctx.device)?.reshape(n)
        })
        .collect::<Result<_>>()?;
    opt.step_rates(params, &Tensor::cat(&grads, 0)?, 1.0, rates)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for (i, (_, p)) in params.iter().enumerate() {
        let after = f
            .tensor(&format!("{case}.after.{step}.{i}"))?
            .to_vec_f64()?;
        ours.extend(p.to_vec_f64()?.iter().zip(&before[i]).map(|(a, b)| a - b));
        theirs.extend(after.iter().zip(&reference[i]).map(|(a, b)| a - b));
        reference[i] = after;
    }
    chk.check(
        &format!("{case} step {step} update (every parameter, as one vector)"),
        &host(ours)?,
        &host(theirs)?,
        ctx.grad,
    )
}

/// An optimizer, its trainables and the reference values they are checked against.
pub(super) type Stepping<'a> = (
    &'a mut Optimizer,
    &'a [(String, Tensor)],
    &'a mut [Vec<f64>],
);

/// Steps `opt` through a case's schedule, each step's rate `lrs[step]` times the slot's
/// multiplier (`<case>.mults`: LoRA+'s pattern of interleaved groups), checking every update
/// with [`check_step`]. `run` is the optimizer, its trainables and the reference values.
pub(super) fn check_schedule(
    chk: &mut Checker,
    ctx: &Ctx,
    f: &SafeTensorsFile,
    case: &str,
    lrs: &[f64],
    mults: &[f64],
    run: Stepping<'_>,
) -> Result<()> {
    let (opt, params, reference) = run;
    for (step, &lr) in lrs.iter().enumerate() {
        let rates: Vec<f64> = mults.iter().map(|m| lr * m).collect();
        check_step(chk, ctx, f, case, step, opt, params, &rates, reference)?;
    }
    Ok(())
}
