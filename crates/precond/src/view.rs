//! Parameter views: how a row-major tensor of any order is seen as the (b, m) matrix that a
//! [`crate::Preconditioner`] works on (NOTES §1).
//!
//! One axis is the *block axis*: its size is the number of blocks m, and block i (column i of the
//! view) holds every element whose block-axis index is i. All other axes are folded into the b
//! rows of a block, in row-major order of the remaining axes. For a burn `Linear` weight of shape
//! `[d_in, d_out]` (burn computes `x W`), the default block axis is the last one: blocks are the
//! columns, the weights into one output neuron, so b = d_in and m = d_out, as in the paper.
//!
//! Tensors are row-major (burn's layout); the view matrix is column-major, so gathering a 2-D
//! weight with the last block axis is a transpose of its memory layout.

use crate::error::{invalid, PrecondError, Result};
use crate::scalar::Scalar;
use faer::{MatMut, MatRef};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The (b, m) view of one parameter tensor. Build it with [`ParamView::new`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamView {
    shape: Vec<usize>,
    block_axis: usize,
    rows: usize,
    blocks: usize,
}

impl ParamView {
    /// The view of a row-major tensor of shape `shape` whose blocks run along `block_axis`
    /// (default: the last axis). Errors on a 0-d shape, a zero-sized axis, a block axis out of
    /// range, or an element count that overflows `usize`.
    pub fn new(shape: &[usize], block_axis: Option<usize>) -> Result<Self> {
        if shape.is_empty() {
            return Err(invalid(
                "shape",
                "[]",
                "a parameter needs at least one axis",
            ));
        }
        if shape.contains(&0) {
            return Err(invalid(
                "shape",
                format!("{shape:?}"),
                "empty tensors have no view",
            ));
        }
        let axis = block_axis.unwrap_or(shape.len() - 1);
        if axis >= shape.len() {
            return Err(invalid(
                "block_axis",
                axis,
                "must be smaller than the number of axes",
            ));
        }
        let mut rows: usize = 1;
        for (i, &s) in shape.iter().enumerate() {
            if i != axis {
                rows = rows.checked_mul(s).ok_or_else(|| {
                    invalid("shape", format!("{shape:?}"), "element count overflows")
                })?;
            }
        }
        let blocks = shape[axis];
        rows.checked_mul(blocks)
            .ok_or_else(|| invalid("shape", format!("{shape:?}"), "element count overflows"))?;
        Ok(Self {
            shape: shape.to_vec(),
            block_axis: axis,
            rows,
            blocks,
        })
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The axis whose index selects the block (column of the view).
    pub fn block_axis(&self) -> usize {
        self.block_axis
    }

    /// b: elements per block (product of all axes but the block axis).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// m: number of blocks (size of the block axis).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Number of elements, b · m.
    pub fn numel(&self) -> usize {
        self.rows * self.blocks
    }

    /// True for a 1-D tensor (a bias or a norm scale), which is never preconditioned by
    /// [`crate::optimizer::ParamOptimizer`].
    pub fn is_vector(&self) -> bool {
        self.shape.len() == 1
    }

    /// (outer, m, inner): the flat index of element (o, j, r) is (o·m + j)·inner + r, where o runs
    /// over the axes before the block axis and r over those after it. Row of the view: o·inner + r.
    /// Checked so that a deserialized, inconsistent view errors instead of panicking.
    fn layout(&self) -> Result<(usize, usize, usize)> {
        let bad = || PrecondError::StateMismatch(format!("inconsistent parameter view {self:?}"));
        if self.block_axis >= self.shape.len() || self.shape[self.block_axis] != self.blocks {
            return Err(bad());
        }
        let outer: usize = self.shape[..self.block_axis].iter().product();
        let inner: usize = self.shape[self.block_axis + 1..].iter().product();
        if outer.checked_mul(inner) != Some(self.rows) {
            return Err(bad());
        }
        Ok((outer, self.blocks, inner))
    }

    fn check(&self, flat_len: usize, nrows: usize, ncols: usize) -> Result<()> {
        if flat_len != self.numel() {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("{} elements (shape {:?})", self.numel(), self.shape),
                got: format!("{flat_len} elements"),
            });
        }
        if nrows != self.rows || ncols != self.blocks {
            return Err(PrecondError::ShapeMismatch {
                expected: format!("({}, {}) matrix", self.rows, self.blocks),
                got: format!("({nrows}, {ncols}) matrix"),
            });
        }
        Ok(())
    }

    /// Copies the row-major tensor `flat` into the (b, m) matrix `out` (any strides): column i
    /// receives block i. Allocates nothing. Errors (ShapeMismatch) on wrong sizes.
    pub fn gather<T: Scalar>(&self, flat: &[T], mut out: MatMut<'_, T>) -> Result<()> {
        self.check(flat.len(), out.nrows(), out.ncols())?;
        let (outer, m, inner) = self.layout()?;
        if inner == 1 {
            // A transpose (e.g. a [d_in, d_out] weight, blocks along axis 1): tiles of
            // `TILE` columns, each source row read once per tile.
            if let Some(cm) = out.as_mut().try_as_col_major_mut() {
                let mut cols: Vec<&mut [T]> = cm
                    .col_iter_mut()
                    .map(|c| c.try_as_col_major_mut().map(|c| c.as_slice_mut()))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                if cols.len() == m {
                    cols.par_chunks_mut(TILE).enumerate().for_each(|(t, tile)| {
                        let j0 = t * TILE;
                        for o in 0..outer {
                            let row = &flat[o * m + j0..o * m + j0 + tile.len()];
                            for (col, &v) in tile.iter_mut().zip(row) {
                                col[o] = v;
                            }
                        }
                    });
                    return Ok(());
                }
            }
            for j0 in (0..m).step_by(TILE) {
                let width = TILE.min(m - j0);
                for o in 0..outer {
                    let row = &flat[o * m + j0..o * m + j0 + width];
                    for (jj, &v) in row.iter().enumerate() {
                        out[(o, j0 + jj)] = v;
                    }
                }
            }
        } else if let Some(mut cm) = out.as_mut().try_as_col_major_mut() {
            for j in 0..m {
                let col = cm.as_mut().col_mut(j).as_slice_mut();
                for o in 0..outer {
                    let src = (o * m + j) * inner;
                    col[o * inner..(o + 1) * inner].copy_from_slice(&flat[src..src + inner]);
                }
            }
        } else {
            for o in 0..outer {
                for j in 0..m {
                    let src = (o * m + j) * inner;
                    for r in 0..inner {
                        out[(o * inner + r, j)] = flat[src + r];
                    }
                }
            }
        }
        Ok(())
    }

    /// The inverse of [`ParamView::gather`]: writes the (b, m) matrix `mat` back into the
    /// row-major tensor `flat`. Allocates nothing. Errors (ShapeMismatch) on wrong sizes.
    pub fn scatter<T: Scalar>(&self, mat: MatRef<'_, T>, flat: &mut [T]) -> Result<()> {
        self.check(flat.len(), mat.nrows(), mat.ncols())?;
        let (outer, m, inner) = self.layout()?;
        if inner == 1 {
            if let Some(cm) = mat.try_as_col_major() {
                let cols: Vec<&[T]> = cm
                    .col_iter()
                    .map(|c| c.try_as_col_major().map(|c| c.as_slice()))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                if cols.len() == m && m > 0 {
                    // Tasks of `ROWS` rows of the tensor, each written by tiles of columns.
                    flat.par_chunks_mut(m * ROWS)
                        .enumerate()
                        .for_each(|(t, rows)| {
                            for j0 in (0..m).step_by(TILE) {
                                let tile = &cols[j0..(j0 + TILE).min(m)];
                                for (dr, row) in rows.chunks_mut(m).enumerate() {
                                    let o = t * ROWS + dr;
                                    for (v, col) in row[j0..j0 + tile.len()].iter_mut().zip(tile) {
                                        *v = col[o];
                                    }
                                }
                            }
                        });
                    return Ok(());
                }
            }
            for j0 in (0..m).step_by(TILE) {
                let width = TILE.min(m - j0);
                for o in 0..outer {
                    let row = &mut flat[o * m + j0..o * m + j0 + width];
                    for (jj, v) in row.iter_mut().enumerate() {
                        *v = mat[(o, j0 + jj)];
                    }
                }
            }
        } else if let Some(cm) = mat.try_as_col_major() {
            for j in 0..m {
                let col = cm.col(j).as_slice();
                for o in 0..outer {
                    let dst = (o * m + j) * inner;
                    flat[dst..dst + inner].copy_from_slice(&col[o * inner..(o + 1) * inner]);
                }
            }
        } else {
            for o in 0..outer {
                for j in 0..m {
                    let dst = (o * m + j) * inner;
                    for r in 0..inner {
                        flat[dst + r] = mat[(o * inner + r, j)];
                    }
                }
            }
        }
        Ok(())
    }
}

