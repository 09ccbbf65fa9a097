//! Helpers shared by the CLI tests: the vendored fixtures, the built binary, scratch folders.
// Each test crate uses a different subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The vendored tiny fixtures.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// Run the `kstyle` binary built for this test run.
pub fn kstyle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kstyle"))
        .args(args)
        .output()
        .expect("run kstyle")
}

/// A fresh, empty scratch folder for one test.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kstyle-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The process's stderr as text (for error assertions).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
