use burn::tensor::{Bool, Int, Tensor};

/// Which keys each query must not see: later tokens (causal), keys of another example
/// packed into the same row, padding, and keys further back than a sliding `window`
/// (`i - j >= window`, as transformers counts it).
///
/// `segments`: `[B, T]`, the example each token belongs to (numbered from 1), 0 for
/// padding; a plain right-padded batch passes its 0/1 attention mask. Returns
/// `[B, 1, T, T]`, true where masked.
pub fn attention_mask(segments: Tensor<2, Int>, window: Option<usize>) -> Tensor<4, Bool> {
    let [b, t] = segments.dims();
    let device = segments.device();
    // Compared index against index straight into bools: a `[T, T]` i64 distance first
    // took 8 bytes an entry (512 MB at T 8192) before any of it was masked.
    let query = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([t, 1]);
    let key = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
    let mut masked = key
        .clone()
        .expand([t, t])
        .greater(query.clone().expand([t, t]));
    if let Some(w) = window {
        // i − j ≥ w  ⇔  j ≤ i − w
        let reach = query.sub_scalar(w as i64).expand([t, t]);
        masked = masked.bool_or(key.expand([t, t]).lower_equal(reach));
    }
    let seg_query = segments.clone().reshape([b, 1, t, 1]).expand([b, 1, t, t]);
    let seg_key = segments.reshape([b, 1, 1, t]).expand([b, 1, t, t]);
    let pad_key = seg_key.clone().equal_elem(0);
    let other_example = seg_query.not_equal(seg_key);
    masked
        .reshape([1, 1, t, t])
        .expand([b, 1, t, t])
        .bool_or(pad_key)
        .bool_or(other_example)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn flags(segments: Vec<i64>, b: usize, t: usize, window: Option<usize>) -> Vec<bool> {
        let pad = Tensor::<2, Int>::from_data(TensorData::new(segments, [b, t]), &Device::flex());
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
                    // Padding queries see nothing; real queries never see padding keys.
                    let pad = bi == 1 && (j >= 3 || i >= 3);
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

#[cfg(test)]
mod packed_tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn packed_examples_never_see_each_other() {
        // One row: example 1 (3 tokens), example 2 (2 tokens), one padding token.
        let segments = vec![1, 1, 1, 2, 2, 0];
        let seg =
            Tensor::<2, Int>::from_data(TensorData::new(segments.clone(), [1, 6]), &Device::flex());
        let flags = attention_mask(seg, None)
            .into_data()
            .try_to_vec::<bool>()
            .unwrap();
        for i in 0..6 {
            for j in 0..6 {
                let visible = j <= i && segments[j] != 0 && segments[i] == segments[j];
                assert_eq!(!flags[i * 6 + j], visible, "q{i} k{j}");
            }
        }
    }
}
