//! kohya's dataset config (`--dataset_config`, a `.toml` or `.json` file): `[general]`
//! settings, over `[[datasets]]` (each with its own resolution, batch size and buckets), over
//! their `[[datasets.subsets]]` (an `image_dir` each, with its own repeats, class tokens,
//! regularization flag, caption files and per-visit caption rules). A value set lower wins; the
//! run's flags give what the file leaves unset, as kohya's command line does.
//!
//! As kohya, a subset's pictures sit directly in its `image_dir` (its `N_name` sub-folders are
//! not read), its class tokens caption the pictures that have no caption file, and a second
//! subset of one dataset on the same `image_dir` is left out. A subset with a `metadata_file` is
//! kohya's fine-tuning kind (see [`super::metadata`]). Every key kohya's schema accepts for
//! DreamBooth and fine-tuning datasets is read; those naming something kstyle does not do
//! (colour and crop augmentation, interpolation) are refused by name unless they hold kohya's
//! default, and so is any other key: kohya refuses unknown keys too. kohya's bucket keys pick
//! kohya's buckets (see [`super::buckets`]).

use super::buckets::{Bucketing, KohyaBuckets};
use super::captions::TokenWarmup;
use super::config::TrainConfig;
use super::data::CaptionSource;
use super::subsets::{Group, Names, SubsetRules};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A parsed dataset config.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetConfig {
    pub datasets: Vec<DatasetSpec>,
}

/// One `[[datasets]]`: its shared size and batching, and its subsets.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSpec {
    pub group: Group,
    pub subsets: Vec<SubsetSpec>,
}

/// One `[[datasets.subsets]]`: a folder of pictures and how they train.
#[derive(Clone, Debug, PartialEq)]
pub struct SubsetSpec {
    /// Relative paths are read from the config file's folder. A DreamBooth subset's pictures;
    /// with `metadata_file`, where its keys are looked up (optional).
    pub image_dir: Option<PathBuf>,
    /// kohya's fine-tuning subset: a metadata .json of picture keys with captions and tags
    /// (see [`super::metadata`]).
    pub metadata_file: Option<PathBuf>,
    /// Visits per epoch (`num_repeats`, 1 by default).
    pub repeats: usize,
    /// Captions the pictures without a caption file (`class_tokens`).
    pub class_tokens: Option<String>,
    /// Regularization pictures (`is_reg`), trained on the prior-preservation term.
    pub is_reg: bool,
    pub captions: CaptionSource,
    pub rules: SubsetRules,
}

impl DatasetConfig {
    /// Whether any subset holds regularization pictures.
    pub fn has_reg(&self) -> bool {
        self.datasets
            .iter()
            .any(|d| d.subsets.iter().any(|s| s.is_reg))
    }

    /// Every subset's rules, datasets in order, each dataset's subsets in order: a picture's
    /// `rules` index points here.
    pub fn rules(&self) -> Vec<SubsetRules> {
        self.datasets
            .iter()
            .flat_map(|d| d.subsets.iter().map(|s| s.rules.clone()))
            .collect()
    }

    /// Reads `cfg.data` as a dataset config into `cfg.dataset_config`, the run's flags giving
    /// every default; the settings kstyle applies to the whole run (`token_warmup_min` /
    /// `token_warmup_step`, `alpha_mask`) must then agree across subsets and replace the flags'.
    pub fn load_into(cfg: &mut TrainConfig) -> Result<()> {
        let path = cfg.data.clone();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let root: Value = match ext.as_deref() {
            Some("toml") => toml::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?,
            Some("json") => {
                serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?
            }
            _ => {
                return Err(Error::file(
                    &path,
                    "--data is a folder of pictures or a kohya dataset config (.toml or .json)",
                ))
            }
        };
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let defaults = Defaults {
            group: cfg.group(),
            kohya_buckets: cfg.kohya_buckets,
            rules: cfg.subset_rules(),
            captions: cfg.captions.clone(),
            token_warmup: cfg.token_warmup,
            alpha_mask: cfg.alpha_mask,
        };
        let parsed = parse(&root, &defaults, &base).map_err(|m| Error::file(&path, m))?;
        cfg.token_warmup = parsed.token_warmup;
        cfg.alpha_mask = parsed.alpha_mask;
        cfg.dataset_config = Some(parsed.config);
        Ok(())
    }
}

