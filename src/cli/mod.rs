//! One file per subcommand.

mod bench;
mod convert;
mod demo;
mod eval;
mod export;
mod generate;
mod gpu_parity;
mod kernels;
mod train;
mod verify;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kstyle",
    version,
    about = "SDXL + CLIP runtime that trains and runs K-StyleLoRA adapters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole job on the tiny models in this repository: verify, train, generate, evaluate.
    Demo(demo::Args),
    /// Text to image, image to image and inpainting with an SDXL checkpoint (and a refiner),
    /// optional LoRA / kstyle adapter files.
    Generate(Box<generate::Args>),
    /// Train a K-StyleLoRA adapter (or a baseline) on a folder of captioned images.
    Train(Box<train::Args>),
    /// A diffusers folder as one original-layout file (A1111, ComfyUI), or a single file as a
    /// diffusers folder.
    Convert(convert::Args),
    /// Write an adapter in kohya or diffusers layout for other tools (gates baked if gated).
    Export(export::Args),
    /// CSS (All/Exp/Gen), CLIP score and LPIPS diversity tables for the vanilla model and adapters.
    Eval(Box<eval::Args>),
    /// Run every reference case of a fixtures directory and report each checked tensor.
    Verify(verify::Args),
    /// List the CUDA kernel families, or compile-check them with NVRTC (no GPU needed).
    Kernels(kernels::Args),
    /// Every CUDA op against the CPU oracle (needs a GPU; exit 2 = skipped, no device).
    GpuParity(gpu_parity::Args),
    /// CUDA timings with the roofline next to every number (needs a GPU).
    Bench(bench::Args),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> kstyle::Device {
        match self {
            DeviceArg::Cpu => kstyle::Device::Cpu,
            DeviceArg::Cuda => kstyle::Device::Cuda(0),
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Generate(a) => generate::run(*a),
        Command::Train(a) => train::run(*a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Eval(a) => eval::run(*a),
        Command::Verify(a) => verify::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::GpuParity(a) => gpu_parity::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
