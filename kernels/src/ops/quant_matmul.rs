//! `x·Wᵀ` with a frozen weight stored blockwise quantized (QLoRA's NF4, GGUF's Q8_0),
//! dequantized one tile at a time inside the matmul: the whole matrix never exists in
//! float. The kernel is `cube/quant_matmul.rs`; on flex a tiled twin dequantizes 64 rows
//! (forward) or one 256-column slab (input gradient) at a time into a scratch buffer and
//! hands it to `gemm`. The weight takes no gradient; only `x` does.
//!
//! The layout (see [`QuantLayout`]): `bits`-bit code indices packed into u32 words along
//! each row, little end first (value `j` of a word in bits `bits·j ..`), `packed`
//! `[N, K·bits/32]`; one f32 scale per `block` consecutive values of a row, `scales`
//! `[N·K/block]`; the code table `code` `[2^bits]`. Then
//! `W[n, k] = code[index(n, k)] · scales[(n·K + k) / block]`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Int, Shape, Tensor, TensorData};
use rayon::prelude::*;

use super::cast_to;
use super::node::{Backprop, on_inner, record};

/// Weight rows dequantized per forward tile on flex.
const TILE_ROWS: usize = 64;
/// Weight columns dequantized per input-gradient slab on flex (a multiple of every block).
const SLAB_COLS: usize = 256;

/// How a quantized weight is laid out: bits per code index and values per scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantLayout {
    /// 4 (NF4) or 8 (Q8_0).
    pub bits: u32,
    /// Values sharing one scale: 64 (NF4), 32 (Q8_0).
    pub block: u32,
}

impl QuantLayout {
    /// Code indices per u32 word.
    pub fn per_word(self) -> usize {
        (32 / self.bits) as usize
    }
}

/// Packs code indices (each below `2^bits`) into u32 words, little end first; `codes.len()`
/// is a whole number of words.
pub fn pack_codes(codes: &[u8], bits: u32) -> Vec<u32> {
    let per_word = (32 / bits) as usize;
    codes
        .chunks(per_word)
        .map(|w| {
            w.iter().enumerate().fold(0u32, |acc, (j, &c)| {
                acc | (u32::from(c) << (bits as usize * j))
            })
        })
        .collect()
}

/// `x·Wᵀ`: `x` `[..., K]` in any float dtype, `W` `[N, K]` quantized as `packed`, `scales`
/// and `code` (see the module doc) → `[..., N]` in `x`'s dtype, accumulated in f32.
pub fn quant_matmul<const D: usize>(
    x: Tensor<D>,
    packed: Tensor<2, Int>,
    scales: Tensor<1>,
    code: Tensor<1>,
    layout: QuantLayout,
) -> Tensor<D> {
    let dims = x.dims();
    let n = packed.dims()[0];
    let flat: Tensor<2> = x.reshape([-1, dims[D - 1] as i32]);
    let out = Dispatch::quant_matmul(
        flat.into_dispatch(),
        packed.into_dispatch(),
        scales.into_dispatch(),
        code.into_dispatch(),
        layout.bits,
        layout.block,
    );
    let mut shape = dims;
    shape[D - 1] = n;
    Tensor::<2>::from_dispatch(out).reshape(shape)
}

/// A frozen blockwise-quantized `[N, K]` matrix as the tensors the ops take: what a
/// quantized projection, output head or embedding table hands them.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// `[N, K·bits/32]` u32 words of code indices.
    pub packed: Tensor<2, Int>,
    /// `[N·K/block]`, f32.
    pub scales: Tensor<1>,
    /// `[2^bits]`, f32.
    pub code: Tensor<1>,
    /// `[N·K/block]` f32, added to each block's values (GGUF's types with a minimum):
    /// `W[n, k] = code[index(n, k)] · scale + offset`. Being constant over a block, its
    /// part of `x·Wᵀ` is the block sums of `x` times the offsets, a `[M, K/block]·[K/block, N]`
    /// product beside the quantized one.
    pub offsets: Option<Tensor<1>>,
    pub layout: QuantLayout,
}

impl QuantMatrix {
    /// `[N, K]`.
    pub fn dims(&self) -> [usize; 2] {
        let [n, words] = self.packed.dims();
        [n, words * self.layout.per_word()]
    }

