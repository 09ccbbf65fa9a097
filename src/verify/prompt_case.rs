//! A1111's and ComfyUI's prompt syntax against `tests/fixtures/extra/gen_prompt_weighting.py`:
//! the chunks' ids and weights of both tokenizers (exactly), the joined context and the pooled
//! embedding (under each of A1111's emphasis modes), and for each style a guided run whose
//! prompt and negative prompt differ in chunk count (kstyle runs the UNet once per half; the
//! ComfyUI reference batches the contexts repeated to a common length).

use super::extra_cases::extra;
use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::sample::pipeline::{MicroConditioning, Request, SamplerKind, Start};
use crate::sample::prompt_syntax::{self, comfy, Chunk, Emphasis, PromptStyle, CHUNK_TOKENS};
use crate::sample::Noise;
use crate::tensor::SafeTensorsFile;
use crate::{DType, Device, Error, Result, Tensor};

fn emphasis(name: &str) -> Result<Emphasis> {
    Ok(match name {
        "original" => Emphasis::Original,
        "no_norm" => Emphasis::NoNorm,
        "ignore" => Emphasis::Ignore,
        "none" => Emphasis::None,
        other => return Err(Error::Config(format!("unknown emphasis {other:?}"))),
    })
}

pub fn prompt_weighting(ctx: &Ctx) -> Result<Vec<Row>> {
    let path = extra(ctx, "prompt_weighting.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let mut chk = Checker::new("prompt_weighting");
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    for case in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{case}.{k}");
        let prompt = f.meta_str(&key("prompt"))?.to_string();
        let comfy = f.meta_str(&key("style")).is_ok_and(|s| s == "comfy");
        let style = if comfy {
            PromptStyle::Comfy
        } else {
            PromptStyle::A1111 {
                emphasis: emphasis(f.meta_str(&key("emphasis"))?)?,
                comma_backtrack: f.meta_f64(&key("comma_backtrack"))? as usize,
            }
        };
        let tok1 = pipe
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::Config("the tiny model has two tokenizers".into()))?;
        for (tok, i) in [(tok1, 1), (&pipe.tokenizer_2, 2)] {
            let chunks = match style {
                PromptStyle::A1111 {
                    emphasis,
                    comma_backtrack,
                } => {
                    let fragments = prompt_syntax::fragments(&prompt, emphasis)?;
                    prompt_syntax::chunks(tok, &fragments, comma_backtrack, &[])?
                }
                _ => comfy::chunks(tok, &comfy::parse(&prompt), &[], &mut Vec::new())?,
            };
            check_chunks(&mut chk, &f, &key, i, &chunks)?;
        }
        pipe.set_prompt_style(style);
        let e = no_grad(|| pipe.encode_prompts(std::slice::from_ref(&prompt)))?;
        chk.check(
            &key("context"),
            &e.context,
            &f.tensor(&key("context"))?,
            ctx.forward,
        )?;
        chk.check(
            &key("pooled"),
            &e.pooled,
            &f.tensor(&key("pooled"))?,
            ctx.forward,
        )?;
    }
    let init = SafeTensorsFile::open(ctx.reference("pipeline.safetensors"))?
        .tensor("init_latents")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)?;
    let a1111 = PromptStyle::A1111 {
        emphasis: Emphasis::Original,
        comma_backtrack: prompt_syntax::DEFAULT_COMMA_BACKTRACK,
    };
    for (name, style) in [("pipeline", a1111), ("comfy_pipeline", PromptStyle::Comfy)] {
        pipe.set_prompt_style(style);
        let req = pipeline_request(&f, name)?;
        let out = no_grad(|| pipe.denoise_from(&req, Start::Noise(&init), |_, _| {}))?;
        let key = format!("{name}.final_latents");
        chk.check(&key, &out, &f.tensor(&key)?, ctx.forward)?;
    }
    Ok(chk.rows)
}

/// The guided run of case `name`: its prompt and negative prompt, the steps, guidance and size
/// of the `pipeline` case.
fn pipeline_request(f: &SafeTensorsFile, name: &str) -> Result<Request> {
    Ok(Request {
        prompt: f.meta_str(&format!("{name}.prompt"))?.to_string(),
        negative: Some(f.meta_str(&format!("{name}.negative_prompt"))?.to_string()),
        steps: f.meta_f64("pipeline.steps")? as usize,
        guidance: f.meta_f64("pipeline.guidance_scale")?,
        guidance_rescale: 0.0,
        width: f.meta_f64("pipeline.width")? as usize,
        height: f.meta_f64("pipeline.height")? as usize,
        sampler: SamplerKind::Auto,
        noise: Noise::default(),
        denoising_end: None,
        micro: MicroConditioning::default(),
    })
}

/// One tokenizer's chunks of a case: ids exactly, weights exactly (both are float32 copies of
/// the same products).
fn check_chunks(
    chk: &mut Checker,
    f: &SafeTensorsFile,
    key: &dyn Fn(&str) -> String,
    i: usize,
    chunks: &[Chunk],
) -> Result<()> {
    let n = chunks.len();
    let ids: Vec<i64> = chunks
        .iter()
        .flat_map(|c| c.ids.iter().map(|&t| i64::from(t)))
        .collect();
    let ids = Tensor::from_vec(ids, (n, CHUNK_TOKENS + 2), Device::Cpu)?;
    super::clip_cases::check_ids(
        chk,
        &key(&format!("ids_{i}")),
        &ids,
        &f.tensor(&key(&format!("ids_{i}")))?,
    )?;
    let weights: Vec<f32> = chunks.iter().flat_map(|c| c.multipliers.clone()).collect();
    let want = f.tensor(&key(&format!("multipliers_{i}")))?;
    let same = want.dims() == [n, CHUNK_TOKENS + 2] && want.to_vec_f32()? == weights;
    let name = key(&format!("multipliers_{i}"));
    chk.check_exact(&name, same, if same { 0.0 } else { 1.0 });
    Ok(())
}
