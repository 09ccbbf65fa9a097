//! The sigma ramps diffusers' sigma schedulers can replace their spaced schedule with
//! (`use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`), computed in float64 as
//! their `_convert_to_karras`, `_convert_to_exponential` and `_convert_to_beta` do, from the
//! largest sigma of the spaced schedule down to its smallest.

/// Which ramp a sampler steps on, replacing the config's timestep spacing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ramp {
    /// None: the spaced timesteps' own sigmas.
    #[default]
    Spaced,
    /// Karras et al.'s rho-7 ramp (`use_karras_sigmas`).
    Karras,
    /// Evenly spaced in log sigma (`use_exponential_sigmas`; ComfyUI's "exponential").
    Exponential,
    /// The quantiles of Beta(0.6, 0.6), from "Beta Sampling is All You Need" (Lee et al. 2024;
    /// `use_beta_sigmas`; ComfyUI's "beta").
    Beta,
}

impl Ramp {
    /// The word A1111 and ComfyUI print after a sampler's name, if any.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Ramp::Spaced => None,
            Ramp::Karras => Some("Karras"),
            Ramp::Exponential => Some("exponential"),
            Ramp::Beta => Some("beta"),
        }
    }

    /// `steps` sigmas from `hi` down to `lo`; `Spaced` has none of its own and returns None.
    pub fn sigmas(self, lo: f64, hi: f64, steps: usize) -> Option<Vec<f64>> {
        match self {
            Ramp::Spaced => None,
            Ramp::Karras => Some(karras_sigmas(lo, hi, steps)),
            Ramp::Exponential => Some(
                (0..steps)
                    .map(|i| np_linspace(hi.ln(), lo.ln(), steps, i).exp())
                    .collect(),
            ),
            Ramp::Beta => Some(
                (0..steps)
                    .map(|i| {
                        let q = 1.0 - np_linspace(0.0, 1.0, steps, i);
                        lo + beta_ppf(q, BETA_ALPHA, BETA_BETA) * (hi - lo)
                    })
                    .collect(),
            ),
        }
    }
}

/// diffusers' `_convert_to_beta` defaults.
const BETA_ALPHA: f64 = 0.6;
const BETA_BETA: f64 = 0.6;

/// `numpy.linspace(start, stop, num)[i]`: `i * step + start`, the last element exactly `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, i: usize) -> f64 {
    if num > 1 && i == num - 1 {
        return stop;
    }
    if num <= 1 {
        return start;
    }
    let step = (stop - start) / (num - 1) as f64;
    i as f64 * step + start
}

/// Karras et al.'s rho-7 ramp of `steps` sigmas from `hi` down to `lo`, in float64 as diffusers'
/// `_convert_to_karras` computes it.
pub(crate) fn karras_sigmas(lo: f64, hi: f64, steps: usize) -> Vec<f64> {
    let (lo_r, hi_r) = (lo.powf(1.0 / 7.0), hi.powf(1.0 / 7.0));
    (0..steps)
        .map(|i| (hi_r + np_linspace(0.0, 1.0, steps, i) * (lo_r - hi_r)).powf(7.0))
        .collect()
}

/// ln Γ(x) for x > 0: Lanczos' approximation (g = 7, nine terms), relative error near 1e-15.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(π x).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let sum = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, c)| acc + c / (x + (i + 1) as f64));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz), converging for
/// x < (a + 1) / (a + b + 2).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let even = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + even * d);
        c = guard(1.0 + even / c);
        h *= d * c;
        let odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + odd * d);
        c = guard(1.0 + odd / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function I_x(a, b), the Beta(a, b) distribution function.
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = a * x.ln() + b * (-x).ln_1p() - (ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b));
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// The Beta(a, b) quantile (scipy's `beta.ppf`): the x with I_x(a, b) = q, by bisection down to
/// adjacent floats (the distribution function is increasing).
pub(crate) fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..2000 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scipy's `beta.ppf` (what diffusers' beta ramp calls) on the ramp's grids and a few tails,
    /// for Beta(0.6, 0.6) and three other shapes: `tests/data/beta_ppf.json`, written by
    /// `scripts/dev/scipy_beta_ppf.py` (SciPy 1.17).
    #[test]
    fn beta_quantiles_match_scipy() {
        let j: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/data/beta_ppf.json")).unwrap();
        let rows = j["rows"].as_array().unwrap();
        let mut worst: f64 = 0.0;
        for r in rows {
            let v: Vec<f64> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let got = beta_ppf(v[2], v[0], v[1]);
            worst = worst.max((got - v[3]).abs());
            assert!(
                (got - v[3]).abs() <= 1e-13,
                "ppf({}; {}, {}) = {got}, scipy {}",
                v[2],
                v[0],
                v[1],
                v[3]
            );
        }
        assert!(rows.len() > 500);
        println!("worst |ppf - scipy| {worst:e} over {} rows", rows.len());
    }

    #[test]
    fn ramps_run_from_hi_to_lo() {
        for ramp in [Ramp::Karras, Ramp::Exponential, Ramp::Beta] {
            for steps in [2, 3, 30] {
                let s = ramp.sigmas(0.03, 14.6, steps).unwrap();
                assert_eq!(s.len(), steps);
                assert!((s[0] - 14.6).abs() < 1e-12 && (s[steps - 1] - 0.03).abs() < 1e-12);
                assert!(s.windows(2).all(|w| w[0] > w[1]), "{ramp:?} {s:?}");
            }
        }
        assert_eq!(Ramp::Spaced.sigmas(0.03, 14.6, 5), None);
    }
}
