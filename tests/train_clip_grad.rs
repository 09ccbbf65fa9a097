//! `kstyle train --max-grad-norm` (kohya's and diffusers' --max_grad_norm) through the real
//! binary on the tiny model. The clipping's arithmetic is checked against PyTorch by the
//! `train_clip_grad` verify case; here: the logged norms, what the option changes and what it
//! must not, the recorded setting, exact resume and refused values.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, tensors, train};
use std::path::{Path, PathBuf};

/// Every row of a run's loss log, as text.
fn log(adapter: &Path) -> Vec<String> {
    let csv = std::fs::read_to_string(adapter.with_extension("loss.csv")).unwrap();
    csv.lines().map(str::to_string).collect()
}

/// The grad_norm column of a run's loss log.
fn norms(adapter: &Path) -> Vec<f64> {
    let rows = log(adapter);
    assert!(rows[0].ends_with(",lr,grad_norm"), "header: {}", rows[0]);
    rows[1..]
        .iter()
        .map(|r| r.rsplit(',').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn gradient_norms_are_logged_and_clipped() {
    let dir = tmp("clip-grad");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        let c = ["--max-steps", "3", "--cache", cache.to_str().unwrap()];
        let o = train(&data, &out, "kstyle", &[&c[..], extra].concat());
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let plain = run("plain", &[]);
    let plain_norms = norms(&plain);
    assert_eq!(plain_norms.len(), 3);
    assert!(
        plain_norms.iter().all(|n| n.is_finite() && *n > 0.0),
        "{plain_norms:?}"
    );
    assert_eq!(setting(&plain, "max_grad_norm"), "none");
    // A bound above every norm clips nothing (the factor is exactly 1), and 0 turns clipping
    // off: both runs are the plain run bit for bit.
    let above = format!("{}", 2.0 * plain_norms.iter().cloned().fold(0.0, f64::max));
    for (name, max) in [("above", above.as_str()), ("zero", "0")] {
        let out = run(name, &["--max-grad-norm", max]);
        assert!(
            tensors(&out) == tensors(&plain),
            "{name}: the adapter moved"
        );
        assert_eq!(log(&out), log(&plain), "{name}");
    }
    // A bound below every norm clips each step. The norms are logged before clipping, so the
    // first step's is the plain run's; AdamW's moments then weigh the steps' gradients
    // differently, and the adapter moves elsewhere.
    let below = plain_norms.iter().cloned().fold(f64::INFINITY, f64::min) / 2.0;
    let below = format!("{below}");
    let clipped = run("below", &["--max-grad-norm", &below]);
    let clipped_norms = norms(&clipped);
    assert_eq!(clipped_norms[0], plain_norms[0]);
    assert!(clipped_norms.iter().all(|n| n.is_finite() && *n > 0.0));
    assert!(
        tensors(&clipped) != tensors(&plain),
        "clipping changed nothing"
    );
    assert_eq!(setting(&clipped, "max_grad_norm"), below);
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &[
            "--max-grad-norm",
            &below,
            "--cache",
            cache.to_str().unwrap(),
        ],
        "clipped",
    );
    for value in ["-1", "NaN", "inf"] {
        refused(&data, &dir, &["--max-grad-norm", value], "--max-grad-norm");
    }
}
