//! The loop itself: epochs of micro-batch groups, one optimizer step per group and
//! iteration, with logging, evaluation and checkpoints between steps. It names no method:
//! the objective says what a step's losses are.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Outcome;
use super::data::Sets;
use super::eval::{evaluate, log_eval};
use super::schedule::{lr_factor, total_and_warmup};
use super::setup::Setup;
use super::state::{self, TrainerState};
use super::step::{
    RANK_SEED, SAMPLER_SEED, clip_global_norm, micro_seed, non_finite, scalar, shard, shares,
    step_seed,
};
use crate::dist::Group;
use crate::dist::outcomes::Outcome as StepOutcome;
use crate::examples::{Batching, Micro, eval_batches};
use crate::model::Llama;
use crate::objectives::{LossInput, Metrics, Objective, StepInput};
use crate::recipe::Recipe;
use crate::run_dir::RunDir;
use crate::{Result, TrainerError};

/// What the loop runs with, set up by [`super::train`].
pub(super) struct Parts<'a> {
    pub recipe: &'a Recipe,
    pub objective: Box<dyn Objective>,
    pub dp: &'a Group,
    pub run: &'a RunDir,
    /// The files of a complete checkpoint.
    pub required: &'a [&'static str],
    /// The training (autodiff) device and its plain twin.
    pub device: Device,
    pub inner: Device,
    pub setup: &'a Setup,
    pub sets: &'a Sets,
    pub pad: u32,
}

/// Progress inside a step (GRPO's rollout) or an evaluation, `done` of `planned`: beside
/// the bar's last message on a terminal, else a plain line at most every
/// `progress_seconds`, as step lines are.
struct Phase<'a> {
    bar: &'a ProgressBar,
    lines: &'a Option<(Duration, Cell<Instant>)>,
    message: &'a RefCell<String>,
    /// The step under way, or just taken (an evaluation).
    at: usize,
    total: usize,
}

impl<'a> Phase<'a> {
    fn of(
        bar: &'a ProgressBar,
        lines: &'a Option<(Duration, Cell<Instant>)>,
        message: &'a RefCell<String>,
        total: usize,
    ) -> Self {
        Self {
            bar,
            lines,
            message,
            at: 0,
            total,
        }
    }

    fn report(&self, what: &str, done: usize, planned: usize) {
        let base = self.message.borrow();
        let sep = if base.is_empty() { "" } else { " | " };
        self.bar
            .set_message(format!("{base}{sep}{what} {done}/{planned}"));
        if let Some((every, last)) = self.lines
            && last.get().elapsed() >= *every
        {
            eprintln!("{what} {done}/{planned} (step {}/{})", self.at, self.total);
            last.set(Instant::now());
        }
    }
}

/// The process's peak resident memory so far in MiB (Linux's `VmHWM`), `None` where the
/// kernel does not say. Host memory: a GPU's own memory is not in it.
fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// What one optimizer step gave.
struct Stepped {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    metrics: Metrics,
    /// Why the update was skipped, if it was.
    bad: Option<&'static str>,
    /// The clipped gradients to apply; `None` when the update is skipped.
    grads: Option<GradientsParams>,
    /// Every rank's tokens of this step.
    tokens: usize,
    /// Wall time of the step, from its first forward to the applied update.
    seconds: f64,
}

/// The loop with its running state.
pub(super) struct Loop<'a> {
    p: Parts<'a>,
    model: Llama,
    optim: ModuleOptimizer,
    /// Where the run stands; its data position is where the current epoch resumes.
    s: TrainerState,
    batching: Batching,
    eval_batches: Vec<Micro>,
    per_step: usize,
    iterations: usize,
    steps_per_epoch: usize,
    total: usize,
    warmup: usize,
    bar: ProgressBar,
    /// When stderr is no terminal the bar is silent: a plain line is printed instead, once
    /// an interval has passed since the start or the last line. Holds the interval and
    /// when that was.
    lines: Option<(Duration, Cell<Instant>)>,
    /// The bar's message after the last step, which progress inside a step extends.
    message: RefCell<String>,
    bad_streak: usize,
    /// A stop signal seen by any rank, acted on at the next checkpoint opportunity.
    pending_signal: Option<i32>,
    /// Epoch 0's micro-batches, cut once to size the run and reused when it starts there.
    first_epoch: Option<Vec<Micro>>,
    started: Instant,
}

