//! The projections' products on flex through [`super::blas`]: `x·Wᵀ`, `g·W` and `gᵀ·x`,
//! on the tensors' storage at their strides (a transposed view costs no copy).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

use super::{Mat, blas, tensor};

/// A 2-D f32 flex tensor as a [`Mat`], or `None` for another dtype, rank, or a negative
/// stride.
fn mat(t: &FlexTensor) -> Option<Mat<'_>> {
    if t.dtype() != DType::F32 || t.shape().num_dims() != 2 {
        return None;
    }
    let [rows, cols] = t.shape().dims::<2>();
    let strides = t.layout().strides();
    let (rs, cs) = (
        usize::try_from(strides[0]).ok()?,
        usize::try_from(strides[1]).ok()?,
    );
    Some(Mat {
        data: t.storage(),
        start: t.layout().start_offset(),
        rows,
        cols,
        rs,
        cs,
    })
}

/// `a·bᵀ` (`b_transposed`) or `a·b`, through OpenBLAS with the rows split over the
/// threads; `None` when OpenBLAS is not loaded or an operand is not a plain f32 matrix
/// (the caller then runs flex's matmul).
pub(crate) fn product(a: &FlexTensor, b: &FlexTensor, b_transposed: bool) -> Option<FlexTensor> {
    if !blas::available() {
        return None;
    }
    let (a, b) = (mat(a)?, mat(b)?);
    let b = if b_transposed { b.t() } else { b };
    if a.cols != b.rows {
        return None;
    }
    let (m, n) = (a.rows, b.cols);
    Some(tensor(blas::matmul_rows(a, b), [m, n]))
}