    /// `x·Wᵀ` in `x`'s dtype, with the input's gradient when `x` is tracked.
    pub fn matmul<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = quant_matmul(
            x.clone(),
            self.packed.clone(),
            self.scales.clone(),
            self.code.clone(),
            self.layout,
        );
        let Some(offsets) = self.offsets_by_row() else {
            return y;
        };
        let dims = y.dims();
        let [_, k] = self.dims();
        let (nb, block) = (k / self.layout.block as usize, self.layout.block as usize);
        let sums: Tensor<2> = x
            .cast(DType::F32)
            .reshape([-1, nb as i32, block as i32])
            .sum_dim(2)
            .reshape([-1, nb as i32]);
        let shift = sums.matmul(offsets.transpose()).reshape(dims);
        let dtype = y.dtype();
        (y.cast(DType::F32) + shift).cast(dtype)
    }

    /// The offsets as `[N, K/block]`, untracked.
    fn offsets_by_row(&self) -> Option<Tensor<2>> {
        let [n, _] = self.dims();
        self.offsets
            .as_ref()
            .map(|o| o.clone().detach().cast(DType::F32).reshape([n as i32, -1]))
    }

    /// `[M, K/block]` → `[M, K]`, each value repeated over its block.
    fn spread(&self, per_block: Tensor<2>) -> Tensor<2> {
        let [m, nb] = per_block.dims();
        let block = self.layout.block as usize;
        per_block
            .reshape([m, nb, 1])
            .expand([m, nb, block])
            .reshape([m, nb * block])
    }

    /// `g·W` for `g` `[M, N]`: the input gradient of [`QuantMatrix::matmul`], computed
    /// outside autodiff (the result is not tracked).
    pub fn input_grad(&self, g: Tensor<2>) -> Tensor<2> {
        let g = g.detach();
        let dx: Tensor<2> = Tensor::from_dispatch(Dispatch::quant_matmul_backward(
            g.clone().into_dispatch(),
            self.packed.clone().into_dispatch(),
            self.scales.clone().detach().into_dispatch(),
            self.code.clone().detach().into_dispatch(),
            self.layout.bits,
            self.layout.block,
        ));
        match self.offsets_by_row() {
            Some(o) => {
                let shift = self.spread(g.cast(DType::F32).matmul(o));
                let dtype = dx.dtype();
                (dx.cast(DType::F32) + shift).cast(dtype)
            }
            None => dx,
        }
    }

    /// Rows `ids` `[n]` of the matrix, dequantized to f32 `[n, K]`: an embedding lookup
    /// that touches only the rows asked for. No gradient (the matrix is frozen).
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let [_, k] = self.dims();
        let n = ids.dims()[0];
        let per_row = k / self.layout.block as usize;
        let packed = self.packed.clone().select(0, ids.clone());
        let scales = self
            .scales
            .clone()
            .detach()
            .reshape([-1, per_row as i32])
            .select(0, ids.clone())
            .reshape([n * per_row]);
        let rows: Tensor<2> = Tensor::from_dispatch(dequantize_twin::<Dispatch>(
            packed.into_dispatch(),
            scales.into_dispatch(),
            self.code.clone().detach().into_dispatch(),
            self.layout.bits,
            self.layout.block,
        ));
        match self.offsets_by_row() {
            Some(o) => rows + self.spread(o.select(0, ids)),
            None => rows,
        }
    }
}

/// The whole weight `[N, K]` in f32, from its quantized parts on the host: what merging an
/// adapter into a quantized base, and the tests' reference, start from.
pub fn dequantize_host(
    packed: &[u32],
    scales: &[f32],
    code: &[f32],
    layout: QuantLayout,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; n * k];
    dequantize_into(packed, scales, code, layout, k, 0..n, 0..k, &mut out);
    out
}

/// Dequantizes rows `rows` × columns `cols` of the `[N, k]` weight into `out`
/// (row-major, `cols.len()` wide). `cols` starts and ends on word boundaries.
#[allow(clippy::too_many_arguments)]
fn dequantize_into(
    packed: &[u32],
    scales: &[f32],
    code: &[f32],
    layout: QuantLayout,
    k: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let per_word = layout.per_word();
    let words = k / per_word;
    let mask = (1u32 << layout.bits) - 1;
    let (bits, block) = (layout.bits as usize, layout.block as usize);
    let width = cols.len();
    for (r, n) in rows.enumerate() {
        let dst = &mut out[r * width..(r + 1) * width];
        for (c, kk) in cols.clone().step_by(per_word).enumerate() {
            let word = packed[n * words + kk / per_word];
            for j in 0..per_word {
                let idx = ((word >> (bits * j)) & mask) as usize;
                dst[c * per_word + j] = code[idx] * scales[(n * k + kk + j) / block];
            }
        }
    }
}