/// Keys of `[general]` and `[[datasets]]` only: one value for all of a dataset's subsets.
const DATASET_KEYS: [&str; 8] = [
    "batch_size",
    "resolution",
    "enable_bucket",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "min_bucket_reso",
    "max_bucket_reso",
    "skip_image_resolution",
];

/// Keys any level may set, a lower one winning.
const SUBSET_KEYS: [&str; 22] = [
    "num_repeats",
    "flip_aug",
    "shuffle_caption",
    "keep_tokens",
    "caption_prefix",
    "caption_suffix",
    "caption_separator",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_extension",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_min",
    "token_warmup_step",
    "alpha_mask",
    "color_aug",
    "random_crop",
    "face_crop_aug_range",
    "resize_interpolation",
    "cache_info",
];

/// Keys of `[[datasets.subsets]]` only.
const SUBSET_ONLY_KEYS: [&str; 4] = ["image_dir", "class_tokens", "is_reg", "metadata_file"];

/// What the run's flags set: the values of the keys a file leaves unset.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub group: Group,
    /// kohya's bucket flags, whether or not `--buckets` turned buckets on.
    pub kohya_buckets: Option<KohyaBuckets>,
    pub rules: SubsetRules,
    pub captions: CaptionSource,
    pub token_warmup: Option<TokenWarmup>,
    pub alpha_mask: bool,
}

/// What parsing gives: the config and the run-wide settings it decides.
#[derive(Debug)]
struct Parsed {
    config: DatasetConfig,
    token_warmup: Option<TokenWarmup>,
    alpha_mask: bool,
}

/// A subset's view of the file: its own table, its dataset's, `[general]`, lowest first.
struct Levels<'a> {
    tables: [&'a Map<String, Value>; 3],
    /// "[[datasets]] 2 [[datasets.subsets]] 1", for messages.
    at: String,
}

impl Levels<'_> {
    /// The value of `key` at the lowest level that sets it.
    fn get(&self, key: &str) -> Option<&Value> {
        self.tables.iter().find_map(|t| t.get(key))
    }

    fn err(&self, key: &str, m: impl std::fmt::Display) -> String {
        format!("{}: `{key}`: {m}", self.at)
    }

    fn bool(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn count(&self, key: &str, default: usize) -> std::result::Result<usize, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.err(
                    key,
                    format!("expected a whole number of 0 or more, got {v}"),
                )
            }),
        }
    }

    fn number(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn text(&self, key: &str) -> std::result::Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    /// A key kstyle reads only at kohya's default value `default` (None: only unset), `what`
    /// saying what kstyle does instead.
    fn only_default(
        &self,
        key: &str,
        default: Option<&Value>,
        what: &str,
    ) -> std::result::Result<(), String> {
        match self.get(key) {
            Some(v) if Some(v) != default => Err(self.err(key, format!("{v}: {what}"))),
            _ => Ok(()),
        }
    }
}

/// Every table of the file, checked for keys at the wrong level or unknown.
fn check_keys(
    table: &Map<String, Value>,
    level: &str,
    allowed: &[&[&str]],
) -> std::result::Result<(), String> {
    for key in table.keys() {
        if allowed.iter().any(|a| a.contains(&key.as_str())) {
            continue;
        }
        let m = if SUBSET_ONLY_KEYS.contains(&key.as_str()) {
            "belongs in a [[datasets.subsets]] table (one per image_dir)".to_string()
        } else if DATASET_KEYS.contains(&key.as_str()) {
            "is one value per dataset: set it in [general] or [[datasets]], not in a subset"
                .to_string()
        } else if ["validation_split", "validation_seed"].contains(&key.as_str()) {
            "kstyle holds pictures out with --val-data DIR instead".to_string()
        } else {
            format!(
                "not a dataset config key kstyle reads (kohya's DreamBooth keys: {}, {} and, per \
                 subset, {})",
                DATASET_KEYS.join(", "),
                SUBSET_KEYS.join(", "),
                SUBSET_ONLY_KEYS.join(", ")
            )
        };
        return Err(format!("{level}: `{key}` {m}"));
    }
    Ok(())
}

fn table<'a>(v: &'a Value, what: &str) -> std::result::Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what} must be a table, got {v}"))
}

fn tables<'a>(
    v: Option<&'a Value>,
    what: &str,
) -> std::result::Result<Vec<&'a Map<String, Value>>, String> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|t| table(t, what)).collect(),
        Some(v) => Err(format!("{what} must be an array of tables, got {v}")),
    }
}

