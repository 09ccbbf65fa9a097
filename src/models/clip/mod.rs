//! CLIP: the BPE tokenizer and image preprocessing (no tensors), the text tower used by SDXL's two
//! encoders, the ViT vision tower and `CLIPModel` for the evaluation metrics.

pub mod config;
pub mod encoder;
pub mod model;
pub mod preprocess;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig, EncoderConfig};
pub use model::ClipModel;
pub use text::{token_ids, ClipTextModel, ClipTextOutput, ClipTextTransformer};
pub use vision::ClipVisionTransformer;
