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

/// [`train`] on another model folder.
pub fn train_model(
    model: &Path,
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
        "--data",
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

pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.bytes(n).unwrap().to_vec()))
        .collect()
}
