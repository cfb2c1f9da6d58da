//! A data batch as the model's tensors, with next-token targets.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// A `[B, T]` batch on a device, plus the flat positions (`row·T + t`) whose next token
/// carries loss and those next tokens. Targets never cross packed examples.
pub struct LmBatch {
    pub ids: Tensor<2, Int>,
    pub positions: Tensor<2, Int>,
    pub segments: Tensor<2, Int>,
    /// Flat indices into `[B·T]` of the positions that predict a loss token.
    pub loss_rows: Tensor<1, Int>,
    /// The token each of those positions must predict.
    pub targets: Tensor<1, Int>,
    pub num_loss_tokens: usize,
    /// Real (non-padding) tokens in the batch.
    pub num_tokens: usize,
}

impl LmBatch {
    pub fn new(batch: &data::batch::Batch, device: &Device) -> Self {
        let (b, w) = (batch.rows, batch.width);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for r in 0..b {
            for t in 0..w.saturating_sub(1) {
                let (here, next) = (r * w + t, r * w + t + 1);
                let same_example =
                    batch.segments[here] != 0 && batch.segments[here] == batch.segments[next];
                if same_example && batch.loss_mask[next] == 1 {
                    rows.push(here as i64);
                    targets.push(batch.ids[next] as i64);
                }
            }
        }
        let ints = |v: &[u32]| -> Tensor<2, Int> {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_data(TensorData::new(v, [b, w]), device)
        };
        let n = rows.len();
        Self {
            ids: ints(&batch.ids),
            positions: ints(&batch.positions),
            segments: ints(&batch.segments),
            loss_rows: Tensor::from_data(TensorData::new(rows, [n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n]), device),
            num_loss_tokens: n,
            num_tokens: batch.segments.iter().filter(|&&s| s != 0).count(),
        }
    }
}
