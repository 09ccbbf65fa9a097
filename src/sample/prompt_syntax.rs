//! A1111's prompt syntax (stable-diffusion-webui 1.10: `modules/prompt_parser.py`'s
//! `parse_prompt_attention`, `modules/sd_hijack_clip.py`'s chunking and `modules/sd_emphasis.py`):
//! emphasis weights, `BREAK`, and prompts of any length encoded in chunks of 75 tokens.
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1, `(text:1.5)` by 1.5;
//!   they nest; brackets left open at the end apply as if closed there; `\(`, `\)`, `\[`, `\]`,
//!   `\\` are literal characters (a lone backslash is dropped); an unmatched `)` or `]` is text.
//! - Each run of equal weight is tokenized on its own (no BOS/EOS), and the tokens fill chunks
//!   of 75. When a chunk is full and a comma lies within the last `comma_backtrack` tokens
//!   (A1111's "prompt word wrap length limit", 20 by default; 0 is off), the tokens after the
//!   comma move to the next chunk. `BREAK` (the word, in capitals) closes the chunk. A
//!   textual-inversion embedding never straddles two chunks.
//! - Each chunk is BOS, its 75 tokens padded with EOS, EOS; where a tokenizer's pad is not EOS
//!   (SDXL's OpenCLIP tokenizer), every id after the first EOS becomes the pad.
//! - Each chunk runs through the text encoder on its own; the per-token states are multiplied by
//!   the weights and, with [`Emphasis::Original`], rescaled so that their mean over the chunk is
//!   what it was. The chunks' states are joined along the sequence (77 per chunk), and the
//!   pooled embedding is the first chunk's.
//!
//! Prompt editing (`[a:b:0.5]`, `[a|b]`) and composable prompts (`AND`), which change the text
//! between steps or add texts, are read first, by [`editing`]; what this module reads is one
//! step's text of one part.

use crate::models::clip::tokenizer::ClipTokenizer;
use crate::{Error, Result};

pub mod comfy;
pub mod editing;

/// Tokens of prompt text per chunk (77 with BOS and EOS).
pub const CHUNK_TOKENS: usize = 75;

/// A1111's default "prompt word wrap length limit".
pub const DEFAULT_COMMA_BACKTRACK: usize = 20;

/// How the weights of `(text:1.2)` reach the text encoder's output (A1111's "Emphasis mode").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emphasis {
    /// The states times the weights, rescaled to the chunk's original mean (A1111's default).
    Original,
    /// The states times the weights (A1111's "No norm").
    NoNorm,
    /// Brackets and weights are parsed away, the weights are not applied.
    Ignore,
    /// No parsing: brackets are text (chunking and `BREAK`-free).
    None,
}

/// How prompts become text-encoder input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptStyle {
    /// diffusers' pipelines: the text as written, cut at 75 tokens.
    Diffusers,
    /// A1111's: weights, `BREAK` and any length (see the module documentation).
    A1111 {
        emphasis: Emphasis,
        comma_backtrack: usize,
    },
    /// ComfyUI's CLIPTextEncode: weights drawn from the empty prompt, any length (see
    /// [`comfy`]).
    Comfy,
}

/// A run of prompt text and its weight. `BREAK` is the text "BREAK" with weight -1, as A1111
/// keeps it (brackets around it multiply that weight, which then makes it text).
#[derive(Clone, Debug, PartialEq)]
pub struct Fragment {
    pub text: String,
    pub weight: f64,
}

impl Fragment {
    fn new(text: impl Into<String>, weight: f64) -> Fragment {
        Fragment {
            text: text.into(),
            weight,
        }
    }

    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// One piece of the prompt as A1111's attention regex cuts it.
enum Piece<'a> {
    /// `\(` and the like: the character after the backslash; "" for a lone backslash.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:NUMBER)`, the number's text.
    Weight(&'a str),
    CloseRound,
    CloseSquare,
    /// Anything else, up to the next special character, or a lone `:`.
    Text,
}

const SPECIAL: [char; 6] = ['\\', '(', ')', '[', ']', ':'];

/// The next piece of `s` (non-empty) and its length in bytes.
fn next_piece(s: &str) -> (Piece<'_>, usize) {
    let mut chars = s.chars();
    let c = chars.next().expect("next_piece takes a non-empty string");
    match c {
        '\\' => match chars.next() {
            Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Piece::Escaped(&s[1..1 + e.len_utf8()]), 2)
            }
            _ => (Piece::Escaped(""), 1),
        },
        '(' => (Piece::OpenRound, 1),
        '[' => (Piece::OpenSquare, 1),
        ')' => (Piece::CloseRound, 1),
        ']' => (Piece::CloseSquare, 1),
        ':' => {
            // `:` [+-]? [.digits]+ `)`: the run of dots and digits is taken whole, and only a
            // `)` right after it makes it a weight.
            let rest = &s[1..];
            let signed = rest.starts_with(['+', '-']) as usize;
            let run = rest[signed..]
                .find(|c: char| !(c == '.' || c.is_ascii_digit()))
                .unwrap_or(rest.len() - signed);
            if run > 0 && rest[signed + run..].starts_with(')') {
                (Piece::Weight(&rest[..signed + run]), 1 + signed + run + 1)
            } else {
                (Piece::Text, 1)
            }
        }
        _ => {
            let n = s.find(SPECIAL).unwrap_or(s.len());
            (Piece::Text, n)
        }
    }
}

