//! Configs as Python writes them. diffusers and transformers save configs with `json.dumps`,
//! which writes the non-finite floats as the bare words `NaN`, `Infinity` and `-Infinity`: a
//! `DPMSolverMultistepScheduler` config saved by diffusers holds `"lambda_min_clipped":
//! -Infinity`, its default. Strict JSON parsers refuse those words; here they read as `null`,
//! which every config reader takes as "the default".

use std::borrow::Cow;

/// `text` with every `NaN`, `Infinity` and `-Infinity` outside a string replaced by `null`.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push_str("null");
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// Parses a config written by Python's `json.dumps`.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> serde_json::Result<T> {
    serde_json::from_str(&sanitize(text))
}

/// Reads and parses a config file written by Python's `json.dumps`: every config reader's one
/// way in. Errors name the file.
pub fn read_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> crate::formats::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::formats::Error::io(path, e))?;
    parse(&text).map_err(|e| crate::formats::Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_words_read_as_null_outside_strings_only() {
        let text = r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity \" Infinity"}"#;
        let v: serde_json::Value = parse(text).unwrap();
        assert!(v["a"].is_null() && v["b"][0].is_null() && v["b"][1].is_null());
        assert_eq!(v["c"], "NaN -Infinity \" Infinity");
        assert!(matches!(sanitize(r#"{"a": 1}"#), Cow::Borrowed(_)));
    }
}
