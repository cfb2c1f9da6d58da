//! Token streams that grow turn by turn: one row per session, one KV cache for the batch.
//! Each turn appends every row's new tokens in one forward (left-padded to the longest
//! chunk) and then decodes the rows that speak in one batch, so no dialogue is ever
//! recomputed. Rows with nothing to add take padding slots, which no query sees, so a
//! row's real tokens keep their true positions whatever the others do.
//!
//! Padding slots do stretch the distances a sliding window measures (in slots), so a model
//! with sliding windows is refused once the cache holds more slots than its window: up to
//! there, no key is outside any window by either count.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;

use crate::generate::{Completion, Sampling, last_logits, sample};
use crate::model::{KvCache, Llama};
use crate::{Result, TrainerError};

pub struct Streams<'m> {
    model: &'m Llama,
    device: Device,
    cache: Option<KvCache>,
    /// Real tokens in the cache per row: the position of its next token.
    fed: Vec<usize>,
    /// `[rows, vocab]`: each row's logits after its latest token.
    logits: Vec<f32>,
    vocab: usize,
}

impl<'m> Streams<'m> {
    pub fn new(model: &'m Llama, rows: usize, device: &Device) -> Self {
        Self {
            model,
            device: device.clone(),
            cache: None,
            fed: vec![0; rows],
            logits: Vec::new(),
            vocab: 0,
        }
    }

    /// Real tokens in row `r`'s cache.
    pub fn fed(&self, r: usize) -> usize {
        self.fed[r]
    }

    /// Slots in the cache, real and padding.
    pub fn slots(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.key_padding.dims()[1])
    }

    /// Appends `chunks[r]` to row `r` in one forward; rows with an empty chunk keep their
    /// logits.
    pub fn feed(&mut self, chunks: &[Vec<u32>]) -> Result<()> {
        let b = self.fed.len();
        let width = chunks.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Ok(());
        }
        let window = self
            .model
            .layers
            .iter()
            .filter_map(|l| l.sliding_window)
            .min();
        if let Some(w) = window
            && self.slots() + width > w
        {
            return Err(TrainerError::Input(format!(
                "session rollouts: the batch's KV cache would hold {} slots, past the model's \
                 sliding window of {w}; lower grpo.max_session_tokens or the sessions per step",
                self.slots() + width
            )));
        }
        let (mut ids, mut positions, mut padding) = (Vec::new(), Vec::new(), Vec::new());
        for (r, chunk) in chunks.iter().enumerate() {
            let lead = width - chunk.len();
            for j in 0..width {
                let real = j >= lead;
                ids.push(if real { chunk[j - lead] as i64 } else { 0 });
                positions.push(if real {
                    (self.fed[r] + j - lead) as i64
                } else {
                    0
                });
                padding.push(!real);
            }
        }
        let ints =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, width]), &self.device);
        let padding =
            Tensor::<2, Bool>::from_data(TensorData::new(padding, [b, width]), &self.device);
        let (hidden, cache) =
            self.model
                .hidden_cached(ints(ids), ints(positions), padding, self.cache.take());
        self.cache = Some(cache);
        let logits = last_logits(self.model, hidden);
        if self.vocab == 0 {
            self.vocab = logits.len() / b.max(1);
            self.logits = vec![0.0; b * self.vocab];
        }
        let v = self.vocab;
        for (r, chunk) in chunks.iter().enumerate() {
            if !chunk.is_empty() {
                self.logits[r * v..(r + 1) * v].copy_from_slice(&logits[r * v..(r + 1) * v]);
                self.fed[r] += chunk.len();
            }
        }
        Ok(())
    }

    /// Samples one turn for each row in `speaks`, from its current logits, until a stop
    /// token or `s.max_new_tokens`; the others get `None`. Every sampled token but each
    /// row's last is fed as it is drawn: the last (the stop token, or the token that
    /// reached the limit) opens the row's next chunk. Tokens are drawn row by row from
    /// `rng`, so a seed fixes the batch.
    pub fn decode(
        &mut self,
        speaks: &[bool],
        stop: &[u32],
        s: &Sampling,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Option<Completion>>> {
        let b = self.fed.len();
        let mut out: Vec<Option<Completion>> = speaks
            .iter()
            .map(|&on| {
                on.then(|| Completion {
                    tokens: Vec::new(),
                    stop: None,
                })
            })
            .collect();
        let mut done: Vec<bool> = speaks.iter().map(|&on| !on).collect();
        if self.vocab == 0 || s.max_new_tokens == 0 {
            return Ok(out);
        }
        let v = self.vocab;
        loop {
            let mut next: Vec<Vec<u32>> = vec![Vec::new(); b];
            for r in 0..b {
                let Some(c) = out[r].as_mut().filter(|_| !done[r]) else {
                    continue;
                };
                let token = sample(&self.logits[r * v..(r + 1) * v], s, rng);
                if stop.contains(&token) {
                    c.stop = Some(token);
                    done[r] = true;
                } else {
                    c.tokens.push(token);
                    done[r] = c.tokens.len() == s.max_new_tokens;
                    if !done[r] {
                        next[r].push(token);
                    }
                }
            }
            if done.iter().all(|&d| d) {
                return Ok(out);
            }
            self.feed(&next)?;
        }
    }
}