/// Python's `\w` as A1111's `\b` reads it (for `BREAK` and `AND`).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` split at each `BREAK` word together with the whitespace around it.
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut from = 0; // start of the current part
    let mut search = 0;
    while let Some(off) = text[search..].find("BREAK") {
        let at = search + off;
        let end = at + "BREAK".len();
        let before_ok = !text[..at].chars().next_back().is_some_and(is_word_char);
        let after_ok = !text[end..].chars().next().is_some_and(is_word_char);
        if before_ok && after_ok {
            let start = text[from..at].trim_end_matches(char::is_whitespace).len() + from;
            parts.push(&text[from..start]);
            from = end + (text[end..].len() - text[end..].trim_start().len());
            search = from;
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[from..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as runs of text and weight, runs of equal weight
/// merged, `BREAK` as its own fragment. A weight that is not a number (`(a:1.2.3)`) is an error
/// (A1111 fails on it too).
pub fn parse_attention(prompt: &str) -> Result<Vec<Fragment>> {
    parse(prompt, true)
}

/// [`parse_attention`] as sd-scripts' copy of it reads captions for `--weighted_captions`:
/// `BREAK` is text there.
pub fn parse_attention_kohya(prompt: &str) -> Result<Vec<Fragment>> {
    parse(prompt, false)
}

fn parse(prompt: &str, breaks: bool) -> Result<Vec<Fragment>> {
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Fragment>, from: usize, m: f64| {
        for f in &mut res[from..] {
            f.weight *= m;
        }
    };
    let square_multiplier = 1.0 / 1.1;
    let mut s = prompt;
    while !s.is_empty() {
        let (piece, len) = next_piece(s);
        let whole = &s[..len];
        s = &s[len..];
        match piece {
            Piece::Escaped(c) => res.push(Fragment::new(c, 1.0)),
            Piece::OpenRound => round.push(res.len()),
            Piece::OpenSquare => square.push(res.len()),
            Piece::Weight(w) if !round.is_empty() => {
                let m: f64 = w.parse().map_err(|_| {
                    Error::Config(format!(
                        "prompt: the weight `{w}` in `{whole}` is not a number (in {prompt:?})"
                    ))
                })?;
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, m);
            }
            Piece::CloseRound if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, 1.1);
            }
            Piece::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut res, from, square_multiplier);
            }
            Piece::Text | Piece::Weight(_) | Piece::CloseRound | Piece::CloseSquare => {
                let parts = match breaks {
                    true => split_breaks(whole),
                    false => vec![whole],
                };
                for (i, part) in parts.into_iter().enumerate() {
                    if i > 0 {
                        res.push(Fragment::new("BREAK", -1.0));
                    }
                    res.push(Fragment::new(part, 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, square_multiplier);
    }
    if res.is_empty() {
        res.push(Fragment::new("", 1.0));
    }
    let mut merged: Vec<Fragment> = Vec::with_capacity(res.len());
    for f in res {
        match merged.last_mut() {
            Some(last) if last.weight == f.weight => last.text.push_str(&f.text),
            _ => merged.push(f),
        }
    }
    Ok(merged)
}

/// Whether `prompt` uses A1111's emphasis, `BREAK`, prompt editing or `AND` (for a hint when
/// prompts are read as text).
pub fn uses_syntax(prompt: &str) -> bool {
    if editing::uses_editing(prompt) {
        return true;
    }
    match parse_attention(prompt) {
        Ok(f) => f.len() > 1 || f.iter().any(|f| f.weight != 1.0) || f[0].text != prompt,
        Err(_) => true,
    }
}

/// One 77-token chunk: ids as the encoder takes them and the weight of each.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub multipliers: Vec<f32>,
}

/// A textual-inversion embedding as its run of added token ids: (first id, vectors).
pub type EmbeddingRun = (u32, usize);

/// Builds chunks as A1111's `tokenize_line`.
struct Chunker<'a> {
    tok: &'a ClipTokenizer,
    comma: Option<u32>,
    comma_backtrack: usize,
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    mults: Vec<f64>,
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Pads the current chunk to 75 with EOS, adds BOS and EOS, and starts the next.
    fn close(&mut self) {
        let (bos, eos, pad) = (self.tok.bos_id(), self.tok.eos_id(), self.tok.pad_id());
        let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
        ids.push(bos);
        ids.append(&mut self.ids);
        ids.resize(CHUNK_TOKENS + 1, eos);
        ids.push(eos);
        if pad != eos {
            let first = ids.iter().position(|&t| t == eos).unwrap_or(ids.len());
            ids[first + 1..].fill(pad);
        }
        // A1111 hands the weights to torch as float32.
        let mut multipliers = vec![1.0f32];
        multipliers.extend(self.mults.drain(..).map(|m| m as f32));
        multipliers.resize(CHUNK_TOKENS + 2, 1.0);
        self.chunks.push(Chunk { ids, multipliers });
        self.last_comma = None;
    }

    fn push(&mut self, id: u32, weight: f64) {
        self.ids.push(id);
        self.mults.push(weight);
    }
}

