//! Labelled image grids (rows x columns) for evaluation sheets: e.g. prompts down the side and
//! LoRA scales or seeds across the top.

use crate::image::font::{draw_text, text_width, ADVANCE, GLYPH_H};
use crate::{Error, Result};
use image::{Rgb, RgbImage};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
/// Longest row label kept, in characters; prompts can be long and would otherwise push the
/// images off a readable sheet.
const MAX_ROW_LABEL_CHARS: usize = 32;
/// Refuse canvases past this many pixels (about 1.5 GB of RGB) instead of aborting on allocation.
const MAX_CANVAS_PIXELS: u64 = 1 << 29;

/// Grid layout and optional labels. Empty label lists mean no label band on that side.
#[derive(Clone, Debug)]
pub struct GridSpec {
    pub rows: usize,
    pub cols: usize,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    /// Gap between cells and around the sheet, in pixels.
    pub pad: u32,
    /// Font magnification; 0 picks 1 for cells under 256 px wide, else 2.
    pub font_scale: u32,
}

impl GridSpec {
    pub fn new(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            row_labels: Vec::new(),
            col_labels: Vec::new(),
            pad: 4,
            font_scale: 0,
        }
    }

    pub fn with_labels(mut self, row_labels: Vec<String>, col_labels: Vec<String>) -> Self {
        self.row_labels = row_labels;
        self.col_labels = col_labels;
        self
    }
}

/// Cuts `text` to the characters that fit in `max_px` at `scale`, marking a cut with "..".
fn fit_text(text: &str, max_px: u32, scale: u32, max_chars: usize) -> String {
    let fits = |n: usize| text_width(&"x".repeat(n), scale) <= max_px;
    let n = text.chars().count();
    if n <= max_chars && fits(n) {
        return text.to_string();
    }
    let mut keep = n.min(max_chars);
    while keep > 0 && !fits(keep + 2) {
        keep -= 1;
    }
    if keep == 0 {
        return String::new();
    }
    text.chars().take(keep).chain("..".chars()).collect()
}

/// Places `cells` (row-major, at most `rows * cols`; missing cells stay white) on a white sheet.
/// Cells may differ in size; each slot is as large as the largest cell and cells are centred.
pub fn compose_grid(cells: &[RgbImage], spec: &GridSpec) -> Result<RgbImage> {
    let (rows, cols) = (spec.rows, spec.cols);
    let shape = [rows, cols];
    if rows == 0 || cols == 0 {
        return Err(Error::bad_shape(
            "compose_grid",
            "grid needs at least one row and column",
            &shape,
        ));
    }
    if cells.len() > rows * cols {
        return Err(Error::bad_shape(
            "compose_grid",
            format!("{} images for {} slots", cells.len(), rows * cols),
            &shape,
        ));
    }
    for (what, labels, n) in [
        ("row", &spec.row_labels, rows),
        ("column", &spec.col_labels, cols),
    ] {
        if !labels.is_empty() && labels.len() != n {
            return Err(Error::bad_shape(
                "compose_grid",
                format!("{} {what} labels for {n} {what}s", labels.len()),
                &shape,
            ));
        }
    }
    let cell_w = cells.iter().map(|c| c.width()).max().unwrap_or(1).max(1);
    let cell_h = cells.iter().map(|c| c.height()).max().unwrap_or(1).max(1);
    let scale = match spec.font_scale {
        0 if cell_w < 256 => 1,
        0 => 2,
        s => s,
    };
    let pad = spec.pad;
    let line_h = GLYPH_H * scale;

    let row_label_w = spec
        .row_labels
        .iter()
        .map(|l| text_width(&fit_text(l, u32::MAX, scale, MAX_ROW_LABEL_CHARS), scale))
        .max()
        .unwrap_or(0);
    let left = if row_label_w > 0 {
        pad + row_label_w + pad
    } else {
        pad
    };
    let top = if spec.col_labels.is_empty() {
        pad
    } else {
        pad + line_h + pad
    };

    let width = left as u64 + cols as u64 * (cell_w + pad) as u64;
    let height = top as u64 + rows as u64 * (cell_h + pad) as u64;
    if width * height > MAX_CANVAS_PIXELS || width > u32::MAX as u64 || height > u32::MAX as u64 {
        return Err(Error::bad_shape(
            "compose_grid",
            format!("sheet would be {width}x{height} px"),
            &shape,
        ));
    }
    let mut sheet = RgbImage::from_pixel(width as u32, height as u32, WHITE);

    for (i, cell) in cells.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        let x0 = left + c * (cell_w + pad) + (cell_w - cell.width()) / 2;
        let y0 = top + r * (cell_h + pad) + (cell_h - cell.height()) / 2;
        image::imageops::replace(&mut sheet, cell, x0 as i64, y0 as i64);
    }
    for (c, label) in spec.col_labels.iter().enumerate() {
        let text = fit_text(label, cell_w, scale, usize::MAX);
        let x = left + c as u32 * (cell_w + pad) + (cell_w - text_width(&text, scale)) / 2;
        draw_text(&mut sheet, x as i64, pad as i64, &text, scale, BLACK);
    }
    for (r, label) in spec.row_labels.iter().enumerate() {
        let text = fit_text(label, u32::MAX, scale, MAX_ROW_LABEL_CHARS);
        let y = top + r as u32 * (cell_h + pad) + cell_h.saturating_sub(line_h) / 2;
        draw_text(&mut sheet, pad as i64, y as i64, &text, scale, BLACK);
    }
    Ok(sheet)
}

