//! Original-layout (sgm) SDXL checkpoints such as `sd_xl_base_1.0.safetensors` -> the four
//! diffusers-named maps (SDXL.md 5.2-5.5). Tensors keep their bytes: only the fused OpenCLIP
//! in_proj is split (row blocks, still borrowed), the OpenCLIP text projection is transposed
//! (the one owned copy) and the VAE's 1x1-conv attention kernels lose their trailing 1x1 dims.
//!
//! Keys that map nowhere are an error listing all of them; keys the layout promises but the
//! file lacks are left to the consumer's loader, which knows the full module tree.

use super::diffusers::canonical_text_encoder_key;
use super::error::{Error, Result};
use super::raw::{dtype_bytes, MappedFile, RawTensor, TensorMap};
use super::unet_layout::{UnetKeyMap, UnetLayout};
use std::borrow::Cow;
use std::path::Path;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const TE2_PREFIX: &str = "conditioner.embedders.1.model.";
/// The refiner's only text encoder, the same OpenCLIP tower as the base's second, is embedder 0
/// (sgm's `sd_xl_refiner.yaml`; SDXL.md 5.2's refiner fingerprint).
pub const REFINER_TE2_PREFIX: &str = "conditioner.embedders.0.model.";
pub const VAE_PREFIX: &str = "first_stage_model.";

/// Top-level marker tensors that say how a checkpoint was trained (ComfyUI writes them and reads
/// them back): `v_pred`, a v-prediction model; `ztsnr`, with zero terminal SNR. Their values
/// carry nothing.
pub const V_PRED_MARKER: &str = "v_pred";
pub const ZTSNR_MARKER: &str = "ztsnr";
/// Playground v2.5's VAE latent statistics (per channel); a checkpoint carrying them is an EDM
/// model, as diffusers' and ComfyUI's single-file loaders read it.
pub const EDM_MEAN_MARKER: &str = "edm_mean";
pub const EDM_STD_MARKER: &str = "edm_std";

/// What a checkpoint's marker tensors say about its training objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Markers {
    pub v_prediction: bool,
    pub zero_snr: bool,
    /// `edm_mean` and `edm_std`: Playground v2.5 (EDM preconditioning, latent statistics).
    pub edm: bool,
}

impl Markers {
    pub fn of(ckpt: &TensorMap<'_>) -> Markers {
        Markers {
            v_prediction: ckpt.contains_key(V_PRED_MARKER),
            zero_snr: ckpt.contains_key(ZTSNR_MARKER),
            edm: ckpt.contains_key(EDM_MEAN_MARKER) && ckpt.contains_key(EDM_STD_MARKER),
        }
    }
}

/// The VAE latent statistics (mean, std) of an EDM checkpoint's `edm_mean` / `edm_std`, one
/// value per latent channel (`channels`); None without them. `file` names the checkpoint in
/// errors.
pub fn edm_latent_stats(
    ckpt: &TensorMap<'_>,
    channels: usize,
    file: &Path,
) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    let (Some(mean), Some(std)) = (ckpt.get(EDM_MEAN_MARKER), ckpt.get(EDM_STD_MARKER)) else {
        return Ok(None);
    };
    let context = file.display().to_string();
    let read = |t: &RawTensor<'_>, key: &str| -> Result<Vec<f64>> {
        let v = t.to_f64_vec(&context, key)?;
        if v.len() != channels || v.iter().any(|x| !x.is_finite()) {
            return Err(Error::file(
                file,
                format!(
                    "`{key}` must hold {channels} finite values (one per latent channel), got \
                     shape {:?}",
                    t.shape
                ),
            ));
        }
        Ok(v)
    };
    let (mean, std) = (read(mean, EDM_MEAN_MARKER)?, read(std, EDM_STD_MARKER)?);
    if std.iter().any(|&s| s <= 0.0) {
        return Err(Error::file(file, "`edm_std` must be positive"));
    }
    Ok(Some((mean, std)))
}

