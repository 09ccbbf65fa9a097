//! `kstyle train` on the tiny model: a small dataset, the command, an adapter's tensors.

use super::{kstyle, tiny};
use kstyle::tensor::{Rng, SafeTensorsFile};
use std::path::{Path, PathBuf};

/// Three small images of different shapes; two with captions, one captioned by the template.
pub fn dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut rng = Rng::new(5);
    for (name, w, h, caption) in [
        ("a.png", 96, 64, Some("a {trigger} palace")),
        ("b.jpg", 64, 64, Some("a woman in a {trigger} dress")),
        ("c.png", 72, 112, None),
    ] {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 2) as u8, (rng.below(256)) as u8])
        });
        img.save(data.join(name)).unwrap();
        if let Some(c) = caption {
            std::fs::write(data.join(name).with_extension("txt"), c).unwrap();
        }
    }
    data
}

pub fn train(data: &Path, out: &Path, method: &str, extra: &[&str]) -> std::process::Output {
    train_model(&tiny().join("sdxl"), data, out, method, extra)
}

/// All three LoRA dropouts on (kohya's network, rank and module dropout).
pub const LORA_DROPOUTS: [&str; 6] = [
    "--network-dropout",
    "0.3",
    "--rank-dropout",
    "0.25",
    "--module-dropout",
    "0.2",
];

/// Trains `method` on `data` into `out` with `args`; the run must succeed. Returns `out`.
pub fn train_ok(data: &Path, out: &Path, method: &str, args: &[&str]) -> PathBuf {
    let o = train(data, out, method, args);
    assert!(
        o.status.success(),
        "{}: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out.to_path_buf()
}

/// A one-step `lora` run on `data` with `extra`, which must fail naming `needle`.
pub fn refused(data: &Path, dir: &Path, extra: &[&str], needle: &str) {
    let o = train(
        data,
        &dir.join("refused.safetensors"),
        "lora",
        &[&["--max-steps", "1"][..], extra].concat(),
    );
    super::assert_fails_naming(&o, needle);
}

/// [`train`] on another model folder.
pub fn train_model(
    model: &Path,
    data: &Path,
    out: &Path,
    method: &str,
    extra: &[&str],
) -> std::process::Output {
    train_spelled(model, "--data", data, out, method, extra)
}

/// [`train_model`] with the data given under `flag` (`--data` or one of its aliases).
pub fn train_spelled(
    model: &Path,
    flag: &str,
    data: &Path,
    out: &Path,
    method: &str,
    extra: &[&str],
) -> std::process::Output {
    let clip = tiny().join("clip");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        flag,
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--method",
        method,
        "--clip",
        clip.to_str().unwrap(),
        "--caption-template",
        "a {trigger} landscape",
        "--trigger",
        "[v]",
        "--seed",
        "7",
    ];
    if !extra.contains(&"--grad-accum") {
        args.extend_from_slice(&["--grad-accum", "2"]);
    }
    if !extra.contains(&"--resolution") {
        args.extend_from_slice(&["--resolution", "64"]);
    }
    args.extend_from_slice(extra);
    kstyle(&args)
}

/// The run setting `key` an adapter file records (`kstyle.train.<key>` metadata).
pub fn setting(path: &Path, key: &str) -> String {
    let f = SafeTensorsFile::open(path).unwrap();
    f.metadata()[&format!("kstyle.train.{key}")].clone()
}

/// The logged diffusion loss of each step of a run's adapter.
pub fn diffusion(adapter: &Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(adapter.with_extension("loss.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|row| row.split(',').nth(3).unwrap().parse().unwrap())
        .collect()
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.bytes(n).unwrap().to_vec()))
        .collect()
}

/// Resumes the step-2 checkpoint `ckpt` to step 4 into `out` with `args` (a run whose settings
/// differ from the checkpoint's, which must be refused).
pub fn resume_with(
    data: &Path,
    out: &Path,
    method: &str,
    ckpt: &Path,
    args: &[&str],
) -> std::process::Output {
    let base = ["--max-steps", "4", "--resume", ckpt.to_str().unwrap()];
    train(data, out, method, &[&base[..], args].concat())
}

/// Trains `method` on `data` with `args` for 4 steps straight (into `dir/a`) and for 2 steps,
/// checkpointed, then resumed to 4 (into `dir/b`), and asserts that both write the same
/// adapter bytes and the same loss log. Returns the step-2 checkpoint.
pub fn assert_resume_is_exact(
    data: &Path,
    dir: &Path,
    method: &str,
    args: &[&str],
    tag: &str,
) -> PathBuf {
    let straight = dir.join("a/adapter.safetensors");
    let o = train(
        data,
        &straight,
        method,
        &[&["--max-steps", "4"][..], args].concat(),
    );
    assert!(
        o.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let split = dir.join("b/adapter.safetensors");
    let first = [&["--max-steps", "2", "--save-every", "2"][..], args].concat();
    let o = train(data, &split, method, &first);
    assert!(
        o.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ckpt = dir.join("b/adapter.step000002.ckpt.safetensors");
    let resume = ["--max-steps", "4", "--resume", ckpt.to_str().unwrap()];
    let o = train(data, &split, method, &[&resume[..], args].concat());
    assert!(
        o.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, b) = (tensors(&straight), tensors(&split));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{tag}: tensor {na} differs after resume");
    }
    let log = |p: &Path| std::fs::read_to_string(p.with_extension("loss.csv")).unwrap();
    assert_eq!(log(&straight), log(&split), "{tag}: the loss logs differ");
    ckpt
}
