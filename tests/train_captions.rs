//! kohya's caption options through the real binary on the tiny model: --caption-prefix,
//! --caption-suffix, --caption-separator, --keep-tokens-separator, --secondary-separator and
//! --enable-wildcard. The rewriting itself is unit-tested in src/train/captions.rs; here: the
//! options equal editing the caption files where they are fixed, a rewriting run resumes
//! exactly, and bad combinations are refused.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, tensors, train_ok};
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