/// Buffers that sgm checkpoints may carry and no diffusers module has (SDXL.md 5.2), and the
/// markers read by [`Markers::of`].
fn is_ignored(key: &str) -> bool {
    key == V_PRED_MARKER
        || key == ZTSNR_MARKER
        || key == EDM_MEAN_MARKER
        || key == EDM_STD_MARKER
        || key == "denoiser.sigmas"
        || key == "conditioner.embedders.1.model.logit_scale"
        || key == "conditioner.embedders.0.model.logit_scale"
        || key.ends_with("position_ids")
}

/// The part of `vae/config.json` that decides the key layout: the decoder's `up.i` is
/// diffusers' `up_blocks.(levels - 1 - i)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaeLayout {
    pub levels: usize,
}

impl VaeLayout {
    pub fn sdxl() -> Self {
        VaeLayout { levels: 4 }
    }

    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct C {
            block_out_channels: Vec<usize>,
        }
        let path = path.as_ref();
        let c: C = crate::formats::python_json::read_file(path)?;
        if c.block_out_channels.is_empty() {
            return Err(Error::file(path, "block_out_channels is empty"));
        }
        Ok(VaeLayout {
            levels: c.block_out_channels.len(),
        })
    }
}

/// The four component maps, keyed exactly like the diffusers folder's files (text encoders in
/// the canonical `text_model.` spelling, see [`canonical_text_encoder_key`]).
#[derive(Debug, Default)]
pub struct SplitCheckpoint<'a> {
    pub unet: TensorMap<'a>,
    pub text_encoder: TensorMap<'a>,
    pub text_encoder_2: TensorMap<'a>,
    pub vae: TensorMap<'a>,
}

/// Whether an sgm checkpoint is an SDXL refiner: its OpenCLIP tower is embedder 0.
pub fn is_refiner(ckpt: &TensorMap<'_>) -> bool {
    ckpt.keys().any(|k| k.starts_with(REFINER_TE2_PREFIX))
}

/// Converts the tensors of a mapped single file; errors name the file.
pub fn convert_file<'f>(
    file: &'f MappedFile,
    unet: &UnetLayout,
    vae: VaeLayout,
) -> Result<SplitCheckpoint<'f>> {
    convert(
        file.tensors()?,
        unet,
        vae,
        &file.path().display().to_string(),
    )
}

/// Converts an sgm state dict. `context` names the source in errors.
pub fn convert<'a>(
    ckpt: TensorMap<'a>,
    unet: &UnetLayout,
    vae: VaeLayout,
    context: &str,
) -> Result<SplitCheckpoint<'a>> {
    let unet_map = unet.key_map();
    let mut out = SplitCheckpoint::default();
    let mut unexpected = Vec::new();
    for (key, t) in ckpt {
        if is_ignored(&key) {
            continue;
        }
        let converted = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            convert_unet(&unet_map, rest, t, &mut out.unet)
        } else if let Some(rest) = key.strip_prefix(TE1_PREFIX) {
            canonical_text_encoder_key(rest).map(|k| insert(&mut out.text_encoder, k, t))
        } else if let Some(rest) = key
            .strip_prefix(TE2_PREFIX)
            .or_else(|| key.strip_prefix(REFINER_TE2_PREFIX))
        {
            convert_open_clip(rest, t, &mut out.text_encoder_2, context, &key)?
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            convert_vae(rest, t, vae, &mut out.vae, context, &key)?
        } else {
            None
        };
        record(converted, key, context, &mut unexpected)?;
    }
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedKeys {
            context: context.into(),
            keys: unexpected,
        });
    }
    Ok(out)
}

