//! Evaluation: CSS (All/Exp/Gen), CLIP score, LPIPS diversity, tables and grids.

pub mod prompts;
pub mod report;
