//! `kstyle train`'s data and schedule options through the real binary on the tiny model:
//! learning-rate schedules, kohya folder layouts, caption dropout, regularization and validation
//! pictures, preview prompt files, timestep ranges, input perturbation, flip augmentation and
//! kohya's loss types.

mod common;
use common::train::{dataset, refused, tensors, train};
use common::{assert_fails_naming, kstyle, tiny, tmp};
use std::path::Path;

/// Copies the pictures `names` of `from` into the folder `to` (made first).
fn copy_into(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for name in names {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// The logged rate of every step is the schedule's (checked against diffusers in
/// tests/lr_schedules.rs) over the run's length; settings a schedule would ignore are refused.
#[test]
fn lr_schedules_set_each_steps_rate() {
    use kstyle::train::lr::{LrSchedule, LrShape};
    let dir = tmp("lr-schedule");
    let data = dataset(&dir);
    let out = dir.join("a/adapter.safetensors");
    let o = train(
        &data,
        &out,
        "lora",
        &[
            "--max-steps",
            "5",
            "--lr",
            "0.001",
            "--lr-schedule",
            "cosine_with_restarts",
            "--lr-cycles",
            "2",
            "--warmup",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let schedule = LrSchedule {
        shape: LrShape::CosineWithRestarts { cycles: 2 },
        warmup: 1,
    };
    let csv = std::fs::read_to_string(dir.join("a/adapter.loss.csv")).unwrap();
    let logged: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse().unwrap())
        .collect();
    let want: Vec<f64> = (1..=5)
        .map(|s| 0.001 * schedule.factor(s, 5, 0.001))
        .collect();
    assert_eq!(logged, want);
    assert_eq!(
        logged[0], 0.0,
        "warm-up starts at rate 0, as diffusers' does"
    );
    let settings = kstyle::tensor::SafeTensorsFile::open(&out).unwrap();
    let meta = settings.metadata();
    assert_eq!(
        meta.get("kstyle.train.lr_schedule").map(String::as_str),
        Some("cosine_with_restarts(2)")
    );
    for (extra, needle) in [
        (&["--warmup", "3"][..], "--warmup 3"),
        (
            &["--lr-schedule", "cosine", "--lr-cycles", "2"],
            "--lr-cycles",
        ),
        (
            &["--lr-schedule", "linear", "--lr-power", "2"],
            "--lr-power",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}

/// kohya's DreamBooth layout trains as kohya counts it: a `2_name` folder's pictures twice an
/// epoch (3 pictures x 2 visits at --grad-accum 2: 3 steps an epoch), its uncaptioned pictures
/// captioned `name`; a folder without a repeat count is reported, and a checkpoint of this
/// dataset does not resume on another.
#[test]
fn kohya_repeat_folders_set_the_epoch() {
    let dir = tmp("kohya-folders");
    let flat = dataset(&dir);
    let root = dir.join("kohya");
    let sub = root.join("2_hanok palace");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(root.join("unsorted")).unwrap();
    for entry in std::fs::read_dir(&flat).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, sub.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(flat.join("a.png"), root.join("unsorted/a.png")).unwrap();
    let out = dir.join("a/adapter.safetensors");
    let o = train(&root, &out, "lora", &["--epochs", "2", "--save-every", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("6 visits an epoch"), "{err}");
    assert!(
        err.contains("left out") && err.contains("unsorted"),
        "{err}"
    );
    let csv = std::fs::read_to_string(dir.join("a/adapter.loss.csv")).unwrap();
    let epochs: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(epochs, ["0", "0", "0", "1", "1", "1"], "{csv}");
    let ckpt = dir.join("a/adapter.step000003.ckpt.safetensors");
    let o = train(
        &flat,
        &dir.join("b/adapter.safetensors"),
        "lora",
        &["--epochs", "2", "--resume", ckpt.to_str().unwrap()],
    );
    assert_fails_naming(&o, "resume with the same --data");
}

/// `--caption-dropout 1` trains every micro-batch on the empty caption: one step of it equals,
/// bit for bit, a step on a dataset whose captions are empty (its dropout draw comes after the
/// step's other draws), with frozen or training text encoders. Probabilities outside [0, 1] are
/// refused.
#[test]
fn caption_dropout_trains_on_the_empty_caption() {
    let dir = tmp("caption-dropout");
    let data = dataset(&dir);
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e != "txt") {
            std::fs::copy(&p, empty.join(p.file_name().unwrap())).unwrap();
            std::fs::write(empty.join(p.file_name().unwrap()).with_extension("txt"), "").unwrap();
        }
    }
    for (tag, extra) in [("frozen", &[][..]), ("te", &["--train-text-encoder"])] {
        let step = [&["--max-steps", "1", "--grad-accum", "1"][..], extra].concat();
        let dropped = dir.join(format!("{tag}-dropped/a.safetensors"));
        let o = train(
            &data,
            &dropped,
            "kstyle",
            &[&step[..], &["--caption-dropout", "1"]].concat(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let blank = dir.join(format!("{tag}-blank/a.safetensors"));
        let o = train(&empty, &blank, "kstyle", &step);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let plain = dir.join(format!("{tag}-plain/a.safetensors"));
        let o = train(&data, &plain, "kstyle", &step);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            tensors(&dropped) == tensors(&blank),
            "{tag}: dropout 1 is not the empty caption"
        );
        assert!(
            tensors(&dropped) != tensors(&plain),
            "{tag}: the captions made no difference"
        );
    }
    refused(
        &data,
        &dir,
        &["--caption-dropout", "1.5"],
        "--caption-dropout",
    );
}

/// `--reg-data` (DreamBooth prior preservation, kohya's layout and balance): 3 training visits
/// and a `1_house` folder of 2 pictures give the pictures 2 and 1 visits, so an epoch at
/// --grad-accum 1 is 6 steps; the 3 regularization steps train on the diffusion loss alone
/// (no cultural term), times --prior-loss-weight.
#[test]
fn regularization_pictures_train_on_the_weighted_prior_loss() {
    let dir = tmp("reg-data");
    let data = dataset(&dir);
    copy_into(&data, &dir.join("reg/1_house"), &["a.png", "b.jpg"]);
    let out = dir.join("a/adapter.safetensors");
    let reg_dir = dir.join("reg");
    let o = train(
        &data,
        &out,
        "kstyle",
        &[
            "--epochs",
            "1",
            "--grad-accum",
            "1",
            "--reg-data",
            reg_dir.to_str().unwrap(),
            "--prior-loss-weight",
            "0.5",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("regularization: 2 images"), "{err}");
    let csv = std::fs::read_to_string(dir.join("a/adapter.loss.csv")).unwrap();
    let rows: Vec<(f64, f64, f64)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<f64> = l.split(',').map(|v| v.parse().unwrap()).collect();
            (f[2], f[3], f[4])
        })
        .collect();
    assert_eq!(rows.len(), 6, "{csv}");
    let prior: Vec<_> = rows.iter().filter(|r| r.2 == 0.0).collect();
    assert_eq!(prior.len(), 3, "{csv}");
    for (total, diffusion, _) in prior {
        // Halving is exact in binary: the weighted total is the diffusion loss's half, to the bit.
        assert_eq!(*total, 0.5 * diffusion, "{csv}");
    }
    let meta = kstyle::tensor::SafeTensorsFile::open(&out).unwrap();
    assert_eq!(
        meta.metadata()
            .get("kstyle.train.prior_loss_weight")
            .map(String::as_str),
        Some("0.5")
    );
    refused(&data, &dir, &["--prior-loss-weight", "0.5"], "--reg-data");
}

/// `--val-data`: held-out pictures scored every --val-every steps and after the last, on fixed
/// draws: with --lr 0 the adapter stands still and so does the validation loss, to the bit (and
/// it is the same under another --loss-type and weights: the plain MSE); the scoring changes nothing in training (same adapter as a run without it); a resumed run
/// writes the same validation log as an uninterrupted one.
#[test]
fn validation_loss_is_fixed_draws_on_held_out_pictures() {
    let dir = tmp("val-data");
    let data = dataset(&dir);
    let val = dir.join("val");
    copy_into(&data, &val, &["a.png", "c.png"]);
    let val_args = ["--val-data", val.to_str().unwrap(), "--val-every", "2"];
    let read = |path: &std::path::Path| -> Vec<(u64, f64)> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .skip(1)
            .map(|l| {
                let (s, v) = l.split_once(',').unwrap();
                (s.parse().unwrap(), v.parse().unwrap())
            })
            .collect()
    };
    // lr 0: the validation loss cannot move.
    let still = dir.join("still/a.safetensors");
    let o = train(
        &data,
        &still,
        "kstyle",
        &[&["--max-steps", "3", "--lr", "0"][..], &val_args].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read(&dir.join("still/a.val.csv"));
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3]);
    assert!(rows[0].1 > 0.0 && rows[0].1.is_finite(), "{rows:?}");
    assert_eq!(rows[0].1, rows[1].1);
    // The score is the plain MSE whatever the training loss: the same with another loss type
    // and weights.
    let other = dir.join("other-loss/a.safetensors");
    let loss_args = [
        "--max-steps",
        "3",
        "--lr",
        "0",
        "--loss-type",
        "huber",
        "--debiased-estimation-loss",
        "--min-snr-gamma",
        "5",
    ];
    let o = train(
        &data,
        &other,
        "kstyle",
        &[&loss_args[..], &val_args].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&dir.join("other-loss/a.val.csv")), rows);
    // Training moves it; scoring does not move training.
    let scored = dir.join("scored/a.safetensors");
    let o = train(
        &data,
        &scored,
        "kstyle",
        &[&["--max-steps", "4", "--lr", "0.01"][..], &val_args].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scored_rows = read(&dir.join("scored/a.val.csv"));
    assert_eq!(scored_rows.len(), 2);
    assert_ne!(scored_rows[0].1, scored_rows[1].1);
    let unscored = dir.join("unscored/a.safetensors");
    let o = train(
        &data,
        &unscored,
        "kstyle",
        &["--max-steps", "4", "--lr", "0.01"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tensors(&scored) == tensors(&unscored));
    assert!(!dir.join("unscored/a.val.csv").exists());
    // Resumed at step 2, the log continues as the uninterrupted one.
    let split = dir.join("split/a.safetensors");
    let first = [
        &["--max-steps", "2", "--lr", "0.01", "--save-every", "2"][..],
        &val_args,
    ]
    .concat();
    assert!(train(&data, &split, "kstyle", &first).status.success());
    let ckpt = dir.join("split/a.step000002.ckpt.safetensors");
    let resume = [
        &[
            "--max-steps",
            "4",
            "--lr",
            "0.01",
            "--resume",
            ckpt.to_str().unwrap(),
        ][..],
        &val_args,
    ]
    .concat();
    let o = train(&data, &split, "kstyle", &resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&dir.join("split/a.val.csv")), scored_rows);
    refused(&data, &dir, &["--val-every", "2"], "--val-data");
}

/// `--sample-prompts`: kohya prompt files (.txt lines, .toml tables), each prompt's options
/// honoured, its sampler (`--ss`, `sample_sampler`, `--sample-sampler`) included; every preview is
/// the picture `kstyle generate` makes from that step's checkpoint with the same settings, pixel
/// for pixel (the negative prompt's embeddings and the ancestral samplers' step noise included);
/// `--sample-at-first` previews the starting weights, which are the base model's.
#[test]
fn preview_prompt_files_match_generate_from_the_checkpoint() {
    let dir = tmp("sample-prompts");
    let data = dataset(&dir);
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "# previews\na [v] house --w 64 --h 48 --s 2 --l 4 --d 9\n\na [v] gate --n blurry --d 3\n\
         a [v] tower --w 48 --s 3 --ss k_euler_a --d 5\n",
    )
    .unwrap();
    let out = dir.join("a/adapter.safetensors");
    let o = train(
        &data,
        &out,
        "lora",
        &[
            "--max-steps",
            "2",
            "--sample-every",
            "2",
            "--save-every",
            "2",
            "--sample-prompts",
            prompts.to_str().unwrap(),
            "--sample-steps",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = dir.join("a/adapter.step000002.ckpt.safetensors");
    let lora = format!("{}:1", ckpt.display());
    let same_as_generate = |preview: &Path, lora: Option<&str>, args: &[&str]| {
        let model = tiny().join("sdxl");
        let png = preview.with_extension("generated.png");
        let mut cmd = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        if let Some(l) = lora {
            cmd.extend_from_slice(&["--lora", l]);
        }
        cmd.extend_from_slice(args);
        let g = kstyle(&cmd);
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        let (a, b) = (
            image::open(preview).unwrap().to_rgb8(),
            image::open(&png).unwrap().to_rgb8(),
        );
        assert_eq!(a.dimensions(), b.dimensions(), "{}", preview.display());
        assert!(
            a == b,
            "{} differs from generate's picture",
            preview.display()
        );
    };
    for (i, args) in [
        &[
            "--prompt",
            "a [v] house",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "2",
            "--cfg",
            "4",
            "--seed",
            "9",
            "--sampler",
            "euler",
        ][..],
        &[
            "--prompt",
            "a [v] gate",
            "--negative",
            "blurry",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--cfg",
            "5",
            "--seed",
            "3",
            "--sampler",
            "euler",
        ],
        &[
            "--prompt",
            "a [v] tower",
            "--width",
            "48",
            "--height",
            "64",
            "--steps",
            "3",
            "--cfg",
            "5",
            "--seed",
            "5",
            "--sampler",
            "euler-a",
        ],
    ]
    .iter()
    .enumerate()
    {
        let preview = dir.join(format!("a/adapter.samples/step000002_{i:02}.png"));
        same_as_generate(&preview, Some(&lora), args);
    }

    // kohya's .toml layout, a run-wide sampler one prompt overrides, and the starting weights.
    let toml = dir.join("prompts.toml");
    std::fs::write(
        &toml,
        "[prompt]\nwidth = 48\nheight = 48\nsample_steps = 3\nseed = 4\n\n\
         [[prompt.subset]]\nprompt = \"a [v] house\"\nscale = 3.5\n\n\
         [[prompt.subset]]\nprompt = \"a [v] gate\"\nnegative_prompt = \"blurry\"\n\
         sample_sampler = \"dpm_2_a\"\n",
    )
    .unwrap();
    let out = dir.join("b/adapter.safetensors");
    let o = train(
        &data,
        &out,
        "lora",
        &[
            "--max-steps",
            "1",
            "--sample-at-first",
            "--sample-prompts",
            toml.to_str().unwrap(),
            "--sample-sampler",
            "dpmpp-2m-sde-karras",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let common = [
        "--width", "48", "--height", "48", "--steps", "3", "--seed", "4",
    ];
    for (i, args) in [
        &[
            "--prompt",
            "a [v] house",
            "--cfg",
            "3.5",
            "--sampler",
            "dpmpp-2m-sde-karras",
        ][..],
        &[
            "--prompt",
            "a [v] gate",
            "--negative",
            "blurry",
            "--cfg",
            "5",
            "--sampler",
            "dpm2-a",
        ],
    ]
    .iter()
    .enumerate()
    {
        let preview = dir.join(format!("b/adapter.samples/step000000_{i:02}.png"));
        same_as_generate(&preview, None, &[&common[..], args].concat());
    }
    assert!(
        !dir.join("b/adapter.samples/step000001_00.png").exists(),
        "previews only at first: no --sample-every"
    );

    std::fs::write(&prompts, "a [v] house --ss pndm\n").unwrap();
    refused(
        &data,
        &dir,
        &[
            "--sample-every",
            "1",
            "--sample-prompts",
            prompts.to_str().unwrap(),
        ],
        "line 1: --ss: kohya's sampler `pndm` is not implemented",
    );
    std::fs::write(&toml, "[[prompt.subset]]\nprompt = \"x\"\nseed = -1\n").unwrap();
    refused(
        &data,
        &dir,
        &[
            "--sample-at-first",
            "--sample-prompts",
            toml.to_str().unwrap(),
        ],
        "[[prompt.subset]] 1: `seed` takes a whole number",
    );
    refused(
        &data,
        &dir,
        &["--sample-prompt", "x", "--sample-sampler", "k_heun"],
        "--sample-sampler",
    );
    refused(
        &data,
        &dir,
        &["--sample-every", "1"],
        "--sample-every, --sample-every-n-epochs and --sample-at-first need",
    );
    refused(
        &data,
        &dir,
        &["--sample-at-first"],
        "--sample-every, --sample-every-n-epochs and --sample-at-first need",
    );
}

/// The whole schedule as a range (`--min-timestep 0 --max-timestep 1000`) and
/// `--ip-noise-gamma 0` leave a run bit for bit as it was (the draws are unchanged); a narrower
/// range and a non-zero gamma change it (the perturbation itself is checked against PyTorch by
/// the `train_ip_noise` verify case); ranges outside the schedule and negative gammas are refused.
#[test]
fn timestep_ranges_and_input_perturbation() {
    let dir = tmp("timesteps");
    let data = dataset(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name).with_extension("safetensors");
        let o = train(
            &data,
            &out,
            "lora",
            &[&["--max-steps", "2"][..], extra].concat(),
        );
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        tensors(&out)
    };
    let base = run("base", &[]);
    let whole = ["--min-timestep", "0", "--max-timestep", "1000"];
    assert!(
        run("whole", &whole) == base,
        "the whole range changed the draws"
    );
    assert!(
        run("gamma0", &["--ip-noise-gamma", "0"]) == base,
        "gamma 0 changed the run"
    );
    assert!(run("late", &["--min-timestep", "900"]) != base);
    assert!(run("early", &["--max-timestep", "100"]) != base);
    assert!(run("ip", &["--ip-noise-gamma", "0.1"]) != base);
    let meta = kstyle::tensor::SafeTensorsFile::open(dir.join("late.safetensors"))
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(
        meta.get("kstyle.train.timesteps").map(String::as_str),
        Some("900..end")
    );
    for (extra, needle) in [
        (
            &["--min-timestep", "500", "--max-timestep", "500"][..],
            "--min-timestep 500",
        ),
        (&["--max-timestep", "1001"][..], "--max-timestep 1001"),
        (&["--ip-noise-gamma", "-0.1"][..], "--ip-noise-gamma"),
    ] {
        refused(&data, &dir, extra, needle);
    }
}

/// `--flip-aug` (kohya's --flip_aug; diffusers' --random_flip spelling accepted): each picture's
/// mirrored latents are cached beside the plain ones (3 more cache entries for 3 pictures), the
/// run differs from one without, and the setting is recorded. Its coin is part of the resume
/// contract (tests/train_cli.rs resumes a flipped run bit for bit).
#[test]
fn flip_augmentation_caches_and_trains_mirrored_pictures() {
    let dir = tmp("flip-aug");
    let data = dataset(&dir);
    let entries = |cache: &Path| std::fs::read_dir(cache).unwrap().count();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name).join("a.safetensors");
        let cache = dir.join(name).join("cache");
        let c = ["--max-steps", "4", "--cache", cache.to_str().unwrap()];
        let o = train(&data, &out, "kstyle", &[&c[..], extra].concat());
        let log = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{log}");
        (out, entries(&cache), log)
    };
    let (plain, plain_entries, _) = run("plain", &[]);
    let (flipped, flipped_entries, log) = run("flipped", &["--flip-aug"]);
    assert!(log.contains("flip augmentation"), "{log}");
    assert_eq!(flipped_entries, plain_entries + 3);
    assert!(tensors(&plain) != tensors(&flipped));
    let meta = kstyle::tensor::SafeTensorsFile::open(&flipped).unwrap();
    assert_eq!(
        meta.metadata()
            .get("kstyle.train.flip_aug")
            .map(String::as_str),
        Some("true")
    );
    let (again, _, _) = run("random-flip", &["--random-flip"]);
    assert!(tensors(&again) == tensors(&flipped));
}

/// kohya's loss types and weights (values checked against PyTorch by the `train_loss_types`
/// verify case) reach the run: from the same draws the first step's diffusion loss changes with
/// each (and stays finite), the choice is recorded, and settings the loss would not read are
/// refused by name, as are thresholds that are not positive numbers.
#[test]
fn loss_types_change_the_loss_and_bad_settings_are_refused() {
    let dir = tmp("loss-types");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let first = |name: &str, extra: &[&str]| {
        let out = dir.join(name).join("a.safetensors");
        let c = ["--max-steps", "1", "--cache", cache.to_str().unwrap()];
        let o = train(&data, &out, "kstyle", &[&c[..], extra].concat());
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (common::first_losses(&out)[1], out)
    };
    let (l2, _) = first("l2", &[]);
    let mut seen = vec![l2];
    for (name, extra, recorded) in [
        ("l1", &["--loss-type", "l1"][..], ("l1", "none")),
        (
            "huber",
            &["--loss-type", "huber"],
            ("huber", "snr c 0.1 scale 1"),
        ),
        (
            "smooth",
            &[
                "--loss-type",
                "smooth_l1",
                "--huber-schedule",
                "exponential",
                "--huber-c",
                "0.2",
                "--huber-scale",
                "1.5",
            ],
            ("smooth_l1", "exponential c 0.2 scale 1.5"),
        ),
        ("debiased", &["--debiased-estimation-loss"], ("l2", "none")),
    ] {
        let (loss, out) = first(name, extra);
        assert!(loss.is_finite() && loss > 0.0, "{name}: {loss}");
        assert!(
            seen.iter().all(|&s| s != loss),
            "{name}: {loss} seen already in {seen:?}"
        );
        seen.push(loss);
        let meta = kstyle::tensor::SafeTensorsFile::open(&out).unwrap();
        let get = |k: &str| meta.metadata().get(k).cloned().unwrap_or_default();
        assert_eq!(get("kstyle.train.loss_type"), recorded.0, "{name}");
        assert_eq!(get("kstyle.train.huber"), recorded.1, "{name}");
        assert_eq!(
            get("kstyle.train.debiased_estimation"),
            (name == "debiased").to_string()
        );
    }
    for (extra, needle) in [
        (&["--huber-c", "0.2"][..], "--huber-c"),
        (&["--huber-schedule", "constant"], "--huber-schedule"),
        (&["--loss-type", "huber", "--huber-c", "0"], "--huber-c"),
        (&["--loss-type", "huber", "--huber-c", "-1"], "--huber-c"),
        (
            &[
                "--loss-type",
                "huber",
                "--huber-schedule",
                "constant",
                "--huber-scale",
                "0",
            ],
            "--huber-scale",
        ),
        (
            &["--loss-type", "huber", "--huber-scale", "2"],
            "snr schedule",
        ),
        (&["--loss-type", "l3"], "--loss-type"),
    ] {
        refused(&data, &dir, extra, needle);
    }
}

/// `--shuffle-caption` (kohya's --shuffle_caption, --keep_tokens): captions are encoded live at
/// every step. On captions without commas nothing reorders, and the run equals the cached run
/// bit for bit (the live encoders compute what the cache holds); captions of tags train
/// differently once shuffled, with caption dropout and with the text encoders training too, and
/// once tags drop out (--caption-tag-dropout). The settings are recorded; --keep-tokens alone
/// is refused.
#[test]
fn shuffled_captions_encode_live() {
    let dir = tmp("shuffle-caption");
    let data = dataset(&dir);
    let run = |data: &Path, name: &str, extra: &[&str]| {
        let out = dir.join(name).join("a.safetensors");
        let cache = dir.join("cache");
        let c = ["--max-steps", "3", "--cache", cache.to_str().unwrap()];
        let o = train(data, &out, "kstyle", &[&c[..], extra].concat());
        let log = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{name}: {log}");
        (out, log)
    };
    let (plain, _) = run(&data, "plain", &[]);
    let (live, log) = run(&data, "live", &["--shuffle-caption"]);
    assert!(log.contains("tags shuffled per visit"), "{log}");
    assert!(
        tensors(&plain) == tensors(&live),
        "live encoding differs from the cache"
    );
    assert_eq!(
        std::fs::read_to_string(plain.with_extension("loss.csv")).unwrap(),
        std::fs::read_to_string(live.with_extension("loss.csv")).unwrap()
    );
    // Tag captions: the shuffle reorders them (the first tag kept).
    let tags = dir.join("tags");
    copy_into(&data, &tags, &["a.png", "b.jpg", "c.png"]);
    for (name, caption) in [
        ("a", "[v], palace, red roof, snow, night"),
        ("b", "[v], woman, hanbok, garden, spring"),
        ("c", "[v], landscape, mountains, river, mist"),
    ] {
        std::fs::write(tags.join(format!("{name}.txt")), caption).unwrap();
    }
    let (ordered, _) = run(&tags, "ordered", &[]);
    let (shuffled, _) = run(
        &tags,
        "shuffled",
        &["--shuffle-caption", "--keep-tokens", "1"],
    );
    assert!(tensors(&ordered) != tensors(&shuffled));
    let meta = kstyle::tensor::SafeTensorsFile::open(&shuffled).unwrap();
    let get = |k: &str| meta.metadata().get(k).cloned().unwrap_or_default();
    assert_eq!(get("kstyle.train.shuffle_caption"), "true");
    assert_eq!(get("kstyle.train.keep_tokens"), "1");
    for (name, extra) in [
        (
            "dropout",
            &["--shuffle-caption", "--caption-dropout", "0.5"][..],
        ),
        ("text", &["--shuffle-caption", "--train-text-encoder"]),
    ] {
        run(&tags, name, extra);
    }
    // Tag dropout alone (kohya's --caption_tag_dropout_rate) also rewrites captions live.
    let (dropped, log) = run(
        &tags,
        "tag-dropout",
        &["--caption-tag-dropout", "0.5", "--keep-tokens", "1"],
    );
    assert!(log.contains("each dropped with probability 0.5"), "{log}");
    assert!(tensors(&ordered) != tensors(&dropped));
    refused(&data, &dir, &["--keep-tokens", "1"], "--shuffle-caption");
    refused(
        &data,
        &dir,
        &["--caption-tag-dropout", "1.5"],
        "--caption-tag-dropout",
    );
}
