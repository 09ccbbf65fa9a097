//! kohya's `color_aug` byte for byte: 158 cases of its hue rotation (OpenCV's 8-bit BGR->HSV,
//! the shifted hue, HSV->BGR) and its gamma (numpy's float64 power, truncated) that OpenCV 4.10
//! and numpy 2.2 produced with `python scripts/dev/cv2_color_aug.py tests/data/cv2_color_aug.json
//! 80` (the hue cases are the same bytes under OpenCV 4.8.1, kohya's pin). Inputs come from the
//! LCG both sides reproduce; outputs are compared by FNV-1a 64, so one wrong byte fails a case.
//! Widths off a multiple of 32 exercise OpenCV's scalar tail as well as its vector blocks.

use kstyle::image::color_aug::ColorShift;
use kstyle::verify::sweep::{fnv1a, lcg_bytes};

#[test]
fn kohyas_color_aug_matches_opencv_and_numpy() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cv2_color_aug.json"),
    )
    .unwrap();
    let root: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = root["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 158);
    let mut failed = Vec::new();
    for c in cases {
        let (w, h) = (c["w"].as_u64().unwrap(), c["h"].as_u64().unwrap());
        let value = c["value"].as_f64().unwrap();
        let seed = w * 1_000_003 + h * 1009 + (value * 1000.0) as u64;
        assert_eq!(seed, c["seed"].as_u64().unwrap());
        let bytes = lcg_bytes((w * h * 3) as usize, seed);
        let mut img = image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap();
        let shift = match c["kind"].as_str().unwrap() {
            "hue" => ColorShift::Hue(value),
            _ => ColorShift::Gamma(value),
        };
        shift.apply(&mut img);
        let want = u64::from_str_radix(c["fnv"].as_str().unwrap(), 16).unwrap();
        if fnv1a(img.as_raw()) != want {
            failed.push(format!("{shift:?} on {w}x{h}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} differ: {failed:?}",
        failed.len(),
        cases.len()
    );
}
