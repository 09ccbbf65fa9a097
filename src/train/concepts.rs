//! Cultural concepts: a list of short phrases (a default Korean set ships with the project) and
//! their unit CLIP text embeddings T (K, E), computed once with the shared frozen CLIP.

use crate::models::clip::model::ClipModel;
use crate::models::clip::text::token_ids;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::{DType, Device, Error, Result, Tensor};
use std::path::Path;

const DEFAULT_CONCEPTS: &str = include_str!("../../assets/concepts_korean.txt");

/// Phrases of a concepts text: one a line, `#` comments and blank lines skipped.
pub fn parse_concepts(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

pub fn default_concepts() -> Vec<String> {
    parse_concepts(DEFAULT_CONCEPTS)
}

pub fn load_concepts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let c = parse_concepts(&text);
    if c.is_empty() {
        return Err(Error::file(path, "no concepts (one phrase a line)"));
    }
    Ok(c)
}

/// `normalize(clip.get_text_features(tokens(concepts)))` with a CLIP folder (HF layout).
pub fn embed_concepts(clip_dir: &Path, concepts: &[String], device: Device) -> Result<Tensor> {
    let clip = ClipModel::from_folder(clip_dir, DType::F32, device)?;
    let tok = ClipTokenizer::from_folder(clip_dir)?;
    let ids = token_ids(&tok.encode_batch(concepts)?, device)?; // (K, 77)
    crate::autograd::no_grad(|| clip.get_text_features(&ids)?.normalize_l2(1, 1e-12))
    // (K, E)
}
