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

/// How a model's weights are held: the dtype it loads and computes in and, optionally, a
/// narrower storage type for its Linear and convolution weights (float8, `--weight-dtype`),
/// widened per GEMM. A plain `DType` converts to "everything in that dtype".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub compute: DType,
    pub matrices: Option<DType>,
}

impl From<DType> for Precision {
    fn from(compute: DType) -> Precision {
        Precision {
            compute,
            matrices: None,
        }
    }
}

/// A view of a set of weight sources under a key prefix.
#[derive(Clone)]
pub struct Weights {
    shared: Arc<Shared>,
    prefix: String,
    dtype: DType,
    /// What Linear and convolution weights are stored as ([`Weights::get_matrix`]), when not
    /// `dtype`: a float8 type (`--weight-dtype`).
    matrix_dtype: Option<DType>,
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
            matrix_dtype: None,
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

    /// The same sources, holding Linear and convolution weights as `dtype` (a float8 storage
    /// type) while everything else (norms, biases, embeddings) loads as this loader's dtype.
    /// `None`, or this loader's dtype, stores them like everything else.
    pub fn with_matrix_dtype(&self, dtype: Option<DType>) -> Weights {
        Weights {
            matrix_dtype: dtype.filter(|&d| d != self.dtype),
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
        self.fetch(shape, name)?
            .0
            .to_dtype(self.dtype)?
            .to_device(self.device)
    }

    /// A Linear or convolution weight: as [`Weights::get`], stored as the matrix dtype when one
    /// is set. Rounding to float8 happens here, on the CPU, as PyTorch's cast rounds; a weight
    /// that does not fit (e4m3fn's largest value is 448) is refused by name rather than stored
    /// as NaN.
    pub fn get_matrix(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let Some(store) = self.matrix_dtype else {
            return self.get(shape, name);
        };
        let (t, key, origin) = self.fetch(shape, name)?;
        let q = t.to_device(Device::Cpu)?.to_dtype(store)?;
        let at_limit = match &*q.storage() {
            crate::backend::Storage::Cpu(c) => c.float8_at_limit(),
            crate::backend::Storage::Cuda(_) => unreachable!("quantized on the host"),
        };
        // Values that reach the type's largest magnitude are rare in real weights; only then is
        // the source scanned for one that went past it.
        if at_limit > 0 {
            let limit = match store {
                DType::F8E5M2 => crate::tensor::float8::F8E5M2::MAX,
                _ => crate::tensor::float8::F8E4M3::MAX,
            } as f64;
            let biggest = t.to_vec_f64()?.into_iter().fold(0f64, |m, v| {
                if v.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(v.abs())
                }
            });
            if biggest.is_nan() || biggest > limit {
                return Err(Error::file(
                    origin,
                    format!(
                        "weight `{key}` does not fit {store}: its largest magnitude is {biggest}, \
                         the type's {limit}; hold the weights in --dtype (drop --weight-dtype) \
                         or use a wider float8"
                    ),
                ));
            }
        }
        q.to_device(self.device)
    }

    /// The tensor `prefix.name` as its source holds it, checked against `shape` and marked used,
    /// with its key and the file it came from.
    fn fetch(&self, shape: &[usize], name: &str) -> Result<(Tensor, String, PathBuf)> {
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
            .insert(key.clone());
        Ok((t, key, src.origin().to_path_buf()))
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

/// A stored tensor (any file dtype) as a CPU tensor in its stored dtype; i32/u8/bool widen to i64,
/// float8 (fp8 checkpoints) to bf16, exactly.
pub fn tensor_from_raw(
    raw: &crate::formats::RawTensor<'_>,
    origin: &Path,
    key: &str,
) -> Result<Tensor> {
    use crate::backend::{cpu::CpuStorage, Storage};
    use safetensors::Dtype as D;
    let b = raw.data.as_ref();
    let storage = match raw.dtype {
        D::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(b)),
        D::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(b)),
        D::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(b)),
        D::F64 => CpuStorage::F64(bytemuck::pod_collect_to_vec(b)),
        D::F8_E4M3 | D::F8_E5M2 => {
            CpuStorage::BF16(crate::formats::raw::f8_to_bf16(b, raw.dtype).expect("a float8 dtype"))
        }
        D::I64 => CpuStorage::I64(bytemuck::pod_collect_to_vec(b)),
        D::I32 => CpuStorage::I64(
            bytemuck::pod_collect_to_vec::<u8, i32>(b)
                .into_iter()
                .map(i64::from)
                .collect(),
        ),
        D::U8 | D::BOOL => CpuStorage::I64(b.iter().map(|&v| v as i64).collect()),
        other => {
            return Err(Error::SafeTensors {
                path: origin.to_path_buf(),
                msg: format!("tensor `{key}` has unsupported dtype {other:?}"),
            })
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cpu(storage),
        raw.shape.clone(),
        None,
    ))
}

impl Weights {
    /// Weights from a raw map (a diffusers component or a converted single-file checkpoint).
    pub fn from_raw(
        map: &crate::formats::TensorMap<'_>,
        origin: impl Into<PathBuf>,
        dtype: DType,
        device: Device,
    ) -> Result<Weights> {
        let origin = origin.into();
        let tensors = map
            .iter()
            .map(|(k, r)| Ok((k.clone(), tensor_from_raw(r, &origin, k)?)))
            .collect::<Result<_>>()?;
        Ok(Weights::from_map(tensors, origin, dtype, device))
    }

    /// One component of a diffusers pipeline folder: its weights (keys normalised by the formats
    /// layer) and its config.json.
    pub fn from_component(
        folder: &crate::formats::diffusers::DiffusersFolder,
        name: &str,
        dtype: DType,
        device: Device,
    ) -> Result<(Weights, serde_json::Value)> {
        let comp = folder.component(name, None)?;
        let map = comp.tensors()?;
        let w = Weights::from_raw(&map, comp.dir.clone(), dtype, device)?;
        Ok((w, comp.config.clone()))
    }
}
