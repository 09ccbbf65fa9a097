//! AdamW with 8-bit moments, as bitsandbytes' `AdamW8bit` keeps them (kohya's
//! `--optimizer_type AdamW8bit`, the usual choice for SDXL LoRA on a small card), and Lion with
//! its one moment in 8 bits, as bitsandbytes' `Lion8bit` (kohya's `--optimizer_type Lion8bit`).
//!
//! The update is AdamW's; what changes is how the moments are stored between steps. A trainable
//! of at least `min_8bit_size` elements (4096) keeps each moment as one byte per element: the
//! code of the value, divided by the largest magnitude of its block of 256 elements, in
//! bitsandbytes' dynamic map (signed for m, unsigned for v; see
//! [`crate::backend::cpu::optim::dynamic_map`]), and that absmax in f32 per block.
//! Each step dequantizes a block, updates the moments and the masters in full precision, and
//! stores the new moments as the nearest codes of the block's new absmax. Smaller trainables
//! (LoRA's small factors, norms) keep f32 moments and step as plain AdamW. Per element that is
//! 2 bytes of optimizer state instead of 8, beside the 4 of the f32 master. Lion8bit does the
//! same with Lion's update (see `train::lion`) and its one moment: 1 byte instead of 4.
//!
//! The reference is bitsandbytes 0.50.2's own update (`tests/fixtures/extra/gen_adamw8bit.py`):
//! weight decay first, then the step, as torch's AdamW and bitsandbytes' CPU path order them.
//! Its CUDA kernel differs in two ways too small to see in training, both documented rather than
//! copied: it applies the decay after the step (p differs by lr * wd * the update, 1e-5 of it at
//! kohya's settings), and when a negative moment rounds to the code 0 it takes the next negative
//! code instead (a change of at most 5.5e-7 of the block's absmax).

use super::optim::{concat, Optimizer, Rule, Slot};
use super::optimizer_args::key_values;
use super::prodigy::parse_flag;
use crate::backend::cpu::optim::AdamW;
use crate::backend::cpu::optim::{dynamic_map, BLOCK_8BIT};
use crate::{DType, Device, Error, Result, Tensor};

/// bitsandbytes' settings of its 8-bit optimizers besides the rate, betas, epsilon and weight
/// decay (their flags, or kohya's keys split off first: see `train::optimizer_args`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EightBitConfig {
    /// Trainables with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: usize,
}

impl Default for EightBitConfig {
    fn default() -> Self {
        EightBitConfig {
            min_8bit_size: 4096,
        }
    }
}

impl EightBitConfig {
    /// kohya's `--optimizer_args` spelling: `min_8bit_size=16384`. `is_paged` only moves the
    /// state between host and device under memory pressure (the same arithmetic) and is
    /// accepted; settings that would change the arithmetic away from AdamW8bit's defaults are
    /// refused rather than ignored.
    pub fn parse(name: &str, args: &[String]) -> Result<EightBitConfig> {
        let mut c = EightBitConfig::default();
        for (key, value) in key_values(args)? {
            let fixed = |want: &str| -> Result<()> {
                match value.eq_ignore_ascii_case(want) {
                    true => Ok(()),
                    false => Err(Error::Config(format!(
                        "--optimizer-args {key}={value}: kstyle's {name} runs with {key}={want} only"
                    ))),
                }
            };
            match key {
                "min_8bit_size" => {
                    c.min_8bit_size = value.parse().map_err(|_| {
                        Error::Config(format!(
                            "--optimizer-args min_8bit_size: `{value}` is not a count of elements"
                        ))
                    })?
                }
                "is_paged" => {
                    parse_flag(key, value)?;
                }
                "block_wise" => fixed("True")?,
                "percentile_clipping" => fixed("100")?,
                "optim_bits" => fixed("8")?,
                "amsgrad" => fixed("False")?,
                "max_unorm" => fixed("0")?,
                other => {
                    return Err(Error::Config(format!(
                        "--optimizer-args: {name} has no setting `{other}` (min_8bit_size, \
                         is_paged)"
                    )))
                }
            }
        }
        Ok(c)
    }

