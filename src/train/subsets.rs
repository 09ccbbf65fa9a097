//! What a picture's subset and dataset decide about its training: kohya sets these per
//! `[[datasets.subsets]]` (flip, caption dropout, tag rewriting) and per `[[datasets]]`
//! (resolution, batch size, buckets) in a dataset config; without one, the run's flags set
//! them for every picture.

use super::buckets::Bucketing;
use super::captions::{TagRules, TokenWarmup};

/// How the pictures of one subset are visited: flipped, their captions dropped and rewritten.
#[derive(Clone, Debug, PartialEq)]
pub struct SubsetRules {
    /// Mirror the picture with probability 1/2 on each visit (kohya's `flip_aug`).
    pub flip_aug: bool,
    /// Cut the bucket's window from a random place of the scaled picture on each visit
    /// (kohya's `random_crop`), instead of its centre: such pictures are encoded by the VAE at
    /// every visit.
    pub random_crop: bool,
    /// Shift each visit's colours as kohya's `color_aug` does (a third of the visits: a hue
    /// rotation or a gamma; see [`crate::image::color_aug`]): such pictures are encoded by the
    /// VAE at every visit.
    pub color_aug: bool,
    /// Train a visit on the empty caption with this probability (`caption_dropout_rate`).
    pub caption_dropout: Option<f64>,
    /// Every caption of every Nth epoch drops out (`caption_dropout_every_n_epochs`).
    pub caption_dropout_every_epochs: Option<u64>,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    /// Each movable tag dropped with this probability (`caption_tag_dropout_rate`).
    pub caption_tag_dropout: Option<f64>,
    pub caption_separator: String,
    pub keep_tokens_separator: Option<String>,
    pub secondary_separator: Option<String>,
    /// kohya's `enable_wildcard`: one line and one `{a|b}` option chosen per visit.
    pub wildcard: bool,
}

/// The names a check's messages use: the command line's flags or a dataset config's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    Flags,
    ConfigKeys,
}

impl Names {
    /// `flag` (e.g. "keep-tokens") as the user wrote it: `--keep-tokens` or `keep_tokens`.
    fn of(self, flag: &str) -> String {
        match self {
            Names::Flags => format!("--{flag}"),
            Names::ConfigKeys => match flag {
                "caption-dropout" => "caption_dropout_rate".into(),
                "caption-tag-dropout" => "caption_tag_dropout_rate".into(),
                f => f.replace('-', "_"),
            },
        }
    }
}

impl Default for SubsetRules {
    /// kohya's subset defaults: nothing flipped, cut, shifted, dropped or rewritten; tags
    /// separated by commas.
    fn default() -> SubsetRules {
        SubsetRules {
            flip_aug: false,
            random_crop: false,
            color_aug: false,
            caption_dropout: None,
            caption_dropout_every_epochs: None,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_tag_dropout: None,
            caption_separator: ",".into(),
            keep_tokens_separator: None,
            secondary_separator: None,
            wildcard: false,
        }
    }
}

impl SubsetRules {
    /// How each visit rewrites a caption (see [`super::captions`]); the token warm-up is the
    /// run's.
    pub fn tag_rules(&self, warmup: Option<TokenWarmup>) -> TagRules<'_> {
        TagRules {
            separator: &self.caption_separator,
            keep: self.keep_tokens,
            keep_separator: self.keep_tokens_separator.as_deref(),
            secondary: self.secondary_separator.as_deref(),
            shuffle: self.shuffle_caption,
            drop: self.caption_tag_dropout,
            wildcard: self.wildcard,
            warmup,
        }
    }

    /// Whether captions are rewritten per visit (so encoded every step, not cached).
    pub fn live(&self, warmup: Option<TokenWarmup>) -> bool {
        self.tag_rules(warmup).moves_tags() || self.wildcard
    }

    /// Whether captions ever drop out to the empty one.
    pub fn drops(&self) -> bool {
        self.caption_dropout.is_some() || self.caption_dropout_every_epochs.is_some()
    }

    /// A caption as it is cached when captions are not rewritten per visit: the secondary
    /// separator turned into the separator, as kohya does on every caption.
    pub fn fixed_caption(&self, caption: &str) -> String {
        match &self.secondary_separator {
            Some(s) => caption.replace(s.as_str(), &self.caption_separator),
            None => caption.to_string(),
        }
    }

    /// Settings that cannot act or are out of range, in `names`' words.
    pub fn check(&self, warmup: Option<TokenWarmup>, names: Names) -> Result<(), String> {
        let n = |f: &str| names.of(f);
        for (p, flag) in [
            (self.caption_dropout, "caption-dropout"),
            (self.caption_tag_dropout, "caption-tag-dropout"),
        ] {
            if let Some(p) = p.filter(|p| !(0.0..=1.0).contains(p)) {
                return Err(format!("{} is a probability from 0 to 1, got {p}", n(flag)));
            }
        }
        if self.caption_separator.is_empty() {
            return Err(format!("{} must not be empty", n("caption-separator")));
        }
        if let Some(s) = &self.secondary_separator {
            if s.is_empty() || s.contains(self.caption_separator.as_str()) {
                return Err(format!(
                    "{} `{s}` must be a non-empty string without the caption separator `{}` in \
                     it",
                    n("secondary-separator"),
                    self.caption_separator
                ));
            }
        }
        let moves = self.tag_rules(warmup).moves_tags();
        let movers = format!(
            "{} reorders them or {} drops them: pass one of those",
            n("shuffle-caption"),
            n("caption-tag-dropout")
        );
        if let Some(k) = &self.keep_tokens_separator {
            if k.is_empty() || !moves {
                return Err(format!(
                    "{} fixes the tags around it when {movers} (and a non-empty separator)",
                    n("keep-tokens-separator")
                ));
            }
        }
        if self.keep_tokens > 0 && !moves {
            return Err(format!(
                "{} keeps tags in place when {movers}",
                n("keep-tokens")
            ));
        }
        Ok(())
    }
}

/// What the pictures of one dataset share: the size they train at and how they are batched
/// (kohya's per-`[[datasets]]` settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Square training side (the buckets' area with `buckets`).
    pub resolution: usize,
    /// Pictures per micro-batch.
    pub batch_size: usize,
    /// Square crops, kstyle's buckets or kohya's.
    pub buckets: Bucketing,
    /// kohya's `skip_image_resolution`, as an area: pictures of at most this many pixels are
    /// left out.
    pub skip_area: Option<u64>,
}
