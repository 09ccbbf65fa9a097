//! What the UNet is conditioned on at each evaluation of a run, and how its outputs are guided:
//! SDXL's time ids, classifier-free guidance over the [negative; prompt] batch, and A1111's
//! prompt editing and composable prompts ([`crate::sample::prompt_syntax::editing`]): the
//! prompt's parts each with a weight and texts that change between evaluations, guided as
//! `uncond + sum_k w_k (cond_k - uncond) scale` (A1111's `combine_denoised`).

use super::{MicroConditioning, PromptEmbeds, Request};
use crate::models::unet::UNet2DConditionModel;
use crate::sample::prompt_syntax::editing::entry_at;
use crate::{DType, Device, Error, Result, Tensor};

/// SDXL's micro-conditioning ids for an `h` x `w` generation, as many as the UNet's `text_time`
/// embedding takes beside the pooled text of width `pooled`: six (original size, crop corner,
/// target size), or five for a refiner (original size, crop corner, aesthetic score). Returns
/// (positive, negative).
///
/// The negative ids follow the pipeline diffusers would run. Text to image
/// (`image_pipeline` false, StableDiffusionXLPipeline) uses the negative sizes and crop only when
/// both negative sizes are given, else the prompt's ids. The image pipelines
/// (StableDiffusionXLImg2ImgPipeline: img2img, inpainting, a refiner's handover) default each
/// negative size to the prompt's, and with six ids put the prompt's crop, not the negative crop,
/// into the negative ids.
fn time_ids(
    unet: &UNet2DConditionModel,
    pooled: usize,
    (h, w): (usize, usize),
    m: &MicroConditioning,
    image_pipeline: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let pair = |(a, b): (usize, usize)| [a as f64, b as f64];
    let orig = m.original_size.unwrap_or((h, w));
    let target = m.target_size.unwrap_or((h, w));
    let neg_orig = m.negative_original_size.unwrap_or(orig);
    let ids = |parts: [[f64; 2]; 3]| parts.concat();
    let six = || {
        let pos = ids([pair(orig), pair(m.crop_top_left), pair(target)]);
        let neg = if image_pipeline {
            let neg_target = m.negative_target_size.unwrap_or(target);
            ids([pair(neg_orig), pair(m.crop_top_left), pair(neg_target)])
        } else {
            match (m.negative_original_size, m.negative_target_size) {
                (Some(o), Some(t)) => ids([pair(o), pair(m.negative_crop_top_left), pair(t)]),
                _ => pos.clone(),
            }
        };
        (pos, neg)
    };
    let Some(tt) = &unet.config.text_time else {
        return Ok(six());
    };
    let count = tt
        .input_dim
        .checked_sub(pooled)
        .map(|d| (d / tt.time_embed_dim, d % tt.time_embed_dim));
    match count {
        Some((6, 0)) => Ok(six()),
        Some((5, 0)) => {
            let with_score = |size, crop, score| [&pair(size)[..], &pair(crop), &[score]].concat();
            Ok((
                with_score(orig, m.crop_top_left, m.aesthetic_score),
                with_score(
                    neg_orig,
                    m.negative_crop_top_left,
                    m.negative_aesthetic_score,
                ),
            ))
        }
        _ => Err(Error::Config(format!(
            "the UNet's add embedding takes {} inputs: pooled text of width {pooled} plus 6 \
             (base) or 5 (refiner) time ids of width {} do not make that",
            tt.input_dim, tt.time_embed_dim
        ))),
    }
}

/// diffusers' `rescale_noise_cfg`: `guided` scaled to `cond`'s standard deviation (unbiased, over
/// the whole latent), mixed back in by `phi`. The ratio stays on the device.
fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    let std = |t: &Tensor| -> Result<Tensor> {
        let n = t.elem_count().max(2) as f64;
        t.sub(&t.mean_all()?)?
            .sqr()?
            .sum_all()?
            .scale(1.0 / (n - 1.0))?
            .sqrt()
    };
    let rescaled = guided.mul(&std(cond)?.div(&std(guided)?)?)?;
    rescaled.scale(phi)?.add(&guided.scale(1.0 - phi)?)
}

