//! Training: the cultural semantic loss, the optimizer, the loop and its checkpoints.

pub mod cultural;
