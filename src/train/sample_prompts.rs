//! The previews' settings and kohya's sample-prompt files: `.txt` (one prompt a line with
//! `--n --w --h --s --l --d --ss` options), `.toml` (a `[prompt]` table of shared settings and
//! `[[prompt.subset]]` tables, one a prompt) and `.json` (a list of prompt lines or tables), as
//! sd-scripts' `load_prompts` reads them. Whatever a file holds that kstyle would not honour (an
//! unknown option or key, a value of the wrong type, a size that is not a multiple of 8) is an
//! error naming the file and the line or entry: kohya skips such settings with a warning.

use crate::sample::pipeline::{SamplerKind, Sigmas};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// One preview's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplePrompt {
    pub prompt: String,
    /// None: SDXL's zero negative embeddings, as generate without --negative.
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    /// The sampler, as `kstyle generate --sampler` runs it (`Auto`: the model's scheduler).
    pub sampler: SamplerKind,
}

impl SamplePrompt {
    /// A prompt with the run's defaults: square at `resolution`, guidance 5, Euler.
    pub fn new(prompt: &str, resolution: usize, steps: usize, seed: u64) -> SamplePrompt {
        SamplePrompt {
            prompt: prompt.to_string(),
            negative: None,
            width: resolution,
            height: resolution,
            steps,
            guidance: 5.0,
            seed,
            sampler: SamplerKind::Euler(Sigmas::Config),
        }
    }
}

/// The keys a prompt table of a `.toml` or `.json` file may hold.
const KEYS: &str =
    "prompt, negative_prompt, width, height, sample_steps, scale, seed, sample_sampler";

/// The previews of a kohya sample-prompt file, by its extension (`.toml`, `.json`; any other is
/// read as lines). A setting a prompt does not give is `defaults`'.
pub fn parse_prompt_file(path: &Path, defaults: &SamplePrompt) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let out = match ext.as_deref() {
        Some("toml") => {
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
            let entries = toml_entries(table).map_err(|m| Error::file(path, m))?;
            parse_entries(path, entries, "[[prompt.subset]]", defaults)?
        }
        Some("json") => {
            let value: Value =
                serde_json::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
            let Value::Array(entries) = value else {
                return Err(Error::file(
                    path,
                    "expected a list of prompts (lines or tables)",
                ));
            };
            parse_entries(path, entries, "entry", defaults)?
        }
        _ => {
            let mut out = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let at = |m: String| Error::file(path, format!("line {}: {m}", n + 1));
                out.push(parse_line(line, defaults).map_err(at)?);
            }
            out
        }
    };
    if out.is_empty() {
        return Err(Error::file(path, "no prompts"));
    }
    Ok(out)
}

/// kohya's `.toml` layout: each `[[prompt.subset]]` table over the `[prompt]` table's shared
/// settings (a subset's own value wins; kohya refuses a key given in both).
fn toml_entries(mut table: toml::Table) -> std::result::Result<Vec<Value>, String> {
    let Some(toml::Value::Table(mut shared)) = table.remove("prompt") else {
        return Err(
            "no [prompt] table (kohya's layout: [prompt] with shared settings and \
                    [[prompt.subset]] tables, one a prompt)"
                .into(),
        );
    };
    let Some(toml::Value::Array(subsets)) = shared.remove("subset") else {
        return Err("no [[prompt.subset]] tables (one a prompt)".into());
    };
    if let Some(key) = table.keys().next() {
        return Err(format!("unknown top-level key `{key}` (only [prompt])"));
    }
    let shared = serde_json::to_value(shared).map_err(|e| e.to_string())?;
    subsets
        .into_iter()
        .enumerate()
        .map(|(i, subset)| {
            let (Value::Object(mut merged), Value::Object(own)) = (
                shared.clone(),
                serde_json::to_value(subset).map_err(|e| e.to_string())?,
            ) else {
                return Err(format!("[[prompt.subset]] {}: not a table", i + 1));
            };
            merged.extend(own);
            Ok(Value::Object(merged))
        })
        .collect()
}

fn parse_entries(
    path: &Path,
    entries: Vec<Value>,
    what: &str,
    defaults: &SamplePrompt,
) -> Result<Vec<SamplePrompt>> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let p = match entry {
                Value::String(line) => parse_line(line.trim(), defaults),
                Value::Object(map) => parse_table(map, defaults),
                other => Err(format!("a prompt line or table of settings, not `{other}`")),
            };
            p.map_err(|m| Error::file(path, format!("{what} {}: {m}", i + 1)))
        })
        .collect()
}

