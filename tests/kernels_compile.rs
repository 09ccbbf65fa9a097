//! Compiles every kernel family to a CUBIN for sm_90a and sm_80 with NVRTC (ptxas included) and
//! fails on any compile error. The NVRTC tests are marked ignored (reported as ignored, never as
//! passed) because libnvrtc is not part of a Rust toolchain: `.ci/run` installs it with
//! `scripts/install-nvrtc.sh` and runs them; by hand: `cargo test --test kernels_compile -- --ignored`.

use std::path::PathBuf;

use kstyle::backend::cuda::kernels::{self, DEFAULT_ARCHS};
use kstyle::backend::cuda::nvrtc::{self, CompileOptions, Compiler, NvrtcError, Source};

/// The project-local install from scripts/install-nvrtc.sh, used when nothing else is configured.
fn local_nvrtc_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".nvrtc/nvidia/cu13/lib");
    dir.join("libnvrtc.so.13").exists().then_some(dir)
}

/// Loads NVRTC; these tests are marked ignored by default and run (by .ci/run, after it installs
/// NVRTC) with `--ignored`, where a missing library is a failure, not a skip.
fn nvrtc(test: &str) {
    let dir = std::env::var_os(nvrtc::NVRTC_DIR_ENV)
        .map(PathBuf::from)
        .or_else(local_nvrtc_dir);
    match nvrtc::load_library(dir.as_deref()) {
        Ok((major, minor)) => eprintln!("{test}: NVRTC {major}.{minor}"),
        Err(e) => panic!("{test} needs NVRTC (run scripts/install-nvrtc.sh): {e}"),
    }
}

#[test]
#[ignore = "needs libnvrtc, which is not part of a Rust toolchain: .ci/run installs it and runs this with --ignored"]
fn every_kernel_compiles_for_sm90a_and_sm80() {
    nvrtc("every_kernel_compiles_for_sm90a_and_sm80");
    let report = kernels::check_all(DEFAULT_ARCHS).expect("nvrtc loaded but check_all failed");
    eprintln!("{report}");
    for (file, arch, k) in report.spilling() {
        eprintln!(
            "note: {file} {arch} {} spills {}/{} bytes",
            k.symbol, k.spill_stores, k.spill_loads
        );
    }
    assert!(
        report.all_ok(),
        "some kernel files failed to compile:\n{report}"
    );
    for f in &report.files {
        let ok = f.result.as_ref().unwrap();
        assert!(
            !ok.kernels.is_empty(),
            "{} {}: ptxas reported no kernels",
            f.file,
            f.arch
        );
        for k in &ok.kernels {
            let parts: Vec<&str> = k.symbol.split('_').collect();
            assert!(
                k.symbol
                    .starts_with(&format!("{}_", f.file.trim_end_matches(".cu")))
                    && (parts.contains(&"fwd")
                        || parts.contains(&"bwd")
                        || parts.contains(&"step")),
                "{}: symbol {} does not follow <family>_<op>_<fwd|bwd>_<dtype>",
                f.file,
                k.symbol
            );
        }
    }
}

#[test]
#[ignore = "needs libnvrtc, which is not part of a Rust toolchain: .ci/run installs it and runs this with --ignored"]
fn compile_errors_carry_the_log_and_the_cache_hits() {
    nvrtc("compile_errors_carry_the_log_and_the_cache_hits");
    let bad = Source {
        name: "bad.cu",
        code: "extern \"C\" __global__ void k() { undefined_fn(); }",
        headers: &[],
    };
    match nvrtc::compile_uncached(&bad, &CompileOptions::new("sm_80")) {
        Err(NvrtcError::Compile { log, .. }) => {
            assert!(log.contains("undefined_fn"), "log lacks the error: {log}")
        }
        other => panic!("expected a compile error, got {other:?}"),
    }

    let dir = std::env::temp_dir().join(format!("kstyle-nvrtc-cache-{}", std::process::id()));
    let compiler = Compiler::new(Some(dir.clone())).unwrap();
    let fam = kernels::family("optim").unwrap();
    let opts = CompileOptions::new("sm_90a").define("KS_UNUSED", Some("1"));
    let first = kernels::compile_family(&compiler, fam, &opts).unwrap();
    assert!(!first.from_cache && !first.cubin.is_empty());
    let again = kernels::compile_family(&compiler, fam, &opts).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "memory cache missed"
    );
    // A fresh compiler over the same folder reads the cubin back from disk.
    let disk =
        kernels::compile_family(&Compiler::new(Some(dir.clone())).unwrap(), fam, &opts).unwrap();
    assert!(disk.from_cache && disk.cubin == first.cubin);
    // A different define is a different key.
    let other = CompileOptions::new("sm_90a").define("KS_UNUSED", Some("2"));
    assert_ne!(
        compiler.cache_key(
            &Source {
                name: "optim.cu",
                code: fam.code,
                headers: kernels::HEADERS
            },
            &opts
        ),
        compiler.cache_key(
            &Source {
                name: "optim.cu",
                code: fam.code,
                headers: kernels::HEADERS
            },
            &other
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ptxas_log_parsing() {
    let log = "ptxas info    : Compiling entry function 'reduce_sum_fwd_f32' for 'sm_80'\n\
               ptxas info    : Function properties for reduce_sum_fwd_f32\n\
               ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
               ptxas info    : Used 15 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n";
    let k = &kernels::parse_ptxas_log(log)[0];
    assert_eq!(
        (
            k.symbol.as_str(),
            k.registers,
            k.spill_stores,
            k.spill_loads,
            k.stack_bytes,
            k.smem_bytes
        ),
        ("reduce_sum_fwd_f32", 15, 4, 4, 8, 128)
    );
}