    /// For the adapter's recorded settings: `name` (the optimizer) and the threshold.
    pub fn describe(&self, name: &str) -> String {
        format!("{name} min_8bit_size={}", self.min_8bit_size)
    }

    /// Whether a trainable of `len` elements keeps 8-bit moments.
    pub fn quantizes(&self, len: usize) -> bool {
        len >= self.min_8bit_size
    }
}

/// Where one trainable's moments live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// f32 moments at `offset` of the optimizer's `m` and `v`.
    Float { offset: usize },
    /// Codes at `offset` of `q1` / `q2`, absmax from entry `block` of `absmax1` / `absmax2`.
    Bytes { offset: usize, block: usize },
}

/// One trainable's moments as a checkpoint stores them: (len,) f32 moments, or (len,) u8 codes
/// and (len.div_ceil(256),) f32 absmax; the second moment only where the rule keeps one (AdamW,
/// not Lion).
#[derive(Clone, Debug)]
pub enum SlotMoments {
    Float {
        m: Tensor,
        v: Option<Tensor>,
    },
    Bytes {
        q1: Tensor,
        absmax1: Tensor,
        /// (q2, absmax2).
        second: Option<(Tensor, Tensor)>,
    },
}

impl SlotMoments {
    /// `(kind, tensor)` pairs as checkpoints name them (`kstyle.optim.<kind>.<trainable>`).
    pub fn named(self) -> Vec<(&'static str, Tensor)> {
        match self {
            SlotMoments::Float { m, v } => {
                let mut out = vec![("m", m)];
                out.extend(v.map(|v| ("v", v)));
                out
            }
            SlotMoments::Bytes {
                q1,
                absmax1,
                second,
            } => {
                let mut out = vec![("q1", q1), ("absmax1", absmax1)];
                if let Some((q2, absmax2)) = second {
                    out.extend([("q2", q2), ("absmax2", absmax2)]);
                }
                out
            }
        }
    }
}

/// The quantized half of an 8-bit state (the optimizer's `m` and `v` hold the f32 moments of the
/// small trainables): AdamW8bit's two moments, or Lion8bit's one (`q2`, `absmax2` and `v`
/// empty).
#[derive(Clone, Debug)]
pub struct Quantized {
    pub config: EightBitConfig,
    /// Whether a second moment is kept (AdamW's v).
    pub two: bool,
    /// Per slot, in slot order.
    pub places: Vec<Place>,
    /// (N8,) u8 codes of m and v, every quantized trainable back to back.
    pub q1: Tensor,
    pub q2: Tensor,
    /// (blocks,) f32 absmax of m and v, each trainable's blocks starting afresh.
    pub absmax1: Tensor,
    pub absmax2: Tensor,
    /// (512,) f32: the signed map, then the unsigned one, on the training device.
    pub maps: Tensor,
}

/// The maps as one (512,) f32 tensor: signed, then unsigned.
fn maps(device: Device) -> Result<Tensor> {
    let mut both = dynamic_map(true).to_vec();
    both.extend(dynamic_map(false));
    Tensor::from_vec(both, 512, Device::Cpu)?.to_device(device)
}

