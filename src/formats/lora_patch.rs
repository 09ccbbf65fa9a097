//! Every LoRA-family file people download, read into one form: a patch per targeted weight.
//!
//! Spellings (SDXL.md 6.1-6.3; what ComfyUI's `comfy/lora.py` and `comfy/weight_adapter/` read):
//! - module names: kohya (`lora_unet_<sgm or diffusers path with _>`, `lora_te1_`, `lora_te2_`,
//!   `lora_te_`), SimpleTuner's `lycoris_<diffusers path with _>`, and dotted paths under
//!   `unet.`, `text_encoder.`, `text_encoder_2.`, `diffusion_model.` or no prefix, with or without
//!   PEFT's `base_model.model.` and the attention-processor form (`attn1.processor.to_out`).
//! - tensors: LoRA (`lora_down`/`lora_up`, PEFT `lora_A`/`lora_B`, diffusers `lora.down`,
//!   `lora_linear_layer.down`, `_lora.down`), LoCon's Tucker core `lora_mid`, LyCORIS LoHa
//!   (`hada_w1_a` ... `hada_t2`) and LoKr (`lokr_w1`, `lokr_w1_a` ... `lokr_t2`), full
//!   differences (`diff`, `diff_b` for the bias), DoRA magnitudes (`dora_scale`, PEFT
//!   `lora_magnitude_vector`) and per-module `alpha`.
//!
//! Scales follow the trainers: LoRA alpha / rank (rank = rows of down; alpha 0 or absent means
//! alpha = rank, kohya's rule); PEFT files without alpha tensors take `lora_alpha` (and
//! `alpha_pattern`, `use_rslora`) from the `lora_adapter_metadata` JSON diffusers writes, else 1;
//! LoHa alpha / rows of `hada_w1_b`; LoKr alpha / rows of the decomposed factor's `_b` (1 when
//! both factors are whole); full differences 1.

use super::error::{Error, Result};
use super::kohya::{Component, KohyaModel};
use super::peft_config::PeftScales;
use super::raw::{RawTensor, TensorMap};
use std::collections::{BTreeMap, HashMap};

/// How one weight's update is stored.
#[derive(Clone, Debug)]
pub enum Factors<'a> {
    /// `up (out, r) @ down (r, in·k)`, or through LoCon's Tucker core
    /// `ΔW[o,i,y,x] = Σ up[o,m] mid[m,n,y,x] down[n,i]`.
    LowRank {
        up: RawTensor<'a>,
        down: RawTensor<'a>,
        mid: Option<RawTensor<'a>>,
    },
    /// LoHa: `(w1a @ w1b) ⊙ (w2a @ w2b)`; with Tucker cores `t1`, `t2` each factor is
    /// `Σ t[i,j,y,x] a[i,o] b[j,c]` (then `a` is (r, out) and `b` is (r, in)).
    Hadamard {
        w1a: RawTensor<'a>,
        w1b: RawTensor<'a>,
        w2a: RawTensor<'a>,
        w2b: RawTensor<'a>,
        t1: Option<RawTensor<'a>>,
        t2: Option<RawTensor<'a>>,
    },
    /// LoKr: `kron(w1, w2)`, `w1` (a1, b1), `w2` (a2, b2[, kh, kw]).
    Kronecker {
        w1: KronFactor<'a>,
        w2: KronFactor<'a>,
    },
    /// The difference itself, shaped like the weight.
    Full { diff: RawTensor<'a> },
}

/// One LoKr factor: stored whole, or as `a @ b` (through a Tucker core `t` for conv).
#[derive(Clone, Debug)]
pub enum KronFactor<'a> {
    Whole(RawTensor<'a>),
    Product {
        a: RawTensor<'a>,
        b: RawTensor<'a>,
        t: Option<RawTensor<'a>>,
    },
}

