//! Tensors as the files store them (dtype, shape, little-endian bytes), independent of any
//! tensor library, and the memory-mapped safetensors reader and writer.
//!
//! Key renaming works on these raw maps so that a converted checkpoint is bit-identical to the
//! original: nothing is decoded unless a conversion has to move bytes (a transpose).

use super::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One tensor's bytes. `data` borrows from a memory map when the bytes pass through unchanged
/// and owns them when a conversion had to rearrange them.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

/// Name -> tensor. Ordered so that listings, error messages and written files are deterministic.
pub type TensorMap<'a> = BTreeMap<String, RawTensor<'a>>;

/// Bytes per element, or `None` for the sub-byte formats (F4, F6) whose elements cannot be
/// addressed individually and which no conversion here needs.
pub fn dtype_bytes(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    (bits % 8 == 0).then_some(bits / 8)
}

/// One float8 value as f32: `F8_E4M3` is torch's `float8_e4m3fn` (bias 7, no infinities, NaN
/// at S.1111.111, largest 448), `F8_E5M2` is `float8_e5m2` (IEEE-style, the top byte of an f16).
/// Both are exact in bf16 and f32. None for other dtypes.
pub fn f8_to_f32(byte: u8, dtype: Dtype) -> Option<f32> {
    match dtype {
        Dtype::F8_E5M2 => Some(crate::tensor::float8::F8E5M2(byte).to_f32()),
        Dtype::F8_E4M3 => Some(crate::tensor::float8::F8E4M3(byte).to_f32()),
        _ => None,
    }
}

/// float8 bytes as bf16 (exact), for the loaders: fp8 checkpoints are stored, never computed in.
pub fn f8_to_bf16(bytes: &[u8], dtype: Dtype) -> Option<Vec<half::bf16>> {
    bytes
        .iter()
        .map(|&b| f8_to_f32(b, dtype).map(half::bf16::from_f32))
        .collect()
}

impl<'a> RawTensor<'a> {
    /// Checks that the byte count matches dtype and shape.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: impl Into<Cow<'a, [u8]>>) -> Result<Self> {
        let t = RawTensor {
            dtype,
            shape,
            data: data.into(),
        };
        let want = t.shape.iter().product::<usize>() * dtype.bitsize();
        if want % 8 != 0 || want / 8 != t.data.len() {
            return Err(Error::WrongShape {
                context: "RawTensor::new".into(),
                key: String::new(),
                got: t.shape.clone(),
                expected: format!("{} bytes of {dtype:?} to match the shape", t.data.len()),
            });
        }
        Ok(t)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn into_owned(self) -> RawTensor<'static> {
        RawTensor {
            dtype: self.dtype,
            shape: self.shape,
            data: Cow::Owned(self.data.into_owned()),
        }
    }

    /// Same bytes, new shape (element count must agree).
    pub fn reshaped(self, shape: Vec<usize>, context: &str, key: &str) -> Result<Self> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::WrongShape {
                context: context.into(),
                key: key.into(),
                got: self.shape,
                expected: format!(
                    "{} elements to reshape to {shape:?}",
                    shape.iter().product::<usize>()
                ),
            });
        }
        Ok(RawTensor { shape, ..self })
    }

    /// Decodes to f64, for reference math (LoRA merges in tests, scalar alphas).
    pub fn to_f64_vec(&self, context: &str, key: &str) -> Result<Vec<f64>> {
        let b = &self.data[..];
        let v = match self.dtype {
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            Dtype::F8_E4M3 | Dtype::F8_E5M2 => b
                .iter()
                .map(|&x| f8_to_f32(x, self.dtype).unwrap_or(f32::NAN) as f64)
                .collect(),
            dtype => {
                return Err(Error::DType {
                    context: context.into(),
                    key: key.into(),
                    dtype,
                })
            }
        };
        Ok(v)
    }

    /// Encodes f64 values into a float dtype, each rounded once to nearest (not through f32).
    pub fn from_f64(dtype: Dtype, shape: Vec<usize>, values: &[f64]) -> Result<RawTensor<'static>> {
        let data: Vec<u8> = match dtype {
            Dtype::F16 => values
                .iter()
                .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
                .collect(),
            Dtype::F32 => values
                .iter()
                .flat_map(|&x| (x as f32).to_le_bytes())
                .collect(),
            Dtype::F64 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            dtype => {
                return Err(Error::DType {
                    context: "RawTensor::from_f64".into(),
                    key: String::new(),
                    dtype,
                })
            }
        };
        RawTensor::new(dtype, shape, data)
    }
}

impl View for &RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Whether `bytes` start like a `torch.save` file: a zip archive (PyTorch 1.6 and later) or a
/// bare pickle (protocol 2 to 5, older files); never for a file whose JSON header starts where
/// safetensors puts it (byte 8), whatever its 8-byte length reads as.
fn pytorch_pickle(bytes: &[u8]) -> Option<&'static str> {
    if bytes.get(8) == Some(&b'{') {
        return None;
    }
    match bytes {
        [b'P', b'K', 3, 4, ..] => Some("a zip archive, as torch.save writes"),
        [0x80, 2..=5, ..] => Some("a bare pickle"),
        _ => None,
    }
}

