//! Textual-inversion embeddings for SDXL: the safetensors files A1111, ComfyUI and kohya's
//! sd-scripts write, with one row per vector for each text encoder: `clip_l` (text_encoder,
//! CLIP ViT-L) and `clip_g` (text_encoder_2, OpenCLIP ViT-bigG). As diffusers'
//! `load_textual_inversion` uses them: an embedding NAME of n vectors becomes the added tokens
//! NAME, NAME_1, ..., NAME_(n-1), whose embedding rows are the file's vectors, and a prompt naming
//! NAME spells it out as "NAME NAME_1 ..." ([`crate::models::clip::tokenizer::ClipTokenizer::expand_added_tokens`]).

use crate::tensor::SafeTensorsFile;
use crate::{Error, Result, Tensor};
use std::path::{Path, PathBuf};

/// One embedding file.
#[derive(Clone, Debug)]
pub struct TextualInversion {
    pub path: PathBuf,
    /// The word prompts use (the file stem unless given).
    pub name: String,
    /// (n, D1): text_encoder's rows.
    pub clip_l: Option<Tensor>,
    /// (n, D2): text_encoder_2's rows.
    pub clip_g: Option<Tensor>,
}

impl TextualInversion {
    /// Reads `path`; `name` defaults to the file stem (A1111's and ComfyUI's convention).
    pub fn load(path: &Path, name: Option<&str>) -> Result<TextualInversion> {
        let name = match name {
            Some(n) => n.to_string(),
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(Error::file(
                path,
                format!("embedding name {name:?} must be one word (name it with FILE:NAME)"),
            ));
        }
        let f = SafeTensorsFile::open(path)?;
        let get = |key: &str| -> Result<Option<Tensor>> {
            if !f.contains(key) {
                return Ok(None);
            }
            let t = f.tensor(key)?;
            match t.dims() {
                [n, d] if *n > 0 && *d > 0 => Ok(Some(t)),
                dims => Err(Error::file(
                    path,
                    format!("`{key}` must be (vectors, width), got shape {dims:?}"),
                )),
            }
        };
        let (clip_l, clip_g) = (get("clip_l")?, get("clip_g")?);
        if clip_l.is_none() && clip_g.is_none() {
            let keys: Vec<&str> = f.names().collect();
            let sd1 = keys
                .iter()
                .any(|k| *k == "emb_params" || k.starts_with("string_to_param"));
            let hint = if sd1 {
                " (an SD 1.x embedding; SDXL's hold `clip_l` and `clip_g`)"
            } else {
                ""
            };
            return Err(Error::file(
                path,
                format!(
                    "holds no `clip_l` / `clip_g` tensors{hint}; its keys: {}",
                    keys.join(", ")
                ),
            ));
        }
        if let (Some(l), Some(g)) = (&clip_l, &clip_g) {
            if l.dims()[0] != g.dims()[0] {
                return Err(Error::file(
                    path,
                    format!(
                        "`clip_l` has {} vectors and `clip_g` {}: one token each, they must agree",
                        l.dims()[0],
                        g.dims()[0]
                    ),
                ));
            }
        }
        Ok(TextualInversion {
            path: path.to_path_buf(),
            name,
            clip_l,
            clip_g,
        })
    }

    /// How many tokens the embedding occupies in a prompt.
    pub fn vectors(&self) -> usize {
        self.clip_g
            .as_ref()
            .or(self.clip_l.as_ref())
            .map_or(0, |t| t.dims()[0])
    }

    /// The added tokens: NAME, NAME_1, ..., as diffusers' `load_textual_inversion` names them.
    pub fn tokens(&self) -> Vec<String> {
        (0..self.vectors())
            .map(|i| match i {
                0 => self.name.clone(),
                i => format!("{}_{i}", self.name),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
        let t: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, dims)| {
                let n = dims.iter().product();
                let v = Tensor::from_vec(vec![0.5f32; n], dims.clone(), Device::Cpu).unwrap();
                (k.to_string(), v)
            })
            .collect();
        let p = dir.join(name);
        crate::tensor::save_safetensors(&p, &t, None).unwrap();
        p
    }

    #[test]
    fn names_tokens_and_shapes() {
        let dir = std::env::temp_dir().join(format!("kstyle-ti-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = write(
            &dir,
            "style.safetensors",
            &[("clip_l", vec![3, 8]), ("clip_g", vec![3, 16])],
        );
        let ti = TextualInversion::load(&ok, None).unwrap();
        assert_eq!(ti.name, "style");
        assert_eq!(ti.vectors(), 3);
        assert_eq!(ti.tokens(), ["style", "style_1", "style_2"]);
        assert_eq!(
            TextualInversion::load(&ok, Some("other")).unwrap().tokens()[0],
            "other"
        );
        let err = TextualInversion::load(&ok, Some("two words"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("one word"), "{err}");
        let uneven = write(
            &dir,
            "uneven.safetensors",
            &[("clip_l", vec![2, 8]), ("clip_g", vec![3, 16])],
        );
        let err = TextualInversion::load(&uneven, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must agree"), "{err}");
        let flat = write(&dir, "flat.safetensors", &[("clip_g", vec![16])]);
        let err = TextualInversion::load(&flat, None).unwrap_err().to_string();
        assert!(err.contains("`clip_g` must be (vectors, width)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
