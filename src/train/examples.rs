//! The training examples: every picture's VAE posterior and every caption's conditioning,
//! computed once through the tensor cache.

use super::buckets::{Bucketer, Bucketing, Placement};
use super::data::{
    load_training_picture, load_training_picture_alpha, mask_picture, prior_repeats, scan_pictures,
    training_mask, training_tensor, training_tensor_with, Dataset, Role, Sample, TensorCache,
};
use super::dataset_config::DatasetConfig;
use super::metadata::scan_metadata;
use super::prefetch::Loaded;
use super::subsets::SubsetRules;
use super::text::{caption_ids, sdxl_conditioning, tokenized};
use super::trainer::TrainConfig;
use crate::image::color_aug::ColorShift;
use crate::image::io::CropInfo;
use crate::models::vae::AutoencoderKL;
use crate::sample::model_files::ModelFiles;
use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};
use image::{GrayImage, RgbImage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One cached training example.
#[derive(Clone)]
pub(super) struct Example {
    /// VAE posterior mean and log-variance (1, 4, h, w).
    pub(super) mean: Tensor,
    pub(super) logvar: Tensor,
    pub(super) text: ExampleText,
    pub(super) time_ids: Tensor,
    /// Visits per epoch (the sample's kohya folder repeats).
    pub(super) repeats: usize,
    /// Regularization pictures train on the weighted diffusion loss alone; validation pictures
    /// never train.
    pub(super) role: Role,
    /// With `--flip-aug`, the picture mirrored left to right: its own latents and time ids, the
    /// rest as here.
    pub(super) mirror: Option<Box<Example>>,
    /// With `--alpha-mask`, its diffusion loss's mask (1, 1, h, w).
    pub(super) mask: Option<Tensor>,
    /// How its visits are drawn: its subset's flip and caption rules.
    pub(super) rules: Arc<SubsetRules>,
    /// Its dataset (batches never mix datasets) and that dataset's batch size.
    pub(super) group: usize,
    pub(super) batch_size: usize,
    /// With its subset's `random_crop` (when the scaled picture is larger than its bucket) or
    /// `color_aug`: where each visit reads it again, to cut a window at random or shift its
    /// colours (see [`live_visit`]). `mean`, `logvar` and `time_ids` above are then the plain
    /// centred picture's, which size batches and the memory plan.
    pub(super) live: Option<Arc<LivePicture>>,
}

/// A picture read, cut and encoded again at every visit: its file, its placement (centred) and
/// what each visit draws.
#[derive(Debug)]
pub(super) struct LivePicture {
    pub(super) path: PathBuf,
    pub(super) place: Placement,
    /// Draw the window's place (kohya's `random_crop`); only set when the picture has slack.
    pub(super) random_crop: bool,
    /// Draw a colour shift (kohya's `color_aug`, see [`crate::image::color_aug`]).
    pub(super) color_aug: bool,
}

/// How a run reads its pictures: the loss mask's source and the device their tensors go to.
#[derive(Clone, Debug)]
pub(super) struct Reading {
    /// `--alpha-mask`: the alpha channel is the mask.
    pub(super) alpha_mask: bool,
    /// `--mask-data`: a style picture's mask picture, by file stem.
    pub(super) mask_data: Option<PathBuf>,
    pub(super) device: Device,
}

impl Reading {
    pub(super) fn of(cfg: &TrainConfig) -> Reading {
        Reading {
            alpha_mask: cfg.alpha_mask,
            mask_data: cfg.mask_data.clone(),
            device: cfg.device,
        }
    }

    /// Whether the diffusion loss is masked (see [`TrainConfig::masked_loss`]).
    fn masked(&self) -> bool {
        self.alpha_mask || self.mask_data.is_some()
    }
}

/// A training picture and its loss mask's source: the alpha channel with `--alpha-mask`, or a
/// style picture's mask picture from `--mask-data`.
pub(super) fn load_with_mask(
    read: &Reading,
    path: &Path,
    role: Role,
) -> Result<(RgbImage, Option<GrayImage>)> {
    match (read.alpha_mask, &read.mask_data) {
        (true, _) => load_training_picture_alpha(path),
        (false, Some(dir)) if role == Role::Style => {
            let picture = load_training_picture(path)?;
            let mask = mask_picture(dir, path, picture.dimensions())?;
            Ok((picture, Some(mask)))
        }
        _ => Ok((load_training_picture(path)?, None)),
    }
}

/// One visit of example `ex` (which is `live`), mirrored or not, on its picture as read
/// (`loaded`, read ahead by [`super::prefetch`] or now). Draws, in this order: with
/// `random_crop` the window's left, then top edge, each uniform over the placement's slack
/// (kohya's `random.randint(0, trim_size)`, diffusers' `RandomCrop`); with `color_aug` kohya's
/// colour shift ([`ColorShift::draw`]). The picture is cut there, shifted (before the mirror,
/// as kohya), and encoded by `vae`. The time ids carry the window's place, as
/// diffusers' SDXL scripts give them.
pub(super) fn live_visit(
    ex: &Example,
    live: &LivePicture,
    mirrored: bool,
    vae: &AutoencoderKL,
    read: &Reading,
    rng: &mut Rng,
    loaded: Loaded,
) -> Result<Example> {
    let at = match live.random_crop {
        true => {
            let (sx, sy) = live.place.slack();
            let left = rng.below(sx as u64 + 1) as u32;
            Some((left, rng.below(sy as u64 + 1) as u32))
        }
        false => None,
    };
    let color = match live.color_aug {
        true => ColorShift::draw(rng),
        false => ColorShift::None,
    };
    let place = Placement { at, ..live.place };
    let Loaded {
        picture,
        alpha,
        orig: (orig_w, orig_h),
    } = loaded;
    // `picture` is already scaled to `place.resized`, so this only cuts, shifts and mirrors.
    let (img, window) = training_tensor_with(&picture, place, mirrored, color, read.device)?;
    let window = CropInfo {
        orig_h,
        orig_w,
        ..window
    };
    let (mean, logvar) = crate::autograd::no_grad(|| vae.encode(&img))?; // (1, 4, h, w) each
    let tid: Vec<f32> = window.time_ids().to_vec();
    let base = super::batch::visited(ex, mirrored);
    Ok(Example {
        mean,
        logvar,
        time_ids: Tensor::from_vec(tid, (1, 6), read.device)?,
        mask: match read.masked() {
            true => Some(training_mask(alpha.as_ref(), place, mirrored, read.device)?),
            false => None,
        },
        mirror: None,
        ..base.clone()
    })
}

/// A caption as the step reads it.
#[derive(Clone)]
pub(super) enum ExampleText {
    /// Embeddings from the frozen text encoders: context (1, 77, Dc), pooled (1, P).
    Cached { context: Tensor, pooled: Tensor },
    /// Token ids (1, 77) of each tokenizer, for text encoders that train, and with
    /// `--weighted-captions` each tokenizer's token weights (1, 75 n + 2).
    Tokens {
        ids_1: Tensor,
        ids_2: Tensor,
        weights: Option<(Tensor, Tensor)>,
    },
    /// The caption itself, tokenized and encoded at each step (`--shuffle-caption`: its tags
    /// are reordered per visit, so no encoding can be cached).
    Caption(String),
}

/// The run's pictures: `--data`, then `--reg-data`'s with kohya's balanced visit counts (those
/// left with none are dropped, as kohya leaves them unused), or a dataset config's subsets;
/// then `--val-data`'s with no visits. Logs what it found.
pub(super) fn load_dataset(cfg: &TrainConfig, log: &mut dyn FnMut(&str)) -> Result<Dataset> {
    let (mut data, mut warnings) = match &cfg.dataset_config {
        Some(dc) => config_dataset(cfg, dc, log)?,
        None => folder_dataset(cfg, log)?,
    };
    if let Some(dir) = &cfg.val_data {
        let val = Dataset::scan(dir, &cfg.captions)?;
        log(&format!(
            "validation: {} images from {} (held out: they never train)",
            val.len(),
            dir.display()
        ));
        warnings.extend(val.warnings);
        for mut s in val.samples {
            s.repeats = 0;
            s.role = Role::Validation;
            data.samples.push(s);
        }
    }
    for s in &warnings {
        log(&format!("warning: {s}"));
    }
    Ok(data)
}

/// Leaves out the pictures of at most `area` pixels (kohya's skip_image_resolution), saying how
/// many went.
fn skip_small(samples: &mut Vec<Sample>, area: Option<u64>, what: &str, log: &mut dyn FnMut(&str)) {
    let Some(area) = area else {
        return;
    };
    let before = samples.len();
    samples.retain(|s| s.size.0 as u64 * s.size.1 as u64 > area);
    if samples.len() < before {
        log(&format!(
            "{what}: {} pictures of at most {area} pixels left out (skip_image_resolution)",
            before - samples.len()
        ));
    }
}

/// `--data`'s folder and `--reg-data`'s, and what their scans left out.
fn folder_dataset(cfg: &TrainConfig, log: &mut dyn FnMut(&str)) -> Result<(Dataset, Vec<String>)> {
    let mut data = Dataset::scan(&cfg.data, &cfg.captions)?;
    skip_small(&mut data.samples, cfg.skip_image_area, "dataset", log);
    if data.is_empty() {
        return Err(Error::file(
            &cfg.data,
            "every picture is left out by --skip-image-resolution",
        ));
    }
    log(&format!(
        "dataset: {} images from {}{}",
        data.len(),
        cfg.data.display(),
        if data.epoch_len() != data.len() {
            format!(
                ", {} visits an epoch (kohya folder repeats)",
                data.epoch_len()
            )
        } else {
            String::new()
        }
    ));
    let mut warnings = std::mem::take(&mut data.warnings);
    if let Some(dir) = &cfg.reg_data {
        let mut reg = Dataset::scan(dir, &cfg.captions)?;
        skip_small(&mut reg.samples, cfg.skip_image_area, "regularization", log);
        warnings.extend(reg.warnings);
        let repeats: Vec<usize> = reg.samples.iter().map(|s| s.repeats).collect();
        let counts = prior_repeats(data.epoch_len(), &repeats);
        let unused = counts.iter().filter(|&&c| c == 0).count();
        let visits: usize = counts.iter().sum();
        for (mut s, n) in reg.samples.into_iter().zip(counts) {
            if n > 0 {
                s.repeats = n;
                s.role = Role::Prior;
                data.samples.push(s);
            }
        }
        log(&format!(
            "regularization: {} images from {}, {visits} visits an epoch (kohya's balance against \
             the training visits{}), prior loss weight {}",
            repeats.len() - unused,
            dir.display(),
            if unused > 0 {
                format!("; {unused} more images than needed, left unused")
            } else {
                String::new()
            },
            cfg.prior_loss_weight
        ));
    }
    Ok((data, warnings))
}

/// The pictures of a dataset config's subsets, each dataset's regularization subsets balanced
/// against its training visits as kohya balances them, and what the scans left out.
fn config_dataset(
    cfg: &TrainConfig,
    dc: &DatasetConfig,
    log: &mut dyn FnMut(&str),
) -> Result<(Dataset, Vec<String>)> {
    let mut samples = Vec::new();
    let mut warnings = Vec::new();
    let mut rules = 0;
    for (g, d) in dc.datasets.iter().enumerate() {
        let mut train = Vec::new();
        let mut reg = Vec::new();
        let mut sources: Vec<&Path> = Vec::new();
        for s in &d.subsets {
            let index = rules;
            rules += 1;
            // A DreamBooth subset's folder, a fine-tuning subset's metadata file.
            let source = match (&s.metadata_file, &s.image_dir) {
                (Some(m), _) | (None, Some(m)) => m.as_path(),
                (None, None) => {
                    return Err(Error::Config(format!(
                        "[[datasets]] {}: a subset has neither an image_dir nor a metadata_file",
                        g + 1
                    )))
                }
            };
            // kohya leaves out a dataset's second subset of one folder (or metadata file).
            if sources.contains(&source) {
                warnings.push(format!(
                    "left out {}: a second subset of [[datasets]] {} on it",
                    source.display(),
                    g + 1
                ));
                continue;
            }
            sources.push(source);
            let found = match &s.metadata_file {
                Some(m) => scan_metadata(m, s.image_dir.as_deref(), s.repeats, &s.captions)?,
                None => scan_pictures(
                    source,
                    s.repeats,
                    s.class_tokens.as_deref(),
                    &s.captions,
                    Some("a dataset config's image_dir is read without its sub-folders (kohya's)"),
                )?,
            };
            if found.samples.is_empty() {
                warnings.push(format!("left out {}: no pictures", source.display()));
            }
            warnings.extend(found.warnings);
            let part = match s.is_reg {
                true => &mut reg,
                false => &mut train,
            };
            part.extend(found.samples.into_iter().map(|p| Sample {
                rules: index,
                group: g,
                ..p
            }));
        }
        let what = format!("dataset {}", g + 1);
        skip_small(&mut train, d.group.skip_area, &what, log);
        skip_small(&mut reg, d.group.skip_area, &what, log);
        let visits: usize = train.iter().map(|s| s.repeats).sum();
        let group = &d.group;
        log(&format!(
            "dataset {}: {} images, {visits} visits an epoch, at {} px{}, batches of {}",
            g + 1,
            train.len(),
            group.resolution,
            match group.buckets {
                Bucketing::Off => "",
                Bucketing::Kstyle => " (buckets)",
                Bucketing::Kohya(k) if k.no_upscale => " (kohya's buckets, no upscale)",
                Bucketing::Kohya(_) => " (kohya's buckets)",
            },
            group.batch_size
        ));
        samples.extend(train);
        if !reg.is_empty() {
            let repeats: Vec<usize> = reg.iter().map(|s| s.repeats).collect();
            let counts = prior_repeats(visits, &repeats);
            let used = counts.iter().filter(|&&c| c > 0).count();
            log(&format!(
                "dataset {}: {used} regularization images of {}, {} visits an epoch (kohya's \
                 balance against its training visits), prior loss weight {}",
                g + 1,
                reg.len(),
                counts.iter().sum::<usize>(),
                cfg.prior_loss_weight
            ));
            for (s, n) in reg.into_iter().zip(counts).filter(|(_, n)| *n > 0) {
                samples.push(Sample {
                    repeats: n,
                    role: Role::Prior,
                    ..s
                });
            }
        }
    }
    if !samples.iter().any(|s| s.role == Role::Style) {
        return Err(Error::file(
            &cfg.data,
            "no training images found in the dataset config's subsets (regularization subsets \
             need training pictures to balance against)",
        ));
    }
    Ok((
        Dataset {
            samples,
            warnings: Vec::new(),
        },
        warnings,
    ))
}

/// What the caches give the trainer.
pub(super) struct Prepared {
    pub(super) examples: Vec<Example>,
    /// Each preview prompt's text and its negative's (runs whose text encoders are frozen).
    pub(super) samples: Vec<(ExampleText, Option<ExampleText>)>,
    /// The empty caption, with `--caption-dropout`.
    pub(super) empty: Option<ExampleText>,
}

/// Latent distributions and text embeddings for every sample (and the sample prompt), computed
/// through the cache; the VAE and text encoders load only if something is missing, and are
/// dropped before training starts.
pub(super) fn prepare_examples(
    cfg: &TrainConfig,
    files: &ModelFiles,
    data: &Dataset,
    log: &mut dyn FnMut(&str),
) -> Result<Prepared> {
    let cache = TensorCache::new(cfg.cache_dir.clone().unwrap_or_else(|| {
        cfg.out
            .parent()
            .unwrap_or(Path::new("."))
            .join(".kstyle-cache")
    }))?;
    let model_id = files.identity();
    let latent_id = files.latent_identity();
    // Each dataset's buckets (one without a dataset config).
    let groups = cfg.groups();
    let bucketers: Vec<Bucketer> = groups
        .iter()
        .map(|g| Bucketer::new(g.resolution, g.buckets))
        .collect();
    let rules: Vec<Arc<SubsetRules>> = cfg.all_rules().into_iter().map(Arc::new).collect();
    let live = cfg.live_captions();
    let mut vae = None;
    let mut text = None;
    let mut examples = Vec::with_capacity(data.len());
    let mut encode_text =
        |caption: &str, chunks: usize, weighted: bool| -> Result<BTreeMap<String, Tensor>> {
            let windows = format!("{chunks}-windows");
            let mut key = vec!["text", caption, &model_id];
            if chunks > 1 {
                key.push(&windows);
            }
            if weighted {
                key.push("weighted");
            }
            cache.get_or_insert(&TensorCache::key(&key), || {
                if text.is_none() {
                    let (te1, te2) = files.text_encoders(&[], DType::F32, cfg.device)?;
                    text = Some((te1, te2, files.tokenizers()?));
                }
                let (te1, te2, (tok1, tok2)) = text.as_ref().expect("just loaded");
                let (te1, tok1) = te1.as_ref().zip(tok1.as_ref()).ok_or_else(|| {
                    Error::Config("the model has no text_encoder: it cannot be trained".into())
                })?;
                crate::autograd::no_grad(|| {
                    let (ids_1, ids_2, weights) =
                        tokenized(tok1, tok2, &[caption], chunks, weighted, cfg.device)?; // (1, 77 n)
                    let (context, pooled) =
                        sdxl_conditioning(te1, te2, &ids_1, &ids_2, weights.as_ref())?;
                    Ok(vec![
                        ("context".to_string(), context),
                        ("pooled".to_string(), pooled),
                    ])
                })
            })
        };
    // A caption as the step reads it: token ids when the text encoders train, else their
    // (cached) outputs on the run's device, in `chunks` CLIP windows (preview prompts: one, as
    // generate reads them). `what` names it in errors.
    // `weighted`: kohya's --weighted-captions (training captions; preview prompts are read as
    // generate reads them).
    let mut text_of =
        |caption: &str, what: &str, chunks: usize, weighted: bool| -> Result<ExampleText> {
            if cfg.train_text_encoder {
                let (ids_1, ids_2, weights) =
                    caption_ids(files, caption, chunks, weighted, cfg.device)?;
                return Ok(ExampleText::Tokens {
                    ids_1,
                    ids_2,
                    weights,
                });
            }
            let txt = encode_text(caption, chunks, weighted)?;
            let get = |k: &str| -> Result<Tensor> {
                txt.get(k)
                    .cloned()
                    .ok_or_else(|| Error::msg(format!("cache entry for {what} lacks `{k}`")))?
                    .to_device(cfg.device)
            };
            Ok(ExampleText::Cached {
                context: get("context")?,
                pooled: get("pooled")?,
            })
        };
    let trigger = &cfg.captions.trigger;
    if cfg.weighted_captions && trigger.contains(['(', ')', '[', ']']) {
        log(&format!(
            "warning: --weighted-captions reads the brackets of the trigger \"{trigger}\" as \
             weights (\"[v]\" is v at 1/1.1); write them as \\( \\) \\[ \\] to keep them as text"
        ));
    }
    // Captions past their window (CLIP's, or --max-token-length's) train on its first tokens,
    // as diffusers' and kohya's scripts do; preview prompts keep generate's window.
    let (first, second) = files.tokenizers()?;
    let tokenizer = first.unwrap_or(second);
    let chunks = cfg.caption_chunks();
    let captions = data.samples.iter().map(|s| {
        let what = format!("the caption of {}", s.path.display());
        (what, &s.caption, chunks)
    });
    let sample = cfg.sample_prompts.iter().flat_map(|p| {
        std::iter::once(("the preview prompt".to_string(), &p.prompt, 1)).chain(
            p.negative
                .iter()
                .map(|n| ("the preview negative prompt".to_string(), n, 1)),
        )
    });
    for (what, text, n) in captions.chain(sample) {
        if let Some(cut) = tokenizer.cut_off_at(text, 75 * n)? {
            let window = match n {
                1 => "CLIP's 77 tokens".to_string(),
                n => format!("--max-token-length {}", 75 * n),
            };
            log(&format!(
                "warning: {what} is longer than {window}; the end is dropped: \"{cut}\""
            ));
        }
    }
    for s in &data.samples {
        // The loss mask's source: the alpha channel, or the mask picture of a --data picture.
        let (picture, alpha) = load_with_mask(&Reading::of(cfg), &s.path, s.role)?;
        let place = bucketers[s.group]
            .place(picture.width(), picture.height())
            .map_err(|m| Error::file(&s.path, m))?;
        let size = place.bucket;
        let subset = &rules[s.rules];
        let size_id = format!("{}x{}", size.0, size.1);
        // "upright": latents of pictures turned by their EXIF orientation (older caches encoded
        // them as stored).
        let mut parts = vec!["latent-upright", &s.hash, &size_id, &latent_id];
        // A picture scaled to other than the bucket's cover (kohya's no-upscale buckets).
        let cover = Placement::cover(picture.width(), picture.height(), size);
        let resized_id = format!("resized {}x{}", place.resized.0, place.resized.1);
        if place != cover {
            parts.push(&resized_id);
        }
        if cfg.vae_tiling {
            // Tiled encodes differ from whole ones.
            parts.push("tiled");
        }
        let text = match live {
            true => ExampleText::Caption(s.caption.clone()),
            false => text_of(
                &subset.fixed_caption(&s.caption),
                &s.path.display().to_string(),
                chunks,
                cfg.weighted_captions,
            )?,
        };
        // Validation pictures are scored as they are; a picture that covers its bucket exactly
        // has nowhere to move.
        let random_crop = subset.random_crop && place.slack() != (0, 0);
        let live = ((random_crop || subset.color_aug) && s.role != Role::Validation).then(|| {
            Arc::new(LivePicture {
                path: s.path.clone(),
                place,
                random_crop,
                color_aug: subset.color_aug,
            })
        });
        // The picture as the VAE sees it, plain or mirrored, through the cache.
        let mut example = |mirrored: bool| -> Result<Example> {
            let (img, crop) = training_tensor(&picture, place, mirrored, cfg.device)?;
            let mut parts = parts.clone();
            if mirrored {
                parts.push("mirrored");
            }
            let lat = cache.get_or_insert(&TensorCache::key(&parts), || {
                if vae.is_none() {
                    let mut v = files.vae(cfg.device)?;
                    v.tiling = cfg.vae_tiling;
                    vae = Some(v);
                }
                let (mean, logvar) =
                    crate::autograd::no_grad(|| vae.as_ref().expect("just loaded").encode(&img))?;
                Ok(vec![
                    ("mean".to_string(), mean),
                    ("logvar".to_string(), logvar),
                ])
            })?;
            let tid: Vec<f64> = crop.time_ids().iter().map(|&v| v as f64).collect();
            let get = |m: &BTreeMap<String, Tensor>, k: &str| -> Result<Tensor> {
                m.get(k)
                    .cloned()
                    .ok_or_else(|| {
                        Error::msg(format!("cache entry for {} lacks `{k}`", s.path.display()))
                    })?
                    .to_device(cfg.device)
            };
            Ok(Example {
                mean: get(&lat, "mean")?,
                logvar: get(&lat, "logvar")?,
                text: text.clone(),
                time_ids: Tensor::from_vec(tid, (1, 6), Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .to_device(cfg.device)?,
                repeats: s.repeats,
                role: s.role,
                mirror: None,
                mask: match cfg.masked_loss() {
                    true => Some(training_mask(alpha.as_ref(), place, mirrored, cfg.device)?),
                    false => None,
                },
                rules: subset.clone(),
                group: s.group,
                batch_size: groups[s.group].batch_size,
                live: live.clone(),
            })
        };
        let mut plain = example(false)?;
        // Validation pictures are scored as they are.
        if subset.flip_aug && s.role != Role::Validation {
            plain.mirror = Some(Box::new(example(true)?));
        }
        examples.push(plain);
    }
    if groups.iter().any(|g| g.buckets != Bucketing::Off) {
        // Pictures per bucket (width x height), as kohya lists them.
        let mut counts: Vec<((usize, usize), usize)> = Vec::new();
        for e in examples.iter().filter(|e| e.role != Role::Validation) {
            let d = e.mean.dims();
            let b = (d[3] * 8, d[2] * 8);
            match counts.iter_mut().find(|(k, _)| *k == b) {
                Some((_, n)) => *n += 1,
                None => counts.push((b, 1)),
            }
        }
        counts.sort_unstable();
        let list: Vec<String> = counts
            .iter()
            .map(|((w, h), n)| format!("{w}x{h}: {n}"))
            .collect();
        log(&format!("buckets (pictures each): {}", list.join(", ")));
    }
    // Previews of a run that trains the text encoders encode their prompts with them, live.
    let mut samples = Vec::new();
    if cfg.previews() && !cfg.train_text_encoder {
        for p in &cfg.sample_prompts {
            let negative = match &p.negative {
                Some(n) => Some(text_of(n, "a preview negative prompt", 1, false)?),
                None => None,
            };
            samples.push((text_of(&p.prompt, "a preview prompt", 1, false)?, negative));
        }
    }
    let empty = match (cfg.any_caption_dropout(), live) {
        (true, true) => Some(ExampleText::Caption(String::new())),
        // The empty caption weighs the same either way.
        (true, false) => Some(text_of("", "the dropped caption", chunks, false)?),
        (false, _) => None,
    };
    log(&format!(
        "caches ready in {} (text encoders {}, VAE {})",
        cache.dir.display(),
        if text.is_some() { "ran" } else { "not needed" },
        if vae.is_some() { "ran" } else { "not needed" }
    ));
    Ok(Prepared {
        examples,
        samples,
        empty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{tiny, TempDir};

    /// One visit of `ex`'s `live` picture, read now.
    fn visit_once(
        ex: &Example,
        live: &LivePicture,
        mirrored: bool,
        vae: &AutoencoderKL,
        read: &Reading,
        rng: &mut Rng,
    ) -> Example {
        let loaded = super::super::prefetch::load(live, read, ex.role).unwrap();
        live_visit(ex, live, mirrored, vae, read, rng, loaded).unwrap()
    }

    fn tiny_vae() -> AutoencoderKL {
        let files = ModelFiles::resolve(&tiny().join("sdxl"), None).unwrap();
        files.vae(Device::Cpu).unwrap()
    }

    /// Reading on the CPU, the alpha channel as the mask or no mask.
    fn cpu_reading(alpha_mask: bool) -> Reading {
        Reading {
            alpha_mask,
            mask_data: None,
            device: Device::Cpu,
        }
    }

    /// A picture 96x64 at bucket 64x64 (resized = itself, 32 columns of slack), and a 64x64
    /// example of it standing for the cached centre.
    fn wide_example(dir: &Path, alpha: bool) -> (RgbImage, Example) {
        let picture = RgbImage::from_fn(96, 64, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x * y) % 253) as u8])
        });
        let path = dir.join("wide.png");
        match alpha {
            true => image::RgbaImage::from_fn(96, 64, |x, y| {
                let p = picture.get_pixel(x, y).0;
                image::Rgba([p[0], p[1], p[2], if x < 40 { 0 } else { 255 }])
            })
            .save(&path)
            .unwrap(),
            false => picture.save(&path).unwrap(),
        }
        let place = Placement::cover(96, 64, (64, 64));
        assert_eq!((place.resized, place.slack()), ((96, 64), (32, 0)));
        let zeros = |shape: (usize, usize, usize, usize)| {
            Tensor::zeros(shape, DType::F32, Device::Cpu).unwrap()
        };
        let example = Example {
            mean: zeros((1, 4, 8, 8)),
            logvar: zeros((1, 4, 8, 8)),
            text: ExampleText::Caption("a [v] hall".into()),
            time_ids: zeros((1, 1, 1, 6)).reshape((1, 6)).unwrap(),
            repeats: 1,
            role: Role::Style,
            mirror: None,
            mask: None,
            rules: Arc::new(SubsetRules {
                flip_aug: true,
                random_crop: true,
                ..SubsetRules::default()
            }),
            group: 0,
            batch_size: 1,
            live: Some(Arc::new(LivePicture {
                path,
                place,
                random_crop: true,
                color_aug: false,
            })),
        };
        (picture, example)
    }

    #[test]
    fn each_visit_encodes_the_window_it_drew() {
        let dir = TempDir::new("random-crop");
        let (picture, ex) = wide_example(dir.path(), false);
        let crop = ex.live.clone().unwrap();
        let vae = tiny_vae();
        let read = cpu_reading(false);
        // The draws: the left edge over 0..=32, then the top over 0..=0 (one draw each).
        let mut rng = Rng::new(11);
        let mut expect = Rng::new(11);
        let mut lefts = Vec::new();
        for visit in 0..6 {
            let mirrored = visit % 2 == 1;
            let got = visit_once(&ex, &crop, mirrored, &vae, &read, &mut rng);
            let left = expect.below(33) as u32;
            assert_eq!(expect.below(1), 0);
            lefts.push(left);
            // Time ids: the original size, the window's place in the (mirrored) picture, the
            // bucket.
            let shown_left = if mirrored { 32 - left } else { left };
            assert_eq!(
                got.time_ids.to_vec_f32().unwrap(),
                [64.0, 96.0, 0.0, shown_left as f32, 64.0, 64.0],
                "visit {visit}"
            );
            // The latents: the VAE's encoding of exactly that window of the picture.
            let place = Placement {
                at: Some((left, 0)),
                ..crop.place
            };
            let (img, _) = training_tensor(&picture, place, mirrored, Device::Cpu).unwrap();
            let (mean, logvar) = crate::autograd::no_grad(|| vae.encode(&img)).unwrap();
            assert_eq!(got.mean.dims(), [1, 4, 8, 8]);
            assert_eq!(got.mean.to_vec_f32().unwrap(), mean.to_vec_f32().unwrap());
            assert_eq!(
                got.logvar.to_vec_f32().unwrap(),
                logvar.to_vec_f32().unwrap()
            );
            assert!(got.mask.is_none() && got.live.is_some());
        }
        lefts.dedup();
        assert!(lefts.len() > 1, "the window never moved: {lefts:?}");
        // The same draws give the same visit.
        let a = visit_once(&ex, &crop, false, &vae, &read, &mut Rng::new(3));
        let b = visit_once(&ex, &crop, false, &vae, &read, &mut Rng::new(3));
        assert_eq!(a.mean.to_vec_f32().unwrap(), b.mean.to_vec_f32().unwrap());
    }

    #[test]
    fn a_colour_visit_encodes_the_shifted_picture() {
        // Crop and colour draws together: the left edge, the top, then kohya's colour draw.
        let dir = TempDir::new("color-aug");
        let (picture, mut ex) = wide_example(dir.path(), false);
        let place = ex.live.as_ref().unwrap().place;
        let live = Arc::new(LivePicture {
            path: ex.live.as_ref().unwrap().path.clone(),
            place,
            random_crop: true,
            color_aug: true,
        });
        ex.live = Some(live.clone());
        let vae = tiny_vae();
        let read = cpu_reading(false);
        let (mut rng, mut expect) = (Rng::new(21), Rng::new(21));
        let mut kinds = std::collections::BTreeSet::new();
        for visit in 0..24 {
            let got = visit_once(&ex, &live, visit % 2 == 0, &vae, &read, &mut rng);
            let left = expect.below(33) as u32;
            expect.below(1);
            let color = ColorShift::draw(&mut expect);
            kinds.insert(format!("{color:?}").split('(').next().unwrap().to_string());
            let place = Placement {
                at: Some((left, 0)),
                ..place
            };
            let (img, _) =
                training_tensor_with(&picture, place, visit % 2 == 0, color, Device::Cpu).unwrap();
            let (mean, _) = crate::autograd::no_grad(|| vae.encode(&img)).unwrap();
            assert_eq!(
                got.mean.to_vec_f32().unwrap(),
                mean.to_vec_f32().unwrap(),
                "visit {visit}: {color:?}"
            );
        }
        // 24 visits drew all three kinds (plain, hue and gamma) with this seed.
        assert_eq!(kinds.len(), 3, "{kinds:?}");
    }

    #[test]
    fn a_cropped_visit_cuts_its_mask_with_the_picture() {
        // Alpha clear on the picture's first 40 columns: a window at left L masks its first
        // 40 - L columns, i.e. latent columns wholly inside them are 0 and those past them 1.
        let dir = TempDir::new("random-crop-mask");
        let (_, ex) = wide_example(dir.path(), true);
        let crop = ex.live.clone().unwrap();
        let vae = tiny_vae();
        let read = cpu_reading(true);
        let mut rng = Rng::new(5);
        for _ in 0..4 {
            let got = visit_once(&ex, &crop, false, &vae, &read, &mut rng);
            let left = got.time_ids.to_vec_f32().unwrap()[3] as usize;
            let clear = 40 - left; // window columns that are transparent
            let mask = got.mask.unwrap().to_vec_f32().unwrap(); // (1, 1, 8, 8)
            for (col, &m) in mask[..8].iter().enumerate() {
                let (lo, hi) = (col * 8, col * 8 + 8);
                if hi <= clear {
                    assert_eq!(m, 0.0, "left {left} column {col}");
                } else if lo >= clear {
                    assert_eq!(m, 1.0, "left {left} column {col}");
                }
            }
        }
    }
}
