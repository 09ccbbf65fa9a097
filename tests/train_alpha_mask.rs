//! `kstyle train --alpha-mask` (kohya's --alpha_mask): each picture's alpha channel weights its
//! diffusion loss. The masked loss itself is checked against PyTorch by the `train_loss_types`
//! verify case (`masked`); here, through the real binary on the tiny model: opaque pictures
//! train exactly as without the flag, transparent ones train nothing, half-transparent ones
//! weigh less, and the setting is recorded. `--mask-data` (kohya's masked loss with conditioning
//! images) trains exactly as the same mask given as alpha.

mod common;
use common::train::{diffusion, setting, tensors, train, train_ok};
use common::{assert_fails_naming, tmp};
use kstyle::tensor::SafeTensorsFile;
use std::path::{Path, PathBuf};

/// Three RGBA pictures of different shapes whose alpha is `alpha(x, width)`, captioned.
fn rgba_dataset(dir: &Path, name: &str, alpha: fn(u32, u32) -> u8) -> PathBuf {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    for (file, w, h) in [("a.png", 96, 64), ("b.png", 64, 64), ("c.png", 72, 112)] {
        let img = image::RgbaImage::from_fn(w, h, |x, y| {
            image::Rgba([
                (x * 3) as u8,
                (y * 2) as u8,
                ((x * y) % 251) as u8,
                alpha(x, w),
            ])
        });
        img.save(data.join(file)).unwrap();
        std::fs::write(data.join(file).with_extension("txt"), "a {trigger} palace").unwrap();
    }
    data
}

#[test]
fn alpha_masks_weight_the_diffusion_loss() {
    let dir = tmp("alpha-mask");
    let run = |data: &Path, name: &str, extra: &[&str]| {
        let out = dir.join("runs").join(name).join("a.safetensors");
        let args = [
            &["--max-steps", "3", "--lr", "1e-2", "--flip-aug"][..],
            extra,
        ]
        .concat();
        train_ok(data, &out, "lora", &args)
    };
    // Opaque: the mask is all ones, so the run is the run without it, bit for bit.
    let opaque = rgba_dataset(&dir, "opaque", |_, _| 255);
    let plain = run(&opaque, "plain", &[]);
    let masked = run(&opaque, "masked", &["--alpha-mask"]);
    assert_eq!(tensors(&plain), tensors(&masked));
    assert_eq!(setting(&masked, "alpha_mask"), "true");
    assert_eq!(setting(&plain, "alpha_mask"), "false");

    // Transparent: no diffusion loss, so lora_up never leaves zero.
    let clear = rgba_dataset(&dir, "clear", |_, _| 0);
    let none = run(&clear, "none", &["--alpha-mask"]);
    assert!(diffusion(&none).iter().all(|&l| l == 0.0));
    let f = SafeTensorsFile::open(&none).unwrap();
    let ups: Vec<&str> = f
        .names()
        .filter(|n| n.ends_with("lora_up.weight"))
        .collect();
    assert!(!ups.is_empty());
    for n in ups {
        let v = f.tensor(n).unwrap().to_vec_f64().unwrap();
        assert!(v.iter().all(|&x| x == 0.0), "{n} moved");
    }

    // The left half transparent: each step's loss below the unmasked one from the same draws
    // (the pictures' colours are those of the opaque set: alpha is not composited).
    let half = rgba_dataset(&dir, "half", |x, w| if x < w / 2 { 0 } else { 255 });
    let (h, p) = (
        diffusion(&run(&half, "half", &["--alpha-mask"])),
        diffusion(&plain),
    );
    assert_eq!(h.len(), 3);
    assert!(
        h.iter().zip(&p).all(|(h, p)| *h > 0.0 && h < p),
        "{h:?} vs {p:?}"
    );
    // Without the flag the alpha channel is dropped: the half set trains as the opaque one.
    assert_eq!(tensors(&run(&half, "half-plain", &[])), tensors(&plain));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--mask-data`: mask pictures whose red channel is the half set's alpha train exactly what
/// `--alpha-mask` trains on the half set; a missing or mis-sized mask, a folder that is not one,
/// and both flags at once are refused by name.
#[test]
fn mask_pictures_weight_the_loss_as_alpha_does() {
    let dir = tmp("mask-data");
    let half_alpha = |x: u32, w: u32| if x < w / 2 { 0 } else { 255 };
    let opaque = rgba_dataset(&dir, "opaque", |_, _| 255);
    let half = rgba_dataset(&dir, "half", half_alpha);
    let masks = dir.join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    for (file, w, h) in [("a.png", 96, 64), ("b.png", 64, 64), ("c.png", 72, 112)] {
        let red = image::RgbImage::from_fn(w, h, |x, _| image::Rgb([half_alpha(x, w), 9, 200]));
        red.save(masks.join(file)).unwrap();
    }
    let args = ["--max-steps", "3", "--lr", "1e-2", "--flip-aug"];
    let out = |name: &str| dir.join("runs").join(name).join("a.safetensors");
    let alpha = train_ok(
        &half,
        &out("alpha"),
        "lora",
        &[&args[..], &["--alpha-mask"]].concat(),
    );
    let m = masks.to_str().unwrap();
    let mask = train_ok(
        &opaque,
        &out("mask"),
        "lora",
        &[&args[..], &["--mask-data", m]].concat(),
    );
    assert_eq!(tensors(&alpha), tensors(&mask));
    assert_eq!(setting(&mask, "mask_data"), "masks");

    let refused = |extra: &[&str], needle: &str| {
        let o = train(
            &opaque,
            &out("refused"),
            "lora",
            &[&["--max-steps", "1"][..], extra].concat(),
        );
        assert_fails_naming(&o, needle);
    };
    refused(&["--mask-data", m, "--alpha-mask"], "pass one");
    let nowhere = dir.join("nowhere");
    refused(&["--mask-data", nowhere.to_str().unwrap()], "not a folder");
    image::RgbImage::new(8, 8)
        .save(masks.join("b.png"))
        .unwrap();
    refused(&["--mask-data", m], "the mask is 8x8");
    std::fs::remove_file(masks.join("b.png")).unwrap();
    refused(&["--mask-data", m], "no mask in --mask-data");
    std::fs::remove_dir_all(&dir).unwrap();
}
