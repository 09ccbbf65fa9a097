//! diffusers-named component maps -> one original-layout (sgm) checkpoint, the file
//! A1111 / ComfyUI / sgm load (`sd_xl_base_1.0.safetensors` layout; a refiner's OpenCLIP tower as
//! embedder 0). The inverse of [`super::single_file::convert`], and checked against it: the
//! written map must convert back to exactly the input, bytes included, or nothing is returned.

use super::error::{Error, Result};
use super::raw::{RawTensor, TensorMap};
use super::single_file::{
    convert, transpose_2d, SplitCheckpoint, VaeLayout, REFINER_TE2_PREFIX, TE1_PREFIX, TE2_PREFIX,
    UNET_PREFIX, VAE_PREFIX,
};
use super::unet_layout::UnetLayout;
use std::borrow::Cow;

/// The sgm state dict of `split`. A split without a first text encoder is written as a
/// refiner (OpenCLIP tower as embedder 0). `context` names the source in errors.
pub fn to_sgm<'a>(
    split: &SplitCheckpoint<'a>,
    unet: &UnetLayout,
    vae: VaeLayout,
    context: &str,
) -> Result<TensorMap<'a>> {
    let mut out = TensorMap::new();
    let mut unmapped = Vec::new();
    let map = unet.key_map();
    for (k, t) in &split.unet {
        match map.to_sgm(k) {
            Some(s) => put(&mut out, format!("{UNET_PREFIX}{s}"), t.clone(), context)?,
            None => unmapped.push(format!("unet: {k}")),
        }
    }
    for (k, t) in &split.text_encoder {
        put(&mut out, format!("{TE1_PREFIX}{k}"), t.clone(), context)?;
    }
    let te2_prefix = match split.text_encoder.is_empty() {
        true => REFINER_TE2_PREFIX,
        false => TE2_PREFIX,
    };
    open_clip(
        &split.text_encoder_2,
        te2_prefix,
        &mut out,
        &mut unmapped,
        context,
    )?;
    for (k, t) in &split.vae {
        match vae_sgm(k, t.clone(), vae, context)? {
            Some((s, t)) => put(&mut out, format!("{VAE_PREFIX}{s}"), t, context)?,
            None => unmapped.push(format!("vae: {k}")),
        }
    }
    if !unmapped.is_empty() {
        return Err(Error::UnexpectedKeys {
            context: context.into(),
            keys: unmapped,
        });
    }
    let back = convert(out.clone(), unet, vae, context)?;
    for (name, got, want) in [
        ("unet", &back.unet, &split.unet),
        ("text_encoder", &back.text_encoder, &split.text_encoder),
        (
            "text_encoder_2",
            &back.text_encoder_2,
            &split.text_encoder_2,
        ),
        ("vae", &back.vae, &split.vae),
    ] {
        let same = got.len() == want.len()
            && want.iter().all(|(k, w)| {
                got.get(k).is_some_and(|g| {
                    g.dtype == w.dtype && g.shape == w.shape && g.data[..] == w.data[..]
                })
            });
        if !same {
            return Err(Error::File {
                path: context.into(),
                msg: format!("the {name} tensors do not convert back to themselves"),
            });
        }
    }
    Ok(out)
}

fn put<'a>(out: &mut TensorMap<'a>, key: String, t: RawTensor<'a>, context: &str) -> Result<()> {
    if out.contains_key(&key) {
        return Err(Error::DuplicateKey {
            context: context.into(),
            key,
        });
    }
    out.insert(key, t);
    Ok(())
}

/// HF CLIPTextModelWithProjection -> OpenCLIP text tower: q, k, v fused into `in_proj` (row
/// blocks in that order), the projection transposed back to OpenCLIP's `x @ P`.
fn open_clip<'a>(
    te: &TensorMap<'a>,
    prefix: &str,
    out: &mut TensorMap<'a>,
    unmapped: &mut Vec<String>,
    context: &str,
) -> Result<()> {
    const RENAMES: [(&str, &str); 5] = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("self_attn.out_proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    for (k, t) in te {
        let name = match k.as_str() {
            "text_model.embeddings.token_embedding.weight" => "token_embedding.weight".into(),
            "text_model.embeddings.position_embedding.weight" => "positional_embedding".into(),
            "text_model.final_layer_norm.weight" => "ln_final.weight".into(),
            "text_model.final_layer_norm.bias" => "ln_final.bias".into(),
            "text_projection.weight" => {
                let p = transpose_2d(t, context, k)?;
                put(out, format!("{prefix}text_projection"), p, context)?;
                continue;
            }
            _ => {
                let Some((layer, inner)) = k
                    .strip_prefix("text_model.encoder.layers.")
                    .and_then(|r| r.split_once('.'))
                else {
                    unmapped.push(format!("text_encoder_2: {k}"));
                    continue;
                };
                let base = format!("transformer.resblocks.{layer}.");
                if let Some(kind) = inner.strip_prefix("self_attn.q_proj.") {
                    let part = |p: &str| {
                        te.get(&format!(
                            "text_model.encoder.layers.{layer}.self_attn.{p}.{kind}"
                        ))
                        .ok_or_else(|| Error::MissingKey {
                            context: context.into(),
                            key: format!("text_model.encoder.layers.{layer}.self_attn.{p}.{kind}"),
                        })
                    };
                    let fused = fuse_rows(&[t, part("k_proj")?, part("v_proj")?], context, k)?;
                    put(
                        out,
                        format!("{prefix}{base}attn.in_proj_{kind}"),
                        fused,
                        context,
                    )?;
                    continue;
                }
                if inner.starts_with("self_attn.k_proj.") || inner.starts_with("self_attn.v_proj.")
                {
                    continue; // fused with q_proj
                }
                match RENAMES
                    .iter()
                    .find_map(|&(d, s)| inner.strip_prefix(d).map(|p| format!("{base}{s}{p}")))
                {
                    Some(n) => n,
                    None => {
                        unmapped.push(format!("text_encoder_2: {k}"));
                        continue;
                    }
                }
            }
        };
        put(out, format!("{prefix}{name}"), t.clone(), context)?;
    }
    Ok(())
}

