//! 8-bit image handling: Pillow-exact resampling, file I/O, labelled grids.

pub mod font;
pub mod grid;
pub mod io;
pub mod resample;
