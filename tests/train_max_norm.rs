//! `kstyle train --scale-weight-norms` (kohya's --scale_weight_norms) through the real binary on
//! the tiny model. The regularization's arithmetic is checked against PyTorch by the `max_norm`
//! verify case; here: a loose bound changes nothing, a tight one leaves every adapter on or under
//! it (UNet's, text encoders', K-StyleLoRA's), the logged columns, the recorded setting, exact
//! resume and refused values.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, tensors, train_ok};
use kstyle::tensor::SafeTensorsFile;
use std::path::{Path, PathBuf};

/// `||(alpha / r) up down||_F` of every LoRA module of an adapter file, by module key.
fn module_norms(adapter: &Path) -> Vec<(String, f64)> {
    let f = SafeTensorsFile::open(adapter).unwrap();
    let read = |k: &str| f.tensor(k).unwrap().to_vec_f64().unwrap();
    let mut out = Vec::new();
    let downs: Vec<String> = f
        .names()
        .filter(|n| n.ends_with(".lora_down.weight"))
        .map(String::from)
        .collect();
    for down in downs {
        let module = down.trim_end_matches(".lora_down.weight");
        let a = f.tensor(&down).unwrap();
        let (r, d_in) = (a.dims()[0], a.dims()[1]);
        let a = a.to_vec_f64().unwrap();
        let b = read(&format!("{module}.lora_up.weight"));
        let alpha = read(&format!("{module}.alpha"))[0];
        let d_out = b.len() / r;
        let mut sq = 0.0;
        for o in 0..d_out {
            for i in 0..d_in {
                let w: f64 = (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum();
                sq += (w * alpha / r as f64).powi(2);
            }
        }
        out.push((module.to_string(), sq.sqrt()));
    }
    assert!(!out.is_empty(), "{} has no LoRA modules", adapter.display());
    out
}

/// The last three columns (keys_scaled, mean_key_norm, max_key_norm) of each loss-log row.
fn logged(adapter: &Path) -> Vec<[f64; 3]> {
    let csv = std::fs::read_to_string(adapter.with_extension("loss.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(
        header.ends_with(",grad_norm,keys_scaled,mean_key_norm,max_key_norm"),
        "{header}"
    );
    lines
        .map(|l| {
            let v: Vec<f64> = l
                .split(',')
                .map(|x| x.parse().unwrap_or(f64::NAN))
                .collect();
            [v[v.len() - 3], v[v.len() - 2], v[v.len() - 1]]
        })
        .collect()
}

#[test]
fn scale_weight_norms_bounds_every_adapter() {
    let dir = tmp("scale-weight-norms");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let run = |name: &str, method: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        let args = [
            &[
                "--max-steps",
                "3",
                "--lr",
                "1e-2",
                "--cache",
                cache.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        train_ok(&data, &out, method, &args)
    };
    let plain = run("plain", "lora", &["--train-text-encoder"]);
    assert_eq!(setting(&plain, "scale_weight_norms"), "none");
    let plain_norms = module_norms(&plain);
    let largest = plain_norms.iter().map(|n| n.1).fold(0.0, f64::max);
    assert!(largest > 0.0);
    // A bound above every norm scales nothing: the plain run bit for bit, 0 scaled each step.
    let loose = format!("{}", 4.0 * largest);
    let out = run(
        "loose",
        "lora",
        &["--train-text-encoder", "--scale-weight-norms", &loose],
    );
    assert!(
        tensors(&out) == tensors(&plain),
        "a loose bound moved the adapter"
    );
    assert!(
        logged(&out).iter().all(|r| r[0] == 0.0),
        "{:?}",
        logged(&out)
    );
    // A bound under the run's largest norm: every module, the text encoders' too, ends on or
    // under it, and the log counts the scaled ones and reports the bound as the largest norm.
    let tight = largest / 4.0;
    let bound = format!("{tight}");
    for (name, method, extra) in [
        ("tight", "lora", &["--train-text-encoder"][..]),
        ("kstyle", "kstyle", &[][..]),
    ] {
        let out = run(
            name,
            method,
            &[extra, &["--scale-weight-norms", &bound]].concat(),
        );
        let norms = module_norms(&out);
        for (module, n) in &norms {
            assert!(
                *n <= tight * (1.0 + 1e-5),
                "{name}: {module} ends at {n}, bound {tight}"
            );
        }
        if name == "tight" {
            assert_eq!(norms.len(), plain_norms.len());
            assert!(norms.iter().any(|(m, _)| m.starts_with("lora_te")));
        }
        let last = *logged(&out).last().unwrap();
        assert!(last[0] >= 1.0, "{name}: nothing scaled: {last:?}");
        assert!(
            (last[2] - tight).abs() <= 1e-5 * tight,
            "{name}: the largest logged norm {} is not the bound {tight}",
            last[2]
        );
        assert_eq!(setting(&out, "scale_weight_norms"), bound);
    }
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "lora",
        &[
            "--train-text-encoder",
            "--lr",
            "1e-2",
            "--scale-weight-norms",
            &bound,
            "--cache",
            cache.to_str().unwrap(),
        ],
        "scaled",
    );
    for value in ["-1", "NaN", "inf"] {
        refused(
            &data,
            &dir,
            &["--scale-weight-norms", value],
            "--scale-weight-norms",
        );
    }
}
