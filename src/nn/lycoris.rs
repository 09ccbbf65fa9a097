//! LyCORIS' LoHa and LoKr (`--network_module lycoris.kohya --network_args algo=loha|lokr`), as
//! lycoris-lora 4.1.3's `LohaModule` and `LokrModule` define them (no Tucker cores, no
//! `decompose_both`, no DoRA: their defaults). Both build an update weight dW shaped like the
//! frozen weight and run the layer's own op with it, `y = base(x) + op(x, dW)`, op a linear or the
//! base convolution (stride, padding):
//!
//! - LoHa: `dW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, a Hadamard product of two rank-r
//!   products (rank up to r² at the parameters of a rank-2r LoRA).
//! - LoKr: `dW = kron(w1, w2) · alpha / r` with out = a b and in = c d split by LyCORIS'
//!   `factorization` (see [`factorization`]), w1 (a, c) whole and w2 (b, d kh kw) whole, or
//!   `w2_a w2_b` of rank r when r is below half the larger of b and d (both whole: scale 1).
//!
//! A LyCORIS adapter is a [`LoraAdapter`] whose `a` / `b` are the first two of its LyCORIS tensors
//! and whose [`Lycoris`] holds the rest, so the optimizers, checkpoints, mixed precision and the
//! per-sample module dropout treat it as any other adapter.

use super::lora::{LoraAdapter, LoraConfig};
use crate::tensor::{ConvParams, Rng};
use crate::{DType, Device, Error, Result, Tensor};

/// Which LyCORIS algorithm an adapter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LycorisAlgo {
    Loha,
    Lokr,
}

impl LycorisAlgo {
    pub fn name(self) -> &'static str {
        match self {
            LycorisAlgo::Loha => "loha",
            LycorisAlgo::Lokr => "lokr",
        }
    }

    /// LyCORIS' tensor names in `LohaModule` / `LokrModule`'s order; LoKr's w2 whole or as a
    /// rank-r pair (`low_rank_w2`).
    pub fn names(self, low_rank_w2: bool) -> &'static [&'static str] {
        match (self, low_rank_w2) {
            (LycorisAlgo::Loha, _) => &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            (LycorisAlgo::Lokr, false) => &["lokr_w1", "lokr_w2"],
            (LycorisAlgo::Lokr, true) => &["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
        }
    }
}

/// A LyCORIS adapter's tensors after `a` and `b`, and the frozen weight's shape, which dW takes.
#[derive(Clone, Debug)]
pub struct Lycoris {
    pub algo: LycorisAlgo,
    /// In LyCORIS' order after `a` and `b` (see [`Lycoris::names`]).
    pub rest: Vec<Tensor>,
    /// The frozen weight's dims: (out, in) or (out, in, kh, kw).
    pub shape: Vec<usize>,
}

impl Lycoris {
    /// LyCORIS' names of `a`, `b` and `rest`, in `LohaModule` / `LokrModule`'s order.
    pub fn names(&self) -> &'static [&'static str] {
        self.algo.names(self.rest.len() == 1)
    }

    /// (out, in · kh · kw): the frozen weight as a matrix.
    fn matrix(&self) -> (usize, usize) {
        (self.shape[0], self.shape[1..].iter().product())
    }
}

/// LyCORIS' `factorization(dimension, factor)`: `dimension = m n` with m <= n, m as close to
/// the square root as the divisors allow without exceeding `factor` (any, when `factor` is -1);
/// a positive `factor` that divides `dimension` is taken as it is.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % factor as usize == 0 {
        let (m, n) = (factor as usize, dimension / factor as usize);
        return (m.min(n), m.max(n));
    }
    let limit = if factor < 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1, dimension);
    while m < n {
        let mut next = m + 1;
        while dimension % next != 0 {
            next += 1;
        }
        let pair = dimension / next;
        if next + pair > m + n || next > limit {
            break;
        }
        (m, n) = (next, pair);
    }
    (m.min(n), m.max(n))
}

