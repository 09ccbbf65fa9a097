//! kstyle: an SDXL + CLIP runtime that trains and runs K-StyleLoRA adapters.
//!
//! Layout: `tensor` (the one tensor type), `backend` (CPU oracle; CUDA alongside), `autograd`
//! (LoRA-only tape with checkpointing), `nn` (layers), `tolerance` (comparison presets).

pub mod autograd;
pub mod backend;
mod error;
pub mod nn;
pub mod tensor;
pub mod tolerance;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Shape, Tensor};
