//! `kstyle export ADAPTER --format kohya|diffusers [--bake-gates PROMPTS_FILE] --out FILE`: an
//! adapter as a file other tools load. Gated adapters need `--bake-gates` (and `--model`): their
//! gates are averaged over the calibration prompts and folded into the LoRA up weights.

use super::DeviceArg;
use kstyle::formats::adapter::Adapter;
use kstyle::formats::export::{export_adapter, ExportFormat};
use kstyle::models::unet::UNetConfig;
use kstyle::sample::bake::calibrate_gates;
use kstyle::sample::model_files::ModelFiles;
use kstyle::sample::pipeline::{unet_index_for, LoadOptions, SdxlPipeline};
use kstyle::train::concepts::parse_concepts;
use kstyle::DType;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The kstyle adapter file.
    pub adapter: PathBuf,
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// Calibration prompts, one a line: bake the gates into plain LoRA weights.
    #[arg(long)]
    pub bake_gates: Option<PathBuf>,
    /// The model the adapter was trained on (default: the built-in SDXL base architecture; gate
    /// baking needs real weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sampling steps and image side used for calibration.
    #[arg(long, default_value_t = 10)]
    pub bake_steps: usize,
    #[arg(long, default_value_t = 1024)]
    pub bake_size: usize,
    /// Stored precision.
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FormatArg {
    Kohya,
    Diffusers,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DTypeArg {
    F16,
    Bf16,
    F32,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dtype = match a.dtype {
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F32 => DType::F32,
    };
    let format = match a.format {
        FormatArg::Kohya => ExportFormat::Kohya,
        FormatArg::Diffusers => ExportFormat::Diffusers,
    };
    let device = a.device.device();
    let (index, baked) = match (&a.bake_gates, &a.model) {
        (Some(prompts_file), Some(model)) => {
            let text = std::fs::read_to_string(prompts_file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", prompts_file.display()))?;
            let prompts = parse_concepts(&text);
            if prompts.is_empty() {
                anyhow::bail!("{}: no calibration prompts", prompts_file.display());
            }
            let opts = LoadOptions {
                model: model.clone(),
                config: a.config.clone(),
                dtype: DType::F32,
                weight_dtype: None,
                device,
                loras: vec![(a.adapter.clone(), 1.0)],
                vae: None,
            };
            let mut pipe = SdxlPipeline::load(&opts)?;
            eprintln!(
                "calibrating gates on {} prompts, {} steps at {}x{}",
                prompts.len(),
                a.bake_steps,
                a.bake_size,
                a.bake_size
            );
            let baked = calibrate_gates(&mut pipe, &prompts, a.bake_steps, a.bake_size, 0)?;
            (pipe.module_index(), Some(baked))
        }
        (Some(_), None) => anyhow::bail!("--bake-gates runs the model: pass --model"),
        (None, Some(model)) => {
            let files = ModelFiles::resolve(model, a.config.as_deref())?;
            let cfg = files.unet_config()?;
            (unet_index_for(&cfg), None)
        }
        (None, None) => (unet_index_for(&UNetConfig::sdxl_base()), None),
    };
    let adapter = Adapter::load(&a.adapter, &index, device)?;
    export_adapter(&adapter, &index, format, baked.as_ref(), dtype, &a.out)?;
    println!("{}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
