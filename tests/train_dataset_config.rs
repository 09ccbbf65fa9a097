//! `kstyle train --data dataset.toml` (`--dataset-config`): kohya's dataset config files,
//! through the real binary on the tiny model. A config that says what a folder and flags say
//! must train the same adapter bit for bit; what only a config can say (several datasets at
//! their own resolution and batch size, settings per subset) is checked by what it changes.

mod common;
use common::train::{assert_resume_is_exact, dataset, refused, setting, tensors, train};
use common::{assert_fails_naming, stderr, tmp, write_test_picture};
use std::path::{Path, PathBuf};

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Both runs succeeded and wrote the same adapter bytes and the same loss log.
fn assert_same_run(a: &Path, b: &Path, tag: &str) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len(), "{tag}");
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb, "{tag}");
        assert!(va == vb, "{tag}: tensor {na} differs");
    }
    let log = |p: &Path| std::fs::read_to_string(p.with_extension("loss.csv")).unwrap();
    assert_eq!(log(a), log(b), "{tag}: the loss logs differ");
}

fn ok(o: &std::process::Output, tag: &str) {
    assert!(o.status.success(), "{tag}: {}", stderr(o));
}

/// [general] settings reach every picture as the flags do: flip, caption shuffle and caption
/// dropout, each drawn per visit from the subset's rules.
#[test]
fn a_config_of_one_folder_trains_as_the_folder_and_flags_do() {
    let dir = tmp("dscfg-one");
    let data = dataset(dir.as_path());
    let flags = [
        "--flip-aug",
        "--shuffle-caption",
        "--caption-dropout",
        "0.3",
    ];
    let a = dir.as_path().join("a/adapter.safetensors");
    let o = train(
        &data,
        &a,
        "kstyle",
        &[&["--max-steps", "3"][..], &flags].concat(),
    );
    ok(&o, "folder");
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[general]\nflip_aug = true\nshuffle_caption = true\ncaption_dropout_rate = 0.3\n\
         [[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'data'\n",
    );
    let b = dir.as_path().join("b/adapter.safetensors");
    ok(
        &train(&config, &b, "kstyle", &["--max-steps", "3"]),
        "config",
    );
    assert_same_run(&a, &b, "one subset");
    assert_eq!(
        setting(&b, "dataset_config"),
        "dataset.toml: 1 datasets, 1 subsets"
    );
    // The same settings in JSON, under kohya's flag name.
    let json = write(
        &dir.as_path().join("dataset.json"),
        r#"{"general": {"flip_aug": true, "shuffle_caption": true, "caption_dropout_rate": 0.3},
            "datasets": [{"subsets": [{"image_dir": "data"}]}]}"#,
    );
    let c = dir.as_path().join("c/adapter.safetensors");
    let o = common::train::train_spelled(
        &common::tiny().join("sdxl"),
        "--dataset-config",
        &json,
        &c,
        "kstyle",
        &["--max-steps", "3"],
    );
    ok(&o, "json");
    assert_same_run(&a, &c, "json");
}

/// kohya's `N_name` folders and --reg-data say what subsets with num_repeats, class_tokens and
/// is_reg say; batched by two, with regularization pictures balanced as kohya balances them.
#[test]
fn subsets_with_repeats_class_tokens_and_is_reg_train_as_kohya_folders_do() {
    let dir = tmp("dscfg-kohya");
    let data = dataset(dir.as_path());
    let castle = data.join("2_castle");
    std::fs::create_dir_all(&castle).unwrap();
    write_test_picture(&castle.join("d.png"));
    let reg = dir.as_path().join("reg");
    std::fs::create_dir_all(&reg).unwrap();
    write_test_picture(&reg.join("r1.png"));
    std::fs::write(reg.join("r1.txt"), "a photo of a house").unwrap();
    write_test_picture(&reg.join("r2.png"));
    let common = [
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--prior-loss-weight",
        "0.5",
    ];
    let a = dir.as_path().join("a/adapter.safetensors");
    let o = train(
        &data,
        &a,
        "lora",
        &[&common[..], &["--reg-data", reg.to_str().unwrap()]].concat(),
    );
    ok(&o, "folders");
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[[datasets]]\n\
         [[datasets.subsets]]\nimage_dir = 'data'\n\
         [[datasets.subsets]]\nimage_dir = 'data/2_castle'\nnum_repeats = 2\nclass_tokens = 'castle'\n\
         [[datasets.subsets]]\nimage_dir = 'reg'\nis_reg = true\n",
    );
    let b = dir.as_path().join("b/adapter.safetensors");
    let o = train(&config, &b, "lora", &common);
    ok(&o, "config");
    assert_same_run(&a, &b, "repeats, class tokens, reg");
    let log = stderr(&o);
    assert!(
        log.contains("dataset 1: 4 images, 5 visits an epoch")
            && log
                .contains("2_castle: a dataset config's image_dir is read without its sub-folders"),
        "{log}"
    );
}