fn parse(root: &Value, cfg: &Defaults, base: &Path) -> std::result::Result<Parsed, String> {
    let root = table(root, "the file")?;
    for key in root.keys() {
        if key != "general" && key != "datasets" {
            return Err(format!(
                "`{key}`: a dataset config holds [general] and [[datasets]] (with their \
                 [[datasets.subsets]]); set it in one of those"
            ));
        }
    }
    let empty = Map::new();
    let general = match root.get("general") {
        Some(g) => table(g, "[general]")?,
        None => &empty,
    };
    check_keys(general, "[general]", &[&DATASET_KEYS, &SUBSET_KEYS])?;
    let datasets = tables(root.get("datasets"), "[[datasets]]")?;
    if datasets.is_empty() {
        return Err(
            "no [[datasets]]: each lists its pictures in [[datasets.subsets]] tables".into(),
        );
    }
    let mut out = Vec::new();
    // The run-wide settings, with the first subset that set them.
    let mut warmup: Option<(Option<TokenWarmup>, String)> = None;
    let mut alpha: Option<(bool, String)> = None;
    for (d, dataset) in datasets.iter().enumerate() {
        let at_d = format!("[[datasets]] {}", d + 1);
        check_keys(dataset, &at_d, &[&DATASET_KEYS, &SUBSET_KEYS, &["subsets"]])?;
        let subsets = tables(dataset.get("subsets"), &format!("{at_d} subsets"))?;
        if subsets.is_empty() {
            return Err(format!(
                "{at_d}: no [[datasets.subsets]] (an image_dir each)"
            ));
        }
        let group_levels = Levels {
            tables: [&empty, dataset, general],
            at: at_d.clone(),
        };
        let group = dataset_group(&group_levels, cfg)?;
        let mut specs = Vec::new();
        for (s, subset) in subsets.iter().enumerate() {
            let at = format!("{at_d} [[datasets.subsets]] {}", s + 1);
            check_keys(subset, &at, &[&SUBSET_KEYS, &SUBSET_ONLY_KEYS])?;
            let l = Levels {
                tables: [subset, dataset, general],
                at: at.clone(),
            };
            let spec = subset_spec(&l, cfg, base)?;
            let w = token_warmup(&l, cfg)?;
            match &warmup {
                Some((first, by)) if *first != w => {
                    return Err(l.err(
                        "token_warmup_step",
                        format!(
                            "kstyle warms the tokens up for the whole run, and {by} sets it \
                             otherwise: give every subset the same token_warmup_min and \
                             token_warmup_step"
                        ),
                    ))
                }
                Some(_) => {}
                None => warmup = Some((w, at.clone())),
            }
            let a = l.bool("alpha_mask", cfg.alpha_mask)?;
            match &alpha {
                Some((first, by)) if *first != a => {
                    return Err(l.err(
                        "alpha_mask",
                        format!(
                            "kstyle masks the loss for the whole run, and {by} sets it \
                             otherwise: give every subset the same alpha_mask"
                        ),
                    ))
                }
                Some(_) => {}
                None => alpha = Some((a, at.clone())),
            }
            spec.rules
                .check(w, Names::ConfigKeys)
                .map_err(|m| format!("{at}: {m}"))?;
            specs.push(spec);
        }
        out.push(DatasetSpec {
            group,
            subsets: specs,
        });
    }
    Ok(Parsed {
        config: DatasetConfig { datasets: out },
        token_warmup: warmup.and_then(|w| w.0),
        alpha_mask: alpha.is_some_and(|a| a.0),
    })
}

