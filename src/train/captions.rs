//! Per-visit caption rewriting, as kohya's `process_caption`: wildcards (`--enable-wildcard`: one
//! line of a multi-line caption, one option of each `{a|b|c}`; `{{` and `}}` are literal braces),
//! then, with `--shuffle-caption` or `--caption-tag-dropout`, the tags (split on
//! `--caption-separator`) after the kept ones shuffled and dropped, and last the
//! `--secondary-separator` turned into the separator. With kohya's token warm-up
//! (`--token-warmup-step`), the movable tags are first cut to a count that grows with the step.
//! Every draw comes from the run's generator, so a resumed run rewrites exactly as the
//! uninterrupted one.

use crate::tensor::Rng;

/// How a run rewrites its captions on each visit.
#[derive(Clone, Copy, Debug)]
pub struct TagRules<'a> {
    /// Splits a caption into tags (kohya's `--caption_separator`, `,`); tags are joined back
    /// with `, ` whatever it is, as kohya joins them.
    pub separator: &'a str,
    /// The first `keep` tags stay in place (`--keep-tokens`).
    pub keep: usize,
    /// kohya's `--keep_tokens_separator`: in a caption that holds it, the tags before it (and
    /// after a second one) stay in place, and only those between move; it overrides `keep`.
    pub keep_separator: Option<&'a str>,
    /// kohya's `--secondary_separator`: joins words that move as one tag, turned into the
    /// separator once the tags are placed.
    pub secondary: Option<&'a str>,
    pub shuffle: bool,
    /// Each movable tag is dropped with this probability (`--caption-tag-dropout`).
    pub drop: Option<f64>,
    /// Resolve wildcards (`--enable-wildcard`).
    pub wildcard: bool,
    /// kohya's token warm-up: early visits keep only the first movable tags.
    pub warmup: Option<TokenWarmup>,
}

impl TagRules<'_> {
    /// Whether the tags themselves are rewritten (shuffled, dropped or cut by the warm-up).
    pub fn moves_tags(&self) -> bool {
        self.shuffle || self.drop.is_some() || self.warmup.is_some()
    }
}

/// kohya's token warm-up (`--token_warmup_min`, `--token_warmup_step`): a visit at optimizer
/// step s (steps done) keeps the first floor(s (n - min) / steps) + min of a caption's n movable
/// tags while s < steps, and all of them after; the kept tags (`--keep-tokens`) always stay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenWarmup {
    pub min: usize,
    /// The warm-up's length in optimizer steps; below 1, a fraction of the run's steps until
    /// [`TokenWarmup::resolve`]d.
    pub steps: f64,
}

impl TokenWarmup {
    /// The warm-up for a run of `total` optimizer steps: a length below 1 is that fraction of
    /// the run, floored (kohya's `floor(token_warmup_step * max_train_steps)`; 0 is no warm-up).
    pub fn resolve(self, total: u64) -> TokenWarmup {
        let steps = match self.steps < 1.0 {
            true => (self.steps * total as f64).floor(),
            false => self.steps,
        };
        TokenWarmup { steps, ..self }
    }

    /// How many of `n` movable tags a visit at optimizer step `step` (steps done) keeps.
    pub fn keep(&self, n: usize, step: u64) -> usize {
        if self.steps <= 0.0 || step as f64 >= self.steps {
            return n;
        }
        let len =
            (step as f64 * ((n as f64 - self.min as f64) / self.steps)).floor() + self.min as f64;
        (len.max(0.0) as usize).min(n)
    }
}

