//! `kstyle generate --image --mask`: inpainting through the real binary on the tiny model, with
//! the whole picture and with only the masked region (`--mask-crop`).

mod common;
use common::{tiny, tmp};

/// `--mask`: inpainting with the tiny 4-channel model (the kept region blended back) and with a
/// 9-channel inpainting variant of it (conv_in from `tests/fixtures/extra/inpaint.safetensors`);
/// the inpainting model refuses to run without a mask, and `--mask` needs `--image`.
#[test]
fn inpainting_runs_with_four_and_nine_channel_unets() {
    use kstyle::tensor::SafeTensorsFile;
    let dir = tmp("inpaint");
    let input = dir.join("in.png");
    common::write_test_picture(&input);
    let mask = dir.join("mask.png");
    image::GrayImage::from_fn(101, 77, |x, y| {
        image::Luma([if (20..60).contains(&x) && (10..50).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&mask)
    .unwrap();
    // The inpainting variant: the tiny folder with a 9-input conv_in.
    let nine = dir.join("sdxl-inpaint");
    common::copy_dir(&tiny().join("sdxl"), &nine);
    let weights = nine.join("unet/diffusion_pytorch_model.safetensors");
    let f = SafeTensorsFile::open(&weights).unwrap();
    let conv = common::inpaint_conv_in();
    let tensors: Vec<(String, kstyle::Tensor)> = f
        .names()
        .map(|n| {
            let t = if n == "conv_in.weight" {
                conv.clone()
            } else {
                f.tensor(n).unwrap()
            };
            (n.to_string(), t)
        })
        .collect();
    drop(f);
    kstyle::tensor::save_safetensors(&weights, &tensors, None).unwrap();
    let config = nine.join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["in_channels"] = 9.into();
    std::fs::write(&config, json.to_string()).unwrap();

    let run = |model: &std::path::Path, name: &str, extra: &[&str]| {
        let out = dir.join(name);
        (common::generate_house(model, &out, extra), out)
    };
    let (img, m) = (input.to_str().unwrap(), mask.to_str().unwrap());
    let four = tiny().join("sdxl");
    let (o, out) = run(&four, "four.png", &["--image", img, "--mask", m]);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("inpaint: ") && err.contains("strength 0.9999: the last 3 of 4"),
        "{err}"
    );
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (96, 72));
    let (o, out) = run(
        &nine,
        "nine.png",
        &["--image", img, "--mask", m, "--strength", "1"],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (96, 72));
    // The same inpainting model as an original-layout single file (A1111 / ComfyUI style):
    // the 9-input conv_in is read from the file, and the picture is the folder's, byte for byte.
    let single = common::tiny_single_file_with(
        &dir,
        "inpaint-single.safetensors",
        &[("model.diffusion_model.input_blocks.0.0.weight", conv)],
        vec![],
    );
    let config = tiny().join("sdxl");
    let (o, from_file) = run(
        &single,
        "nine-single.png",
        &[
            "--config",
            config.to_str().unwrap(),
            "--image",
            img,
            "--mask",
            m,
            "--strength",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(std::fs::read(&from_file).unwrap() == std::fs::read(&out).unwrap());

    let (o, out) = run(&nine, "no-mask.png", &["--image", img]);
    common::assert_fails_naming(&o, "inpainting model");
    assert!(!out.exists());
    let (o, _) = run(&four, "x.png", &["--mask", m]);
    common::assert_fails_naming(&o, "--image");
    let refiner = common::tiny_refiner_folder(&dir);
    let refiner = refiner.to_str().unwrap();
    let (o, _) = run(
        &four,
        "x.png",
        &["--image", img, "--mask", m, "--refiner", refiner],
    );
    common::assert_fails_naming(&o, "cannot be used with");
    std::fs::write(dir.join("bad.png"), "no").unwrap();
    let bad = dir.join("bad.png");
    let (o, _) = run(
        &four,
        "x.png",
        &["--image", img, "--mask", bad.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "bad.png");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--mask-crop`: the run equals inpainting the cropped and filled picture and mask as files
/// of their own, then compositing that result over the original (the library's overlay), byte
/// for byte; the PNG has the picture's own size, unmasked pixels are the original's; `--mask-blur`
/// is the same as a mask blurred beforehand; a mask of another size, a black mask and
/// `--mask-crop` without `--mask` are refused.
#[test]
fn mask_crop_inpaints_the_region_and_composites_it() {
    use kstyle::sample::mask_crop::{crop, crop_region, fill_resize, overlay};
    let dir = tmp("inpaint-crop");
    let input = dir.join("in.png");
    common::write_test_picture(&input);
    // A soft-edged square: partial mask values exercise the composite's blending.
    let mask_rgb = image::RgbImage::from_fn(101, 77, |x, y| {
        let d = (x as i32 - 70).abs().max((y as i32 - 22).abs());
        image::Rgb([[255, 180, 90, 0][(d - 5).clamp(0, 3) as usize]; 3])
    });
    let mask = dir.join("mask.png");
    mask_rgb.save(&mask).unwrap();
    let (img, m) = (input.to_str().unwrap(), mask.to_str().unwrap());
    let four = tiny().join("sdxl");
    let out = dir.join("crop.png");
    let o = common::generate_house(
        &four,
        &out,
        &[
            "--image",
            img,
            "--mask",
            m,
            "--mask-crop",
            "6",
            "--seed",
            "3",
        ],
    );
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    let picture = image::open(&input).unwrap().to_rgb8();
    let region = crop_region(&mask_rgb, 96, 72, 6).unwrap();
    assert!(
        err.contains(&format!("--mask-crop 6: inpainting the {region} region")),
        "{err}"
    );
    let got = image::open(&out).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (101, 77));

    // The same run by hand: the cropped, filled picture and mask (96x72, the size --mask-crop
    // processes at) inpainted whole, then composited.
    let fill = |p: &image::RgbImage| fill_resize(&crop(p, region), 96, 72).unwrap();
    let (part, part_mask) = (dir.join("part.png"), dir.join("part-mask.png"));
    fill(&picture).save(&part).unwrap();
    fill(&mask_rgb).save(&part_mask).unwrap();
    let whole = dir.join("whole.png");
    let o = common::generate_house(
        &four,
        &whole,
        &[
            "--image",
            part.to_str().unwrap(),
            "--mask",
            part_mask.to_str().unwrap(),
            "--seed",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let generated = image::open(&whole).unwrap().to_rgb8();
    assert_eq!(generated.dimensions(), (96, 72));
    let want = overlay(&picture, &mask_rgb, &generated, region).unwrap();
    assert!(
        got == want,
        "--mask-crop differs from crop, inpaint, composite"
    );
    let mut changed = 0;
    for ((g, p), mp) in got.pixels().zip(picture.pixels()).zip(mask_rgb.pixels()) {
        match mp.0[0] {
            0 => assert_eq!(g, p, "an unmasked pixel changed"),
            255 => changed += usize::from(g != p),
            _ => {}
        }
    }
    assert!(changed > 0, "nothing was repainted");

    // --mask-blur: the same as a mask file blurred beforehand (diffusers' mask_processor.blur),
    // and a softer composite than the sharp mask's.
    let blurred = dir.join("blurred.png");
    let soft_mask = kstyle::image::blur::gaussian_blur_rgb(&mask_rgb, 3.0).unwrap();
    soft_mask.save(&blurred).unwrap();
    let run_crop = |name: &str, mask: &std::path::Path, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--image", img, "--mask", mask.to_str().unwrap()];
        args.extend_from_slice(&["--mask-crop", "6", "--seed", "3"]);
        args.extend_from_slice(extra);
        let o = common::generate_house(&four, &out, &args);
        assert!(o.status.success(), "{name}: {}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    let by_flag = run_crop("blur-flag.png", &mask, &["--mask-blur", "3"]);
    let by_file = run_crop("blur-file.png", &blurred, &[]);
    assert!(
        by_flag == by_file,
        "--mask-blur differs from a pre-blurred mask"
    );
    assert!(
        by_flag != std::fs::read(&out).unwrap(),
        "the blur changed nothing"
    );
    let o = common::generate_house(
        &four,
        &dir.join("x.png"),
        &["--image", img, "--mask", m, "--mask-blur", "-2"],
    );
    common::assert_fails_naming(&o, "--mask-blur");

    let small = dir.join("small-mask.png");
    image::imageops::crop_imm(&mask_rgb, 0, 0, 100, 77)
        .to_image()
        .save(&small)
        .unwrap();
    let black = dir.join("black.png");
    image::RgbImage::new(101, 77).save(&black).unwrap();
    for (bad_mask, named) in [
        (&small, "small-mask.png are 101x77 and 100x77"),
        (&black, "black everywhere"),
        // A blur far wider than the masked region rounds it away.
        (
            &mask,
            "(after --mask-blur 2000): config: the mask is black everywhere",
        ),
    ] {
        let args = ["--image", img, "--mask", bad_mask.to_str().unwrap()];
        let blur: &[&str] = match bad_mask == &mask {
            true => &["--mask-blur", "2000"],
            false => &[],
        };
        let args = [&args[..], &["--mask-crop", "6"], blur].concat();
        let o = common::generate_house(&four, &dir.join("x.png"), &args);
        common::assert_fails_naming(&o, named);
    }
    let o = common::generate_house(
        &four,
        &dir.join("x.png"),
        &["--image", img, "--mask-crop", "6"],
    );
    common::assert_fails_naming(&o, "--mask");
    assert!(!dir.join("x.png").exists());
}
