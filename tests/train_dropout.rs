//! `kstyle train --network-dropout / --rank-dropout / --module-dropout` (kohya's LoRA dropouts)
//! through the real binary on the tiny model. The masked update's arithmetic is checked against
//! PyTorch by the `lora_dropout` verify case; here: 0 is off, the dropouts change training, the
//! masks repeat in a checkpointed recompute, the recorded settings, exact resume (with the text
//! encoders training too) and refused values. That a batch equals its accumulated visits with
//! the dropouts on is in tests/train_batches.rs.

mod common;
use common::tmp;
use common::train::{
    assert_resume_is_exact, dataset, refused, setting, tensors, train_ok, LORA_DROPOUTS,
};
use std::path::PathBuf;

const ALL: [&str; 6] = LORA_DROPOUTS;

#[test]
fn lora_dropouts_change_training_and_repeat_under_checkpointing() {
    let dir = tmp("lora-dropout");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let run = |name: &str, method: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        let args = [
            &["--max-steps", "2", "--cache", cache.to_str().unwrap()][..],
            extra,
        ]
        .concat();
        train_ok(&data, &out, method, &args)
    };
    for method in ["lora", "kstyle"] {
        let plain = run(&format!("{method}-plain"), method, &[]);
        for key in ["network_dropout", "rank_dropout", "module_dropout"] {
            assert_eq!(setting(&plain, key), "none");
        }
        // 0 turns each off: no draws, the plain run bit for bit.
        let zero = [
            "--network-dropout",
            "0",
            "--rank-dropout",
            "0",
            "--module-dropout",
            "0",
        ];
        let off = run(&format!("{method}-zero"), method, &zero);
        assert!(
            tensors(&off) == tensors(&plain),
            "{method}: 0 changed the run"
        );
        // Each dropout alone, and all three, move the adapter elsewhere.
        for (name, extra) in [
            ("network", &ALL[..2]),
            ("rank", &ALL[2..4]),
            ("module", &ALL[4..]),
            ("all", &ALL[..]),
        ] {
            let out = run(&format!("{method}-{name}"), method, extra);
            assert!(
                tensors(&out) != tensors(&plain),
                "{method}: {name} dropout changed nothing"
            );
        }
        let all = dir.join(format!("{method}-all/a.safetensors"));
        assert_eq!(setting(&all, "network_dropout"), "0.3");
        assert_eq!(setting(&all, "rank_dropout"), "0.25");
        assert_eq!(setting(&all, "module_dropout"), "0.2");
        // A checkpointed block's recompute draws the masks its forward drew: the gradients, and
        // so the adapters, are those of the run that keeps every activation, bit for bit.
        let kept = run(
            &format!("{method}-none"),
            method,
            &[&ALL[..], &["--checkpointing", "none"]].concat(),
        );
        let recomputed = run(
            &format!("{method}-blocks"),
            method,
            &[&ALL[..], &["--checkpointing", "blocks"]].concat(),
        );
        assert!(
            tensors(&kept) == tensors(&recomputed),
            "{method}: checkpointing changed a dropout run"
        );
    }
    for flag in ["--network-dropout", "--rank-dropout", "--module-dropout"] {
        for value in ["-0.1", "1", "1.5", "NaN"] {
            refused(&data, &dir, &[flag, value], flag);
        }
    }
}

/// A dropout run stopped at step 2 and resumed equals the straight run bit for bit: the masks'
/// seeds come from the checkpointed random stream. With the text encoders training their
/// adapters drop too.
#[test]
fn lora_dropout_runs_resume_exactly() {
    let dir = tmp("lora-dropout-resume");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let args = [&ALL[..], &["--cache", cache.to_str().unwrap()]].concat();
    assert_resume_is_exact(&data, &dir.join("kstyle"), "kstyle", &args, "kstyle");
    let text = [&args[..], &["--train-text-encoder"]].concat();
    assert_resume_is_exact(&data, &dir.join("text"), "lora", &text, "text");
}
