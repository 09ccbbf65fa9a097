//! kohya's caption options through the real binary on the tiny model: --caption-prefix,
//! --caption-suffix, --caption-separator, --keep-tokens-separator, --secondary-separator,
//! --enable-wildcard, the token warm-up and --caption-dropout-every-n-epochs. The rewriting
//! itself is unit-tested in src/train/captions.rs; here: the options equal editing the caption
//! files where they are fixed, rewriting runs resume exactly, and bad combinations are refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, tensors, train_ok};
use std::path::{Path, PathBuf};

/// [`dataset`]'s pictures with `captions` (file name, caption file text) instead of theirs.
fn recaptioned(dir: &Path, name: &str, captions: &[(&str, &str)]) -> PathBuf {
    let data = dataset(&dir.join(name));
    for (file, text) in captions {
        std::fs::write(data.join(file), text).unwrap();
    }
    data
}

/// A prefix, a suffix, a second caption line and a secondary separator, on cached captions, train
/// exactly what caption files holding the resulting text train: kohya reads the first line,
/// joins the prefix and suffix with spaces and turns the secondary separator into the
/// separator. The template caption (c.png's) gets the prefix and suffix too.
#[test]
fn fixed_caption_options_equal_editing_the_captions() {
    let dir = tmp("caption-options");
    let run = |data: &Path, name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        train_ok(
            data,
            &out,
            "lora",
            &[&["--max-steps", "2"][..], extra].concat(),
        )
    };
    let options = recaptioned(
        &dir,
        "options",
        &[
            ("a.txt", "a {trigger};;palace\nan unused second line"),
            ("b.txt", "a woman in a {trigger} dress"),
        ],
    );
    let edited = recaptioned(
        &dir,
        "edited",
        &[
            ("a.txt", "best a [v],palace at night"),
            ("b.txt", "best a woman in a [v] dress at night"),
            ("c.txt", "best a [v] landscape at night"),
        ],
    );
    let with = run(
        &options,
        "with",
        &[
            "--caption-prefix",
            "best",
            "--caption-suffix",
            "at night",
            "--secondary-separator",
            ";;",
        ],
    );
    let by_hand = run(&edited, "by-hand", &[]);
    assert!(
        tensors(&with) == tensors(&by_hand),
        "the caption options differ from the edited captions"
    );
    let plain = run(&options, "plain", &[]);
    assert!(
        tensors(&plain) != tensors(&with),
        "the options changed nothing"
    );
}

/// Wildcards, a keep-tokens separator, another caption separator and a secondary separator on
/// rewritten captions: the run draws them from its generator, so stopping at step 2 and
/// resuming equals the straight run bit for bit.
#[test]
fn rewritten_caption_runs_resume_exactly() {
    let dir = tmp("caption-rewrite");
    let data = recaptioned(
        &dir,
        "data",
        &[
            (
                "a.txt",
                "{trigger}; style ||| {red|blue} roof; snow++night; palace ||| best",
            ),
            (
                "b.txt",
                "{trigger}; a woman\n{trigger}; a {silk|cotton} dress; garden",
            ),
        ],
    );
    let args = [
        "--enable-wildcard",
        "--shuffle-caption",
        "--caption-tag-dropout",
        "0.2",
        "--caption-separator",
        ";",
        "--keep-tokens-separator",
        "|||",
        "--secondary-separator",
        "++",
        "--keep-tokens",
        "1",
    ];
    assert_resume_is_exact(&data, &dir.join("resume"), "lora", &args, "captions");
    for (extra, needle) in [
        (
            &["--keep-tokens-separator", "|||"][..],
            "--keep-tokens-separator",
        ),
        (
            &["--enable-wildcard", "--keep-tokens-separator", "|||"],
            "--keep-tokens-separator",
        ),
        (&["--caption-separator", ""], "--caption-separator"),
        (&["--secondary-separator", ","], "--secondary-separator"),
        (
            &["--caption-separator", ";", "--secondary-separator", ";;"],
            "--secondary-separator",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}

/// kohya's token warm-up cuts each caption to its leading tags early on: a warm-up longer than
/// the run, from two tags, trains exactly what captions holding their first two tags train
/// (both encoded every step: the edited run passes --enable-wildcard, which with no braces and
/// one line changes no caption and draws nothing). With the whole captions the run differs.
#[test]
fn token_warmup_trains_the_leading_tags() {
    let dir = tmp("token-warmup");
    let full = recaptioned(
        &dir,
        "full",
        &[
            ("a.txt", "a palace, red roof, snow, night"),
            ("b.txt", "a woman, silk, garden"),
            ("c.txt", "a landscape,hills , river"),
        ],
    );
    let cut = recaptioned(
        &dir,
        "cut",
        &[
            ("a.txt", "a palace, red roof"),
            ("b.txt", "a woman, silk"),
            ("c.txt", "a landscape, hills"),
        ],
    );
    let run = |data: &Path, name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        train_ok(
            data,
            &out,
            "lora",
            &[&["--max-steps", "2"][..], extra].concat(),
        )
    };
    let warm = run(
        &full,
        "warm",
        &["--token-warmup-step", "100", "--token-warmup-min", "2"],
    );
    assert_eq!(setting(&warm, "token_warmup"), "min=2 steps=100");
    let edited = run(&cut, "edited", &["--enable-wildcard"]);
    assert!(
        tensors(&warm) == tensors(&edited),
        "the warm-up differs from the cut captions"
    );
    let whole = run(&full, "whole", &["--enable-wildcard"]);
    assert!(tensors(&whole) != tensors(&warm), "the warm-up cut nothing");
    // A fraction of a two-step run that floors to 0 steps cuts nothing.
    let none = run(&full, "none", &["--token-warmup-step", "0.25"]);
    assert!(tensors(&none) == tensors(&whole));
}

/// kohya's --caption-dropout-every-n-epochs 2 (epochs count from 1): the first epoch trains as
/// a run without it, bit for bit; the second drops every caption, so a run into it differs,
/// and resumes exactly across the epoch boundary.
#[test]
fn every_nth_epoch_trains_without_captions() {
    let dir = tmp("epoch-dropout");
    let data = dataset(&dir);
    let every = ["--caption-dropout-every-n-epochs", "2", "--grad-accum", "1"];
    // Three pictures, one a step: an epoch is three steps.
    let run = |name: &str, steps: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        let args = [&["--max-steps", steps, "--grad-accum", "1"][..], extra].concat();
        train_ok(&data, &out, "lora", &args)
    };
    let first = run("every-3", "3", &every[..2]);
    assert_eq!(setting(&first, "caption_dropout_every_n_epochs"), "2");
    assert!(
        tensors(&first) == tensors(&run("plain-3", "3", &[])),
        "the first epoch dropped captions"
    );
    assert!(
        tensors(&run("every-5", "5", &every[..2])) != tensors(&run("plain-5", "5", &[])),
        "the second epoch kept its captions"
    );
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "lora",
        &every,
        "every 2nd epoch",
    );
    refused(
        &data,
        &dir,
        &["--token-warmup-step", "-1"],
        "--token-warmup-step must be a positive",
    );
}

