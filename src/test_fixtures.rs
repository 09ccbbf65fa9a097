//! Test helpers: where the golden fixtures live, and small readers for them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Root of the tiny fixtures. The one place to change when the main crate vendors them under
/// `tests/fixtures/tiny`.
pub const FIXTURES_TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");

pub fn tiny() -> PathBuf {
    PathBuf::from(FIXTURES_TINY)
}

fn view<'a>(
    st: &'a safetensors::SafeTensors<'a>,
    key: &str,
    path: &Path,
) -> safetensors::tensor::TensorView<'a> {
    st.tensor(key)
        .unwrap_or_else(|e| panic!("{}: {key}: {e}", path.display()))
}

/// A float32 tensor and its shape.
pub fn read_f32(path: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = view(&st, key, path);
    assert_eq!(v.dtype(), safetensors::Dtype::F32, "{key}");
    let data = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (data, v.shape().to_vec())
}

/// An int64 tensor and its shape.
pub fn read_i64(path: &Path, key: &str) -> (Vec<i64>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = view(&st, key, path);
    assert_eq!(v.dtype(), safetensors::Dtype::I64, "{key}");
    let data = v
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (data, v.shape().to_vec())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("textimage-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts a sampler's schedule against a reference run's stored `timesteps` (exactly) and
/// `sigmas` (within 1e-6 relative: float32 values through different roundings). `file` names it.
#[cfg(test)]
pub(crate) fn assert_schedule(
    f: &crate::tensor::SafeTensorsFile,
    file: &str,
    timesteps: &[f64],
    sigmas: &[f32],
) {
    let want_t = f.tensor("timesteps").unwrap().to_vec_f64().unwrap();
    assert_eq!(timesteps, want_t.as_slice(), "{file}");
    let want_s = f.tensor("sigmas").unwrap().to_vec_f64().unwrap();
    let got_s: Vec<f64> = sigmas.iter().map(|&v| v as f64).collect();
    assert_eq!(got_s.len(), want_s.len(), "{file}");
    for (g, w) in got_s.iter().zip(&want_s) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs(),
            "{file}: {got_s:?} vs {want_s:?}"
        );
    }
}
