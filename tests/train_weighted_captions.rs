//! `kstyle train --weighted-captions` (kohya's --weighted_captions) through the binary on the
//! tiny model. The weighted ids and states themselves are checked against sd-scripts' algorithm
//! by the `weighted_captions` verify case; here: every caption path (cached embeddings,
//! --train-text-encoder's token ids, --shuffle-caption's live captions) reads the weights, a
//! weight of 1 trains bit for bit as the plain words, and other weights change the run.

mod common;
use common::tmp;
use common::train::{diffusion, setting, tensors, train_ok};
use kstyle::tensor::Rng;
use std::path::{Path, PathBuf};

/// Two small pictures captioned `caption`.
fn captioned(dir: &Path, name: &str, caption: &str) -> PathBuf {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let mut rng = Rng::new(7);
    for (file, w, h) in [("a.png", 96, 64), ("b.png", 64, 72)] {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 2) as u8, rng.below(256) as u8])
        });
        img.save(data.join(file)).unwrap();
        std::fs::write(data.join(file).with_extension("txt"), caption).unwrap();
    }
    data
}

const PATHS: [(&str, &[&str]); 3] = [
    ("cached", &[]),
    ("te", &["--train-text-encoder"]),
    (
        "shuffled",
        &["--shuffle-caption", "--max-token-length", "150"],
    ),
];

#[test]
fn weighted_captions_weigh_every_caption_path() {
    let dir = tmp("weighted-captions");
    let plain = captioned(&dir, "plain", "a red palace");
    let unit = captioned(&dir, "unit", "a (red:1) palace");
    let heavy = captioned(&dir, "heavy", "a (red:1.8) [[palace]]");
    for (name, extra) in PATHS {
        let run = |data: &Path, tag: &str, weighted: bool| {
            let out = dir
                .join("runs")
                .join(format!("{name}-{tag}"))
                .join("a.safetensors");
            let mut args = vec!["--max-steps", "2", "--lr", "1e-2"];
            args.extend_from_slice(extra);
            if weighted {
                args.push("--weighted-captions");
            }
            train_ok(data, &out, "lora", &args)
        };
        let base = run(&plain, "plain", false);
        // A weight of 1 is the plain caption: the same ids, states times exactly 1.
        let one = run(&unit, "unit", true);
        assert_eq!(tensors(&base), tensors(&one), "{name}: (red:1) differs");
        assert_eq!(setting(&one, "weighted_captions"), "true");
        assert_eq!(setting(&base, "weighted_captions"), "false");
        // Weighted, the run differs from the same words unweighted (and the brackets are not
        // read as text: that is a third run again).
        let weighted = run(&heavy, "heavy", true);
        let literal = run(&heavy, "literal", false);
        let (w, l, b) = (diffusion(&weighted), diffusion(&literal), diffusion(&base));
        assert!(w != l && w != b && l != b, "{name}: {w:?} {l:?} {b:?}");
    }
}

/// A trigger in brackets (kstyle's default "[v]") is read as a weight, with a warning.
#[test]
fn a_bracketed_trigger_is_warned_about() {
    let dir = tmp("weighted-trigger");
    let data = captioned(&dir, "data", "a {trigger} palace");
    let out = dir.join("runs").join("a.safetensors");
    let o = common::train::train(
        &data,
        &out,
        "lora",
        &["--max-steps", "1", "--weighted-captions"],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("reads the brackets of the trigger \"[v]\""),
        "{}",
        common::stderr(&o)
    );
}
