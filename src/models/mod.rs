//! Model families, laid out like their checkpoint key trees.

pub mod clip;
pub mod lpips;
pub mod presets;
pub mod unet;
pub mod vae;
