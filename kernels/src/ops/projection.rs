//! A projection `x·Wᵀ` of a few rows, with `W` in Hugging Face's `[out, in]` layout: the
//! matmul of every decoding step (one row per sequence being generated).
//!
//! No fused kernel. On flex with OpenBLAS loaded every projection goes through
//! [`cpu::products`], which cuts a decoding step's few rows into narrow column parts
//! ([`cpu::blas`]). Without it, a single row's output columns are spread over the cores
//! ([`split_columns`]): flex hands each matmul to `gemm` whole, and `gemm` runs a
//! matrix-vector product on one thread. Two to sixteen rows (batched decoding) become dot
//! products, each weight row read once for all of them, in column parts over the cores
//! (`cpu/dots.rs`): gemm would pack the weight for every product. Every other backend runs
//! its own matmul.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use super::node::{Backprop, all_kept, on_inner, record};
use crate::cpu;

/// Without OpenBLAS, up to this many rows a projection goes through
/// [`ProjectionOps::project`] (a decoding step's batch: one row through gemm's
/// matrix-vector kernel, more as dot products); above it the model keeps burn's plain
/// `linear`, bit for bit what it ran before (training's batch × sequence rows and
/// prefills, whose matmuls flex already threads). With OpenBLAS every projection does.
pub const FEW_ROWS: usize = cpu::dots::DOT_MAX_ROWS;

/// Below this many weights (`out × in`) one core is faster than handing out the work.
const SPLIT_MIN_WEIGHTS: usize = 1 << 16;

/// `x·Wᵀ`: `x` `[..., in]`, `w` `[out, in]` → `[..., out]`, through
/// [`ProjectionOps::project`] when OpenBLAS is loaded ([`cpu::blas`]) or, without it, for
/// at most [`FEW_ROWS`] rows (a decoding step's batch); through burn's `linear` otherwise.
pub fn project<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if rows > FEW_ROWS && !cpu::blas::available() {
        return burn::tensor::module::linear(x, w.transpose(), None);
    }
    let [out, _] = w.dims();
    let flat: Tensor<2> = x.reshape([rows as i32, dims[D - 1] as i32]);
    let y = Tensor::<2>::from_dispatch(Dispatch::project(flat.into_dispatch(), w.into_dispatch()));
    let mut shape = dims;
    shape[D - 1] = out;
    y.reshape(shape)
}

/// A projection's three products, as one backend computes them: the head's chunked
/// log-probs take them as a value so that flex's can be [`ProjectionOps`]' own.
pub(crate) struct Products<B: Backend> {
    /// `x·Wᵀ`: `x` `[M, K]`, `w` `[N, K]`.
    pub xwt: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    /// `g·W`: `g` `[M, N]`, `w` `[N, K]`.
    pub gw: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    /// `gᵀ·x`: `g` `[M, N]`, `x` `[M, K]`.
    pub gtx: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
}

impl<B: Backend> Products<B> {
    /// The backend's matmul.
    pub fn plain() -> Self {
        Self {
            xwt: matmul_transposed::<B>,
            gw: B::float_matmul,
            gtx: |g, x| B::float_matmul(B::float_transpose(g), x),
        }
    }
}

impl Products<Flex> {
    /// flex's projections: OpenBLAS where it is loaded.
    pub fn flex() -> Self {
        Self {
            xwt: <Flex as ProjectionOps>::project,
            gw: <Flex as ProjectionOps>::project_input_grad,
            gtx: <Flex as ProjectionOps>::project_weight_grad,
        }
    }
}

/// `x·Wᵀ` on primitives, the backend's own matmul: what every backend but flex runs.
fn matmul_transposed<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(x, B::float_transpose(w))
}