/// The VAE of a standalone VAE file, diffusers-named. Three spellings are read:
/// - the original LDM names with no prefix (A1111's and ComfyUI's `sdxl_vae.safetensors`);
/// - the same under `first_stage_model.` (a whole checkpoint, whose other parts are skipped);
/// - diffusers names (a VAE folder's `diffusion_pytorch_model.safetensors` on its own), with the
///   pre-0.17 attention names normalised.
///
/// A trained LDM autoencoder's `loss.` tensors (its discriminator and LPIPS) and the EMA
/// counters are skipped, as A1111 does; any other key that is no VAE tensor is an error that
/// lists it. `context` names the file in errors.
pub fn vae_file_tensors<'a>(
    ckpt: TensorMap<'a>,
    layout: VaeLayout,
    context: &str,
) -> Result<TensorMap<'a>> {
    let prefixed = ckpt.keys().any(|k| k.starts_with(VAE_PREFIX));
    let diffusers = ckpt.keys().any(|k| {
        [
            "encoder.down_blocks.",
            "encoder.mid_block.",
            "decoder.up_blocks.",
            "decoder.mid_block.",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    });
    if diffusers && !prefixed {
        return super::diffusers::normalize_vae(ckpt, context);
    }
    let skipped =
        |k: &str| k.starts_with("loss.") || k == "model_ema.decay" || k == "model_ema.num_updates";
    let mut out = TensorMap::new();
    let mut unexpected = Vec::new();
    for (key, t) in ckpt {
        let rest = match key.strip_prefix(VAE_PREFIX) {
            Some(rest) => rest,
            // A whole checkpoint: its UNet and text encoders are not asked for.
            None if prefixed => continue,
            None if skipped(&key) => continue,
            None => key.as_str(),
        };
        let converted = convert_vae(rest, t, layout, &mut out, context, &key)?;
        record(converted, key, context, &mut unexpected)?;
    }
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedKeys {
            context: format!("{context} (not an SDXL-family VAE file)"),
            keys: unexpected,
        });
    }
    if out.is_empty() {
        return Err(Error::File {
            path: context.into(),
            msg: "holds no VAE tensor".into(),
        });
    }
    Ok(out)
}

/// One source key's outcome: converted, a duplicate target (an error), or no target (listed
/// in `unexpected`).
fn record(
    converted: Converted,
    key: String,
    context: &str,
    unexpected: &mut Vec<String>,
) -> Result<()> {
    match converted {
        Some(Some(dup)) => Err(Error::DuplicateKey {
            context: context.into(),
            key: dup,
        }),
        Some(None) => Ok(()),
        None => {
            unexpected.push(key);
            Ok(())
        }
    }
}

/// Inserts and returns the name back if it was already taken (two source keys landing on one
/// target would otherwise silently drop a tensor).
fn insert<'a>(map: &mut TensorMap<'a>, key: String, t: RawTensor<'a>) -> Option<String> {
    match map.entry(key) {
        std::collections::btree_map::Entry::Occupied(e) => Some(e.key().clone()),
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(t);
            None
        }
    }
}

/// `None`: maps nowhere. `Some(None)`: inserted. `Some(Some(k))`: `k` was a duplicate.
type Converted = Option<Option<String>>;

fn convert_unet<'a>(
    map: &UnetKeyMap,
    rest: &str,
    t: RawTensor<'a>,
    out: &mut TensorMap<'a>,
) -> Converted {
    map.to_diffusers(rest).map(|k| insert(out, k, t))
}

