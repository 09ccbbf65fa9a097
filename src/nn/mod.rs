//! Layers built from tensor ops.