/// Two datasets at their own resolution and batch size: batches never mix them, each is cut
/// at its own size, the adapter records both, and a resumed run continues bit for bit.
#[test]
fn datasets_train_at_their_own_resolution_and_batch_size_and_resume_exactly() {
    let dir = tmp("dscfg-two");
    dataset(dir.as_path());
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[[datasets]]\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = 'data'\n\
         [[datasets]]\nresolution = 128\n  [[datasets.subsets]]\n  image_dir = 'data'\n",
    );
    let out = dir.as_path().join("run/adapter.safetensors");
    let o = train(&config, &out, "lora", &["--max-steps", "1"]);
    ok(&o, "two datasets");
    // 3 pictures by 2 (2 batches) and 3 by 1: 5 an epoch.
    let log = stderr(&o);
    assert!(
        log.contains("batches of 2,1 (one bucket and one role each, of one dataset): 5 an epoch"),
        "{log}"
    );
    assert!(
        log.contains("dataset 1: 3 images, 3 visits an epoch, at 64 px, batches of 2")
            && log.contains("dataset 2: 3 images, 3 visits an epoch, at 128 px, batches of 1"),
        "{log}"
    );
    assert_eq!(setting(&out, "batch_size"), "2,1");
    assert_eq!(setting(&out, "resolution"), "64,128");
    let ckpt = assert_resume_is_exact(&config, &dir.as_path().join("resume"), "lora", &[], "two");
    // The checkpoint's epoch is batched: other batch sizes cannot continue it.
    let other = write(
        &dir.as_path().join("other.toml"),
        "[[datasets]]\nbatch_size = 3\n  [[datasets.subsets]]\n  image_dir = 'data'\n\
         [[datasets]]\nresolution = 128\n  [[datasets.subsets]]\n  image_dir = 'data'\n",
    );
    let o = common::train::resume_with(
        &other,
        &dir.as_path().join("resume/c/adapter.safetensors"),
        "lora",
        &ckpt,
        &[],
    );
    assert_fails_naming(&o, "trained with --batch-size 2,1");
}

