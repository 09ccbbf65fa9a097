//! kohya's `--optimizer_args` as kstyle reads them. kohya hands every `key=value` to the
//! optimizer's constructor as a keyword argument (the value through Python's `literal_eval`), so
//! its users set AdamW's betas, epsilon and weight decay there (`betas=0.9,0.99 weight_decay=0.1`):
//! sd-scripts has no flags for them. kstyle has the flags (`--adam-beta1`, `--adam-beta2`,
//! `--adam-epsilon`, `--weight-decay`) and takes the same settings from `--optimizer-args` too;
//! given both ways with different values, the run is refused rather than one silently winning.
//! What remains is the optimizer's own (see `train::prodigy`, `train::lion`,
//! `train::adamw8bit`).

use crate::{Error, Result};

/// The keyword arguments every optimizer of kstyle shares with AdamW.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SharedArgs {
    pub weight_decay: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
}

/// Each of `args` as a trimmed (key, value) pair; an argument without `=` is refused.
pub(crate) fn key_values(args: &[String]) -> Result<Vec<(&str, &str)>> {
    args.iter()
        .map(|arg| {
            let (key, value) = arg.split_once('=').ok_or_else(|| {
                Error::Config(format!("--optimizer-args `{arg}`: expected key=value"))
            })?;
            Ok((key.trim(), value.trim()))
        })
        .collect()
}

/// A float as Python's `literal_eval` reads one (`1e-2`, `0.01`, `1`).
pub(crate) fn float(key: &str, value: &str) -> Result<f64> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| Error::Config(format!("--optimizer-args {key}: `{value}` is not a number")))
}

/// `betas` as kohya users write it: `0.9,0.999`, `(0.9, 0.999)` or `[0.9, 0.999]`.
fn betas(value: &str) -> Result<(f64, f64)> {
    pair("betas", value)
}

/// Two numbers as kohya users write a pair: `a,b`, `(a, b)` or `[a, b]`.
pub(crate) fn pair(key: &str, value: &str) -> Result<(f64, f64)> {
    let inner = value
        .trim()
        .trim_start_matches(['(', '['])
        .trim_end_matches([')', ']']);
    let parts: Vec<&str> = inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    match parts[..] {
        [b1, b2] => Ok((float(key, b1)?, float(key, b2)?)),
        _ => Err(Error::Config(format!(
            "--optimizer-args {key}: `{value}` is not two numbers ({key}=a,b)"
        ))),
    }
}

/// Splits `args` into the shared settings and the rest, in their order. `lr` is refused: kohya
/// passes the rate itself, so a second one is an error there too. With `own_eps` the `eps` key
/// stays with the optimizer's own (Adafactor's is a pair).
pub fn split_shared(args: &[String], own_eps: bool) -> Result<(SharedArgs, Vec<String>)> {
    let mut shared = SharedArgs::default();
    let mut rest = Vec::new();
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            rest.push(arg.clone());
            continue;
        };
        match key.trim() {
            "weight_decay" => shared.weight_decay = Some(float("weight_decay", value)?),
            "eps" if own_eps => rest.push(arg.clone()),
            "eps" => shared.eps = Some(float("eps", value)?),
            "betas" => shared.betas = Some(betas(value)?),
            "lr" => {
                return Err(Error::Config(
                    "--optimizer-args lr: the rate is --lr (kohya passes it to the optimizer \
                     itself, so a second one is refused there too)"
                        .into(),
                ))
            }
            _ => rest.push(arg.clone()),
        }
    }
    Ok((shared, rest))
}

/// One setting given by its flag, by `--optimizer-args`, both (they must agree) or neither.
pub fn merge(flag: Option<f64>, arg: Option<f64>, names: (&str, &str)) -> Result<Option<f64>> {
    match (flag, arg) {
        (Some(f), Some(a)) if f != a => Err(Error::Config(format!(
            "{} {f} and --optimizer-args {}={a} disagree: give it once",
            names.0, names.1
        ))),
        (f, a) => Ok(f.or(a)),
    }
}

/// torch AdamW's keyword arguments that pick an implementation of the same arithmetic
/// (`foreach`, `fused`, `capturable`) or keep its default (`amsgrad=False`, `maximize=False`)
/// are accepted; anything else is refused, naming it.
pub fn check_adamw(args: &[String]) -> Result<()> {
    for (key, value) in key_values(args)? {
        let flag = || super::prodigy::parse_flag(key, value);
        match key {
            "foreach" | "fused" | "capturable" | "differentiable" => {
                flag()?;
            }
            "amsgrad" | "maximize" => {
                if flag()? {
                    return Err(Error::Config(format!(
                        "--optimizer-args {key}=True: kstyle's AdamW runs torch's default \
                         ({key}=False)"
                    )));
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "--optimizer-args: AdamW has no setting `{other}` (betas, eps, \
                     weight_decay; foreach, fused)"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kohya_spellings_split_off() {
        let given = args(&[
            "weight_decay=0.1",
            "d0=1e-6",
            "betas=(0.95, 0.98)",
            "eps=1e-6",
        ]);
        let (s, rest) = split_shared(&given, false).unwrap();
        assert_eq!(s.weight_decay, Some(0.1));
        assert_eq!(s.betas, Some((0.95, 0.98)));
        assert_eq!(s.eps, Some(1e-6));
        assert_eq!(rest, args(&["d0=1e-6"]));
        // Adafactor's eps is its own (a pair): it stays with the rest.
        let (s, rest) = split_shared(&given, true).unwrap();
        assert_eq!(s.eps, None);
        assert_eq!(rest, args(&["d0=1e-6", "eps=1e-6"]));
        for form in ["0.9,0.99", "[0.9,0.99]", "(0.9,0.99)", " 0.9 , 0.99 "] {
            assert_eq!(betas(form).unwrap(), (0.9, 0.99), "{form}");
        }
        for bad in [
            "betas=0.9",
            "betas=0.9,0.99,0.999",
            "eps=small",
            "lr=1e-4",
            "weight_decay=inf",
        ] {
            assert!(split_shared(&args(&[bad]), false).is_err(), "{bad}");
        }
        assert_eq!(
            merge(Some(0.1), Some(0.1), ("--weight-decay", "weight_decay")).unwrap(),
            Some(0.1)
        );
        assert_eq!(merge(None, Some(0.2), ("a", "b")).unwrap(), Some(0.2));
        let err = merge(Some(0.1), Some(0.2), ("--weight-decay", "weight_decay")).unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
        assert!(check_adamw(&args(&["fused=True", "amsgrad=False"])).is_ok());
        assert!(check_adamw(&args(&["amsgrad=True"])).is_err());
        assert!(check_adamw(&args(&["d0=1"])).is_err());
    }
}
