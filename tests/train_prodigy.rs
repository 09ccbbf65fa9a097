//! `kstyle train --optimizer prodigy` (kohya's --optimizer_type Prodigy) through the real binary
//! on the tiny model. Prodigy's arithmetic is checked against prodigyopt by the `prodigy` verify
//! case; here: d is logged and grows from d0, the setting is recorded, a frozen text-encoder
//! group stays where it started, a warm-up run with the text encoders resumes exactly, AdamW and
//! Prodigy checkpoints do not resume into each other, and bad settings are refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use kstyle::tensor::SafeTensorsFile;
use std::path::Path;

/// The prodigy_d column of the loss log.
fn logged_d(adapter: &Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(adapter.with_extension("loss.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(header.ends_with(",grad_norm,prodigy_d"), "{header}");
    lines
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn prodigy_trains_logs_d_and_resumes_exactly() {
    let dir = tmp("prodigy");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let cache = cache.to_str().unwrap();
    let prodigy = ["--optimizer", "prodigy", "--lr", "1", "--cache", cache];

    let out = train_ok(
        &data,
        &dir.join("plain/a.safetensors"),
        "kstyle",
        &[&prodigy[..], &["--max-steps", "4"]].concat(),
    );
    let d = logged_d(&out);
    assert_eq!(d.len(), 4);
    assert!(d[0] >= 1e-6 && d.windows(2).all(|w| w[1] >= w[0]), "{d:?}");
    assert!(d[3] > 1e-6, "d never left d0: {d:?}");
    let optimizer = setting(&out, "optimizer");
    assert!(optimizer.starts_with("prodigy d0=0.000001 "), "{optimizer}");

    // A text-encoder group at rate 0 keeps no state and does not move: its lora_up stays 0
    // while the UNet's trains.
    let out = train_ok(
        &data,
        &dir.join("frozen/a.safetensors"),
        "lora",
        &[
            &prodigy[..],
            &[
                "--max-steps",
                "2",
                "--train-text-encoder",
                "--text-encoder-lr",
                "0",
            ],
        ]
        .concat(),
    );
    let f = SafeTensorsFile::open(&out).unwrap();
    let ups = |prefix: &str| -> Vec<f64> {
        f.names()
            .filter(|n| n.starts_with(prefix) && n.ends_with(".lora_up.weight"))
            .flat_map(|n| f.tensor(n).unwrap().to_vec_f64().unwrap())
            .collect()
    };
    let (te, unet) = (ups("lora_te"), ups("lora_unet"));
    assert!(
        !te.is_empty() && te.iter().all(|&x| x == 0.0),
        "the frozen group moved"
    );
    assert!(unet.iter().any(|&x| x != 0.0), "the UNet did not train");

    // With a warm-up (the first step at rate 0 changes nothing), bias correction, the safeguard
    // and the text encoders: a resumed run is the straight run bit for bit.
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "lora",
        &[
            &prodigy[..],
            &[
                "--train-text-encoder",
                "--lr-schedule",
                "linear",
                "--warmup",
                "2",
                "--optimizer-args",
                "use_bias_correction=True",
                "safeguard_warmup=True",
                "d_coef=2",
            ],
        ]
        .concat(),
        "prodigy",
    );
    // A Prodigy checkpoint does not resume under AdamW, nor an AdamW one under Prodigy.
    let o = train(
        &data,
        &dir.join("as-adamw/a.safetensors"),
        "lora",
        &[
            "--max-steps",
            "3",
            "--train-text-encoder",
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "resume it with --optimizer prodigy");
    let adamw_ckpt = dir.join("adamw/a.step000001.ckpt.safetensors");
    train_ok(
        &data,
        &dir.join("adamw/a.safetensors"),
        "lora",
        &["--max-steps", "1", "--save-every", "1", "--cache", cache],
    );
    let o = train(
        &data,
        &dir.join("as-prodigy/a.safetensors"),
        "lora",
        &[
            &prodigy[..],
            &["--max-steps", "2", "--resume", adamw_ckpt.to_str().unwrap()],
        ]
        .concat(),
    );
    common::assert_fails_naming(&o, "trained with --optimizer adamw");

    for (extra, needle) in [
        (
            &["--optimizer-args", "d0=1e-5"][..],
            "AdamW has no setting `d0`",
        ),
        (
            &["--optimizer", "prodigy", "--optimizer-args", "d_zero=1"][..],
            "Prodigy has no setting `d_zero`",
        ),
        (
            &[
                "--optimizer",
                "prodigy",
                "--optimizer-args",
                "decouple=False",
            ][..],
            "decouple=False",
        ),
        (
            &["--optimizer", "prodigy", "--optimizer-args", "d0=0"][..],
            "d0 must be a positive",
        ),
        (
            &[
                "--optimizer",
                "prodigy",
                "--weight-decay",
                "0.2",
                "--optimizer-args",
                "weight_decay=0.1",
            ][..],
            "--weight-decay 0.2 and --optimizer-args weight_decay=0.1 disagree",
        ),
        (
            &[
                "--optimizer",
                "prodigy",
                "--optimizer-args",
                "growth_rate=0.5",
            ][..],
            "growth_rate must be 1 or more",
        ),
        (
            &["--optimizer", "prodigy", "--loraplus-lr-ratio", "16"][..],
            "LoRA+ gives lora_up its own learning rate",
        ),
        (
            &[
                "--optimizer",
                "prodigy",
                "--train-text-encoder",
                "--text-encoder-lr",
                "0.5",
            ][..],
            "Prodigy steps every trainable at one rate",
        ),
        (
            &["--optimizer", "prodigy", "--up-lr-weight", "1,0.5"][..],
            "block weights can only be 0",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}
