//! Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"), as lion-pytorch 0.2.5
//! implements it and kohya's `--optimizer_type Lion` runs it: one moment instead of AdamW's two,
//! and a step of the same size for every element, its direction the sign of an interpolation
//! between the moment and the gradient:
//!
//! - p <- p (1 - lr wd)
//! - p <- p - lr sgn(b1 m + (1 - b1) g)
//! - m <- b2 m + (1 - b2) g
//!
//! with `sgn(0) = 0`. Every element moves by the rate, so Lion wants a rate 3 to 10 times
//! smaller than AdamW's and a weight decay as many times larger (the paper's advice).
//! lion-pytorch's defaults, which kohya keeps, are betas (0.9, 0.99) and no weight decay.
//! With `decoupled_weight_decay=True` the decay is divided by the starting rate (kohya's
//! `--learning_rate`), so p shrinks by `lr / lr0 * wd` a step, following the schedule but not
//! the rate's size.
//!
//! The state is the f32 masters and m: no second moment, so Lion's optimizer state is two
//! thirds of AdamW's. Each trainable steps at its own rate (LoRA+, block weights and a text
//! encoder rate work as with AdamW); a trainable at rate 0 does not move.

use super::optimizer_args::key_values;
use super::prodigy::parse_flag;
use crate::{Error, Result};

/// lion-pytorch's settings besides the rate, betas and weight decay (their flags, or kohya's
/// keys split off first: see `train::optimizer_args`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LionConfig {
    pub decoupled_weight_decay: bool,
}

impl LionConfig {
    /// kohya's `--optimizer_args` spelling: `decoupled_weight_decay=True`. `use_triton` only
    /// picks lion-pytorch's fused kernel (the same arithmetic; kstyle's step is always one
    /// fused launch), so it is accepted and changes nothing.
    pub fn parse(args: &[String]) -> Result<LionConfig> {
        let mut c = LionConfig::default();
        for (key, value) in key_values(args)? {
            match key {
                "decoupled_weight_decay" => c.decoupled_weight_decay = parse_flag(key, value)?,
                "use_triton" => {
                    parse_flag(key, value)?;
                }
                other => {
                    return Err(Error::Config(format!(
                        "--optimizer-args: Lion has no setting `{other}` \
                         (decoupled_weight_decay, use_triton)"
                    )))
                }
            }
        }
        Ok(c)
    }

    /// For the adapter's recorded settings.
    pub fn describe(&self) -> String {
        format!(
            "lion decoupled_weight_decay={}",
            self.decoupled_weight_decay
        )
    }

    /// The weight decay the step applies per unit of rate: `wd`, or `wd / lr0` when decoupled
    /// (`lr0` the run's starting rate, kohya's `--learning_rate`, which lion-pytorch keeps as
    /// `_init_lr`).
    pub fn decay(&self, wd: f64, lr0: f64) -> f64 {
        match self.decoupled_weight_decay {
            true => wd / lr0,
            false => wd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LionConfig;

    #[test]
    fn kohya_optimizer_args_parse() {
        let args = ["decoupled_weight_decay=True", "use_triton=False"].map(String::from);
        let c = LionConfig::parse(&args).unwrap();
        assert!(c.decoupled_weight_decay);
        assert_eq!(c.decay(0.5, 0.25), 2.0);
        assert_eq!(LionConfig::parse(&[]).unwrap(), LionConfig::default());
        assert_eq!(LionConfig::default().decay(0.5, 0.25), 0.5);
        for bad in [
            "decoupled_weight_decay",
            "decoupled_weight_decay=maybe",
            "betas=0.9,0.99",
            "weight_decay=1",
            "d0=1e-6",
        ] {
            assert!(LionConfig::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
