//! The loss-curve PNG: raw loss as faint points, a moving average as a line, the validation
//! loss (when there is one) as a second line with its points marked, labelled axes.
//! Drawn with the project's own bitmap font so it needs no system fonts.

use crate::image::font::{draw_text, text_width};
use crate::image::io::save_png;
use crate::Result;
use image::{Rgb, RgbImage};
use std::path::Path;

const W: u32 = 900;
const H: u32 = 500;
const LEFT: u32 = 90;
const RIGHT: u32 = 20;
const TOP: u32 = 40;
const BOTTOM: u32 = 60;

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(
            img,
            (x0 + (x1 - x0) * t).round() as i64,
            (y0 + (y1 - y0) * t).round() as i64,
            c,
        );
    }
}

/// Mean of the last `window` values at every position.
pub fn moving_average(v: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len());
    let mut sum = 0.0;
    for i in 0..v.len() {
        sum += v[i];
        if i >= window {
            sum -= v[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1000.0) {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// Plot `(step, loss)` points to `path`.
/// Draws the training `points` and the validation points `val` (step, loss) on one scale.
pub fn plot_loss(
    path: &Path,
    title: &str,
    points: &[(u64, f64)],
    val: &[(u64, f64)],
) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    line(
        &mut img,
        (LEFT as f64, TOP as f64),
        (LEFT as f64, (H - BOTTOM) as f64),
        black,
    );
    line(
        &mut img,
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        black,
    );
    draw_text(
        &mut img,
        ((W - text_width(title, 2)) / 2) as i64,
        10,
        title,
        2,
        black,
    );
    draw_text(
        &mut img,
        ((W - text_width("step", 2)) / 2) as i64,
        (H - 22) as i64,
        "step",
        2,
        black,
    );
    let finite: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    let val: Vec<(u64, f64)> = val.iter().copied().filter(|p| p.1.is_finite()).collect();
    if finite.is_empty() {
        return save_png(path, &img);
    }
    let both = || finite.iter().chain(&val);
    let (x0, x1) = both().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.0 as f64), b.max(p.0 as f64))
    });
    let (mut y0, mut y1) = both().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let sx = |x: f64| {
        LEFT as f64
            + if x1 > x0 {
                (x - x0) / (x1 - x0) * pw
            } else {
                pw / 2.0
            }
    };
    let sy = |y: f64| TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
    for i in 0..=4 {
        let v = y0 + (y1 - y0) * i as f64 / 4.0;
        let y = sy(v);
        line(&mut img, (LEFT as f64 - 5.0, y), (LEFT as f64, y), black);
        let label = fmt_tick(v);
        draw_text(
            &mut img,
            (LEFT - 8 - text_width(&label, 1)) as i64,
            y as i64 - 3,
            &label,
            1,
            black,
        );
        let xv = x0 + (x1 - x0) * i as f64 / 4.0;
        let x = sx(xv);
        line(
            &mut img,
            (x, (H - BOTTOM) as f64),
            (x, (H - BOTTOM + 5) as f64),
            black,
        );
        let label = format!("{}", xv.round() as u64);
        draw_text(
            &mut img,
            x as i64 - text_width(&label, 1) as i64 / 2,
            (H - BOTTOM + 10) as i64,
            &label,
            1,
            black,
        );
    }
    for p in &finite {
        put(
            &mut img,
            sx(p.0 as f64).round() as i64,
            sy(p.1).round() as i64,
            Rgb([150, 170, 220]),
        );
    }
    let ys: Vec<f64> = finite.iter().map(|p| p.1).collect();
    let avg = moving_average(&ys, (ys.len() / 20).max(1));
    for w in finite.iter().zip(&avg).collect::<Vec<_>>().windows(2) {
        line(
            &mut img,
            (sx(w[0].0 .0 as f64), sy(*w[0].1)),
            (sx(w[1].0 .0 as f64), sy(*w[1].1)),
            Rgb([200, 40, 40]),
        );
    }
    let green = Rgb([30, 150, 60]);
    for w in val.windows(2) {
        line(
            &mut img,
            (sx(w[0].0 as f64), sy(w[0].1)),
            (sx(w[1].0 as f64), sy(w[1].1)),
            green,
        );
    }
    for p in &val {
        let (x, y) = (sx(p.0 as f64).round() as i64, sy(p.1).round() as i64);
        for d in -2..=2 {
            put(&mut img, x + d, y, green);
            put(&mut img, x, y + d, green);
        }
    }
    if !val.is_empty() {
        let legend = "validation";
        draw_text(
            &mut img,
            (W - RIGHT - text_width(legend, 1) - 4) as i64,
            (TOP + 4) as i64,
            legend,
            1,
            green,
        );
    }
    save_png(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_of_the_curve() {
        let dir = crate::test_fixtures::TempDir::new("plot");
        let path = dir.path().join("loss.png");
        let pts: Vec<(u64, f64)> = (1..=200)
            .map(|i| {
                (
                    i,
                    1.0 / (i as f64).sqrt() + 0.05 * ((i * 7919) % 13) as f64 / 13.0,
                )
            })
            .collect();
        plot_loss(&path, "loss", &pts, &[]).unwrap();
        let img = crate::image::io::load_rgb(&path).unwrap();
        assert_eq!((img.width(), img.height()), (W, H));
        // The moving-average line is drawn in red somewhere inside the plot area.
        assert!(img.pixels().any(|p| *p == Rgb([200, 40, 40])));
        assert!(!img.pixels().any(|p| *p == Rgb([30, 150, 60])));
        let val = [(50, 0.4), (100, 0.3), (200, 0.35)];
        plot_loss(&path, "loss", &pts, &val).unwrap();
        let img = crate::image::io::load_rgb(&path).unwrap();
        assert!(img.pixels().any(|p| *p == Rgb([30, 150, 60])));
    }
}