/// OpenCLIP text tower -> HF CLIPTextModelWithProjection (SDXL.md 5.4).
fn convert_open_clip<'a>(
    rest: &str,
    t: RawTensor<'a>,
    out: &mut TensorMap<'a>,
    context: &str,
    key: &str,
) -> Result<Converted> {
    let simple = match rest {
        "token_embedding.weight" => {
            Some("text_model.embeddings.token_embedding.weight".to_string())
        }
        "positional_embedding" => {
            Some("text_model.embeddings.position_embedding.weight".to_string())
        }
        "ln_final.weight" | "ln_final.bias" => Some(format!(
            "text_model.final_layer_norm.{}",
            &rest["ln_final.".len()..]
        )),
        _ => None,
    };
    if let Some(k) = simple {
        return Ok(Some(insert(out, k, t)));
    }
    if rest == "text_projection" {
        // OpenCLIP computes x @ P; a Linear stores P^T. Square in SDXL, so a missing transpose
        // would load without complaint and only corrupt the pooled embedding.
        let t = transpose_2d(&t, context, key)?;
        return Ok(Some(insert(out, "text_projection.weight".into(), t)));
    }
    let Some(layer_rest) = rest.strip_prefix("transformer.resblocks.") else {
        return Ok(None);
    };
    let Some((layer, inner)) = layer_rest.split_once('.') else {
        return Ok(None);
    };
    if layer.parse::<usize>().is_err() {
        return Ok(None);
    }
    let base = format!("text_model.encoder.layers.{layer}.");
    if let Some(kind) = inner.strip_prefix("attn.in_proj_") {
        if kind != "weight" && kind != "bias" {
            return Ok(None);
        }
        let mut dup = None;
        for (name, part) in ["q_proj", "k_proj", "v_proj"]
            .into_iter()
            .zip(split_rows_in_three(t, context, key)?)
        {
            dup = dup.or(insert(out, format!("{base}self_attn.{name}.{kind}"), part));
        }
        return Ok(Some(dup));
    }
    const RENAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    Ok(RENAMES
        .iter()
        .find_map(|&(src, dst)| {
            let param = inner.strip_prefix(src)?;
            (param == "weight" || param == "bias").then(|| format!("{base}{dst}{param}"))
        })
        .map(|k| insert(out, k, t)))
}

/// Splits the fused (3D, ...) in_proj into q, k, v by rows. Rows are contiguous, so the parts
/// still borrow the original bytes.
fn split_rows_in_three<'a>(
    t: RawTensor<'a>,
    context: &str,
    key: &str,
) -> Result<Vec<RawTensor<'a>>> {
    let wrong = |t: &RawTensor| Error::WrongShape {
        context: context.into(),
        key: key.into(),
        got: t.shape.clone(),
        expected: "(3*D,) or (3*D, D)".into(),
    };
    if t.shape.is_empty()
        || t.shape.len() > 2
        || t.shape[0] == 0
        || t.shape[0] % 3 != 0
        || t.data.len() % 3 != 0
    {
        return Err(wrong(&t));
    }
    let mut shape = t.shape.clone();
    shape[0] /= 3;
    let part = t.data.len() / 3;
    let parts = match t.data {
        Cow::Borrowed(b) => b.chunks_exact(part).map(Cow::Borrowed).collect::<Vec<_>>(),
        Cow::Owned(v) => v
            .chunks_exact(part)
            .map(|c| Cow::Owned(c.to_vec()))
            .collect(),
    };
    Ok(parts
        .into_iter()
        .map(|data| RawTensor {
            dtype: t.dtype,
            shape: shape.clone(),
            data,
        })
        .collect())
}

/// Byte-exact transpose of a 2-D tensor of any whole-byte dtype.
pub fn transpose_2d(t: &RawTensor<'_>, context: &str, key: &str) -> Result<RawTensor<'static>> {
    let &[rows, cols] = t.shape.as_slice() else {
        return Err(Error::WrongShape {
            context: context.into(),
            key: key.into(),
            got: t.shape.clone(),
            expected: "a 2-D tensor".into(),
        });
    };
    let es = dtype_bytes(t.dtype).ok_or_else(|| Error::DType {
        context: context.into(),
        key: key.into(),
        dtype: t.dtype,
    })?;
    let mut data = vec![0u8; t.data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * es;
            let dst = (c * rows + r) * es;
            data[dst..dst + es].copy_from_slice(&t.data[src..src + es]);
        }
    }
    Ok(RawTensor {
        dtype: t.dtype,
        shape: vec![cols, rows],
        data: Cow::Owned(data),
    })
}

/// LDM VAE -> diffusers AutoencoderKL (SDXL.md 5.5).
fn convert_vae<'a>(
    rest: &str,
    t: RawTensor<'a>,
    layout: VaeLayout,
    out: &mut TensorMap<'a>,
    context: &str,
    key: &str,
) -> Result<Converted> {
    let Some((name, t)) = vae_name(rest, t, layout, context, key)? else {
        return Ok(None);
    };
    Ok(Some(insert(out, name, t)))
}

