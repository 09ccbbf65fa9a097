//! `kstyle generate --prompt-style a1111` through the binary on the tiny model: A1111's weights,
//! BREAK and long prompts; the numbers themselves are checked by the `prompt_weighting` verify
//! case (tests/fixtures/extra/gen_prompt_weighting.py).

mod common;
use common::{assert_fails_naming, kstyle, stderr, tiny, tiny_refiner_folder, tmp};
use std::path::Path;
use std::process::Output;

/// `kstyle generate` on the tiny model at 64x64, 3 steps, guidance 5, writing `out`.
fn generate(prompt: &str, negative: &str, out: &Path, extra: &[&str]) -> Output {
    let model = tiny().join("sdxl");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--negative",
        negative,
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kstyle(&args)
}

fn png(o: &Output, path: &Path) -> Vec<u8> {
    assert!(o.status.success(), "{}", stderr(o));
    std::fs::read(path).unwrap()
}

const A1111: [&str; 2] = ["--prompt-style", "a1111"];

/// A short prompt without brackets reads the same both ways, and so does a bracketed one with
/// its brackets read as text (`none`) or parsed away (`ignore`: the same tokens as the plain
/// words): the PNGs are identical.
#[test]
fn plain_prompts_read_as_diffusers_reads_them() {
    let dir = tmp("pstyle-same");
    let p = |n: &str| dir.join(n);
    let plain = png(
        &generate("a red cat", "blurry", &p("d.png"), &[]),
        &p("d.png"),
    );
    let a = png(
        &generate("a red cat", "blurry", &p("a.png"), &A1111),
        &p("a.png"),
    );
    assert!(plain == a, "a1111 changed a plain prompt");
    let ignore = png(
        &generate(
            "a (red:1.3) cat",
            "[blurry]",
            &p("i.png"),
            &[A1111[0], A1111[1], "--emphasis", "ignore"],
        ),
        &p("i.png"),
    );
    assert!(plain == ignore, "--emphasis ignore applied a weight");
    let literal = png(
        &generate("a (red:1.3) cat", "blurry", &p("l.png"), &[]),
        &p("l.png"),
    );
    let none = png(
        &generate(
            "a (red:1.3) cat",
            "blurry",
            &p("n.png"),
            &[A1111[0], A1111[1], "--emphasis", "none"],
        ),
        &p("n.png"),
    );
    assert!(literal == none, "--emphasis none parsed the brackets");
    assert!(literal != plain);
}

/// Weights and BREAK change the picture; a 2-chunk prompt against a 1-chunk negative runs (one
/// UNet pass each), and so does a prompt past 77 tokens, which diffusers' way cuts with a
/// warning while A1111's way keeps every token.
#[test]
fn weights_break_and_long_prompts_change_the_picture() {
    let dir = tmp("pstyle-diff");
    let p = |n: &str| dir.join(n);
    let base = png(
        &generate("a red cat", "blurry", &p("b.png"), &A1111),
        &p("b.png"),
    );
    let weighted = png(
        &generate("a (red:1.5) cat", "blurry", &p("w.png"), &A1111),
        &p("w.png"),
    );
    let no_norm = png(
        &generate(
            "a (red:1.5) cat",
            "blurry",
            &p("nn.png"),
            &[A1111[0], A1111[1], "--emphasis", "no-norm"],
        ),
        &p("nn.png"),
    );
    let broken = png(
        &generate("a red BREAK cat", "blurry", &p("k.png"), &A1111),
        &p("k.png"),
    );
    assert!(base != weighted && weighted != no_norm && base != broken);
    let long: Vec<&str> = ["sky", "tree", "house"].repeat(30);
    let long = long.join(" ");
    let cut = generate(&long, "blurry", &p("cut.png"), &[]);
    assert!(stderr(&cut).contains("longer than CLIP's 77 tokens"));
    let whole = generate(&long, "blurry", &p("whole.png"), &A1111);
    assert!(
        !stderr(&whole).contains("longer than CLIP"),
        "{}",
        stderr(&whole)
    );
    assert!(png(&cut, &p("cut.png")) != png(&whole, &p("whole.png")));
}

