//! Pillow parity of the 8-bit resampler without needing Pillow: the expected outputs are FNV-1a
//! hashes that Pillow 13.0.0 produced for inputs drawn from a 64-bit LCG that both sides can
//! reproduce (`scripts/dev/pillow_xcheck.py`). A single wrong byte anywhere changes the hash.
//!
//! `pillow_sweep` replays a larger random sweep, `tests/data/pillow_sweep.json`: 526 cases that
//! Pillow 13.0.0 produced with `python scripts/dev/pillow_xcheck.py tests/data/pillow_sweep.json 500`.
//! `pillow_box_sweep` does the same for resizes of a region (`box=`), including zero-extent boxes:
//! `tests/data/pillow_box_sweep.json`, 400 cases from
//! `python scripts/dev/pillow_xcheck.py tests/data/pillow_box_sweep.json 400 --box`.
//! `pillow_blur_sweep` checks `ImageFilter.GaussianBlur` (diffusers' mask blur) the same way:
//! `tests/data/pillow_blur_sweep.json`, 300 cases from
//! `python scripts/dev/pillow_xcheck.py tests/data/pillow_blur_sweep.json 300 --blur`.

use kstyle::image::blur::gaussian_blur_u8;
use kstyle::image::resample::{resize_box_u8, resize_u8, Filter};
use kstyle::verify::sweep::{fnv1a, lcg_bytes};
use Filter::{Bicubic, Bilinear, Lanczos};

fn seed(w: usize, h: usize, c: usize, ow: usize, oh: usize) -> u64 {
    (w * 1_000_003 + h * 1009 + ow * 31 + oh + c) as u64
}

fn run(w: usize, h: usize, c: usize, ow: usize, oh: usize, f: Filter) -> u64 {
    let src = lcg_bytes(w * h * c, seed(w, h, c, ow, oh));
    let out = resize_u8(&src, w, h, c, ow, oh, f).unwrap();
    assert_eq!(out.len(), ow * oh * c);
    fnv1a(&out)
}

/// (w, h, channels, out_w, out_h, filter, fnv1a of Pillow's output bytes). Rows 19-23 take
/// Pillow 13's vertical-first path, rows 24-26 sit just on the horizontal-first side of it.
const PILLOW_CASES: &[(usize, usize, usize, usize, usize, Filter, u64)] = &[
    (128, 128, 3, 64, 64, Bicubic, 0xd7b9a491d82029de),
    (80, 96, 3, 64, 76, Bicubic, 0x23b255941ebae78b),
    (96, 80, 3, 76, 64, Bicubic, 0x038664b60873c8ea),
    (7, 5, 3, 19, 13, Bicubic, 0xe1dd1a6c49553a84),
    (5, 7, 1, 2, 3, Bicubic, 0xda8f1a5e31c7a795),
    (1, 1, 3, 4, 3, Bicubic, 0x3d197095ca91602d),
    (33, 17, 3, 33, 5, Bicubic, 0xef0fa02504807d2d),
    (17, 33, 3, 4, 33, Bicubic, 0x5bb41bb50a033c7c),
    (300, 200, 3, 64, 42, Bicubic, 0x5d2e41d1980bd905),
    (64, 48, 3, 224, 168, Bicubic, 0xad047898f1cdd87b),
    (37, 23, 3, 11, 29, Bicubic, 0x12239fb5e924fc70),
    (2, 2, 3, 1, 1, Bicubic, 0x0d626c1b5e082f7e),
    (100, 3, 3, 7, 1, Bicubic, 0x433f4f000b9ca4cd),
    (40, 30, 3, 17, 13, Bilinear, 0xb9470c73b9b933f6),
    (13, 9, 3, 40, 27, Bilinear, 0xeb7a0fa36a8f7d97),
    (40, 30, 3, 17, 13, Lanczos, 0xdf0759358a5bf5ca),
    (13, 9, 1, 40, 27, Lanczos, 0xc100d43e133931de),
    (250, 250, 3, 224, 224, Bicubic, 0xec9b8eacef0debf9),
    (100, 300, 3, 64, 192, Bicubic, 0x3f06593dee7a94e8),
    (22, 122, 3, 5, 75, Bicubic, 0x04292ee8a4e206eb),
    (60, 60, 1, 33, 5, Bicubic, 0xa8c99f78b2fd58f8),
    (16, 159, 3, 53, 128, Bilinear, 0x05d7d0055ea7e1d9),
    (90, 40, 3, 74, 7, Lanczos, 0x94971d854b6012dc),
    (60, 60, 1, 33, 6, Bicubic, 0xb3b68cdf9c240363),
    (90, 40, 3, 74, 8, Lanczos, 0x8eadb56d6f395011),
    (100, 200, 3, 64, 128, Bicubic, 0x616691d16ad80746),
];