/// A prompt's fragments as A1111's chunks for one tokenizer (at least one chunk). `runs` are
/// the tokenizer's textual-inversion embeddings, whose names the fragments already spell out
/// (see [`ClipTokenizer::expand_added_tokens`]).
pub fn chunks(
    tok: &ClipTokenizer,
    fragments: &[Fragment],
    comma_backtrack: usize,
    runs: &[EmbeddingRun],
) -> Result<Vec<Chunk>> {
    let mut c = Chunker {
        tok,
        comma: tok.vocab_id(",</w>"),
        comma_backtrack,
        chunks: Vec::new(),
        ids: Vec::new(),
        mults: Vec::new(),
        last_comma: None,
    };
    for f in fragments {
        if f.is_break() {
            c.close();
            continue;
        }
        let ids = tok.content_ids(&f.text)?;
        let mut pos = 0;
        while pos < ids.len() {
            let id = ids[pos];
            if Some(id) == c.comma {
                c.last_comma = Some(c.ids.len());
            } else if let Some(at) = c.last_comma.filter(|&at| {
                c.comma_backtrack > 0
                    && c.ids.len() == CHUNK_TOKENS
                    && CHUNK_TOKENS - at <= c.comma_backtrack
            }) {
                // Move what follows the comma to the next chunk.
                let ids_tail = c.ids.split_off(at + 1);
                let mults_tail = c.mults.split_off(at + 1);
                c.close();
                c.ids = ids_tail;
                c.mults = mults_tail;
            }
            if c.ids.len() == CHUNK_TOKENS {
                c.close();
            }
            let run = runs
                .iter()
                .find(|&&(first, n)| {
                    ids[pos..].len() >= n
                        && ids[pos..pos + n].iter().zip(first..).all(|(&a, b)| a == b)
                })
                .map(|&(_, n)| n);
            let n = run.unwrap_or(1);
            if n > CHUNK_TOKENS {
                return Err(Error::Config(format!(
                    "a textual-inversion embedding of {n} vectors does not fit in a chunk of \
                     {CHUNK_TOKENS} tokens"
                )));
            }
            if run.is_some() && c.ids.len() + n > CHUNK_TOKENS {
                c.close();
            }
            for &t in &ids[pos..pos + n] {
                c.push(t, f.weight);
            }
            pos += n;
        }
    }
    if !c.ids.is_empty() || c.chunks.is_empty() {
        c.close();
    }
    Ok(c.chunks)
}

/// An empty chunk (BOS, then EOS, padded as the tokenizer pads): what A1111 encodes for the
/// missing chunks of the shorter prompts of a batch.
pub fn empty_chunk(tok: &ClipTokenizer) -> Result<Vec<Chunk>> {
    chunks(tok, &[Fragment::new("", 1.0)], 0, &[])
}

