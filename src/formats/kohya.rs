//! kohya-ss LoRA files (SDXL.md 6.1, 6.3): `<prefix>_<module path with . -> _>` +
//! `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
//!
//! `_` is ambiguous (`transformer_blocks` vs `transformer.blocks`), so names are never split
//! heuristically: every linear/conv module of the target model is spelled the ways trainers
//! write it (SDXL UNet: sgm path as kohya does, and the diffusers path that some converters
//! write; text encoders: the HF path) and looked up. The same tables give the export name, so
//! what we write is what ComfyUI and A1111 look up (sgm names for the SDXL UNet).

use super::diffusers::canonical_text_encoder_key;
use super::error::{Error, Result};
use super::lora_patch::Factors;
use super::raw::{RawTensor, TensorMap};
use super::unet_layout::UnetLayout;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    /// CLIP-L (`text_encoder`, kohya `lora_te1`).
    TextEncoder,
    /// OpenCLIP bigG (`text_encoder_2`, kohya `lora_te2`).
    TextEncoder2,
}

impl Component {
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te1",
            Component::TextEncoder2 => "lora_te2",
        }
    }

    pub fn diffusers_name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// Component of a full kohya module name and the rest after `<prefix>_`. `lora_te_` is the
    /// single-text-encoder (SD1.x) spelling and means the first encoder.
    fn split(name: &str) -> Option<(Component, &str)> {
        [
            ("lora_unet_", Component::Unet),
            ("lora_te1_", Component::TextEncoder),
            ("lora_te2_", Component::TextEncoder2),
            ("lora_te_", Component::TextEncoder),
        ]
        .into_iter()
        .find_map(|(p, c)| name.strip_prefix(p).map(|rest| (c, rest)))
    }
}

/// The linear (2-D weight) and conv (4-D weight) modules of one component, under every kohya
/// spelling that can name them.
pub struct ModuleIndex {
    component: Component,
    /// diffusers module path -> weight shape.
    modules: BTreeMap<String, Vec<usize>>,
    /// underscored spelling -> diffusers module path; `None` where two modules collide.
    by_kohya: HashMap<String, Option<String>>,
    /// diffusers module path -> export spelling (without prefix).
    export: HashMap<String, String>,
}

impl ModuleIndex {
    /// UNet modules from its diffusers weight names and shapes. Module paths are converted
    /// through their `.weight` key because leaves such as `conv_in` are whole blocks.
    pub fn unet<'k>(
        weights: impl IntoIterator<Item = (&'k str, &'k [usize])>,
        layout: &UnetLayout,
    ) -> Self {
        let map = layout.key_map();
        let mut idx = Self::empty(Component::Unet);
        for (module, shape) in modules_of(weights) {
            let sgm = map
                .to_sgm(&format!("{module}.weight"))
                .and_then(|k| k.strip_suffix(".weight").map(str::to_string));
            let diffusers_style = module.replace('.', "_");
            idx.add_spelling(&diffusers_style, &module);
            // kohya's own SDXL trainer uses sgm paths, and so do both UIs' lookup tables; a
            // module without an sgm counterpart (none in a standard UNet) exports diffusers-style.
            let export = match sgm {
                Some(s) => {
                    let s = s.replace('.', "_");
                    idx.add_spelling(&s, &module);
                    s
                }
                None => diffusers_style,
            };
            idx.export.insert(module.clone(), export);
            idx.modules.insert(module, shape);
        }
        idx
    }

    /// Text-encoder modules; keys may be spelled with or without `text_model.`.
    pub fn text_encoder<'k>(
        component: Component,
        weights: impl IntoIterator<Item = (&'k str, &'k [usize])>,
    ) -> Self {
        let mut idx = Self::empty(component);
        let canonical: Vec<(String, &[usize])> = weights
            .into_iter()
            .filter_map(|(k, s)| canonical_text_encoder_key(k).map(|k| (k, s)))
            .collect();
        for (module, shape) in modules_of(canonical.iter().map(|(k, s)| (k.as_str(), *s))) {
            let spelled = module.replace('.', "_");
            idx.add_spelling(&spelled, &module);
            idx.export.insert(module.clone(), spelled);
            idx.modules.insert(module, shape);
        }
        idx
    }

    /// Convenience for a loaded component map.
    pub fn from_map(component: Component, map: &TensorMap<'_>, layout: &UnetLayout) -> Self {
        let weights = map.iter().map(|(k, t)| (k.as_str(), t.shape.as_slice()));
        match component {
            Component::Unet => Self::unet(weights, layout),
            c => Self::text_encoder(c, weights),
        }
    }

    fn empty(component: Component) -> Self {
        ModuleIndex {
            component,
            modules: BTreeMap::new(),
            by_kohya: HashMap::new(),
            export: HashMap::new(),
        }
    }

    fn add_spelling(&mut self, spelled: &str, module: &str) {
        self.by_kohya
            .entry(spelled.to_string())
            .and_modify(|m| {
                if m.as_deref() != Some(module) {
                    *m = None;
                }
            })
            .or_insert_with(|| Some(module.to_string()));
    }

    pub fn component(&self) -> Component {
        self.component
    }

    /// diffusers module path for the part of a kohya name after `<prefix>_`.
    pub fn resolve(&self, spelled: &str) -> Option<&str> {
        self.by_kohya.get(spelled)?.as_deref()
    }

    pub fn weight_shape(&self, module: &str) -> Option<&[usize]> {
        self.modules.get(module).map(Vec::as_slice)
    }

    /// Full kohya module name (`lora_unet_input_blocks_4_1_...`) for a diffusers module path.
    pub fn kohya_name(&self, module: &str) -> Result<String> {
        let spelled = self.export.get(module).ok_or_else(|| Error::MissingKey {
            context: format!("kohya export ({})", self.component.diffusers_name()),
            key: format!("{module}.weight"),
        })?;
        Ok(format!("{}_{spelled}", self.component.kohya_prefix()))
    }
}

