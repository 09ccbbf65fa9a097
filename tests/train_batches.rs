//! `kstyle train --batch-size`: micro-batches of several pictures (kohya's --train_batch_size),
//! through the real binary on the tiny model.

mod common;
use common::train::{assert_resume_is_exact, dataset, refused, train, LORA_DROPOUTS};
use common::{assert_fails_naming, tmp};
use kstyle::tensor::SafeTensorsFile;
use std::path::Path;

/// The (loss, diffusion, cultural) columns of a run's loss log, one row per optimizer step.
fn losses(csv: &Path) -> Vec<[f64; 3]> {
    let text = std::fs::read_to_string(csv).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<f64> = l
                .split(',')
                .skip(2)
                .take(3)
                .map(|v| v.parse().unwrap_or(0.0))
                .collect();
            [f[0], f[1], f[2]]
        })
        .collect()
}

/// ||a - b|| / ||a - init|| over every tensor of two adapter files and the initial adapter:
/// how far apart two runs ended, as a part of how far they moved.
fn rel_update(a: &Path, b: &Path, init: &Path) -> f64 {
    let open = |p: &Path| SafeTensorsFile::open(p).unwrap();
    let (fa, fb, fi) = (open(a), open(b), open(init));
    let (mut apart, mut moved) = (0.0f64, 0.0f64);
    let names: Vec<String> = fa.names().map(str::to_string).collect();
    assert_eq!(names.len(), fb.names().count());
    for n in names {
        let read = |f: &SafeTensorsFile| f.tensor(&n).unwrap().to_vec_f64().unwrap();
        let (x, y, z) = (read(&fa), read(&fb), read(&fi));
        for ((p, q), r) in x.iter().zip(&y).zip(&z) {
            apart += (p - q).powi(2);
            moved += (p - r).powi(2);
        }
    }
    assert!(moved > 0.0, "the runs did not move the adapter");
    (apart / moved).sqrt()
}

/// Every visit draws what a batch of one would draw, so one batch of the epoch's three pictures
/// (no buckets: one latent size) computes what three accumulated micro-batches of the same
/// visits compute, up to the order of the sums. With AdamW's epsilon at 1 its update is close to
/// linear in the gradient (which is far below 1 here), so the two runs' adapters show how far
/// apart the gradients are: they end within 1e-5 of how far they moved, and their losses agree
/// to 1e-6. Holds with the per-visit extras (caption dropout, noise offset, input perturbation),
/// with the text encoders training (their token ids go through together) and with the LoRA
/// dropouts (each visit seeds its own masks, in the UNet's adapters and the text encoders').
#[test]
fn a_batch_computes_its_accumulated_visits() {
    let dropout = [&["--train-text-encoder"][..], &LORA_DROPOUTS].concat();
    let variants: [(&str, &str, &[&str]); 4] = [
        ("plain", "kstyle", &[]),
        (
            "extras",
            "kstyle",
            &[
                "--caption-dropout",
                "0.5",
                "--noise-offset",
                "0.1",
                "--ip-noise-gamma",
                "0.1",
            ],
        ),
        ("text", "lora", &["--train-text-encoder"]),
        ("dropout", "lora", &dropout),
    ];
    for (tag, method, extra) in variants {
        let dir = tmp(&format!("batch-equals-accumulation-{tag}"));
        let data = dataset(&dir);
        let cache = dir.join("cache");
        let common = [
            &[
                "--max-steps",
                "2",
                "--adam-epsilon",
                "1",
                "--weight-decay",
                "0",
                "--cache",
                cache.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        let run = |name: &str, args: &[&str]| {
            let out = dir.join(name).join("a.safetensors");
            let o = train(&data, &out, method, &[args, &common].concat());
            let log = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(o.status.success(), "{tag} {name}: {log}");
            (out, log)
        };
        let (batched, log) = run(
            "batched",
            &["--lr", "1", "--batch-size", "3", "--grad-accum", "1"],
        );
        assert!(
            log.contains("batches of 3 (one bucket and one role each): 1 an epoch"),
            "{log}"
        );
        let (accumulated, _) = run("accumulated", &["--lr", "1", "--grad-accum", "3"]);
        // A zero rate leaves the initial adapter.
        let (init, _) = run("init", &["--lr", "0", "--grad-accum", "3"]);
        let (la, lb) = (
            losses(&batched.with_extension("loss.csv")),
            losses(&accumulated.with_extension("loss.csv")),
        );
        assert_eq!(la.len(), 2);
        assert_eq!(la.len(), lb.len());
        for (ra, rb) in la.iter().zip(&lb) {
            for (a, b) in ra.iter().zip(rb) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{tag}: batched losses {ra:?}, accumulated {rb:?}"
                );
            }
        }
        let r = rel_update(&batched, &accumulated, &init);
        eprintln!("{tag}: the adapters end {r:e} of their update apart");
        assert!(
            r <= 1e-5,
            "{tag}: the adapters end {r:e} of their update apart"
        );
        let meta = SafeTensorsFile::open(&batched).unwrap();
        assert_eq!(
            meta.metadata()
                .get("kstyle.train.batch_size")
                .map(String::as_str),
            Some("3")
        );
    }
}

/// The three pictures of [`dataset`] and a wide one: at --resolution 128 with --buckets the
/// three share the square bucket and the wide one has its own.
fn bucketed_dataset(dir: &Path) -> std::path::PathBuf {
    let data = dataset(dir);
    let wide = image::RgbImage::from_fn(300, 100, |x, y| image::Rgb([x as u8, y as u8, 90]));
    wide.save(data.join("d.png")).unwrap();
    data
}