/// DoRA's magnitude: the patched weight is renormalised to it.
#[derive(Clone, Debug)]
pub enum Magnitude<'a> {
    /// kohya / LyCORIS `dora_scale`: (1, in, 1, ..) normalises each input column, (out, 1, ..)
    /// each output row. A strength s interpolates, `W + s (DoRA(W) - W)`, as ComfyUI does.
    DoraScale(RawTensor<'a>),
    /// PEFT `lora_magnitude_vector` (out,): output rows; the strength scales the update inside
    /// the norm, as diffusers' adapter weights do.
    Peft(RawTensor<'a>),
}

/// The update of one weight (and possibly its bias).
#[derive(Clone, Debug)]
pub struct Patch<'a> {
    pub component: Component,
    /// diffusers module path, e.g. `down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k`.
    pub module: String,
    /// The module as the file spells it, for messages.
    pub spelled: String,
    /// Shape of the patched weight: (out, in) or (out, in, kh, kw).
    pub target: Vec<usize>,
    pub factors: Factors<'a>,
    /// Multiplies the factors' product (alpha / rank and its variants, resolved).
    pub scale: f64,
    pub magnitude: Option<Magnitude<'a>>,
    /// LyCORIS `diff_b`: added to the module's bias.
    pub bias_diff: Option<RawTensor<'a>>,
    /// The alpha the file gave, if any (kept for the kohya view of plain LoRA patches).
    pub alpha: Option<f64>,
    /// Every key of the file this patch came from.
    pub keys: Vec<String>,
}

/// A parsed file: the patches, and the keys that name nothing of the model, each with the
/// component its prefix claims (`None`: no LoRA prefix or suffix at all).
#[derive(Debug)]
pub struct Patches<'a> {
    pub patches: Vec<Patch<'a>>,
    pub unknown: Vec<(Option<Component>, String)>,
}

/// What a key's suffix says the tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Down,
    Up,
    Mid,
    Alpha,
    DoraScale,
    PeftMagnitude,
    HadaW1a,
    HadaW1b,
    HadaW2a,
    HadaW2b,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1a,
    LokrW1b,
    LokrW2,
    LokrW2a,
    LokrW2b,
    LokrT2,
    Diff,
    DiffB,
}

/// (suffix, role, whether the spelling is PEFT/diffusers, whose scale may come from metadata).
/// The `_lora.` forms (old diffusers attention processors, `to_q_lora.down.weight`) attach to
/// the name without a dot.
const SUFFIXES: &[(&str, Role, bool)] = &[
    (".lora_down.weight", Role::Down, false),
    (".lora_up.weight", Role::Up, false),
    (".lora_mid.weight", Role::Mid, false),
    (".lora_A.weight", Role::Down, true),
    (".lora_B.weight", Role::Up, true),
    (".lora_A.default.weight", Role::Down, true),
    (".lora_B.default.weight", Role::Up, true),
    (".lora.down.weight", Role::Down, true),
    (".lora.up.weight", Role::Up, true),
    (".lora_linear_layer.down.weight", Role::Down, true),
    (".lora_linear_layer.up.weight", Role::Up, true),
    ("_lora.down.weight", Role::Down, true),
    ("_lora.up.weight", Role::Up, true),
    (".alpha", Role::Alpha, false),
    (".dora_scale", Role::DoraScale, false),
    (".lora_magnitude_vector.weight", Role::PeftMagnitude, true),
    (".lora_magnitude_vector", Role::PeftMagnitude, true),
    (".hada_w1_a", Role::HadaW1a, false),
    (".hada_w1_b", Role::HadaW1b, false),
    (".hada_w2_a", Role::HadaW2a, false),
    (".hada_w2_b", Role::HadaW2b, false),
    (".hada_t1", Role::HadaT1, false),
    (".hada_t2", Role::HadaT2, false),
    (".lokr_w1", Role::LokrW1, false),
    (".lokr_w1_a", Role::LokrW1a, false),
    (".lokr_w1_b", Role::LokrW1b, false),
    (".lokr_w2", Role::LokrW2, false),
    (".lokr_w2_a", Role::LokrW2a, false),
    (".lokr_w2_b", Role::LokrW2b, false),
    (".lokr_t2", Role::LokrT2, false),
    (".diff", Role::Diff, false),
    (".diff_b", Role::DiffB, false),
];