/// A dataset's resolution, batch size and buckets.
fn dataset_group(l: &Levels, cfg: &Defaults) -> std::result::Result<Group, String> {
    let resolution = match l.get("resolution") {
        None => cfg.group.resolution,
        Some(v) => {
            let side = |v: &Value| v.as_u64().map(|n| n as usize);
            let r = match v {
                Value::Array(a) if a.len() == 2 => match (side(&a[0]), side(&a[1])) {
                    (Some(w), Some(h)) if w == h => Some(w),
                    (Some(_), Some(_)) => {
                        return Err(l.err(
                            "resolution",
                            format!(
                                "{v}: kstyle trains square sides (the buckets' area with \
                                 enable_bucket); give one number"
                            ),
                        ))
                    }
                    _ => None,
                },
                v => side(v),
            };
            r.ok_or_else(|| {
                l.err(
                    "resolution",
                    format!("expected a side or [width, height], got {v}"),
                )
            })?
        }
    };
    if resolution == 0 || resolution % 8 != 0 {
        return Err(l.err(
            "resolution",
            format!("must be a positive multiple of 8, got {resolution}"),
        ));
    }
    let batch_size = l.count("batch_size", cfg.group.batch_size)?;
    if batch_size == 0 {
        return Err(l.err("batch_size", "must be at least 1"));
    }
    let enabled = l.bool("enable_bucket", cfg.group.buckets != Bucketing::Off)?;
    // Any of kohya's bucket keys (or flags) picks kohya's buckets, its defaults for the rest;
    // without enable_bucket they do nothing, as in kohya.
    let keys = [
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
    ];
    let kohya = match (keys.iter().any(|k| l.get(k).is_some()), cfg.kohya_buckets) {
        (false, None) => None,
        (_, flags) => {
            let d = flags.unwrap_or_default();
            Some(KohyaBuckets {
                min: l.count("min_bucket_reso", d.min)?,
                max: l.count("max_bucket_reso", d.max)?,
                steps: l.count("bucket_reso_steps", d.steps)?,
                no_upscale: l.bool("bucket_no_upscale", d.no_upscale)?,
            })
        }
    };
    let buckets = match (enabled, kohya) {
        (false, _) => Bucketing::Off,
        (true, None) => Bucketing::Kstyle,
        (true, Some(k)) => {
            k.check(resolution, Names::ConfigKeys)
                .map_err(|m| format!("{}: {m}", l.at))?;
            Bucketing::Kohya(k)
        }
    };
    let skip_area = match l.get("skip_image_resolution") {
        None => cfg.group.skip_area,
        Some(v) => {
            let side = |v: &Value| v.as_u64();
            let area = match v {
                Value::Array(a) if a.len() == 2 => side(&a[0]).zip(side(&a[1])).map(|(w, h)| w * h),
                v => side(v).map(|n| n * n),
            };
            Some(area.ok_or_else(|| {
                l.err(
                    "skip_image_resolution",
                    format!("expected a side or [width, height], got {v}"),
                )
            })?)
        }
    };
    Ok(Group {
        resolution,
        batch_size,
        buckets,
        skip_area,
    })
}

/// The run's token warm-up as one subset's levels (or the flags) set it; 0 steps is off.
fn token_warmup(l: &Levels, cfg: &Defaults) -> std::result::Result<Option<TokenWarmup>, String> {
    let steps = match l.number("token_warmup_step")? {
        Some(s) => s,
        None => cfg.token_warmup.map_or(0.0, |w| w.steps),
    };
    let min = l.count("token_warmup_min", cfg.token_warmup.map_or(1, |w| w.min))?;
    if !(steps.is_finite() && steps >= 0.0) {
        return Err(l.err(
            "token_warmup_step",
            format!("must be 0 (off) or a positive number of steps, got {steps}"),
        ));
    }
    Ok((steps != 0.0).then_some(TokenWarmup { min, steps }))
}

