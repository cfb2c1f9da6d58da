//! The training loop, shared by every method: batching, gradient accumulation, global-norm
//! clipping, the learning-rate schedule, evaluation, metrics, checkpoints. Objectives only
//! compute a loss.

use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use data::batch::{Batch, length_grouped_batches, shuffled, split_by_group};
use data::render::{TemplateChoice, template_for};
use data::tokenize::{Sequence, Tokenized, Tokenizing, TruncationCounts};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::batch::LmBatch;
use crate::model::lora::{LoraSettings, attach_lora, load_adapter, save_adapter};
use crate::model::{Llama, NewModel, init_model, load_model};
use crate::objectives::sft::{SftMetrics, sft_loss};
use crate::recipe::Recipe;
use crate::run_dir::RunDir;
use crate::{Result, TrainerError};

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
}

/// The multiplier on the peak learning rate at optimizer step `step` (0-based), as
/// transformers' schedulers compute it: linear warmup from 0, then constant, linear decay
/// to 0, or half a cosine to 0.
pub fn lr_factor(kind: &str, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        "linear" => (1.0 - progress).max(0.0),
        "cosine" => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        _ => 1.0,
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping. burn's own clipping works per tensor, which is not what LLM recipes mean.
pub fn clip_global_norm(model: &Llama, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    let norm = sum
        .total
        .map(|t| {
            t.into_data()
                .try_into_vec_as::<f64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0)
                .sqrt()
        })
        .unwrap_or(0.0);
    if max_norm > 0.0 && norm > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    norm
}

/// Tokenised training and evaluation sets.
struct Sets {
    train: Vec<Sequence>,
    eval: Vec<Sequence>,
    counts: TruncationCounts,
    /// Bad rows skipped under `skip_bad_rows`, across the train and eval files.
    skipped_rows: usize,
}

fn prepare_data(recipe: &Recipe) -> Result<Sets> {
    let d = &recipe.data;
    let dir = &recipe.model.path;
    let choice = match &d.template {
        Some(name) => TemplateChoice::Builtin(name),
        None => TemplateChoice::Shipped(None),
    };
    let template = template_for(dir, choice)?;
    let tokenizer = data::tokenizer::load(dir)?;
    let options = d.load_options().map_err(TrainerError::Input)?;
    let truncation = d.truncation().map_err(TrainerError::Input)?;
    let t = Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length: d.max_length,
        truncation,
    };
    let mut counts = TruncationCounts::default();
    let mut tokenize = |examples: &[data::Example]| -> Result<Vec<Sequence>> {
        let mut out = Vec::new();
        for e in examples {
            match t.example(e, &mut counts)? {
                Some(Tokenized::Sequence(s)) => out.push(s),
                Some(_) => {
                    return Err(TrainerError::Input(
                        "SFT needs conversations or prompt/completion data".into(),
                    ));
                }
                None => {}
            }
        }
        Ok(out)
    };
    let loaded = data::load_examples(&d.train, &options)?;
    let mut skipped_rows = loaded.skipped.len();
    let train_examples = loaded.examples;
    let (train, eval) = match &d.eval {
        Some(path) => {
            let eval_loaded = data::load_examples(path, &options)?;
            skipped_rows += eval_loaded.skipped.len();
            (tokenize(&train_examples)?, tokenize(&eval_loaded.examples)?)
        }
        None => {
            let keys: Vec<String> = train_examples
                .iter()
                .map(data::Example::group_key)
                .collect();
            let (ti, ei) = split_by_group(&keys, d.eval_fraction, d.seed);
            let pick = |idx: &[usize]| {
                idx.iter()
                    .map(|&i| train_examples[i].clone())
                    .collect::<Vec<_>>()
            };
            (tokenize(&pick(&ti))?, tokenize(&pick(&ei))?)
        }
    };
    if train.is_empty() {
        return Err(TrainerError::Input(format!(
            "{}: no training examples left after tokenisation",
            d.train.display()
        )));
    }
    Ok(Sets {
        train,
        eval,
        counts,
        skipped_rows,
    })
}

