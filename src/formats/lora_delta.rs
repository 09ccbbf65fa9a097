//! What a [`Patch`] does to its weight, in f64: the update ΔW laid out like the weight
//! (row-major (out, in, kh·kw)), and the merge `W' = W + m·scale·ΔW`, with DoRA's
//! renormalisation where the file carries a magnitude. Plain reference loops: merging happens
//! once at load, and tests compare against these.

use super::error::{Error, Result};
use super::lora_patch::{Factors, KronFactor, Magnitude, Patch};
use super::raw::RawTensor;
use rayon::prelude::*;

/// `a (m, k) @ b (k, n)`, with `s` folded into `a`'s elements first (kohya's merge order). Rows
/// run in parallel (an SDXL LoCon merges ~10^11 multiply-adds); each row's sum order is fixed,
/// so the result does not depend on the thread count.
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, s: f64) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    let row = |(i, c): (usize, &mut [f64])| {
        for p in 0..k {
            let x = s * a[i * k + p];
            for (c, &y) in c.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *c += x * y;
            }
        }
    };
    if m * k * n < 1 << 20 || n == 0 {
        c.chunks_mut(n.max(1)).enumerate().for_each(row);
    } else {
        c.par_chunks_mut(n).enumerate().for_each(row);
    }
    c
}

/// A Tucker rebuild: `t (r, r, sp)`, `a (r, p)`, `b (r, q)` ->
/// `w[p, q, s] = Σ_i Σ_j t[i, j, s] · b[j, q] · a[i, p]`, laid out (p, q·sp).
fn tucker(t: &[f64], a: &[f64], b: &[f64], r: usize, p: usize, q: usize, sp: usize) -> Vec<f64> {
    // tb[i, q, s] = Σ_j t[i, j, s] b[j, q]
    let mut tb = vec![0.0; r * q * sp];
    for i in 0..r {
        for j in 0..r {
            for qq in 0..q {
                let bj = b[j * q + qq];
                for s in 0..sp {
                    tb[(i * q + qq) * sp + s] += t[(i * r + j) * sp + s] * bj;
                }
            }
        }
    }
    // w[p, (q, s)] = Σ_i a[i, p] tb[i, (q, s)]
    let mut w = vec![0.0; p * q * sp];
    for pp in 0..p {
        for i in 0..r {
            let ai = a[i * p + pp];
            let row = &tb[i * q * sp..(i + 1) * q * sp];
            for (w, &x) in w[pp * q * sp..(pp + 1) * q * sp].iter_mut().zip(row) {
                *w += ai * x;
            }
        }
    }
    w
}