/// Columns per tile of the transposing gather and scatter.
const TILE: usize = 16;
/// Rows of the tensor per parallel task of the transposing scatter.
const ROWS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// Row-major multi-index of flat index `f`.
    fn unravel(mut f: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for a in (0..shape.len()).rev() {
            idx[a] = f % shape[a];
            f /= shape[a];
        }
        idx
    }

    /// Independent definition of the view: element with multi-index `idx` goes to column
    /// idx[axis] and to the row given by the row-major rank of the other indices.
    fn expected_position(idx: &[usize], shape: &[usize], axis: usize) -> (usize, usize) {
        let mut row = 0;
        for a in 0..shape.len() {
            if a != axis {
                row = row * shape[a] + idx[a];
            }
        }
        (row, idx[axis])
    }

    fn check_shape(shape: &[usize], axis: Option<usize>) {
        let v = ParamView::new(shape, axis).unwrap();
        let ax = axis.unwrap_or(shape.len() - 1);
        let n: usize = shape.iter().product();
        assert_eq!(v.numel(), n);
        assert_eq!(v.blocks(), shape[ax]);
        assert_eq!(v.rows() * v.blocks(), n);
        let flat: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
        let mut mat = Mat::<f64>::zeros(v.rows(), v.blocks());
        v.gather(&flat, mat.as_mut()).unwrap();
        for (f, &x) in flat.iter().enumerate() {
            let (r, c) = expected_position(&unravel(f, shape), shape, ax);
            assert_eq!(mat[(r, c)], x, "shape {shape:?} axis {ax} flat {f}");
        }
        let mut back = vec![0.0; n];
        v.scatter(mat.as_ref(), &mut back).unwrap();
        assert_eq!(back, flat);

        // Non-contiguous output (a transposed view) takes the strided path.
        let mut t = Mat::<f64>::zeros(v.blocks(), v.rows());
        v.gather(&flat, t.as_mut().transpose_mut()).unwrap();
        assert_eq!(t.as_ref().transpose(), mat.as_ref());
        let mut back2 = vec![0.0; n];
        v.scatter(t.as_ref().transpose(), &mut back2).unwrap();
        assert_eq!(back2, flat);
    }

    #[test]
    fn gather_positions_2d_every_axis() {
        check_shape(&[3, 5], None);
        check_shape(&[3, 5], Some(0));
        check_shape(&[3, 5], Some(1));
        check_shape(&[1, 4], None);
        // More blocks than a tile of the transposing path, and a partial last tile.
        check_shape(&[5, 37], None);
        check_shape(&[37, 5], Some(0));
    }

    #[test]
    fn gather_positions_3d_every_axis() {
        for ax in [None, Some(0), Some(1), Some(2)] {
            check_shape(&[2, 3, 4], ax);
        }
        check_shape(&[7], None);
    }

    #[test]
    fn linear_weight_default_is_columns() {
        // burn Linear weight [d_in = 2, d_out = 3], row-major: w[i][j] at flat i*3 + j.
        let v = ParamView::new(&[2, 3], None).unwrap();
        assert_eq!((v.rows(), v.blocks(), v.block_axis()), (2, 3, 1));
        let flat = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut mat = Mat::<f32>::zeros(2, 3);
        v.gather(&flat, mat.as_mut()).unwrap();
        // Block j = column j of W = (w[0][j], w[1][j]).
        assert_eq!(mat[(0, 0)], 1.0);
        assert_eq!(mat[(1, 0)], 4.0);
        assert_eq!(mat[(0, 2)], 3.0);
        assert_eq!(mat[(1, 2)], 6.0);
        assert!(!v.is_vector());
        assert!(ParamView::new(&[5], None).unwrap().is_vector());
    }

    #[test]
    fn bad_shapes_error() {
        assert!(matches!(
            ParamView::new(&[], None),
            Err(PrecondError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ParamView::new(&[3, 0], None),
            Err(PrecondError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ParamView::new(&[3, 4], Some(2)),
            Err(PrecondError::InvalidConfig { .. })
        ));
        assert!(matches!(
            ParamView::new(&[usize::MAX, 3], None),
            Err(PrecondError::InvalidConfig { .. })
        ));
        let v = ParamView::new(&[3, 4], None).unwrap();
        let mut m = Mat::<f32>::zeros(3, 4);
        assert!(matches!(
            v.gather(&[0.0f32; 11], m.as_mut()),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        let mut wrong = Mat::<f32>::zeros(4, 3);
        assert!(matches!(
            v.gather(&[0.0f32; 12], wrong.as_mut()),
            Err(PrecondError::ShapeMismatch { .. })
        ));
        let mut flat = [0.0f32; 13];
        assert!(matches!(
            v.scatter(m.as_ref(), &mut flat),
            Err(PrecondError::ShapeMismatch { .. })
        ));
    }
}