/// Row blocks of tensors with one dtype and equal trailing dims, concatenated.
fn fuse_rows<'a>(parts: &[&RawTensor<'a>], context: &str, key: &str) -> Result<RawTensor<'static>> {
    let first = parts[0];
    if parts
        .iter()
        .any(|p| p.dtype != first.dtype || p.shape.get(1..) != first.shape.get(1..))
        || first.shape.is_empty()
    {
        return Err(Error::WrongShape {
            context: context.into(),
            key: key.into(),
            got: first.shape.clone(),
            expected: "q, k and v projections of one dtype and width".into(),
        });
    }
    let mut shape = first.shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    let data: Vec<u8> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
    Ok(RawTensor {
        dtype: first.dtype,
        shape,
        data: Cow::Owned(data),
    })
}

/// diffusers AutoencoderKL -> LDM VAE names; the mid-block attention's Linear weights become the
/// 1x1 conv kernels LDM stores.
fn vae_sgm<'a>(
    key: &str,
    t: RawTensor<'a>,
    layout: VaeLayout,
    context: &str,
) -> Result<Option<(String, RawTensor<'a>)>> {
    let parts: Vec<&str> = key.split('.').collect();
    let top = parts[0];
    if matches!(top, "quant_conv" | "post_quant_conv") {
        return Ok((parts.len() == 2).then(|| (key.to_string(), t)));
    }
    if top != "encoder" && top != "decoder" {
        return Ok(None);
    }
    let num = |s: &str| s.parse::<usize>().ok().filter(|&i| i < layout.levels);
    let child = |inner: &[&str]| match inner {
        [m @ ("norm1" | "conv1" | "norm2" | "conv2"), p] => Some(format!("{m}.{p}")),
        ["conv_shortcut", p] => Some(format!("nin_shortcut.{p}")),
        _ => None,
    };
    let name = match parts[1..] {
        [m @ ("conv_in" | "conv_out"), p] => format!("{top}.{m}.{p}"),
        ["conv_norm_out", p] => format!("{top}.norm_out.{p}"),
        ["down_blocks", i, "resnets", j, ref inner @ ..] if top == "encoder" => {
            let (Some(i), Some(inner)) = (num(i), child(inner)) else {
                return Ok(None);
            };
            format!("encoder.down.{i}.block.{j}.{inner}")
        }
        ["down_blocks", i, "downsamplers", "0", "conv", p] if top == "encoder" => {
            let Some(i) = num(i) else { return Ok(None) };
            format!("encoder.down.{i}.downsample.conv.{p}")
        }
        ["up_blocks", i, "resnets", j, ref inner @ ..] if top == "decoder" => {
            let (Some(i), Some(inner)) = (num(i), child(inner)) else {
                return Ok(None);
            };
            format!("decoder.up.{}.block.{j}.{inner}", layout.levels - 1 - i)
        }
        ["up_blocks", i, "upsamplers", "0", "conv", p] if top == "decoder" => {
            let Some(i) = num(i) else { return Ok(None) };
            format!("decoder.up.{}.upsample.conv.{p}", layout.levels - 1 - i)
        }
        ["mid_block", "resnets", b @ ("0" | "1"), ref inner @ ..] => {
            let Some(inner) = child(inner) else {
                return Ok(None);
            };
            let block = if b == "0" { "block_1" } else { "block_2" };
            format!("{top}.mid.{block}.{inner}")
        }
        ["mid_block", "attentions", "0", ref inner @ ..] => {
            let (m, p) = match inner {
                ["group_norm", p] => ("norm", *p),
                ["to_q", p] => ("q", *p),
                ["to_k", p] => ("k", *p),
                ["to_v", p] => ("v", *p),
                ["to_out", "0", p] => ("proj_out", *p),
                _ => return Ok(None),
            };
            let name = format!("{top}.mid.attn_1.{m}.{p}");
            if m != "norm" && p == "weight" {
                let &[o, i] = t.shape.as_slice() else {
                    return Err(Error::WrongShape {
                        context: context.into(),
                        key: key.into(),
                        got: t.shape.clone(),
                        expected: "a 2-D Linear weight".into(),
                    });
                };
                return Ok(Some((name, t.reshaped(vec![o, i, 1, 1], context, key)?)));
            }
            name
        }
        _ => return Ok(None),
    };
    Ok(Some((name, t)))
}
