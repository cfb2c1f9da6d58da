use burn::tensor::{Bool, Int, Tensor};

/// The most a batch's `[B, 1, T, T]` attention mask may take (16 GiB of bools): past any
/// device's room beside a model, and refused up front instead of as an allocation that
/// aborts the process.
const MAX_MASK_BYTES: u128 = 1 << 34;

/// Refuses a batch of `batch` sequences padded to `tokens` whose attention mask would not
/// fit; `what` names the input (a file and row) in the message.
pub fn check_attention_size(batch: usize, tokens: usize, what: &str) -> crate::Result<()> {
    let bytes = (tokens as u128).pow(2) * batch.max(1) as u128;
    if bytes <= MAX_MASK_BYTES {
        return Ok(());
    }
    Err(crate::TrainerError::Input(format!(
        "{what}: {tokens} tokens need a {tokens}×{tokens} attention mask ({:.0} GiB for a \
         batch of {batch}); cut the input to the model's context",
        bytes as f64 / f64::from(1u32 << 30)
    )))
}

/// Which keys each query must not see: later tokens (causal), keys of another example
/// packed into the same row, padding, and keys further back than a sliding `window`
/// (`i - j >= window`, as transformers counts it).
///
/// A padding query sees every real key before it, as under transformers' attention mask:
/// no loss reads its output, but TRL's ORPO and CPO average the logits at every position,
/// padding included (`logits/chosen`), so its hidden state must be transformers' too.
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
    let pad_query = seg_query.clone().equal_elem(0);
    let other_example = seg_query.not_equal(seg_key).bool_and(pad_query.bool_not());
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

    /// 2^17 tokens alone take exactly 16 GiB of mask and pass; one more token, or a
    /// second row, does not.
    #[test]
    fn attention_masks_past_16_gib_are_refused() {
        check_attention_size(1, 1 << 17, "x").unwrap();
        check_attention_size(8, 1 << 15, "x").unwrap();
        let e = check_attention_size(2, 1 << 17, "pair 3")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pair 3: 131072 tokens") && e.contains("(32 GiB for a batch of 2)"),
            "{e}"
        );
        check_attention_size(1, (1 << 17) + 1, "x").unwrap_err();
    }

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
                    // Nothing sees a padding key; a padding query sees the real keys
                    // before it, as transformers' attention mask lets it.
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

#[cfg(test)]
mod packed_tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn packed_examples_never_see_each_other() {
        // One row: example 1 (3 tokens), example 2 (2 tokens), one padding token, which
        // sees every real key (transformers' padding mask knows no examples).
        let segments = vec![1, 1, 1, 2, 2, 0];
        let seg =
            Tensor::<2, Int>::from_data(TensorData::new(segments.clone(), [1, 6]), &Device::flex());
        let flags = attention_mask(seg, None)
            .into_data()
            .try_to_vec::<bool>()
            .unwrap();
        for i in 0..6 {
            for j in 0..6 {
                let visible =
                    j <= i && segments[j] != 0 && (segments[i] == segments[j] || segments[i] == 0);
                assert_eq!(!flags[i * 6 + j], visible, "q{i} k{j}");
            }
        }
    }
}
