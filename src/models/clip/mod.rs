//! CLIP pieces that do not need tensors: the BPE tokenizer and the image preprocessing.

pub mod preprocess;
pub mod tokenizer;
