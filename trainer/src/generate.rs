//! Text generation with a KV cache: the prompts are run once, then one token per row per
//! step, each step attending to the cached keys and values. Sampling happens on the host over the last
//! position's logits: greedy, or temperature with top-k and top-p, seeded.

use std::path::Path;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{KvCache, LayerCache, Llama};
use crate::{Result, TrainerError};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 turns it off.
    pub top_p: f64,
    pub seed: u64,
}

/// The smallest temperature above 0 (greedy): the logits are divided by it, and far below
/// it they overflow f32 (from about 1e-37 every step was NaN), while anything this small
/// already samples the top token. A setting under it is refused.
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// Whether `t` is a temperature sampling can use: 0 (greedy), or from
/// [`MIN_TEMPERATURE`] up, finite.
pub fn usable_temperature(t: f64) -> bool {
    t == 0.0 || (t >= MIN_TEMPERATURE && t.is_finite() && t <= f64::from(f32::MAX))
}

impl Sampling {
    /// Refuses settings that would sample from NaN or from nothing: a negative or
    /// non-finite temperature, a top-p outside (0, 1], and no tokens to generate.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(TrainerError::Input(
                "max_new_tokens 0 leaves nothing to generate; it must be at least 1".into(),
            ));
        }
        if !usable_temperature(self.temperature) {
            return Err(TrainerError::Input(format!(
                "temperature {} must be 0 (greedy) or a finite number from {MIN_TEMPERATURE}",
                crate::recipe::shown(self.temperature)
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainerError::Input(format!(
                "top_p {} must be in (0, 1] (1 turns it off)",
                self.top_p
            )));
        }
        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks the next token from `logits`.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |l: f32| ((l as f64 - max) / s.temperature).exp();
    if s.top_k == 0 && s.top_p >= 1.0 {
        // Nothing to cut: draw straight from the softmax, in vocabulary order. Sorting the
        // whole vocabulary for every token of every row was most of a sampled decode
        // step's host time.
        let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
        return draw(&weights, rng).map_or_else(argmax, |n| n as u32);
    }
    // Most likely first; equal logits by id, so the order never depends on the sort.
    let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if s.top_k > 0 && s.top_k < order.len() {
        order.select_nth_unstable_by(s.top_k - 1, before);
        order.truncate(s.top_k);
    }
    order.sort_unstable_by(before);
    let weights: Vec<f64> = order.iter().map(|&i| weight(logits[i])).collect();
    let mut keep = order.len();
    if s.top_p < 1.0 {
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        for (n, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= s.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let n = draw(&weights[..keep], rng).unwrap_or(0);
    order[n] as u32
}

/// An index drawn with probability proportional to `weights`; the last one when rounding
/// leaves the draw past the end, `None` when there are none.
fn draw(weights: &[f64], rng: &mut ChaCha8Rng) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    let mut left = rng.random::<f64>() * total;
    for (n, w) in weights.iter().enumerate() {
        left -= w;
        if left <= 0.0 {
            return Some(n);
        }
    }
    weights.len().checked_sub(1)
}

/// One sampled continuation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The new tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// The stop token that ended it; `None` when `max_new_tokens` cut it off.
    pub stop: Option<u32>,
}

impl Completion {
    /// The tokens a policy is trained on: the new tokens and the stop token, so ending is
    /// learned too.
    pub fn trained_tokens(&self) -> Vec<u32> {
        let mut t = self.tokens.clone();
        t.extend(self.stop);
        t
    }
}

/// `[B, vocab]` logits of the last position of each row, on the host, row-major.
pub(crate) fn last_logits(model: &Llama, hidden: Tensor<3>) -> Vec<f32> {
    let [b, n, h] = hidden.dims();
    let last = hidden.narrow(1, n - 1, 1).reshape([b, h]);
    let logits = model.head(&last).logits(&last, 0, b);
    logits
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap_or_default()
}

/// Continues every prompt at once: the prompts are left-padded into one batch, run once,
/// then each step feeds one token per row through the KV cache. Rows that stopped keep a
/// slot in the batch (their outputs are ignored) until every row is done. Tokens are drawn
/// row by row from `rng`, so a seed fixes the whole batch.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    stop: &[u32],
    s: &Sampling,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Vec<Completion>> {
    generate_groups(model, prompts, 1, stop, s, rng, device)
}

/// [`generate_batch`] for `group` completions of each prompt (GRPO's G): row `r` of the
/// result continues prompt `r / group`. Each distinct prompt is run once and its KV cache
/// and last logits are shared by its `group` rows, which then decode in one batch.
pub fn generate_groups(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    stop: &[u32],
    s: &Sampling,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Vec<Completion>> {
    generate_groups_reporting(model, prompts, group, stop, s, rng, device, &|_, _| {})
}

/// [`generate_groups`], calling `progress(done, rows)` whenever rows finish.
#[allow(clippy::too_many_arguments)]
pub fn generate_groups_reporting(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    stop: &[u32],
    s: &Sampling,
    rng: &mut ChaCha8Rng,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Completion>> {
    let mut draws = Draws::Shared(rng);
    run_groups(model, prompts, group, stop, s, &mut draws, device, progress)
}

/// [`generate_groups`] where row `r` draws from `streams[r]` alone, so what a row samples
/// does not depend on which other rows share its batch, nor on how many there are.
pub fn generate_groups_streams(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    stop: &[u32],
    s: &Sampling,
    streams: &mut [ChaCha8Rng],
    device: &Device,
) -> Result<Vec<Completion>> {
    if streams.len() != prompts.len() * group {
        return Err(TrainerError::Input(format!(
            "{} random streams for {} rows",
            streams.len(),
            prompts.len() * group
        )));
    }
    let mut draws = Draws::PerRow(streams);
    run_groups(
        model,
        prompts,
        group,
        stop,
        s,
        &mut draws,
        device,
        &|_, _| {},
    )
}

/// Row streams `first..first + n` of `seed`: ChaCha's stream number is the row's place in
/// the whole input, so a row draws the same tokens whatever batch it lands in. Stream 0 is
/// the plain `seed_from_u64(seed)` generator that [`generate`] uses for a single prompt.
pub fn row_streams(seed: u64, first: usize, n: usize) -> Vec<ChaCha8Rng> {
    (first..first + n)
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(r as u64);
            rng
        })
        .collect()
}

/// Where each row's random draws come from.
enum Draws<'a> {
    /// One generator for the batch, drawn row by row: a seed fixes the whole batch.
    Shared(&'a mut ChaCha8Rng),
    /// Row `r` draws from its own generator.
    PerRow(&'a mut [ChaCha8Rng]),
}

impl Draws<'_> {
    fn row(&mut self, r: usize) -> &mut ChaCha8Rng {
        match self {
            Draws::Shared(rng) => rng,
            Draws::PerRow(rngs) => &mut rngs[r],
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_groups(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    stop: &[u32],
    s: &Sampling,
    draws: &mut Draws,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Completion>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(TrainerError::Input(format!("prompt {} is empty", i + 1)));
    }
    let rows = prompts.len() * group;
    let mut out: Vec<Completion> = vec![
        Completion {
            tokens: Vec::new(),
            stop: None,
        };
        rows
    ];
    if rows == 0 || s.max_new_tokens == 0 {
        return Ok(out);
    }
    let (logits, cache) = prefill(model, prompts, group, device);
    let lengths: Vec<usize> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.len(), group))
        .collect();
    decode(
        model, logits, cache, &lengths, &mut out, stop, s, draws, device, progress,
    );
    Ok(out)
}

/// Runs the left-padded prompts once; returns the last position's logits and the KV
/// cache, each prompt's rows repeated `group` times.
fn prefill(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    device: &Device,
) -> (Vec<f32>, KvCache) {
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut positions, mut padding) = (Vec::new(), Vec::new(), Vec::new());
    for p in prompts {
        let lead = width - p.len();
        for j in 0..width {
            ids.push(if j < lead { 0 } else { p[j - lead] as i64 });
            positions.push(j.saturating_sub(lead) as i64);
            padding.push(j < lead);
        }
    }
    let ints = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, width]), device);
    let pads = |v: Vec<bool>, rows: usize| {
        Tensor::<2, Bool>::from_data(TensorData::new(v, [rows, width]), device)
    };
    let grouped: Vec<bool> = match group {
        1 => Vec::new(),
        _ => padding
            .chunks_exact(width.max(1))
            .flat_map(|row| std::iter::repeat_n(row, group).flatten().copied())
            .collect(),
    };
    let (hidden, cache) = model.hidden_cached(ints(ids), ints(positions), pads(padding, b), None);
    let logits = last_logits(model, hidden);
    if group == 1 {
        return (logits, cache);
    }
    let vocab = logits.len() / b;
    let logits = logits
        .chunks_exact(vocab)
        .flat_map(|row| std::iter::repeat_n(row, group).flatten().copied())
        .collect();
    let rows: Vec<i64> = (0..b as i64)
        .flat_map(|i| std::iter::repeat_n(i, group))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [b * group]), device);
    let cache = KvCache {
        layers: cache
            .layers
            .into_iter()
            .map(|l| LayerCache {
                k: l.k.select(0, index.clone()),
                v: l.v.select(0, index.clone()),
            })
            .collect(),
        // From the host: flex's `select` on a bool tensor returns bytes that `cat` then
        // refuses to join with bools.
        key_padding: pads(grouped, b * group),
    };
    (logits, cache)
}

