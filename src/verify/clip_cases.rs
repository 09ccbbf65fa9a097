//! The CLIP cases: both SDXL tokenizers, both SDXL text encoders, and the `CLIPModel` metrics
//! (concept and image embeddings, CSS, CLIP score) from the fixture's own `clip/` folder.

use super::{Checker, Ctx, Row};
use crate::eval::metrics;
use crate::formats::diffusers::DiffusersFolder;
use crate::image::io::load_rgb;
use crate::models::clip::preprocess::ClipPreprocess;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::clip::{token_ids, ClipModel, ClipTextModel};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Error, Result, Tensor};
use serde_json::Value;

/// `NORM_EPS` of `F.normalize`, which made the unit-norm references.
const NORM_EPS: f64 = 1e-12;

/// One exact row for integer ids; the error column counts differing positions (a shape
/// mismatch counts every position of the larger tensor).
pub(super) fn check_ids(
    chk: &mut Checker,
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
) -> Result<()> {
    let (a, b) = (ours.to_vec_i64()?, reference.to_vec_i64()?);
    let mismatches = if ours.dims() == reference.dims() {
        a.iter().zip(&b).filter(|(x, y)| x != y).count()
    } else {
        a.len().max(b.len())
    };
    chk.check_exact(name, mismatches == 0, mismatches as f64);
    Ok(())
}

/// `reference/tokenizer_cases.json`: `{folder: [{prompt, ids}, ...]}` for tokenizer folders of
/// `DIR/sdxl/`. One row per prompt per tokenizer.
pub fn tokenizer(ctx: &Ctx) -> Result<Vec<Row>> {
    let path = ctx.reference("tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let bad = |msg: String| Error::file(&path, msg);
    let folders = json
        .as_object()
        .ok_or_else(|| bad("expected an object of tokenizer folders".into()))?;
    let mut chk = Checker::new("tokenizer");
    for (folder, cases) in folders {
        let tok = ClipTokenizer::from_folder(ctx.dir.join("sdxl").join(folder))?;
        let cases = cases
            .as_array()
            .ok_or_else(|| bad(format!("`{folder}` is not a list")))?;
        for (i, case) in cases.iter().enumerate() {
            let prompt = case.get("prompt").and_then(Value::as_str);
            let ids: Option<Vec<i64>> = case
                .get("ids")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_i64).collect());
            let (Some(prompt), Some(ids)) = (prompt, ids) else {
                return Err(bad(format!(
                    "`{folder}`[{i}] needs a prompt and integer ids"
                )));
            };
            let ours: Vec<i64> = tok.encode(prompt)?.into_iter().map(i64::from).collect();
            let mismatches = if ours.len() == ids.len() {
                ours.iter().zip(&ids).filter(|(a, b)| a != b).count()
            } else {
                ours.len().max(ids.len())
            };
            chk.check_exact(
                &format!("{folder}[{i}] {prompt:?}"),
                mismatches == 0,
                mismatches as f64,
            );
        }
    }
    Ok(chk.rows)
}

/// `reference/text_encoders.safetensors` against `DIR/sdxl`'s `text_encoder` and
/// `text_encoder_2`, fed the reference's own input ids.
pub fn text_encoders(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("text_encoders.safetensors"))?;
    let folder = DiffusersFolder::open(ctx.dir.join("sdxl"))?;
    let mut chk = Checker::new("text_encoders");
    let te1 = ClipTextModel::from_diffusers(&folder, "text_encoder", DType::F32, ctx.device)?;
    let te2 = ClipTextModel::from_diffusers(&folder, "text_encoder_2", DType::F32, ctx.device)?;
    let o1 = te1.forward(&f.tensor("te1.input_ids")?.to_device(ctx.device)?)?;
    let o2 = te2.forward(&f.tensor("te2.input_ids")?.to_device(ctx.device)?)?;
    let text_embeds = o2.text_embeds.as_ref().ok_or_else(|| {
        Error::Config("text_encoder_2 is not a CLIPTextModelWithProjection".into())
    })?;
    let prompt_embeds = Tensor::cat(&[o1.penultimate().clone(), o2.penultimate().clone()], 2)?; // (B, S, D1 + D2)
    let outputs = [
        ("te1.penultimate", o1.penultimate()),
        ("te1.last", &o1.last_hidden_state),
        ("te2.penultimate", o2.penultimate()),
        ("te2.text_embeds", text_embeds),
        ("prompt_embeds", &prompt_embeds),
    ];
    for (name, ours) in outputs {
        chk.check(name, ours, &f.tensor(name)?, ctx.forward)?;
    }
    Ok(chk.rows)
}