/// The backend extension. The default bodies are the primitive-op twin: dequantize the
/// whole weight, then the backend's matmul — the specification the tiled twin and the
/// kernel are checked against, not a path the model takes.
#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait QuantMatmulOps: Backend {
    /// `x·Wᵀ` for `x` `[M, K]` and the quantized `W` `[N, K]`: `[M, N]` in `x`'s dtype.
    #[fusion(dtype = x, shape = Shape::new([x[0], packed[0]]))]
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        code: FloatTensor<Self>,
        bits: u32,
        block: u32,
    ) -> FloatTensor<Self> {
        let dtype: FloatDType = x.dtype().into();
        let w = dequantize_twin::<Self>(packed, scales, code, bits, block);
        let x = cast_to::<Self>(x, FloatDType::F32);
        let y = Self::float_matmul(x, Self::float_transpose(w));
        cast_to::<Self>(y, dtype)
    }

    /// The input's gradient `g·W`: `g` `[M, N]` → `[M, K]` in `g`'s dtype.
    #[fusion(dtype = grad, shape = Shape::new([grad[0], packed[1] * (32 / *bits as usize)]))]
    fn quant_matmul_backward(
        grad: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        code: FloatTensor<Self>,
        bits: u32,
        block: u32,
    ) -> FloatTensor<Self> {
        let dtype: FloatDType = grad.dtype().into();
        let w = dequantize_twin::<Self>(packed, scales, code, bits, block);
        let g = cast_to::<Self>(grad, FloatDType::F32);
        cast_to::<Self>(Self::float_matmul(g, w), dtype)
    }
}

/// The whole weight `[N, K]` in f32 from primitive ops: each word's indices by shift and
/// mask, looked up in the code table, times its block's scale.
pub fn dequantize_twin<B: Backend>(
    packed: IntTensor<B>,
    scales: FloatTensor<B>,
    code: FloatTensor<B>,
    bits: u32,
    block: u32,
) -> FloatTensor<B> {
    let [n, words] = packed.shape().dims::<2>();
    let per_word = (32 / bits) as usize;
    let k = words * per_word;
    let mask = (1i64 << bits) - 1;
    let parts: Vec<IntTensor<B>> = (0..per_word)
        .map(|j| {
            let shifted =
                B::bitwise_right_shift_scalar(packed.clone(), (bits as i64 * j as i64).into());
            let idx = B::bitwise_and_scalar(shifted, mask.into());
            B::int_reshape(idx, Shape::new([n, words, 1]))
        })
        .collect();
    let idx = B::int_reshape(B::int_cat(parts, 2), Shape::new([n * k]));
    let idx = B::int_cast(idx, burn::tensor::IntDType::I32);
    let values = B::float_select(cast_to::<B>(code, FloatDType::F32), 0, idx);
    let blocks = n * k / block as usize;
    let scales = B::float_reshape(
        cast_to::<B>(scales, FloatDType::F32),
        Shape::new([blocks, 1]),
    );
    let scales = B::float_expand(scales, Shape::new([blocks, block as usize]));
    let w = B::float_mul(
        B::float_reshape(values, Shape::new([blocks, block as usize])),
        scales,
    );
    B::float_reshape(w, Shape::new([n, k]))
}

/// The f32 values of a flex tensor, contiguous.
fn f32_values(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        Flex::float_cast(t, FloatDType::F32)
    };
    t.to_contiguous()
}

/// The quantized parts as host slices: packed words, scales and code (f32).
struct HostWeight {
    packed: FlexTensor,
    scales: FlexTensor,
    code: FlexTensor,
    layout: QuantLayout,
    n: usize,
    k: usize,
}

impl HostWeight {
    fn new(
        packed: FlexTensor,
        scales: FlexTensor,
        code: FlexTensor,
        bits: u32,
        block: u32,
    ) -> Self {
        let layout = QuantLayout { bits, block };
        let [n, words] = packed.shape().dims::<2>();
        Self {
            packed: packed.to_contiguous(),
            scales: f32_values(scales),
            code: f32_values(code),
            layout,
            n,
            k: words * layout.per_word(),
        }
    }