/// The epoch's batches, in order: length-grouped padded batches, or packed rows.
fn epoch_batches(recipe: &Recipe, seqs: &[Sequence], epoch: usize, pad: u32) -> Result<Vec<Batch>> {
    let bs = recipe.train.per_device_train_batch_size;
    let seed = recipe.train.seed.wrapping_add(epoch as u64);
    if recipe.data.packing {
        let order = shuffled(seqs.len(), seed);
        let refs: Vec<&Sequence> = order.iter().map(|&i| &seqs[i]).collect();
        let packed = Batch::packed(&refs, recipe.data.max_length, pad)?;
        let rows: Vec<usize> = (0..packed.rows).collect();
        return Ok(rows.chunks(bs).map(|r| packed.select_rows(r)).collect());
    }
    let lengths: Vec<usize> = seqs.iter().map(Sequence::len).collect();
    Ok(length_grouped_batches(&lengths, bs, seed)
        .into_iter()
        .map(|idx| Batch::padded(&idx.iter().map(|&i| &seqs[i]).collect::<Vec<_>>(), pad))
        .collect())
}

/// Token-weighted loss and accuracy over `batches`, without gradients.
fn evaluate(model: &Llama, batches: &[Batch], device: &Device) -> Option<SftMetrics> {
    let (mut loss, mut acc, mut tokens) = (0.0, 0.0, 0usize);
    for b in batches {
        let lm = LmBatch::new(b, device);
        if lm.num_loss_tokens == 0 {
            continue;
        }
        let (_, m) = sft_loss(model, &lm);
        loss += m.loss * lm.num_loss_tokens as f64;
        acc += m.mean_token_accuracy * lm.num_loss_tokens as f64;
        tokens += lm.num_loss_tokens;
    }
    (tokens > 0).then(|| SftMetrics {
        loss: loss / tokens as f64,
        mean_token_accuracy: acc / tokens as f64,
        num_tokens: tokens,
    })
}

/// Where a run stands, saved with every checkpoint so a resumed run continues exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    global_step: usize,
    /// The data position: the epoch, and the next group of micro-batches in it.
    epoch: usize,
    next_group: usize,
    seen_tokens: usize,
    first_loss: f64,
    history: Vec<(usize, f64)>,
    eval_history: Vec<(usize, f64)>,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bin";

