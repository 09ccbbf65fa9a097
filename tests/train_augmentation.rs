//! `kstyle train --random-crop` and `--color-aug` (kohya's --random_crop and --color_aug)
//! through the real binary on the tiny model: pictures that cover their bucket exactly train as
//! without --random-crop, bit for bit; larger ones move their window per visit (another adapter
//! than the centred run's, the same one for the same seed); runs with both resume exactly; and a
//! dataset config's `random_crop` / `color_aug` are the flags per subset. That each visit
//! encodes the window and the colours it drew, with its time ids and mask, is checked in
//! src/train/examples.rs; the colour shift's bytes against OpenCV in tests/color_aug.rs.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, setting, tensors, train};
use std::path::{Path, PathBuf};

fn run(data: &Path, out: PathBuf, extra: &[&str]) -> (PathBuf, String) {
    let args = [&["--max-steps", "3", "--lr", "1e-2"][..], extra].concat();
    let o = train(data, &out, "lora", &args);
    assert!(
        o.status.success(),
        "{}: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let log = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (out, log)
}

#[test]
fn bucket_sized_pictures_train_as_without_the_flag() {
    let dir = tmp("random-crop-exact");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, shade) in [("a.png", 40u8), ("b.png", 200)] {
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([shade, (x * 4) as u8, (y * 4) as u8])
        })
        .save(data.join(name))
        .unwrap();
    }
    let (plain, _) = run(&data, dir.join("plain/a.safetensors"), &["--flip-aug"]);
    let (crop, log) = run(
        &data,
        dir.join("crop/a.safetensors"),
        &["--flip-aug", "--random-crop"],
    );
    assert!(
        log.contains("random crop: no picture is larger than its bucket"),
        "{log}"
    );
    assert_eq!(tensors(&plain), tensors(&crop));
    assert_eq!(setting(&crop, "random_crop"), "true");
    assert_eq!(setting(&plain, "random_crop"), "false");
}

#[test]
fn larger_pictures_move_their_window_and_resume_exactly() {
    let dir = tmp("random-crop-moves");
    // 96x64, 64x64 and 72x112 at 64 px: the first and last can move.
    let data = dataset(&dir);
    let (centred, _) = run(&data, dir.join("centred/a.safetensors"), &[]);
    let (a, log) = run(&data, dir.join("a/a.safetensors"), &["--random-crop"]);
    assert!(
        log.contains("random crop: 2 of 3 pictures are larger than their buckets"),
        "{log}"
    );
    // 3 steps of 2 visits over epochs of 3 (one per picture): the two pictures that can move
    // are visited twice each; in each epoch the batches after the first are read ahead, and
    // they hold at least one of the two.
    let reads = log
        .lines()
        .find(|l| l.starts_with("live pictures: "))
        .unwrap_or_else(|| panic!("{log}"));
    let n: Vec<u64> = reads.split(' ').filter_map(|w| w.parse().ok()).collect();
    assert!(n[0] == 4 && n[1] >= 2 && n[1] <= 4, "{reads}");
    let (b, _) = run(&data, dir.join("b/a.safetensors"), &["--random-crop"]);
    assert_eq!(tensors(&a), tensors(&b), "the same seed drew other windows");
    assert_ne!(tensors(&a), tensors(&centred), "the windows never moved");
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "lora",
        &["--random-crop", "--flip-aug", "--color-aug"],
        "random crop and colour",
    );
}

#[test]
fn a_dataset_config_crops_per_subset() {
    let dir = tmp("random-crop-config");
    let data = dataset(&dir);
    let toml = dir.join("data.toml");
    let config = |crop: bool| {
        format!(
            "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{}'\n\
             class_tokens = 'a [v] landscape'\nrandom_crop = {crop}\n",
            data.display()
        )
    };
    // The config's key is the flag: the same adapter either way.
    std::fs::write(&toml, config(true)).unwrap();
    let (from_config, log) = run(&toml, dir.join("config/a.safetensors"), &[]);
    assert!(log.contains("random crop: 2 of 3 pictures"), "{log}");
    std::fs::write(&toml, config(false)).unwrap();
    let (off, _) = run(&toml, dir.join("off/a.safetensors"), &["--random-crop"]);
    let (flag, _) = run(&data, dir.join("flag/a.safetensors"), &["--random-crop"]);
    let (centred, _) = run(&data, dir.join("centred/a.safetensors"), &[]);
    assert_eq!(tensors(&from_config), tensors(&flag));
    // A subset's `random_crop = false` wins over the flag.
    assert_eq!(tensors(&off), tensors(&centred));
}

#[test]
fn colour_augmentation_reads_every_picture_each_visit() {
    let dir = tmp("color-aug");
    let data = dataset(&dir);
    let (a, log) = run(&data, dir.join("a/a.safetensors"), &["--color-aug"]);
    assert!(
        log.contains("colour augmentation: 3 of 3 pictures")
            && log.contains("3 pictures are read and encoded by the VAE at every visit"),
        "{log}"
    );
    assert_eq!(setting(&a, "color_aug"), "true");
    let (b, _) = run(&data, dir.join("b/a.safetensors"), &["--color-aug"]);
    assert_eq!(tensors(&a), tensors(&b), "the same seed drew other colours");
    // The config's key is the flag.
    let toml = dir.join("data.toml");
    std::fs::write(
        &toml,
        format!(
            "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{}'\n\
             class_tokens = 'a [v] landscape'\ncolor_aug = true\n",
            data.display()
        ),
    )
    .unwrap();
    let (config, _) = run(&toml, dir.join("config/a.safetensors"), &[]);
    assert_eq!(tensors(&a), tensors(&config));
}
