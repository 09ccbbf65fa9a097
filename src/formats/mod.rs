//! Checkpoint formats and every key rename (STYLE.md: renaming happens once, at the loading
//! boundary). All of it works on [`RawTensor`] maps so that no tensor library is involved and
//! converted weights stay bit-identical to the source.
//!
//! - [`raw`]: the raw tensor type, memory-mapped safetensors files, shards, writing.
//! - [`diffusers`]: pipeline folders (`model_index.json`, component configs, variants).
//! - [`single_file`]: original-layout SDXL checkpoints -> the four diffusers maps.
//! - [`unet_layout`]: UNet block positions in both layouts, computed from the config.
//! - [`kohya`]: kohya LoRA files, both directions.
//! - [`lora_patch`]: every LoRA-family file (PEFT, diffusers, LoCon, LoHa, LoKr, DoRA) read as
//!   per-weight patches; their merge math lives in `lora_delta`, PEFT metadata in `peft_config`.

pub mod adapter;
pub mod diffusers;
pub mod error;
pub mod export;
pub mod kohya;
mod lora_delta;
pub mod lora_patch;
mod peft_config;
pub mod python_json;
pub mod raw;
pub mod single_file;
pub mod textual_inversion;
pub mod to_single_file;
pub mod unet_layout;

pub use error::{Error, Result};
pub use raw::{MappedFile, RawTensor, TensorMap, WeightFiles};
