//! A K-StyleLoRA step that also trains LoRA on both text encoders
//! (`tests/fixtures/extra/gen_train_text_encoder.py`): train_step_kstyle's UNet, adapters,
//! cultural loss and latents, conditioned through the tiny text encoders wearing plain LoRA on
//! two captions. The token ids, the losses, the gradients the reference keeps (every
//! text-encoder factor, the UNet's cross-attention key and value factors, one gated module, the
//! cultural projection), and one AdamW step with the text encoders' own learning rate.

use super::train_cases::{adamw_from, check_losses, Step};
use super::{max_norm, Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::formats::diffusers::DiffusersFolder;
use crate::models::clip::text::{token_ids, ClipTextModel};
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::nn::lora::{LoraAdapter, LoraConfig};
use crate::sample::TrainSchedule;
use crate::tensor::SafeTensorsFile;
use crate::train::optim::Optimizer;
use crate::train::step::{training_loss, Conditioning};
use crate::train::text::{text_encoder_trains, text_layer, TextEncoders};
use crate::{DType, Error, Result, Tensor};

pub fn train_text_encoder(ctx: &Ctx) -> Result<Vec<Row>> {
    let setup = SafeTensorsFile::open(ctx.reference("train_step_kstyle.safetensors"))?;
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_text_encoder.safetensors"))?;
    let mut chk = Checker::new("train_text_encoder");
    let step = Step::load(ctx, &setup)?;
    let load =
        |k: &str| -> Result<Tensor> { f.tensor(k)?.to_dtype(DType::F32)?.to_device(ctx.device) };

    // The captions through our tokenizers give the reference's ids.
    let captions: Vec<String> = f.meta_str("captions")?.lines().map(String::from).collect();
    let mut ids = Vec::new();
    for (sub, key) in [("tokenizer", "ids_1"), ("tokenizer_2", "ids_2")] {
        let tok = ClipTokenizer::from_folder(ctx.dir.join("sdxl").join(sub))?;
        let got = token_ids(&tok.encode_batch(&captions)?, ctx.device)?;
        if got.to_vec_i64()? != f.tensor(key)?.to_vec_i64()? {
            return Err(Error::msg(format!(
                "{sub}: the captions' ids differ from `{key}`"
            )));
        }
        ids.push(got);
    }

    let folder = DiffusersFolder::open(ctx.dir.join("sdxl"))?;
    let mut te = TextEncoders {
        te1: ClipTextModel::from_diffusers(&folder, "text_encoder", DType::F32, ctx.device)?,
        te2: ClipTextModel::from_diffusers(&folder, "text_encoder_2", DType::F32, ctx.device)?,
    };
    let config = LoraConfig {
        rank: f.meta_f64("rank")? as usize,
        alpha: f.meta_f64("alpha")?,
        ..LoraConfig::default()
    };
    // The trainer's choice of modules is the reference's.
    let layers = f.meta_f64("text_encoder_layers")? as usize;
    let expected: Vec<&str> = f.meta_str("text_encoder_modules")?.split(',').collect();
    let mut chosen = Vec::new();
    for (path, lin) in te.linears_mut() {
        let (component, inner) = path.split_once('.').unwrap_or_default();
        let n = if component == "text_encoder" {
            layers
        } else {
            usize::MAX
        };
        if !text_layer(inner).is_some_and(|l| text_encoder_trains(component, l, n)) {
            continue;
        }
        let a = load(&format!("param.{path}.lora_A"))?.var()?;
        let b = load(&format!("param.{path}.lora_B"))?.var()?;
        lin.adapter = Some(LoraAdapter {
            a,
            b,
            config,
            gates: None,
            concepts: None,
            recorder: None,
            dropout: None,
            lycoris: None,
            dora: None,
        });
        chosen.push(path);
    }
    chosen.sort();
    if chosen != expected {
        return Err(Error::msg(format!(
            "the trainer adapts {} text-encoder linears, the reference {}",
            chosen.len(),
            expected.len()
        )));
    }

    let (context, pooled) = te.encode(&ids[0], &ids[1], None)?;
    chk.check("context", &context, &f.tensor("context")?, ctx.forward)?;
    chk.check("pooled", &pooled, &f.tensor("pooled")?, ctx.forward)?;
    let losses = training_loss(
        &step.unet,
        step.cultural.as_ref().map(|c| (c, step.lambda)),
        &TrainSchedule::sdxl(),
        &step.x0,
        &step.noise,
        &step.t,
        &Conditioning {
            context: &context,
            pooled: &pooled,
            time_ids: &step.time_ids,
            loss_mask: None,
        },
    )?;
    check_losses(&mut chk, ctx, &f, "", &losses)?;

    // Slot order: the UNet's and the cultural module's group, then the text encoders'.
    let te_params = te.parameters();
    let mut params = step.params.clone();
    params.extend(te_params.iter().cloned());
    let grads = losses.total.backward()?;
    let tol = ctx.grad.grad_with_floor(max_norm(&f, "grad.")?);
    let mut flat = Vec::with_capacity(params.len());
    for (name, p) in &params {
        let g = match grads.get(p) {
            Some(g) => g.to_dtype(DType::F32)?,
            None => return Err(Error::Backward(format!("no gradient for {name}"))),
        };
        let key = format!("grad.{name}");
        if f.contains(&key) {
            chk.check(&key, &g, &f.tensor(&key)?, tol)?;
        }
        flat.push(g.reshape(g.elem_count())?);
    }
    let missing: Vec<&str> = f
        .names()
        .filter_map(|n| n.strip_prefix("grad."))
        .filter(|n| !params.iter().any(|(p, _)| p == n))
        .collect();
    if let Some(n) = missing.first() {
        return Err(Error::msg(format!(
            "{} reference gradients name no trainable here, e.g. `{n}`",
            missing.len()
        )));
    }

    // The reference's UNet group runs at its own lr (train_step_kstyle's), the rest as there.
    let hyper = AdamW {
        lr: f.meta_f64("lr")?,
        ..adamw_from(&setup)?
    };
    let before: Vec<Vec<f64>> = params
        .iter()
        .map(|(_, p)| p.to_vec_f64())
        .collect::<Result<_>>()?;
    let mut opt = Optimizer::new(hyper, &params)?;
    let te_lr = f.meta_f64("te_lr")?;
    let first_te = params.len() - te_params.len();
    let rates: Vec<f64> = (0..params.len())
        .map(|i| if i < first_te { hyper.lr } else { te_lr })
        .collect();
    opt.step_rates(&params, &Tensor::cat(&flat, 0)?, 1.0, &rates)?;
    let adam_tol = ctx.grad.grad_with_floor(max_norm(&f, "updated.")?);
    let mut checked = 0;
    // The values are dominated by the parameters themselves (a step moves them by about the
    // learning rate), so the updates are compared too, per group, as vectors.
    let mut updates = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for (i, ((name, p), b)) in params.iter().zip(&before).enumerate() {
        let key = format!("updated.{name}");
        if !f.contains(&key) {
            continue;
        }
        let reference = f.tensor(&key)?;
        chk.check(&key, p, &reference, adam_tol)?;
        checked += 1;
        let (ours, theirs) = &mut updates[usize::from(i >= first_te)];
        ours.extend(p.to_vec_f64()?.iter().zip(b).map(|(a, b)| a - b));
        theirs.extend(reference.to_vec_f64()?.iter().zip(b).map(|(a, b)| a - b));
    }
    if checked != f.names().filter(|n| n.starts_with("updated.")).count() {
        return Err(Error::msg(
            "some updated reference values name no trainable here",
        ));
    }
    for (what, (ours, theirs)) in ["UNet and cultural group", "text-encoder group"]
        .iter()
        .zip(updates)
    {
        let n = ours.len();
        chk.check(
            &format!("updated ({what}: every update, as one vector)"),
            &Tensor::from_vec(ours, n, crate::Device::Cpu)?,
            &Tensor::from_vec(theirs, n, crate::Device::Cpu)?,
            ctx.grad,
        )?;
    }
    Ok(chk.rows)
}

/// The tiny model's two text encoders (f32, frozen) and tokenizers.
fn tiny_text_side(ctx: &Ctx) -> Result<(TextEncoders, ClipTokenizer, ClipTokenizer)> {
    let folder = DiffusersFolder::open(ctx.dir.join("sdxl"))?;
    let te = TextEncoders {
        te1: ClipTextModel::from_diffusers(&folder, "text_encoder", DType::F32, ctx.device)?,
        te2: ClipTextModel::from_diffusers(&folder, "text_encoder_2", DType::F32, ctx.device)?,
    };
    let tok1 = ClipTokenizer::from_folder(ctx.dir.join("sdxl/tokenizer"))?;
    let tok2 = ClipTokenizer::from_folder(ctx.dir.join("sdxl/tokenizer_2"))?;
    Ok((te, tok1, tok2))
}

/// kohya's `--max_token_length 150 / 225` (`tests/fixtures/extra/gen_long_captions.py`): captions
/// of 20, 75, 150 and 300 tokens cut into two or three CLIP windows by both tokenizers (the ids,
/// exactly), run through the tiny text encoders and joined: the context (75 n + 2 states) and the
/// first window's pooled embedding.
pub fn long_captions(ctx: &Ctx) -> Result<Vec<Row>> {
    caption_cases(ctx, "long_captions", false)
}

/// kohya's `--weighted_captions` (`tests/fixtures/extra/gen_weighted_captions.py`): captions with
/// A1111-style weights at 75, 150 and 225 tokens: both tokenizers' ids (exactly) and token
/// weights (exactly: float32 copies of the same products), the weighted context and the pooled
/// embedding.
pub fn weighted_captions(ctx: &Ctx) -> Result<Vec<Row>> {
    caption_cases(ctx, "weighted_captions", true)
}

/// The cases of `extra/<name>.safetensors`: each caption at its `max_token_length`, tokenized by
/// both tokenizers (with `weighted`, kohya's weighted way, whose weights are checked too) and
/// encoded by the tiny text encoders.
fn caption_cases(ctx: &Ctx, name: &'static str, weighted: bool) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference(&format!("../../extra/{name}.safetensors")))?;
    let mut chk = Checker::new(name);
    let (te, tok1, tok2) = tiny_text_side(ctx)?;
    for case in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{case}.{k}");
        let caption = f.meta_str(&key("caption"))?.to_string();
        let chunks = f.meta_f64(&key("max_token_length"))? as usize / 75;
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for (tok, i) in [(&tok1, 1), (&tok2, 2)] {
            let got = if weighted {
                let (got, w) =
                    crate::train::text::weighted_caption_ids(tok, &[&caption], chunks, ctx.device)?;
                let k = key(&format!("weights_{i}"));
                let want = f.tensor(&k)?;
                let same = want.dims() == w.dims() && want.to_vec_f32()? == w.to_vec_f32()?;
                chk.check_exact(&k, same, f64::from(u8::from(!same)));
                weights.push(w);
                got
            } else {
                token_ids(&tok.encode_chunked(&[&caption], chunks)?, ctx.device)?
            };
            // The reference's (n, 77) windows are our (1, 77 n) row.
            let k = key(&format!("ids_{i}"));
            let want = f.tensor(&k)?;
            let want = want.reshape((1, want.elem_count()))?;
            super::clip_cases::check_ids(&mut chk, &k, &got, &want)?;
            ids.push(got); // (1, 77 n)
        }
        let w = match weights.as_slice() {
            [w1, w2] => Some((w1.clone(), w2.clone())),
            _ => None,
        };
        let (context, pooled) =
            crate::autograd::no_grad(|| te.encode(&ids[0], &ids[1], w.as_ref()))?;
        for (n, t) in [("context", &context), ("pooled", &pooled)] {
            chk.check(&key(n), t, &f.tensor(&key(n))?, ctx.forward)?;
        }
    }
    Ok(chk.rows)
}