/// One prompt line: the prompt, then options after ` --`: `n` negative prompt, `w` / `h` size,
/// `s` steps, `l` guidance, `d` seed, `ss` sampler. Other options (kohya's ControlNet image
/// and the video trainers' switches) are refused.
fn parse_line(line: &str, defaults: &SamplePrompt) -> std::result::Result<SamplePrompt, String> {
    let mut parts = line.split(" --");
    let mut p = SamplePrompt {
        prompt: parts.next().unwrap_or_default().trim().to_string(),
        ..defaults.clone()
    };
    for part in parts {
        let (key, value) = part.trim().split_once(' ').unwrap_or((part.trim(), ""));
        let value = value.trim();
        let number = |what: &str| -> std::result::Result<f64, String> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("--{key} takes {what}, got `{value}`"))
        };
        let whole = |what: &str| -> std::result::Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("--{key} takes {what}, got `{value}`"))
        };
        match key.to_ascii_lowercase().as_str() {
            "n" => p.negative = Some(value.to_string()),
            "w" => p.width = whole("a width")? as usize,
            "h" => p.height = whole("a height")? as usize,
            "s" => p.steps = whole("a step count")? as usize,
            "l" => p.guidance = number("a guidance scale")?,
            "d" => p.seed = whole("a seed")?,
            "ss" => p.sampler = sampler(value).map_err(|e| format!("--ss: {e}"))?,
            _ => {
                return Err(format!(
                    "unknown option --{key} (previews take --n, --w, --h, --s, --l, --d, --ss)"
                ))
            }
        }
    }
    if p.prompt.starts_with("--") {
        p.prompt.clear();
    }
    check(p)
}

