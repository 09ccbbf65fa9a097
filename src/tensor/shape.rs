//! Shapes and strided layouts. Strides are in elements; a broadcast dimension has stride 0.

use crate::{Error, Result};

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major strides of a contiguous tensor of this shape.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut acc = 1;
        for (s, d) in strides.iter_mut().zip(self.0.iter()).rev() {
            *s = acc;
            acc *= d;
        }
        strides
    }

    pub fn dim(&self, d: usize) -> Result<usize> {
        self.0.get(d).copied().ok_or_else(|| Error::DimOutOfRange {
            op: "dim",
            dim: d,
            shape: self.clone(),
        })
    }

    /// Product of the dims before `d` and after `d` (exclusive): the (outer, inner) split around a dim.
    pub fn outer_inner(&self, d: usize) -> (usize, usize) {
        let outer = self.0[..d].iter().product();
        let inner = self.0[d + 1..].iter().product();
        (outer, inner)
    }

    /// The shape two operands broadcast to, numpy rules (aligned on the right).
    pub fn broadcast_with(&self, rhs: &Shape, op: &'static str) -> Result<Shape> {
        let (a, b) = (self.dims(), rhs.dims());
        let rank = a.len().max(b.len());
        let mut out = vec![0; rank];
        for i in 0..rank {
            let da = if i < rank - a.len() {
                1
            } else {
                a[i - (rank - a.len())]
            };
            let db = if i < rank - b.len() {
                1
            } else {
                b[i - (rank - b.len())]
            };
            out[i] = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(Error::Broadcast {
                        op,
                        lhs: self.clone(),
                        rhs: rhs.clone(),
                    })
                }
            };
        }
        Ok(Shape(out))
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}
impl From<(usize, usize)> for Shape {
    fn from(d: (usize, usize)) -> Self {
        Shape(vec![d.0, d.1])
    }
}
impl From<(usize, usize, usize)> for Shape {
    fn from(d: (usize, usize, usize)) -> Self {
        Shape(vec![d.0, d.1, d.2])
    }
}
impl From<(usize, usize, usize, usize)> for Shape {
    fn from(d: (usize, usize, usize, usize)) -> Self {
        Shape(vec![d.0, d.1, d.2, d.3])
    }
}

/// Where a tensor's elements sit in its storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    pub fn new(shape: Shape, strides: Vec<usize>, offset: usize) -> Self {
        Layout {
            shape,
            strides,
            offset,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.dims().iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// Offset range `[start, end)` if the elements are contiguous in storage.
    pub fn contiguous_range(&self) -> Option<(usize, usize)> {
        self.is_contiguous()
            .then(|| (self.offset, self.offset + self.shape.elem_count()))
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        let d = self.shape.dim(dim)?;
        if start + len > d {
            return Err(Error::BadShape {
                op: "narrow",
                msg: format!("range {start}..{} on dim {dim}", start + len),
                shape: self.shape.clone(),
            });
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Layout {
            shape: Shape(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        })
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let rank = self.shape.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::BadShape {
                op: "permute",
                msg: format!("invalid permutation {perm:?}"),
                shape: self.shape.clone(),
            });
        }
        let dims = perm.iter().map(|&p| self.dims()[p]).collect::<Vec<_>>();
        let strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        })
    }

    pub fn broadcast_as(&self, target: &Shape) -> Result<Layout> {
        let (src, dst) = (self.dims(), target.dims());
        if dst.len() < src.len() {
            return Err(Error::Broadcast {
                op: "broadcast_as",
                lhs: self.shape.clone(),
                rhs: target.clone(),
            });
        }
        let lead = dst.len() - src.len();
        let mut strides = vec![0; dst.len()];
        for (i, &d) in dst.iter().enumerate() {
            if i < lead {
                continue;
            }
            let s = src[i - lead];
            strides[i] = if s == d {
                self.strides[i - lead]
            } else if s == 1 {
                0
            } else {
                return Err(Error::Broadcast {
                    op: "broadcast_as",
                    lhs: self.shape.clone(),
                    rhs: target.clone(),
                });
            };
        }
        Ok(Layout {
            shape: target.clone(),
            strides,
            offset: self.offset,
        })
    }

    /// Storage offsets of every element, in row-major order of the logical shape.
    pub fn offsets(&self) -> StridedOffsets<'_> {
        let n = self.shape.elem_count();
        StridedOffsets {
            layout: self,
            index: vec![0; self.shape.rank()],
            next: self.offset,
            remaining: n,
        }
    }
}

pub struct StridedOffsets<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: usize,
    remaining: usize,
}

impl Iterator for StridedOffsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let cur = self.next;
        let dims = self.layout.dims();
        let strides = self.layout.strides();
        for d in (0..dims.len()).rev() {
            self.index[d] += 1;
            self.next += strides[d];
            if self.index[d] < dims[d] {
                break;
            }
            self.next -= strides[d] * dims[d];
            self.index[d] = 0;
        }
        Some(cur)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_transposed_strides() {
        let l = Layout::contiguous((2, 3)).permute(&[1, 0]).unwrap();
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn broadcast_uses_zero_strides() {
        let l = Layout::contiguous((3, 1))
            .broadcast_as(&Shape::from((2, 3, 4)))
            .unwrap();
        assert_eq!(l.strides(), &[0, 1, 0]);
        assert_eq!(l.offsets().take(5).collect::<Vec<_>>(), vec![0, 0, 0, 0, 1]);
    }

    #[test]
    fn narrow_moves_offset() {
        let l = Layout::contiguous((4, 5)).narrow(1, 2, 2).unwrap();
        assert_eq!(
            l.offsets().collect::<Vec<_>>(),
            vec![2, 3, 7, 8, 12, 13, 17, 18]
        );
        assert!(Layout::contiguous((4, 5)).narrow(1, 4, 2).is_err());
    }

    #[test]
    fn broadcast_shapes() {
        let a = Shape::from((2, 1, 4));
        assert_eq!(
            a.broadcast_with(&Shape::from((3, 1)), "t").unwrap(),
            Shape::from((2, 3, 4))
        );
        assert!(a.broadcast_with(&Shape::from((3, 5)), "t").is_err());
    }
}
