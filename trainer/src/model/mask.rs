use burn::tensor::{Bool, Int, Tensor};

/// Which keys each query must not see: later tokens (causal), padding keys, and keys
/// further back than a sliding `window` (`i - j >= window`, as transformers counts it).
///
/// `padding`: `[B, T]`, 1 for real tokens and 0 for padding. Returns `[B, 1, T, T]`,
/// true where masked.
pub fn attention_mask(padding: Tensor<2, Int>, window: Option<usize>) -> Tensor<4, Bool> {
    let [b, t] = padding.dims();
    let device = padding.device();
    let query = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([t, 1]);
    let key = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
    let distance = query.expand([t, t]) - key.expand([t, t]);
    let mut masked = distance.clone().lower_elem(0);
    if let Some(w) = window {
        masked = masked.bool_or(distance.greater_equal_elem(w as i64));
    }
    let pad_key = padding
        .equal_elem(0)
        .reshape([b, 1, 1, t])
        .expand([b, 1, t, t]);
    masked
        .reshape([1, 1, t, t])
        .expand([b, 1, t, t])
        .bool_or(pad_key)
}