fn split_suffix(key: &str) -> Option<(&str, Role, bool)> {
    // Longest match first: `.lora_A.default.weight` before nothing shorter can steal it, and
    // `.lokr_w1_a` is not `.lokr_w1` (suffixes are matched whole, so only length matters).
    SUFFIXES
        .iter()
        .filter_map(|&(s, role, peft)| {
            key.strip_suffix(s)
                .filter(|stem| !stem.is_empty())
                .map(|stem| (s.len(), stem, role, peft))
        })
        .max_by_key(|m| m.0)
        .map(|(_, stem, role, peft)| (stem, role, peft))
}

/// The component a module name claims, and the rest of the name.
fn claim(stem: &str) -> Option<(Component, &str)> {
    const PREFIXES: &[(&str, Component)] = &[
        ("lora_unet_", Component::Unet),
        ("lycoris_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
        ("unet.", Component::Unet),
        ("diffusion_model.", Component::Unet),
        ("text_encoder.", Component::TextEncoder),
        ("text_encoder_2.", Component::TextEncoder2),
    ];
    if let Some((c, rest)) = PREFIXES
        .iter()
        .find_map(|&(p, c)| stem.strip_prefix(p).map(|rest| (c, rest)))
    {
        return Some((c, rest));
    }
    // Bare dotted UNet paths (ComfyUI's "generic" spelling), diffusers or sgm.
    const UNET_ROOTS: &[&str] = &[
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in",
        "conv_out",
        "time_embedding.",
        "add_embedding.",
        "input_blocks.",
        "middle_block.",
        "output_blocks.",
        "out.",
        "time_embed.",
        "label_emb.",
    ];
    UNET_ROOTS
        .iter()
        .any(|r| stem.starts_with(r))
        .then_some((Component::Unet, stem))
}

impl KohyaModel {
    /// diffusers module path of a module name as any trainer spells it.
    fn locate(&self, stem: &str) -> Option<(Component, String)> {
        let (c, rest) = claim(stem)?;
        let index = self.index(c)?;
        if !rest.contains('.') {
            return index.resolve(rest).map(|m| (c, m.to_string()));
        }
        let rest = rest.strip_prefix("base_model.model.").unwrap_or(rest);
        // diffusers' attention processors: `attn1.processor.to_q`, `attn1.processor.to_out`.
        let module = match rest.split_once(".processor.") {
            Some((head, "to_out")) => format!("{head}.to_out.0"),
            Some((head, tail)) => format!("{head}.{tail}"),
            None => rest.to_string(),
        };
        if index.weight_shape(&module).is_some() {
            return Some((c, module));
        }
        // Text encoders saved from a model whose modules start below `text_model.` (peft state
        // dicts of transformers 5's CLIPTextModel: `text_encoder.encoder.layers.0...`).
        if c != Component::Unet {
            let full = format!("text_model.{module}");
            if index.weight_shape(&full).is_some() {
                return Some((c, full));
            }
        }
        // Dotted sgm paths and text-encoder paths spelled without `text_model.`: the underscored
        // spellings the index already knows.
        index
            .resolve(&module.replace('.', "_"))
            .map(|m| (c, m.to_string()))
    }

    /// Groups a LoRA-family file's tensors by module, resolves each module against the model and
    /// checks every factor against the weight it patches. `metadata` is the file's safetensors
    /// metadata (PEFT scales live there). `context` (the file name) prefixes errors.
    pub fn parse_patches<'a>(
        &self,
        tensors: TensorMap<'a>,
        context: &str,
        metadata: Option<&HashMap<String, String>>,
    ) -> Result<Patches<'a>> {
        let peft = PeftScales::from_metadata(metadata, context)?;
        let mut groups: BTreeMap<String, Group<'a>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, t) in tensors {
            let Some((stem, role, is_peft)) = split_suffix(&key) else {
                unknown.push((None, key));
                continue;
            };
            let g = groups.entry(stem.to_string()).or_default();
            g.peft |= is_peft;
            if g.tensors.insert(role, t).is_some() {
                return Err(Error::Lora {
                    context: context.into(),
                    module: stem.to_string(),
                    msg: format!("two tensors for the same role ({role:?}), one is `{key}`"),
                });
            }
            g.keys.push(key);
        }
        let mut patches = Vec::new();
        let mut seen: HashMap<(Component, String), String> = HashMap::new();
        for (stem, g) in groups {
            let Some((component, module)) = self.locate(&stem) else {
                let c = claim(&stem).map(|(c, _)| c);
                unknown.extend(g.keys.into_iter().map(|k| (c, k)));
                continue;
            };
            if let Some(first) = seen.insert((component, module.clone()), stem.clone()) {
                return Err(Error::Lora {
                    context: context.into(),
                    module: stem,
                    msg: format!("targets `{module}`, which `{first}` already targets"),
                });
            }
            let target = self
                .index(component)
                .and_then(|i| i.weight_shape(&module))
                .expect("located module has a shape")
                .to_vec();
            let mut b = Builder {
                context,
                stem: &stem,
                target: &target,
                tensors: g.tensors,
            };
            let patch = b.build(component, module, &peft, g.peft, g.keys)?;
            patches.push(patch);
        }
        Ok(Patches { patches, unknown })
    }
}

