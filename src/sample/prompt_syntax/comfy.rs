//! ComfyUI's prompt syntax (`comfy/sd1_clip.py`: `token_weights`, `SDTokenizer.
//! tokenize_with_weights`, `ClipTokenWeightEncoder.encode_token_weights`), as its CLIPTextEncode
//! node reads SDXL prompts:
//!
//! - `(text)` sets the weight of `text` to 1.1 times the enclosing weight; `(text:1.5)` sets it to
//!   1.5 (not times the enclosing one); `\(` and `\)` are literal brackets; a bracket left open
//!   is text, and so is everything after a `)` that closes nothing. Square brackets and `BREAK`
//!   are text.
//! - The text is cut into words at spaces and line breaks; a word is one token when the
//!   vocabulary has it whole (`word</w>`), else the tokenizer's tokens. `embedding:NAME` (or a
//!   word that is NAME) is a loaded textual-inversion embedding's vectors.
//! - Words fill chunks of 75 tokens; a word that does not fit in what is left of a chunk starts
//!   the next one (the rest padded), unless it has 8 tokens or more, which are split at the
//!   border. Each chunk is BOS, tokens, EOS and the tokenizer's pad (EOS for CLIP-L, `!` for
//!   OpenCLIP).
//! - When any token's weight is not 1, an empty prompt (BOS, EOS, pads) is encoded with the
//!   chunks, and each weighted token's state becomes `empty + (state - empty) * weight`, the
//!   empty prompt's state at the same position; the rest stay as encoded. The chunks are joined
//!   along the sequence, and the pooled embedding is the first chunk's.

use super::{Chunk, Fragment, CHUNK_TOKENS};
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::Result;

/// Stand-ins for escaped brackets while the brackets are parsed (ComfyUI's `\0\1`, `\0\2`).
const CLOSE: &str = "\u{0}\u{1}";
const OPEN: &str = "\u{0}\u{2}";

/// Words of this many tokens or more are split at a chunk border instead of moving whole.
const LONG_WORD: usize = 8;

/// The prefix that names an embedding in a prompt.
pub const EMBEDDING_PREFIX: &str = "embedding:";