/// `kron(w1, w2)` of two matrices: (p m, q n), entry (i m + j, k n + l) = w1[i, k] w2[j, l].
fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (p, q) = w1.dims2()?;
    let (m, n) = w2.dims2()?;
    w1.reshape((p, 1, q, 1))?
        .mul(&w2.reshape((1, m, 1, n))?)?
        .reshape((p * m, q * n))
}

impl LoraAdapter {
    /// A fresh LoHa adapter for a frozen weight of `dims` ((out, in) or (out, in, kh, kw)),
    /// initialised as `LohaModule.__init__`: w1_b and w2_b N(0, 1), w1_a N(0, 0.1), w2_a zero
    /// (so dW starts at zero), drawn in that order.
    pub fn init_loha(
        dims: &[usize],
        config: LoraConfig,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        let (out, fan_in) = weight_matrix(dims)?;
        let r = config.rank;
        let w1_b = Tensor::randn((r, fan_in), rng, dtype, device)?.var()?;
        let w1_a = Tensor::randn((out, r), rng, dtype, device)?
            .scale(0.1)?
            .var()?;
        let w2_b = Tensor::randn((r, fan_in), rng, dtype, device)?.var()?;
        let w2_a = Tensor::zeros((out, r), dtype, device)?.var()?;
        Ok(LoraAdapter::lycoris(
            config,
            Lycoris {
                algo: LycorisAlgo::Loha,
                rest: vec![w2_a, w2_b],
                shape: dims.to_vec(),
            },
            w1_a,
            w1_b,
        ))
    }

