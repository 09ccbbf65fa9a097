//! `kstyle eval` end to end on the tiny models: generation for the vanilla model and an adapter,
//! the table, the JSON and the grid; then `--images` re-scores the same folder identically.

mod common;
use common::{kstyle, tiny, tmp};

#[test]
fn eval_writes_table_json_and_grid_and_rescoring_agrees() {
    let dir = tmp("eval");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (i, name) in ["a.png", "b.png"].iter().enumerate() {
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, (i * 120) as u8])
        })
        .save(data.join(name))
        .unwrap();
    }
    let (model, clip) = (tiny().join("sdxl"), tiny().join("clip"));
    let lpips = tiny().join("reference/lpips_alex.safetensors");
    let adapter = dir.join("lora/style.safetensors");
    let o = kstyle(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--method",
        "lora",
        "--resolution",
        "64",
        "--max-steps",
        "2",
        "--grad-accum",
        "1",
        "--lr",
        "3e-2",
        "--caption-template",
        "a {trigger} palace",
        "--trigger",
        "[v]",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prompts = dir.join("prompts.tsv");
    std::fs::write(
        &prompts,
        "architecture\texplicit\ta {trigger} palace\narchitecture\tgeneric\ta palace\n",
    )
    .unwrap();
    let out = dir.join("eval");
    let o = eval_tiny_64(
        &prompts,
        &out,
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--trigger",
            "[v]",
            "--seeds",
            "2",
            "--steps",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        table.contains("| vanilla |") && table.contains("| style |"),
        "{table}"
    );
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(grid.width() > 2 * 64 && grid.height() > 2 * 64);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let methods = json.as_array().unwrap();
    assert_eq!(methods.len(), 2);
    for m in methods {
        assert_eq!(
            m["per_image"].as_array().unwrap().len(),
            4,
            "2 prompts x 2 seeds"
        );
        for k in [
            "css_all",
            "css_explicit",
            "css_generic",
            "clip_score",
            "lpips_diversity",
        ] {
            let v = m[k]["mean"].as_f64().unwrap();
            assert!(
                v.is_finite() && v.abs() <= 1.0 + 1e-9 || k == "lpips_diversity" && v >= 0.0,
                "{k} = {v}"
            );
        }
    }
    // The adapter (trained hard) must actually change the images.
    let a = image::open(out.join("vanilla/p000-s0.png"))
        .unwrap()
        .to_rgb8();
    let b = image::open(out.join("style/p000-s0.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(
        a.as_raw(),
        b.as_raw(),
        "the adapter did not change the image"
    );
    // Re-scoring the folder gives the same numbers.
    let again = dir.join("again");
    let o = kstyle(&[
        "eval",
        "--images",
        out.to_str().unwrap(),
        "--clip",
        clip.to_str().unwrap(),
        "--lpips",
        lpips.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(again.join("table.md")).unwrap(),
        table
    );
}

/// Images already in --out are reused only for the same model, files, settings and prompts
/// (`<method>/generated.json` records them): another --steps, --sampler, --sigmas, --clip-skip,
/// --vae-tiling or --vae, or a folder of images without a record, is refused by name before anything is
/// written; more seeds add only the missing images.
#[test]
fn eval_reuses_images_only_for_the_same_settings() {
    let dir = tmp("eval-record");
    let prompts = one_prompt(&dir);
    let out = dir.join("eval");
    let run = |extra: &[&str]| eval_tiny_64(&prompts, &out, extra);
    let base = ["--steps", "1", "--seeds", "2"];
    let o = run(&base);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(out.join("vanilla/generated.json").exists());
    let first = std::fs::read(out.join("vanilla/p000-s0.png")).unwrap();
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();

    let o = run(&base);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        !common::stderr(&o).contains("vanilla: prompt"),
        "regenerated"
    );

    let vae = tiny().join("sdxl/vae");
    let changed: [(&[&str], &str); 6] = [
        (
            &["--steps", "1", "--seeds", "2", "--sampler", "dpmpp-2m"],
            "sampler",
        ),
        (
            &["--steps", "1", "--seeds", "2", "--sigmas", "beta"],
            "sampler",
        ),
        (&["--steps", "2", "--seeds", "2"], "steps"),
        (
            &["--steps", "1", "--seeds", "2", "--vae-tiling"],
            "vae_tiling",
        ),
        (
            &["--steps", "1", "--seeds", "2", "--clip-skip", "1"],
            "clip_skip",
        ),
        (
            &[
                "--steps",
                "1",
                "--seeds",
                "2",
                "--vae",
                vae.to_str().unwrap(),
            ],
            "vae",
        ),
    ];
    for (args, needle) in changed {
        let o = run(args);
        common::assert_fails_naming(&o, needle);
        common::assert_fails_naming(&o, "vanilla");
        assert_eq!(
            std::fs::read(out.join("vanilla/p000-s0.png")).unwrap(),
            first
        );
        assert_eq!(
            std::fs::read_to_string(out.join("table.md")).unwrap(),
            table
        );
    }

    let o = run(&["--steps", "1", "--seeds", "3"]);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("seed 2") && !err.contains("seed 0"), "{err}");

    std::fs::remove_file(out.join("vanilla/generated.json")).unwrap();
    let o = run(&base);
    common::assert_fails_naming(&o, "generated.json");
}

/// `eval --sampler --sigmas` makes the picture `generate` makes with the same seed and settings,
/// byte for byte, for a deterministic and an ancestral sampler (whose step noise follows the
/// image's seed in both).
#[test]
fn eval_images_are_the_pictures_generate_makes() {
    let dir = tmp("eval-sampler");
    let prompts = one_prompt(&dir);
    let model = tiny().join("sdxl");
    for (i, sampler) in [&["dpmpp-2m", "--sigmas", "beta"][..], &["euler-a"][..]]
        .iter()
        .enumerate()
    {
        let out = dir.join(format!("eval{i}"));
        let args = [&["--steps", "3", "--seeds", "2", "--sampler"][..], sampler].concat();
        let o = eval_tiny_64(&prompts, &out, &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let png = dir.join(format!("gen{i}.png"));
        let mut gen = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a palace",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "1",
            "--out",
            png.to_str().unwrap(),
            "--sampler",
        ];
        gen.extend_from_slice(sampler);
        let o = kstyle(&gen);
        assert!(o.status.success(), "{}", common::stderr(&o));
        assert!(
            std::fs::read(out.join("vanilla/p000-s1.png")).unwrap() == std::fs::read(&png).unwrap(),
            "{sampler:?}: eval's picture differs from generate's"
        );
    }
}

/// A prompt set of one generic prompt, "a palace", in `dir`.
fn one_prompt(dir: &std::path::Path) -> std::path::PathBuf {
    let prompts = dir.join("prompts.tsv");
    std::fs::write(&prompts, "architecture\tgeneric\ta palace\n").unwrap();
    prompts
}

/// `kstyle eval` of the tiny model at 64 px with `prompts` into `out`, plus `extra`.
fn eval_tiny_64(
    prompts: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let (model, clip) = (tiny().join("sdxl"), tiny().join("clip"));
    let lpips = tiny().join("reference/lpips_alex.safetensors");
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--clip",
        clip.to_str().unwrap(),
        "--lpips",
        lpips.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--size",
        "64",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kstyle(&args)
}