/// ComfyUI's `parse_parentheses`: the top-level bracket groups of `s` and the text between them.
fn groups(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth: i64 = 0;
    for c in s.chars() {
        match c {
            '(' => {
                if depth == 0 {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    cur.push('(');
                } else {
                    cur.push(c);
                }
                depth += 1;
            }
            ')' => {
                depth -= 1;
                cur.push(')');
                if depth == 0 {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Python's `float(s)` for the weights ComfyUI reads: surrounding whitespace allowed.
fn py_float(s: &str) -> Option<f64> {
    s.trim().parse().ok()
}

fn token_weights(s: &str, weight: f64, out: &mut Vec<Fragment>) {
    for g in groups(s) {
        let bracketed = g.len() >= 2 && g.starts_with('(') && g.ends_with(')');
        if !bracketed {
            out.push(Fragment { text: g, weight });
            continue;
        }
        let mut inner = &g[1..g.len() - 1];
        let mut w = weight * 1.1;
        if let Some(at) = inner.rfind(':').filter(|&at| at > 0) {
            if let Some(v) = py_float(&inner[at + 1..]) {
                w = v;
                inner = &inner[..at];
            }
        }
        token_weights(inner, w, out);
    }
}

/// The prompt as runs of text and weight, ComfyUI's way (escaped brackets restored).
pub fn parse(prompt: &str) -> Vec<Fragment> {
    let escaped = prompt.replace("\\)", CLOSE).replace("\\(", OPEN);
    let mut out = Vec::new();
    token_weights(&escaped, 1.0, &mut out);
    for f in &mut out {
        f.text = f.text.replace(CLOSE, ")").replace(OPEN, "(");
    }
    out
}

/// A textual-inversion embedding a prompt may name: its name and run of added token ids.
pub struct NamedRun<'a> {
    pub name: &'a str,
    pub first: u32,
    pub vectors: usize,
}

/// The run of the embedding called `name` (a file name's extension ignored), if loaded.
fn find_run(runs: &[NamedRun], name: &str) -> Option<Vec<u32>> {
    let stem = [".safetensors", ".pt", ".bin"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .unwrap_or(name);
    runs.iter()
        .find(|r| r.name == name || r.name == stem)
        .map(|r| (r.first..r.first + r.vectors as u32).collect())
}

/// The tokens of one plain word: one when the vocabulary has it whole, else the tokenizer's; a
/// word that is a loaded embedding's name is its vectors (kstyle's addition: ComfyUI reads
/// embeddings only as `embedding:NAME`).
fn word_tokens(tok: &ClipTokenizer, word: &str, runs: &[NamedRun]) -> Result<Vec<u32>> {
    if let Some(ids) = find_run(runs, word) {
        return Ok(ids);
    }
    match tok.vocab_id(&format!("{word}</w>")) {
        Some(id) => Ok(vec![id]),
        None => tok.content_ids(word),
    }
}

/// ComfyUI's chunks of a parsed prompt for one tokenizer (at least one chunk). An
/// `embedding:NAME` that names no loaded embedding is added to `unknown` and left out, as
/// ComfyUI leaves it out with a warning (trailing commas are tried off the name and then read
/// as a word, as ComfyUI does).
pub fn chunks(
    tok: &ClipTokenizer,
    fragments: &[Fragment],
    runs: &[NamedRun],
    unknown: &mut Vec<String>,
) -> Result<Vec<Chunk>> {
    let (bos, eos, pad) = (tok.bos_id(), tok.eos_id(), tok.pad_id());
    let full = CHUNK_TOKENS + 2;
    let mut words: Vec<(Vec<u32>, f64)> = Vec::new();
    for f in fragments {
        for word in f
            .text
            .replace('\n', " ")
            .split(' ')
            .filter(|w| !w.is_empty())
        {
            let mut word = word;
            if let Some(name) = word.strip_prefix(EMBEDDING_PREFIX) {
                let stripped = name.trim_end_matches(',');
                match find_run(runs, name).or_else(|| find_run(runs, stripped)) {
                    Some(ids) => words.push((ids, f.weight)),
                    None if !unknown.iter().any(|u| u == name) => unknown.push(name.to_string()),
                    None => {}
                }
                let leftover = &name[stripped.len()..];
                if leftover.is_empty() || find_run(runs, name).is_some() {
                    continue;
                }
                word = leftover;
            }
            words.push((word_tokens(tok, word, runs)?, f.weight));
        }
    }
    let mut out: Vec<Chunk> = Vec::new();
    let mut ids = vec![bos];
    let mut mults = vec![1.0f64];
    let finish = |ids: &mut Vec<u32>, mults: &mut Vec<f64>, out: &mut Vec<Chunk>| {
        ids.push(eos);
        mults.push(1.0);
        ids.resize(full, pad);
        mults.resize(full, 1.0);
        out.push(Chunk {
            ids: std::mem::replace(ids, vec![bos]),
            multipliers: std::mem::replace(mults, vec![1.0])
                .into_iter()
                .map(|m| m as f32)
                .collect(),
        });
    };
    for (word, weight) in words {
        let long = word.len() >= LONG_WORD;
        let mut rest: &[u32] = &word;
        while !rest.is_empty() {
            if rest.len() + ids.len() > full - 1 {
                if long {
                    let room = full - 1 - ids.len();
                    ids.extend_from_slice(&rest[..room]);
                    mults.extend(std::iter::repeat_n(weight, room));
                    rest = &rest[room..];
                }
                finish(&mut ids, &mut mults, &mut out);
            } else {
                ids.extend_from_slice(rest);
                mults.extend(std::iter::repeat_n(weight, rest.len()));
                rest = &[];
            }
        }
    }
    finish(&mut ids, &mut mults, &mut out);
    Ok(out)
}

/// The empty prompt's chunk (BOS, EOS, pads): what weighted tokens are drawn from or towards.
pub fn empty_chunk(tok: &ClipTokenizer) -> Chunk {
    let mut ids = vec![tok.bos_id(), tok.eos_id()];
    ids.resize(CHUNK_TOKENS + 2, tok.pad_id());
    Chunk {
        ids,
        multipliers: vec![1.0; CHUNK_TOKENS + 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(p: &str) -> Vec<(String, f64)> {
        parse(p).into_iter().map(|f| (f.text, f.weight)).collect()
    }

    fn pairs(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|&(t, w)| (t.to_string(), w)).collect()
    }

    #[test]
    fn weights_nest_and_explicit_weights_replace() {
        assert_eq!(
            parsed("a (red:1.5) cat"),
            pairs(&[("a ", 1.0), ("red", 1.5), (" cat", 1.0)])
        );
        // An explicit weight replaces the enclosing one; a bare group multiplies by 1.1.
        assert_eq!(
            parsed("((red:1.5) cat)"),
            pairs(&[("red", 1.5), (" cat", 1.1)])
        );
        assert_eq!(parsed("((x))"), pairs(&[("x", 1.1 * 1.1)]));
        // A colon without a number is text of the group.
        assert_eq!(parsed("(a:b)"), pairs(&[("a:b", 1.1)]));
        assert_eq!(parsed("(a: 0.5 )"), pairs(&[("a", 0.5)]));
        // Escapes, an open bracket and square brackets are text.
        assert_eq!(parsed("\\(x\\) [y]"), pairs(&[("(x) [y]", 1.0)]));
        assert_eq!(parsed("(open"), pairs(&[("(open", 1.0)]));
        // After a `)` that closes nothing, brackets no longer group.
        assert_eq!(parsed("a) (b)"), pairs(&[("a) (b)", 1.0)]));
        assert_eq!(parsed(""), pairs(&[]));
    }
}