impl<'a> Loop<'a> {
    pub fn new(
        p: Parts<'a>,
        s: TrainerState,
        optim: ModuleOptimizer,
        progress: bool,
    ) -> Result<Self> {
        let t = &p.recipe.train;
        let batching = Batching {
            batch_size: t.per_device_train_batch_size,
            accumulation: t.gradient_accumulation_steps,
            packing: p.recipe.data.packing,
            max_length: p.recipe.data.max_length,
            seed: t.seed,
            pad: p.pad,
        };
        let per_step = p.objective.micros_per_step(t.gradient_accumulation_steps);
        let iterations = p.objective.iterations();
        let eval_batches = eval_batches(&p.sets.eval, t.per_device_train_batch_size, p.pad);
        let first_epoch = p.objective.epoch_batches(&p.sets.train, &batching, 0)?;
        let batches_per_epoch = first_epoch.len();
        // A step consumes `per_step` micro-batches on each rank: the global batch.
        let world = p.dp.world_size();
        let steps_per_epoch = batches_per_epoch
            .div_ceil(per_step * world)
            .max(1)
            .saturating_mul(iterations);
        // Sequences per step over every process: what GRPO's prompts per step and the other
        // methods' micro-batches both come from.
        let global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world;
        super::state::check_global_batch(s.global_batch, global_batch, t, world)?;
        // The evaluation rows too: held out of the same file, or a file of their own.
        let train_data = {
            let mut h = crate::fnv::Fnv::new();
            h.word(p.sets.train.fingerprint());
            h.word(p.sets.eval.fingerprint());
            h.0.max(1)
        };
        if s.train_data != 0 && s.train_data != train_data {
            let files: Vec<String> = std::iter::once(&p.recipe.data.train)
                .chain(p.recipe.data.eval.as_ref())
                .map(|f| f.display().to_string())
                .collect();
            return Err(TrainerError::Input(format!(
                "--resume: {} does not read as the rows the run was trained and evaluated on \
                 (the file, or the tokenizer, template or data settings that make its tokens, \
                 changed since it started); resume with the same data, or start a new run",
                files.join(" and ")
            )));
        }
        let models = super::state::model_hashes(p.recipe)?;
        super::state::check_models(&s.models, &models, p.recipe)?;
        let s = TrainerState {
            global_batch,
            train_data,
            models,
            ..s
        };
        let (total, warmup) = total_and_warmup(t, steps_per_epoch);
        let bar = if progress && p.dp.is_main() {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        let lines = (progress && p.dp.is_main() && !std::io::stderr().is_terminal()).then(|| {
            (
                Duration::from_secs_f64(t.progress_seconds.max(0.0)),
                Cell::new(Instant::now()),
            )
        });
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Ok(Self {
            model: p.setup.model.clone(),
            p,
            optim,
            s,
            batching,
            eval_batches,
            per_step,
            iterations,
            steps_per_epoch,
            total,
            warmup,
            bar,
            lines,
            message: RefCell::new(String::new()),
            bad_streak: 0,
            pending_signal: None,
            first_epoch: Some(first_epoch),
            started: Instant::now(),
        })
    }

    /// The learning rate of the update made at 0-based step `step`, as the schedule sets it.
    fn learning_rate(&self, step: usize) -> f64 {
        let t = &self.p.recipe.train;
        t.learning_rate * lr_factor(t.lr_scheduler_type, step, self.warmup, self.total)
    }

    /// Settings that are valid but cannot do what they say, given the run's length.
    pub fn warnings(&self) -> Vec<String> {
        let t = &self.p.recipe.train;
        let mut out = Vec::new();
        // Only an explicit count: a ratio below 1 reaches the whole run only in runs of a
        // step or so, which smoke tests make on purpose.
        if t.warmup_steps > 0 && t.warmup_steps >= self.total {
            out.push(format!(
                "train.warmup_steps = {} is not below the run's {} optimizer steps: the \
                 learning rate never reaches train.learning_rate = {}",
                t.warmup_steps, self.total, t.learning_rate
            ));
        }
        out
    }

    /// Restates the saved position in this run's micro-batches where they hold another
    /// number of rows than the checkpoint's (GRPO resumed on another number of processes:
    /// its micro-batch is a rank's prompts of one step), so the same rows are done.
    fn rescale_position(&mut self, batches: &[Micro]) -> Result<()> {
        let rows = batches.first().map_or(0, Micro::rows);
        let saved = std::mem::replace(&mut self.s.micro_rows, rows);
        if saved == 0 || rows == 0 || saved == rows || self.s.next_micro == 0 {
            return Ok(());
        }
        let done = self.s.next_micro * saved;
        if !done.is_multiple_of(rows) {
            return Err(TrainerError::Input(format!(
                "--resume: the checkpoint stands {done} rows into epoch {}, which this start's \
                 micro-batches of {rows} rows do not divide; resume with the checkpoint's \
                 number of processes",
                self.s.epoch
            )));
        }
        self.s.next_micro = done / rows;
        Ok(())
    }

    /// Every epoch's groups of micro-batches, each spanning every rank (`per_step` each in
    /// rank order) and used once per iteration; a resumed epoch starts where its
    /// checkpoint left it, whatever world size wrote it.
    pub fn run(mut self) -> Result<Outcome> {
        self.bar.set_position(self.s.global_step as u64);
        let span = self.per_step * self.p.dp.world_size();
        loop {
            let batches = match self.first_epoch.take() {
                Some(b) if self.s.epoch == 0 => b,
                _ => self.p.objective.epoch_batches(
                    &self.p.sets.train,
                    &self.batching,
                    self.s.epoch,
                )?,
            };
            self.rescale_position(&batches)?;
            let start = self.s.next_micro.min(batches.len());
            let iterations = self.iterations;
            let groups: Vec<(usize, &[Micro], usize)> = batches[start..]
                .chunks(span)
                .enumerate()
                .flat_map(|(k, g)| (0..iterations).map(move |i| (start + k * span, g, i)))
                .skip(self.s.next_iteration)
                .collect();
            let step_at_epoch_start = self.s.global_step;
            let resumed_mid_epoch = start > 0 || self.s.next_iteration > 0;
            for &(offset, whole, iteration) in &groups {
                let began = Instant::now();
                let stepped = match self.step(whole, iteration) {
                    Ok(stepped) => stepped,
                    Err(e) => {
                        return Err(self.keep_progress(e, (self.s.epoch, offset, iteration)));
                    }
                };
                let Some(mut stepped) = stepped else {
                    continue;
                };
                // Here, not in `step`, so the model moves into the optimizer and burn may
                // update its tensors in place.
                if let Some(grads) = stepped.grads.take() {
                    self.model = self.optim.step(stepped.lr, self.model, grads);
                }
                stepped.seconds = began.elapsed().as_secs_f64();
                self.record(stepped)?;
                let step = self.s.global_step;
                if self.p.recipe.train.eval_steps > 0
                    && step.is_multiple_of(self.p.recipe.train.eval_steps)
                    && step < self.total
                {
                    if let Some((loss, _)) = self.eval()? {
                        self.s.eval_history.push((step, loss));
                    }
                    self.take_late_signal()?;
                }
                // The position after this group; the end of an epoch is the next one's start.
                let reuse_next = iteration + 1 < iterations;
                let position = if reuse_next {
                    (self.s.epoch, offset, iteration + 1)
                } else if offset + whole.len() >= batches.len() {
                    (self.s.epoch + 1, 0, 0)
                } else {
                    (self.s.epoch, offset + whole.len(), 0)
                };
                self.maybe_checkpoint(position, reuse_next)?;
                if self.s.global_step >= self.total {
                    return self.finish();
                }
            }
            (self.s.next_micro, self.s.next_iteration) = (0, 0);
            if self.s.global_step == step_at_epoch_start && !resumed_mid_epoch {
                return Err(TrainerError::Input(format!(
                    "{}: no batch has anything to learn from",
                    self.p.recipe.data.train.display()
                )));
            }
            self.s.epoch += 1;
        }
    }

    /// One optimizer step on `whole` (every rank's micro-batches): this rank's losses, every
    /// rank's outcomes in global order (so the shares, the loss and the metrics come out as
    /// one process holding the whole group computes them), backward, all-reduce, and clip
    /// the gradients (the caller applies them). `None` when no rank had anything to learn
    /// from.
    fn step(&mut self, whole: &[Micro], iteration: usize) -> Result<Option<Stepped>> {
        let t = &self.p.recipe.train;
        let (dp, rank) = (self.p.dp, self.p.dp.rank());
        let step = self.s.global_step;
        let group = shard(whole, self.per_step, rank);
        let device = &self.p.device;
        device.seed(step_seed(t.seed, step));
        let per_step = self.per_step;
        let seed_micro = |j: usize| device.seed(micro_seed(t.seed, step, rank * per_step + j));
        // Fields, not `self.phase()`: the objective is borrowed mutably beside it.
        let phase = Phase {
            at: self.s.global_step + 1,
            ..Phase::of(&self.bar, &self.lines, &self.message, self.total)
        };
        let input = StepInput {
            dp,
            loss: LossInput {
                model: &self.model,
                examples: &self.p.sets.train,
                reference: self.p.setup.reference.as_ref(),
                pad: self.p.pad,
                device,
            },
            run: self.p.run,
            step,
            iteration,
            sampler_seed: step_seed(t.seed, step)
                ^ SAMPLER_SEED
                ^ (rank as u64).wrapping_mul(RANK_SEED),
            batch_size: t.per_device_train_batch_size,
            inner: &self.p.inner,
            seed_micro: &seed_micro,
            progress: &|what, done, planned| phase.report(what, done, planned),
        };
        let losses = self.p.objective.step(&input, group)?;
        let local: Vec<StepOutcome> = losses
            .outs
            .iter()
            .map(|o| StepOutcome {
                loss: scalar(o.loss.clone()),
                weight: o.weight,
                tokens: o.tokens,
                metrics: o.metrics.clone(),
            })
            .collect();
        let all =
            crate::dist::outcomes::gather(dp, &local, crate::signals::take(), &losses.metrics)?;
        self.pending_signal = self.pending_signal.or(all.signal);
        if all.outcomes.is_empty() {
            return Ok(None);
        }
        let weights: Vec<f64> = all.outcomes.iter().map(|o| o.weight).collect();
        let shares = shares(&weights);
        let (mut loss, mut metrics, mut tokens) = (0.0, Metrics::default(), 0);
        for (o, share) in all.outcomes.iter().zip(&shares) {
            loss += o.loss * share;
            metrics.accumulate(&o.metrics, *share);
            tokens += o.tokens;
        }
        if !losses.reused {
            self.s.seen_tokens += tokens;
        }
        let mut accumulator = GradientsAccumulator::new();
        for (o, share) in losses.outs.into_iter().zip(&shares[all.first_local..]) {
            let grads =
                GradientsParams::from_grads(o.loss.mul_scalar(*share).backward(), &self.model);
            accumulator.accumulate(&self.model, grads);
        }
        for (name, value, combine) in all.step_metrics.0 {
            metrics.push(name, value, combine);
        }
        let mut grads = accumulator.grads();
        crate::dist::grads::all_reduce(dp, &self.model, &mut grads, &self.p.inner)?;
        let grad_norm = clip_global_norm(&self.model, &mut grads, t.max_grad_norm);
        let lr = self.learning_rate(step);
        // A non-finite loss or gradient skips the update, so bad values never reach the
        // weights.
        let bad = non_finite(loss, grad_norm);
        Ok(Some(Stepped {
            loss,
            grad_norm,
            lr,
            metrics,
            bad,
            grads: bad.is_none().then_some(grads),
            tokens,
            seconds: 0.0,
        }))
    }

    /// Counts the step, logs it, and stops the run after too many bad steps in a row.
    fn record(&mut self, st: Stepped) -> Result<()> {
        let t = &self.p.recipe.train;
        if st.bad.is_none() {
            self.bad_streak = 0;
        } else {
            self.bad_streak += 1;
            self.s.skipped_steps += 1;
        }
        self.s.global_step += 1;
        let step = self.s.global_step;
        let run = self.p.run;
        if let Some(what) = st.bad {
            run.log(&json!({
                "step": step, "epoch": self.epoch_f(), "skipped_step": true,
                "skipped_steps": self.s.skipped_steps,
            }))?;
            // Skipping waits out a bad batch; it cannot mend weights that an update already
            // broke (a learning rate far too high), so that is said at once. Checked only
            // on a bad step: a pass over every weight costs too much for every step.
            if !super::step::all_finite(&self.model) {
                // The last good step's update broke them: bad steps apply none.
                let since = match self.s.history.last() {
                    Some(&(at, _)) => format!(
                        " since step {at}'s update (learning rate {:e})",
                        self.learning_rate(at - 1)
                    ),
                    None => String::new(),
                };
                return Err(TrainerError::Diverged(format!(
                    "step {step}: the weights are NaN or infinite{since}, so training stopped; \
                     lower train.learning_rate; last good checkpoint: {}",
                    self.last_checkpoint()
                )));
            }
            if self.bad_streak >= t.max_bad_steps.max(1) {
                return Err(TrainerError::Diverged(format!(
                    "step {step}: the {what} was NaN or infinite for {} consecutive steps, so training stopped (those updates were skipped); last good checkpoint: {}",
                    self.bad_streak,
                    self.last_checkpoint()
                )));
            }
        } else if step == 1 || self.s.first_loss.is_nan() {
            self.s.first_loss = st.loss;
        }
        let finite = st.bad.is_none();
        if finite {
            self.s.history.push((step, st.loss));
            super::log_window::add(&mut self.s.log_window, st.loss, &st.metrics);
        }
        let step_tps = st.tokens as f64 / st.seconds.max(1e-9);
        if finite && (step.is_multiple_of(t.logging_steps.max(1)) || step == self.total) {
            let (loss, metrics) = super::log_window::take(&mut self.s.log_window, &st.metrics);
            let mut line = json!({
                "loss": loss, "learning_rate": st.lr, "grad_norm": st.grad_norm,
                "num_tokens": self.s.seen_tokens, "epoch": self.epoch_f(), "step": step,
                "step_time": st.seconds, "train_tokens_per_second": step_tps,
            });
            if let Some(mb) = peak_memory_mb() {
                line["peak_memory_mb"] = json!(mb);
            }
            for (name, value, _) in &metrics.0 {
                line[name.as_ref()] = json!(value);
            }
            run.log(&line)?;
        }
        let tps = self.s.seen_tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_position(step as u64);
        // GRPO's loss says little; its mean reward is what a user watches.
        let reward = st
            .metrics
            .get("reward")
            .map_or(String::new(), |r| format!(" reward {r:.3}"));
        let message = format!(
            "loss {:.4}{reward} lr {:.2e} {tps:.0} tok/s {:.2} s/step",
            st.loss, st.lr, st.seconds
        );
        if let Some((every, last)) = &self.lines
            && last.get().elapsed() >= *every
        {
            eprintln!("step {step}/{} {message}", self.total);
            last.set(Instant::now());
        }
        self.bar.set_message(message.clone());
        *self.message.borrow_mut() = message;
        Ok(())
    }

    /// Where an evaluation's progress goes: it runs after the step it follows.
    fn phase(&self) -> Phase<'_> {
        Phase {
            at: self.s.global_step,
            ..Phase::of(&self.bar, &self.lines, &self.message, self.total)
        }
    }

