//! The fused ops' flex implementations that really fuse: each works on the tensors' f32
//! storage in one pass per row or block, spread over rayon's threads, where the
//! primitive-op twin runs one single-threaded flex op after another and allocates every
//! intermediate. The twin stays the definition (and serves the dtypes these do not take).
//!
//! Determinism: every thread writes its own rows, blocks or heads, and each is computed in
//! a fixed order with single-threaded `gemm` calls, so a result's bits do not depend on the
//! thread count or on scheduling.

pub(crate) mod attention;
pub mod blas;
pub(crate) mod dots;
pub(crate) mod logits;
pub(crate) mod products;
pub(crate) mod rows;
mod workers;

pub use workers::on_workers;

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData};

/// A strided f32 matrix inside a slice: element `(i, j)` at `start + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` block starting at `start`, rows `ld` apart.
    pub fn rows(data: &'a [f32], start: usize, rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            start,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose, without a copy.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside the slice (what makes the `gemm` call sound).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.start + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = (accumulate ? dst : 0) + scale · lhs·rhs` on the calling thread, `dst` row-major
/// `[lhs.rows, rhs.cols]` with rows `ld` apart: OpenBLAS where it is loaded ([`blas`]);
/// otherwise dot products for a few rows against a transposed weight ([`dots`]), `gemm`
/// for the rest.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "gemm_into: inner dimensions");
    assert!(lhs.fits() && rhs.fits(), "gemm_into: operand out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * ld + n <= dst.len(),
        "gemm_into: destination out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 && blas::sgemm(dst, ld, accumulate, &lhs, &rhs, scale) {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * ld..i * ld + n].fill(0.0);
            }
        }
        return;
    }
    if dots::suits(&lhs, &rhs) {
        dots::dots_into(dst, ld, accumulate, &lhs, &rhs, scale);
        return;
    }
    // SAFETY: `fits` and the assert above bound every element gemm reads or writes inside
    // its slice; `dst` is borrowed mutably, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.start),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.start),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A contiguous f32 copy of a flex tensor's values (the tensor itself when it already is
/// one), or `None` for another dtype.
pub(crate) fn f32_contiguous(x: &FlexTensor) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        x.to_contiguous()
    };
    Some(x)
}

/// A contiguous byte-per-value copy of a flex bool tensor, or `None` for a wider store.
pub(crate) fn bool_contiguous(x: &FlexTensor) -> Option<FlexTensor> {
    use burn::backend::BoolStore;
    if !matches!(x.dtype(), DType::Bool(BoolStore::Native | BoolStore::U8)) {
        return None;
    }
    Some(if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        x.to_contiguous()
    })
}

/// A flex tensor holding `values` (no copy).
pub(crate) fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}
