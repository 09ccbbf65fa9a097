//! A1111's prompt editing and composable prompts (stable-diffusion-webui 1.10,
//! `modules/prompt_parser.py`): prompts whose text changes between sampling steps, and prompts
//! made of weighted parts joined by `AND`.
//!
//! - `[from:to:when]` reads `from` up to step `when`, then `to`; `[to:when]` adds `to` after
//!   step `when` and `[from::when]` removes `from` after it. A `when` written with a `.` is a
//!   fraction of the steps (`0.25` of 20 steps is step 5), one without a step number; either is
//!   truncated to a whole step and capped at the step count.
//! - `[a|b|c]` alternates: `a` at the first step, `b` at the second, and round again; an empty
//!   option reads as nothing (`[fe|]male`).
//! - Groups nest, in each other and in `(...)` / `[...]` emphasis, which stays as written for
//!   [`super::parse_attention`] to weigh; whitespace around `when` is allowed.
//! - A prompt A1111's grammar does not read (a `|` outside `[...]`, a backslash at the end or
//!   before a line break) is its text at every step, as A1111 keeps it.
//! - The schedule of a prompt over `steps` is a list of (last step, text), the last step the
//!   step count; the text for UNet evaluation `i` (from 0) is the first whose last step is at or
//!   after `i` (A1111's rule, so `[a:b:10]` reads `a` for eleven evaluations).
//! - `a AND b :0.5` is [`composable`]: parts, each with a weight (`:W` at the end of a part, 1
//!   without), each scheduled on its own.
//!
//! A1111 parses with lark's Earley parser, which may read a stray bracket or colon right next to
//! an editing group in one of several ways (`[a:b:1]::`, `x([a|b]`), picked by the parser's
//! internal order rather than by the grammar. Such prompts are refused with what to write
//! instead; every other prompt reads as A1111 reads it (checked against lark on thousands of
//! random prompts by `tests/fixtures/extra/gen_prompt_editing.py`).

use std::collections::BTreeSet;
use std::ops::Range;

use super::is_word_char;
use crate::{Error, Result};

/// One part of a composable prompt: its text and weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub text: String,
    pub weight: f64,
}