    /// Rows × columns of the weight, dequantized into `out`.
    fn tile(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, out: &mut [f32]) {
        dequantize_into(
            self.packed.as_slice::<u32>().unwrap_or_default(),
            self.scales.as_slice::<f32>().unwrap_or_default(),
            self.code.as_slice::<f32>().unwrap_or_default(),
            self.layout,
            self.k,
            rows,
            cols,
            out,
        );
    }
}

/// `dst = lhs·rhs` for row-major `lhs` `[m, k]` given by pointer and strides; one
/// single-threaded `gemm` call (the caller spreads calls over threads).
///
/// # Safety
/// Every pointer covers the elements its strides and sizes reach.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            false,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A `[m, rows]` product built transposed, `[rows, m]`, `chunk` rows per parallel task so
/// each task writes whole rows: `task(first_row, dst)` fills `dst` (`[dst.len() / m, m]`).
/// Returned as the transposed view, in `dtype`.
fn by_row_chunks(
    rows: usize,
    m: usize,
    chunk: usize,
    dtype: DType,
    task: impl Fn(usize, &mut [f32]) + Sync,
) -> FlexTensor {
    let mut t = vec![0f32; rows * m];
    t.par_chunks_mut(chunk * m.max(1))
        .enumerate()
        .for_each(|(i, dst)| task(i * chunk, dst));
    let y = FlexTensor::from_data(TensorData::new(t, [rows, m])).transpose(0, 1);
    if dtype == DType::F32 {
        y
    } else {
        Flex::float_cast(y, dtype.into())
    }
}

impl QuantMatmulOps for Flex {
    fn quant_matmul(
        x: FlexTensor,
        packed: FlexTensor,
        scales: FlexTensor,
        code: FlexTensor,
        bits: u32,
        block: u32,
    ) -> FlexTensor {
        let dtype = x.dtype();
        let w = HostWeight::new(packed, scales, code, bits, block);
        let x = f32_values(x);
        let xs = x.as_slice::<f32>().unwrap_or_default();
        let [m, k] = x.shape().dims::<2>();
        // Yᵀ `[N, M]`, a tile of weight rows per task.
        by_row_chunks(w.n, m, TILE_ROWS, dtype, |n0, dst| {
            let rows = dst.len() / m.max(1);
            let mut tile = vec![0f32; rows * k];
            w.tile(n0..n0 + rows, 0..k, &mut tile);
            // SAFETY: `tile` is `[rows, k]`, `xs` `[m, k]` read transposed, `dst`
            // `[rows, m]`; all row-major and whole.
            unsafe {
                gemm_into(
                    rows,
                    m,
                    k,
                    dst.as_mut_ptr(),
                    m as isize,
                    tile.as_ptr(),
                    1,
                    k as isize,
                    xs.as_ptr(),
                    k as isize,
                    1,
                );
            }
        })
    }

    fn quant_matmul_backward(
        grad: FlexTensor,
        packed: FlexTensor,
        scales: FlexTensor,
        code: FlexTensor,
        bits: u32,
        block: u32,
    ) -> FlexTensor {
        let dtype = grad.dtype();
        let w = HostWeight::new(packed, scales, code, bits, block);
        let g = f32_values(grad);
        let gs = g.as_slice::<f32>().unwrap_or_default();
        let [m, n] = g.shape().dims::<2>();
        // dXᵀ `[K, M]`, a slab of weight columns per task: dXᵀ[k0.., :] = slabᵀ · gᵀ.
        by_row_chunks(w.k, m, SLAB_COLS, dtype, |k0, dst| {
            let cols = dst.len() / m.max(1);
            let mut slab = vec![0f32; n * cols];
            w.tile(0..n, k0..k0 + cols, &mut slab);
            // SAFETY: `slab` is `[n, cols]` read transposed, `gs` `[m, n]` read
            // transposed, `dst` `[cols, m]`; all row-major and whole.
            unsafe {
                gemm_into(
                    cols,
                    m,
                    n,
                    dst.as_mut_ptr(),
                    m as isize,
                    slab.as_ptr(),
                    cols as isize,
                    1,
                    gs.as_ptr(),
                    n as isize,
                    1,
                );
            }
        })
    }
}