/// A memory-mapped safetensors file whose header has been validated (offsets contiguous, sizes
/// matching dtype x shape, file length exactly header + data), so a truncated download fails
/// at `open` with the file's name instead of later with a slice panic.
pub struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: Option<HashMap<String, String>>,
}

impl MappedFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            // Also avoids mapping an empty file, which some platforms refuse.
            return Err(Error::SafeTensors {
                path,
                msg: format!("{len} bytes, shorter than the 8-byte header length"),
            });
        }
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped
        // would fault; every safetensors reader (PyTorch's included) accepts that risk to get
        // zero-copy loading of multi-GB checkpoints.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        if let Some(kind) = pytorch_pickle(&mmap) {
            return Err(Error::SafeTensors {
                path,
                msg: format!(
                    "this is a PyTorch pickle ({kind}: a .ckpt / .pt / .bin), which kstyle does \
                     not read because loading a pickle can run code; convert it to \
                     .safetensors first"
                ),
            });
        }
        let (_, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| st_error(&path, e))?;
        let metadata = meta.metadata().clone();
        Ok(MappedFile {
            path,
            mmap,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map of the header (kohya's `ss_*` keys live here).
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Every tensor, borrowing from the map.
    pub fn tensors(&self) -> Result<TensorMap<'_>> {
        let st = SafeTensors::deserialize(&self.mmap).map_err(|e| st_error(&self.path, e))?;
        Ok(st
            .iter()
            .map(|(name, view)| {
                let t = RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: Cow::Borrowed(view.data()),
                };
                (name.to_string(), t)
            })
            .collect())
    }
}

fn st_error(path: &Path, e: safetensors::SafeTensorError) -> Error {
    use safetensors::SafeTensorError as E;
    let msg = match e {
        E::MetadataIncompleteBuffer => {
            "file length does not match the header (truncated or padded download?)".to_string()
        }
        E::InvalidHeaderLength => {
            "header length points past the end of the file (truncated?)".to_string()
        }
        other => other.to_string(),
    };
    Error::SafeTensors {
        path: path.to_path_buf(),
        msg,
    }
}

/// The weights of one model: a single safetensors file or the shards named by a
/// `*.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`).
pub struct WeightFiles {
    files: Vec<MappedFile>,
    /// For sharded weights: the index file and its tensor -> shard-position map.
    index: Option<(PathBuf, BTreeMap<String, usize>)>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightFiles {
    /// Opens a `.safetensors` file, or the shards of an index when `path` ends in `.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.extension().is_some_and(|e| e == "json") {
            return Self::open_sharded(path);
        }
        Ok(WeightFiles {
            files: vec![MappedFile::open(path)?],
            index: None,
        })
    }

    fn open_sharded(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index_path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_pos: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut map = BTreeMap::new();
        for (tensor, shard) in &index.weight_map {
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(Error::file(
                    index_path,
                    format!("shard name `{shard}` is not a plain file name"),
                ));
            }
            let pos = match shard_pos.get(shard.as_str()) {
                Some(&p) => p,
                None => {
                    files.push(MappedFile::open(dir.join(shard))?);
                    shard_pos.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            map.insert(tensor.clone(), pos);
        }
        if files.is_empty() {
            return Err(Error::file(index_path, "weight_map is empty"));
        }
        Ok(WeightFiles {
            files,
            index: Some((index_path.to_path_buf(), map)),
        })
    }

    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }

    /// All tensors. For shards, the index and the shard headers must agree exactly: a tensor
    /// listed but absent, or present in a shard but unlisted, means a broken download.
    pub fn tensors(&self) -> Result<TensorMap<'_>> {
        let Some((index_path, map)) = &self.index else {
            return self.files[0].tensors();
        };
        let mut out = TensorMap::new();
        for (pos, file) in self.files.iter().enumerate() {
            for (name, t) in file.tensors()? {
                match map.get(&name) {
                    Some(&p) if p == pos => {}
                    _ => {
                        let msg = format!(
                            "tensor `{name}` is in shard {} but the index does not place it there",
                            file.path().display()
                        );
                        return Err(Error::file(index_path, msg));
                    }
                }
                out.insert(name, t);
            }
        }
        if let Some(missing) = map.keys().find(|k| !out.contains_key(*k)) {
            let shard = self.files[map[missing]].path().display().to_string();
            return Err(Error::file(
                index_path,
                format!("tensor `{missing}` is listed for {shard} but not stored there"),
            ));
        }
        Ok(out)
    }
}

/// Writes tensors (and optional header metadata) as one safetensors file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &TensorMap<'_>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata, path)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
            other => Error::SafeTensors {
                path: path.to_path_buf(),
                msg: other.to_string(),
            },
        })
}