/// Characters of label that fit across `cell_w` pixels at `scale` (for callers laying out text).
pub fn label_capacity(cell_w: u32, scale: u32) -> usize {
    ((cell_w / scale.max(1) + 1) / ADVANCE) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v / 2, 255 - v]))
    }

    #[test]
    fn places_cells_row_major_without_labels() {
        let cells: Vec<RgbImage> = (0..6).map(|i| solid(8, 6, 10 + i as u8 * 40)).collect();
        let mut spec = GridSpec::new(2, 3);
        spec.pad = 2;
        let g = compose_grid(&cells, &spec).unwrap();
        assert_eq!(g.dimensions(), (2 + 3 * 10, 2 + 2 * 8));
        for (i, cell) in cells.iter().enumerate() {
            let (r, c) = ((i / 3) as u32, (i % 3) as u32);
            let (x, y) = (2 + c * 10, 2 + r * 8);
            assert_eq!(g.get_pixel(x, y), cell.get_pixel(0, 0));
            assert_eq!(g.get_pixel(x + 7, y + 5), cell.get_pixel(7, 5));
        }
        assert_eq!(*g.get_pixel(0, 0), WHITE);
        assert_eq!(*g.get_pixel(2 + 8, 2), WHITE); // the gap between columns
    }

    #[test]
    fn labels_add_bands_and_ink() {
        let cells: Vec<RgbImage> = (0..4).map(|i| solid(40, 30, i as u8 * 60)).collect();
        let spec = GridSpec::new(2, 2).with_labels(
            vec![
                "a hanbok".into(),
                "a very long prompt that will not fit in the label band at all".into(),
            ],
            vec!["scale 0".into(), "scale 1.0".into()],
        );
        let g = compose_grid(&cells, &spec).unwrap();
        let row_w = text_width(&"x".repeat(MAX_ROW_LABEL_CHARS + 2), 1);
        assert_eq!(g.width(), 4 + row_w + 4 + 2 * 44);
        assert_eq!(g.height(), 4 + 7 + 4 + 2 * 34);
        let band = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| g.get_pixel(x, y)[0] == 0)
                .count()
        };
        assert!(band(0, g.width(), 0, 15) > 20, "column labels drawn");
        assert!(band(0, 4 + row_w, 15, g.height()) > 20, "row labels drawn");
    }

    #[test]
    fn uneven_cells_are_centred_and_missing_cells_blank() {
        let cells = vec![solid(10, 10, 0), solid(4, 4, 0)];
        let mut spec = GridSpec::new(2, 2);
        spec.pad = 0;
        let g = compose_grid(&cells, &spec).unwrap();
        assert_eq!(g.dimensions(), (20, 20));
        // The 4x4 cell sits centred in slot 1 at x 13..17, y 3..7.
        let blue = Rgb([0, 0, 255]);
        assert_eq!((*g.get_pixel(13, 3), *g.get_pixel(16, 6)), (blue, blue));
        assert_eq!(
            (
                *g.get_pixel(12, 3),
                *g.get_pixel(13, 2),
                *g.get_pixel(17, 7)
            ),
            (WHITE, WHITE, WHITE)
        );
        assert_eq!(*g.get_pixel(5, 15), WHITE); // slot 3 is empty
    }

    #[test]
    fn bad_layouts_are_errors() {
        let cells = vec![solid(4, 4, 0); 3];
        assert!(compose_grid(&cells, &GridSpec::new(1, 2)).is_err());
        assert!(compose_grid(&cells, &GridSpec::new(0, 2)).is_err());
        let spec = GridSpec::new(2, 2).with_labels(vec!["one".into()], vec![]);
        assert!(matches!(
            compose_grid(&cells, &spec),
            Err(Error::BadShape { .. })
        ));
        assert!(compose_grid(&[], &GridSpec::new(100_000, 100_000)).is_err());
    }

    #[test]
    fn fit_text_marks_cuts() {
        assert_eq!(fit_text("hello", 100, 1, 99), "hello");
        assert_eq!(fit_text("hello world", 6 * 6 - 1, 1, 99), "hell..");
        assert_eq!(fit_text("hello", 3, 1, 99), "");
        assert_eq!(label_capacity(35, 1), 6);
    }
}
