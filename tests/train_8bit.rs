//! `kstyle train --optimizer adamw8bit` and `lion8bit` (kohya's --optimizer_type AdamW8bit and
//! Lion8bit, bitsandbytes) through the real binary on the tiny model. The arithmetic is checked
//! against bitsandbytes by the `adamw8bit` and `lion8bit` verify cases; here: with every
//! trainable below min_8bit_size a run is AdamW's (Lion's) bit for bit (the small trainables'
//! path is theirs); with quantized moments AdamW8bit stays near AdamW without equalling it; the
//! checkpoints hold codes (u8) and absmax beside f32 moments and resume exactly; 8-bit and f32
//! checkpoints do not resume into each other; bad settings are refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, tensors, train, train_ok};
use kstyle::tensor::SafeTensorsFile;
use std::collections::HashMap;
use std::path::Path;

/// Every tensor of the adapter at `path` as f32 values.
fn values(path: &Path) -> HashMap<String, Vec<f32>> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.tensor(n).unwrap().to_vec_f32().unwrap()))
        .collect()
}

#[test]
fn adamw8bit_trains_near_adamw_and_resumes_exactly() {
    let dir = tmp("adamw8bit");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let cache = cache.to_str().unwrap();
    let common = ["--max-steps", "3", "--lr", "2e-3", "--cache", cache];

    // The tiny adapter's largest trainable has 256 elements: at bitsandbytes' min_8bit_size
    // (4096) nothing is quantized and the run is AdamW's, bit for bit (kohya's name accepted).
    let adamw = train_ok(&data, &dir.join("adamw/a.safetensors"), "lora", &common);
    let small = train_ok(
        &data,
        &dir.join("small/a.safetensors"),
        "lora",
        &[&common[..], &["--optimizer", "AdamW8bit"]].concat(),
    );
    assert_eq!(tensors(&adamw), tensors(&small));
    assert_eq!(setting(&small, "optimizer"), "adamw8bit min_8bit_size=4096");
    assert_eq!(setting(&small, "weight_decay"), "0.01");

    // Quantized moments (every trainable of 200 elements or more): near AdamW's values, not
    // equal to them.
    let eight = train_ok(
        &data,
        &dir.join("eight/a.safetensors"),
        "lora",
        &[
            &common[..],
            &[
                "--optimizer",
                "adamw8bit",
                "--optimizer-args",
                "min_8bit_size=200",
            ],
        ]
        .concat(),
    );
    let (a, b) = (values(&adamw), values(&eight));
    let (mut diff, mut norm, mut changed) = (0f64, 0f64, 0);
    for (name, x) in &a {
        let y = &b[name];
        for (p, q) in x.iter().zip(y) {
            diff += ((p - q) as f64).powi(2);
            norm += (*p as f64).powi(2);
            changed += (p != q) as usize;
        }
    }
    let rel = (diff / norm).sqrt();
    eprintln!("8-bit moments: {changed} values differ from AdamW's, relative distance {rel:.2e}");
    assert!(changed > 0, "8-bit moments changed nothing");
    assert!(
        rel < 0.05,
        "8-bit moments moved the adapter {rel} away from AdamW's"
    );

    // K-StyleLoRA with the text encoders and LoRA+, quantized and f32 moments side by side: a
    // resumed run is the straight run bit for bit.
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &[
            "--optimizer",
            "adamw8bit",
            "--optimizer-args",
            "min_8bit_size=200",
            "--lr",
            "1e-3",
            "--train-text-encoder",
            "--loraplus-lr-ratio",
            "4",
            "--cache",
            cache,
        ],
        "adamw8bit",
    );
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    assert_eq!(f.metadata()["kstyle.ckpt.optimizer"], "adamw8bit");
    let names: Vec<&str> = f.names().collect();
    let count = |kind: &str| {
        let prefix = format!("kstyle.optim.{kind}.");
        names.iter().filter(|n| n.starts_with(&prefix)).count()
    };
    let (q, m) = (count("q1"), count("m"));
    eprintln!("checkpoint: {q} quantized trainables, {m} with f32 moments");
    assert!(q > 0 && m > 0, "{q} quantized, {m} f32: expected both");
    assert_eq!(q + m, count("master"));
    assert_eq!((count("q2"), count("absmax1"), count("v")), (q, q, m));
    let code = names
        .iter()
        .find(|n| n.starts_with("kstyle.optim.q1."))
        .unwrap();
    let (dtype, dims) = f.info(code).unwrap();
    assert_eq!(dtype, safetensors::Dtype::U8, "{code}");
    let absmax = f.info(&code.replace(".q1.", ".absmax1.")).unwrap().1;
    assert_eq!(absmax[0], dims.iter().product::<usize>().div_ceil(256));

    // Crossed resumes are refused, naming both optimizers.
    let o = train(
        &data,
        &dir.join("as-adamw/a.safetensors"),
        "kstyle",
        &[
            "--max-steps",
            "3",
            "--train-text-encoder",
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "resume it with --optimizer adamw8bit, not adamw");

    for (extra, needle) in [
        (
            &[
                "--optimizer",
                "adamw8bit",
                "--optimizer-args",
                "min_8bit_size=lots",
            ][..],
            "is not a count of elements",
        ),
        (
            &[
                "--optimizer",
                "adamw8bit",
                "--optimizer-args",
                "percentile_clipping=5",
            ][..],
            "percentile_clipping=100 only",
        ),
        (
            &["--optimizer", "adamw8bit", "--optimizer-args", "d0=1"][..],
            "AdamW8bit has no setting `d0`",
        ),
        (
            &[
                "--optimizer",
                "adamw8bit",
                "--adam-epsilon",
                "1e-7",
                "--optimizer-args",
                "eps=1e-6",
            ][..],
            "--adam-epsilon 0.0000001 and --optimizer-args eps=0.000001 disagree",
        ),
        (
            &["--optimizer", "adamw8bit", "--optimizer-args", "lr=1e-4"][..],
            "the rate is --lr",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}

#[test]
fn lion8bit_is_lion_below_the_threshold_and_resumes_exactly() {
    let dir = tmp("lion8bit");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let cache = cache.to_str().unwrap();
    let common = ["--max-steps", "2", "--lr", "1e-3", "--cache", cache];

    // Below min_8bit_size every trainable keeps an f32 moment: Lion's run, bit for bit, with
    // bitsandbytes' defaults (no weight decay, betas 0.9 / 0.99) as lion-pytorch's.
    let lion = train_ok(
        &data,
        &dir.join("lion/a.safetensors"),
        "lora",
        &[&common[..], &["--optimizer", "lion"]].concat(),
    );
    let small = train_ok(
        &data,
        &dir.join("small/a.safetensors"),
        "lora",
        &[&common[..], &["--optimizer", "Lion8bit"]].concat(),
    );
    assert_eq!(tensors(&lion), tensors(&small));
    assert_eq!(setting(&small, "optimizer"), "lion8bit min_8bit_size=4096");
    assert_eq!(setting(&small, "adam_betas"), "0.9,0.99");

    // Quantized moments with LoRA+ and the text encoders: a resumed run is the straight run bit
    // for bit; the checkpoint holds one moment's codes and absmax, no second.
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &[
            "--optimizer",
            "PagedLion8bit",
            "--optimizer-args",
            "min_8bit_size=200",
            "--lr",
            "3e-4",
            "--weight-decay",
            "0.1",
            "--train-text-encoder",
            "--loraplus-lr-ratio",
            "4",
            "--cache",
            cache,
        ],
        "lion8bit",
    );
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    assert_eq!(f.metadata()["kstyle.ckpt.optimizer"], "lion8bit");
    let count = |kind: &str| {
        let prefix = format!("kstyle.optim.{kind}.");
        f.names().filter(|n| n.starts_with(&prefix)).count()
    };
    let (q, m) = (count("q1"), count("m"));
    assert!(q > 0 && m > 0, "{q} quantized, {m} f32: expected both");
    assert_eq!((count("absmax1"), q + m), (q, count("master")));
    assert_eq!((count("q2"), count("absmax2"), count("v")), (0, 0, 0));

    // Lion8bit and Lion checkpoints do not resume into each other.
    let o = train(
        &data,
        &dir.join("as-lion/a.safetensors"),
        "kstyle",
        &[
            "--optimizer",
            "lion",
            "--max-steps",
            "3",
            "--train-text-encoder",
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "resume it with --optimizer lion8bit, not lion");
    refused(
        &data,
        &dir,
        &["--optimizer", "lion8bit", "--adam-epsilon", "1e-6"],
        "Lion8bit has no epsilon",
    );
}

/// kohya's way of setting betas, epsilon and weight decay (sd-scripts has no flags for them:
/// `--optimizer_type AdamW8bit --optimizer_args weight_decay=0.1 betas=0.9,0.99`) trains what
/// the flags train, bit for bit, and records the same settings.
#[test]
fn kohya_optimizer_args_set_what_the_flags_set() {
    let dir = tmp("optimizer-args");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let cache = cache.to_str().unwrap();
    let common = [
        "--max-steps",
        "2",
        "--lr",
        "1e-3",
        "--cache",
        cache,
        "--optimizer",
        "adamw8bit",
    ];
    let flags = train_ok(
        &data,
        &dir.join("flags/a.safetensors"),
        "lora",
        &[
            &common[..],
            &[
                "--weight-decay",
                "0.1",
                "--adam-beta2",
                "0.99",
                "--adam-epsilon",
                "1e-6",
                "--optimizer-args",
                "min_8bit_size=200",
            ],
        ]
        .concat(),
    );
    let kohya = train_ok(
        &data,
        &dir.join("kohya/a.safetensors"),
        "lora",
        &[
            &common[..],
            &[
                "--optimizer-args",
                "weight_decay=0.1",
                "betas=(0.9, 0.99)",
                "eps=1e-6",
                "min_8bit_size=200",
            ],
        ]
        .concat(),
    );
    assert_eq!(tensors(&flags), tensors(&kohya));
    for key in ["weight_decay", "adam_betas", "adam_epsilon", "optimizer"] {
        assert_eq!(setting(&flags, key), setting(&kohya, key), "{key}");
    }
    assert_eq!(setting(&kohya, "adam_betas"), "0.9,0.99");
}
