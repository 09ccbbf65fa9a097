//! The training examples: every picture's VAE posterior and every caption's conditioning,
//! computed once through the tensor cache.

use super::buckets::{Bucketer, Bucketing, Placement};
use super::data::{
    load_training_picture, load_training_picture_alpha, mask_picture, prior_repeats, scan_pictures,
    training_mask, training_tensor, Dataset, Role, Sample, TensorCache,
};
use super::dataset_config::DatasetConfig;
use super::metadata::scan_metadata;
use super::subsets::SubsetRules;
use super::text::{caption_ids, sdxl_conditioning, tokenized};
use super::trainer::TrainConfig;
use crate::sample::model_files::ModelFiles;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
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
        let (picture, alpha) = match (cfg.alpha_mask, &cfg.mask_data) {
            (true, _) => load_training_picture_alpha(&s.path)?,
            (false, Some(dir)) if s.role == Role::Style => {
                let picture = load_training_picture(&s.path)?;
                let mask = mask_picture(dir, &s.path, picture.dimensions())?;
                (picture, Some(mask))
            }
            _ => (load_training_picture(&s.path)?, None),
        };
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