/// The device RNG is reseeded before every step from the seed and the step alone, so
/// dropout draws do not depend on what ran before — a resumed run draws the same.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs the recipe, writing everything into `out`; with `resume`, continues the run in
/// `out` from its newest complete checkpoint.
pub fn train(recipe: &Recipe, out: &Path, resume: bool, progress: bool) -> Result<Outcome> {
    let t = &recipe.train;
    let run = if resume {
        let run = RunDir::open(out)?;
        let saved = std::fs::read_to_string(out.join("recipe.toml")).unwrap_or_default();
        if saved != recipe.to_toml() {
            return Err(TrainerError::Input(format!(
                "{}: this recipe (with its --set overrides) differs from the one the run started with; resume needs the same",
                out.join("recipe.toml").display()
            )));
        }
        run
    } else {
        let run = RunDir::create(out)?;
        run.write_recipe(&recipe.to_toml())?;
        run
    };
    let resume_from = if resume {
        let found = run.latest_checkpoint(&[
            STATE_FILE,
            OPTIMIZER_FILE,
            "adapter_model.safetensors",
            "adapter_config.json",
        ]);
        Some(found.ok_or_else(|| {
            TrainerError::Input(format!(
                "{}: no complete checkpoint to resume from",
                out.display()
            ))
        })?)
    } else {
        None
    };
    let base = &recipe.model.path;
    if !base.join("config.json").exists() && recipe.model.create_if_missing {
        init_model(
            base,
            &NewModel {
                seed: t.seed,
                ..Default::default()
            },
            Default::default(),
        )?;
    }
    let mut device = crate::device::parse(&t.device)?.autodiff();
    if t.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    device.seed(t.seed);
    let (config, model) = load_model(base, &device)?;
    let lora = recipe
        .lora
        .as_ref()
        .ok_or_else(|| TrainerError::Input("a [lora] section is required".into()))?;
    let settings = LoraSettings {
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: lora.targets.clone(),
        use_rslora: lora.rslora,
    };
    let (mut model, settings) = match (&resume_from, &lora.init_from) {
        (Some((_, dir)), _) => (load_adapter(dir, model, &device)?.0, settings),
        (None, Some(dir)) => load_adapter(dir, model, &device)?,
        (None, None) => (attach_lora(model, &settings, &device)?, settings),
    };

    let sets = prepare_data(recipe)?;
    let pad = config
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let inner = device.clone().inner();
    let eval_batches: Vec<Batch> = sets
        .eval
        .chunks(t.per_device_train_batch_size)
        .map(|c| Batch::padded(&c.iter().collect::<Vec<_>>(), pad))
        .collect();
    let batches_per_epoch = epoch_batches(recipe, &sets.train, 0, pad)?.len();
    let steps_per_epoch = batches_per_epoch
        .div_ceil(t.gradient_accumulation_steps)
        .max(1);
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        t.num_train_epochs * steps_per_epoch
    };
    let warmup = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total as f64).ceil() as usize
    };

    let mut optim = AdamWConfig::new()
        .with_beta_1(t.adam_beta1 as f32)
        .with_beta_2(t.adam_beta2 as f32)
        .with_epsilon(t.adam_epsilon as f32)
        .with_weight_decay(t.weight_decay as f32)
        .init();
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        next_group: 0,
        seen_tokens: 0,
        first_loss: f64::NAN,
        history: Vec::new(),
        eval_history: Vec::new(),
    };
    if let Some((step, dir)) = &resume_from {
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
        state = serde_json::from_str(&text)
            .map_err(|e| TrainerError::Input(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
        let record = burn::optim::OptimizerRecord::load(dir.join(OPTIMIZER_FILE)).map_err(|e| {
            TrainerError::Input(format!("{}: {e:?}", dir.join(OPTIMIZER_FILE).display()))
        })?;
        optim = optim.load_record(record);
        run.truncate_metrics(*step)?;
    }

    let bar = if progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let base_name = base.display().to_string();
    let save_state = |dir: &Path,
                      model: &Llama,
                      optim: &burn::optim::ModuleOptimizer,
                      state: &TrainerState|
     -> Result<()> {
        save_adapter(dir, model, &settings, &base_name)?;
        optim
            .to_record()
            .save(dir.join(OPTIMIZER_FILE))
            .map_err(|e| {
                TrainerError::Input(format!("{}: {e:?}", dir.join(OPTIMIZER_FILE).display()))
            })?;
        let text = serde_json::to_string(state).unwrap_or_default();
        checkpoints::write_text(&dir.join(STATE_FILE), &text)?;
        Ok(())
    };

    let TrainerState {
        global_step: mut step,
        mut epoch,
        next_group: mut skip_groups,
        mut seen_tokens,
        mut first_loss,
        mut history,
        mut eval_history,
    } = state;
    let mut epoch_f;
    let mut last_eval = None;
    let started = Instant::now();
    bar.set_position(step as u64);
    'epochs: loop {
        let batches = epoch_batches(recipe, &sets.train, epoch, pad)?;
        let groups: Vec<&[Batch]> = batches.chunks(t.gradient_accumulation_steps).collect();
        let step_at_epoch_start = step;
        let resumed_mid_epoch = skip_groups > 0;
        for (g, group) in groups.iter().enumerate() {
            if g < skip_groups {
                continue;
            }
            device.seed(step_seed(t.seed, step));
            let lms: Vec<LmBatch> = group.iter().map(|b| LmBatch::new(b, &device)).collect();
            let loss_tokens: usize = lms.iter().map(|l| l.num_loss_tokens).sum();
            if loss_tokens == 0 {
                continue;
            }
            let mut accumulator = GradientsAccumulator::new();
            let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
            for lm in lms.iter().filter(|l| l.num_loss_tokens > 0) {
                let (loss, m) = sft_loss(&model, lm);
                let share = lm.num_loss_tokens as f64 / loss_tokens as f64;
                loss_sum += m.loss * share;
                acc_sum += m.mean_token_accuracy * share;
                seen_tokens += lm.num_tokens;
                let grads = GradientsParams::from_grads(loss.mul_scalar(share).backward(), &model);
                accumulator.accumulate(&model, grads);
            }
            let mut grads = accumulator.grads();
            let grad_norm = clip_global_norm(&model, &mut grads, t.max_grad_norm);
            let lr = t.learning_rate * lr_factor(&t.lr_scheduler_type, step, warmup, total);
            model = optim.step(lr, model, grads);
            step += 1;
            if step == 1 {
                first_loss = loss_sum;
            }
            history.push((step, loss_sum));
            epoch_f =
                epoch as f64 + (step - epoch * steps_per_epoch) as f64 / steps_per_epoch as f64;
            if step % t.logging_steps.max(1) == 0 || step == total {
                run.log(&json!({
                    "loss": loss_sum, "learning_rate": lr, "grad_norm": grad_norm,
                    "mean_token_accuracy": acc_sum, "num_tokens": seen_tokens,
                    "epoch": epoch_f, "step": step,
                }))?;
            }
            let tps = seen_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));
            let eval_now = t.eval_steps > 0 && step % t.eval_steps == 0 && step < total;
            if eval_now && let Some(m) = evaluate(&model.valid(), &eval_batches, &inner) {
                log_eval(&run, &m, step, epoch_f)?;
                eval_history.push((step, m.loss));
            }
            if t.save_steps > 0 && step % t.save_steps == 0 && step < total {
                // The position after this group; the end of an epoch is the next one's start.
                let (e, n) = if g + 1 == groups.len() {
                    (epoch + 1, 0)
                } else {
                    (epoch, g + 1)
                };
                let snapshot = TrainerState {
                    global_step: step,
                    epoch: e,
                    next_group: n,
                    seen_tokens,
                    first_loss,
                    history: history.clone(),
                    eval_history: eval_history.clone(),
                };
                run.checkpoint(step, t.save_total_limit, |dir| {
                    save_state(dir, &model, &optim, &snapshot)
                })?;
                run.plot(&history, &eval_history)?;
            }
            if step >= total {
                break 'epochs;
            }
        }
        skip_groups = 0;
        if step == step_at_epoch_start && !resumed_mid_epoch {
            return Err(TrainerError::Input(format!(
                "{}: no batch has a token to learn from",
                recipe.data.train.display()
            )));
        }
        epoch += 1;
    }
    bar.finish_and_clear();
    if let Some(m) = evaluate(&model.valid(), &eval_batches, &inner) {
        log_eval(&run, &m, step, epoch_f)?;
        eval_history.push((step, m.loss));
        last_eval = Some(m.loss);
    }
    let done = TrainerState {
        global_step: step,
        epoch,
        next_group: 0,
        seen_tokens,
        first_loss,
        history: history.clone(),
        eval_history: eval_history.clone(),
    };
    run.finish(|dir| save_state(dir, &model, &optim, &done))?;
    run.plot(&history, &eval_history)?;
    run.log(&json!({
        "truncated": sets.counts.truncated, "dropped": sets.counts.dropped,
        "skipped_rows": sets.skipped_rows,
        "train_runtime": started.elapsed().as_secs_f64(), "step": step,
    }))?;
    if sets.skipped_rows > 0 {
        eprintln!("skipped {} bad rows (skip_bad_rows)", sets.skipped_rows);
    }
    Ok(Outcome {
        steps: step,
        first_loss,
        last_loss: history.last().map_or(f64::NAN, |h| h.1),
        eval_loss: last_eval,
    })
}

