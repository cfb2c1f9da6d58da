//! From tokenised sequences to rows the model reads: padding, packing, length-grouped
//! batching, seeded shuffling and a prompt-grouped train/eval split.

use std::collections::{BTreeMap, VecDeque};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::DataError;
use crate::tokenize::Sequence;

/// A `[rows, width]` batch, row-major. `segments` numbers the examples inside each row from
/// 1 (0 is padding); attention never crosses segments, and `positions` restart at 0 in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub width: usize,
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

impl Batch {
    fn with_width(width: usize) -> Self {
        Self {
            rows: 0,
            width,
            ids: Vec::new(),
            loss_mask: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// Appends one row holding `seqs` back to back, padded to the width with `pad_id`.
    fn push_row(&mut self, seqs: &[&Sequence], pad_id: u32) {
        let mut used = 0;
        for (k, seq) in seqs.iter().enumerate() {
            self.ids.extend_from_slice(&seq.ids);
            self.loss_mask.extend_from_slice(&seq.loss_mask);
            self.positions.extend(0..seq.len() as u32);
            self.segments
                .extend(std::iter::repeat_n(k as u32 + 1, seq.len()));
            used += seq.len();
        }
        let pad = self.width - used;
        self.ids.extend(std::iter::repeat_n(pad_id, pad));
        self.loss_mask.extend(std::iter::repeat_n(0, pad));
        self.positions.extend(used as u32..self.width as u32);
        self.segments.extend(std::iter::repeat_n(0, pad));
        self.rows += 1;
    }

    /// The batch made of the given rows, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let w = self.width;
        let pick = |v: &[u32]| -> Vec<u32> {
            rows.iter()
                .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                .collect()
        };
        Self {
            rows: rows.len(),
            width: w,
            ids: pick(&self.ids),
            loss_mask: rows
                .iter()
                .flat_map(|&r| self.loss_mask[r * w..(r + 1) * w].iter().copied())
                .collect(),
            positions: pick(&self.positions),
            segments: pick(&self.segments),
        }
    }

    /// One right-padded row per sequence, as wide as the longest.
    pub fn padded(seqs: &[&Sequence], pad_id: u32) -> Self {
        let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut batch = Self::with_width(width);
        for seq in seqs {
            batch.push_row(&[seq], pad_id);
        }
        batch
    }

    /// Packs sequences into rows of exactly `width` tokens, best fit decreasing as TRL's
    /// `bfd` strategy packs: longest first, each into the row with the least room that still
    /// holds it (the earliest such row on a tie), else a new row. The rows depend only on
    /// the sequences' lengths, not their order, so every epoch has the same rows to shuffle.
    pub fn packed(seqs: &[&Sequence], width: usize, pad_id: u32) -> Result<Self, DataError> {
        if let Some((i, seq)) = seqs.iter().enumerate().find(|(_, s)| s.len() > width) {
            return Err(DataError::Conversation(format!(
                "sequence {i} has {} tokens, more than the packed row width {width}; truncate first",
                seq.len()
            )));
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut rows: Vec<Vec<usize>> = Vec::new();
        // Rows by their room left, each room's rows in the order they came to have it.
        let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
        for i in order {
            let len = seqs[i].len();
            let fit = by_room
                .range_mut(len..)
                .next()
                .map(|(&room, rows)| (room, rows));
            let (row, room) = match fit {
                Some((room, waiting)) => {
                    let row = waiting.pop_front().unwrap_or_default();
                    if waiting.is_empty() {
                        by_room.remove(&room);
                    }
                    (row, room)
                }
                None => {
                    rows.push(Vec::new());
                    (rows.len() - 1, width)
                }
            };
            rows[row].push(i);
            by_room.entry(room - len).or_default().push_back(row);
        }
        let mut batch = Self::with_width(width);
        for members in &rows {
            let members: Vec<&Sequence> = members.iter().map(|&i| seqs[i]).collect();
            batch.push_row(&members, pad_id);
        }
        Ok(batch)
    }
}

/// A permutation of `0..n` that depends only on `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// Batches of indices with similar lengths, so padding is small: shuffle, cut into
/// mega-batches of 50 batches, sort each by length (longest first), chunk, then shuffle the
/// batches. Deterministic in `seed`.
pub fn length_grouped_batches(lengths: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let order = shuffled(lengths.len(), seed);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for mega in order.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(1)));
    batches
}

/// Splits example indices into (train, eval) by a stable hash of each example's group key
/// (its prompt), so every pair sharing a question lands on the same side. Deterministic in
/// `seed` and independent of row order.
pub fn split_by_group(keys: &[String], eval_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let threshold = (eval_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if fnv1a(seed, key) < threshold {
            eval.push(i);
        } else {
            train.push(i);
        }
    }
    (train, eval)
}