/// Samples from `logits` (`[B, vocab]`, the prompts' last positions) and then one token per
/// row per step through `cache`, into `out`, until every row has stopped. `lengths`: each
/// row's prompt length (its next token's position).
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Llama,
    mut logits: Vec<f32>,
    mut cache: KvCache,
    lengths: &[usize],
    out: &mut [Completion],
    stop: &[u32],
    s: &Sampling,
    draws: &mut Draws,
    device: &Device,
    progress: &dyn Fn(usize, usize),
) {
    let b = out.len();
    let vocab = logits.len() / b;
    let ints = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, 1]), device);
    let mut done = vec![false; b];
    let mut reported = 0;
    for step in 0..s.max_new_tokens {
        let mut next = vec![0i64; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let token = sample(&logits[r * vocab..(r + 1) * vocab], s, draws.row(r));
            if stop.contains(&token) {
                out[r].stop = Some(token);
                done[r] = true;
            } else {
                out[r].tokens.push(token);
                next[r] = token as i64;
                done[r] = out[r].tokens.len() == s.max_new_tokens;
            }
        }
        let finished = done.iter().filter(|&&d| d).count();
        if finished > reported {
            progress(finished, b);
            reported = finished;
        }
        if finished == b {
            break;
        }
        let positions: Vec<i64> = lengths.iter().map(|&n| (n + step) as i64).collect();
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(vec![false; b], [b, 1]), device);
        let (hidden, c) = model.hidden_cached(ints(next), ints(positions), padding, Some(cache));
        cache = c;
        logits = last_logits(model, hidden);
    }
}

