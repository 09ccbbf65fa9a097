//! `kstyle train`'s checkpoint cadence and retention through the real binary on the tiny model:
//! checkpoints and previews every N epochs (kohya's --save_every_n_epochs,
//! --sample_every_n_epochs) and --keep-checkpoints.

mod common;
use common::tmp;
use common::train::{dataset, refused, train};
use std::path::Path;

/// The steps of the `a.stepNNNNNN.ckpt.safetensors` files in `dir`, sorted.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("a.step")?
                .strip_suffix(".ckpt.safetensors")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn epoch_cadence_and_checkpoint_retention() {
    let dir = tmp("saves");
    let data = dataset(&dir);
    // Three epochs, a checkpoint and a preview at the end of each: three evenly spaced steps, the
    // last the run's last.
    let out = dir.join("e/a.safetensors");
    ok(&train(
        &data,
        &out,
        "lora",
        &[
            "--epochs",
            "3",
            "--save-every-n-epochs",
            "1",
            "--sample-every-n-epochs",
            "1",
            "--sample-prompt",
            "a house",
            "--sample-steps",
            "2",
        ],
    ));
    let steps = checkpoint_steps(&dir.join("e"));
    let per_epoch = steps[0];
    assert_eq!(steps, [per_epoch, 2 * per_epoch, 3 * per_epoch]);
    let rows = std::fs::read_to_string(out.with_extension("loss.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        rows as u64 - 1,
        3 * per_epoch,
        "the last checkpoint ends the run"
    );
    for s in &steps {
        let png = dir.join(format!("e/a.samples/step{s:06}.png"));
        assert!(png.exists(), "{} missing", png.display());
    }
    // Keep two: of steps 1..5 only 4 and 5 stay; a later step's file from an earlier, longer run
    // is not this run's to remove.
    let keep = dir.join("k");
    std::fs::create_dir_all(&keep).unwrap();
    let stale = keep.join("a.step000099.ckpt.safetensors");
    std::fs::copy(
        dir.join(format!("e/a.step{per_epoch:06}.ckpt.safetensors")),
        &stale,
    )
    .unwrap();
    let out = keep.join("a.safetensors");
    let args = [
        "--max-steps",
        "5",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
    ];
    ok(&train(&data, &out, "lora", &args));
    assert_eq!(checkpoint_steps(&keep), [4, 5, 99]);
    // Resuming from the older one and keeping one: the checkpoint resumed from goes too once a
    // newer one is written.
    let from = keep.join("a.step000004.ckpt.safetensors");
    let args = [
        "--max-steps",
        "6",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "1",
        "--resume",
        from.to_str().unwrap(),
    ];
    ok(&train(&data, &out, "lora", &args));
    assert_eq!(checkpoint_steps(&keep), [6, 99]);
    for (extra, needle) in [
        (&["--keep-checkpoints", "2"][..], "--keep-checkpoints"),
        (
            &["--save-every", "1", "--keep-checkpoints", "0"],
            "--keep-checkpoints",
        ),
        (&["--save-every-n-epochs", "0"], "--save-every-n-epochs"),
        (
            &["--save-every", "1", "--save-every-n-epochs", "1"],
            "--save-every",
        ),
        (&["--sample-every-n-epochs", "1"], "--sample-every-n-epochs"),
    ] {
        refused(&data, &dir, extra, needle);
    }
}
