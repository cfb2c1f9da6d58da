//! The tokenised examples a run learns from, in the three shapes objectives take, and the
//! micro-batches they are cut into. Shared by the loop and the objectives, so neither
//! reaches into the other.

use data::Message;
use data::batch::{Batch, length_grouped_batches, shuffled};
use data::tokenize::{PairTokens, Sequence};
use serde_json::{Map, Value};

use crate::Result;

/// The data shape an objective learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Conversations or prompt/completion rows, with a loss mask (SFT).
    Sequences,
    /// Preference pairs: prompt, chosen, rejected (DPO, ORPO, SimPO, CPO, reward models).
    Pairs,
    /// Prompts alone, completed during training (GRPO).
    Prompts,
    /// Session openings (session GRPO): prompts, or conversations cut after the client's
    /// first turn, so a data set of whole sessions (Cactus) opens sessions as it is.
    Openings,
}

/// A tokenised pair with what the objectives read beside it.
#[derive(Debug, Clone)]
pub struct PairItem {
    pub tokens: PairTokens,
    /// The reward margin column's value (0 without one).
    pub margin: f64,
    /// Precomputed reference log-probs of chosen and rejected, when cached.
    pub reference: Option<(f64, f64)>,
}

/// A prompt to complete: its tokens (rendered with the generation prompt), its messages
/// and its other columns, which rewards read.
#[derive(Debug, Clone)]
pub struct PromptItem {
    pub ids: Vec<u32>,
    pub messages: Vec<Message>,
    pub extra: Map<String, Value>,
}

/// A tokenised data set.
#[derive(Debug, Clone)]
pub enum Examples {
    Sequences(Vec<Sequence>),
    Pairs(Vec<PairItem>),
    Prompts(Vec<PromptItem>),
}

impl Examples {
    /// A hash of every example as training reads it (tokens, masks, margins, the columns
    /// rewards read), never 0: a resume checks it, so a data file, tokenizer, template or
    /// data setting changed since the run started is refused rather than resumed inexactly.
    pub fn fingerprint(&self) -> u64 {
        let mut h = crate::fnv::Fnv::new();
        let ids = |h: &mut crate::fnv::Fnv, ids: &[u32]| {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            h.bytes(&bytes);
        };
        match self {
            Examples::Sequences(all) => {
                h.word(1);
                for s in all {
                    ids(&mut h, &s.ids);
                    h.bytes(&s.loss_mask);
                }
            }
            Examples::Pairs(all) => {
                h.word(2);
                for p in all {
                    ids(&mut h, &p.tokens.prompt);
                    ids(&mut h, &p.tokens.chosen);
                    ids(&mut h, &p.tokens.rejected);
                    h.word(p.margin.to_bits());
                }
            }
            Examples::Prompts(all) => {
                h.word(3);
                for p in all {
                    ids(&mut h, &p.ids);
                    h.bytes(Value::Object(p.extra.clone()).to_string().as_bytes());
                }
            }
        }
        h.0.max(1)
    }

    /// Each example's length in tokens as the model reads it: a sequence, or a pair's
    /// prompt with its longer side; a prompt alone for prompts (completions come later).
    pub fn lengths(&self) -> Vec<usize> {
        match self {
            Examples::Sequences(s) => s.iter().map(Sequence::len).collect(),
            Examples::Pairs(p) => p.iter().map(pair_len).collect(),
            Examples::Prompts(p) => p.iter().map(|p| p.ids.len()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Examples::Sequences(s) => s.len(),
            Examples::Pairs(p) => p.len(),
            Examples::Prompts(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One micro-batch: rows for SFT, or indices of pairs or prompts.
#[derive(Debug, Clone)]
pub enum Micro {
    Lm(Batch),
    Pairs(Vec<usize>),
    /// GRPO: the prompts of one step.
    Prompts(Vec<usize>),
}

impl Micro {
    /// The rows it holds: sequences (packed rows when packing), pairs or prompts.
    pub fn rows(&self) -> usize {
        match self {
            Micro::Lm(b) => b.rows,
            Micro::Pairs(p) | Micro::Prompts(p) => p.len(),
        }
    }
}

/// How micro-batches are cut: `batch_size` rows, rows of `max_length` when packing.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub batch_size: usize,
    /// Micro-batches per optimizer step (`gradient_accumulation_steps`).
    pub accumulation: usize,
    pub packing: bool,
    pub max_length: usize,
    pub seed: u64,
    pub pad: u32,
}

/// The training micro-batches of one epoch, in order: seeded and length-grouped, or packed
/// rows for sequences with packing. Prompts go one per micro-batch here; GRPO groups them
/// by step itself.
pub fn epoch_batches(examples: &Examples, b: &Batching, epoch: usize) -> Result<Vec<Micro>> {
    let bs = b.batch_size;
    let seed = b.seed.wrapping_add(epoch as u64);
    match examples {
        // The rows are packed the same way every epoch (as TRL packs the data set once) and
        // shuffled per epoch, so every epoch has as many steps as the first.
        Examples::Sequences(seqs) if b.packing => {
            let refs: Vec<&Sequence> = seqs.iter().collect();
            let packed = Batch::packed(&refs, b.max_length, b.pad)?;
            let rows = shuffled(packed.rows, seed);
            Ok(rows
                .chunks(bs)
                .map(|r| Micro::Lm(packed.select_rows(r)))
                .collect())
        }
        Examples::Sequences(seqs) => Ok(length_grouped_batches(&examples.lengths(), bs, seed)
            .into_iter()
            .map(|idx| {
                Micro::Lm(Batch::padded(
                    &idx.iter().map(|&i| &seqs[i]).collect::<Vec<_>>(),
                    b.pad,
                ))
            })
            .collect()),
        Examples::Pairs(_) => Ok(length_grouped_batches(&examples.lengths(), bs, seed)
            .into_iter()
            .map(Micro::Pairs)
            .collect()),
        Examples::Prompts(prompts) => Ok(shuffled(prompts.len(), seed)
            .into_iter()
            .map(|i| Micro::Prompts(vec![i]))
            .collect()),
    }
}

fn pair_len(p: &PairItem) -> usize {
    p.tokens.prompt.len() + p.tokens.chosen.len().max(p.tokens.rejected.len())
}

/// Evaluation micro-batches: the set in order, `batch_size` at a time. Prompts have none:
/// GRPO is judged by its rewards during training, not by an eval loss.
pub fn eval_batches(examples: &Examples, batch_size: usize, pad: u32) -> Vec<Micro> {
    match examples {
        Examples::Sequences(seqs) => seqs
            .chunks(batch_size.max(1))
            .map(|c| Micro::Lm(Batch::padded(&c.iter().collect::<Vec<_>>(), pad)))
            .collect(),
        Examples::Pairs(pairs) => (0..pairs.len())
            .collect::<Vec<_>>()
            .chunks(batch_size.max(1))
            .map(|c| Micro::Pairs(c.to_vec()))
            .collect(),
        Examples::Prompts(_) => Vec::new(),
    }
}