/// The refiner (text_encoder_2 alone) reads a two-chunk prompt A1111's way too.
#[test]
fn the_refiner_reads_long_prompts() {
    let dir = tmp("pstyle-refiner");
    let refiner = tiny_refiner_folder(&dir);
    let out = dir.join("r.png");
    let o = generate(
        "a (red:1.2) cat BREAK on a hill",
        "blurry",
        &out,
        &[A1111[0], A1111[1], "--refiner", refiner.to_str().unwrap()],
    );
    png(&o, &out);
}

#[test]
fn what_a1111_syntax_cannot_run_is_refused_by_name() {
    let dir = tmp("pstyle-bad");
    let out = dir.join("x.png");
    let cases: [(&str, &[&str], &str); 5] = [
        ("a [cat:dog:0.5]", &A1111, "prompt editing `[cat:dog:0.5]`"),
        ("a [cat|dog]", &A1111, "prompt editing `[cat|dog]`"),
        ("a cat AND a dog", &A1111, "composable prompts (`AND`)"),
        ("a (cat:1.2.3)", &A1111, "the weight `1.2.3`"),
        (
            "a cat",
            &["--emphasis", "none"],
            "--emphasis applies to A1111",
        ),
    ];
    for (prompt, extra, needle) in cases {
        assert_fails_naming(&generate(prompt, "blurry", &out, extra), needle);
    }
    assert!(!out.exists());
    let o = generate("a (cat:1.2)", "blurry", &out, &[]);
    assert!(o.status.success());
    assert!(
        stderr(&o).contains("--prompt-style a1111"),
        "{}",
        stderr(&o)
    );
}

const COMFY: [&str; 2] = ["--prompt-style", "comfy"];

/// ComfyUI's way: a plain prompt reads as diffusers reads it; a weight draws from the empty
/// prompt (a different picture from A1111's scaling); `embedding:NAME` is a loaded embedding
/// (the same picture as the bare NAME), and an unknown one is left out with a warning.
#[test]
fn comfy_prompts() {
    let dir = tmp("pstyle-comfy");
    let p = |n: &str| dir.join(n);
    let plain = png(
        &generate("a red cat", "blurry", &p("d.png"), &[]),
        &p("d.png"),
    );
    let comfy = png(
        &generate("a red cat", "blurry", &p("c.png"), &COMFY),
        &p("c.png"),
    );
    assert!(plain == comfy, "comfy changed a plain prompt");
    let weighted = png(
        &generate("a (red:1.5) cat", "blurry", &p("cw.png"), &COMFY),
        &p("cw.png"),
    );
    let a1111 = png(
        &generate("a (red:1.5) cat", "blurry", &p("aw.png"), &A1111),
        &p("aw.png"),
    );
    assert!(weighted != plain && weighted != a1111);
    let ti = common::tiny().join("../extra/ti_hanokstyle.safetensors");
    let ti = format!("{}:hanok", ti.display());
    let with = |prompt: &str, out: &str| {
        let o = generate(
            prompt,
            "blurry",
            &p(out),
            &[COMFY[0], COMFY[1], "--embedding", &ti],
        );
        (png(&o, &p(out)), stderr(&o))
    };
    let (named, _) = with("a embedding:hanok house", "e1.png");
    let (bare, _) = with("a hanok house", "e2.png");
    let (without, _) = with("a house", "e3.png");
    assert!(named == bare && named != without);
    let (unknown, warned) = with("a embedding:nothere house", "e4.png");
    assert!(
        unknown == without,
        "an unknown embedding changed the prompt"
    );
    assert!(
        warned.contains("no loaded embedding is called nothere"),
        "{warned}"
    );
    let o = generate(
        "a cat",
        "blurry",
        &p("x.png"),
        &[COMFY[0], COMFY[1], "--emphasis", "none"],
    );
    assert_fails_naming(&o, "--emphasis applies to A1111");
}
