//! The formats layer's typed error. Every variant names the file (or the conversion it came
//! from), the key and the shape involved, because a failing load of a 7 GB checkpoint is only
//! debuggable from the message.

use safetensors::Dtype;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// Truncated file, bad header, overlapping offsets: everything `safetensors` rejects.
    #[error("{path}: invalid safetensors file: {msg}")]
    SafeTensors { path: PathBuf, msg: String },

    #[error("{path}: invalid json: {msg}")]
    Json { path: PathBuf, msg: String },

    /// A well-formed file whose content does not make sense (bad config value, index that
    /// points at a missing shard, no weights in a component folder).
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("{context}: missing tensor `{key}`")]
    MissingKey { context: String, key: String },

    /// Keys that map nowhere. `keys` is the full list; the message shows the first few.
    #[error("{context}: {} unexpected tensor(s): {}", keys.len(), preview(keys))]
    UnexpectedKeys { context: String, keys: Vec<String> },

    #[error("{context}: tensor `{key}` appears twice")]
    DuplicateKey { context: String, key: String },

    #[error("{context}: tensor `{key}` has shape {got:?}, expected {expected}")]
    WrongShape {
        context: String,
        key: String,
        got: Vec<usize>,
        expected: String,
    },

    #[error("{context}: tensor `{key}` has unsupported dtype {dtype:?}")]
    DType {
        context: String,
        key: String,
        dtype: Dtype,
    },

    /// A LoRA module whose tensors are incomplete or inconsistent (down without up, ...).
    #[error("{context}: LoRA module `{module}`: {msg}")]
    Lora {
        context: String,
        module: String,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// The first keys of a list, so that 1000 stray keys give a readable message while the
/// variant still carries all of them for the caller.
fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", keys.len() - SHOWN));
    }
    s
}