/// kohya's --max-token-length (the windows and their joining are checked against PyTorch by the
/// `long_captions` verify case): a caption of 130 tokens is cut at 75 with a warning by default
/// and read whole at 150, whose context is another (its cache entries are kept apart from the
/// default's); the cached, token-id (--train-text-encoder) and live-caption (--shuffle-caption)
/// paths all train at 225; the setting is recorded, and lengths kohya does not offer are refused.
#[test]
fn max_token_length_reads_longer_captions() {
    let dir = tmp("max-token-length");
    let words = [
        "a", "red", "cat", "on", "the", "hill", "blue", "sky", "dog", "house",
    ];
    let long: Vec<&str> = (0..130).map(|i| words[i % words.len()]).collect();
    let data = recaptioned(&dir, "data", &[("a.txt", &long.join(" "))]);
    let cache = dir.join("cache");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name).join("a.safetensors");
        let args = [
            &["--max-steps", "2", "--cache", cache.to_str().unwrap()][..],
            extra,
        ]
        .concat();
        let o = common::train::train(&data, &out, "lora", &args);
        assert!(o.status.success(), "{name}: {}", common::stderr(&o));
        (
            out,
            common::stderr(&o) + &String::from_utf8_lossy(&o.stdout),
        )
    };
    let (short, log) = run("75", &[]);
    assert!(log.contains("is longer than CLIP's 77 tokens"), "{log}");
    assert_eq!(setting(&short, "max_token_length"), "75");
    let (longer, log) = run("150", &["--max-token-length", "150"]);
    assert!(!log.contains("is longer than"), "{log}");
    assert!(log.contains("text encoders ran"), "{log}");
    assert_eq!(setting(&longer, "max_token_length"), "150");
    let (p, q) = (common::first_losses(&short), common::first_losses(&longer));
    assert!(q[0].is_finite() && p[0] != q[0], "{p:?} vs {q:?}");
    let (_, log) = run("225", &["--max-token-length", "225"]);
    assert!(!log.contains("is longer than"), "{log}");
    for (name, extra) in [
        ("te", &["--train-text-encoder"][..]),
        ("shuffled", &["--shuffle-caption", "--keep-tokens", "2"]),
    ] {
        let (out, _) = run(name, &[&["--max-token-length", "225"][..], extra].concat());
        assert!(common::first_losses(&out)[0].is_finite(), "{name}");
    }
    refused(
        &data,
        &dir,
        &["--max-token-length", "100"],
        "--max-token-length 100",
    );
}