/// FNV-1a, 64-bit: a hash that never changes between builds or platforms.
fn fnv1a(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(key.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise so nearby keys spread over the whole range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, first: u32) -> Sequence {
        Sequence {
            ids: (first..first + n as u32).collect(),
            loss_mask: vec![1; n],
        }
    }

    #[test]
    fn padding_marks_segments_and_positions() {
        let (a, b) = (seq(3, 10), seq(1, 20));
        let batch = Batch::padded(&[&a, &b], 0);
        assert_eq!((batch.rows, batch.width), (2, 3));
        assert_eq!(batch.ids, vec![10, 11, 12, 20, 0, 0]);
        assert_eq!(batch.segments, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.loss_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn packing_fills_rows_best_fit_decreasing_and_restarts_positions() {
        let seqs = [seq(3, 10), seq(4, 20), seq(2, 30), seq(1, 40)];
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = Batch::packed(&refs, 6, 0).unwrap();
        assert_eq!(batch.rows, 2);
        // 4 opens row 0 (room 2); 3 does not fit there and opens row 1 (room 3); 2 goes
        // where it fits tightest, row 0; 1 into row 1.
        assert_eq!(batch.ids[..6], [20, 21, 22, 23, 30, 31]);
        assert_eq!(batch.segments[..6], [1, 1, 1, 1, 2, 2]);
        assert_eq!(batch.positions[..6], [0, 1, 2, 3, 0, 1]);
        assert_eq!(batch.ids[6..], [10, 11, 12, 40, 0, 0]);
        assert_eq!(batch.segments[6..], [1, 1, 1, 2, 0, 0]);
        assert_eq!(batch.positions[6..], [0, 1, 2, 0, 4, 5]);
        let second = batch.select_rows(&[1]);
        assert_eq!(
            (second.rows, second.ids.clone()),
            (1, batch.ids[6..].to_vec())
        );
        assert_eq!(second.segments, batch.segments[6..]);
        // The same rows whatever order the sequences come in.
        let reversed: Vec<&Sequence> = seqs.iter().rev().collect();
        let again = Batch::packed(&reversed, 6, 0).unwrap();
        assert_eq!(again.rows, 2);
        assert_eq!(again.ids, batch.ids);
        let long = seq(7, 0);
        let err = Batch::packed(&[&long], 6, 0).unwrap_err().to_string();
        assert!(err.contains("7 tokens") && err.contains("width 6"), "{err}");
    }

    /// Ties in room go to the row that had it first, as TRL's packer takes them.
    #[test]
    fn packing_breaks_ties_by_the_earliest_row_and_never_overfills() {
        let lengths = [5, 5, 3, 3, 2, 2, 1, 9, 7, 4, 4, 6];
        let seqs: Vec<Sequence> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| seq(n, 100 * i as u32))
            .collect();
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = Batch::packed(&refs, 10, 0).unwrap();
        // 51 tokens in rows of 10: six rows at the least.
        assert_eq!(batch.rows, 6);
        let mut seen = Vec::new();
        for r in 0..batch.rows {
            let row = &batch.segments[r * 10..(r + 1) * 10];
            let used = row.iter().filter(|&&s| s > 0).count();
            assert!(used <= 10);
            for (k, &id) in batch.ids[r * 10..r * 10 + used].iter().enumerate() {
                if batch.positions[r * 10 + k] == 0 {
                    seen.push(id / 100);
                }
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len() as u32).collect::<Vec<_>>());
        // Longest first: 9, 7, 6 and 5 open rows 0-3, the second 5 fills row 3, a 4 fills
        // row 2, the next 4 opens row 4, the 3s go to rows 1 and 4, a 2 to row 4, the last 2
        // opens row 5, and the 1 takes row 0, which had room 1 before row 4 did.
        let first: Vec<u32> = (0..batch.rows).map(|r| batch.ids[r * 10] / 100).collect();
        assert_eq!(first, vec![7, 8, 11, 0, 10, 5]);
        assert_eq!(batch.ids[9] / 100, 6, "row 0 ends with the 1");
    }

    #[test]
    fn shuffling_and_grouping_are_deterministic_in_the_seed() {
        assert_eq!(shuffled(50, 3), shuffled(50, 3));
        assert_ne!(shuffled(50, 3), shuffled(50, 4));
        let mut sorted = shuffled(50, 3);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());

        let lengths: Vec<usize> = (0..200).map(|i| (i * 37) % 101).collect();
        let a = length_grouped_batches(&lengths, 8, 1);
        assert_eq!(a, length_grouped_batches(&lengths, 8, 1));
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        // Within a batch lengths are close: far less spread than random batches.
        let spread = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let ls: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                    ls.iter().max().unwrap() - ls.iter().min().unwrap()
                })
                .sum()
        };
        let random: Vec<Vec<usize>> = shuffled(200, 1).chunks(8).map(<[usize]>::to_vec).collect();
        assert!(
            spread(&a) * 4 < spread(&random),
            "{} vs {}",
            spread(&a),
            spread(&random)
        );
    }

    #[test]
    fn split_keeps_groups_together_and_is_stable() {
        // 300 questions, each asked 1 to 4 times.
        let keys: Vec<String> = (0..300)
            .flat_map(|q| std::iter::repeat_n(format!("question {q}"), 1 + q % 4))
            .collect();
        let (train, eval) = split_by_group(&keys, 0.2, 7);
        assert_eq!(train.len() + eval.len(), keys.len());
        let eval_keys: std::collections::HashSet<&String> =
            eval.iter().map(|&i| &keys[i]).collect();
        assert!(
            train.iter().all(|&i| !eval_keys.contains(&keys[i])),
            "a question is on both sides"
        );
        let share = eval_keys.len() as f64 / 300.0;
        assert!((0.12..0.28).contains(&share), "eval share {share}");
        assert_eq!(split_by_group(&keys, 0.2, 7), (train.clone(), eval.clone()));
        // Reordering rows does not move any question across the split.
        let reversed: Vec<String> = keys.iter().rev().cloned().collect();
        let (_, eval_rev) = split_by_group(&reversed, 0.2, 7);
        let eval_rev_keys: std::collections::HashSet<&String> =
            eval_rev.iter().map(|&i| &reversed[i]).collect();
        assert_eq!(eval_keys, eval_rev_keys);
        assert_ne!(split_by_group(&keys, 0.2, 8).1, eval);
    }
}