impl<B: QuantMatmulOps, C: CheckpointStrategy> QuantMatmulOps for Autodiff<B, C> {
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        code: FloatTensor<Self>,
        bits: u32,
        block: u32,
    ) -> FloatTensor<Self> {
        let weight = (packed, scales.into_primitive(), code.into_primitive());
        record::<B, C, _, _, _, _>(
            Node,
            [x],
            weight,
            |[x], (packed, scales, code)| {
                (B::quant_matmul(x, packed, scales, code, bits, block), ())
            },
            |weight, _, _| (weight, bits, block),
        )
        .0
    }

    on_inner! {
        fn quant_matmul_backward(
            grad: Float,
            packed: Int,
            scales: Float,
            code: Float,
            bits: u32,
            block: u32,
        ) -> Float;
    }
}

/// Keeps the quantized weight (already resident: it is the model's) and nothing of `x`.
#[derive(Debug)]
struct Node;

impl<B: QuantMatmulOps> Backprop<B, 1> for Node {
    const KEEPS: [bool; 1] = [false];
    type Saved = ((IntTensor<B>, FloatTensor<B>, FloatTensor<B>), u32, u32);

    fn backward(
        _: [Option<FloatTensor<B>>; 1],
        ((packed, scales, code), bits, block): Self::Saved,
        grad: FloatTensor<B>,
        [want_x]: [bool; 1],
    ) -> [Option<FloatTensor<B>>; 1] {
        [want_x.then(|| B::quant_matmul_backward(grad, packed, scales, code, bits, block))]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Int, Tensor, TensorData, Tolerance};

    use super::*;

    /// A weight `[n, k]` with deterministic codes and scales, its parts as tensors on
    /// `device`, and its dequantized values.
    struct Weight {
        packed: Tensor<2, Int>,
        scales: Tensor<1>,
        code: Tensor<1>,
        dense: Vec<f32>,
    }

    fn weight(n: usize, k: usize, layout: QuantLayout, device: &Device) -> Weight {
        let levels = 1usize << layout.bits;
        let codes: Vec<u8> = (0..n * k)
            .map(|i| ((i * 7 + i / 5) % levels) as u8)
            .collect();
        let scales: Vec<f32> = (0..n * k / layout.block as usize)
            .map(|b| 0.01 + (b % 13) as f32 * 0.003)
            .collect();
        let code: Vec<f32> = (0..levels)
            .map(|i| (i as f32 - levels as f32 / 2.0) / levels as f32 * 2.0)
            .collect();
        let packed = pack_codes(&codes, layout.bits);
        let dense = dequantize_host(&packed, &scales, &code, layout, n, k);
        let words = k / layout.per_word();
        Weight {
            packed: Tensor::from_data(TensorData::new(packed, [n, words]), (device, DType::U32)),
            scales: Tensor::from_data(
                TensorData::new(scales, [n * k / layout.block as usize]),
                device,
            ),
            code: Tensor::from_data(TensorData::new(code, [levels]), device),
            dense,
        }
    }

