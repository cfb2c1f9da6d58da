//! The projections' products on flex through [`super::blas`]: `x·Wᵀ`, `g·W` and `gᵀ·x`,
//! on the tensors' storage at their strides (a transposed view costs no copy).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

use super::{Mat, blas, dots, tensor};

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

/// `a·bᵀ` (`b_transposed`) or `a·b`, through OpenBLAS, split over the threads; `None` when
/// an operand is not a plain f32 matrix (the caller then runs flex's matmul). Without
/// OpenBLAS only a decoding step's few rows (2 to [`dots::DOT_MAX_ROWS`]) against a
/// transposed weight are taken, as dot products; one row keeps gemm's matrix-vector kernel
/// (`ops/projection.rs`), the rest flex's matmul.
pub(crate) fn product(a: &FlexTensor, b: &FlexTensor, b_transposed: bool) -> Option<FlexTensor> {
    let (a, b) = (mat(a)?, mat(b)?);
    let b = if b_transposed { b.t() } else { b };
    if a.cols != b.rows {
        return None;
    }
    if !blas::available() && (a.rows < 2 || !dots::suits(&a, &b)) {
        return None;
    }
    let (m, n) = (a.rows, b.cols);
    Some(tensor(blas::matmul(a, b), [m, n]))
}

/// LoRA's up-projection folded into the base output, `base + s·down·Bᵀ`, in place in
/// `base`'s buffer when nothing else holds it; `base` back unchanged as the error when
/// OpenBLAS is not loaded or an operand is not a plain f32 matrix.
pub(crate) fn lora_up(
    base: FlexTensor,
    down: &FlexTensor,
    b: &FlexTensor,
    scale: f32,
) -> Result<FlexTensor, FlexTensor> {
    let (Some(down_m), Some(b_m)) = (mat(down), mat(b)) else {
        return Err(base);
    };
    let plain =
        base.dtype() == DType::F32 && base.is_contiguous() && base.layout().start_offset() == 0;
    if !blas::available() || !plain || down_m.cols != b_m.cols {
        return Err(base);
    }
    let [n, o] = base.shape().dims::<2>();
    if down_m.rows != n || b_m.rows != o {
        return Err(base);
    }
    let mut out = base;
    blas::matmul_into(out.storage_mut::<f32>(), down_m, b_m.t(), scale, true);
    Ok(out)
}

/// `s·(g·B, gᵀ·down)`, LoRA up-projection's gradients for `down` and `B`; `None` as
/// [`product`].
pub(crate) fn lora_up_grads(
    down: &FlexTensor,
    b: &FlexTensor,
    grad: &FlexTensor,
    scale: f32,
) -> Option<(FlexTensor, FlexTensor)> {
    if !blas::available() {
        return None;
    }
    let (down_m, b_m, g) = (mat(down)?, mat(b)?, mat(grad)?);
    if g.cols != b_m.rows || g.rows != down_m.rows || down_m.cols != b_m.cols {
        return None;
    }
    let mut d_down = vec![0f32; g.rows * b_m.cols];
    blas::matmul_into(&mut d_down, g, b_m, scale, false);
    let mut d_b = vec![0f32; g.cols * down_m.cols];
    blas::matmul_into(&mut d_b, g.t(), down_m, scale, false);
    Some((
        tensor(d_down, [g.rows, b_m.cols]),
        tensor(d_b, [g.cols, down_m.cols]),
    ))
}
