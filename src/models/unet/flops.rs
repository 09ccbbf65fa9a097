//! The floating-point operations of one UNet forward, counted from the parameter list rather than
//! from the code that runs: every weight matrix or kernel costs 2 × its element count at each
//! position it is applied to, and every attention costs 2 × queries × keys × (d + dv) per head.
//! Norms, activations, biases and residual adds are left out (they are memory-bound, not
//! FLOP-bound), which is also what the dispatch counter (`backend::flops`) counts, so the two
//! must agree exactly: `kstyle bench --model` checks that at full size, `tests/flops.rs` on the
//! tiny model.

use super::{param_shapes, UNetConfig};

/// Where a parameter is applied: the module path's block and level.
enum Site {
    /// Once per sample: the time and added-conditioning embeddings, resnet `time_emb_proj`.
    PerSample,
    /// At every text token: cross-attention keys and values.
    PerToken,
    /// At every pixel of a level's resolution.
    Level(usize),
}

/// Latent (height, width) at each level: a downsampler (3×3, stride 2, padding 1) gives
/// ceil(h / 2); up blocks return to the sizes of the skips they concatenate.
fn resolutions(cfg: &UNetConfig, (h, w): (usize, usize)) -> Vec<(usize, usize)> {
    let mut res = vec![(h, w)];
    for _ in 1..cfg.levels() {
        let (h, w) = *res.last().expect("level 0 is present");
        res.push((h.div_ceil(2), w.div_ceil(2)));
    }
    res
}

/// Block index after `prefix` in `name` ("down_blocks.2.resnets..." -> 2).
fn index_after(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    rest.split('.').next()?.parse().ok()
}

fn site(name: &str, levels: usize) -> Site {
    if name.starts_with("time_embedding.")
        || name.starts_with("add_embedding.")
        || name.contains(".time_emb_proj.")
    {
        return Site::PerSample;
    }
    if name.contains(".attn2.to_k.") || name.contains(".attn2.to_v.") {
        return Site::PerToken;
    }
    let last = levels - 1;
    if let Some(i) = index_after(name, "down_blocks.") {
        let downsampler = name.contains(".downsamplers.");
        return Site::Level(if downsampler { i + 1 } else { i });
    }
    if name.starts_with("mid_block.") {
        return Site::Level(last);
    }
    if let Some(j) = index_after(name, "up_blocks.") {
        // Up block j runs at level last - j; its upsampler's conv at the next level up.
        let upsampler = name.contains(".upsamplers.");
        return Site::Level(if upsampler { last - j - 1 } else { last - j });
    }
    // conv_in, conv_out.
    Site::Level(0)
}

/// Operations of one forward of `batch` samples at latent size `hw` with `tokens` text tokens.
pub fn forward_flops(cfg: &UNetConfig, batch: usize, hw: (usize, usize), tokens: usize) -> u64 {
    let res = resolutions(cfg, hw);
    let pixels = |level: usize| (res[level].0 * res[level].1) as u64;
    let (b, t) = (batch as u64, tokens as u64);
    let mut total = 0u64;
    for (name, shape) in param_shapes(cfg).0 {
        if !name.ends_with(".weight") || shape.len() < 2 {
            continue; // biases and norm scales
        }
        let per_position: u64 = shape.iter().map(|&d| d as u64).product();
        let site = site(&name, cfg.levels());
        let positions = match site {
            Site::PerSample => 1,
            Site::PerToken => t,
            Site::Level(l) => pixels(l),
        };
        total += 2 * b * positions * per_position;
        // Each attention's query projection stands for its score and value products: inner
        // channels (heads × d) at each of q queries against each key, for scores and values.
        if let (true, Site::Level(l)) = (name.ends_with(".to_q.weight"), site) {
            let inner = shape[0] as u64;
            let keys = if name.contains(".attn2.") {
                t
            } else {
                pixels(l)
            };
            total += 2 * b * pixels(l) * keys * 2 * inner;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_base_scales_with_batch_and_tokens() {
        let cfg = UNetConfig::sdxl_base();
        let f = forward_flops(&cfg, 1, (128, 128), 77) as f64;
        eprintln!("SDXL base forward, 1024 px, batch 1: {f:e}");
        // Twice the batch is twice the work; a 77-token context costs more than a 1-token one.
        assert_eq!(
            forward_flops(&cfg, 2, (128, 128), 77),
            2 * forward_flops(&cfg, 1, (128, 128), 77)
        );
        assert!(forward_flops(&cfg, 1, (128, 128), 1) < forward_flops(&cfg, 1, (128, 128), 77));
    }

    #[test]
    fn odd_latents_round_up_at_each_downsampler() {
        let cfg = UNetConfig::sdxl_base();
        assert_eq!(resolutions(&cfg, (13, 7)), vec![(13, 7), (7, 4), (4, 2)]);
    }
}