#[derive(Default)]
struct Group<'a> {
    tensors: BTreeMap<Role, RawTensor<'a>>,
    keys: Vec<String>,
    peft: bool,
}

/// Turns one module's tensors into a [`Patch`], checking each shape against the target.
struct Builder<'s, 'a> {
    context: &'s str,
    stem: &'s str,
    target: &'s [usize],
    tensors: BTreeMap<Role, RawTensor<'a>>,
}

impl<'a> Builder<'_, 'a> {
    fn err(&self, msg: String) -> Error {
        Error::Lora {
            context: self.context.into(),
            module: self.stem.into(),
            msg,
        }
    }

    fn take(&mut self, role: Role) -> Option<RawTensor<'a>> {
        self.tensors.remove(&role)
    }

    fn need(&mut self, role: Role, what: &str) -> Result<RawTensor<'a>> {
        self.take(role)
            .ok_or_else(|| self.err(format!("needs {what} ({role:?} is missing)")))
    }

    /// (out, in, spatial) of the target: a Linear has spatial 1.
    fn dims(&self) -> (usize, usize, usize) {
        let t = self.target;
        (t[0], t[1], t[2..].iter().product())
    }

    /// `t` viewed as a 2-D (rows, cols) matrix, or an error naming the expected shape.
    fn matrix(
        &self,
        t: RawTensor<'a>,
        role: &str,
        rows: usize,
        cols: usize,
    ) -> Result<RawTensor<'a>> {
        if t.numel() != rows * cols || t.shape.first() != Some(&rows) {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.{role}", self.stem),
                got: t.shape,
                expected: format!("({rows}, {cols}) for target weight {:?}", self.target),
            });
        }
        t.reshaped(vec![rows, cols], self.context, role)
    }

    /// Leading dimension (a rank or a row count); a 0-d tensor is an error, not a panic.
    fn rows(&self, t: &RawTensor<'a>, role: &str) -> Result<usize> {
        match t.shape.first() {
            Some(&r) if r > 0 => Ok(r),
            _ => Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.{role}", self.stem),
                got: t.shape.clone(),
                expected: format!("a matrix for target weight {:?}", self.target),
            }),
        }
    }

    fn scalar_alpha(&mut self) -> Result<Option<f64>> {
        let Some(a) = self.take(Role::Alpha) else {
            return Ok(None);
        };
        if a.numel() != 1 {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.alpha", self.stem),
                got: a.shape,
                expected: "a scalar".into(),
            });
        }
        Ok(Some(
            a.to_f64_vec(self.context, &format!("{}.alpha", self.stem))?[0],
        ))
    }

    fn build(
        &mut self,
        component: Component,
        module: String,
        peft: &PeftScales,
        peft_spelled: bool,
        keys: Vec<String>,
    ) -> Result<Patch<'a>> {
        let alpha = self.scalar_alpha()?;
        // alpha 0 means "no alpha" to kohya and LyCORIS (scale 1).
        let alpha_over = |rank: usize| match alpha {
            Some(a) if a != 0.0 => a / rank as f64,
            _ => 1.0,
        };
        let (out, _, _) = self.dims();
        let has = |b: &Self, r: Role| b.tensors.contains_key(&r);
        let (factors, scale) = if has(self, Role::Down) || has(self, Role::Up) {
            let (up, down, mid) = self.low_rank()?;
            let rank = down.shape[0];
            let scale = match alpha {
                None if peft_spelled => peft.scale(component, &module, rank).unwrap_or(1.0),
                _ => alpha_over(rank),
            };
            (Factors::LowRank { up, down, mid }, scale)
        } else if has(self, Role::HadaW1a) {
            let f = self.hadamard()?;
            let rank = match &f {
                Factors::Hadamard { w1b, .. } => w1b.shape[0],
                _ => unreachable!("hadamard() builds Hadamard"),
            };
            (f, alpha_over(rank))
        } else if [Role::LokrW1, Role::LokrW1a, Role::LokrW2, Role::LokrW2a]
            .iter()
            .any(|&r| has(self, r))
        {
            let (w1, w2) = self.kronecker()?;
            // The decomposed factor's rank divides alpha; w2's wins when both are (LyCORIS
            // decomposes at most one of them in practice).
            let rank = [&w2, &w1].iter().find_map(|f| match f {
                KronFactor::Product { b, .. } => Some(b.shape[0]),
                KronFactor::Whole(_) => None,
            });
            let scale = match rank {
                Some(r) => alpha_over(r),
                None => 1.0,
            };
            (Factors::Kronecker { w1, w2 }, scale)
        } else if has(self, Role::Diff) {
            let diff = self.need(Role::Diff, "diff")?;
            if diff.numel() != self.target.iter().product::<usize>() {
                return Err(Error::WrongShape {
                    context: self.context.into(),
                    key: format!("{}.diff", self.stem),
                    got: diff.shape,
                    expected: format!("the weight's shape {:?}", self.target),
                });
            }
            let diff = diff.reshaped(self.target.to_vec(), self.context, "diff")?;
            (Factors::Full { diff }, 1.0)
        } else {
            return Err(self.err(format!(
                "no update tensors (has only {:?})",
                self.tensors.keys().collect::<Vec<_>>()
            )));
        };
        let magnitude = match (self.take(Role::DoraScale), self.take(Role::PeftMagnitude)) {
            (Some(_), Some(_)) => {
                return Err(self.err("has both dora_scale and lora_magnitude_vector".into()))
            }
            (Some(m), None) => Some(Magnitude::DoraScale(self.dora_scale(m)?)),
            (None, Some(m)) => {
                if m.numel() != out {
                    return Err(Error::WrongShape {
                        context: self.context.into(),
                        key: format!("{}.lora_magnitude_vector", self.stem),
                        got: m.shape,
                        expected: format!("({out},), one magnitude per output row"),
                    });
                }
                Some(Magnitude::Peft(m))
            }
            (None, None) => None,
        };
        let bias_diff = self.take(Role::DiffB);
        if let Some(b) = &bias_diff {
            if b.numel() != out {
                return Err(Error::WrongShape {
                    context: self.context.into(),
                    key: format!("{}.diff_b", self.stem),
                    got: b.shape.clone(),
                    expected: format!("({out},), the bias"),
                });
            }
        }
        if !self.tensors.is_empty() {
            return Err(self.err(format!(
                "tensors of another update kind mixed in: {:?}",
                self.tensors.keys().collect::<Vec<_>>()
            )));
        }
        Ok(Patch {
            component,
            module,
            spelled: self.stem.to_string(),
            target: self.target.to_vec(),
            factors,
            scale,
            magnitude,
            bias_diff,
            alpha,
            keys,
        })
    }

    /// (up (out, r), down (r, in·k) or (r, in) with a mid, mid (r_up, r_down, k)).
    #[allow(clippy::type_complexity)]
    fn low_rank(&mut self) -> Result<(RawTensor<'a>, RawTensor<'a>, Option<RawTensor<'a>>)> {
        let (Some(down), Some(up)) = (self.take(Role::Down), self.take(Role::Up)) else {
            return Err(self.err("needs both lora_down.weight and lora_up.weight".into()));
        };
        let (out, cin, spatial) = self.dims();
        let r = down.shape.first().copied().unwrap_or(0);
        if r == 0 {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.lora_down.weight", self.stem),
                got: down.shape,
                expected: "a rank of at least 1".into(),
            });
        }
        let Some(mid) = self.take(Role::Mid) else {
            let (down, up) =
                super::kohya::fit_shapes(down, up, self.target, self.context, self.stem)?;
            return Ok((up, down, None));
        };
        // LoCon with a Tucker core: down (r_d, in[,1,1]), mid (r_u, r_d, kh, kw), up (out, r_u[,1,1]).
        let r_up = mid.shape.first().copied().unwrap_or(0);
        let want_mid = r_up * r * spatial;
        if mid.numel() != want_mid || mid.shape.get(1) != Some(&r) {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.lora_mid.weight", self.stem),
                got: mid.shape,
                expected: format!("({r_up}, {r}, kh, kw) for target weight {:?}", self.target),
            });
        }
        let down = self.matrix(down, "lora_down.weight", r, cin)?;
        let up = self.matrix(up, "lora_up.weight", out, r_up)?;
        let mid = mid.reshaped(vec![r_up, r, spatial], self.context, "lora_mid.weight")?;
        Ok((up, down, Some(mid)))
    }

    fn hadamard(&mut self) -> Result<Factors<'a>> {
        let w1a = self.need(Role::HadaW1a, "hada_w1_a")?;
        let w1b = self.need(Role::HadaW1b, "hada_w1_b")?;
        let w2a = self.need(Role::HadaW2a, "hada_w2_a")?;
        let w2b = self.need(Role::HadaW2b, "hada_w2_b")?;
        let (t1, t2) = (self.take(Role::HadaT1), self.take(Role::HadaT2));
        let (out, cin, spatial) = self.dims();
        match (t1, t2) {
            (None, None) => {
                let (r1, r2) = (self.rows(&w1b, "hada_w1_b")?, self.rows(&w2b, "hada_w2_b")?);
                Ok(Factors::Hadamard {
                    w1a: self.matrix(w1a, "hada_w1_a", out, r1)?,
                    w1b: self.matrix(w1b, "hada_w1_b", r1, cin * spatial)?,
                    w2a: self.matrix(w2a, "hada_w2_a", out, r2)?,
                    w2b: self.matrix(w2b, "hada_w2_b", r2, cin * spatial)?,
                    t1: None,
                    t2: None,
                })
            }
            (Some(t1), Some(t2)) => {
                let (r1, r2) = (self.rows(&w1b, "hada_w1_b")?, self.rows(&w2b, "hada_w2_b")?);
                let t1 = self.core(t1, "hada_t1", r1, spatial)?;
                let t2 = self.core(t2, "hada_t2", r2, spatial)?;
                Ok(Factors::Hadamard {
                    w1a: self.matrix(w1a, "hada_w1_a", r1, out)?,
                    w1b: self.matrix(w1b, "hada_w1_b", r1, cin)?,
                    w2a: self.matrix(w2a, "hada_w2_a", r2, out)?,
                    w2b: self.matrix(w2b, "hada_w2_b", r2, cin)?,
                    t1: Some(t1),
                    t2: Some(t2),
                })
            }
            _ => Err(self.err("hada_t1 and hada_t2 come together".into())),
        }
    }

    /// A Tucker core (r, r, kh, kw) as (r, r, spatial).
    fn core(
        &self,
        t: RawTensor<'a>,
        role: &str,
        r: usize,
        spatial: usize,
    ) -> Result<RawTensor<'a>> {
        if t.numel() != r * r * spatial || t.shape.first() != Some(&r) {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.{role}", self.stem),
                got: t.shape,
                expected: format!("({r}, {r}, kh, kw) for target weight {:?}", self.target),
            });
        }
        t.reshaped(vec![r, r, spatial], self.context, role)
    }

    fn kronecker(&mut self) -> Result<(KronFactor<'a>, KronFactor<'a>)> {
        let (out, cin, spatial) = self.dims();
        // w1 first: its (a1, b1) fixes w2's (out / a1, in / b1).
        let w1 = match (
            self.take(Role::LokrW1),
            self.take(Role::LokrW1a),
            self.take(Role::LokrW1b),
        ) {
            (Some(w), None, None) => {
                let (a1, b1) = match w.shape[..] {
                    [a, b] | [a, b, 1, 1] => (a, b),
                    _ => return Err(self.kron_shape("lokr_w1", &w.shape)),
                };
                KronFactor::Whole(self.matrix(w, "lokr_w1", a1, b1)?)
            }
            (None, Some(a), Some(b)) => {
                let (a1, r) = (self.rows(&a, "lokr_w1_a")?, self.rows(&b, "lokr_w1_b")?);
                let b1 = b.numel() / r;
                KronFactor::Product {
                    a: self.matrix(a, "lokr_w1_a", a1, r)?,
                    b: self.matrix(b, "lokr_w1_b", r, b1)?,
                    t: None,
                }
            }
            _ => return Err(self.err("needs lokr_w1, or lokr_w1_a with lokr_w1_b".into())),
        };
        let (a1, b1) = w1.dims();
        if a1 == 0 || b1 == 0 || out % a1 != 0 || cin % b1 != 0 {
            return Err(self.kron_shape("lokr_w1", &[a1, b1]));
        }
        let (a2, b2) = (out / a1, cin / b1);
        let w2 =
            match (
                self.take(Role::LokrW2),
                self.take(Role::LokrW2a),
                self.take(Role::LokrW2b),
                self.take(Role::LokrT2),
            ) {
                (Some(w), None, None, None) => {
                    KronFactor::Whole(self.matrix(w, "lokr_w2", a2, b2 * spatial)?)
                }
                (None, Some(a), Some(b), None) => {
                    let r = self.rows(&b, "lokr_w2_b")?;
                    KronFactor::Product {
                        a: self.matrix(a, "lokr_w2_a", a2, r)?,
                        b: self.matrix(b, "lokr_w2_b", r, b2 * spatial)?,
                        t: None,
                    }
                }
                (None, Some(a), Some(b), Some(t)) => {
                    let r = self.rows(&b, "lokr_w2_b")?;
                    KronFactor::Product {
                        t: Some(self.core(t, "lokr_t2", r, spatial)?),
                        a: self.matrix(a, "lokr_w2_a", r, a2)?,
                        b: self.matrix(b, "lokr_w2_b", r, b2)?,
                    }
                }
                _ => return Err(self.err(
                    "needs lokr_w2, or lokr_w2_a with lokr_w2_b (and lokr_t2 for a Tucker core)"
                        .into(),
                )),
            };
        Ok((w1, w2))
    }

    fn kron_shape(&self, role: &str, got: &[usize]) -> Error {
        Error::WrongShape {
            context: self.context.into(),
            key: format!("{}.{role}", self.stem),
            got: got.to_vec(),
            expected: format!(
                "(a, b) with a dividing the output and b the input of target weight {:?}",
                self.target
            ),
        }
    }

    /// kohya / LyCORIS `dora_scale`: (1, in, 1, ..) or (out, 1, 1, ..).
    fn dora_scale(&self, m: RawTensor<'a>) -> Result<RawTensor<'a>> {
        let (out, cin, _) = self.dims();
        let lead: Vec<usize> = m.shape.iter().take(2).copied().collect();
        let tail_ones = m.shape.iter().skip(2).all(|&d| d == 1);
        let ok = tail_ones && (lead == [1, cin] || lead == [out, 1]);
        if !ok {
            return Err(Error::WrongShape {
                context: self.context.into(),
                key: format!("{}.dora_scale", self.stem),
                got: m.shape,
                expected: format!("(1, {cin}, ..) or ({out}, 1, ..), per input or output channel"),
            });
        }
        Ok(m)
    }
}

impl KronFactor<'_> {
    /// (rows, cols) of the factor as stored (w2's cols include the kernel's spatial extent).
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            KronFactor::Whole(w) => (w.shape[0], w.shape[1]),
            KronFactor::Product { a, b, t: None } => (a.shape[0], b.shape[1]),
            KronFactor::Product { a, b, t: Some(_) } => (a.shape[1], b.shape[1]),
        }
    }
}