    /// A fresh LoKr adapter for a frozen weight of `dims`, initialised as `LokrModule.__init__`
    /// with LyCORIS' `factor` (-1: as square as possible): w2 zero when whole, else w2_a
    /// kaiming-uniform and w2_b zero; then w1 kaiming-uniform. Both whole: alpha becomes the rank
    /// (scale 1), as LyCORIS stores it.
    pub fn init_lokr(
        dims: &[usize],
        mut config: LoraConfig,
        factor: i64,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        weight_matrix(dims)?;
        let (out_l, out_k) = factorization(dims[0], factor);
        let (in_m, in_n) = factorization(dims[1], factor);
        let spatial: usize = dims[2..].iter().product();
        let r = config.rank;
        let uniform = |shape: (usize, usize), fan_in: usize, rng: &mut Rng| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::rand_uniform(shape, -bound, bound, rng, dtype, device)?.var()
        };
        let (w2, rest) = if 2 * r >= out_k.max(in_n) {
            // LyCORIS' `lora_dim >= max(b, d) / 2`.
            config.alpha = r as f64;
            let w2 = Tensor::zeros([&[out_k, in_n][..], &dims[2..]].concat(), dtype, device)?;
            (w2.var()?, vec![])
        } else {
            let w2_a = uniform((out_k, r), r, rng)?;
            let w2_b = Tensor::zeros((r, in_n * spatial), dtype, device)?.var()?;
            (w2_a, vec![w2_b])
        };
        let w1 = uniform((out_l, in_m), in_m, rng)?;
        Ok(LoraAdapter::lycoris(
            config,
            Lycoris {
                algo: LycorisAlgo::Lokr,
                rest,
                shape: dims.to_vec(),
            },
            w1,
            w2,
        ))
    }

    fn lycoris(config: LoraConfig, lycoris: Lycoris, a: Tensor, b: Tensor) -> LoraAdapter {
        LoraAdapter {
            a,
            b,
            config,
            gates: None,
            concepts: None,
            recorder: None,
            dropout: None,
            lycoris: Some(lycoris),
            dora: None,
        }
    }

    /// A LyCORIS adapter from its tensors in LyCORIS' order ([`LycorisAlgo::names`]: LoHa's
    /// four; LoKr's w1 with w2 whole, or with w2_a and w2_b) for a frozen weight of `dims`, at
    /// `config`'s rank and alpha (LoKr with w2 whole runs at scale 1 whatever they are). An
    /// error says what does not fit ([`LoraAdapter::fits`]).
    pub fn from_lycoris(
        algo: LycorisAlgo,
        config: LoraConfig,
        dims: &[usize],
        mut tensors: Vec<Tensor>,
    ) -> Result<LoraAdapter> {
        let count = match algo {
            LycorisAlgo::Loha => 4..=4,
            LycorisAlgo::Lokr => 2..=3,
        };
        let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.dims().to_vec()).collect();
        let misfit = || {
            Error::msg(format!(
                "{} factors {shapes:?} at rank {} do not fit together or the weight {dims:?}",
                algo.name(),
                config.rank
            ))
        };
        if !count.contains(&tensors.len()) {
            return Err(misfit());
        }
        let rest = tensors.split_off(2);
        let b = tensors.pop().ok_or_else(misfit)?;
        let a = tensors.pop().ok_or_else(misfit)?;
        let lycoris = Lycoris {
            algo,
            rest,
            shape: dims.to_vec(),
        };
        let adapter = LoraAdapter::lycoris(config, lycoris, a, b);
        match adapter.fits(dims) {
            true => Ok(adapter),
            false => Err(misfit()),
        }
    }

    /// What the factors' product is scaled by: alpha / rank, and 1 for LoKr with w2 whole
    /// (LyCORIS sets its alpha to the rank).
    pub fn update_scale(&self) -> f64 {
        match &self.lycoris {
            Some(l) if l.algo == LycorisAlgo::Lokr && l.rest.is_empty() => 1.0,
            _ => self.config.alpha / self.config.rank as f64,
        }
    }

    /// The LyCORIS algorithm of this adapter; None for LoRA.
    pub fn lycoris_algo(&self) -> Option<LycorisAlgo> {
        self.lycoris.as_ref().map(|l| l.algo)
    }

    /// A LyCORIS adapter's update weight dW, shaped like the frozen weight; an error for LoRA.
    pub fn lycoris_weight(&self) -> Result<Tensor> {
        let l = self
            .lycoris
            .as_ref()
            .ok_or_else(|| Error::msg("lycoris_weight of a LoRA adapter"))?;
        let scale = self.update_scale();
        let w = match l.algo {
            LycorisAlgo::Loha => self
                .a
                .matmul(&self.b)?
                .mul(&l.rest[0].matmul(&l.rest[1])?)?,
            LycorisAlgo::Lokr => {
                let (out, fan_in) = l.matrix();
                let (p, q) = self.a.dims2()?;
                let w2 = match l.rest.first() {
                    Some(w2_b) => self.b.matmul(w2_b)?,
                    None => self.b.reshape((out / p, fan_in / q))?,
                };
                kron(&self.a, &w2)?
            }
        };
        w.scale(scale)?.reshape(l.shape.clone())
    }

    /// The frozen weight plus dW (DoRA: the decomposed W', at strength 1), when the layer can
    /// run once with it rather than twice (the base, then dW), which halves the layer's forward
    /// and input-gradient work: f32 weights and input (in bf16 / f16 the sum would round small
    /// updates away), no LoRA dropout (a picture's mask does not merge). None otherwise, and for
    /// LoRA.
    pub fn merged_weight(&self, base: &Tensor, input: DType) -> Result<Option<Tensor>> {
        let f32 = [input, base.dtype(), self.a.dtype()]
            .iter()
            .all(|&d| d == DType::F32);
        if self.dropout.is_some() || !f32 {
            return Ok(None);
        }
        match (&self.lycoris, &self.dora) {
            (_, Some(d)) if d.strength == 1.0 => self.dora_weight(base),
            (_, Some(_)) => Ok(None),
            (Some(_), None) => base.add(&self.lycoris_weight()?).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// `base + op(x, dW)` for a linear's input (.., D_in) (`conv` None) or a convolution's
    /// (B, C_in, H, W), under LoRA dropout with the module mask ([`LoraAdapter::drop_modules`]).
    pub(super) fn apply_lycoris(
        &self,
        x: &Tensor,
        base: Option<&Tensor>,
        conv: Option<ConvParams>,
    ) -> Result<Tensor> {
        let w = self.lycoris_weight()?;
        let dh = match conv {
            Some(p) => x.conv2d(&w, None, p)?, // (B, C_out, H', W')
            None => x.matmul(&w.t()?)?,        // (.., D_out)
        };
        let dh = self.drop_modules(dh)?;
        match base {
            Some(y) => y.add(&dh),
            None => Ok(dh),
        }
    }

    /// Under LoRA dropout, the module mask applied to an update `dh` (B, ..): a dropped sample
    /// loses its whole update (the network and rank dropouts are refused for the weight-space
    /// adapters, LyCORIS' and DoRA, before training starts).
    pub(super) fn drop_modules(&self, dh: Tensor) -> Result<Tensor> {
        let Some(draw) = &self.dropout else {
            return Ok(dh);
        };
        let b = dh.dims()[0];
        draw.check_batch(b)?;
        let masks = draw.masks(1, 1, dh.dtype(), dh.device())?;
        match masks.rows {
            Some(rows) => {
                let mut dims = vec![1; dh.rank()];
                dims[0] = b;
                dh.mul(&rows.reshape(dims)?)
            }
            None => Ok(dh),
        }
    }

    /// Whether this adapter's factors fit a frozen weight of `dims`: LoRA's A (r, in) and B
    /// (out, r) on a linear, lora_down (r, in, kh, kw) and lora_up (out, r, 1, 1) on a
    /// convolution; LoHa's pairs (out, r) x (r, in kh kw); LoKr's w1 (a, c) with w2 (b, d[, kh,
    /// kw]) or (b, r) x (r, d kh kw), out = a b and in = c d.
    pub fn fits(&self, dims: &[usize]) -> bool {
        let r = self.config.rank;
        if let Some(d) = &self.dora {
            let m = d.magnitude.dims();
            let ok = dims.first() == m.first() && m.len() == dims.len();
            if !ok || m.iter().skip(1).any(|&x| x != 1) {
                return false;
            }
        }
        let Some(l) = &self.lycoris else {
            return match *dims {
                [out, d_in] => self.a.dims() == [r, d_in] && self.b.dims() == [out, r],
                [out, c_in, kh, kw] => {
                    self.a.dims() == [r, c_in, kh, kw] && self.b.dims() == [out, r, 1, 1]
                }
                _ => false,
            };
        };
        if l.shape != dims || !matches!(dims.len(), 2 | 4) {
            return false;
        }
        let (out, fan_in) = l.matrix();
        let rest: Vec<&[usize]> = l.rest.iter().map(|t| t.dims()).collect();
        match l.algo {
            LycorisAlgo::Loha => {
                self.a.dims() == [out, r]
                    && self.b.dims() == [r, fan_in]
                    && rest == [&[out, r][..], &[r, fan_in][..]]
            }
            LycorisAlgo::Lokr => {
                let &[p, q] = self.a.dims() else {
                    return false;
                };
                if p == 0 || q == 0 || dims[0] % p != 0 || dims[1] % q != 0 {
                    return false;
                }
                let (b, d) = (dims[0] / p, dims[1] / q);
                match rest.as_slice() {
                    [] => self.b.dims() == [&[b, d][..], &dims[2..]].concat(),
                    [w2_b] => self.b.dims() == [b, r] && *w2_b == [r, fan_in / q],
                    _ => false,
                }
            }
        }
    }
}

/// (out, in · kh · kw) of a linear's or a convolution's weight dims.
fn weight_matrix(dims: &[usize]) -> Result<(usize, usize)> {
    match *dims {
        [out, d_in] => Ok((out, d_in)),
        [out, c_in, kh, kw] => Ok((out, c_in * kh * kw)),
        _ => Err(Error::msg(format!(
            "LyCORIS adapters wrap a linear or a 2-d convolution, not a weight of shape {dims:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(mut a: LoraAdapter) -> LoraAdapter {
        a.assign(|name, d| {
            let seed = name.bytes().map(u64::from).sum();
            Tensor::randn(d.to_vec(), &mut Rng::new(seed), DType::F32, Device::Cpu)
        })
        .unwrap();
        a
    }

    fn config(rank: usize) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 2.0,
            ..LoraConfig::default()
        }
    }

    fn loha(dims: &[usize], seed: u64) -> LoraAdapter {
        let a = LoraAdapter::init_loha(
            dims,
            config(3),
            &mut Rng::new(seed),
            DType::F32,
            Device::Cpu,
        );
        random(a.unwrap())
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_vec_f64().unwrap()
    }

    /// The table of `factorization`'s docstring (lycoris/functional/general.py) as lycoris-lora
    /// 4.1.3's function computes it: for 360 it gives (18, 20) and, at factor 16, (15, 24), not
    /// the docstring's (8, 45) and (12, 30).
    #[test]
    fn factorization_matches_lycoris() {
        let table = [
            (127, [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127)]),
            (128, [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)]),
            (250, [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)]),
            (360, [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)]),
            (512, [(16, 32), (2, 256), (4, 128), (8, 64), (16, 32)]),
            (1024, [(32, 32), (2, 512), (4, 256), (8, 128), (16, 64)]),
        ];
        for (dim, row) in table {
            for (factor, want) in [-1, 2, 4, 8, 16].into_iter().zip(row) {
                assert_eq!(factorization(dim, factor), want, "{dim} factor {factor}");
            }
        }
    }

    /// A fresh LoHa adapter changes nothing (w2_a is zero), and its update weight is the
    /// Hadamard product of the two pairs' products times alpha / r, entry by entry.
    #[test]
    fn the_loha_weight_is_the_scaled_hadamard_product() {
        let fresh = LoraAdapter::init_loha(
            &[5, 4],
            config(3),
            &mut Rng::new(1),
            DType::F32,
            Device::Cpu,
        )
        .unwrap();
        assert!(values(&fresh.lycoris_weight().unwrap())
            .iter()
            .all(|&v| v == 0.0));
        let a = loha(&[5, 4], 2);
        let l = a.lycoris.as_ref().unwrap();
        let (w1a, w1b, w2a, w2b) = (
            values(&a.a),
            values(&a.b),
            values(&l.rest[0]),
            values(&l.rest[1]),
        );
        let w = values(&a.lycoris_weight().unwrap());
        for o in 0..5 {
            for i in 0..4 {
                let p1: f64 = (0..3).map(|k| w1a[o * 3 + k] * w1b[k * 4 + i]).sum();
                let p2: f64 = (0..3).map(|k| w2a[o * 3 + k] * w2b[k * 4 + i]).sum();
                let want = p1 * p2 * 2.0 / 3.0;
                assert!((w[o * 4 + i] - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }

    /// LoKr picks LyCORIS' forms (whole w2 at scale 1 when the rank is at least half its larger
    /// side, else w2_a w2_b), starts at zero, and its weight is the Kronecker product entry by
    /// entry, a convolution's shaped (out, in, kh, kw) from the flattened columns.
    #[test]
    fn the_lokr_weight_is_the_scaled_kronecker_product() {
        let lokr = |dims: &[usize], rank| {
            LoraAdapter::init_lokr(
                dims,
                config(rank),
                -1,
                &mut Rng::new(3),
                DType::F32,
                Device::Cpu,
            )
            .unwrap()
        };
        // 48 = 6 x 8, 64 = 8 x 8: rank 4 >= 8 / 2, both whole.
        let whole = lokr(&[48, 64], 4);
        assert_eq!(
            whole.lycoris.as_ref().unwrap().names(),
            ["lokr_w1", "lokr_w2"]
        );
        assert_eq!((whole.a.dims(), whole.b.dims()), (&[6, 8][..], &[8, 8][..]));
        assert_eq!(whole.config.alpha, 4.0);
        // 128 = 8 x 16: rank 4 < 16 / 2; a 3x3 convolution's w2_b spans d kh kw.
        let conv = random(lokr(&[64, 128, 3, 3], 4));
        let l = conv.lycoris.as_ref().unwrap();
        assert_eq!(l.names(), ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]);
        assert_eq!(conv.b.dims(), [8, 4]);
        assert_eq!(l.rest[0].dims(), [4, 16 * 9]);
        assert!(conv.fits(&[64, 128, 3, 3]) && !conv.fits(&[64, 128, 1, 1]));
        assert!(values(&lokr(&[64, 128, 3, 3], 4).lycoris_weight().unwrap())
            .iter()
            .all(|&v| v == 0.0));
        let w = values(&conv.lycoris_weight().unwrap());
        let (w1, w2a, w2b) = (values(&conv.a), values(&conv.b), values(&l.rest[0]));
        let w2 = |j: usize, m: usize| {
            (0..4)
                .map(|k| w2a[j * 4 + k] * w2b[k * 144 + m])
                .sum::<f64>()
        };
        for o in [0, 9, 63] {
            for (c, kh, kw) in [(0, 0, 0), (17, 1, 2), (127, 2, 2)] {
                let (i, j) = (o / 8, o % 8);
                let (k, l) = (c / 16, c % 16);
                let want = w1[i * 8 + k] * w2(j, l * 9 + kh * 3 + kw) * 2.0 / 4.0;
                let got = w[((o * 128 + c) * 3 + kh) * 3 + kw];
                assert!(
                    (got - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    /// The merged forward (one linear with W + dW) and the separate one (the base, then dW, as
    /// under dropout or bf16) give the same output and the same factor gradients.
    #[test]
    fn the_merged_forward_matches_the_separate_one() {
        use crate::nn::lora::AdaptedLinear;
        use crate::nn::Linear;
        let rnd = |d: &[usize], s| {
            Tensor::randn(d.to_vec(), &mut Rng::new(s), DType::F32, Device::Cpu).unwrap()
        };
        let lokr = LoraAdapter::init_lokr(
            &[6, 5],
            config(1),
            -1,
            &mut Rng::new(5),
            DType::F32,
            Device::Cpu,
        );
        for a in [loha(&[6, 5], 6), random(lokr.unwrap())] {
            let mut layer = AdaptedLinear::new(Linear {
                weight: rnd(&[6, 5], 11),
                bias: Some(rnd(&[6], 12)),
            });
            layer.set_adapter(a.clone()).unwrap();
            let h = rnd(&[2, 3, 5], 13);
            assert!(a
                .merged_weight(&layer.base.weight, DType::F32)
                .unwrap()
                .is_some());
            let merged = layer.forward(&h).unwrap();
            let separate = a.apply(&h, Some(&layer.base.forward(&h).unwrap())).unwrap();
            let grads = |y: &Tensor| {
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                a.named()
                    .iter()
                    .map(|(_, t)| values(g.get(t).unwrap()))
                    .collect::<Vec<_>>()
            };
            let close = |x: &[f64], y: &[f64]| {
                x.iter()
                    .zip(y)
                    .all(|(p, q)| (p - q).abs() <= 1e-4 * q.abs().max(1.0))
            };
            assert!(close(&values(&merged), &values(&separate)));
            for (m, s) in grads(&merged).iter().zip(&grads(&separate)) {
                assert!(close(m, s), "{m:?} vs {s:?}");
            }
        }
    }

    /// On a convolution the update is the base convolution run with dW: the same as adding dW
    /// to the frozen weight.
    #[test]
    fn a_conv_update_is_the_convolution_with_the_update_weight() {
        let a = loha(&[6, 2, 3, 3], 4);
        let x = Tensor::randn((2, 2, 5, 5), &mut Rng::new(9), DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn((6, 2, 3, 3), &mut Rng::new(8), DType::F32, Device::Cpu).unwrap();
        let p = ConvParams {
            stride: 2,
            padding: 1,
        };
        let base = x.conv2d(&w, None, p).unwrap();
        let got = a.apply_conv(&x, Some(&base), p).unwrap();
        let merged = x
            .conv2d(&w.add(&a.lycoris_weight().unwrap()).unwrap(), None, p)
            .unwrap();
        assert_eq!(got.dims(), [2, 6, 3, 3]);
        for (g, m) in values(&got).iter().zip(&values(&merged)) {
            assert!((g - m).abs() < 1e-4 * m.abs().max(1.0), "{g} vs {m}");
        }
        assert!(a.fits(&[6, 2, 3, 3]) && !a.fits(&[6, 2, 1, 1]) && !a.fits(&[6, 18]));
    }
}