/// Files in a cache folder (one per cached latent or text entry).
fn cached(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// flip_aug set on one subset mirrors that subset's pictures alone: only their mirrored
/// latents are encoded and cached.
#[test]
fn flip_aug_acts_per_subset() {
    let dir = tmp("dscfg-flip");
    let data = dataset(dir.as_path());
    let (one, two) = (dir.as_path().join("one"), dir.as_path().join("two"));
    for (d, names) in [
        (&one, &["a.png", "a.txt", "b.jpg", "b.txt"][..]),
        (&two, &["c.png"]),
    ] {
        std::fs::create_dir_all(d).unwrap();
        for n in names {
            std::fs::copy(data.join(n), d.join(n)).unwrap();
        }
    }
    let run = |tag: &str, general: &str, first: &str| -> usize {
        let config = write(
            &dir.as_path().join(format!("{tag}.toml")),
            &format!(
                "[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'one'\n\
                 {first}\n[[datasets.subsets]]\nimage_dir = 'two'\n"
            ),
        );
        let cache = dir.as_path().join(format!("cache-{tag}"));
        let out = dir.as_path().join(format!("{tag}/adapter.safetensors"));
        let o = train(
            &config,
            &out,
            "lora",
            &["--max-steps", "1", "--cache", cache.to_str().unwrap()],
        );
        ok(&o, tag);
        cached(&cache)
    };
    let none = run("none", "", "");
    let first = run("first", "", "flip_aug = true");
    let all = run("all", "flip_aug = true", "");
    assert_eq!((first - none, all - none), (2, 3), "{none} {first} {all}");
}

/// What a config cannot say, or says wrong, fails before training, naming the file and where.
#[test]
fn bad_configs_fail_naming_the_file_and_the_key() {
    let dir = tmp("dscfg-bad");
    let data = dataset(dir.as_path());
    let bad = |name: &str, text: &str, extra: &[&str], needle: &str| {
        let config = write(&dir.as_path().join(name), text);
        let args = [&["--max-steps", "1"][..], extra].concat();
        let o = train(&config, &dir.as_path().join("x.safetensors"), "lora", &args);
        assert_fails_naming(&o, needle);
        assert_fails_naming(&o, name);
    };
    let subset = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'data'\n";
    bad(
        "unknown.toml",
        &format!("{subset}colour_aug = true\n"),
        &[],
        "[[datasets]] 1 [[datasets.subsets]] 1: `colour_aug` not a dataset config key",
    );
    bad(
        "face.toml",
        &format!("{subset}face_crop_aug_range = [2.0, 4.0]\n"),
        &[],
        "`face_crop_aug_range`: [2.0,4.0]: face crops are not implemented",
    );
    bad("broken.toml", "[[datasets]\n", &[], "broken.toml");
    bad(
        "reg.toml",
        subset,
        &["--reg-data", data.to_str().unwrap()],
        "list the regularization pictures in it as a subset with `is_reg = true`",
    );
    bad(
        "weight.toml",
        subset,
        &["--prior-loss-weight", "0.5"],
        "--prior-loss-weight weights --reg-data's pictures",
    );
    bad(
        "shape.json",
        r#"{"datasets": [{"subsets": [{"image_dir": "data", "keep_tokens": 2}]}]}"#,
        &[],
        "keep_tokens keeps tags in place when shuffle_caption reorders them",
    );
    // A subset's folder that does not exist, and a stray file in one, are named.
    refused(
        &write(
            &dir.as_path().join("missing.toml"),
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nowhere'\n",
        ),
        dir.as_path(),
        &[],
        "nowhere",
    );
    let stray = dir.as_path().join("stray");
    std::fs::create_dir_all(&stray).unwrap();
    write_test_picture(&stray.join("a.png"));
    std::fs::write(stray.join("notes.docx"), "x").unwrap();
    refused(
        &write(
            &dir.as_path().join("stray.toml"),
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'stray'\n",
        ),
        dir.as_path(),
        &[],
        "notes.docx",
    );
    // Only regularization pictures: nothing to balance them against.
    refused(
        &write(
            &dir.as_path().join("onlyreg.toml"),
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'data'\nis_reg = true\n",
        ),
        dir.as_path(),
        &[],
        "no training images found in the dataset config's subsets",
    );
    refused(
        &write(&dir.as_path().join("data.yaml"), "datasets: []\n"),
        dir.as_path(),
        &[],
        "a folder of pictures or a kohya dataset config (.toml or .json)",
    );
}

/// kohya's bucket flags and keys: with --bucket-no-upscale each picture trains at its own size
/// floored to steps (when within the resolution's area), from the flags or from a config.
#[test]
fn kohya_buckets_come_from_flags_and_configs() {
    let dir = tmp("dscfg-buckets");
    let data = dataset(dir.as_path());
    // 96x64, 64x64 and 72x112 within 128²: their own sizes floored to 32.
    let want = "buckets (pictures each): 64x64: 1, 64x96: 1, 96x64: 1";
    let flags = [
        "--max-steps",
        "1",
        "--resolution",
        "128",
        "--buckets",
        "--bucket-no-upscale",
        "--bucket-reso-steps",
        "32",
    ];
    let o = train(
        &data,
        &dir.as_path().join("a/adapter.safetensors"),
        "lora",
        &flags,
    );
    ok(&o, "flags");
    assert!(stderr(&o).contains(want), "{}", stderr(&o));
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[general]\nenable_bucket = true\nbucket_no_upscale = true\nbucket_reso_steps = 32\n\
         [[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = 'data'\n",
    );
    let o = train(
        &config,
        &dir.as_path().join("b/adapter.safetensors"),
        "lora",
        &["--max-steps", "1"],
    );
    ok(&o, "config");
    let log = stderr(&o);
    assert!(
        log.contains(want) && log.contains("(kohya's buckets, no upscale)"),
        "{log}"
    );
    // kohya's flags shape --buckets' buckets.
    refused(
        &data,
        dir.as_path(),
        &["--bucket-no-upscale"],
        "pass --buckets",
    );
    refused(
        &data,
        dir.as_path(),
        &[
            "--buckets",
            "--resolution",
            "128",
            "--max-bucket-reso",
            "64",
        ],
        "--min-bucket-reso 256 and --max-bucket-reso 64 must satisfy min <= max",
    );
}

/// skip_image_resolution (and --skip-image-resolution) leaves out the pictures of at most that
/// area: the 64x64 one of the three at 64.
#[test]
fn small_pictures_are_skipped_per_dataset() {
    let dir = tmp("dscfg-skip");
    let data = dataset(dir.as_path());
    let flags = ["--max-steps", "1", "--skip-image-resolution", "64"];
    let o = train(
        &data,
        &dir.as_path().join("a/adapter.safetensors"),
        "lora",
        &flags,
    );
    ok(&o, "flag");
    let log = stderr(&o);
    assert!(
        log.contains("dataset: 1 pictures of at most 4096 pixels left out")
            && log.contains("dataset: 2 images from"),
        "{log}"
    );
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'data'\n\
         [[datasets]]\nskip_image_resolution = [64, 96]\n[[datasets.subsets]]\nimage_dir = 'data'\n",
    );
    let o = train(
        &config,
        &dir.as_path().join("b/adapter.safetensors"),
        "lora",
        &["--max-steps", "1"],
    );
    ok(&o, "config");
    let log = stderr(&o);
    // 64x64 and 96x64 are at most 64 x 96; 72x112 stays.
    assert!(
        log.contains("dataset 2: 2 pictures of at most 6144 pixels left out")
            && log.contains("dataset 1: 3 images")
            && log.contains("dataset 2: 1 images"),
        "{log}"
    );
    refused(
        &data,
        dir.as_path(),
        &["--skip-image-resolution", "200"],
        "every picture is left out",
    );
    refused(
        &data,
        dir.as_path(),
        &["--skip-image-resolution", "a,b"],
        "expected N or W,H",
    );
}

/// A fine-tuning subset (kohya's metadata_file) whose metadata gives the captions the caption
/// files give trains as the folder does: keys by name in image_dir or by path, captions from
/// `caption`, `caption` + `tags` or `tags` alone.
#[test]
fn a_metadata_subset_trains_as_its_caption_files_do() {
    let dir = tmp("dscfg-meta");
    let data = dataset(dir.as_path());
    let a = dir.as_path().join("a/adapter.safetensors");
    ok(&train(&data, &a, "lora", &["--max-steps", "2"]), "folder");
    let c = data.join("c.png");
    // Written by hand: the pictures train in the file's order (serde_json's map would sort
    // the path key first).
    let c = serde_json::to_string(c.to_str().unwrap()).unwrap();
    let metadata = format!(
        r#"{{"a": {{"caption": "a {{trigger}} palace"}},
            "b": {{"caption": "a woman in a {{trigger}}", "tags": "dress"}},
            {c}: {{"tags": "a {{trigger}} landscape", "train_resolution": [64, 64]}}}}"#
    );
    write(&dir.as_path().join("meta.json"), &metadata);
    let config = write(
        &dir.as_path().join("dataset.toml"),
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'data'\nmetadata_file = 'meta.json'\n",
    );
    // "a woman in a [v], dress" is not the caption file's "a woman in a [v] dress": the first
    // run must differ, so the captions demonstrably come from the metadata.
    let b = dir.as_path().join("b/adapter.safetensors");
    ok(
        &train(&config, &b, "lora", &["--max-steps", "2"]),
        "metadata",
    );
    assert_ne!(tensors(&a), tensors(&b), "the tags are joined with a comma");
    let metadata = format!(
        r#"{{"a": {{"caption": "a {{trigger}} palace"}},
            "b": {{"caption": "a woman in a {{trigger}} dress", "tags": ""}},
            {c}: {{"tags": "a {{trigger}} landscape"}}}}"#
    );
    write(&dir.as_path().join("meta.json"), &metadata);
    let b = dir.as_path().join("b2/adapter.safetensors");
    ok(
        &train(&config, &b, "lora", &["--max-steps", "2"]),
        "metadata",
    );
    assert_same_run(&a, &b, "metadata captions");
    write(
        &dir.as_path().join("meta.json"),
        r#"{"a": {"caption": "x"}, "zebra": {"caption": "y"}}"#,
    );
    refused(&config, dir.as_path(), &[], "`zebra`: no picture");
    let o = train(
        &config,
        &dir.as_path().join("x.safetensors"),
        "lora",
        &["--max-steps", "1"],
    );
    assert_fails_naming(&o, "meta.json");
}
