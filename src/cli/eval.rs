//! `kstyle eval`: the paper's tables for the vanilla model and any adapters (or for existing
//! images with `--images DIR`): CSS (All / Exp / Gen), CLIP score and LPIPS diversity.

use super::DeviceArg;
use kstyle::eval::prompts::{default_prompts, load_prompts};
use kstyle::eval::report::markdown_table;
use kstyle::eval::runner::{run_eval, scan_images, EvalConfig, GenerateSettings};
use kstyle::train::concepts::{default_concepts, load_concepts};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The SDXL model to generate with (not needed with --images).
    #[arg(long, required_unless_present = "images")]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// CLIP ViT-B/32 folder (HF layout): concept, image and text embeddings.
    #[arg(long)]
    pub clip: PathBuf,
    /// LPIPS AlexNet weights as safetensors (see docs/LPIPS.md).
    #[arg(long)]
    pub lpips: PathBuf,
    /// Adapter files to compare with the vanilla model (repeatable).
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Prompt set TSV: category<TAB>explicit|generic<TAB>prompt (default: the built-in set).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Concepts file for CSS (default: the built-in Korean traditional set).
    #[arg(long)]
    pub concepts: Option<PathBuf>,
    /// Trigger phrase substituted for {trigger} in the prompts.
    #[arg(long, default_value = "Korean traditional")]
    pub trigger: String,
    /// Seeds per prompt (0..N); LPIPS diversity needs at least 2. With --images, the seeds found.
    #[arg(long, default_value_t = 4)]
    pub seeds: u64,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub cfg: f64,
    /// Image side.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// A VAE to use instead of the model's (as `generate --vae`).
    #[arg(long, conflicts_with = "images")]
    pub vae: Option<PathBuf>,
    /// diffusers' `clip_skip` (as `generate --clip-skip`).
    #[arg(long, default_value_t = 0, conflicts_with = "images")]
    pub clip_skip: usize,
    /// Tiled VAE decoding (as `generate --vae-tiling`).
    #[arg(long, conflicts_with = "images")]
    pub vae_tiling: bool,
    /// The sampler (as `generate --sampler`; `auto`: the model's scheduler config). Each image
    /// is the one `generate` makes with the same seed and settings.
    #[arg(long, value_enum, default_value = "euler", conflicts_with = "images")]
    pub sampler: super::generate::SamplerArg,
    /// The sigma ramp (as `generate --sigmas`).
    #[arg(long, value_enum, default_value = "config", conflicts_with = "images")]
    pub sigmas: super::generate::SigmasArg,
    /// Score the images of a previous run's output folder instead of generating.
    #[arg(long, conflicts_with_all = ["model", "adapters"])]
    pub images: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Output folder: images, table.md, results.json, grid.png.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let concepts = match &a.concepts {
        Some(p) => load_concepts(p)?,
        None => default_concepts(),
    };
    let (prompts, methods, seeds, out) = match &a.images {
        Some(dir) => {
            let (methods, prompts, seeds) = scan_images(dir)?;
            (prompts, Some(methods), seeds, dir.clone())
        }
        None => {
            let prompts = match &a.prompts {
                Some(p) => load_prompts(p, &a.trigger)?,
                None => default_prompts(&a.trigger),
            };
            (prompts, None, (0..a.seeds).collect(), a.out.clone())
        }
    };
    let generate = a.model.as_ref().map(|m| GenerateSettings {
        model: m.clone(),
        config: a.config.clone(),
        adapters: a.adapters.clone(),
        steps: a.steps,
        guidance: a.cfg,
        size: a.size,
        vae: a.vae.clone(),
        clip_skip: a.clip_skip,
        vae_tiling: a.vae_tiling,
        sampler: a.sampler.kind(),
        sigmas: a.sigmas.sigmas(),
    });
    let cfg = EvalConfig {
        clip: a.clip.clone(),
        lpips: a.lpips.clone(),
        concepts,
        prompts,
        seeds,
        out,
        device: a.device.device(),
        generate,
    };
    let results = run_eval(&cfg, methods, &mut |m| eprintln!("{m}"))?;
    // With --images the scores go next to the images; --out then receives copies of the outputs.
    if a.images.is_some() && a.out != cfg.out {
        std::fs::create_dir_all(&a.out)?;
        for f in ["table.md", "results.json", "grid.png"] {
            std::fs::copy(cfg.out.join(f), a.out.join(f))?;
        }
    }
    print!("{}", markdown_table(&results));
    println!("table: {}", a.out.join("table.md").display());
    Ok(ExitCode::SUCCESS)
}