impl Patch<'_> {
    fn values(&self, t: &RawTensor<'_>, role: &str) -> Result<Vec<f64>> {
        t.to_f64_vec("LoRA merge", &format!("{}.{role}", self.spelled))
    }

    /// (out, in, spatial) of the patched weight.
    fn dims(&self) -> (usize, usize, usize) {
        let t = &self.target;
        (t[0], t[1], t[2..].iter().product())
    }

    /// `s · ΔW` laid out like the weight. For plain LoRA `s` is folded into `up` before the
    /// product, the order kohya's merge (and this crate before the other formats) uses.
    pub fn delta_f64(&self, s: f64) -> Result<Vec<f64>> {
        let (out, cin, sp) = self.dims();
        let v = |t: &RawTensor<'_>, role: &str| self.values(t, role);
        let scaled = |mut d: Vec<f64>| {
            d.iter_mut().for_each(|x| *x *= s);
            d
        };
        Ok(match &self.factors {
            Factors::LowRank { up, down, mid } => {
                let r_up = up.shape[1];
                let down = match mid {
                    None => v(down, "lora_down.weight")?,
                    Some(mid) => {
                        // down'[m, (i, s)] = Σ_n mid[m, n, s] down[n, i]
                        let (mid_v, d) = (v(mid, "lora_mid.weight")?, v(down, "lora_down.weight")?);
                        let r = down.shape[0];
                        let mut core = vec![0.0; r_up * cin * sp];
                        for m in 0..r_up {
                            for n in 0..r {
                                for i in 0..cin {
                                    let dn = d[n * cin + i];
                                    for k in 0..sp {
                                        core[(m * cin + i) * sp + k] +=
                                            mid_v[(m * r + n) * sp + k] * dn;
                                    }
                                }
                            }
                        }
                        core
                    }
                };
                matmul(&v(up, "lora_up.weight")?, &down, out, r_up, cin * sp, s)
            }
            Factors::Hadamard {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => {
                let factor =
                    |a: &RawTensor<'_>, b: &RawTensor<'_>, t: &Option<RawTensor<'_>>, n: &str| {
                        let (av, bv) = (
                            v(a, &format!("hada_w{n}_a"))?,
                            v(b, &format!("hada_w{n}_b"))?,
                        );
                        Ok::<_, Error>(match t {
                            None => matmul(&av, &bv, out, a.shape[1], cin * sp, 1.0),
                            Some(t) => {
                                let tv = v(t, &format!("hada_t{n}"))?;
                                tucker(&tv, &av, &bv, a.shape[0], out, cin, sp)
                            }
                        })
                    };
                let (m1, m2) = (factor(w1a, w1b, t1, "1")?, factor(w2a, w2b, t2, "2")?);
                scaled(m1.iter().zip(&m2).map(|(x, y)| x * y).collect())
            }
            Factors::Kronecker { w1, w2 } => {
                let (a1, b1) = w1.dims();
                let (a2, b2) = (out / a1, cin / b1);
                let w1v = self.kron_factor(w1, "w1", 1)?; // (a1, b1)
                let w2v = self.kron_factor(w2, "w2", sp)?; // (a2, b2·sp)
                                                           // ΔW[i·a2 + k, (j·b2 + l)·sp + s] = w1[i, j] · w2[k, l·sp + s]
                let n2 = b2 * sp;
                let mut d = vec![0.0; out * cin * sp];
                for i in 0..a1 {
                    for j in 0..b1 {
                        let x = s * w1v[i * b1 + j];
                        for k in 0..a2 {
                            let at = (i * a2 + k) * cin * sp + j * n2;
                            let src = &w2v[k * n2..(k + 1) * n2];
                            for (d, &y) in d[at..at + n2].iter_mut().zip(src) {
                                *d = x * y;
                            }
                        }
                    }
                }
                d
            }
            Factors::Full { diff } => scaled(v(diff, "diff")?),
        })
    }

    /// One LoKr factor as a row-major (rows, cols·sp) matrix.
    fn kron_factor(&self, f: &KronFactor<'_>, n: &str, sp: usize) -> Result<Vec<f64>> {
        let v = |t: &RawTensor<'_>, role: &str| self.values(t, &format!("lokr_{n}{role}"));
        match f {
            KronFactor::Whole(w) => v(w, ""),
            KronFactor::Product { a, b, t: None } => Ok(matmul(
                &v(a, "_a")?,
                &v(b, "_b")?,
                a.shape[0],
                a.shape[1],
                b.shape[1],
                1.0,
            )),
            KronFactor::Product { a, b, t: Some(t) } => Ok(tucker(
                &self.values(t, "lokr_t2")?,
                &v(a, "_a")?,
                &v(b, "_b")?,
                a.shape[0],
                a.shape[1],
                b.shape[1],
                sp,
            )),
        }
    }

    /// Merges this patch at strength `m` into `weight` (laid out like the target) and, for
    /// `diff_b`, into `bias`. `context` (the file) prefixes errors.
    pub fn apply_f64(
        &self,
        weight: &mut [f64],
        bias: Option<&mut [f64]>,
        m: f64,
        context: &str,
    ) -> Result<()> {
        let (out, cin, sp) = self.dims();
        if weight.len() != out * cin * sp {
            return Err(Error::WrongShape {
                context: context.into(),
                key: format!("{}.weight", self.module),
                got: self.target.clone(),
                expected: format!("{} elements", weight.len()),
            });
        }
        match &self.magnitude {
            None => {
                let d = self.delta_f64(m * self.scale)?;
                weight.iter_mut().zip(&d).for_each(|(w, d)| *w += d);
            }
            Some(Magnitude::DoraScale(mag)) => {
                let d = self.delta_f64(self.scale)?;
                let mut wc: Vec<f64> = weight.iter().zip(&d).map(|(w, d)| w + d).collect();
                let mag_v = self.values(mag, "dora_scale")?;
                // The parser admitted (1, in, ..) or (out, 1, ..); with out = in = 1 both mean
                // the same norm.
                let per_row = mag.shape[..2] == [out, 1];
                renormalise(&mut wc, &mag_v, cin, sp, per_row);
                if m == 1.0 {
                    weight.copy_from_slice(&wc);
                } else {
                    weight
                        .iter_mut()
                        .zip(&wc)
                        .for_each(|(w, c)| *w += m * (c - *w));
                }
            }
            Some(Magnitude::Peft(mag)) => {
                let d = self.delta_f64(m * self.scale)?;
                let mut wc: Vec<f64> = weight.iter().zip(&d).map(|(w, d)| w + d).collect();
                let mag_v = self.values(mag, "lora_magnitude_vector")?;
                renormalise(&mut wc, &mag_v, cin, sp, true);
                weight.copy_from_slice(&wc);
            }
        }
        if let Some(db) = &self.bias_diff {
            let Some(bias) = bias else {
                return Err(Error::MissingKey {
                    context: format!("{context} (diff_b of `{}`)", self.spelled),
                    key: format!("{}.bias", self.module),
                });
            };
            let dv = self.values(db, "diff_b")?;
            bias.iter_mut().zip(&dv).for_each(|(b, d)| *b += m * d);
        }
        Ok(())
    }
}

/// DoRA: scales each output row (or input column) of `w` (out, in, sp) to norm `mag[row]`.
fn renormalise(w: &mut [f64], mag: &[f64], cin: usize, sp: usize, per_row: bool) {
    if per_row {
        for (o, row) in w.chunks_mut(cin * sp).enumerate() {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            let f = mag[o] / norm;
            row.iter_mut().for_each(|x| *x *= f);
        }
    } else {
        // Rows of (in, sp) blocks: channel i of every output row.
        let mut norm = vec![0.0; cin];
        for row in w.chunks(cin * sp) {
            for (n, ch) in norm.iter_mut().zip(row.chunks(sp)) {
                *n += ch.iter().map(|x| x * x).sum::<f64>();
            }
        }
        let f: Vec<f64> = mag.iter().zip(&norm).map(|(m, n)| m / n.sqrt()).collect();
        for row in w.chunks_mut(cin * sp) {
            for (f, ch) in f.iter().zip(row.chunks_mut(sp)) {
                ch.iter_mut().for_each(|x| *x *= f);
            }
        }
    }
}