/// `reference/clip.safetensors` against `DIR/clip`: the concepts of the metadata through the
/// folder's tokenizer and text tower, the images it names through the preprocessing and the
/// vision tower, then CSS and CLIP score from our own embeddings.
pub fn clip(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("clip.safetensors"))?;
    let dir = ctx.dir.join("clip");
    let mut chk = Checker::new("clip");
    let concepts: Vec<String> = serde_json::from_str(f.meta_str("concepts")?).map_err(|e| {
        Error::file(
            f.path(),
            format!("metadata `concepts` is not a JSON list: {e}"),
        )
    })?;
    let images: Vec<&str> = f.meta_str("images")?.split(',').map(str::trim).collect();
    let tok = ClipTokenizer::from_folder(&dir)?;
    let model = ClipModel::from_folder(&dir, DType::F32, ctx.device)?;
    let pre = ClipPreprocess::from_config(dir.join("preprocessor_config.json"))?;

    let ids = token_ids(&tok.encode_batch(&concepts)?, ctx.device)?; // (C, S)
    check_ids(&mut chk, "concept_ids", &ids, &f.tensor("concept_ids")?)?;
    let concept_embeds = model.get_text_features(&ids)?.normalize_l2(1, NORM_EPS)?; // (C, P)
    chk.check(
        "concept_embeds",
        &concept_embeds,
        &f.tensor("concept_embeds")?,
        ctx.forward,
    )?;

    let rgb = images
        .iter()
        .map(|n| load_rgb(ctx.reference(n)))
        .collect::<Result<Vec<_>>>()?;
    let shape = (rgb.len(), 3, pre.crop_h, pre.crop_w);
    let pixels = Tensor::from_vec(pre.apply_batch(&rgb)?, shape, ctx.device)?; // (N, 3, H, W)
    chk.check(
        "pixel_values",
        &pixels,
        &f.tensor("pixel_values")?,
        ctx.forward,
    )?;
    let image_embeds = model
        .get_image_features(&pixels)?
        .normalize_l2(1, NORM_EPS)?; // (N, P)
    chk.check(
        "image_embeds",
        &image_embeds,
        &f.tensor("image_embeds")?,
        ctx.forward,
    )?;
    let per_image = metrics::css_per_image(&image_embeds, &concept_embeds)?; // (N)
    chk.check(
        "css_per_image",
        &per_image,
        &f.tensor("css_per_image")?,
        ctx.forward,
    )?;
    let css = metrics::css(&image_embeds, &concept_embeds)?; // ()
    chk.check("css", &css, &f.tensor("css")?, ctx.forward)?;

    // The prompt ids are an input of the file; when the pipeline case says which prompt made
    // them, our tokenizer must reproduce them too.
    let prompt_ids = f.tensor("prompt_ids")?.to_device(ctx.device)?; // (N, S)
    let pipe = ctx.reference("pipeline.safetensors");
    if pipe.exists() {
        let pf = SafeTensorsFile::open(&pipe)?;
        let prompt = pf.meta_str("prompt")?;
        let (n, _) = prompt_ids.dims2()?;
        let ours = token_ids(&tok.encode_batch(&vec![prompt; n])?, ctx.device)?;
        check_ids(&mut chk, "prompt_ids", &ours, &prompt_ids)?;
    }
    let text = model.get_text_features(&prompt_ids)?; // (N, P)
    let score = metrics::clip_score_per_image(&image_embeds, &text)?; // (N)
    chk.check(
        "clip_score_per_image",
        &score,
        &f.tensor("clip_score_per_image")?,
        ctx.forward,
    )?;
    Ok(chk.rows)
}