/// The fragments of one step's text under `emphasis` (the whole text at weight 1 for
/// [`Emphasis::None`]).
pub fn fragments(prompt: &str, emphasis: Emphasis) -> Result<Vec<Fragment>> {
    match emphasis {
        Emphasis::None => Ok(vec![Fragment::new(prompt, 1.0)]),
        _ => parse_attention(prompt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(p: &str) -> Vec<(String, f64)> {
        parse_attention(p)
            .unwrap()
            .into_iter()
            .map(|f| (f.text, f.weight))
            .collect()
    }

    fn pairs(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|&(t, w)| (t.to_string(), w)).collect()
    }

    /// The examples of A1111's own `parse_prompt_attention` docstring, with its outputs.
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(parsed("normal text"), pairs(&[("normal text", 1.0)]));
        assert_eq!(
            parsed("an (important) word"),
            pairs(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parsed("(unbalanced"), pairs(&[("unbalanced", 1.1)]));
        assert_eq!(parsed("\\(literal\\]"), pairs(&[("(literal]", 1.0)]));
        assert_eq!(
            parsed("(unnecessary)(parens)"),
            pairs(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pairs(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn breaks_escapes_and_odd_weights() {
        assert_eq!(
            parsed("a BREAK b"),
            pairs(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        // Not a word of its own: text.
        assert_eq!(parsed("aBREAK b"), pairs(&[("aBREAK b", 1.0)]));
        // Brackets around BREAK multiply its weight, which makes it text.
        let f = parse_attention("(a BREAK b)").unwrap();
        assert!(f.iter().all(|f| !f.is_break()), "{f:?}");
        assert_eq!(parsed("a\\b"), pairs(&[("ab", 1.0)]));
        assert_eq!(parsed("a :) b"), pairs(&[("a :) b", 1.0)]));
        assert_eq!(parsed("(a:-1)"), pairs(&[("a", -1.0)]));
        assert_eq!(parsed("(a:.5)"), pairs(&[("a", 0.5)]));
        assert_eq!(parsed(""), pairs(&[("", 1.0)]));
        assert!(parse_attention("(a:1.2.3)").is_err());
        assert!(parse_attention("(a:.)").is_err());
        // `:` without a number stays text; the bracket closes at 1.1.
        assert_eq!(parsed("(a:b)"), pairs(&[("a:b", 1.1)]));
    }

    #[test]
    fn syntax_is_noticed() {
        assert!(uses_syntax("a (red:1.2) cat"));
        assert!(uses_syntax("a BREAK b"));
        assert!(uses_syntax("[x]"));
        assert!(uses_syntax("a AND b"));
        assert!(!uses_syntax("a red cat, on a hill"));
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    fn tokenizer(folder: &str) -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny/sdxl")
            .join(folder);
        ClipTokenizer::from_folder(dir).unwrap()
    }

    fn content(c: &Chunk, eos: u32) -> usize {
        c.ids[1..].iter().position(|&t| t == eos).unwrap()
    }

    /// An embedding's vectors stay together: one that would cross the 75-token border starts
    /// the next chunk whole.
    #[test]
    fn embeddings_do_not_straddle_chunks() {
        let mut tok = tokenizer("tokenizer");
        let names: Vec<String> = ["kstyleemb", "kstyleemb_1", "kstyleemb_2"]
            .map(String::from)
            .to_vec();
        let ids = tok.add_tokens(&names).unwrap();
        let runs = tok.embedding_runs(&["kstyleemb".to_string()]);
        assert_eq!(runs, vec![(ids[0], 3)]);
        let words = vec!["sky"; 73].join(" ");
        let prompt = tok
            .expand_added_tokens(&format!("{words} (kstyleemb:1.2)"))
            .unwrap();
        let f = parse_attention(&prompt).unwrap();
        let c = chunks(&tok, &f, 20, &runs).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(content(&c[0], tok.eos_id()), 73);
        assert_eq!(&c[1].ids[1..4], &ids[..]);
        assert_eq!(&c[1].multipliers[1..4], &[1.2f32; 3]);
        // Without the run the tokens fill the first chunk and spill one over.
        let c = chunks(&tok, &f, 20, &[]).unwrap();
        assert_eq!(content(&c[0], tok.eos_id()), 75);
        assert_eq!(content(&c[1], tok.eos_id()), 1);
    }

    /// tokenizer_2 pads with id 0 after the first EOS; the empty prompt is BOS EOS and pads.
    #[test]
    fn chunks_are_padded_as_each_tokenizer_pads() {
        let tok = tokenizer("tokenizer_2");
        let c = empty_chunk(&tok).unwrap();
        assert_eq!(c.len(), 1);
        let ids = &c[0].ids;
        assert_eq!(ids.len(), 77);
        assert_eq!((ids[0], ids[1]), (tok.bos_id(), tok.eos_id()));
        assert!(ids[2..].iter().all(|&t| t == tok.pad_id()) && tok.pad_id() != tok.eos_id());
        // Two BREAKs in a row leave an empty chunk between them, as in A1111.
        let f = parse_attention("a BREAK BREAK b").unwrap();
        let c = chunks(&tok, &f, 20, &[]).unwrap();
        let lens: Vec<usize> = c.iter().map(|c| content(c, tok.eos_id())).collect();
        assert_eq!(lens, [1, 0, 1]);
    }
}
