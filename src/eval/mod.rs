//! Evaluation: CSS (All/Exp/Gen), CLIP score, LPIPS diversity, tables and grids.

pub mod metrics;
pub mod prompts;
pub mod report;
pub mod runner;
