//! 8-bit image handling: Pillow-exact resampling and blur, file I/O, labelled grids.

pub mod blur;
pub mod color_aug;
pub mod font;
pub mod grid;
pub mod io;
pub mod resample;
