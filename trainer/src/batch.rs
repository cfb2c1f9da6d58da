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

/// A batch of preference pairs as one `[2N, T]` forward: rows `0..N` hold prompt + chosen,
/// rows `N..2N` prompt + rejected, right-padded. Every position that predicts a real next
/// token is a row of the log-prob computation; `completion` marks those whose target is a
/// completion token.
pub struct PairBatch {
    pub ids: Tensor<2, Int>,
    pub positions: Tensor<2, Int>,
    pub segments: Tensor<2, Int>,
    /// Flat indices into `[2N·T]` of every predicting position, and its target.
    pub rows: Tensor<1, Int>,
    pub targets: Tensor<1, Int>,
    /// The sequence (`0..2N`) each row belongs to.
    pub row_seq: Tensor<1, Int>,
    /// 1 where the row's target is a completion token, else 0.
    pub completion: Tensor<1>,
    /// Per sequence: completion tokens, and all predicted tokens.
    pub completion_len: Tensor<1>,
    pub predicted_len: Tensor<1>,
    /// Per sequence: the flat index of its last token that is not the pad id — where
    /// transformers' sequence classifiers read their score.
    pub last: Tensor<1, Int>,
    /// Per pair: the reward margin (zeros without a margin column).
    pub margin: Tensor<1>,
    pub pairs: usize,
    pub num_tokens: usize,
}

impl PairBatch {
    pub fn new(
        pairs: &[&data::tokenize::PairTokens],
        margins: &[f64],
        pad: u32,
        device: &Device,
    ) -> Self {
        let n = pairs.len();
        let side = |p: &data::tokenize::PairTokens, c: &[u32]| data::tokenize::Sequence {
            ids: p.prompt.iter().chain(c).copied().collect(),
            loss_mask: std::iter::repeat_n(0, p.prompt.len())
                .chain(std::iter::repeat_n(1, c.len()))
                .collect(),
        };
        let seqs: Vec<data::tokenize::Sequence> = pairs
            .iter()
            .map(|p| side(p, &p.chosen))
            .chain(pairs.iter().map(|p| side(p, &p.rejected)))
            .collect();
        let mut batch = Self::of_sequences(&seqs, pad, device);
        let mut margin: Vec<f32> = margins.iter().map(|&m| m as f32).collect();
        margin.resize(n, 0.0);
        batch.margin = Tensor::from_data(TensorData::new(margin, [n]), device);
        batch.pairs = n;
        batch
    }

    /// Any sequences, each with its completion marked by its loss mask, as one forward —
    /// for reading per-sequence log-probs of continuations (multiple-choice options) with
    /// [`crate::objectives::sequences::sequence_logps`]. Its `pairs` is 0 and its margins zero.
    pub fn of_sequences(seqs: &[data::tokenize::Sequence], pad: u32, device: &Device) -> Self {
        let batch = data::batch::Batch::padded(&seqs.iter().collect::<Vec<_>>(), pad);
        let (b, w) = (batch.rows, batch.width);
        let (mut rows, mut targets, mut row_seq, mut completion) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut completion_len = vec![0f32; b];
        let mut predicted_len = vec![0f32; b];
        for r in 0..b {
            for t in 0..w.saturating_sub(1) {
                let (here, next) = (r * w + t, r * w + t + 1);
                if batch.segments[here] != 0 && batch.segments[here] == batch.segments[next] {
                    rows.push(here as i64);
                    targets.push(batch.ids[next] as i64);
                    row_seq.push(r as i64);
                    let c = f32::from(batch.loss_mask[next]);
                    completion.push(c);
                    completion_len[r] += c;
                    predicted_len[r] += 1.0;
                }
            }
        }
        let last = last_real_tokens(&batch, pad);
        let ints = |v: &[u32]| -> Tensor<2, Int> {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_data(TensorData::new(v, [b, w]), device)
        };
        let int1 = |v: Vec<i64>| {
            let k = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [k]), device)
        };
        let float1 = |v: Vec<f32>| {
            let k = v.len();
            Tensor::<1>::from_data(TensorData::new(v, [k]), device)
        };
        Self {
            ids: ints(&batch.ids),
            positions: ints(&batch.positions),
            segments: ints(&batch.segments),
            rows: int1(rows),
            targets: int1(targets),
            row_seq: int1(row_seq),
            completion: float1(completion),
            completion_len: float1(completion_len),
            predicted_len: float1(predicted_len),
            last: int1(last),
            margin: float1(vec![0.0; b]),
            pairs: 0,
            num_tokens: batch.segments.iter().filter(|&&s| s != 0).count(),
        }
    }
}

/// Per row, the flat index of the last token whose id is not `pad` — where transformers'
/// sequence classifiers read their score.
pub fn last_real_tokens(batch: &data::batch::Batch, pad: u32) -> Vec<i64> {
    let w = batch.width;
    (0..batch.rows)
        .map(|r| {
            let row = &batch.ids[r * w..(r + 1) * w];
            (r * w + row.iter().rposition(|&id| id != pad).unwrap_or(0)) as i64
        })
        .collect()
}
