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
    let rescale = [A1111[0], A1111[1], "--guidance-rescale", "0.7"];
    let cases: [(&str, &[&str], &str); 5] = [
        ("a (cat:1.2.3)", &A1111, "the weight `1.2.3`"),
        (
            "a [cat:dog:0.5]::",
            &A1111,
            "the `:` right next to prompt editing",
        ),
        ("a [cat:dog:1e999]", &A1111, "the step `1e999` is too large"),
        ("a cat AND a dog", &rescale, "guidance rescale takes one"),
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
    for prompt in ["a (cat:1.2)", "a [cat:dog:0.5]", "a cat AND a dog"] {
        let o = generate(prompt, "blurry", &out, &[]);
        assert!(o.status.success());
        assert!(
            stderr(&o).contains("--prompt-style a1111"),
            "{prompt}: {}",
            stderr(&o)
        );
    }
}

/// A1111's prompt editing and `AND` (the numbers are checked by the `prompt_editing` verify
/// case): an edit or alternation between equal texts gives the plain prompt's PNG bit for bit,
/// and a part of weight 0 adds nothing; a real edit, alternation or part each give another
/// picture, and the negative's schedule counts too.
#[test]
fn prompt_editing_and_composable_prompts() {
    let dir = tmp("pstyle-edit");
    let p = |n: &str| dir.join(n);
    let run = |prompt: &str, negative: &str, name: &str| {
        png(&generate(prompt, negative, &p(name), &A1111), &p(name))
    };
    let plain = run("a red cat", "blurry", "plain.png");
    for (i, same) in ["[a red cat:a red cat:0.5]", "[a red cat|a red cat]"]
        .into_iter()
        .enumerate()
    {
        let got = run(same, "blurry", &format!("same{i}.png"));
        assert!(got == plain, "{same:?} changed the picture");
    }
    // A part of weight 0 adds nothing, whatever its text (the batch, three rows, is the same
    // shape both times; against the two-row batch of the plain prompt the CPU's sums may round
    // otherwise).
    let zero = run("a red cat AND a blue dog :0", "blurry", "zero1.png");
    let zero_other = run("a red cat AND a green sky: 0", "blurry", "zero2.png");
    assert!(zero == zero_other, "a part of weight 0 changed the picture");
    let negative_same = run("a red cat", "[blurry:blurry:2]", "neg_same.png");
    assert!(
        negative_same == plain,
        "an identity edit of the negative changed the picture"
    );
    let mut seen = vec![plain];
    for (i, (prompt, negative)) in [
        ("[a red cat:a blue dog:0.5]", "blurry"),
        ("[a red cat|a green sky]", "blurry"),
        ("a red cat AND a blue dog :0.5", "blurry"),
        ("a red cat", "[blurry:sharp:1]"),
    ]
    .into_iter()
    .enumerate()
    {
        let got = run(prompt, negative, &format!("diff{i}.png"));
        assert!(
            !seen.contains(&got),
            "{prompt:?} / {negative:?} gave a picture seen before"
        );
        seen.push(got);
    }
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
