//! CLIP BPE tokenizer: a thin layer over the `tokenizers` crate that turns prompts into the fixed
//! `[BOS, tokens.., EOS, pad..]` rows (77 ids) the CLIP text encoders read.
//!
//! The BPE itself (NFC + whitespace collapse + lowercase, the CLIP split regex, byte-level
//! mapping, merges) comes from the folder's `tokenizer.json`. Truncation and padding are done
//! here rather than by the crate's post-processor settings because the pad token is a property of
//! the *folder* (SDXL `tokenizer/` pads with `<|endoftext|>` = 49407, `tokenizer_2/` with `!` = 0,
//! SDXL.md 2.3) and lives in `tokenizer_config.json` / `special_tokens_map.json`, not always in
//! `tokenizer.json`. The result is what HF `CLIPTokenizerFast(text, truncation=True,
//! padding="max_length", max_length=77)` returns: BOS, the first 75 content tokens, EOS, pads. A
//! test checks this against the crate's own truncation + padding path.
//!
//! Known divergence kept on purpose (diffusers parity, SDXL.md 2.3): when `!` is the pad token
//! it is a registered special token, so a literal `!` in a prompt encodes to id 0 instead of the
//! BPE id 256 that open_clip would give.

use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// CLIP's context length; used when a folder does not state `model_max_length` (or states HF's
/// "unset" sentinel, `int(1e30)`).
pub const CLIP_CONTEXT_LEN: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// Token ids of a batch of prompts, row-major `(B, S)` with `S = seq_len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    /// Per row, the position the text encoder pools at (first EOS, see [`eos_position`]).
    pub eos_positions: Vec<usize>,
}

impl TokenBatch {
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.seq_len..(i + 1) * self.seq_len]
    }
}

/// Position the HF CLIP text model pools at (`CLIPTextTransformer.forward`), given the
/// `eos_token_id` of the *text model's config*:
/// - `2` (legacy configs with placeholder ids): `argmax(input_ids)`, i.e. the first position of
///   the largest id. For CLIP ids that is the first 49407, because EOS is the largest id.
/// - otherwise: the first position where `id == eos_token_id`.
///
/// The two agree on every row this tokenizer produces, including SDXL's `tokenizer/` whose pad
/// is also 49407: only the *first* EOS is the real one, the rest are padding, so "first" is what
/// matters (a last-occurrence rule would pool at position 76). A literal `<|endoftext|>` typed in
/// a prompt becomes an early EOS and HF pools there too. Returns `None` where HF would silently
/// pool at position 0 (no EOS in the row), so the caller can raise an error instead.
pub fn eos_position(ids: &[u32], config_eos_token_id: u32) -> Option<usize> {
    if config_eos_token_id == 2 {
        let max = *ids.iter().max()?;
        ids.iter().position(|&v| v == max)
    } else {
        ids.iter().position(|&v| v == config_eos_token_id)
    }
}

