//! kohya's fine-tuning subsets: a metadata `.json` (what kohya's `merge_captions_to_metadata.py`
//! and `merge_dd_tags_to_metadata.py` write) that maps each picture's key to its `caption` and
//! `tags`, instead of caption files beside the pictures.
//!
//! A key is a picture's path as it stands (absolute, or relative to the working folder, as
//! kohya's `os.path.exists` reads it), else its name without extension in the subset's
//! `image_dir` (the first of `name.png`, `name.jpg`, ... in sorted order, as kohya globs it). A
//! picture's caption is its `caption` with `, tags` added to each line, or its `tags` alone;
//! an entry with neither trains on the empty caption, as kohya's. `train_resolution` (the
//! bucket kohya's `prepare_buckets_latents.py` chose) is read by kohya; kstyle buckets the
//! picture itself, and kohya's `.npz` latents are not read.

use super::data::{
    is_image, load_training_picture, sha256_hex, CaptionSource, Dataset, Role, Sample,
    IMAGE_EXTENSIONS,
};
use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A JSON table's entries in the file's order (serde_json's own map sorts its keys; kohya's
/// Python dict keeps the file's order, and so the pictures' order).
struct Ordered(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Ordered, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of picture keys, each with its caption and tags")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Ordered, M::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// The picture a metadata key names, if it exists.
fn picture_of(key: &str, image_dir: Option<&Path>) -> Option<PathBuf> {
    let direct = PathBuf::from(key);
    if direct.is_file() {
        return Some(direct);
    }
    let dir = image_dir?;
    let mut found: Vec<PathBuf> = IMAGE_EXTENSIONS
        .iter()
        .flat_map(|e| [e.to_string(), e.to_ascii_uppercase()])
        .map(|e| dir.join(format!("{key}.{e}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A metadata entry's caption text: `caption` with `, tags` on each line, or `tags` alone.
fn caption_text(entry: &serde_json::Map<String, Value>) -> std::result::Result<String, String> {
    let text = |k: &str| match entry.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("`{k}` must be a string, got {v}")),
    };
    let (caption, tags) = (text("caption")?, text("tags")?);
    Ok(match (caption, tags) {
        (None, tags) => tags.unwrap_or_default(),
        (Some(c), Some(t)) if !t.is_empty() => c
            .lines()
            .map(|l| format!("{l}, {t}"))
            .collect::<Vec<_>>()
            .join("\n"),
        (Some(c), _) => c,
    })
}

/// The pictures of a fine-tuning subset, each visited `repeats` times an epoch. A key naming
/// no picture, an entry that is not a table, a caption or tags that are not text and a picture
/// that does not decode are errors naming the metadata file and the key.
pub fn scan_metadata(
    file: &Path,
    image_dir: Option<&Path>,
    repeats: usize,
    captions: &CaptionSource,
) -> Result<Dataset> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let Ordered(entries) =
        serde_json::from_str(&text).map_err(|e| Error::file(file, e.to_string()))?;
    let mut samples = Vec::new();
    for (key, entry) in &entries {
        let at = |m: String| Error::file(file, format!("`{key}`: {m}"));
        let entry = entry
            .as_object()
            .ok_or_else(|| at("expected a table with `caption` and / or `tags`".into()))?;
        let path = picture_of(key, image_dir).ok_or_else(|| {
            at(match image_dir {
                Some(d) => format!(
                    "no picture: neither that path nor {}/{key}.{{{}}} exists",
                    d.display(),
                    IMAGE_EXTENSIONS.join(",")
                ),
                None => "no picture at that path (give the subset an image_dir to look in)".into(),
            })
        })?;
        if !is_image(&path) {
            return Err(at(format!(
                "{} is not a {} picture",
                path.display(),
                IMAGE_EXTENSIONS.join("/")
            )));
        }
        let caption = caption_text(entry).map_err(at)?;
        let size = load_training_picture(&path)?.dimensions();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        samples.push(Sample {
            path,
            caption: captions.caption_of_text(&caption),
            hash: sha256_hex(&bytes),
            repeats,
            role: Role::Style,
            size,
            rules: 0,
            group: 0,
        });
    }
    Ok(Dataset {
        samples,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caption(v: Value) -> std::result::Result<String, String> {
        caption_text(v.as_object().unwrap())
    }

    #[test]
    fn tags_join_each_caption_line() {
        assert_eq!(
            caption(json!({"caption": "a frog\nsecond line", "tags": "open mouth, frog"})).unwrap(),
            "a frog, open mouth, frog\nsecond line, open mouth, frog"
        );
        assert_eq!(caption(json!({"tags": "frog"})).unwrap(), "frog");
        assert_eq!(
            caption(json!({"caption": "a frog", "tags": ""})).unwrap(),
            "a frog"
        );
        assert_eq!(caption(json!({"train_resolution": [64, 64]})).unwrap(), "");
        assert!(caption(json!({"caption": 3}))
            .unwrap_err()
            .contains("`caption` must be a string, got 3"));
    }
}