/// (module path, shape) of every 2-D or 4-D `.weight`. Norms are 1-D, so this keeps exactly
/// the Linear and Conv2d layers (plus embeddings, which no LoRA file names).
fn modules_of<'k>(
    weights: impl IntoIterator<Item = (&'k str, &'k [usize])>,
) -> Vec<(String, Vec<usize>)> {
    weights
        .into_iter()
        .filter(|(_, s)| s.len() == 2 || s.len() == 4)
        .filter_map(|(k, s)| {
            k.strip_suffix(".weight")
                .map(|m| (m.to_string(), s.to_vec()))
        })
        .collect()
}

/// One low-rank update `W += multiplier * alpha / rank * up @ down`.
#[derive(Clone, Debug)]
pub struct LoraEntry<'a> {
    pub component: Component,
    /// diffusers module path, e.g. `down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k`.
    pub module: String,
    /// (r, Din) for a Linear target, (r, Cin, kh, kw) for a conv target.
    pub down: RawTensor<'a>,
    /// (Dout, r) for a Linear target, (Cout, r, 1, 1) for a conv target.
    pub up: RawTensor<'a>,
    /// Already defaulted to the rank when the file has none (or 0).
    pub alpha: f64,
}

impl LoraEntry<'_> {
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// Shape of the weight this updates: (Dout, Din) or (Cout, Cin, kh, kw).
    pub fn target_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.shape[0]];
        s.extend_from_slice(&self.down.shape[1..]);
        s
    }

    /// The update `multiplier * scale * up @ down` in f64, laid out like the target weight:
    /// a conv kernel gets ΔW[o, i, y, x] = Σ_r up[o, r] down[r, i, y, x] (kohya `merge_to`).
    /// A plain reference loop, for merging on load and for tests.
    pub fn delta_f64(&self, multiplier: f64) -> Result<Vec<f64>> {
        let up = self
            .up
            .to_f64_vec("LoRA merge", &format!("{}.lora_up.weight", self.module))?;
        let down = self
            .down
            .to_f64_vec("LoRA merge", &format!("{}.lora_down.weight", self.module))?;
        let (out, r) = (self.up.shape[0], self.rank());
        let inner = down.len() / r; // Cin * kh * kw
        let s = multiplier * self.scale();
        let mut delta = vec![0.0; out * inner];
        for o in 0..out {
            for k in 0..r {
                let u = s * up[o * r + k];
                let row = &down[k * inner..(k + 1) * inner];
                for (d, &x) in delta[o * inner..(o + 1) * inner].iter_mut().zip(row) {
                    *d += u * x;
                }
            }
        }
        Ok(delta)
    }
}

/// A parsed file. `unknown` lists every key that names no module of the given model (or that
/// uses a LoRA variant this does not implement: LoCon mid, LoHa, DoRA...); the caller decides
/// whether that is fatal with [`KohyaLora::deny_unknown`].
#[derive(Debug)]
pub struct KohyaLora<'a> {
    pub entries: Vec<LoraEntry<'a>>,
    pub unknown: Vec<String>,
}

impl<'a> KohyaLora<'a> {
    pub fn deny_unknown(self, context: &str) -> Result<Self> {
        if self.unknown.is_empty() {
            Ok(self)
        } else {
            Err(Error::UnexpectedKeys {
                context: context.into(),
                keys: self.unknown,
            })
        }
    }
}

const DOWN: &str = ".lora_down.weight";
const UP: &str = ".lora_up.weight";
const ALPHA: &str = ".alpha";

/// The models a LoRA file may target: one index per component present.
pub struct KohyaModel {
    indexes: Vec<ModuleIndex>,
}

impl KohyaModel {
    pub fn new(indexes: Vec<ModuleIndex>) -> Self {
        KohyaModel { indexes }
    }

    pub fn index(&self, c: Component) -> Option<&ModuleIndex> {
        self.indexes.iter().find(|i| i.component == c)
    }

    /// (component, diffusers module path) of a full kohya module name.
    pub fn resolve(&self, kohya_name: &str) -> Option<(Component, &str)> {
        let (c, rest) = Component::split(kohya_name)?;
        Some((c, self.index(c)?.resolve(rest)?))
    }