/// The backend extension; the default body is the backend's matmul.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait ProjectionOps: Backend {
    /// `x·Wᵀ` for `x` `[M, K]` (few rows) and `w` `[N, K]`: `[M, N]`.
    #[fusion(default)]
    fn project(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        matmul_transposed::<Self>(x, w)
    }

    /// `g·W`, the input's gradient: `g` `[M, N]`, `w` `[N, K]` → `[M, K]`.
    #[fusion(default)]
    fn project_input_grad(g: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(g, w)
    }

    /// `gᵀ·x`, the weight's gradient: `g` `[M, N]`, `x` `[M, K]` → `[N, K]`.
    #[fusion(default)]
    fn project_weight_grad(g: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(Self::float_transpose(g), x)
    }
}

impl ProjectionOps for Flex {
    fn project(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let threads = rayon::current_num_threads();
        let [m, k] = x.shape().dims::<2>();
        let [n, _] = w.shape().dims::<2>();
        let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
        // OpenBLAS where it is loaded (it splits a decoding step's few rows by columns).
        if let Some(y) = cpu::products::product(&x, &w, true) {
            return y;
        }
        // Without it (and past the few rows `product` takes as dot products), one row only:
        // gemm's matrix-vector kernel takes one dot product per column, so the split gives
        // the bits of the whole.
        if m == 1 && f32s && threads >= 2 && n >= 2 * threads && n * k >= SPLIT_MIN_WEIGHTS {
            return split_columns(&x, &w, n, k, threads);
        }
        matmul_transposed::<Flex>(x, w)
    }

    fn project_input_grad(g: FlexTensor, w: FlexTensor) -> FlexTensor {
        cpu::products::product(&g, &w, false).unwrap_or_else(|| Flex::float_matmul(g, w))
    }

    fn project_weight_grad(g: FlexTensor, x: FlexTensor) -> FlexTensor {
        let gt = Flex::float_transpose(g);
        cpu::products::product(&gt, &x, false).unwrap_or_else(|| Flex::float_matmul(gt, x))
    }
}

