//! `kstyle train --optimizer lion` (kohya's --optimizer_type Lion) through the real binary on
//! the tiny model. Lion's arithmetic is checked against lion-pytorch by the `lion` verify case;
//! here: one step from lora_up = 0 moves every lora_up by exactly the rate (or not at all), at
//! LoRA+'s ratio too; lion-pytorch's defaults are recorded; the checkpoint holds one moment and
//! resumes exactly; Lion and AdamW checkpoints do not resume into each other; bad settings are
//! refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use kstyle::tensor::SafeTensorsFile;
use std::path::Path;

/// Every lora_up value of the adapter at `path`.
fn ups(path: &Path) -> Vec<f32> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .filter(|n| n.ends_with(".lora_up.weight"))
        .flat_map(|n| f.tensor(n).unwrap().to_vec_f32().unwrap())
        .collect()
}

#[test]
fn lion_steps_by_the_rate_and_resumes_exactly() {
    let dir = tmp("lion");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let cache = cache.to_str().unwrap();
    let lion = ["--optimizer", "lion", "--cache", cache];

    // One step from lora_up = 0, no weight decay (lion-pytorch's default): p = -lr sgn(g), so
    // every lora_up is 0 or exactly -+lr; with LoRA+ 4, 4 lr.
    for (tag, ratio) in [("plain", 1.0f32), ("loraplus", 4.0)] {
        let out = dir.join(format!("{tag}/a.safetensors"));
        let mut args = vec!["--max-steps", "1", "--lr", "1e-3"];
        if ratio != 1.0 {
            args.extend(["--loraplus-lr-ratio", "4"]);
        }
        train_ok(&data, &out, "lora", &[&lion[..], &args].concat());
        let step = 1e-3f32 * ratio;
        let values = ups(&out);
        let moved = values.iter().filter(|&&x| x != 0.0).count();
        let off = values
            .iter()
            .find(|&&x| x != 0.0 && (x.abs() - step).abs() > step * 1e-6);
        assert!(
            off.is_none(),
            "{tag}: a lora_up moved by {off:?}, not {step}"
        );
        assert!(
            moved * 2 > values.len(),
            "{tag}: only {moved} of {} lora_up values moved",
            values.len()
        );
        if tag == "plain" {
            assert_eq!(
                setting(&out, "optimizer"),
                "lion decoupled_weight_decay=false"
            );
            assert_eq!(setting(&out, "weight_decay"), "0");
            assert_eq!(setting(&out, "adam_betas"), "0.9,0.99");
        }
    }

    // K-StyleLoRA with the text encoders, LoRA+, a warm-up and decoupled weight decay: a
    // resumed run is the straight run bit for bit. The checkpoint holds the masters and one
    // moment, no second.
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &[
            &lion[..],
            &[
                "--lr",
                "3e-4",
                "--train-text-encoder",
                "--loraplus-lr-ratio",
                "2",
                "--lr-schedule",
                "cosine",
                // The split run's first half stops at step 2: inside the warm-up, its rates are
                // the straight run's.
                "--warmup",
                "2",
                "--weight-decay",
                "0.1",
                "--optimizer-args",
                "decoupled_weight_decay=True",
            ],
        ]
        .concat(),
        "lion",
    );
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    assert_eq!(f.metadata()["kstyle.ckpt.optimizer"], "lion");
    let count = |kind: &str| {
        f.names()
            .filter(|n| n.starts_with(&format!("kstyle.optim.{kind}.")))
            .count()
    };
    assert!(count("m") > 0 && count("m") == count("master"));
    assert_eq!(count("v"), 0, "Lion's checkpoint holds a second moment");

    // A Lion checkpoint does not resume under AdamW, nor an AdamW one under Lion.
    let resume = ["--max-steps", "3", "--train-text-encoder", "--resume"];
    let o = train(
        &data,
        &dir.join("as-adamw/a.safetensors"),
        "kstyle",
        &[&resume[..], &[ckpt.to_str().unwrap()]].concat(),
    );
    common::assert_fails_naming(&o, "resume it with --optimizer lion, not adamw");
    let adamw = dir.join("adamw/a.safetensors");
    train_ok(
        &data,
        &adamw,
        "lora",
        &["--max-steps", "1", "--save-every", "1", "--cache", cache],
    );
    let o = train(
        &data,
        &dir.join("as-lion/a.safetensors"),
        "lora",
        &[
            &lion[..],
            &[
                "--max-steps",
                "2",
                "--resume",
                dir.join("adamw/a.step000001.ckpt.safetensors")
                    .to_str()
                    .unwrap(),
            ],
        ]
        .concat(),
    );
    common::assert_fails_naming(&o, "resume it with --optimizer adamw, not lion");

    for (extra, needle) in [
        (
            &["--optimizer", "lion", "--adam-epsilon", "1e-6"][..],
            "Lion has no epsilon",
        ),
        (
            &["--optimizer", "lion", "--optimizer-args", "d0=1"][..],
            "Lion has no setting `d0`",
        ),
        (
            &[
                "--optimizer",
                "lion",
                "--adam-beta1",
                "0.8",
                "--optimizer-args",
                "betas=0.9,0.99",
            ][..],
            "--adam-beta1 0.8 and --optimizer-args betas=0.9 disagree",
        ),
        (
            &[
                "--optimizer",
                "lion",
                "--optimizer-args",
                "decoupled_weight_decay=yes",
            ][..],
            "is not True or False",
        ),
        (
            &["--optimizer-args", "decoupled_weight_decay=True"][..],
            "AdamW has no setting `decoupled_weight_decay`",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}