/// Continues `prompt` until a stop token or `max_new_tokens`, seeded by `s.seed`. Returns
/// the new tokens, without the stop token.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    stop: &[u32],
    s: &Sampling,
    device: &Device,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(TrainerError::Input("the prompt is empty".into()));
    }
    s.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut out = generate_batch(model, &[prompt.to_vec()], stop, s, &mut rng, device)?;
    Ok(out.pop().map(|c| c.tokens).unwrap_or_default())
}

/// The ids generation stops on: the config's `eos_token_id`s and those the side files add
/// ([`side_file_stops`]). Every caller loads the tokenizer with
/// [`crate::model::load_tokenizer`] first, which refuses bad side files; so here they read
/// cleanly.
pub fn stop_tokens(
    dir: &Path,
    config: &checkpoints::ModelConfig,
    tokenizer: &tokenizers::Tokenizer,
) -> Vec<u32> {
    let mut stop = config.eos_token_ids.clone();
    stop.extend(side_file_stops(dir, tokenizer, config.vocab_size).unwrap_or_default());
    stop.sort_unstable();
    stop.dedup();
    stop
}

/// Checks the side files of the checkpoint in `dir` that name tokens, and returns the stop
/// ids they add: `tokenizer_config.json`'s `eos_token`, and `generation_config.json`'s
/// `eos_token_id`s. A `bos_token`, `eos_token` or `pad_token` the tokenizer does not hold,
/// a `generation_config.json` that cannot be read or is not a JSON object, and an
/// `eos_token_id` that is not a token id of the model are errors naming the file and key.
/// A file that is not there adds nothing.
pub(crate) fn side_file_stops(
    dir: &Path,
    tokenizer: &tokenizers::Tokenizer,
    vocab_size: usize,
) -> Result<Vec<u32>> {
    use serde_json::Value;
    let mut stop = Vec::new();
    let (tc, tc_path) = data::template::tokenizer_config(dir)?;
    let bad =
        |path: &Path, reason: String| TrainerError::Input(format!("{}: {reason}", path.display()));
    if !matches!(tc, Value::Null | Value::Object(_)) {
        return Err(bad(&tc_path, "expected a JSON object".into()));
    }
    for key in ["bos_token", "eos_token", "pad_token"] {
        let token = match tc.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::String(t)) => t,
            Some(Value::Object(o)) if o.get("content").is_some_and(Value::is_string) => {
                o["content"].as_str().unwrap_or_default()
            }
            Some(v) => {
                return Err(bad(
                    &tc_path,
                    format!(
                        "`{key}`: expected a token (text, or an object with `content`), got {v}"
                    ),
                ));
            }
        };
        let id = tokenizer.token_to_id(token).ok_or_else(|| {
            bad(
                &tc_path,
                format!("`{key}` names `{token}`, which is not a token of the tokenizer"),
            )
        })?;
        if key == "eos_token" {
            stop.push(id);
        }
    }
    // A GGUF model carries no generation config.
    let gc_path = dir.join("generation_config.json");
    if !dir.is_dir() {
        return Ok(stop);
    }
    let text = match std::fs::read_to_string(&gc_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stop),
        Err(e) => return Err(bad(&gc_path, e.to_string())),
    };
    let gc: Value =
        serde_json::from_str(&text).map_err(|e| bad(&gc_path, format!("invalid JSON: {e}")))?;
    let Value::Object(gc) = gc else {
        return Err(bad(&gc_path, "expected a JSON object".into()));
    };
    let ids = match gc.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids.iter().collect(),
        Some(v) => vec![v],
    };
    for v in ids {
        let id = v
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .filter(|&id| (id as usize) < vocab_size)
            .ok_or_else(|| {
                bad(
                    &gc_path,
                    format!(
                        "`eos_token_id`: {v} is not a token id of the model (0 to {})",
                        vocab_size.saturating_sub(1)
                    ),
                )
            })?;
        stop.push(id);
    }
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_settings_that_sample_from_nothing_are_refused() {
        let ok = Sampling::default();
        ok.validate().unwrap();
        let none = Sampling {
            max_new_tokens: 0,
            ..Sampling::default()
        };
        let err = none.validate().unwrap_err().to_string();
        assert!(err.contains("max_new_tokens 0"), "{err}");
        for (t, p, want) in [
            (-1.0, 1.0, "temperature -1"),
            (f64::NAN, 1.0, "temperature NaN"),
            (f64::INFINITY, 1.0, "temperature inf"),
            (0.7, 0.0, "top_p 0"),
            (0.7, 1.5, "top_p 1.5"),
            (0.7, f64::NAN, "top_p NaN"),
        ] {
            let s = Sampling {
                temperature: t,
                top_p: p,
                ..Sampling::default()
            };
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{t} {p}: {err}");
        }
    }

    #[test]
    fn sampling_rules() {
        let logits = [0.1f32, 2.0, 1.5, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &top1, &mut rng) == 1));
        let tight_p = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &tight_p, &mut rng) == 1));
        let two = Sampling {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let draws: Vec<u32> = (0..400).map(|_| sample(&logits, &two, &mut rng)).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / 400.0;
        // p(1) = e^2 / (e^2 + e^1.5) ≈ 0.62.
        assert!((ones - 0.62).abs() < 0.08, "{ones}");
        let seeded = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            let s = Sampling {
                temperature: 1.0,
                ..Default::default()
            };
            (0..20)
                .map(|_| sample(&logits, &s, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(seeded(3), seeded(3));
        // No filter: frequencies follow the softmax, p = e^l / Σ e^l.
        let plain = Sampling {
            temperature: 1.0,
            ..Default::default()
        };
        let total: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let draws: Vec<u32> = (0..4000)
            .map(|_| sample(&logits, &plain, &mut rng))
            .collect();
        for (i, &l) in logits.iter().enumerate() {
            let seen = draws.iter().filter(|&&t| t == i as u32).count() as f64 / 4000.0;
            let want = (l as f64).exp() / total;
            assert!((seen - want).abs() < 0.03, "token {i}: {seen} vs {want}");
        }
    }
}
