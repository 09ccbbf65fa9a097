//! Training: the cultural semantic loss, the optimizer, the loop and its checkpoints.

pub mod adafactor;
pub mod adamw8bit;
mod batch;
pub mod captions;
pub mod checkpoint;
pub mod concepts;
pub mod config;
pub mod cultural;
pub mod data;
mod examples;
pub mod lion;
pub mod lr;
pub mod lr_groups;
pub mod max_norm;
pub mod memory;
pub mod noise;
pub mod optim;
pub mod optimizer_args;
pub mod plot;
pub mod prodigy;
pub mod samples;
mod start;
pub mod step;
pub mod text;
pub mod trainer;
pub mod validation;
