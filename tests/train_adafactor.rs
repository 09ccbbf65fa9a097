//! `kstyle train --optimizer adafactor` (kohya's --optimizer_type AdaFactor, transformers'
//! Adafactor) through the real binary on the tiny model. The arithmetic is checked against
//! transformers by the `adafactor` verify case; here: kohya's default (the relative step) and
//! kohya's recommended fixed rate both train and resume bit for bit, with K-StyleLoRA's gates
//! (vectors: a whole second moment), conv LoRA (4-d factors) and LoRA+; the checkpoints hold
//! the row and column means under transformers' names; the settings are recorded; what the
//! relative step cannot honour, and AdamW's knobs, are refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use kstyle::tensor::SafeTensorsFile;

#[test]
fn adafactor_trains_and_resumes_exactly_both_ways() {
    let dir = tmp("adafactor");
    let data = dataset(&dir);
    // kohya's default: relative step, parameter scale, no first moment; gated adapters with the
    // cultural loss and conv LoRA.
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("relative"),
        "kstyle",
        &["--optimizer", "AdaFactor", "--conv-dim", "2"],
        "adafactor (relative step)",
    );
    // The loss log's rate is the relative step min(1e-2, 1/sqrt(t)), not --lr.
    let log = std::fs::read_to_string(dir.join("relative/a/adapter.loss.csv")).unwrap();
    let lr_col = log
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "lr")
        .unwrap();
    for line in log.lines().skip(1) {
        assert_eq!(line.split(',').nth(lr_col), Some("0.01"), "{line}");
    }
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    let size = |k: &str| {
        f.info(k)
            .unwrap_or_else(|| panic!("{k} missing"))
            .1
            .iter()
            .product::<usize>()
    };
    // A lora_down (4, 32) keeps 4 row and 32 column means; a conv lora_down (2, 32, 3, 3) keeps
    // 2 * 32 * 3 of each; a gate bias (a vector) a whole second moment.
    let m = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let a = format!("kstyle.optim.exp_avg_sq_row.{m}.lora_A");
    let (rows, cols) = (size(&a), size(&a.replace("_row.", "_col.")));
    let lora_a = size(&format!("kstyle.optim.master.{m}.lora_A"));
    assert_eq!(rows * cols, lora_a, "{rows} x {cols} for {lora_a} values");
    let conv = "kstyle.optim.exp_avg_sq_row.down_blocks.1.resnets.0.conv1.lora_A";
    assert_eq!(size(conv), 2 * 32 * 3);
    assert!(f
        .info(&format!("kstyle.optim.exp_avg_sq.{m}.attn_mlp.0.bias"))
        .is_some());
    assert!(f
        .info(&format!("kstyle.optim.exp_avg.{m}.lora_A"))
        .is_none());
    assert!(f.info(&format!("kstyle.optim.v.{m}.lora_A")).is_none());

    // kohya's recommended fixed rate under a schedule, with a first moment, weight decay and
    // LoRA+ (lora_up at 4x).
    let fixed = [
        "--optimizer",
        "adafactor",
        "--optimizer-args",
        "scale_parameter=False",
        "relative_step=False",
        "warmup_init=False",
        "beta1=0.9",
        "weight_decay=0.01",
        "--lr",
        "1e-3",
        "--lr-schedule",
        "constant-with-warmup",
        "--warmup",
        "1",
        "--loraplus-lr-ratio",
        "4",
    ];
    let ckpt = assert_resume_is_exact(&data, &dir.join("fixed"), "lora", &fixed, "adafactor fixed");
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    assert!(f
        .info(&format!("kstyle.optim.exp_avg.{m}.lora_B"))
        .is_some());
    let out = dir.join("fixed/a/adapter.safetensors");
    assert_eq!(
        setting(&out, "optimizer"),
        "adafactor scale_parameter=false relative_step=false warmup_init=false \
         clip_threshold=1 decay_rate=-0.8 beta1=0.9 eps=(1e-30, 1e-3)"
    );
    assert_eq!(setting(&out, "weight_decay"), "0.01");
}

#[test]
fn adafactor_refuses_what_it_cannot_honour() {
    let dir = tmp("adafactor-refused");
    let data = dataset(&dir);
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["--optimizer", "adafactor"][..], extra].concat()
    }
    // The relative step sets the rate: schedules and rate ratios have nothing to act on.
    for extra in [
        &["--lr-schedule", "cosine"][..],
        &["--loraplus-lr-ratio", "4"],
        &["--down-lr-weight", "1,0.5"],
    ] {
        refused(&data, &dir, &with(extra), "relative_step=False");
    }
    refused(
        &data,
        &dir,
        &with(&["--adam-beta1", "0.8"]),
        "Adafactor has no AdamW betas",
    );
    refused(
        &data,
        &dir,
        &with(&["--optimizer-args", "betas=0.9,0.99"]),
        "Adafactor has no AdamW betas",
    );
    refused(
        &data,
        &dir,
        &with(&["--adam-epsilon", "1e-6"]),
        "--adam-epsilon",
    );
    refused(
        &data,
        &dir,
        &with(&["--optimizer-args", "eps=1e-30"]),
        "eps",
    );
    refused(
        &data,
        &dir,
        &with(&[
            "--optimizer-args",
            "warmup_init=True",
            "relative_step=False",
        ]),
        "warmup_init=True needs relative_step=True",
    );
    refused(
        &data,
        &dir,
        &with(&["--optimizer-args", "momentum=0.9"]),
        "Adafactor has no setting `momentum`",
    );
    // An AdamW checkpoint does not resume as Adafactor.
    let first = dir.join("adamw/a.safetensors");
    train_ok(
        &data,
        &first,
        "lora",
        &["--max-steps", "1", "--save-every", "1"],
    );
    let ckpt = dir.join("adamw/a.step000001.ckpt.safetensors");
    let o = train(
        &data,
        &dir.join("again/a.safetensors"),
        "lora",
        &with(&["--max-steps", "2", "--resume", ckpt.to_str().unwrap()]),
    );
    common::assert_fails_naming(&o, "--optimizer adamw");
}