    /// The fractional epoch of the current step, as TRL logs it.
    fn epoch_f(&self) -> f64 {
        let (step, epoch, per) = (self.s.global_step, self.s.epoch, self.steps_per_epoch);
        // Every epoch has `per` steps, but a run resumed from an older hearth's state may
        // count otherwise: never below the epoch's own start.
        epoch as f64 + step.saturating_sub(epoch * per) as f64 / per as f64
    }

    fn last_checkpoint(&self) -> String {
        self.p
            .run
            .latest_checkpoint(self.p.required)
            .map_or("none".to_string(), |(_, d)| d.display().to_string())
    }

    /// A stop signal that came during an evaluation stops the run at this step's
    /// checkpoint, not after one more step (which may outlast a scheduler's grace period);
    /// every rank learns of it, so all stop together.
    fn take_late_signal(&mut self) -> Result<()> {
        let local = crate::signals::take().map_or(-1.0, f64::from);
        let all = self
            .p
            .dp
            .gather(&[local], "a stop signal during evaluation")?;
        let late = all
            .iter()
            .filter_map(|v| v.first())
            .find(|&&v| v >= 0.0)
            .map(|&v| v as i32);
        self.pending_signal = self.pending_signal.or(late);
        Ok(())
    }

    /// Writes a checkpoint when one is due or a stop signal came; after a signal the run
    /// stops there. `position` is the data position after this step.
    fn maybe_checkpoint(
        &mut self,
        position: (usize, usize, usize),
        reuse_next: bool,
    ) -> Result<()> {
        let t = &self.p.recipe.train;
        let step = self.s.global_step;
        let signal = self.pending_signal.take().filter(|_| step < self.total);
        let due = t.save_steps > 0 && step.is_multiple_of(t.save_steps) && step < self.total;
        if !due && signal.is_none() {
            return Ok(());
        }
        // Samples for the iterations still to come are saved only in one process: they are
        // each rank's own, and rank 0 writes alone. A data-parallel run resumed between
        // iterations samples again.
        let pending = if reuse_next && self.p.dp.world_size() == 1 {
            self.p.objective.pending_state()
        } else {
            None
        };
        let dir = self.write_checkpoint(position, pending)?;
        if let Some(signal) = signal {
            // No rank exits before rank 0 has written the checkpoint (a launcher tears the
            // job down when the first one does).
            self.p
                .dp
                .agree(true, "writing the checkpoint before stopping")?;
            self.bar.finish_and_clear();
            return Err(TrainerError::Interrupted {
                signal,
                step,
                checkpoint: dir,
                then: "continue with --resume".into(),
            });
        }
        Ok(())
    }