/// Batches hold one bucket and one role: with --buckets the square pictures (3 visits) make
/// two batches of 2 and 1 and the wide one its own, and --reg-data's pictures batch apart from
/// the style's (every regularization step's total is exactly the weighted diffusion loss, with
/// no cultural term). Each epoch's step count follows its batches.
#[test]
fn batches_keep_to_one_bucket_and_one_role() {
    let dir = tmp("batch-buckets");
    let data = bucketed_dataset(&dir);
    let out = dir.join("buckets/a.safetensors");
    let o = train(
        &data,
        &out,
        "kstyle",
        &[
            "--buckets",
            "--resolution",
            "128",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--epochs",
            "2",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("batches of 2 (one bucket and one role each): 3 an epoch"),
        "{log}"
    );
    assert_eq!(losses(&out.with_extension("loss.csv")).len(), 6);

    // 3 style visits and 3 regularization visits (kohya's balance): 2 + 2 batches of 2 and 1.
    let reg = dir.join("reg/1_house");
    std::fs::create_dir_all(&reg).unwrap();
    for name in ["a.png", "b.jpg"] {
        std::fs::copy(data.join(name), reg.join(name)).unwrap();
    }
    std::fs::remove_file(data.join("d.png")).unwrap();
    let out = dir.join("reg-run/a.safetensors");
    let reg_dir = dir.join("reg");
    let o = train(
        &data,
        &out,
        "kstyle",
        &[
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--epochs",
            "1",
            "--reg-data",
            reg_dir.to_str().unwrap(),
            "--prior-loss-weight",
            "0.5",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("batches of 2 (one bucket and one role each): 4 an epoch"),
        "{log}"
    );
    let rows = losses(&out.with_extension("loss.csv"));
    assert_eq!(rows.len(), 4);
    let prior: Vec<_> = rows.iter().filter(|r| r[2] == 0.0).collect();
    assert_eq!(prior.len(), 2, "{rows:?}");
    for [total, diffusion, _] in prior {
        assert_eq!(*total, 0.5 * diffusion, "{rows:?}");
    }
    assert!(rows
        .iter()
        .filter(|r| r[2] != 0.0)
        .all(|r| r[0] != 0.5 * r[1]));
}

/// A run with batches stopped at step 2 and resumed to 4 equals the straight run bit for bit
/// (the epoch's batches are in the checkpoint); resuming with another batch size is refused
/// naming the checkpoint's.
#[test]
fn batched_runs_resume_exactly() {
    let dir = tmp("batch-resume");
    let data = bucketed_dataset(&dir);
    let cache = dir.join("cache");
    let c = [
        "--buckets",
        "--resolution",
        "128",
        "--batch-size",
        "2",
        "--cache",
        cache.to_str().unwrap(),
    ];
    let ckpt = assert_resume_is_exact(&data, &dir, "kstyle", &c, "batched");
    let resume = ["--max-steps", "4", "--resume", ckpt.to_str().unwrap()];
    let other = [&c[..3], &["--batch-size", "3"], &c[5..]].concat();
    let o = train(
        &data,
        &dir.join("c/adapter.safetensors"),
        "kstyle",
        &[&resume[..], &other].concat(),
    );
    assert_fails_naming(&o, "--batch-size 2");
    assert_fails_naming(&o, "adapter.step000002.ckpt.safetensors");
}

/// The first number after `needle` in `text`, in MiB.
fn mib_after(text: &str, needle: &str) -> f64 {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("no `{needle}` in {text}"));
    let rest = &text[at + needle.len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let value: f64 = num.parse().unwrap();
    match rest[num.len()..].trim_start() {
        r if r.starts_with("KiB") => value / 1024.0,
        r if r.starts_with("MiB") => value,
        r if r.starts_with("GiB") => value * 1024.0,
        r => panic!("unit of `{r}`"),
    }
}

/// The memory planner probes a step of the whole batch: its peak grows with --batch-size while
/// what stays resident does not. Bad batch sizes and AdamW settings are refused by name.
#[test]
fn the_memory_probe_and_the_options_see_the_batch() {
    let dir = tmp("batch-memory");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let probe = |batch: &str| {
        let o = train(
            &data,
            &dir.join(format!("b{batch}/a.safetensors")),
            "kstyle",
            &[
                "--max-steps",
                "1",
                "--batch-size",
                batch,
                "--memory-budget",
                "8GiB",
                "--checkpointing",
                "none",
                "--cache",
                cache.to_str().unwrap(),
            ],
        );
        let log = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{log}");
        let line = log
            .lines()
            .find(|l| l.contains("memory budget"))
            .unwrap_or_else(|| panic!("no memory report: {log}"))
            .to_string();
        (
            mib_after(&line, ": "),
            mib_after(&line, "one step peaks at "),
            log,
        )
    };
    let (one_resident, one_peak, _) = probe("1");
    let (three_resident, three_peak, log) = probe("3");
    assert_eq!(one_resident, three_resident, "{log}");
    // Above what stays resident (tiny model: 21 MiB at one picture, 37 MiB at three): the
    // activations grow with the batch, the gradients and the tape's parameters do not.
    let step = |peak: f64| peak - one_resident;
    assert!(
        step(three_peak) > 1.5 * step(one_peak),
        "peaks {one_peak} -> {three_peak} MiB: {log}"
    );
    for (args, needle) in [
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--adam-beta1", "1"], "--adam-beta1"),
        (&["--adam-beta2", "1.5"], "--adam-beta2"),
        (&["--adam-epsilon", "0"], "--adam-epsilon"),
    ] {
        refused(&data, &dir, args, needle);
    }
}