/// The caption one visit at optimizer step `step` (steps done) trains on, drawing from `rng`:
/// wildcards only with `rules.wildcard` (a line choice only for a caption of several lines, one
/// draw per `{...}`), then the token warm-up's cut (no draw), one draw per shuffle swap and one
/// per movable tag with tag dropout.
pub fn rewrite_caption(caption: &str, rules: &TagRules, step: u64, rng: &mut Rng) -> String {
    let mut caption = match rules.wildcard {
        true => choose_wildcards(caption, rng),
        false => caption.to_string(),
    };
    if rules.moves_tags() {
        let sep = rules.separator;
        let nonempty = |s: &str| -> Vec<String> {
            s.split(sep)
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        };
        let (fixed, mut flex, tail) = match rules.keep_separator.filter(|k| caption.contains(k)) {
            Some(k) => {
                let (head, rest) = caption.split_once(k).unwrap_or((&caption, ""));
                let (middle, tail) = rest.split_once(k).unwrap_or((rest, ""));
                (nonempty(head), nonempty(middle), nonempty(tail))
            }
            None => {
                let tags: Vec<String> = caption
                    .trim()
                    .split(sep)
                    .map(|t| t.trim().to_string())
                    .collect();
                let keep = rules.keep.min(tags.len());
                (tags[..keep].to_vec(), tags[keep..].to_vec(), Vec::new())
            }
        };
        if let Some(w) = rules.warmup {
            flex.truncate(w.keep(flex.len(), step));
        }
        if rules.shuffle {
            rng.shuffle(&mut flex);
        }
        if let Some(p) = rules.drop {
            flex.retain(|_| rng.uniform() >= p);
        }
        caption = [fixed, flex, tail].concat().join(", ");
    }
    if let Some(s) = rules.secondary {
        caption = caption.replace(s, rules.separator);
    }
    caption
}