    /// Writes `checkpoint-STEP` of the weights, the optimizer and the trainer state, whose
    /// data position is `position` (epoch, micro-batch, iteration).
    fn write_checkpoint(
        &self,
        (epoch, next_micro, next_iteration): (usize, usize, usize),
        pending: Option<String>,
    ) -> Result<std::path::PathBuf> {
        let snapshot = TrainerState {
            epoch,
            next_micro,
            next_iteration,
            ..self.s.clone()
        };
        let step = self.s.global_step;
        let limit = self.p.recipe.train.save_total_limit;
        let (setup, model, optim) = (self.p.setup, &self.model, &self.optim);
        let dir = self
            .p
            .run
            .checkpoint(step, limit, |dir| {
                state::save(dir, setup, (model, optim), &snapshot, pending, false)
            })
            .map_err(|e| {
                // Disk full, read-only output…: stop, and say what is still usable.
                TrainerError::Input(format!(
                    "writing checkpoint-{step} failed, training stopped: {e}; the last complete checkpoint is {}",
                    self.last_checkpoint()
                ))
            })?;
        self.p.run.plot(&self.s.history, &self.s.eval_history)?;
        Ok(dir)
    }

    /// A step that failed (a reward or client program that crashed or timed out, say)
    /// left the weights as the steps before it made them: those steps are kept in a
    /// checkpoint, so `--resume` goes on from the failed step, not from the last
    /// `save_steps`. `position` is the failed step's. Only a single process at the start
    /// of a group of iterations: there a checkpoint is exactly the one a due save would
    /// have written; other ranks of a failed data-parallel step are not there to agree.
    fn keep_progress(&mut self, e: TrainerError, position: (usize, usize, usize)) -> TrainerError {
        let step = self.s.global_step;
        let worth_it = !matches!(e, TrainerError::Interrupted { .. } | TrainerError::Dist(_))
            && self.p.dp.world_size() == 1
            && position.2 == 0
            && step > 0;
        if !worth_it {
            return e;
        }
        let kept = |dir: &std::path::Path| {
            TrainerError::Input(format!(
                "{e}; the {step} steps before step {} are kept in {}: continue with --resume \
                 once the cause is fixed",
                step + 1,
                dir.display()
            ))
        };
        // A due save may have just written them.
        if let Some((_, dir)) = self
            .p
            .run
            .latest_checkpoint(self.p.required)
            .filter(|(saved, _)| *saved == step)
        {
            return kept(&dir);
        }
        self.bar.finish_and_clear();
        match self.write_checkpoint(position, None) {
            Ok(dir) => kept(&dir),
            Err(saving) => TrainerError::Input(format!("{e}; {saving}")),
        }
    }

