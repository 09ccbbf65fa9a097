//! The library's typed error: every variant names the op, file, key or shapes involved.

use crate::tensor::{DType, Shape};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch, lhs {lhs:?} rhs {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },

    #[error("{op}: cannot broadcast {lhs:?} with {rhs:?}")]
    Broadcast {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },

    #[error("{op}: expected rank {expected}, got shape {got:?}")]
    Rank {
        op: &'static str,
        expected: usize,
        got: Shape,
    },

    #[error("{op}: dimension {dim} out of range for shape {shape:?}")]
    DimOutOfRange {
        op: &'static str,
        dim: usize,
        shape: Shape,
    },

    #[error("{op}: {msg} (shape {shape:?})")]
    BadShape {
        op: &'static str,
        msg: String,
        shape: Shape,
    },

    #[error("{op}: unsupported dtype {dtype:?}")]
    DType { op: &'static str, dtype: DType },

    #[error("{op}: dtype mismatch, lhs {lhs:?} rhs {rhs:?}")]
    DTypeMismatch {
        op: &'static str,
        lhs: DType,
        rhs: DType,
    },

    #[error("{op}: tensors live on different devices ({lhs} and {rhs})")]
    DeviceMismatch {
        op: &'static str,
        lhs: String,
        rhs: String,
    },

    #[error("device {0} is not available: {1}")]
    DeviceUnavailable(String, String),

    #[error("{op}: element count {got} does not match shape {shape:?}")]
    ElementCount {
        op: &'static str,
        got: usize,
        shape: Shape,
    },

    #[error("backward: {0}")]
    Backward(String),

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("{path}: missing tensor `{key}`")]
    MissingKey { path: PathBuf, key: String },

    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        key: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("{path}: unexpected tensors: {keys}")]
    UnexpectedKeys { path: PathBuf, keys: String },

    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{path}: invalid safetensors: {msg}")]
    SafeTensors { path: PathBuf, msg: String },

    #[error("{path}: invalid json: {msg}")]
    Json { path: PathBuf, msg: String },

    /// Checkpoint formats, key maps and LoRA files (their own error family).
    #[error(transparent)]
    Format(#[from] crate::formats::Error),

    /// The `tokenizers` crate refused a file or an input; `what` is the folder or the op.
    #[error("tokenizer {what}: {msg}")]
    Tokenizer { what: String, msg: String },

    /// NVRTC: library loading, API failures, compile errors with the full log.
    #[error(transparent)]
    Nvrtc(#[from] crate::backend::cuda::nvrtc::NvrtcError),

    /// A CUDA driver, cuBLAS or launch failure, naming the op (or kernel) that hit it.
    #[error("cuda {op}: {msg}")]
    Cuda { op: String, msg: String },

    #[error("config: {0}")]
    Config(String),

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }

    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn bad_shape(op: &'static str, msg: impl Into<String>, shape: &[usize]) -> Self {
        Error::BadShape {
            op,
            msg: msg.into(),
            shape: Shape::from(shape),
        }
    }

    pub fn cuda(op: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Cuda {
            op: op.into(),
            msg: err.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}

/// `bail!`-style early return with a formatted [`Error::Msg`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Msg(format!($($arg)*)))
    };
}
