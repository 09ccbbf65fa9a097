//! Evaluation: the metrics of `kstyle eval` (CSS, CLIP score), computed from CLIP embeddings.

pub mod metrics;