/// A CLIP tokenizer loaded from a Hugging Face tokenizer folder.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    folder: PathBuf,
    /// Textual-inversion tokens added with [`ClipTokenizer::add_tokens`], in order.
    added: Vec<String>,
    max_len: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("folder", &self.folder)
            .field("max_len", &self.max_len)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, or builds the same tokenizer from `vocab.json` +
    /// `merges.txt` when there is no `tokenizer.json`; reads the special tokens and
    /// `model_max_length` from `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
        // tokenizer_config.json first, then special_tokens_map.json: both are written by
        // `save_pretrained` and agree in every hub folder seen; the former is the newer format.
        let special = |key: &str| {
            [&config, &special_map]
                .iter()
                .find_map(|j| j.as_ref().and_then(|j| token_str(j.get(key)?)))
        };
        let bos = special("bos_token").unwrap_or_else(|| DEFAULT_BOS.to_string());
        let eos = special("eos_token").unwrap_or_else(|| DEFAULT_EOS.to_string());
        // HF CLIPTokenizer's default pad token is "<|endoftext|>".
        let pad = special("pad_token").unwrap_or_else(|| DEFAULT_EOS.to_string());

        let json_path = dir.join("tokenizer.json");
        let mut inner = if json_path.is_file() {
            tokenizers::Tokenizer::from_file(&json_path).map_err(|e| Error::Tokenizer {
                what: json_path.display().to_string(),
                msg: e.to_string(),
            })?
        } else if dir.join("vocab.json").is_file() {
            let built = build_from_vocab_merges(dir, &[&bos, &eos, &pad])?;
            tokenizers::Tokenizer::from_str(&built.to_string()).map_err(|e| Error::Tokenizer {
                what: dir.display().to_string(),
                msg: e.to_string(),
            })?
        } else {
            return Err(Error::file(
                dir,
                "no tokenizer.json and no vocab.json + merges.txt in this folder",
            ));
        };

        // A saved fast tokenizer may carry its own truncation/padding (SDXL's tokenizer_2 does:
        // Fixed(77) with pad 0); those would pad the content ids before we add BOS/EOS.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Tokenizer {
            what: dir.display().to_string(),
            msg: e.to_string(),
        })?;

        let max_len = match config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_f64)
        {
            Some(n) if (2.0..=1e6).contains(&n) => n as usize,
            Some(n) if n > 1e6 => CLIP_CONTEXT_LEN,
            Some(n) => {
                return Err(Error::file(
                    dir.join("tokenizer_config.json"),
                    format!("model_max_length {n} < 2"),
                ));
            }
            None => CLIP_CONTEXT_LEN,
        };
        let id = |tok: &str, role: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                Error::file(
                    dir,
                    format!("{role} token {tok:?} is not in the vocabulary"),
                )
            })
        };
        Ok(Self {
            bos_id: id(&bos, "bos")?,
            eos_id: id(&eos, "eos")?,
            pad_id: id(&pad, "pad")?,
            inner,
            folder: dir.to_path_buf(),
            added: Vec::new(),
            max_len,
        })
    }

    /// Adds textual-inversion tokens as transformers' `add_tokens` does (not special, matched
    /// in the normalised text, so case-blind for CLIP) and returns their ids, which follow the
    /// vocabulary and the tokens added before. A token the vocabulary already has is refused,
    /// as diffusers' `load_textual_inversion` refuses it.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        for t in tokens {
            if self.inner.token_to_id(t).is_some() {
                return Err(Error::file(
                    &self.folder,
                    format!(
                        "token {t:?} is already in this tokenizer's vocabulary: name the \
                         embedding otherwise (FILE:NAME)"
                    ),
                ));
            }
        }
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.clone(), false))
            .collect();
        self.inner.add_tokens(&added);
        self.added.extend(tokens.iter().cloned());
        tokens
            .iter()
            .map(|t| {
                self.inner.token_to_id(t).ok_or_else(|| Error::Tokenizer {
                    what: self.folder.display().to_string(),
                    msg: format!("added token {t:?} has no id"),
                })
            })
            .collect()
    }

    /// `prompt` as diffusers' `maybe_convert_prompt` spells it: every added token the tokenized
    /// prompt holds, when `TOKEN_1`, `TOKEN_2`, ... are added tokens too (a multi-vector
    /// embedding), is replaced everywhere in the text by "TOKEN TOKEN_1 TOKEN_2 ...". The
    /// replacement is textual and case-sensitive while the match is not, as in diffusers: a
    /// differently-cased mention keeps one vector.
    pub fn expand_added_tokens(&self, prompt: &str) -> Result<String> {
        if self.added.is_empty() {
            return Ok(prompt.to_string());
        }
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| self.err("encode", e))?;
        let mut found: Vec<&str> = Vec::new();
        for t in enc.get_tokens() {
            if let Some(a) = self.added.iter().find(|a| *a == t) {
                if !found.contains(&a.as_str()) {
                    found.push(a);
                }
            }
        }
        let mut out = prompt.to_string();
        for t in found {
            let mut replacement = t.to_string();
            for i in 1.. {
                let next = format!("{t}_{i}");
                if !self.added.contains(&next) {
                    break;
                }
                replacement.push(' ');
                replacement.push_str(&next);
            }
            out = out.replace(t, &replacement);
        }
        Ok(out)
    }

    /// Ids per row after padding (77 for every CLIP folder).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of one vocabulary entry (e.g. `",</w>"`), or an added token's.
    pub fn vocab_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The added-token runs of the textual-inversion embeddings `names`: (the name's id, the
    /// vectors: the name and its `NAME_1`, `NAME_2`, ... tokens, added in one go).
    pub fn embedding_runs(&self, names: &[String]) -> Vec<(u32, usize)> {
        names
            .iter()
            .filter_map(|name| {
                let first = self.inner.token_to_id(name)?;
                let more = (1..)
                    .take_while(|i| self.added.contains(&format!("{name}_{i}")))
                    .count();
                Some((first, 1 + more))
            })
            .collect()
    }

    /// Content ids of one prompt: no BOS/EOS, no truncation.
    pub fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| self.err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many content tokens of `prompt` fall off the end (for a "prompt truncated" warning).
    pub fn overflow(&self, prompt: &str) -> Result<usize> {
        Ok(self
            .content_ids(prompt)?
            .len()
            .saturating_sub(self.max_len - 2))
    }

    /// The text of the content tokens that fall off the end of `prompt`, as diffusers prints it
    /// in its "truncated" warning (HF's `CLIPTokenizerFast.decode`: the folder's decoder, then
    /// every end-of-word `</w>` read as a space, trimmed); None when the prompt fits.
    pub fn cut_off(&self, prompt: &str) -> Result<Option<String>> {
        self.cut_off_at(prompt, self.max_len - 2)
    }

    /// One prompt as exactly `max_len` ids.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.encode_batch(&[prompt])?.ids)
    }

    /// A batch of prompts as `(B, max_len)` ids: BOS, the first `max_len - 2` content tokens,
    /// EOS, then the folder's pad id.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenBatch> {
        let inputs: Vec<&str> = prompts.iter().map(|p| p.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| self.err("encode_batch", e))?;
        let s = self.max_len;
        let mut ids = Vec::with_capacity(encs.len() * s);
        let mut eos_positions = Vec::with_capacity(encs.len());
        for enc in &encs {
            let content = enc.get_ids();
            let kept = &content[..content.len().min(s - 2)];
            let start = ids.len();
            ids.push(self.bos_id);
            ids.extend_from_slice(kept);
            ids.push(self.eos_id);
            ids.resize(start + s, self.pad_id);
            eos_positions.push(self.first_eos(&ids[start..])?);
        }
        Ok(TokenBatch {
            ids,
            batch: encs.len(),
            seq_len: s,
            eos_positions,
        })
    }

    /// A batch of prompts as `(B, chunks · max_len)` ids for kohya's `--max_token_length`
    /// (`chunks` = 2 for 150 tokens, 3 for 225): each prompt is tokenized to `chunks ·
    /// (max_len - 2) + 2` ids (BOS, content, EOS, pads, truncated as HF does) and cut into
    /// `chunks` windows of `max_len`, each BOS, its `max_len - 2` ids, and the last id, as
    /// sd-scripts' `TokenizeStrategy._get_input_ids`. Where the pad is not EOS (SDXL's
    /// `tokenizer_2`), a window whose content runs to its end ends in EOS, and one that starts
    /// in the padding starts BOS EOS, so every window has an EOS to pool at. One chunk is
    /// [`ClipTokenizer::encode_batch`]. `eos_positions` are the first window's.
    pub fn encode_chunked<S: AsRef<str>>(
        &self,
        prompts: &[S],
        chunks: usize,
    ) -> Result<TokenBatch> {
        if chunks <= 1 {
            return self.encode_batch(prompts);
        }
        let inputs: Vec<&str> = prompts.iter().map(|p| p.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| self.err("encode_batch", e))?;
        let contents: Vec<Vec<u32>> = encs.iter().map(|e| e.get_ids().to_vec()).collect();
        self.windows(&contents, chunks)
    }

    /// Content ids (no BOS/EOS; each prompt's, however long) in `chunks` windows of `max_len`
    /// per prompt, cut and fixed as [`ClipTokenizer::encode_chunked`] cuts them (one window:
    /// as [`ClipTokenizer::encode_batch`] pads it).
    pub fn windows(&self, contents: &[Vec<u32>], chunks: usize) -> Result<TokenBatch> {
        let w = self.max_len;
        let chunks = chunks.max(1);
        let len = chunks * (w - 2) + 2;
        let mut ids = Vec::with_capacity(contents.len() * chunks * w);
        let mut eos_positions = Vec::with_capacity(contents.len());
        for content in contents {
            let mut long = Vec::with_capacity(len);
            long.push(self.bos_id);
            long.extend_from_slice(&content[..content.len().min(len - 2)]);
            long.push(self.eos_id);
            long.resize(len, self.pad_id);
            for c in 0..chunks {
                let start = ids.len();
                ids.push(long[0]);
                ids.extend_from_slice(&long[1 + c * (w - 2)..1 + (c + 1) * (w - 2)]);
                ids.push(long[len - 1]);
                if self.pad_id != self.eos_id {
                    let row = &mut ids[start..];
                    if row[w - 2] != self.eos_id && row[w - 2] != self.pad_id {
                        row[w - 1] = self.eos_id;
                    }
                    if row[1] == self.pad_id {
                        row[1] = self.eos_id;
                    }
                }
                if c == 0 {
                    eos_positions.push(self.first_eos(&ids[start..])?);
                }
            }
        }
        Ok(TokenBatch {
            ids,
            batch: contents.len(),
            seq_len: chunks * w,
            eos_positions,
        })
    }

    /// The text of the content tokens past the first `tokens` of `prompt` (as
    /// [`ClipTokenizer::cut_off`] for a longer window); None when the prompt fits.
    pub fn cut_off_at(&self, prompt: &str, tokens: usize) -> Result<Option<String>> {
        let ids = self.content_ids(prompt)?;
        let Some(tail) = ids.get(tokens..).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let text = self
            .inner
            .decode(tail, false)
            .map_err(|e| self.err("decode", e))?;
        Ok(Some(text.replace("</w>", " ").trim().to_string()))
    }

    /// Where the text encoder pools a row this tokenizer made ([`eos_position`]).
    fn first_eos(&self, row: &[u32]) -> Result<usize> {
        eos_position(row, self.eos_id).ok_or_else(|| Error::Tokenizer {
            what: self.folder.display().to_string(),
            msg: "no EOS".into(),
        })
    }

    fn err(&self, op: &str, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            what: format!("{} ({op})", self.folder.display()),
            msg: e.to_string(),
        }
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// A special token is stored either as a plain string or, in older files, as a serialised
/// `AddedToken` object `{"content": "...", ...}`.
fn token_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The CLIP split regex of SDXL.md 8.2, with the two special-token literals in front so they are
/// never broken up.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Number of merges HF's slow `CLIPTokenizer` reads from `merges.txt`: lines `[1, 49152-256-2+1)`
/// (TRF `tokenization_clip.py`); OpenAI's own merges file has far more lines than the vocab uses.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// The `tokenizer.json` that transformers' `CLIPConverter` writes for a slow folder
/// (SDXL.md 8.5), as JSON, so that both load paths go through the same deserialiser.
fn build_from_vocab_merges(dir: &Path, specials: &[&str]) -> Result<Value> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab = read_json_opt(&vocab_path)?.ok_or_else(|| Error::file(&vocab_path, "missing"))?;
    let vocab_map = vocab
        .as_object()
        .ok_or_else(|| Error::file(&vocab_path, "expected a JSON object"))?;
    let merges_text =
        std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
    let merges: Vec<Value> = merges_text
        .lines()
        .skip(1) // "#version: 0.2"
        .filter(|l| !l.trim().is_empty())
        .take(CLIP_MERGES)
        .map(|l| Value::String(l.to_string()))
        .collect();

    let mut added = Vec::new();
    let mut seen = Vec::new();
    for &tok in specials {
        if seen.contains(&tok) {
            continue;
        }
        seen.push(tok);
        let id = vocab_map
            .get(tok)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::file(&vocab_path, format!("special token {tok:?} missing")))?;
        added.push(
            serde_json::json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let (bos, eos) = (specials[0], specials[1]);
    let id_of = |t: &str| vocab_map.get(t).and_then(Value::as_u64).unwrap_or(0);
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_REGEX}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, id_of(eos)], "cls": [bos, id_of(bos)],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": eos, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{read_i64, tiny, TempDir};

    const BOS: u32 = 49406;
    const EOS: u32 = 49407;

    fn folder(sub: &str) -> PathBuf {
        tiny().join(sub)
    }

    fn cases(sub: &str) -> Vec<(String, Vec<u32>)> {
        let j: Value = serde_json::from_str(
            &std::fs::read_to_string(tiny().join("reference/tokenizer_cases.json")).unwrap(),
        )
        .unwrap();
        j[sub]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let ids = r["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                (r["prompt"].as_str().unwrap().to_string(), ids)
            })
            .collect()
    }

    #[test]
    fn sdxl_tokenizers_reproduce_reference_cases() {
        for (sub, pad) in [("tokenizer", EOS), ("tokenizer_2", 0)] {
            let tok = ClipTokenizer::from_folder(folder(&format!("sdxl/{sub}"))).unwrap();
            assert_eq!(
                (tok.max_len(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
                (77, BOS, EOS, pad),
                "{sub}"
            );
            let cases = cases(sub);
            let prompts: Vec<&str> = cases.iter().map(|(p, _)| p.as_str()).collect();
            let batch = tok.encode_batch(&prompts).unwrap();
            assert_eq!((batch.batch, batch.seq_len), (prompts.len(), 77));
            for (i, (p, ids)) in cases.iter().enumerate() {
                assert_eq!(batch.row(i), ids.as_slice(), "{sub} {p:?}");
                assert_eq!(tok.encode(p).unwrap(), *ids, "{sub} {p:?} alone");
                let first_eos = ids.iter().position(|&v| v == EOS).unwrap();
                assert_eq!(batch.eos_positions[i], first_eos, "{sub} {p:?}");
            }
        }
    }

    #[test]
    fn sdxl_tokenizers_match_text_encoder_inputs() {
        let path = tiny().join("reference/text_encoders.safetensors");
        let prompts = cases("tokenizer")
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>();
        for (sub, key) in [
            ("tokenizer", "te1.input_ids"),
            ("tokenizer_2", "te2.input_ids"),
        ] {
            let (want, shape) = read_i64(&path, key);
            assert_eq!(shape, vec![prompts.len(), 77]);
            let got = ClipTokenizer::from_folder(folder(&format!("sdxl/{sub}")))
                .unwrap()
                .encode_batch(&prompts)
                .unwrap();
            assert_eq!(
                got.ids.iter().map(|&v| v as i64).collect::<Vec<_>>(),
                want,
                "{sub}"
            );
        }
    }

    #[test]
    fn clip_folder_reproduces_concept_and_prompt_ids() {
        let tok = ClipTokenizer::from_folder(folder("clip")).unwrap();
        assert_eq!(tok.pad_id(), EOS); // its tokenizer_config says pad_token "<|endoftext|>"
        let path = tiny().join("reference/clip.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let concepts: Vec<String> =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["concepts"]).unwrap();
        let (want, _) = read_i64(&path, "concept_ids");
        let got = tok.encode_batch(&concepts).unwrap();
        assert_eq!(got.ids.iter().map(|&v| v as i64).collect::<Vec<_>>(), want);

        let pipe_meta = std::fs::read(tiny().join("reference/pipeline.safetensors")).unwrap();
        let (_, pm) = safetensors::SafeTensors::read_metadata(&pipe_meta).unwrap();
        let prompt = pm.metadata().as_ref().unwrap()["prompt"].clone();
        let (want, shape) = read_i64(&path, "prompt_ids");
        assert_eq!(shape, vec![2, 77]);
        let got = tok
            .encode_batch(&[prompt.as_str(), prompt.as_str()])
            .unwrap();
        assert_eq!(got.ids.iter().map(|&v| v as i64).collect::<Vec<_>>(), want);
    }

    #[test]
    fn long_prompts_keep_bos_first_75_eos_like_hf() {
        let j: Value =
            serde_json::from_str(include_str!("../../../tests/data/hf_long_prompts.json")).unwrap();
        let prompts: Vec<&str> = j["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        for sub in ["sdxl/tokenizer", "sdxl/tokenizer_2", "clip"] {
            let tok = ClipTokenizer::from_folder(folder(sub)).unwrap();
            let batch = tok.encode_batch(&prompts).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let want: Vec<u32> = j["ids"][sub][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                let row = batch.row(i);
                assert_eq!(row, want.as_slice(), "{sub} prompt {i}");
                let content = tok.content_ids(p).unwrap();
                assert!(content.len() > 75, "the test prompt must overflow");
                assert_eq!((row[0], row[76], batch.eos_positions[i]), (BOS, EOS, 76));
                assert_eq!(&row[1..76], &content[..75]);
                assert_eq!(tok.overflow(p).unwrap(), content.len() - 75);
                // The dropped text as diffusers' warning prints it (HF's decode of those ids).
                let cut = tok.cut_off(p).unwrap().expect("an overflowing prompt");
                assert_eq!(cut, j["cut"][sub][i].as_str().unwrap(), "{sub} prompt {i}");
            }
            assert_eq!(tok.cut_off("a short prompt").unwrap(), None);
        }
    }

    #[test]
    fn manual_truncation_equals_the_crates_own_pipeline() {
        // The crate's post-processor (RobertaProcessing) with truncation + fixed padding is what
        // HF's fast tokenizer runs; our manual BOS/EOS/pad must agree with it on every prompt.
        let mut prompts: Vec<String> = cases("tokenizer").into_iter().map(|(p, _)| p).collect();
        prompts.push("hello! <|endoftext|> world".into());
        prompts.push("x ".repeat(74).trim_end().to_string()); // exactly 75 content tokens
        prompts.push("x ".repeat(76));
        prompts.push("Ünïcödé   spaces\tand\nnewlines 123 I'm don't".into());
        for sub in ["sdxl/tokenizer", "sdxl/tokenizer_2"] {
            let tok = ClipTokenizer::from_folder(folder(sub)).unwrap();
            let mut inner = tok.inner().clone();
            inner
                .with_truncation(Some(tokenizers::TruncationParams {
                    max_length: 77,
                    ..Default::default()
                }))
                .unwrap();
            inner.with_padding(Some(tokenizers::PaddingParams {
                strategy: tokenizers::PaddingStrategy::Fixed(77),
                pad_id: tok.pad_id(),
                ..Default::default()
            }));
            let batch = tok.encode_batch(&prompts).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let theirs = inner.encode(p.as_str(), true).unwrap();
                assert_eq!(batch.row(i), theirs.get_ids(), "{sub} {p:?}");
            }
        }
    }

    #[test]
    fn spec_test_vectors_and_bang_divergence() {
        let t1 = ClipTokenizer::from_folder(folder("sdxl/tokenizer")).unwrap();
        let t2 = ClipTokenizer::from_folder(folder("sdxl/tokenizer_2")).unwrap();
        let head = |t: &ClipTokenizer, p: &str| t.content_ids(p).unwrap();
        // SDXL.md 8.4
        assert_eq!(head(&t1, "a photo of a cat"), [320, 1125, 539, 320, 2368]);
        assert_eq!(
            head(&t1, "A photo of a dog."),
            [320, 1125, 539, 320, 1929, 269]
        );
        assert_eq!(head(&t1, "hello world"), [3306, 1002]);
        assert_eq!(head(&t1, "I'm don't"), [328, 880, 847, 713]);
        assert_eq!(head(&t1, "! !! !!!"), [256, 748, 995]);
        // tokenizer_2 registers "!" as its pad (special) token: each "!" becomes id 0.
        assert_eq!(head(&t2, "! !! !!!"), [0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn eos_position_rules() {
        let mut row = vec![BOS, 320, 1125, EOS];
        row.resize(77, EOS);
        assert_eq!(eos_position(&row, EOS), Some(3));
        assert_eq!(eos_position(&row, 2), Some(3)); // legacy argmax: first maximal value
        let mut row2 = vec![BOS, 320, EOS];
        row2.resize(77, 0);
        assert_eq!(
            (eos_position(&row2, EOS), eos_position(&row2, 2)),
            (Some(2), Some(2))
        );
        assert_eq!(eos_position(&[BOS, 5, 6], EOS), None);
        assert_eq!(eos_position(&[], 2), None);
        // A typed "<|endoftext|>" is an early EOS; HF pools there as well.
        let tok = ClipTokenizer::from_folder(folder("sdxl/tokenizer_2")).unwrap();
        let b = tok.encode_batch(&["a <|endoftext|> b"]).unwrap();
        assert_eq!(
            (b.row(0)[..5].to_vec(), b.eos_positions[0]),
            (vec![BOS, 320, EOS, 321, EOS], 2)
        );
    }

    #[test]
    fn builds_from_vocab_and_merges_without_tokenizer_json() {
        for sub in ["tokenizer", "tokenizer_2"] {
            let src = folder(&format!("sdxl/{sub}"));
            let dir = TempDir::new("vocab_merges");
            let tj: Value =
                serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
                    .unwrap();
            std::fs::write(
                dir.path().join("vocab.json"),
                tj["model"]["vocab"].to_string(),
            )
            .unwrap();
            let mut merges = String::from("#version: 0.2\n");
            for m in tj["model"]["merges"].as_array().unwrap() {
                match m {
                    Value::String(s) => merges.push_str(s),
                    Value::Array(pair) => merges.push_str(&format!(
                        "{} {}",
                        pair[0].as_str().unwrap(),
                        pair[1].as_str().unwrap()
                    )),
                    other => panic!("merge {other}"),
                }
                merges.push('\n');
            }
            std::fs::write(dir.path().join("merges.txt"), merges).unwrap();
            // Special tokens from special_tokens_map.json this time (object form, as old files do).
            let pad = if sub == "tokenizer" {
                "<|endoftext|>"
            } else {
                "!"
            };
            let map = serde_json::json!({"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": {"content": pad, "lstrip": false}});
            std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();

            let built = ClipTokenizer::from_folder(dir.path()).unwrap();
            let reference = ClipTokenizer::from_folder(&src).unwrap();
            assert_eq!(built.max_len(), 77); // no tokenizer_config.json: CLIP's default
            let mut prompts: Vec<String> = cases(sub).into_iter().map(|(p, _)| p).collect();
            prompts.push("Ünïcödé   spaces\tand\nnewlines 123 I'm don't ! !! !!!".into());
            prompts
                .push("an astronaut riding a green horse, 4k, trending on artstation ".repeat(8));
            assert_eq!(
                built.encode_batch(&prompts).unwrap(),
                reference.encode_batch(&prompts).unwrap(),
                "{sub}"
            );
        }
    }

    #[test]
    fn folder_errors_name_the_folder() {
        let dir = TempDir::new("tok_err");
        let e = ClipTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(
            matches!(e, Error::File { .. }) && e.to_string().contains("textimage-tok_err"),
            "{e}"
        );

        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
        let e = ClipTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(
            matches!(e, Error::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"),
            "{e}"
        );

        std::fs::copy(
            folder("sdxl/tokenizer/tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"pad_token": "<|nope|>"}"#,
        )
        .unwrap();
        let e = ClipTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(e.to_string().contains("<|nope|>"), "{e}");

        std::fs::write(dir.path().join("tokenizer_config.json"), "[1,").unwrap();
        let e = ClipTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e}");

        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 1e30}"#,
        )
        .unwrap();
        assert_eq!(
            ClipTokenizer::from_folder(dir.path()).unwrap().max_len(),
            77
        );
    }
}