    pub fn kohya_name(&self, c: Component, module: &str) -> Result<String> {
        match self.index(c) {
            Some(i) => i.kohya_name(module),
            None => Err(Error::MissingKey {
                context: "kohya export".into(),
                key: format!("{}.{module}", c.diffusers_name()),
            }),
        }
    }

    /// The plain low-rank modules of a LoRA file (what kohya export and the adapter tools
    /// handle), with names resolved and every shape checked against the target weight. Modules
    /// stored any other way (LoCon cores, LoHa, LoKr, DoRA, full differences) are listed in
    /// `unknown` with the keys that name nothing; [`KohyaModel::parse_patches`] reads them all.
    /// `context` (the file name) prefixes errors.
    pub fn parse<'a>(&self, tensors: TensorMap<'a>, context: &str) -> Result<KohyaLora<'a>> {
        let parsed = self.parse_patches(tensors, context, None)?;
        let mut unknown: Vec<String> = parsed.unknown.into_iter().map(|(_, k)| k).collect();
        let mut entries = Vec::new();
        for p in parsed.patches {
            match p.factors {
                Factors::LowRank {
                    up,
                    down,
                    mid: None,
                } if p.magnitude.is_none() && p.bias_diff.is_none() => {
                    let rank = down.shape[0] as f64;
                    entries.push(LoraEntry {
                        component: p.component,
                        module: p.module,
                        down,
                        up,
                        alpha: match p.alpha {
                            Some(a) if a != 0.0 => a,
                            _ => p.scale * rank,
                        },
                    });
                }
                _ => unknown.extend(p.keys),
            }
        }
        unknown.sort();
        Ok(KohyaLora { entries, unknown })
    }

    /// kohya tensors for `entries` (sgm names for the UNet, as ComfyUI and A1111 expect).
    /// `alpha` is stored in the dtype of `down`, like kohya's trainer does.
    pub fn export<'e>(&self, entries: &'e [LoraEntry<'_>]) -> Result<TensorMap<'e>> {
        let mut out = TensorMap::new();
        for e in entries {
            let name = self.kohya_name(e.component, &e.module)?;
            let alpha = RawTensor::from_f64(e.down.dtype, vec![], &[e.alpha])?;
            for (suffix, t) in [(DOWN, e.down.clone()), (UP, e.up.clone()), (ALPHA, alpha)] {
                let key = format!("{name}{suffix}");
                if out.insert(key.clone(), t).is_some() {
                    return Err(Error::DuplicateKey {
                        context: "kohya export".into(),
                        key,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Checks down/up against the target weight and brings them to the target's rank: a LoRA
/// trained on a 1x1 conv may target a Linear (SD1.x `proj_in`) and vice versa, with the same
/// bytes. Anything else that disagrees is an error naming both shapes.
pub(super) fn fit_shapes<'a>(
    down: RawTensor<'a>,
    up: RawTensor<'a>,
    target: &[usize],
    context: &str,
    name: &str,
) -> Result<(RawTensor<'a>, RawTensor<'a>)> {
    let wrong = |key: &str, got: &[usize], expected: String| Error::WrongShape {
        context: context.into(),
        key: format!("{name}{key}"),
        got: got.to_vec(),
        expected,
    };
    let squeeze = |s: &[usize]| -> Option<Vec<usize>> {
        match *s {
            [a, b] | [a, b, 1, 1] => Some(vec![a, b]),
            _ => None,
        }
    };
    let (Some(&r), Some(&out)) = (down.shape.first(), target.first()) else {
        return Err(wrong(
            DOWN,
            &down.shape,
            format!("(r, ...) for target {target:?}"),
        ));
    };
    if r == 0 {
        return Err(wrong(DOWN, &down.shape, "a rank of at least 1".into()));
    }
    let (want_down, want_up) = match *target {
        [o, i] => (vec![r, i], vec![o, r]),
        [o, i, kh, kw] => (vec![r, i, kh, kw], vec![o, r, 1, 1]),
        _ => {
            return Err(wrong(
                DOWN,
                &down.shape,
                format!("a LoRA for a 2-D or 4-D weight, target is {target:?}"),
            ))
        }
    };
    let same = |got: &[usize], want: &[usize]| {
        got == want || (squeeze(got).is_some() && squeeze(got) == squeeze(want))
    };
    if !same(&down.shape, &want_down) {
        return Err(wrong(
            DOWN,
            &down.shape,
            format!("{want_down:?} for target weight {target:?}"),
        ));
    }
    if !same(&up.shape, &want_up) {
        return Err(wrong(
            UP,
            &up.shape,
            format!("{want_up:?} for target weight {target:?} (rank {r}, out {out})"),
        ));
    }
    let down = down.reshaped(want_down, context, &format!("{name}{DOWN}"))?;
    let up = up.reshaped(want_up, context, &format!("{name}{UP}"))?;
    Ok((down, up))
}