/// One subset, its unset keys from its dataset, `[general]` and the run's flags.
fn subset_spec(l: &Levels, cfg: &Defaults, base: &Path) -> std::result::Result<SubsetSpec, String> {
    let flags = &cfg.rules;
    let metadata_file = l.text("metadata_file")?.map(|m| base.join(m));
    if metadata_file.is_some() {
        // kohya's fine-tuning subsets have neither.
        for key in ["class_tokens", "is_reg"] {
            if l.get(key).is_some() {
                return Err(l.err(
                    key,
                    "a fine-tuning subset (metadata_file) takes its captions from the metadata \
                     and holds no regularization pictures",
                ));
            }
        }
    }
    let image_dir = l.text("image_dir")?.map(|d| base.join(d));
    if image_dir.is_none() && metadata_file.is_none() {
        return Err(format!(
            "{}: `image_dir` is required (the subset's pictures), or a `metadata_file`",
            l.at
        ));
    }
    let repeats = l.count("num_repeats", 1)?;
    if repeats == 0 {
        return Err(l.err("num_repeats", "must be at least 1"));
    }
    l.only_default(
        "face_crop_aug_range",
        None,
        "face crops are not implemented",
    )?;
    l.only_default(
        "resize_interpolation",
        None,
        "kstyle resizes with Pillow's bicubic filter, as diffusers' training scripts do",
    )?;
    // kohya's cache of image sizes and captions; kstyle caches latents by content anyway.
    l.bool("cache_info", false)?;
    let probability =
        |key: &str, default: Option<f64>| -> std::result::Result<Option<f64>, String> {
            // 0 is off, as on the command line.
            Ok(l.number(key)?.map_or(default, |p| (p != 0.0).then_some(p)))
        };
    let rules = SubsetRules {
        flip_aug: l.bool("flip_aug", flags.flip_aug)?,
        random_crop: l.bool("random_crop", flags.random_crop)?,
        color_aug: l.bool("color_aug", flags.color_aug)?,
        caption_dropout: probability("caption_dropout_rate", flags.caption_dropout)?,
        caption_dropout_every_epochs: match l.get("caption_dropout_every_n_epochs") {
            None => flags.caption_dropout_every_epochs,
            Some(_) => {
                Some(l.count("caption_dropout_every_n_epochs", 0)? as u64).filter(|&n| n != 0)
            }
        },
        shuffle_caption: l.bool("shuffle_caption", flags.shuffle_caption)?,
        keep_tokens: l.count("keep_tokens", flags.keep_tokens)?,
        caption_tag_dropout: probability("caption_tag_dropout_rate", flags.caption_tag_dropout)?,
        caption_separator: l
            .text("caption_separator")?
            .unwrap_or_else(|| flags.caption_separator.clone()),
        keep_tokens_separator: l
            .text("keep_tokens_separator")?
            .or_else(|| flags.keep_tokens_separator.clone()),
        secondary_separator: l
            .text("secondary_separator")?
            .or_else(|| flags.secondary_separator.clone()),
        wildcard: l.bool("enable_wildcard", flags.wildcard)?,
    };
    let defaults = &cfg.captions;
    let captions = CaptionSource {
        extension: match l.text("caption_extension")? {
            Some(e) => e.trim_start_matches('.').to_string(),
            None => defaults.extension.clone(),
        },
        prefix: l
            .text("caption_prefix")?
            .or_else(|| defaults.prefix.clone()),
        suffix: l
            .text("caption_suffix")?
            .or_else(|| defaults.suffix.clone()),
        wildcard: rules.wildcard,
        ..defaults.clone()
    };
    if captions.extension.is_empty() {
        return Err(l.err("caption_extension", "must not be empty"));
    }
    Ok(SubsetSpec {
        image_dir,
        metadata_file,
        repeats,
        class_tokens: l.text("class_tokens")?,
        is_reg: l.bool("is_reg", false)?,
        captions,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            group: Group {
                resolution: 1024,
                batch_size: 1,
                buckets: Bucketing::Off,
                skip_area: None,
            },
            kohya_buckets: None,
            rules: SubsetRules {
                caption_dropout: Some(0.1),
                ..SubsetRules::default()
            },
            captions: CaptionSource {
                template: None,
                trigger: "[v]".into(),
                extension: "caption".into(),
                prefix: None,
                suffix: None,
                wildcard: false,
            },
            token_warmup: None,
            alpha_mask: false,
        }
    }

    fn read(text: &str) -> std::result::Result<Parsed, String> {
        let root: Value = toml::from_str(text).map_err(|e| e.to_string())?;
        parse(&root, &defaults(), Path::new("/base"))
    }

    /// kohya's README example (its fine-tuning subset given plain pictures): a subset's value
    /// wins over its dataset's, which wins over [general]'s, which wins over the flags'.
    const KOHYA_EXAMPLE: &str = r#"
        [general]
        shuffle_caption = true
        caption_extension = '.txt'
        keep_tokens = 1

        [[datasets]]
        resolution = 512
        batch_size = 4
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = 'hoge'
          class_tokens = 'hoge girl'

          [[datasets.subsets]]
          image_dir = '/data/fuga'
          class_tokens = 'fuga boy'
          keep_tokens = 3
          caption_dropout_rate = 0

          [[datasets.subsets]]
          is_reg = true
          image_dir = 'reg'
          class_tokens = 'human'
          keep_tokens = 1
          num_repeats = 3

        [[datasets]]
        resolution = [768, 768]
        skip_image_resolution = [512, 768]
        batch_size = 2
        enable_bucket = true
        flip_aug = true

          [[datasets.subsets]]
          image_dir = 'piyo'
          metadata_file = 'piyo/piyo_md.json'
    "#;

    #[test]
    fn lower_levels_win_and_the_flags_fill_the_rest() {
        let p = read(KOHYA_EXAMPLE).unwrap();
        let d = &p.config.datasets;
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].group,
            Group {
                resolution: 512,
                batch_size: 4,
                buckets: Bucketing::Off,
                skip_area: None
            }
        );
        assert_eq!(
            d[1].group,
            Group {
                resolution: 768,
                batch_size: 2,
                buckets: Bucketing::Kstyle,
                skip_area: Some(512 * 768)
            }
        );
        let keep: Vec<usize> = p.config.rules().iter().map(|r| r.keep_tokens).collect();
        assert_eq!(keep, [2, 3, 1, 1]);
        assert!(p.config.rules().iter().all(|r| r.shuffle_caption));
        let flip: Vec<bool> = p.config.rules().iter().map(|r| r.flip_aug).collect();
        assert_eq!(flip, [false, false, false, true]);
        // 0 turns the flag's caption dropout off for that subset alone.
        let drop: Vec<Option<f64>> = p.config.rules().iter().map(|r| r.caption_dropout).collect();
        assert_eq!(drop, [Some(0.1), None, Some(0.1), Some(0.1)]);
        let s = &d[0].subsets;
        assert_eq!(s[0].image_dir.as_deref(), Some(Path::new("/base/hoge")));
        assert_eq!(s[1].image_dir.as_deref(), Some(Path::new("/data/fuga")));
        assert_eq!(
            d[1].subsets[0].metadata_file.as_deref(),
            Some(Path::new("/base/piyo/piyo_md.json"))
        );
        assert_eq!(s[0].class_tokens.as_deref(), Some("hoge girl"));
        assert_eq!((s[2].is_reg, s[2].repeats), (true, 3));
        assert_eq!((s[0].is_reg, s[0].repeats), (false, 1));
        assert_eq!(s[0].captions.extension, "txt");
        assert_eq!(d[1].subsets[0].captions.extension, "txt");
        assert!(p.config.has_reg());
        assert_eq!((p.token_warmup, p.alpha_mask), (None, false));
    }

    /// Any of kohya's bucket keys picks kohya's buckets, kohya's defaults filling the others;
    /// enable_bucket alone keeps kstyle's; without enable_bucket the keys do nothing.
    #[test]
    fn kohya_bucket_keys_pick_kohya_buckets() {
        let group = |general: &str| {
            let text = format!(
                "[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'"
            );
            read(&text).unwrap().config.datasets[0].group.buckets
        };
        assert_eq!(
            group("enable_bucket = true\nbucket_no_upscale = true\nmax_bucket_reso = 2048"),
            Bucketing::Kohya(KohyaBuckets {
                min: 256,
                max: 2048,
                steps: 64,
                no_upscale: true
            })
        );
        assert_eq!(
            group("enable_bucket = true\nbucket_reso_steps = 32"),
            Bucketing::Kohya(KohyaBuckets {
                steps: 32,
                ..KohyaBuckets::default()
            })
        );
        assert_eq!(group("enable_bucket = true"), Bucketing::Kstyle);
        assert_eq!(group("bucket_no_upscale = true"), Bucketing::Off);
    }

    /// The same settings written as JSON read the same.
    #[test]
    fn json_reads_as_toml() {
        let root: Value = toml::from_str(KOHYA_EXAMPLE).unwrap();
        let json = serde_json::to_string(&root).unwrap();
        let root: Value = serde_json::from_str(&json).unwrap();
        let from_json = parse(&root, &defaults(), Path::new("/base")).unwrap();
        assert_eq!(from_json.config, read(KOHYA_EXAMPLE).unwrap().config);
    }

    #[test]
    fn run_wide_settings_must_agree() {
        let p = read(
            "[general]\ntoken_warmup_step = 10\ntoken_warmup_min = 2\nalpha_mask = true\n\
             shuffle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n\
             [[datasets.subsets]]\nimage_dir = 'b'",
        )
        .unwrap();
        assert_eq!(
            p.token_warmup,
            Some(TokenWarmup {
                min: 2,
                steps: 10.0
            })
        );
        assert!(p.alpha_mask);
        let e = read(
            "[[datasets]]\nshuffle_caption = true\n[[datasets.subsets]]\nimage_dir = 'a'\n\
             [[datasets.subsets]]\nimage_dir = 'b'\ntoken_warmup_step = 5",
        )
        .unwrap_err();
        assert!(
            e.contains("[[datasets.subsets]] 2: `token_warmup_step`")
                && e.contains("[[datasets]] 1 [[datasets.subsets]] 1 sets it otherwise"),
            "{e}"
        );
    }

    /// Every refusal names where, and what.
    #[test]
    fn refusals_name_the_table_and_the_key() {
        let subset =
            |extra: &str| format!("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n{extra}");
        for (text, needle) in [
            (subset("colour_aug = true"), "[[datasets.subsets]] 1: `colour_aug` not a dataset config key"),
            (subset("batch_size = 2"), "`batch_size` is one value per dataset"),
            ("[general]\nimage_dir = 'a'\n".into(), "[general]: `image_dir` belongs in a [[datasets.subsets]]"),
            (subset("color_aug = 'yes'"), "`color_aug`: expected true or false"),
            (subset("random_crop = 1"), "`random_crop`: expected true or false"),
            (subset("metadata_file = 'm.json'\nis_reg = true"), "`is_reg`: a fine-tuning subset (metadata_file) takes its captions"),
            (subset("num_repeats = 0"), "`num_repeats`: must be at least 1"),
            (subset("num_repeats = -2"), "`num_repeats`: expected a whole number"),
            (subset("flip_aug = 'yes'"), "`flip_aug`: expected true or false"),
            (subset("keep_tokens = 1"), "keep_tokens keeps tags in place when shuffle_caption reorders them or caption_tag_dropout_rate drops them"),
            (subset("caption_tag_dropout_rate = 1.5"), "caption_tag_dropout_rate is a probability from 0 to 1, got 1.5"),
            (subset("validation_split = 0.1"), "`validation_split` kstyle holds pictures out with --val-data"),
            ("[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'x'\n".into(), "[[datasets]] 1 [[datasets.subsets]] 1: `image_dir` is required (the subset's pictures), or a `metadata_file`"),
            ("[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "[[datasets]] 1: `resolution`: [512,768]: kstyle trains square sides"),
            ("[[datasets]]\nresolution = 500\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "must be a positive multiple of 8, got 500"),
            ("[[datasets]]\nenable_bucket = true\nbucket_reso_steps = 12\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "[[datasets]] 1: bucket_reso_steps must be a positive multiple of 8, got 12"),
            ("[[datasets]]\nenable_bucket = true\nmax_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "max_bucket_reso 512 must satisfy min <= max and max >= the resolution 1024"),
            ("[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 300\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "min_bucket_reso must be a positive multiple of bucket_reso_steps 64, got 300"),
            ("[[datasets]]\nbucket_no_upscale = 1\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "`bucket_no_upscale`: expected true or false"),
            ("[[datasets]]\nskip_image_resolution = 'big'\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "`skip_image_resolution`: expected a side or [width, height]"),
            ("[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = 'a'\n".into(), "`batch_size`: must be at least 1"),
            ("[[datasets]]\n".into(), "[[datasets]] 1: no [[datasets.subsets]]"),
            ("[general]\nflip_aug = true\n".into(), "no [[datasets]]"),
            ("[trainer]\nlr = 1\n".into(), "`trainer`: a dataset config holds [general] and [[datasets]]"),
        ] {
            let e = read(&text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(e.contains(needle), "{text}\n -> {e}\n wanted {needle}");
        }
        // kohya's defaults are accepted where kstyle does the same.
        read(&subset(
            "color_aug = false\nrandom_crop = false\ncache_info = true",
        ))
        .unwrap();
        // random_crop per subset, over [general]'s (the flags' default is off).
        let p = read(
            "[general]\nrandom_crop = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n\
             [[datasets.subsets]]\nimage_dir = 'b'\nrandom_crop = false\n",
        )
        .unwrap();
        let crop: Vec<bool> = p.config.rules().iter().map(|r| r.random_crop).collect();
        assert_eq!(crop, [true, false]);
        let p = read(&subset("color_aug = true")).unwrap();
        assert!(p.config.rules()[0].color_aug);
        read(
            "[general]\nbucket_reso_steps = 64\nbucket_no_upscale = false\n[[datasets]]\n\
              [[datasets.subsets]]\nimage_dir = 'a'",
        )
        .unwrap();
    }
}