/// A piece of a parsed prompt.
#[derive(Clone, Debug)]
enum Node<'a> {
    /// Text kept as written: plain text, an escape, a bracket or colon of emphasis, a stray one.
    Text(&'a str),
    /// `(...)`, `(...:...)` or `[...]` emphasis: its brackets and colon are `Text` among the
    /// nodes.
    Group(Vec<Node<'a>>),
    /// `[before:after:when]`, `before` absent for `[after:when]`; `when` as written.
    Edit {
        before: Option<Vec<Node<'a>>>,
        after: Vec<Node<'a>>,
        when: &'a str,
    },
    /// `[a|b|...]`.
    Alternate(Vec<Vec<Node<'a>>>),
}

impl Node<'_> {
    /// Whether the node reads differently at some step.
    fn varies(&self) -> bool {
        match self {
            Node::Text(_) => false,
            Node::Group(nodes) => nodes.iter().any(Node::varies),
            Node::Edit { .. } | Node::Alternate(_) => true,
        }
    }

    fn is_group(&self) -> bool {
        !matches!(self, Node::Text(_))
    }

    /// A bracket or colon outside every group (the grammar's stray characters).
    fn is_stray(&self) -> bool {
        matches!(self, Node::Text(t) if t.len() == 1 && "[]():".contains(*t))
    }
}

/// Python's `\s` (`str.isspace`): Unicode whitespace and the four separators U+001C..U+001F.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Whether `s` is lark's SIGNED_NUMBER: `[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?`, ASCII digits.
fn is_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first().is_some_and(|c| matches!(c, b'+' | b'-')));
    let digits = |i: &mut usize| {
        let from = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - from
    };
    let whole = digits(&mut i);
    let frac = if b.get(i) == Some(&b'.') {
        i += 1;
        Some(digits(&mut i))
    } else {
        None
    };
    let mantissa = match frac {
        Some(f) => whole > 0 || f > 0,
        None => whole > 0,
    };
    if !mantissa {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The length of the escape at the start of `s` (a backslash and the character after it, which
/// may not be a line break), or None where the grammar has no reading for the backslash.
fn escape_len(s: &str) -> Option<usize> {
    let next = s[1..].chars().next()?;
    (next != '\n').then(|| 1 + next.len_utf8())
}

/// The group that opens at the start of `s` (a `[` or `(`) and the bytes it spans, or None where
/// it is no group of the grammar (it does not close, its brackets cross, a `[a:b]` without a
/// step, a `|` in round brackets, a backslash without a reading).
fn group<'a>(s: &'a str) -> Option<(Node<'a>, usize)> {
    let open = s.as_bytes()[0];
    let close = if open == b'[' { b']' } else { b')' };
    let mut segments: Vec<Vec<Node<'a>>> = vec![Vec::new()];
    let mut separators: Vec<&'a str> = Vec::new();
    let mut text_from = None; // start of the current run of text
    let mut i = 1;
    let flush = |segments: &mut Vec<Vec<Node<'a>>>, from: &mut Option<usize>, to: usize| {
        if let Some(f) = from.take() {
            segments
                .last_mut()
                .expect("a segment")
                .push(Node::Text(&s[f..to]));
        }
    };
    let end = loop {
        let c = *s.as_bytes().get(i)?;
        match c {
            b'\\' => {
                text_from.get_or_insert(i);
                i += escape_len(&s[i..])?;
            }
            b'[' | b'(' => {
                flush(&mut segments, &mut text_from, i);
                let (node, len) = group(&s[i..])?;
                segments.last_mut().expect("a segment").push(node);
                i += len;
            }
            _ if c == close => {
                flush(&mut segments, &mut text_from, i);
                break i + 1;
            }
            b']' | b')' => return None,
            b':' | b'|' => {
                flush(&mut segments, &mut text_from, i);
                separators.push(&s[i..i + 1]);
                segments.push(Vec::new());
                i += 1;
            }
            _ => {
                text_from.get_or_insert(i);
                i += s[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
    };
    let emphasis = |segments: Vec<Vec<Node<'a>>>, separators: &[&'a str]| {
        let mut nodes = vec![Node::Text(&s[..1])];
        for (k, seg) in segments.into_iter().enumerate() {
            if k > 0 {
                nodes.push(Node::Text(separators[k - 1]));
            }
            nodes.extend(seg);
        }
        nodes.push(Node::Text(&s[end - 1..end]));
        Node::Group(nodes)
    };
    let node = match (open, separators.as_slice()) {
        (b'(', [] | [":"]) | (b'[', []) => emphasis(segments, &separators),
        (b'(', _) => return None,
        (_, seps) if seps.iter().all(|&p| p == "|") => Node::Alternate(segments),
        (_, [":"] | [":", ":"]) => {
            let when = match segments.pop().expect("the step segment").as_slice() {
                [] => return None,
                [Node::Text(t)] => t.trim_matches(is_space),
                _ => return None,
            };
            if !is_number(when) {
                return None;
            }
            let after = segments.pop().expect("the after segment");
            Node::Edit {
                before: segments.pop(),
                after,
                when,
            }
        }
        _ => return None,
    };
    Some((node, end))
}

/// The prompt as the grammar reads it, each node with the bytes it spans, or None where it has
/// no reading (then A1111 keeps the text as written).
fn parse<'a>(prompt: &'a str) -> Option<Vec<(Node<'a>, Range<usize>)>> {
    let mut nodes = Vec::new();
    let mut text_from: Option<usize> = None;
    let mut i = 0;
    let flush = |nodes: &mut Vec<(Node<'a>, Range<usize>)>, from: &mut Option<usize>, to: usize| {
        if let Some(f) = from.take() {
            nodes.push((Node::Text(&prompt[f..to]), f..to));
        }
    };
    while i < prompt.len() {
        let c = prompt.as_bytes()[i];
        match c {
            b'[' | b'(' => {
                flush(&mut nodes, &mut text_from, i);
                match group(&prompt[i..]) {
                    Some((node, len)) => {
                        nodes.push((node, i..i + len));
                        i += len;
                    }
                    None => {
                        nodes.push((Node::Text(&prompt[i..i + 1]), i..i + 1));
                        i += 1;
                    }
                }
            }
            b']' | b')' | b':' => {
                flush(&mut nodes, &mut text_from, i);
                nodes.push((Node::Text(&prompt[i..i + 1]), i..i + 1));
                i += 1;
            }
            b'|' => return None,
            b'\\' => {
                text_from.get_or_insert(i);
                i += escape_len(&prompt[i..])?;
            }
            _ => {
                text_from.get_or_insert(i);
                i += prompt[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    flush(&mut nodes, &mut text_from, prompt.len());
    Some(nodes)
}

/// Refuses a prompt where lark's reading of an editing group is its internal choice (see the
/// module documentation): a run of groups with one that edits, next to a stray bracket, or next
/// to a stray colon unless the run is that one group, the colon stands alone, the group's
/// bracket there is not doubled (`]]`) and the prompt has no stray bracket anywhere
/// (`a [cat:dog:0.5]: b` reads as A1111 reads it; `[[a:1]]:` and `[a:1]::` are refused).
fn check_readable(prompt: &str, nodes: &[(Node, Range<usize>)]) -> Result<()> {
    let stray = |k: Option<usize>| -> Option<&str> {
        match nodes.get(k?) {
            Some((n @ Node::Text(t), _)) if n.is_stray() => Some(t),
            _ => None,
        }
    };
    let any_bracket = (0..nodes.len()).any(|k| stray(Some(k)).is_some_and(|t| t != ":"));
    let brackets = |r: Range<usize>| prompt.as_bytes()[r].iter().all(|b| b"[]()".contains(b));
    let mut i = 0;
    while i < nodes.len() {
        if !nodes[i].0.is_group() {
            i += 1;
            continue;
        }
        let from = i;
        while i < nodes.len() && nodes[i].0.is_group() {
            i += 1;
        }
        if !nodes[from..i].iter().any(|(n, _)| n.varies()) {
            continue;
        }
        let (first, last) = (&nodes[from].1, &nodes[i - 1].1);
        let sides = [
            (
                from.checked_sub(1),
                from.checked_sub(2),
                first.start..first.start + 2,
            ),
            (Some(i), Some(i + 1), last.end - 2..last.end),
        ];
        for (next, beyond, edge) in sides {
            let Some(c) = stray(next) else { continue };
            let lone_colon = c == ":"
                && i - from == 1
                && stray(beyond).is_none()
                && !any_bracket
                && !brackets(edge);
            if !lone_colon {
                return Err(Error::Config(format!(
                    "prompt {prompt:?}: the `{c}` right next to prompt editing can be read in \
                     more than one way, and A1111 picks one by its parser's internal order; \
                     escape it as `\\{c}` or put a space between"
                )));
            }
        }
    }
    Ok(())
}

/// The step `when` stands for among `steps` (A1111: a fraction where written with a `.`, a step
/// otherwise, truncated and capped at `steps`; below 1 it never comes).
fn step_of(when: &str, steps: usize, prompt: &str) -> Result<f64> {
    let v: f64 = when.parse().map_err(|_| {
        Error::Config(format!(
            "prompt {prompt:?}: the step `{when}` is not a number"
        ))
    })?;
    let v = if when.contains('.') {
        v * steps as f64
    } else {
        v
    };
    if !v.is_finite() {
        return Err(Error::Config(format!(
            "prompt {prompt:?}: the step `{when}` is too large"
        )));
    }
    Ok(v.trunc().min(steps as f64))
}

fn collect(nodes: &[Node], steps: usize, prompt: &str, ends: &mut BTreeSet<usize>) -> Result<()> {
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Group(inner) => collect(inner, steps, prompt, ends)?,
            Node::Edit {
                before,
                after,
                when,
            } => {
                let w = step_of(when, steps, prompt)?;
                if w >= 1.0 {
                    ends.insert(w as usize);
                }
                if let Some(b) = before {
                    collect(b, steps, prompt, ends)?;
                }
                collect(after, steps, prompt, ends)?;
            }
            Node::Alternate(options) => {
                ends.extend(1..=steps);
                for o in options {
                    collect(o, steps, prompt, ends)?;
                }
            }
        }
    }
    Ok(())
}

fn render(nodes: &[Node], step: usize, steps: usize, prompt: &str, out: &mut String) -> Result<()> {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Group(inner) => render(inner, step, steps, prompt, out)?,
            Node::Edit {
                before,
                after,
                when,
            } => {
                if step as f64 <= step_of(when, steps, prompt)? {
                    if let Some(b) = before {
                        render(b, step, steps, prompt, out)?;
                    }
                } else {
                    render(after, step, steps, prompt, out)?;
                }
            }
            Node::Alternate(options) => render(
                &options[(step - 1) % options.len()],
                step,
                steps,
                prompt,
                out,
            )?,
        }
    }
    Ok(())
}

/// A1111's `get_learned_conditioning_prompt_schedules` for one prompt over `steps` (at least 1):
/// (last step, text) pairs, last steps ascending, the last one `steps`.
pub fn schedule(prompt: &str, steps: usize) -> Result<Vec<(usize, String)>> {
    let steps = steps.max(1);
    let Some(spans) = parse(prompt) else {
        return Ok(vec![(steps, prompt.to_string())]);
    };
    check_readable(prompt, &spans)?;
    let nodes: Vec<Node> = spans.into_iter().map(|(n, _)| n).collect();
    let mut ends = BTreeSet::from([steps]);
    collect(&nodes, steps, prompt, &mut ends)?;
    ends.into_iter()
        .map(|t| {
            let mut text = String::new();
            render(&nodes, t, steps, prompt, &mut text)?;
            Ok((t, text))
        })
        .collect()
}

/// Which entry of a schedule's last steps `ends` (ascending) evaluation `step` (from 0) reads:
/// the first at or after it, the last past them all.
pub fn entry_at(ends: &[usize], step: usize) -> usize {
    ends.iter()
        .position(|&e| step <= e)
        .unwrap_or(ends.len().saturating_sub(1))
}

/// A1111's `get_multicond_prompt_list` for one prompt: the prompt split at each whole word `AND`,
/// and each part's weight read off its end (`text :0.5`, the colon, the number and the
/// whitespace around them removed; 1 without). Trailing whitespace is removed either way.
pub fn composable(prompt: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut from = 0;
    let mut search = 0;
    while let Some(off) = prompt[search..].find("AND") {
        let at = search + off;
        let end = at + 3;
        let before = prompt[..at].chars().next_back().is_some_and(is_word_char);
        let after = prompt[end..].chars().next().is_some_and(is_word_char);
        if !before && !after {
            parts.push(part(&prompt[from..at]));
            from = end;
        }
        search = at + 1;
    }
    parts.push(part(&prompt[from..]));
    parts
}

fn part(sub: &str) -> Part {
    let t = sub.trim_end_matches(is_space);
    let weighted = t.rfind(':').and_then(|colon| {
        let number = t[colon + 1..].trim_start_matches(is_space);
        if !is_weight(number) {
            return None;
        }
        let weight = number.parse::<f64>().ok()?;
        Some(Part {
            text: t[..colon].trim_end_matches(is_space).to_string(),
            weight,
        })
    });
    weighted.unwrap_or_else(|| Part {
        text: t.to_string(),
        weight: 1.0,
    })
}

/// A1111's weight after `AND` parts: `[-+]?(\d+\.?|\d*\.\d+)`.
fn is_weight(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (body, None),
    };
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    match frac {
        None => !whole.is_empty() && digits(whole),
        Some(f) => digits(whole) && digits(f) && (!f.is_empty() || !whole.is_empty()),
    }
}