#[test]
fn matches_pillow_on_fixed_cases() {
    let mut bad = Vec::new();
    for &(w, h, c, ow, oh, f, want) in PILLOW_CASES {
        if run(w, h, c, ow, oh, f) != want {
            bad.push(format!("{w}x{h}x{c} -> {ow}x{oh} {f:?}"));
        }
    }
    assert!(bad.is_empty(), "differs from Pillow: {bad:?}");
}

#[test]
fn pillow_sweep() {
    sweep(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/pillow_sweep.json"
    ));
}

#[test]
fn pillow_box_sweep() {
    sweep(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/pillow_box_sweep.json"
    ));
}

/// Replays a sweep file; a case with a `box` resizes that region.
fn sweep(path: &str) {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut bad = Vec::new();
    for c in &cases {
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let f = match c["filter"].as_str().unwrap() {
            "bicubic" => Bicubic,
            "bilinear" => Bilinear,
            _ => Lanczos,
        };
        let want = u64::from_str_radix(c["fnv"].as_str().unwrap(), 16).unwrap();
        assert_eq!(
            c["seed"].as_u64().unwrap(),
            seed(g("w"), g("h"), g("c"), g("ow"), g("oh"))
        );
        let (w, h, ch, ow, oh) = (g("w"), g("h"), g("c"), g("ow"), g("oh"));
        let got = match c.get("box") {
            Some(b) => {
                let b: Vec<f64> = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let src = lcg_bytes(w * h * ch, seed(w, h, ch, ow, oh));
                let out =
                    resize_box_u8(&src, w, h, ch, [b[0], b[1], b[2], b[3]], ow, oh, f).unwrap();
                fnv1a(&out)
            }
            None => run(w, h, ch, ow, oh, f),
        };
        if got != want {
            bad.push(c.to_string());
        }
    }
    println!(
        "{} of {} cases match Pillow",
        cases.len() - bad.len(),
        cases.len()
    );
    assert!(bad.is_empty(), "{} differ: {bad:#?}", bad.len());
}

#[test]
fn pillow_blur_sweep() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/pillow_blur_sweep.json"
    );
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut bad = Vec::new();
    for c in &cases {
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let (w, h, ch) = (g("w"), g("h"), g("c"));
        let seed = (w * 1_000_003 + h * 1009 + ch) as u64;
        assert_eq!(c["seed"].as_u64().unwrap(), seed);
        let radius = c["radius"].as_f64().unwrap() as f32;
        let out = gaussian_blur_u8(&lcg_bytes(w * h * ch, seed), w, h, ch, radius).unwrap();
        let want = u64::from_str_radix(c["fnv"].as_str().unwrap(), 16).unwrap();
        if fnv1a(&out) != want {
            bad.push(c.to_string());
        }
    }
    assert!(cases.len() >= 300);
    assert!(
        bad.is_empty(),
        "{} of {} differ: {bad:#?}",
        bad.len(),
        cases.len()
    );
    for bad_radius in [-1.0, f32::NAN, f32::INFINITY] {
        assert!(gaussian_blur_u8(&[0; 3], 1, 1, 3, bad_radius).is_err());
    }
}