fn log_eval(run: &RunDir, m: &SftMetrics, step: usize, epoch: f64) -> Result<()> {
    run.log(&json!({
        "eval_loss": m.loss, "eval_perplexity": m.loss.exp(),
        "eval_mean_token_accuracy": m.mean_token_accuracy, "eval_num_tokens": m.num_tokens,
        "epoch": epoch, "step": step,
    }))
}

#[cfg(test)]
mod tests {
    use super::lr_factor;

    #[test]
    fn schedules_follow_transformers() {
        // Warmup 2 of 10: 0, 0.5, then the decay.
        assert_eq!(lr_factor("linear", 0, 2, 10), 0.0);
        assert_eq!(lr_factor("linear", 1, 2, 10), 0.5);
        assert_eq!(lr_factor("linear", 2, 2, 10), 1.0);
        assert_eq!(lr_factor("linear", 6, 2, 10), 0.5);
        assert_eq!(lr_factor("linear", 10, 2, 10), 0.0);
        assert!((lr_factor("cosine", 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(
            (lr_factor("cosine", 4, 2, 10) - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())))
                .abs()
                < 1e-12
        );
        assert_eq!(lr_factor("constant", 9, 2, 10), 1.0);
        assert_eq!(lr_factor("constant", 0, 0, 10), 1.0);
    }
}