/// Whether `prompt` uses A1111's prompt editing or `AND` (for a hint when prompts are read as
/// text).
pub fn uses_editing(prompt: &str) -> bool {
    composable(prompt).len() > 1
        || matches!(parse(prompt), Some(nodes) if nodes.iter().any(|(n, _)| n.varies()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(p: &str, steps: usize) -> Vec<(usize, String)> {
        schedule(p, steps).unwrap()
    }

    fn pairs(v: &[(usize, &str)]) -> Vec<(usize, String)> {
        v.iter().map(|&(s, t)| (s, t.to_string())).collect()
    }

    /// The examples of A1111's `get_learned_conditioning_prompt_schedules` docstring (10 steps).
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(sched("test", 10), pairs(&[(10, "test")]));
        assert_eq!(sched("a [b:3]", 10), pairs(&[(3, "a "), (10, "a b")]));
        assert_eq!(sched("a [b: 3]", 10), pairs(&[(3, "a "), (10, "a b")]));
        assert_eq!(
            sched("a [[[b]]:2]", 10),
            pairs(&[(2, "a "), (10, "a [[b]]")])
        );
        assert_eq!(sched("[(a:2):3]", 10), pairs(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(
            sched("a [b : c : 1] d", 10),
            pairs(&[(1, "a b  d"), (10, "a  c  d")])
        );
        assert_eq!(
            sched("a[b:[c:d:2]:1]e", 10),
            pairs(&[(1, "abe"), (2, "ace"), (10, "ade")])
        );
        assert_eq!(sched("a [unbalanced", 10), pairs(&[(10, "a [unbalanced")]));
        assert_eq!(
            sched("a [b:.5] c", 10),
            pairs(&[(5, "a  c"), (10, "a b c")])
        );
        assert_eq!(
            sched("((a][:b:c [d:3]", 10),
            pairs(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
        );
        let alternate: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "a" } else { "(b:1.1)" }.to_string()))
            .collect();
        assert_eq!(sched("[a|(b:1.1)]", 10), alternate);
        let fe: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "female" } else { "male" }.to_string()))
            .collect();
        assert_eq!(sched("[fe|]male", 10), fe);
        let fe3: Vec<(usize, String)> = (1..=10)
            .map(|s| (s, if s % 4 == 1 { "female" } else { "male" }.to_string()))
            .collect();
        assert_eq!(sched("[fe|||]male", 10), fe3);
    }

    #[test]
    fn steps_are_cut_and_capped() {
        // A fraction of the steps, truncated; a step number capped at the steps; below 1, never.
        assert_eq!(sched("[a:b:0.55]", 4), pairs(&[(2, "a"), (4, "b")]));
        assert_eq!(sched("[a:b:99]", 4), pairs(&[(4, "a")]));
        assert_eq!(sched("[a:b:-1]", 4), pairs(&[(4, "b")]));
        assert_eq!(sched("[a:b:1e-1]", 4), pairs(&[(4, "b")]));
        assert_eq!(sched("[a:b:1e1]", 20), pairs(&[(10, "a"), (20, "b")]));
        assert_eq!(sched("[a:b: 2 ]", 4), pairs(&[(2, "a"), (4, "b")]));
        assert!(schedule("[a:b:1e400]", 4).is_err());
    }

    #[test]
    fn unreadable_prompts_are_kept() {
        for p in ["a|b [c:d:1]", "[a:b:1] \\", "x \\\n[a:1]", "[a|b"] {
            assert_eq!(sched(p, 4), pairs(&[(4, p)]), "{p}");
        }
        // Not a group: the brackets are text.
        assert_eq!(sched("[a:b] [c:x]", 4), pairs(&[(4, "[a:b] [c:x]")]));
        assert_eq!(sched("\\[a:b:1\\]", 4), pairs(&[(4, "\\[a:b:1\\]")]));
    }

    #[test]
    fn stray_brackets_next_to_editing_are_refused() {
        for p in [
            "[a:b:1]::",
            "x([a|b]",
            "[[a:1]]:",
            "[a:1][]::",
            "x:[[a:1]]",
            "(:[a:1]",
        ] {
            assert!(schedule(p, 4).is_err(), "{p}");
        }
        for p in [
            "[a:b:1] ::",
            "x( [a|b]",
            "[a:b:1] ]",
            "style: [a:b:0.5], c",
            "(x) ]",
            "a [cat:dog:0.5]: b",
            "x:[a:1]",
        ] {
            schedule(p, 4).unwrap();
        }
    }

    #[test]
    fn entries_are_picked_as_a1111_picks_them() {
        let ends = [2, 4];
        let picked: Vec<usize> = (0..5).map(|s| entry_at(&ends, s)).collect();
        assert_eq!(picked, [0, 0, 0, 1, 1]);
    }

    #[test]
    fn and_splits_weighted_parts() {
        let parts = |p: &str| -> Vec<(String, f64)> {
            composable(p)
                .into_iter()
                .map(|x| (x.text, x.weight))
                .collect()
        };
        let own = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
            v.iter().map(|&(t, w)| (t.to_string(), w)).collect()
        };
        assert_eq!(
            parts("a cat AND a dog :0.5 AND sky: -1."),
            own(&[("a cat", 1.0), (" a dog", 0.5), (" sky", -1.0)])
        );
        assert_eq!(
            parts("ANDROID and AND_x"),
            own(&[("ANDROID and AND_x", 1.0)])
        );
        assert_eq!(parts("a:1:2 "), own(&[("a:1", 2.0)]));
        assert_eq!(parts("(a:1.2)"), own(&[("(a:1.2)", 1.0)]));
        assert_eq!(parts("a:.5"), own(&[("a", 0.5)]));
        assert_eq!(parts("a:1.5.5"), own(&[("a:1.5.5", 1.0)]));
        assert_eq!(parts("AND"), own(&[("", 1.0), ("", 1.0)]));
        assert!(uses_editing("a AND b"));
        assert!(uses_editing("a [b:c:2]"));
        assert!(!uses_editing("a [b] (c:1.2)"));
    }

    #[test]
    fn numbers_follow_lark() {
        for n in ["1", "+1", "-1.", ".5", "1.5", "1e5", "1.e-5", "2E+3"] {
            assert!(is_number(n), "{n}");
            assert!(n.parse::<f64>().is_ok(), "{n}");
        }
        for n in ["", ".", "+", "1e", "e5", "1.5.5", "0x1", "١"] {
            assert!(!is_number(n), "{n}");
        }
    }
}