    /// Evaluates the current weights on the plain device and logs the result.
    fn eval(&self) -> Result<Option<(f64, Metrics)>> {
        let valid = self.model.valid();
        let input = LossInput {
            model: &valid,
            examples: &self.p.sets.eval,
            reference: self.p.setup.reference.as_ref(),
            pad: self.p.pad,
            device: &self.p.inner,
        };
        let got = evaluate(
            self.p.dp,
            self.p.objective.as_ref(),
            &input,
            &self.eval_batches,
            &|what, done, planned| self.phase().report(what, done, planned),
        )?;
        if let Some((loss, m, tokens)) = &got {
            log_eval(
                self.p.run,
                self.p.objective.as_ref(),
                (*loss, m, *tokens),
                self.s.global_step,
                self.epoch_f(),
            )?;
        }
        Ok(got.map(|(l, m, _)| (l, m)))
    }

    /// The final evaluation, the final weights and the run's closing line.
    fn finish(mut self) -> Result<Outcome> {
        self.bar.finish_and_clear();
        let step = self.s.global_step;
        // Every step skipped: the weights are the initial ones, and a "trained" run with
        // its final/ would say otherwise.
        if self.s.history.is_empty() {
            return Err(TrainerError::Diverged(format!(
                "none of the run's {step} steps updated the weights: each had a NaN or \
                 infinite loss or gradient (the skipped_step lines in metrics.jsonl), so no \
                 final weights were written"
            )));
        }
        // What only the end shows (a program's line past its last answer) is said, not made
        // a failure: every step has trained, and with no checkpoint at this step a failed
        // run could only be trained again to the same end.
        if let Err(e) = self.p.objective.finish()
            && self.p.dp.is_main()
        {
            eprintln!("warning: {e}");
        }
        let last_eval = self.eval()?;
        if let Some((loss, _)) = &last_eval {
            // Skipped last steps and an evaluation that cannot be computed: the weights
            // themselves are broken (finite but huge after too large an update), not a batch.
            if self.bad_streak > 0 && !loss.is_finite() {
                return Err(TrainerError::Diverged(format!(
                    "the run's last {} steps were skipped for a NaN or infinite loss, and the \
                     final weights' eval_loss is {loss} too: they diverged, so they were not \
                     written; lower train.learning_rate; last good checkpoint: {}",
                    self.bad_streak,
                    self.last_checkpoint()
                )));
            }
            self.s.eval_history.push((step, *loss));
        }
        if self.bad_streak > 0 && self.p.dp.is_main() {
            eprintln!(
                "warning: the last {} of the run's steps were skipped for a NaN or infinite \
                 loss or gradient; the final weights are those after step {}",
                self.bad_streak,
                step - self.bad_streak
            );
        }
        let done = TrainerState {
            next_micro: 0,
            next_iteration: 0,
            ..self.s.clone()
        };
        let (setup, model, optim) = (self.p.setup, &self.model, &self.optim);
        let run = self.p.run;
        // The closing line and the plot come before final/: a run is finished once final/
        // exists, and a kill between the two would leave its record short for good. A
        // resume that finds no final/ drops this line again with the steps past its
        // checkpoint.
        let sets = self.p.sets;
        run.log(&json!({
            "truncated": sets.counts.truncated, "dropped": sets.counts.dropped,
            "skipped_rows": sets.skipped_rows, "skipped_steps": self.s.skipped_steps,
            "train_runtime": self.started.elapsed().as_secs_f64(), "step": step,
        }))?;
        run.plot(&self.s.history, &self.s.eval_history)?;
        run.finish(|dir| state::save(dir, setup, (model, optim), &done, None, true))?;
        self.p.dp.agree(true, "writing the final weights")?;
        if sets.skipped_rows > 0 {
            eprintln!("skipped {} bad rows (skip_bad_rows)", sets.skipped_rows);
        }
        Ok(Outcome {
            steps: step,
            first_loss: self.s.first_loss,
            last_loss: self.s.history.last().map_or(f64::NAN, |h| h.1),
            eval_loss: last_eval.as_ref().map(|e| e.0),
            eval_metrics: last_eval.map(|e| e.1).unwrap_or_default(),
            reports: self.p.dp.is_main(),
        })
    }
}
