//! A1111's and ComfyUI's prompt syntax against `tests/fixtures/extra/gen_prompt_weighting.py`:
//! the chunks' ids and weights of both tokenizers (exactly), the joined context and the pooled
//! embedding (under each of A1111's emphasis modes), and for each style a guided run whose
//! prompt and negative prompt differ in chunk count (kstyle runs the UNet once per half; the
//! ComfyUI reference batches the contexts repeated to a common length). A1111's prompt editing
//! and `AND` against `gen_prompt_editing.py`: schedules against lark's reading of thousands of
//! prompts, the parts and weights of composable prompts, and guided runs whose texts change
//! between evaluations.

use super::extra_cases::extra;
use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::sample::pipeline::{MicroConditioning, Request, SamplerKind, Sigmas, Start};
use crate::sample::prompt_syntax::{
    self, comfy, editing, Chunk, Emphasis, PromptStyle, CHUNK_TOKENS,
};
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

/// A schedule as the fixture writes it: (last step, text) pairs.
type Schedule = Vec<(usize, String)>;

/// A1111's prompt editing and composable prompts: every schedule of the fixture either equals
/// lark's (text and step exactly) or is refused as a stray bracket next to editing, and none of
/// the hand-written prompts is refused; every `AND` split and weight equals A1111's; each run's
/// final latents (Euler with edits in prompt and negative, three weighted parts of different
/// chunk counts, Heun over twice its steps).
pub fn prompt_editing(ctx: &Ctx) -> Result<Vec<Row>> {
    let path = extra(ctx, "prompt_editing.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let mut chk = Checker::new("prompt_editing");
    let json = |key: &str| -> Result<serde_json::Value> {
        serde_json::from_str(f.meta_str(key)?)
            .map_err(|e| Error::file(&path, format!("metadata `{key}`: {e}")))
    };
    let bad = |what: &str| Error::file(&path, format!("metadata: a malformed {what}"));
    let must_read: Vec<String> =
        serde_json::from_value(json("must_read")?).map_err(|_| bad("must_read list"))?;
    let schedules: Vec<(String, usize, Schedule)> =
        serde_json::from_value(json("schedules")?).map_err(|_| bad("schedule"))?;
    let (mut differ, mut refused, mut refused_hand) = (0usize, 0usize, 0usize);
    for (prompt, steps, want) in &schedules {
        match editing::schedule(prompt, *steps) {
            Ok(got) => differ += usize::from(&got != want),
            Err(_) if must_read.contains(prompt) => refused_hand += 1,
            Err(_) => refused += 1,
        }
    }
    let agree = schedules.len() - differ - refused - refused_hand;
    eprintln!(
        "prompt_editing: {agree} of {} schedules equal lark's, {refused} refused (stray brackets \
         next to editing), {differ} differ",
        schedules.len()
    );
    chk.check_exact("schedules.differ", differ == 0, differ as f64);
    chk.check_exact(
        "schedules.hand_written_refused",
        refused_hand == 0,
        refused_hand as f64,
    );
    let composable: Vec<(String, Vec<(String, f64)>)> =
        serde_json::from_value(json("composable")?).map_err(|_| bad("composable prompt"))?;
    let wrong = composable
        .iter()
        .filter(|(prompt, want)| {
            let got: Vec<(String, f64)> = editing::composable(prompt)
                .into_iter()
                .map(|p| (p.text, p.weight))
                .collect();
            &got != want
        })
        .count();
    chk.check_exact("composable.differ", wrong == 0, wrong as f64);

    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    pipe.set_prompt_style(PromptStyle::A1111 {
        emphasis: Emphasis::Original,
        comma_backtrack: prompt_syntax::DEFAULT_COMMA_BACKTRACK,
    });
    let init = SafeTensorsFile::open(ctx.reference("pipeline.safetensors"))?
        .tensor("init_latents")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)?;
    for run in f.meta_str("runs")?.split(',') {
        let key = |k: &str| format!("{run}.{k}");
        let sampler = match f.meta_str(&key("sampler"))? {
            "heun" => SamplerKind::Heun(Sigmas::Config),
            _ => SamplerKind::Auto,
        };
        let req = Request {
            prompt: f.meta_str(&key("prompt"))?.to_string(),
            negative: Some(f.meta_str(&key("negative_prompt"))?.to_string()),
            steps: f.meta_f64(&key("steps"))? as usize,
            guidance: f.meta_f64("guidance_scale")?,
            guidance_rescale: 0.0,
            width: f.meta_f64("width")? as usize,
            height: f.meta_f64("height")? as usize,
            sampler,
            noise: Noise::default(),
            denoising_end: None,
            micro: MicroConditioning::default(),
        };
        let out = no_grad(|| pipe.denoise_from(&req, Start::Noise(&init), |_, _| {}))?;
        let name = key("final_latents");
        chk.check(&name, &out, &f.tensor(&name)?, ctx.forward)?;
    }
    Ok(chk.rows)
}
