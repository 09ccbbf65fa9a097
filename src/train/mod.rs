//! Training: the cultural semantic loss, the optimizer, the loop and its checkpoints.

pub mod cultural;
pub mod data;
pub mod optim;
pub mod plot;
pub mod step;
