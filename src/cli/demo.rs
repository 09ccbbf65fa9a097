//! `kstyle demo`: the whole job on the tiny models that ship with the repository (or any
//! fixtures folder of that layout): verify against the PyTorch references, train a K-StyleLoRA
//! adapter on a small generated dataset, generate with and without it, and score both.

use super::DeviceArg;
use anyhow::Context;
use kstyle::backend::cpu::optim::AdamW;
use kstyle::eval::prompts::parse;
use kstyle::eval::report::markdown_table;
use kstyle::eval::runner::{run_eval, EvalConfig, GenerateSettings};
use kstyle::formats::adapter::Method;
use kstyle::models::unet::CheckpointPolicy;
use kstyle::nn::lora::LoraConfig;
use kstyle::sample::pipeline::{SamplerKind, Sigmas};
use kstyle::train::concepts::default_concepts;
use kstyle::train::data::CaptionSource;
use kstyle::train::lr::LrSchedule;
use kstyle::train::trainer::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fixtures folder (models + reference/); default: the tiny models in this repository.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny"))]
    pub fixtures: PathBuf,
    #[arg(long, default_value = "kstyle-demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub steps: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// A handful of striped and checked images with captions: enough to move an adapter.
fn make_dataset(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let palettes = [
        ([180u8, 40, 40], [30, 90, 60]),
        ([40, 60, 160], [220, 200, 120]),
        ([200, 120, 30], [60, 30, 90]),
        ([20, 120, 140], [240, 230, 220]),
    ];
    for (i, (a, b)) in palettes.iter().enumerate() {
        let img = image::RgbImage::from_fn(96, 96, |x, y| {
            if ((x / (6 + 2 * i as u32)) + (y / 8)) % 2 == 0 {
                image::Rgb(*a)
            } else {
                image::Rgb(*b)
            }
        });
        let path = dir.join(format!("pattern{i}.png"));
        img.save(&path)?;
        std::fs::write(
            path.with_extension("txt"),
            format!("a {{trigger}} pattern, dancheong colours, variation {i}"),
        )?;
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let fx = &a.fixtures;
    let device = a.device.device();
    println!(
        "== 1. verify {} against the PyTorch references",
        fx.display()
    );
    let report = kstyle::verify::run(fx, device, None)?;
    println!("{} passed, {} failed", report.passed(), report.failed());
    if !report.ok() {
        anyhow::bail!(
            "verification failed: run `kstyle verify {}` for the rows",
            fx.display()
        );
    }
    println!("== 2. train a K-StyleLoRA adapter ({} steps)", a.steps);
    let data = a.out.join("data");
    make_dataset(&data)?;
    let adapter = a.out.join("kstyle.safetensors");
    let cfg = TrainConfig {
        model: fx.join("sdxl"),
        config_dir: None,
        vae: None,
        vae_tiling: false,
        data,
        dataset_config: None,
        out: adapter.clone(),
        method: Method::Kstyle,
        clip: Some(fx.join("clip")),
        concepts: default_concepts(),
        lora: LoraConfig::default(),
        lora_dropout: Default::default(),
        conv_lora: None,
        algo: Default::default(),
        scale_weight_norms: None,
        targets: ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec(),
        lambda: 0.1,
        min_snr_gamma: None,
        debiased: false,
        scale_v_pred_loss: false,
        v_pred_like_loss: None,
        loss_type: Default::default(),
        huber_schedule: None,
        huber_c: None,
        huber_scale: None,
        noise_offset: None,
        multires: None,
        ip_noise_gamma: None,
        ip_noise_random_strength: false,
        min_timestep: None,
        max_timestep: None,
        cultural_pool: None,
        adamw: AdamW {
            lr: 1e-2,
            ..AdamW::default()
        },
        schedule: LrSchedule::CONSTANT,
        grad_accum: 2,
        batch_size: 1,
        save_precision: kstyle::DType::F32,
        epochs: 1,
        max_steps: Some(a.steps),
        resolution: 64,
        buckets: false,
        kohya_buckets: None,
        skip_image_area: None,
        flip_aug: false,
        random_crop: false,
        color_aug: false,
        alpha_mask: false,
        weighted_captions: false,
        mask_data: None,
        shuffle_caption: false,
        max_token_length: None,
        keep_tokens: 0,
        caption_tag_dropout: None,
        caption_dropout_every_epochs: None,
        token_warmup: None,
        caption_separator: ",".into(),
        keep_tokens_separator: None,
        secondary_separator: None,
        seed: 0,
        save_every: None,
        save_every_epochs: None,
        keep_checkpoints: None,
        resume: None,
        network_weights: None,
        dim_from_weights: false,
        sample_every: None,
        sample_every_epochs: None,
        sample_at_first: false,
        sample_prompts: Vec::new(),
        captions: CaptionSource {
            template: None,
            trigger: "[v]".into(),
            extension: "txt".into(),
            prefix: None,
            suffix: None,
            wildcard: false,
        },
        caption_dropout: None,
        reg_data: None,
        prior_loss_weight: 1.0,
        val_data: None,
        val_every: None,
        max_grad_norm: None,
        checkpointing: Some(CheckpointPolicy::EveryBlock),
        memory_budget: None,
        cache_dir: None,
        device,
        dtype: kstyle::DType::F32,
        weight_dtype: None,
        train_text_encoder: false,
        text_encoder_lr: None,
        loraplus: Default::default(),
        optimizer: Default::default(),
        block_lr: Default::default(),
        block_dims: Default::default(),
        dora: false,
    };
    let mut trainer = Trainer::new(cfg, &mut |m| println!("{m}"))?;
    trainer.run(|s| {
        println!(
            "step {:>3}  loss {:.4}  diffusion {:.4}  cultural {:.4}",
            s.step,
            s.loss,
            s.diffusion,
            s.cultural.unwrap_or(f64::NAN)
        )
    })?;
    println!(
        "adapter: {}  (loss plot: {})",
        adapter.display(),
        trainer.outputs.plot.display()
    );
    println!("== 3. generate with and without it, and score (CSS, CLIP score, LPIPS diversity)");
    let prompts = parse(
        "architecture\texplicit\ta {trigger} palace gate\narchitecture\tgeneric\ta palace gate\nart\texplicit\ta {trigger} pattern\nart\tgeneric\ta pattern\n",
        "[v]",
        Path::new("<demo prompts>"),
    )?;
    // The demo's own folder: images of an earlier demo run (another adapter file) are not reused.
    let eval_dir = a.out.join("eval");
    if eval_dir.exists() {
        std::fs::remove_dir_all(&eval_dir)
            .with_context(|| format!("clearing {}", eval_dir.display()))?;
    }
    let eval = EvalConfig {
        clip: fx.join("clip"),
        lpips: fx.join("reference/lpips_alex.safetensors"),
        concepts: default_concepts(),
        prompts,
        seeds: vec![0, 1],
        out: eval_dir,
        device,
        generate: Some(GenerateSettings {
            model: fx.join("sdxl"),
            config: None,
            adapters: vec![adapter],
            steps: 8,
            guidance: 5.0,
            size: 64,
            vae: None,
            clip_skip: 0,
            vae_tiling: false,
            sampler: SamplerKind::Euler(Sigmas::Config),
            sigmas: Sigmas::Config,
        }),
    };
    let results = run_eval(&eval, None, &mut |_| {})?;
    print!("{}", markdown_table(&results));
    println!(
        "images, table.md, results.json and grid.png in {}",
        eval.out.display()
    );
    println!("(the tiny models have random weights: the numbers exercise the pipeline, they do not measure style)");
    Ok(ExitCode::SUCCESS)
}
