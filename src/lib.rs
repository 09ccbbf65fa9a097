//! kstyle: an SDXL + CLIP runtime that trains and runs K-StyleLoRA adapters.
//!
//! Layout: `tensor` (the one tensor type), `backend` (CPU oracle; CUDA alongside), `autograd`
//! (LoRA-only tape with checkpointing), `nn` (layers), `tolerance` (comparison presets).

pub mod autograd;
pub mod backend;
mod error;
pub mod eval;
pub mod formats;
pub mod image;
pub mod models;
pub mod nn;
pub mod tensor;
pub mod tolerance;
pub mod train;
pub mod verify;

#[cfg(test)]
pub(crate) mod test_fixtures;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Shape, Tensor};
