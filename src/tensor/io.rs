//! safetensors reading (memory-mapped, validated, errors naming file and key) and atomic writing.

use super::{DType, Device, Element, Layout, Tensor};
use crate::backend::cpu::CpuStorage;
use crate::backend::Storage;
use crate::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// An opened safetensors file. The header is parsed and validated once; tensors are read on demand.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: HashMap<String, String>,
    /// name -> (dtype as stored, shape, byte range inside the data section)
    entries: BTreeMap<String, (safetensors::Dtype, Vec<usize>, std::ops::Range<usize>)>,
    data_start: usize,
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl SafeTensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensorsFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside what
        // this tool supports (we write our own files atomically through a rename).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| st_err(path, e))?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| st_err(path, e))?;
        let base = mmap.as_ptr() as usize;
        let mut entries = BTreeMap::new();
        for (name, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - base - 8 - header_len;
            entries.insert(
                name,
                (
                    view.dtype(),
                    view.shape().to_vec(),
                    start..start + view.data().len(),
                ),
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafeTensorsFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            entries,
            data_start: 8 + header_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata string, or an error naming the file and the key.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::file(&self.path, format!("metadata `{key}` missing")))
    }

    /// A metadata number, or an error naming the file and the key.
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta_str(key)?
            .trim()
            .parse()
            .map_err(|_| Error::file(&self.path, format!("metadata `{key}` is not a number")))
    }

    /// Stored dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<(safetensors::Dtype, &[usize])> {
        self.entries.get(name).map(|(d, s, _)| (*d, s.as_slice()))
    }

    /// The raw little-endian bytes of a tensor as stored.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (_, _, r) = self.entries.get(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.mmap[self.data_start + r.start..self.data_start + r.end])
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingKey {
            path: self.path.clone(),
            key: name.to_string(),
        }
    }

    /// A tensor on the CPU in its stored dtype (i32/u8/bool widen to i64, float8 to bf16).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (dtype, shape, _) = self.entries.get(name).ok_or_else(|| self.missing(name))?;
        let bytes = self.bytes(name)?;
        fn read<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
            // The data section is not guaranteed aligned for T: copy through pod_collect.
            bytemuck::pod_collect_to_vec(b)
        }
        use safetensors::Dtype as D;
        let storage = match dtype {
            D::F16 => CpuStorage::F16(read::<f16>(bytes)),
            D::BF16 => CpuStorage::BF16(read::<bf16>(bytes)),
            D::F32 => CpuStorage::F32(read::<f32>(bytes)),
            D::F64 => CpuStorage::F64(read::<f64>(bytes)),
            D::F8_E4M3 | D::F8_E5M2 => CpuStorage::BF16(
                crate::formats::raw::f8_to_bf16(bytes, *dtype).expect("a float8 dtype"),
            ),
            D::I64 => CpuStorage::I64(read::<i64>(bytes)),
            D::I32 => CpuStorage::I64(read::<i32>(bytes).into_iter().map(i64::from).collect()),
            D::U8 | D::BOOL => CpuStorage::I64(bytes.iter().map(|&b| b as i64).collect()),
            other => {
                return Err(Error::SafeTensors {
                    path: self.path.clone(),
                    msg: format!("tensor `{name}` has unsupported dtype {other:?}"),
                })
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cpu(storage),
            shape.clone(),
            None,
        ))
    }

    /// A tensor converted to `dtype` on `device`, checked against an expected shape.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != shape {
            return Err(Error::WrongShape {
                path: self.path.clone(),
                key: name.to_string(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        t.to_dtype(dtype)?.to_device(device)
    }
}

/// Every tensor of a file, on the CPU in its stored dtype.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let f = SafeTensorsFile::open(path)?;
    f.names()
        .map(|n| Ok((n.to_string(), f.tensor(n)?)))
        .collect()
}

struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::I64 => safetensors::Dtype::I64,
        DType::F8E4M3 => safetensors::Dtype::F8_E4M3,
        DType::F8E5M2 => safetensors::Dtype::F8_E5M2,
        DType::U8 => safetensors::Dtype::U8,
    }
}

/// Write tensors (any device, stored in their own dtype) atomically: a temporary file in the same
/// folder, fsync, then rename over the target, so a crash never leaves a half-written file.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu)?;
        let s = t.storage();
        let data = match &*s {
            Storage::Cpu(c) => c.to_bytes(t.layout()),
            Storage::Cuda(_) => unreachable!("to_device(Cpu) returns CPU storage"),
        };
        raws.push((
            name.clone(),
            Raw {
                dtype: st_dtype(t.dtype()),
                shape: t.dims().to_vec(),
                data,
            },
        ));
    }
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.clone(), r)), metadata)
        .map_err(|e| st_err(path, e))?;
    write_atomic(path, &sorted_header(&bytes).map_err(|e| st_err(path, e))?)
}

/// The same file with its JSON header's keys in sorted order. The safetensors crate writes the
/// metadata in hash-map order, so two identical runs wrote different bytes; sorted, the same
/// tensors and metadata always give the same file. The data section is untouched (its offsets
/// are relative to the end of the header).
fn sorted_header(file: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let n = file
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or("no header length")?;
    let header = file.get(8..8 + n).ok_or("header past the end")?;
    let mut top: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| e.to_string())?;
    if let Some(meta) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(meta.take()).map_err(|e| e.to_string())?;
        *meta = serde_json::to_value(sorted).map_err(|e| e.to_string())?;
    }
    let mut json = serde_json::to_vec(&top).map_err(|e| e.to_string())?;
    // Padded with spaces to a multiple of 8, as the format recommends (aligned data).
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + file.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&file[8 + n..]);
    Ok(out)
}

/// Write bytes to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

impl Tensor {
    /// Row-major copy of the elements as `T` (host).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.to_vec_f64()?.into_iter().map(T::from_f64).collect())
    }

    /// Contiguous host layout of this tensor.
    pub fn contiguous_layout(&self) -> Layout {
        Layout::contiguous(self.shape().clone())
    }
}
