//! Path-prefixed weight loading. Model code asks for `vb.pp("down_blocks").pp(0).get(shape, "weight")`;
//! the loader finds the tensor in its sources, checks the shape, converts dtype and device, and
//! remembers what was used so unused tensors can be reported. Key renames (single-file, kohya)
//! happen before a map ever reaches this type.

use crate::tensor::{SafeTensorsFile, Tensor};
use crate::{DType, Device, Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

enum Source {
    File(SafeTensorsFile),
    Map {
        origin: PathBuf,
        tensors: BTreeMap<String, Tensor>,
    },
}

impl Source {
    fn origin(&self) -> &Path {
        match self {
            Source::File(f) => f.path(),
            Source::Map { origin, .. } => origin,
        }
    }
    fn contains(&self, key: &str) -> bool {
        match self {
            Source::File(f) => f.contains(key),
            Source::Map { tensors, .. } => tensors.contains_key(key),
        }
    }
    fn get(&self, key: &str) -> Result<Tensor> {
        match self {
            Source::File(f) => f.tensor(key),
            Source::Map { origin, tensors } => {
                tensors.get(key).cloned().ok_or_else(|| Error::MissingKey {
                    path: origin.clone(),
                    key: key.into(),
                })
            }
        }
    }
    fn keys(&self) -> Vec<String> {
        match self {
            Source::File(f) => f.names().map(String::from).collect(),
            Source::Map { tensors, .. } => tensors.keys().cloned().collect(),
        }
    }
}

struct Shared {
    sources: Vec<Source>,
    used: Mutex<BTreeSet<String>>,
}

/// A view of a set of weight sources under a key prefix.
#[derive(Clone)]
pub struct Weights {
    shared: Arc<Shared>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Weights from safetensors files (shards of one model).
    pub fn from_files(paths: &[impl AsRef<Path>], dtype: DType, device: Device) -> Result<Weights> {
        let sources = paths
            .iter()
            .map(|p| SafeTensorsFile::open(p).map(Source::File))
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights::new(sources, dtype, device))
    }

    /// Weights from tensors already in memory (converted single-file checkpoints, tests).
    /// `origin` names where they came from in error messages.
    pub fn from_map(
        tensors: BTreeMap<String, Tensor>,
        origin: impl Into<PathBuf>,
        dtype: DType,
        device: Device,
    ) -> Weights {
        Weights::new(
            vec![Source::Map {
                origin: origin.into(),
                tensors,
            }],
            dtype,
            device,
        )
    }

    fn new(sources: Vec<Source>, dtype: DType, device: Device) -> Weights {
        Weights {
            shared: Arc::new(Shared {
                sources,
                used: Mutex::new(BTreeSet::new()),
            }),
            prefix: String::new(),
            dtype,
            device,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The same sources, loading as another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Weights {
        Weights {
            dtype,
            ..self.clone()
        }
    }

    /// Descend one level: `pp("attn1")`, `pp(0)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Weights {
            prefix,
            ..self.clone()
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let key = self.key(name);
        self.shared.sources.iter().any(|s| s.contains(&key))
    }

    /// The tensor `prefix.name`, checked against `shape`, in this loader's dtype and device.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let key = self.key(name);
        let Some(src) = self.shared.sources.iter().find(|s| s.contains(&key)) else {
            let origin = self
                .shared
                .sources
                .first()
                .map(|s| s.origin().to_path_buf())
                .unwrap_or_default();
            return Err(Error::MissingKey { path: origin, key });
        };
        let t = src.get(&key)?;
        if t.dims() != shape {
            return Err(Error::WrongShape {
                path: src.origin().to_path_buf(),
                key,
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        self.shared
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        t.to_dtype(self.dtype)?.to_device(self.device)
    }

    /// The tensor if present (optional biases, legacy names).
    pub fn get_opt(&self, shape: &[usize], name: &str) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(shape, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Keys of all sources that no `get` has touched, minus those matching `ignore`.
    pub fn unused(&self, ignore: impl Fn(&str) -> bool) -> Vec<String> {
        let used = self.shared.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = self
            .shared
            .sources
            .iter()
            .flat_map(|s| s.keys())
            .filter(|k| !used.contains(k) && !ignore(k))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Fail when tensors were left unused: a checkpoint that does not match the config.
    pub fn ensure_all_used(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let unused = self.unused(ignore);
        if unused.is_empty() {
            return Ok(());
        }
        let origin = self
            .shared
            .sources
            .first()
            .map(|s| s.origin().to_path_buf())
            .unwrap_or_default();
        let shown: Vec<&str> = unused.iter().take(12).map(|s| s.as_str()).collect();
        let more = if unused.len() > 12 {
            format!(" (and {} more)", unused.len() - 12)
        } else {
            String::new()
        };
        Err(Error::UnexpectedKeys {
            path: origin,
            keys: format!("{}{more}", shown.join(", ")),
        })
    }
}