fn vae_name<'a>(
    rest: &str,
    t: RawTensor<'a>,
    layout: VaeLayout,
    context: &str,
    key: &str,
) -> Result<Option<(String, RawTensor<'a>)>> {
    let parts: Vec<&str> = rest.split('.').collect();
    let top = parts[0];
    if matches!(top, "quant_conv" | "post_quant_conv") {
        return Ok((parts.len() == 2).then(|| (rest.to_string(), t)));
    }
    if top != "encoder" && top != "decoder" {
        return Ok(None);
    }
    let num = |s: &str| s.parse::<usize>().ok();
    let idx = |s: &str| num(s).filter(|&i| i < layout.levels);
    let name = match parts[1..] {
        [m @ ("conv_in" | "conv_out"), p] => format!("{top}.{m}.{p}"),
        ["norm_out", p] => format!("{top}.conv_norm_out.{p}"),
        ["down", i, "block", j, ref inner @ ..] if top == "encoder" => {
            let (Some(i), Some(j), Some(inner)) = (idx(i), num(j), vae_resnet_child(inner)) else {
                return Ok(None);
            };
            format!("encoder.down_blocks.{i}.resnets.{j}.{inner}")
        }
        ["down", i, "downsample", "conv", p] if top == "encoder" => {
            let Some(i) = idx(i) else { return Ok(None) };
            format!("encoder.down_blocks.{i}.downsamplers.0.conv.{p}")
        }
        ["up", i, "block", j, ref inner @ ..] if top == "decoder" => {
            let (Some(i), Some(j), Some(inner)) = (idx(i), num(j), vae_resnet_child(inner)) else {
                return Ok(None);
            };
            format!(
                "decoder.up_blocks.{}.resnets.{j}.{inner}",
                layout.levels - 1 - i
            )
        }
        ["up", i, "upsample", "conv", p] if top == "decoder" => {
            let Some(i) = idx(i) else { return Ok(None) };
            format!(
                "decoder.up_blocks.{}.upsamplers.0.conv.{p}",
                layout.levels - 1 - i
            )
        }
        ["mid", b @ ("block_1" | "block_2"), ref inner @ ..] => {
            let Some(inner) = vae_resnet_child(inner) else {
                return Ok(None);
            };
            format!(
                "{top}.mid_block.resnets.{}.{inner}",
                if b == "block_1" { 0 } else { 1 }
            )
        }
        ["mid", "attn_1", m, p] => {
            let target = match m {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return Ok(None),
            };
            let name = format!("{top}.mid_block.attentions.0.{target}.{p}");
            if m != "norm" && p == "weight" {
                return Ok(Some((name, conv1x1_to_linear(t, context, key)?)));
            }
            name
        }
        _ => return Ok(None),
    };
    Ok(Some((name, t)))
}

/// VAE resnet children: only the shortcut is renamed.
fn vae_resnet_child(inner: &[&str]) -> Option<String> {
    match inner {
        [m @ ("norm1" | "conv1" | "norm2" | "conv2"), p] => Some(format!("{m}.{p}")),
        ["nin_shortcut", p] => Some(format!("conv_shortcut.{p}")),
        _ => None,
    }
}

/// (C, C, 1, 1) conv kernel -> (C, C) Linear weight; same bytes. Already 2-D passes through.
pub fn conv1x1_to_linear<'a>(t: RawTensor<'a>, context: &str, key: &str) -> Result<RawTensor<'a>> {
    match t.shape.as_slice() {
        [_, _] => Ok(t),
        &[o, i, 1, 1] => t.reshaped(vec![o, i], context, key),
        _ => Err(Error::WrongShape {
            context: context.into(),
            key: key.into(),
            got: t.shape.clone(),
            expected: "(C, C, 1, 1) or (C, C)".into(),
        }),
    }
}
