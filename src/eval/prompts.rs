//! Evaluation prompt sets: five categories (architecture, fashion, art, portrait, landscape), each
//! with explicit prompts (containing the trigger phrase) and generic ones (without it). Users
//! bring their own as a TSV file: `category<TAB>explicit|generic<TAB>prompt`, `{trigger}` expanded.

use crate::{Error, Result};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PromptKind {
    /// Contains the trigger phrase: CSS(Exp).
    Explicit,
    /// Does not: CSS(Gen) measures whether the style leaks into plain prompts.
    Generic,
}

impl PromptKind {
    pub fn name(self) -> &'static str {
        match self {
            PromptKind::Explicit => "explicit",
            PromptKind::Generic => "generic",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    pub category: String,
    pub kind: PromptKind,
    pub text: String,
}

/// The built-in set (Korean traditional culture; `{trigger}` is the configurable phrase).
const DEFAULT_SET: &str = "\
architecture\texplicit\ta {trigger} palace with curved tiled roofs and painted eaves
architecture\texplicit\ta {trigger} house in a quiet village, wooden beams and paper windows
architecture\tgeneric\ta palace with curved tiled roofs and painted eaves
architecture\tgeneric\ta house in a quiet village, wooden beams and paper windows
fashion\texplicit\ta woman wearing a {trigger} dress with a high-waisted skirt
fashion\texplicit\ta man in {trigger} clothing with a wide-brimmed black hat
fashion\tgeneric\ta woman wearing a traditional dress with a high-waisted skirt
fashion\tgeneric\ta man in traditional clothing with a wide-brimmed black hat
art\texplicit\ta {trigger} ink painting of mountains and pine trees
art\texplicit\ta {trigger} folk painting of a tiger and a magpie
art\tgeneric\tan ink painting of mountains and pine trees
art\tgeneric\ta folk painting of a tiger and a magpie
portrait\texplicit\ta portrait of an elderly scholar in {trigger} attire
portrait\texplicit\ta portrait of a young musician playing a {trigger} zither
portrait\tgeneric\ta portrait of an elderly scholar
portrait\tgeneric\ta portrait of a young musician playing a zither
landscape\texplicit\ta {trigger} garden with a pavilion beside a lotus pond
landscape\texplicit\ta {trigger} fortress wall winding over autumn hills
landscape\tgeneric\ta garden with a pavilion beside a lotus pond
landscape\tgeneric\ta fortress wall winding over autumn hills
";

/// Parse a prompt-set text (see the module doc); `origin` names it in errors.
pub fn parse(text: &str, trigger: &str, origin: &Path) -> Result<Vec<EvalPrompt>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.splitn(3, '\t').collect();
        let [category, kind, prompt] = parts[..] else {
            return Err(Error::file(
                origin,
                format!(
                    "line {}: expected `category<TAB>explicit|generic<TAB>prompt`",
                    i + 1
                ),
            ));
        };
        let kind = match kind.trim() {
            "explicit" => PromptKind::Explicit,
            "generic" => PromptKind::Generic,
            other => {
                return Err(Error::file(
                    origin,
                    format!(
                        "line {}: kind `{other}` is neither explicit nor generic",
                        i + 1
                    ),
                ))
            }
        };
        out.push(EvalPrompt {
            category: category.trim().to_string(),
            kind,
            text: prompt.trim().replace("{trigger}", trigger),
        });
    }
    if out.is_empty() {
        return Err(Error::file(origin, "no prompts"));
    }
    Ok(out)
}

pub fn default_prompts(trigger: &str) -> Vec<EvalPrompt> {
    parse(DEFAULT_SET, trigger, Path::new("<built-in prompts>"))
        .expect("the built-in prompt set parses")
}

pub fn load_prompts(path: &Path, trigger: &str) -> Result<Vec<EvalPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, trigger, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_has_every_category_both_ways() {
        let p = default_prompts("Korean traditional");
        for c in ["architecture", "fashion", "art", "portrait", "landscape"] {
            for k in [PromptKind::Explicit, PromptKind::Generic] {
                assert!(
                    p.iter().any(|e| e.category == c && e.kind == k),
                    "{c} {k:?}"
                );
            }
        }
        assert!(p
            .iter()
            .filter(|e| e.kind == PromptKind::Explicit)
            .all(|e| e.text.contains("Korean traditional")));
        assert!(p
            .iter()
            .filter(|e| e.kind == PromptKind::Generic)
            .all(|e| !e.text.contains("Korean traditional")));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = parse("art\tsometimes\tx\n", "t", Path::new("p.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.tsv") && e.contains("line 1"), "{e}");
    }
}