/// What the UNet is conditioned on in one run: (context, pooled text, time ids), each a
/// [negative; prompt] batch of two under classifier-free guidance (the prompt's alone without).
/// The time ids are six, or five with aesthetic scores for a refiner UNet; `image_pipeline`
/// picks diffusers' img2img rules for the negative ids (see [`MicroConditioning`]).
pub fn guidance_batch(
    unet: &UNet2DConditionModel,
    req: &Request,
    positive: &PromptEmbeds,
    negative: Option<&PromptEmbeds>,
    image_pipeline: bool,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (pos_ids, neg_ids) = time_ids(
        unet,
        positive.pooled.dims2()?.1,
        (req.height, req.width),
        &req.micro,
        image_pipeline,
    )?;
    let ids = |v: Vec<f64>| -> Result<Tensor> {
        let n = v.len();
        Tensor::from_vec(v, (1, n), Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(device)
    }; // (1, 6), or (1, 5) for a refiner
    Ok(match negative {
        Some(neg) => (
            Tensor::cat(&[neg.context.clone(), positive.context.clone()], 0)?, // (2, 77, Dc)
            Tensor::cat(&[neg.pooled.clone(), positive.pooled.clone()], 0)?,   // (2, P)
            Tensor::cat(&[ids(neg_ids)?, ids(pos_ids)?], 0)?,                  // (2, 6 or 5)
        ),
        None => (
            positive.context.clone(),
            positive.pooled.clone(),
            ids(pos_ids)?,
        ),
    })
}

/// A prompt's embeddings over the UNet evaluations of a run: (last evaluation, embeddings),
/// ascending; evaluation `i` (from 0) takes the first entry whose last evaluation is at or after
/// `i` (A1111's rule), the last entry past them all. One entry for a prompt that does not change.
#[derive(Clone, Debug)]
pub struct Schedule(pub Vec<(usize, PromptEmbeds)>);

impl Schedule {
    /// The same embeddings at every evaluation.
    pub fn fixed(embeds: PromptEmbeds) -> Schedule {
        Schedule(vec![(usize::MAX, embeds)])
    }

    fn at(&self, step: usize) -> usize {
        let ends: Vec<usize> = self.0.iter().map(|(end, _)| *end).collect();
        entry_at(&ends, step)
    }
}

/// The text side of a run: the prompt's parts (A1111's `AND`; one part of weight 1 otherwise),
/// each with its weight and schedule, and the negative prompt's schedule where the run guides.
#[derive(Clone, Debug)]
pub struct StepPrompts {
    pub parts: Vec<(f64, Schedule)>,
    pub negative: Option<Schedule>,
}

impl StepPrompts {
    /// One prompt and negative, the same at every evaluation.
    pub fn fixed(positive: &PromptEmbeds, negative: Option<&PromptEmbeds>) -> StepPrompts {
        StepPrompts {
            parts: vec![(1.0, Schedule::fixed(positive.clone()))],
            negative: negative.map(|n| Schedule::fixed(n.clone())),
        }
    }

    /// Refuses what cannot be guided: no part, parts without a negative to guide against
    /// (anything but one part of weight 1), or guidance rescale over several parts (diffusers'
    /// rescale has one conditional output).
    pub fn check(&self, req: &Request) -> Result<()> {
        let schedules = self.parts.iter().map(|(_, s)| s).chain(&self.negative);
        if self.parts.is_empty() || schedules.into_iter().any(|s| s.0.is_empty()) {
            return Err(Error::Config("a run needs a prompt".into()));
        }
        let plain = matches!(self.parts.as_slice(), [(w, _)] if *w == 1.0);
        if self.negative.is_none() && !plain {
            return Err(Error::Config(
                "weighted or composable prompts (AND) are guided against a negative: none was \
                 given"
                    .into(),
            ));
        }
        if self.parts.len() > 1 && req.guidance_rescale > 0.0 {
            return Err(Error::Config(
                "guidance rescale takes one conditional output; a prompt with AND has several"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Rows of the UNet batch: the negative's, then one per part.
    pub fn rows(&self) -> usize {
        self.parts.len() + usize::from(self.negative.is_some())
    }

    /// The entry each schedule reads at evaluation `step`: the negative's first, then the
    /// parts'.
    pub(super) fn selection(&self, step: usize) -> Vec<usize> {
        self.negative
            .iter()
            .chain(self.parts.iter().map(|(_, s)| s))
            .map(|s| s.at(step))
            .collect()
    }

    /// The guided prediction from the batch's outputs `eps` (rows as [`StepPrompts::rows`]):
    /// `uncond + sum_k (cond_k - uncond) (w_k scale)`, rescaled as diffusers rescales where
    /// asked; the prompt's output itself without a negative.
    pub(super) fn guide(&self, eps: &Tensor, req: &Request) -> Result<Tensor> {
        if self.negative.is_none() {
            return Ok(eps.clone());
        }
        let uncond = eps.narrow(0, 0, 1)?;
        let mut guided = uncond.clone();
        for (k, (w, _)) in self.parts.iter().enumerate() {
            let cond = eps.narrow(0, 1 + k, 1)?;
            guided = guided.add(&cond.sub(&uncond)?.scale(w * req.guidance)?)?;
        }
        if req.guidance_rescale > 0.0 {
            guided = rescale_guidance(&guided, &eps.narrow(0, 1, 1)?, req.guidance_rescale)?;
        }
        Ok(guided)
    }
}

/// `context` (1, n, D) made `len` tokens long by repeating its last token, as A1111 stacks the
/// parts of a composable prompt whose chunk counts differ (`stack_conds`).
fn pad_context(context: &Tensor, len: usize) -> Result<Tensor> {
    let (b, n, d) = context.dims3()?;
    if n == len {
        return Ok(context.clone());
    }
    let last = context.narrow(1, n - 1, 1)?;
    let fill = last.broadcast_as(&(b, len - n, d).into())?.contiguous()?;
    Tensor::cat(&[context.clone(), fill], 1)
}

/// The UNet calls of one evaluation: each takes rows of the batch and its (context, pooled text,
/// time ids). One call for the [negative; parts] batch; two where the negative's context differs
/// in length from the parts' (A1111-style prompts of different chunk counts: A1111 then
/// evaluates the UNet for each, its default without `pad_cond_uncond`).
pub(super) struct Conditioning {
    calls: Vec<(usize, Tensor, Tensor, Tensor)>,
}

impl Conditioning {
    /// The conditioning of `prompts` at the entries `sel` (from [`StepPrompts::selection`]).
    pub(super) fn new(
        prompts: &StepPrompts,
        sel: &[usize],
        unet: &UNet2DConditionModel,
        req: &Request,
        image_pipeline: bool,
        device: Device,
    ) -> Result<Conditioning> {
        let mut picked = sel.iter();
        let mut pick = |s: &Schedule| -> PromptEmbeds {
            let i = *picked.next().expect("one entry per schedule");
            s.0[i].1.clone()
        };
        let negative = prompts.negative.as_ref().map(&mut pick);
        let parts: Vec<PromptEmbeds> = prompts.parts.iter().map(|(_, s)| pick(s)).collect();
        let (pos_ids, neg_ids) = time_ids(
            unet,
            parts[0].pooled.dims2()?.1,
            (req.height, req.width),
            &req.micro,
            image_pipeline,
        )?;
        let ids = |v: &[f64], n: usize| -> Result<Tensor> {
            let row = v.len();
            let all: Vec<f64> = (0..n).flat_map(|_| v.iter().copied()).collect();
            Tensor::from_vec(all, (n, row), Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_device(device)
        }; // (n, 6), or (n, 5) for a refiner
        let len = parts.iter().map(|p| p.context.dims()[1]).max().unwrap_or(0);
        let contexts = parts
            .iter()
            .map(|p| pad_context(&p.context, len))
            .collect::<Result<Vec<_>>>()?;
        let pooled: Vec<Tensor> = parts.iter().map(|p| p.pooled.clone()).collect();
        let n = parts.len();
        let cond = (
            n,
            Tensor::cat(&contexts, 0)?,
            Tensor::cat(&pooled, 0)?,
            ids(&pos_ids, n)?,
        );
        let Some(neg) = negative else {
            return Ok(Conditioning { calls: vec![cond] });
        };
        let uncond = (1, neg.context, neg.pooled, ids(&neg_ids, 1)?);
        if uncond.1.dims()[1] != len {
            return Ok(Conditioning {
                calls: vec![uncond, cond],
            });
        }
        let batch = (
            1 + n,
            Tensor::cat(&[uncond.1, cond.1], 0)?, // (1 + n, 77 k, Dc)
            Tensor::cat(&[uncond.2, cond.2], 0)?, // (1 + n, P)
            Tensor::cat(&[uncond.3, cond.3], 0)?, // (1 + n, 6 or 5)
        );
        Ok(Conditioning { calls: vec![batch] })
    }

    /// The UNet's output on `x`, the batch of all rows.
    pub(super) fn eval(
        &self,
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        if let [(_, context, pooled, time_ids)] = self.calls.as_slice() {
            return unet.forward(x, t, context, pooled, time_ids);
        }
        let mut row = 0;
        let outs = self
            .calls
            .iter()
            .map(|(n, context, pooled, time_ids)| {
                let out = unet.forward(&x.narrow(0, row, *n)?, t, context, pooled, time_ids);
                row += n;
                out
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }
}