/// `x·Wᵀ` for one row `x` `[1, K]`, with the `N` output columns cut into one slice per
/// thread, each slice one single-threaded `gemm` call (the matrix-vector kernel flex's
/// matmul would have run, on fewer columns): every column is the same dot product, so the
/// bits are those of the whole product, whatever the thread count.
fn split_columns(x: &FlexTensor, w: &FlexTensor, n: usize, k: usize, threads: usize) -> FlexTensor {
    let (x_rs, x_cs) = strides_2d(x);
    let (w_rs, w_cs) = strides_2d(w);
    let x_data: &[f32] = x.storage();
    let w_data: &[f32] = w.storage();
    let x_start = x.layout().start_offset();
    let w_start = w.layout().start_offset();
    let mut out = vec![0f32; n];
    let width = n.div_ceil(threads);
    out.par_chunks_mut(width)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * width;
            // SAFETY: `dst` holds the `dst.len()` outputs of columns `first..`; `x`'s `k`
            // values and those rows of `w` lie inside their storage at the strides read
            // off their layouts.
            unsafe {
                gemm::gemm(
                    1,
                    dst.len(),
                    k,
                    dst.as_mut_ptr(),
                    1,
                    1,
                    false,
                    x_data.as_ptr().add(x_start),
                    x_cs,
                    x_rs,
                    w_data.as_ptr().add(w_start).offset(first as isize * w_rs),
                    w_rs,
                    w_cs,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    FlexTensor::from_data(burn::tensor::TensorData::new(out, Shape::new([1, n])))
}

/// (row stride, column stride) of a 2-D flex tensor, in elements.
fn strides_2d(t: &FlexTensor) -> (isize, isize) {
    let strides = t.layout().strides();
    (strides[0], strides[1])
}

impl<B: ProjectionOps, C: CheckpointStrategy> ProjectionOps for Autodiff<B, C> {
    fn project(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C, _, _, _, _>(
            Node,
            [x, w],
            (),
            |[x, w], ()| (B::project(x, w), ()),
            |(), _, _| (),
        )
        .0
    }

    on_inner! {
        fn project_input_grad(g: Float, w: Float) -> Float;
        fn project_weight_grad(g: Float, x: Float) -> Float;
    }
}

/// Keeps both inputs: `dx = g·W`, `dW = gᵀ·x`.
#[derive(Debug)]
struct Node;

impl<B: ProjectionOps> Backprop<B, 2> for Node {
    const KEEPS: [bool; 2] = [true, true];
    type Saved = ();

    fn backward(
        inputs: [Option<FloatTensor<B>>; 2],
        (): (),
        grad: FloatTensor<B>,
        [want_x, want_w]: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let [x, w] = all_kept(inputs);
        let dx = want_x.then(|| B::project_input_grad(grad.clone(), w));
        let dw = want_w.then(|| B::project_weight_grad(grad, x));
        [dx, dw]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData, Tolerance};

    use super::{Flex, matmul_transposed, project, split_columns};

    /// Deterministic values in [-1, 1), shared with the selftest.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        crate::selftest::values(n, seed as u64)
    }

    fn tensor(shape: [usize; 2], seed: usize, device: &Device) -> Tensor<2> {
        let data = TensorData::new(values(shape[0] * shape[1], seed), shape);
        Tensor::from_data(data, device)
    }

    /// The fallback without OpenBLAS, called directly so that it is tested where OpenBLAS
    /// loads too (CI): one row's columns split over a thread count that does not divide
    /// them give exactly the bits of flex's whole matmul.
    #[test]
    fn one_row_column_split_gives_the_whole_matmuls_bits() {
        let (n, k) = (1000, 300);
        let x = crate::cpu::tensor(values(k, 1), [1, k]);
        let w = crate::cpu::tensor(values(n * k, 2), [n, k]);
        let want = matmul_transposed::<Flex>(x.clone(), w.clone());
        for threads in [2, 3] {
            let got = split_columns(&x, &w, n, k, threads);
            let (got, want): (&[f32], &[f32]) = (got.storage(), want.storage());
            assert_eq!(got, want, "{threads} threads");
        }
    }

    /// Without OpenBLAS, splitting one row's columns over threads gives the matmul's bits
    /// exactly, with a thread count that does not divide the columns. OpenBLAS's products
    /// (every row count where it is loaded), several rows, and both gradients match it to
    /// f32 rounding; a second product gives the same bits.
    #[test]
    fn split_projection_gives_the_matmuls_bits() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let device = Device::flex().autodiff();
            for (m, n, k) in [
                (1, 1000, 300),
                (1, 49_153, 64),
                (3, 517, 256),
                (16, 1536, 64),
            ] {
                let x = tensor([m, k], 1, &device).require_grad();
                let w = tensor([n, k], 2, &device).require_grad();
                let weights = tensor([m, n], 3, &device);
                let want = x.clone().matmul(w.clone().transpose());
                let got = project(x.clone(), w.clone());
                // Sums of up to 49 153 products in another order: f32 rounding, relative.
                let tol = Tolerance::relative(1e-4).set_absolute(1e-3);
                if m == 1 && !crate::cpu::blas::available() {
                    assert_eq!(got.to_data(), want.to_data(), "{m}×{n}×{k}");
                } else {
                    got.to_data().assert_approx_eq::<f32>(&want.to_data(), tol);
                }
                let again = project(x.clone(), w.clone());
                assert_eq!(
                    got.to_data(),
                    again.to_data(),
                    "{m}×{n}×{k}: not repeatable"
                );
                let want_grads = (want * weights.clone()).sum().backward();
                let got_grads = (got * weights).sum().backward();
                for (name, p) in [("x", &x), ("w", &w)] {
                    let g = p.grad(&got_grads).unwrap().into_data();
                    let e = p.grad(&want_grads).unwrap().into_data();
                    g.assert_approx_eq::<f32>(&e, tol);
                    assert_eq!(g.shape(), e.shape(), "{name}");
                }
            }
        });
    }
}