/// Placeholders for literal braces while wildcards are resolved (Unicode private use).
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// kohya's wildcards: one line of a multi-line caption, then each `{a|b|c}` (a `{`, at least
/// one character that is not `}`, a `}`) replaced by one of its options; `{{` and `}}` stand for
/// literal braces and never open or close an option list.
pub fn choose_wildcards(caption: &str, rng: &mut Rng) -> String {
    let lines: Vec<&str> = caption.split('\n').collect();
    let line = match lines.len() {
        1 => lines[0],
        n => lines[rng.below(n as u64) as usize],
    };
    let escaped = line
        .replace("{{", &OPEN.to_string())
        .replace("}}", &CLOSE.to_string());
    let chars: Vec<char> = escaped.chars().collect();
    let mut out = String::with_capacity(escaped.len());
    let mut i = 0;
    while i < chars.len() {
        let group = match chars[i] {
            '{' => chars[i + 1..]
                .iter()
                .position(|&c| c == '}')
                .filter(|&len| len > 0),
            _ => None,
        };
        match group {
            Some(len) => {
                let body: String = chars[i + 1..i + 1 + len].iter().collect();
                let options: Vec<&str> = body.split('|').collect();
                out.push_str(options[rng.below(options.len() as u64) as usize]);
                i += len + 2;
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out.replace(OPEN, "{").replace(CLOSE, "}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(keep: usize, shuffle: bool, drop: Option<f64>) -> TagRules<'static> {
        TagRules {
            separator: ",",
            keep,
            keep_separator: None,
            secondary: None,
            shuffle,
            drop,
            wildcard: false,
            warmup: None,
        }
    }

    /// The kept tags stay first, the rest are a permutation of the caption's, joined as kohya
    /// joins them; one tag (no comma) comes back trimmed and draws nothing. Tag dropout keeps
    /// the kept tags and the order of the others.
    #[test]
    fn tags_shuffle_and_drop_after_the_kept_ones() {
        let mut rng = Rng::new(3);
        let caption = " [v], red roof,snow , night, palace ";
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let s = rewrite_caption(caption, &rules(1, true, None), 0, &mut rng);
            let tags: Vec<&str> = s.split(", ").collect();
            assert_eq!(tags[0], "[v]");
            let mut rest = tags[1..].to_vec();
            rest.sort();
            assert_eq!(rest, ["night", "palace", "red roof", "snow"]);
            seen.insert(s);
        }
        assert!(seen.len() > 5, "{seen:?}");
        let shuffle = rules(0, true, None);
        assert_eq!(rewrite_caption("a b c", &shuffle, 0, &mut rng), "a b c");
        assert_eq!(
            rewrite_caption("x, y", &rules(5, true, None), 0, &mut rng),
            "x, y"
        );
        let before = rng.clone();
        assert_eq!(
            rewrite_caption(" one tag ", &shuffle, 0, &mut rng),
            "one tag"
        );
        assert_eq!(rng, before);
        // Tag dropout: never the kept tags; at 1 every other tag goes, at 0.5 some do.
        let all = "[v], a, b, c, d, e, f, g";
        assert_eq!(
            rewrite_caption(all, &rules(1, false, Some(1.0)), 0, &mut rng),
            "[v]"
        );
        assert_eq!(
            rewrite_caption(all, &rules(2, true, Some(1.0)), 0, &mut rng),
            "[v], a"
        );
        let counts: Vec<usize> = (0..20)
            .map(|_| {
                rewrite_caption(all, &rules(1, false, Some(0.5)), 0, &mut rng)
                    .split(", ")
                    .count()
            })
            .collect();
        assert!(counts.iter().all(|&n| (1..=8).contains(&n)), "{counts:?}");
        assert!(
            counts.iter().any(|&n| n < 8) && counts.iter().any(|&n| n > 1),
            "{counts:?}"
        );
        // Without the shuffle the tags that stay keep their order: a subsequence of `all`.
        let left = rewrite_caption(all, &rules(0, false, Some(0.5)), 0, &mut rng);
        let mut rest = all.split(", ");
        assert!(left.split(", ").all(|t| rest.any(|u| u == t)), "{left}");
    }

    /// kohya's token warm-up: floor(s (n - min) / steps) + min movable tags at step s, all of them
    /// from the warm-up's last step on; a fraction resolves against the run's length; the kept
    /// tags stay and the cut comes before the shuffle (the shuffled tags are the first ones).
    #[test]
    fn token_warmup_keeps_a_growing_prefix() {
        let w = TokenWarmup { min: 1, steps: 4.0 };
        let kept: Vec<usize> = (0..6).map(|s| w.keep(9, s)).collect();
        // s (9 - 1) / 4 + 1 = 2s + 1, until step 4.
        assert_eq!(kept, [1, 3, 5, 7, 9, 9]);
        let w = TokenWarmup { min: 2, steps: 3.0 };
        assert_eq!(
            (0..4).map(|s| w.keep(7, s)).collect::<Vec<_>>(),
            [2, 3, 5, 7]
        );
        assert_eq!(w.keep(1, 0), 1, "never more tags than the caption has");
        let f = TokenWarmup {
            min: 1,
            steps: 0.25,
        };
        assert_eq!(f.resolve(10).steps, 2.0);
        assert_eq!(f.resolve(3).steps, 0.0);
        assert_eq!(
            f.resolve(3).keep(5, 0),
            5,
            "a warm-up of 0 steps cuts nothing"
        );
        assert_eq!(TokenWarmup { min: 1, steps: 7.5 }.resolve(2).steps, 7.5);
        let mut rng = Rng::new(4);
        let r = TagRules {
            warmup: Some(TokenWarmup { min: 1, steps: 4.0 }),
            ..rules(1, false, None)
        };
        let all = "[v], a, b, c, d, e,f";
        assert_eq!(rewrite_caption(all, &r, 0, &mut rng), "[v], a");
        // Six movable tags: floor(2 * 5 / 4) + 1 = 3 at step 2.
        assert_eq!(rewrite_caption(all, &r, 2, &mut rng), "[v], a, b, c");
        assert_eq!(
            rewrite_caption(all, &r, 4, &mut rng),
            "[v], a, b, c, d, e, f"
        );
        let shuffled = TagRules { shuffle: true, ..r };
        for _ in 0..10 {
            // floor(3 * 5 / 4) + 1 = 4 at step 3: the first four, in any order.
            let s = rewrite_caption(all, &shuffled, 3, &mut rng);
            let mut tags: Vec<&str> = s.split(", ").collect();
            assert_eq!(tags[0], "[v]");
            tags.sort();
            assert_eq!(tags, ["[v]", "a", "b", "c", "d"], "{s}");
        }
    }

    /// kohya's --keep_tokens_separator: the part before it and the part after a second one stay
    /// in place (empty tags dropped), only the middle moves; without it in the caption, `keep`
    /// applies. Another separator splits the tags; they are joined with ", " all the same.
    #[test]
    fn keep_tokens_separator_fixes_the_head_and_the_tail() {
        let mut rng = Rng::new(9);
        let r = TagRules {
            keep_separator: Some("|||"),
            ..rules(3, true, Some(0.0))
        };
        for _ in 0..10 {
            let s = rewrite_caption("[v], style ||| a, b, c, d ||| best, ", &r, 0, &mut rng);
            let tags: Vec<&str> = s.split(", ").collect();
            assert_eq!(&tags[..2], ["[v]", "style"], "{s}");
            assert_eq!(tags[6], "best", "{s}");
            assert_eq!(tags.len(), 7, "{s}");
            let mut middle = tags[2..6].to_vec();
            middle.sort();
            assert_eq!(middle, ["a", "b", "c", "d"]);
        }
        // No separator in this caption: the first `keep` (3) tags stay.
        let s = rewrite_caption("p, q, r, s, t", &r, 0, &mut rng);
        assert!(s.starts_with("p, q, r, "), "{s}");
        let semi = TagRules {
            separator: ";",
            ..rules(1, true, None)
        };
        let s = rewrite_caption("x; y z; w", &semi, 0, &mut rng);
        assert!(s.starts_with("x, "), "{s}");
        assert_eq!(s.split(", ").count(), 3, "{s}");
    }

    /// A secondary separator keeps its words together through the shuffle, then becomes the
    /// separator; it is replaced with nothing else on.
    #[test]
    fn secondary_separator_binds_words_then_becomes_the_separator() {
        let mut rng = Rng::new(1);
        let r = TagRules {
            secondary: Some(";;"),
            ..rules(0, true, None)
        };
        for _ in 0..10 {
            let s = rewrite_caption("a;;b, c, d", &r, 0, &mut rng);
            assert!(s.contains("a,b"), "{s}");
        }
        let still = TagRules {
            secondary: Some(";;"),
            ..rules(0, false, None)
        };
        assert_eq!(rewrite_caption("a;;b, c", &still, 0, &mut rng), "a,b, c");
    }

    /// One line of several, one option per group; escaped braces stay literal, `{}` and an
    /// unclosed `{` are text, and a caption without wildcards draws nothing.
    #[test]
    fn wildcards_choose_a_line_and_an_option() {
        let mut rng = Rng::new(4);
        let mut lines = std::collections::BTreeSet::new();
        let mut options = std::collections::BTreeSet::new();
        for _ in 0..40 {
            lines.insert(choose_wildcards("one\ntwo\nthree", &mut rng));
            options.insert(choose_wildcards("a {red|blue|green} roof", &mut rng));
        }
        assert_eq!(
            lines.into_iter().collect::<Vec<_>>(),
            ["one", "three", "two"]
        );
        assert_eq!(
            options.into_iter().collect::<Vec<_>>(),
            ["a blue roof", "a green roof", "a red roof"]
        );
        let before = rng.clone();
        assert_eq!(choose_wildcards("{{a|b}} {} {x", &mut rng), "{a|b} {} {x");
        assert_eq!(rng, before);
        assert_eq!(choose_wildcards("{only}", &mut rng), "only");
        // `}}` never closes a group: kohya's placeholders take it first.
        assert_eq!(choose_wildcards("{a|a}}", &mut rng), "{a|a}");
        let w = TagRules {
            wildcard: true,
            ..rules(1, true, None)
        };
        let s = rewrite_caption("[v], {x|x}, y", &w, 0, &mut rng);
        assert!(s == "[v], x, y" || s == "[v], y, x", "{s}");
    }
}