/// One prompt table of a `.toml` or `.json` file (kohya's prompt dict; its own `enum`, the
/// prompt's number, is ignored).
fn parse_table(
    map: &Map<String, Value>,
    defaults: &SamplePrompt,
) -> std::result::Result<SamplePrompt, String> {
    let mut p = SamplePrompt {
        prompt: String::new(),
        ..defaults.clone()
    };
    if map.contains_key("scale") && map.contains_key("guidance_scale") {
        return Err("both `scale` and `guidance_scale`: give one".into());
    }
    for (key, value) in map {
        let text = || {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{key}` takes a string, got `{value}`"))
        };
        let whole = || {
            value
                .as_u64()
                .ok_or_else(|| format!("`{key}` takes a whole number, got `{value}`"))
        };
        match key.as_str() {
            "prompt" => p.prompt = text()?,
            "negative_prompt" if value.is_null() => p.negative = None,
            "negative_prompt" => p.negative = Some(text()?),
            "width" => p.width = whole()? as usize,
            "height" => p.height = whole()? as usize,
            "sample_steps" => p.steps = whole()? as usize,
            "seed" => p.seed = whole()?,
            "scale" | "guidance_scale" => {
                p.guidance = value
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("`{key}` takes a number, got `{value}`"))?
            }
            "sample_sampler" => p.sampler = sampler(&text()?).map_err(|e| format!("{key}: {e}"))?,
            "enum" => {}
            _ => return Err(format!("unknown key `{key}` (previews take {KEYS})")),
        }
    }
    check(p)
}

fn sampler(name: &str) -> std::result::Result<SamplerKind, String> {
    SamplerKind::from_name(name).map_err(|e| match e {
        Error::Config(m) => m,
        other => other.to_string(),
    })
}

/// The checks every preview passes, whatever file it came from.
fn check(p: SamplePrompt) -> std::result::Result<SamplePrompt, String> {
    if p.prompt.trim().is_empty() {
        return Err("no prompt".into());
    }
    if p.width == 0 || p.height == 0 || p.width % 8 != 0 || p.height % 8 != 0 {
        return Err(format!(
            "the size {}x{} is not a positive multiple of 8",
            p.width, p.height
        ));
    }
    if p.steps == 0 {
        return Err("the step count must be at least 1".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_prompt_lines_parse_with_their_options() {
        let d = SamplePrompt::new("", 1024, 20, 7);
        let p = parse_line(
            "a [v] house at dusk --n blurry, low quality --w 768 --h 1344 --s 28 --l 7.5 --d 42 \
             --ss k_euler_a",
            &d,
        )
        .unwrap();
        assert_eq!(
            p,
            SamplePrompt {
                prompt: "a [v] house at dusk".into(),
                negative: Some("blurry, low quality".into()),
                width: 768,
                height: 1344,
                steps: 28,
                guidance: 7.5,
                seed: 42,
                sampler: SamplerKind::EulerAncestral,
            }
        );
        assert_eq!(
            parse_line("just a prompt", &d).unwrap(),
            SamplePrompt::new("just a prompt", 1024, 20, 7)
        );
        for (bad, needle) in [
            ("x --w 100", "multiple of 8"),
            ("x --cn control.png", "unknown option --cn"),
            (
                "x --ss pndm",
                "--ss: kohya's sampler `pndm` is not implemented",
            ),
            ("x --l much", "--l takes"),
            ("--w 512", "no prompt"),
            ("x --s 0", "step count"),
        ] {
            let e = parse_line(bad, &d).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kstyle-sample-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn kohya_toml_and_json_prompt_files() {
        let d = SamplePrompt::new("", 1024, 20, 7);
        let toml = write(
            "p.toml",
            "[prompt]\nwidth = 768\nscale = 4\nsample_sampler = \"dpmsolver++\"\n\n\
             [[prompt.subset]]\nprompt = \"a house\"\nnegative_prompt = \"blurry\"\n\
             sample_steps = 12\nseed = 3\n\n\
             [[prompt.subset]]\nprompt = \"a gate\"\nwidth = 512\nheight = 640\n\
             scale = 6.5\nsample_sampler = \"euler_a\"\n",
        );
        let got = parse_prompt_file(&toml, &d).unwrap();
        let dpm = SamplerKind::DpmPP {
            order: 2,
            sde: false,
            sigmas: Sigmas::Config,
        };
        assert_eq!(
            got,
            vec![
                SamplePrompt {
                    negative: Some("blurry".into()),
                    width: 768,
                    steps: 12,
                    guidance: 4.0,
                    seed: 3,
                    sampler: dpm,
                    ..SamplePrompt::new("a house", 1024, 20, 7)
                },
                SamplePrompt {
                    width: 512,
                    height: 640,
                    guidance: 6.5,
                    sampler: SamplerKind::EulerAncestral,
                    ..SamplePrompt::new("a gate", 1024, 20, 7)
                },
            ]
        );
        let json = write(
            "p.json",
            r#"["a house --w 512 --ss ddim",
                {"prompt": "a gate", "negative_prompt": null, "guidance_scale": 3, "enum": 9}]"#,
        );
        assert_eq!(
            parse_prompt_file(&json, &d).unwrap(),
            vec![
                SamplePrompt {
                    width: 512,
                    sampler: SamplerKind::Ddim { eta: 0.0 },
                    ..SamplePrompt::new("a house", 1024, 20, 7)
                },
                SamplePrompt {
                    guidance: 3.0,
                    ..SamplePrompt::new("a gate", 1024, 20, 7)
                },
            ]
        );
        for (name, text, needle) in [
            ("a.toml", "[prompt]\nwidth = 512\n", "no [[prompt.subset]]"),
            ("c.toml", "prompt = 3\n", "no [prompt] table"),
            ("d.toml", "[prompt\n", "line 1"),
            (
                "e.toml",
                "[[prompt.subset]]\nprompt = \"x\"\ncontrolnet_image = \"c.png\"\n",
                "[[prompt.subset]] 1: unknown key `controlnet_image`",
            ),
            (
                "f.json",
                r#"[{"prompt": "x"}, {"prompt": "y", "width": 512.5}]"#,
                "entry 2: `width` takes a whole number",
            ),
            ("g.json", r#"{"prompt": "x"}"#, "a list of prompts"),
            ("h.json", r#"[3]"#, "entry 1: a prompt line or table"),
            (
                "i.json",
                r#"[{"negative_prompt": "x"}]"#,
                "entry 1: no prompt",
            ),
            (
                "j.json",
                r#"[{"prompt": "x", "scale": 1, "guidance_scale": 2}]"#,
                "both",
            ),
            ("k.json", r#"[]"#, "no prompts"),
            (
                "l.json",
                r#"[{"prompt": "x", "sample_sampler": "k_heun"}]"#,
                "unknown sampler",
            ),
            ("m.txt", "# only a comment\n", "no prompts"),
        ] {
            let e = parse_prompt_file(&write(name, text), &d)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
        }
    }
}
