//! The evaluation outputs: per-method statistics (mean ± std) in the paper's table layout as
//! markdown, and every number as JSON.

use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// Mean and (population) standard deviation of a list of values.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(v: &[f64]) -> Stat {
        let n = v.len();
        if n == 0 {
            return Stat {
                mean: f64::NAN,
                std: f64::NAN,
                n,
            };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        Stat {
            mean,
            std: var.sqrt(),
            n,
        }
    }

    fn cell(&self) -> String {
        if self.n == 0 {
            "–".to_string()
        } else {
            format!("{:.3} ± {:.3}", self.mean, self.std)
        }
    }
}

/// One row of the table: a method (vanilla model or an adapter) and its metrics.
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub css_all: Stat,
    pub css_explicit: Stat,
    pub css_generic: Stat,
    pub clip_score: Stat,
    pub lpips_diversity: Stat,
    /// Every image's numbers: (prompt index, seed, css, clip score).
    pub per_image: Vec<ImageScore>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageScore {
    pub prompt: String,
    pub category: String,
    pub kind: String,
    pub seed: u64,
    pub css: f64,
    pub clip_score: f64,
    pub image: String,
}

/// The markdown table (Table 1 and 2 of the paper in one: CSS splits, CLIP score, LPIPS).
pub fn markdown_table(results: &[MethodResult]) -> String {
    let mut s = String::from(
        "| Method | CSS (All) | CSS (Exp) | CSS (Gen) | CLIP score | LPIPS diversity |\n",
    );
    s.push_str("|---|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.method,
            r.css_all.cell(),
            r.css_explicit.cell(),
            r.css_generic.cell(),
            r.clip_score.cell(),
            r.lpips_diversity.cell()
        ));
    }
    s
}

pub fn write_json(path: &Path, results: &[MethodResult]) -> Result<()> {
    let text = serde_json::to_string_pretty(results).map_err(|e| Error::Json {
        path: path.into(),
        msg: e.to_string(),
    })?;
    crate::tensor::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_table() {
        let s = Stat::of(&[1.0, 3.0]);
        assert_eq!((s.mean, s.std, s.n), (2.0, 1.0, 2));
        let r = MethodResult {
            method: "vanilla".into(),
            css_all: s,
            css_explicit: s,
            css_generic: s,
            clip_score: s,
            lpips_diversity: Stat::of(&[]),
            per_image: vec![],
        };
        let t = markdown_table(&[r]);
        assert!(
            t.contains("| vanilla | 2.000 ± 1.000 |") && t.contains("| – |"),
            "{t}"
        );
    }
}