impl Quantized {
    /// Fresh state for `slots`: zero codes and absmax (bitsandbytes' start: every moment 0),
    /// and the f32 `m`, `v` of the small trainables, zero.
    pub fn fresh(
        config: EightBitConfig,
        two: bool,
        slots: &[Slot],
        device: Device,
    ) -> Result<(Quantized, Tensor, Tensor)> {
        let moments = slots
            .iter()
            .map(|s| {
                let zeros = |n, dtype| Tensor::zeros(n, dtype, Device::Cpu);
                let blocks = s.len.div_ceil(BLOCK_8BIT);
                let codes = || -> Result<(Tensor, Tensor)> {
                    Ok((zeros(s.len, DType::U8)?, zeros(blocks, DType::F32)?))
                };
                Ok(match config.quantizes(s.len) {
                    true => {
                        let (q1, absmax1) = codes()?;
                        SlotMoments::Bytes {
                            q1,
                            absmax1,
                            second: two.then(codes).transpose()?,
                        }
                    }
                    false => SlotMoments::Float {
                        m: zeros(s.len, DType::F32)?,
                        v: two.then(|| zeros(s.len, DType::F32)).transpose()?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Quantized::from_slots(config, two, slots, moments, device)
    }

    /// State from each slot's moments (a checkpoint's, or a reordering's), checked against the
    /// slot sizes. The placement is the moments' own: a checkpoint resumes as it was written
    /// whatever `min_8bit_size` the resumed run asks for.
    pub fn from_slots(
        config: EightBitConfig,
        two: bool,
        slots: &[Slot],
        moments: Vec<SlotMoments>,
        device: Device,
    ) -> Result<(Quantized, Tensor, Tensor)> {
        if moments.len() != slots.len() {
            return Err(Error::msg(format!(
                "8-bit AdamW: {} slot moments for {} slots",
                moments.len(),
                slots.len()
            )));
        }
        let mut places = Vec::with_capacity(slots.len());
        let (mut ms, mut vs) = (vec![], vec![]);
        let (mut q1s, mut q2s, mut a1s, mut a2s) = (vec![], vec![], vec![], vec![]);
        let (mut floats, mut bytes, mut blocks) = (0, 0, 0);
        for (slot, moments) in slots.iter().zip(moments) {
            let len = slot.len;
            let want = |what: &str, t: &Tensor, n: usize, dtype: DType| -> Result<()> {
                match t.elem_count() == n && t.dtype() == dtype {
                    true => Ok(()),
                    false => Err(Error::msg(format!(
                        "optimizer slot `{}`: {what} is {} {:?}, expected {dtype} of {n} values",
                        slot.name,
                        t.dtype(),
                        t.dims()
                    ))),
                }
            };
            let second = |has: bool| match has == two {
                true => Ok(()),
                false => Err(Error::msg(format!(
                    "optimizer slot `{}`: {} a second moment, the optimizer {}",
                    slot.name,
                    if has { "has" } else { "lacks" },
                    if two { "keeps one" } else { "keeps none" }
                ))),
            };
            match moments {
                SlotMoments::Float { m, v } => {
                    want("m", &m, len, DType::F32)?;
                    second(v.is_some())?;
                    if let Some(v) = v {
                        want("v", &v, len, DType::F32)?;
                        vs.push(v);
                    }
                    places.push(Place::Float { offset: floats });
                    floats += len;
                    ms.push(m);
                }
                SlotMoments::Bytes {
                    q1,
                    absmax1,
                    second: more,
                } => {
                    let n = len.div_ceil(BLOCK_8BIT);
                    want("q1", &q1, len, DType::U8)?;
                    want("absmax1", &absmax1, n, DType::F32)?;
                    second(more.is_some())?;
                    if let Some((q2, absmax2)) = more {
                        want("q2", &q2, len, DType::U8)?;
                        want("absmax2", &absmax2, n, DType::F32)?;
                        q2s.push(q2);
                        a2s.push(absmax2);
                    }
                    places.push(Place::Bytes {
                        offset: bytes,
                        block: blocks,
                    });
                    bytes += len;
                    blocks += n;
                    q1s.push(q1);
                    a1s.push(absmax1);
                }
            }
        }
        let flat = |parts: Vec<Tensor>, dtype: DType| -> Result<Tensor> {
            let t = match parts.is_empty() {
                true => Tensor::zeros(0, dtype, Device::Cpu)?,
                false => {
                    let flat: Vec<Tensor> = parts
                        .iter()
                        .map(|t| t.to_device(Device::Cpu)?.reshape(t.elem_count()))
                        .collect::<Result<_>>()?;
                    Tensor::cat(&flat, 0)?
                }
            };
            t.to_device(device)
        };
        let q = Quantized {
            config,
            two,
            places,
            q1: flat(q1s, DType::U8)?,
            q2: flat(q2s, DType::U8)?,
            absmax1: flat(a1s, DType::F32)?,
            absmax2: flat(a2s, DType::F32)?,
            maps: maps(device)?,
        };
        Ok((q, flat(ms, DType::F32)?, flat(vs, DType::F32)?))
    }

    /// Every slot's moments as host tensors (a checkpoint, a reordering): one download per
    /// buffer, then views.
    pub fn host_moments(&self, slots: &[Slot], m: &Tensor, v: &Tensor) -> Result<Vec<SlotMoments>> {
        let host = |t: &Tensor| t.to_device(Device::Cpu);
        let (m, v) = (host(m)?, host(v)?);
        let (q1, q2) = (host(&self.q1)?, host(&self.q2)?);
        let (a1, a2) = (host(&self.absmax1)?, host(&self.absmax2)?);
        slots
            .iter()
            .zip(&self.places)
            .map(|(s, place)| {
                Ok(match *place {
                    Place::Float { offset } => SlotMoments::Float {
                        m: m.narrow(0, offset, s.len)?,
                        v: match self.two {
                            true => Some(v.narrow(0, offset, s.len)?),
                            false => None,
                        },
                    },
                    Place::Bytes { offset, block } => {
                        let n = s.len.div_ceil(BLOCK_8BIT);
                        SlotMoments::Bytes {
                            q1: q1.narrow(0, offset, s.len)?,
                            absmax1: a1.narrow(0, block, n)?,
                            second: match self.two {
                                true => {
                                    Some((q2.narrow(0, offset, s.len)?, a2.narrow(0, block, n)?))
                                }
                                false => None,
                            },
                        }
                    }
                })
            })
            .collect()
    }
}

impl SlotMoments {
    /// The moments as (len,) f32 host tensors: the f32 ones as they are, codes times their
    /// block's absmax (bitsandbytes' dequantization); the second when there is one.
    pub fn values(&self) -> Result<(Tensor, Option<Tensor>)> {
        let host = |t: &Tensor| t.to_device(Device::Cpu);
        let dequantize = |q: &Tensor, a: &Tensor, map: [f32; 256]| -> Result<Tensor> {
            let codes = host(q)?.to_vec::<u8>()?;
            let absmax = a.to_vec_f32()?;
            let values: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * absmax[i / BLOCK_8BIT])
                .collect();
            Tensor::from_vec(values, codes.len(), Device::Cpu)
        };
        match self {
            SlotMoments::Float { m, v } => Ok((host(m)?, v.as_ref().map(host).transpose()?)),
            SlotMoments::Bytes {
                q1,
                absmax1,
                second,
            } => Ok((
                dequantize(q1, absmax1, dynamic_map(true))?,
                second
                    .as_ref()
                    .map(|(q2, a2)| dequantize(q2, a2, dynamic_map(false)))
                    .transpose()?,
            )),
        }
    }
}

/// The rule of an 8-bit state: AdamW8bit with two moments, Lion8bit with one.
fn rule_8bit(q: Quantized) -> Rule {
    match q.two {
        true => Rule::AdamW8bit(Box::new(q)),
        false => Rule::Lion8bit(Box::new(q)),
    }
}

/// The 8-bit rules of [`Optimizer`]: fresh state and state read back per trainable.
impl Optimizer {
    /// The same trainables stepped with 8-bit moments (see `train::adamw8bit`) from zero
    /// moments: AdamW8bit with `two` moments, Lion8bit with one. The f32 `m` and `v` shrink to
    /// the small trainables (`v` to nothing for Lion).
    pub fn with_8bit(mut self, config: EightBitConfig, two: bool) -> Result<Optimizer> {
        let (q, m, v) = Quantized::fresh(config, two, &self.slots, self.master.device())?;
        (self.m, self.v) = (m, v);
        self.rule = rule_8bit(q);
        Ok(self)
    }

    /// 8-bit state read back per trainable (a checkpoint): `(name, master, moments)` in the
    /// order given; AdamW8bit's with `two` moments, Lion8bit's with one.
    pub fn from_parts8(
        hyper: AdamW,
        step: u64,
        config: EightBitConfig,
        two: bool,
        parts: Vec<(String, Tensor, SlotMoments)>,
        device: Device,
    ) -> Result<Optimizer> {
        let mut slots = Vec::with_capacity(parts.len());
        let mut masters = Vec::with_capacity(parts.len());
        let mut moments = Vec::with_capacity(parts.len());
        let mut offset = 0;
        for (name, master, mom) in parts {
            let len = master.elem_count();
            slots.push(Slot { name, offset, len });
            offset += len;
            masters.push(master);
            moments.push(mom);
        }
        let (q, m, v) = Quantized::from_slots(config, two, &slots, moments, device)?;
        Ok(Optimizer {
            hyper,
            step,
            slots,
            master: concat(&masters, device)?,
            m,
            v,
            rule: rule_8bit(q),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_optimizer_args_parse() {
        let args = ["min_8bit_size=16384", "is_paged=True", "block_wise=True"].map(String::from);
        let c = EightBitConfig::parse("AdamW8bit", &args).unwrap();
        assert_eq!(c.min_8bit_size, 16384);
        assert!(c.quantizes(16384) && !c.quantizes(16383));
        assert_eq!(
            EightBitConfig::parse("Lion8bit", &[])
                .unwrap()
                .min_8bit_size,
            4096
        );
        for bad in [
            "min_8bit_size",
            "min_8bit_size=-1",
            "block_wise=False",
            "percentile_clipping=5",
            "optim_bits=32",
            "betas=0.9,0.99",
            "d0=1e-6",
        ] {
            assert!(
                EightBitConfig::parse("AdamW8bit", &[bad.to_string()]).is_err(),
                "{bad}"
            );
        }
    }

    /// Slots at and above the threshold get codes and a block count rounded up; the rest f32
    /// moments; a checkpoint's placement round-trips through host moments.
    #[test]
    fn placement_follows_min_8bit_size() {
        let slots: Vec<Slot> = [(300, 0), (10, 300), (512, 310)]
            .iter()
            .enumerate()
            .map(|(i, &(len, offset))| Slot {
                name: format!("p{i}"),
                offset,
                len,
            })
            .collect();
        let config = EightBitConfig { min_8bit_size: 256 };
        let (q, m, v) = Quantized::fresh(config, true, &slots, Device::Cpu).unwrap();
        assert_eq!(
            q.places,
            [
                Place::Bytes {
                    offset: 0,
                    block: 0
                },
                Place::Float { offset: 0 },
                Place::Bytes {
                    offset: 300,
                    block: 2
                },
            ]
        );
        assert_eq!((q.q1.elem_count(), q.absmax1.elem_count()), (812, 4));
        assert_eq!((m.elem_count(), v.elem_count()), (10, 10));
        let host = q.host_moments(&slots, &m, &v).unwrap();
        let (again, ..) = Quantized::from_slots(config, true, &slots, host, Device::Cpu).unwrap();
        assert_eq!(again.places, q.places);
        let wrong = vec![SlotMoments::Float {
            m: Tensor::zeros(3, DType::F32, Device::Cpu).unwrap(),
            v: Some(Tensor::zeros(3, DType::F32, Device::Cpu).unwrap()),
        }];
        let err = Quantized::from_slots(config, true, &slots[..1], wrong, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`p0`"), "{err}");
        // Lion's one moment: no second buffers, and a second moment is refused.
        let (one, m1, v1) = Quantized::fresh(config, false, &slots, Device::Cpu).unwrap();
        assert_eq!((one.q2.elem_count(), one.absmax2.elem_count()), (0, 0));
        assert_eq!((m1.elem_count(), v1.elem_count()), (10, 0));
        let host = q.host_moments(&slots, &m, &v).unwrap();
        let err = Quantized::from_slots(config, false, &slots, host, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("has a second moment"), "{err}");
    }
}
