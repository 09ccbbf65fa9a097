//! `kstyle convert --model SRC --to single-file|diffusers --out PATH [--config DIR] [--vae V]
//! [--lora FILE[:S]]...`: a diffusers folder as one original-layout file (what A1111 and ComfyUI
//! load), or a single file as a diffusers folder, LoRAs baked in; a single file or a folder with
//! LoRAs baked in as a new one of its kind. Tensors keep their dtype and bytes unless a LoRA patches them.

use kstyle::models::unet::KohyaLoraFile;
use kstyle::sample::convert::{
    folder_to_single_file, folder_with_loras, single_file_to_folder, single_file_with_loras,
};
use kstyle::sample::model_files::ModelFiles;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers SDXL folder (base, refiner or inpainting) or an original-layout single file.
    #[arg(long)]
    pub model: PathBuf,
    /// Architecture folder for a single-file --model (default: the built-in SDXL base, or refiner
    /// for a refiner file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Bake in another VAE (as `generate --vae` takes one: a single VAE file, read with the
    /// model's VAE config, or a VAE folder, whose config goes into a diffusers --out). Its
    /// tensors are written as stored, after a load checks them against the model.
    #[arg(long)]
    pub vae: Option<std::path::PathBuf>,
    /// Bake a LoRA-family file into the weights at strength S (default 1), FILE[:S], repeatable
    /// (what `generate --lora` merges: kohya, PEFT/diffusers, LoCon, LoHa, LoKr, DoRA). Each
    /// patched weight is formed in f64 and rounded once to its stored dtype. With LoRAs (or
    /// --vae) a single file may become a new single file, and a folder a new folder.
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    #[arg(long, value_enum)]
    pub to: Target,
    /// The new file or folder; an existing one is never replaced.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Target {
    /// One .safetensors in the original (sgm) layout.
    SingleFile,
    /// A diffusers folder.
    Diffusers,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let files = ModelFiles::resolve(&a.model, a.config.as_deref())?.with_vae(a.vae.clone())?;
    let loras: Vec<KohyaLoraFile> = a
        .loras
        .iter()
        .map(|s| super::generate::parse_lora(s).map(|(p, m)| KohyaLoraFile::new(p, m)))
        .collect::<anyhow::Result<_>>()?;
    let done = match a.to {
        Target::SingleFile if files.single_file => single_file_with_loras(&files, &loras, &a.out)?,
        Target::SingleFile => folder_to_single_file(&files, &loras, &a.out)?,
        Target::Diffusers if files.single_file => single_file_to_folder(&files, &loras, &a.out)?,
        Target::Diffusers => folder_with_loras(&files, &loras, &a.out)?,
    };
    let markers = match done.markers.is_empty() {
        true => String::new(),
        false => format!(" (markers: {})", done.markers.join(", ")),
    };
    let merged = match loras.len() {
        0 => String::new(),
        n => format!(
            ", {} module weights patched by {n} LoRA file(s)",
            done.merged
        ),
    };
    eprintln!(
        "{} -> {}: {} tensors{markers}{merged}",
        a.model.display(),
        a.out.display(),
        done.tensors
    );
    Ok(ExitCode::SUCCESS)
}
