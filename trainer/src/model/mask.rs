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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn flags(padding: Vec<i64>, b: usize, t: usize, window: Option<usize>) -> Vec<bool> {
        let pad = Tensor::<2, Int>::from_data(TensorData::new(padding, [b, t]), &Device::flex());
        attention_mask(pad, window)
            .into_data()
            .try_to_vec::<bool>()
            .unwrap()
    }

    #[test]
    fn causal_padding_and_window_rules() {
        let (b, t) = (2, 5);
        let padding = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
        let plain = flags(padding.clone(), b, t, None);
        let windowed = flags(padding, b, t, Some(2));
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let n = (bi * t + i) * t + j;
                    let pad = bi == 1 && j >= 3;
                    assert_eq!(plain[n], j > i || pad, "b{bi} q{i} k{j}");
                    assert_eq!(
                        windowed[n],
                        j > i || pad || i - j.min(i) >= 2,
                        "b{bi} q{i} k{j}"
                    );
                }
            }
        }
    }
}