    fn input(m: usize, k: usize, device: &Device) -> Tensor<2> {
        let v: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 / 48.5) - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, [m, k]), device)
    }

    const NF4: QuantLayout = QuantLayout { bits: 4, block: 64 };
    const Q8: QuantLayout = QuantLayout { bits: 8, block: 32 };

    #[test]
    fn packing_puts_the_first_value_in_the_lowest_bits() {
        assert_eq!(pack_codes(&[1, 2, 3, 4, 5, 6, 7, 15], 4), vec![0xF765_4321]);
        assert_eq!(pack_codes(&[0x12, 0x34, 0x56, 0xff], 8), vec![0xff56_3412]);
    }

    #[test]
    fn the_primitive_twin_dequantizes_as_the_host_does() {
        let device = Device::flex();
        for (layout, n, k) in [(NF4, 3, 128), (Q8, 5, 96)] {
            let w = weight(n, k, layout, &device);
            let twin = dequantize_twin::<Dispatch>(
                w.packed.into_dispatch(),
                w.scales.into_dispatch(),
                w.code.into_dispatch(),
                layout.bits,
                layout.block,
            );
            let got = Tensor::<2>::from_dispatch(twin).into_data();
            got.assert_eq(&TensorData::new(w.dense, [n, k]), true);
        }
    }

    /// The tiled twin against `x·Wᵀ` with W dequantized whole, in f32 and bf16, at shapes
    /// that leave partial tiles and slabs; the input's gradient against `g·W`, and none for
    /// the weight.
    #[test]
    fn tiled_matmul_and_its_input_gradient_match_the_dequantized_product() {
        let device = Device::flex().autodiff();
        for (layout, m, n, k) in [(NF4, 5, 70, 320), (Q8, 3, 130, 96), (NF4, 1, 8, 64)] {
            let w = weight(n, k, layout, &device);
            let dense = Tensor::<2>::from_data(TensorData::new(w.dense.clone(), [n, k]), &device);
            let x = input(m, k, &device).require_grad();
            let y = quant_matmul(
                x.clone(),
                w.packed.clone(),
                w.scales.clone(),
                w.code.clone(),
                layout,
            );
            let want = x.clone().matmul(dense.clone().transpose());
            y.clone()
                .into_data()
                .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::rel_abs(1e-5, 1e-5));
            let r = input(m, n, &device);
            let grads = (y * r.clone()).sum().backward();
            let dx = x.grad(&grads).expect("x takes a gradient");
            let want_dx = r.matmul(dense.clone());
            dx.into_data().assert_approx_eq::<f32>(
                &want_dx.inner().into_data(),
                Tolerance::rel_abs(1e-5, 1e-5),
            );
            assert!(w.scales.grad(&grads).is_none());

            let xb = input(m, k, &device).cast(DType::BF16);
            let yb = quant_matmul(
                xb.clone(),
                w.packed.clone(),
                w.scales.clone(),
                w.code.clone(),
                layout,
            );
            assert_eq!(yb.dtype(), DType::BF16);
            let want_b = xb.cast(DType::F32).matmul(dense.transpose());
            yb.cast(DType::F32)
                .into_data()
                .assert_approx_eq::<f32>(&want_b.into_data(), Tolerance::rel_abs(1e-2, 1e-2));
        }
    }

    fn matrix(w: &Weight, layout: QuantLayout) -> QuantMatrix {
        QuantMatrix {
            packed: w.packed.clone(),
            scales: w.scales.clone(),
            code: w.code.clone(),
            offsets: None,
            layout,
        }
    }

    /// Offsets (GGUF's minimums) shift each block's values: the product, the input's
    /// gradient through autodiff and `input_grad`, and the rows all see `W + offset`.
    #[test]
    fn offsets_shift_every_value_of_their_block() {
        let device = Device::flex().autodiff();
        let (m, n, k) = (3, 10, 96);
        let w = weight(n, k, Q8, &device);
        let nb = n * k / 32;
        let offsets: Vec<f32> = (0..nb).map(|b| (b as f32 - 12.0) * 0.01).collect();
        let dense: Vec<f32> = w
            .dense
            .iter()
            .enumerate()
            .map(|(i, v)| v + offsets[i / 32])
            .collect();
        let mut q = matrix(&w, Q8);
        q.offsets = Some(Tensor::from_data(TensorData::new(offsets, [nb]), &device));
        let dense = Tensor::<2>::from_data(TensorData::new(dense, [n, k]), &device);
        let tol = Tolerance::rel_abs(1e-5, 1e-5);

        let x = input(m, k, &device).require_grad();
        let y = q.matmul(x.clone());
        y.clone().into_data().assert_approx_eq::<f32>(
            &x.clone().matmul(dense.clone().transpose()).into_data(),
            tol,
        );
        let r = input(m, n, &device);
        let grads = (y * r.clone()).sum().backward();
        let want_dx = r.clone().matmul(dense.clone());
        x.grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&want_dx.clone().inner().into_data(), tol);
        q.input_grad(r)
            .into_data()
            .assert_approx_eq::<f32>(&want_dx.into_data(), tol);
        let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![9i64, 2], [2]), &device);
        q.rows(ids.clone())
            .into_data()
            .assert_approx_eq::<f32>(&dense.select(0, ids).into_data(), tol);
    }

    #[test]
    fn rows_are_the_dequantized_rows_asked_for() {
        let device = Device::flex();
        let (n, k) = (6, 128);
        let w = weight(n, k, NF4, &device);
        let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, 0, 4, 5], [4]), &device);
        let got = matrix(&w, NF4).rows(ids).into_data();
        let want: Vec<f32> = [4, 0, 4, 5]
            .iter()
            .flat_map(|&r| w.dense[r * k..(r + 1) * k].to_vec())
            .collect();
        got.assert_eq(&TensorData::new(want, [4, k]), true);
    }

    /// A quantized head's chunked log-probs (gradient computed in the forward) against the
    /// plain path on its dequantized twin: values, top-token hits and the hidden rows'
    /// gradient under a loss that weights each row differently; untracked rows give the
    /// same values.
    #[test]
    fn a_quantized_heads_logprobs_and_their_gradient_match_the_dequantized_head() {
        use crate::ops::logprobs::{Head, fused, reference};
        let device = Device::flex().autodiff();
        for (layout, n, v, h, chunk) in [(NF4, 9, 70, 128, 4), (Q8, 5, 33, 96, 5)] {
            let w = weight(v, h, layout, &device);
            let dense = Head::new(Tensor::from_data(
                TensorData::new(w.dense.clone(), [v, h]),
                &device,
            ));
            let quantized = Head::quantized(matrix(&w, layout));
            let targets = Tensor::<1, Int>::from_data(
                TensorData::new(
                    (0..n as i64).map(|i| (i * 13 + 2) % v as i64).collect(),
                    [n],
                ),
                &device,
            );
            let weights: Tensor<1> = input(1, n, &device).reshape([n]);
            let run = |head: &Head, fused_path: bool| {
                let x = input(n, h, &device).mul_scalar(3.0).require_grad();
                let rows = if fused_path {
                    fused(x.clone(), head, targets.clone(), chunk)
                } else {
                    reference(x.clone(), head, targets.clone(), chunk)
                };
                let (lp, hit) = (rows.logprobs, rows.hits);
                let grads = (lp.clone() * weights.clone()).sum().backward();
                let dx = x.grad(&grads).expect("rows take a gradient");
                (
                    lp.inner().into_data(),
                    hit.inner().into_data(),
                    dx.into_data(),
                )
            };
            let (want_lp, want_hit, want_dx) = run(&dense, false);
            for fused_path in [true, false] {
                let (lp, hit, dx) = run(&quantized, fused_path);
                let tol = Tolerance::rel_abs(1e-4, 1e-5);
                lp.assert_approx_eq::<f32>(&want_lp, tol);
                hit.assert_eq(&want_hit, false);
                dx.assert_approx_eq::<f32>(&want_dx, tol);
            }
            let untracked = input(n, h, &device).mul_scalar(3.0);
            let lp = fused(untracked, &quantized, targets.clone(), chunk).logprobs;
            lp.into_data()
                .assert_approx_eq::<f32>(&want_lp, Tolerance::rel_abs(1e-4, 1e-5));
        }
    }

    /// The head's per-row metrics on a quantized head, chunk by chunk, against its
    /// dequantized twin read whole: the mean logit (with a low-rank term, added outside the
    /// chunks) and the entropy.
    #[test]
    fn a_quantized_heads_mean_logits_and_entropy_match_the_dequantized_head() {
        use crate::ops::logprobs::{Head, mean_logits, token_entropy};
        let device = Device::flex();
        let (n, v, h, r) = (7, 40, 128, 2);
        let w = weight(v, h, NF4, &device);
        let low_rank = (input(n, r, &device), input(v, r, &device));
        let mut dense = Head::new(Tensor::from_data(
            TensorData::new(w.dense.clone(), [v, h]),
            &device,
        ));
        let mut quantized = Head::quantized(matrix(&w, NF4));
        dense.low_rank = Some(low_rank.clone());
        quantized.low_rank = Some(low_rank);
        let x = input(n, h, &device).mul_scalar(3.0);
        let tol = Tolerance::rel_abs(1e-4, 1e-5);
        let want = dense.logits(&x, 0, n).mean_dim(1).reshape([n]).into_data();
        for chunk in [1, 3, n, 100] {
            mean_logits(x.clone(), &quantized, chunk)
                .into_data()
                .assert_approx_eq::<f32>(&want, tol);
        }
        let logp = burn::tensor::activation::log_softmax(dense.logits(&x, 0, n), 1);
        let want = (logp.clone().exp() * logp).sum_dim(1).neg().reshape([n]);
        token_entropy(x, &quantized, 3)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), tol);
    }
}
