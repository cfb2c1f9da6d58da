//! The training loop, shared by every method: batching, gradient accumulation, global-norm
//! clipping, the learning-rate schedule, evaluation, metrics, checkpoints. Objectives
//! ([`crate::objectives::Objective`]) only say what a step's losses are.
//!
//! - [`setup`]: the run directory, the device, the model with its adapters and reference;
//! - [`data`]: from the recipe's files to tokenised examples;
//! - [`looping`]: the loop over epochs and steps, logging and checkpoints;
//! - [`step`]: shares, clipping, the guards and seeds of one step;
//! - [`state`]: what a checkpoint holds, and resume; [`schedule`]; [`eval`].

pub mod data;
mod eval;
mod log_window;
mod looping;
pub mod schedule;
pub mod setup;
mod state;
pub mod step;

use std::path::Path;

use checkpoints::ModelConfig;

pub use schedule::lr_factor;
pub use setup::{Setup, Tuning, dist_options, setup};
pub use step::clip_global_norm;

use crate::Result;
use crate::dist::Group;
use crate::model::precision::Precision;
use crate::objectives::{Metrics, Prepare, registry};
use crate::recipe::Recipe;

/// The `metrics.jsonl` keys that hold wall-clock times and the process's peak memory:
/// everything else a run logs is reproduced exactly by a rerun or a resume.
pub const TIMING_KEYS: [&str; 5] = [
    "train_runtime",
    "step_time",
    "train_tokens_per_second",
    "session/tokens_per_second",
    "peak_memory_mb",
];

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    /// The final evaluation's metrics (TRL names, without the `eval_` prefix).
    pub eval_metrics: Metrics,
    /// Whether this process is the data-parallel group's first (or the only one): the
    /// one that reports, as it is the one that writes.
    pub reports: bool,
}

/// Runs the recipe, writing everything into `out`; with `resume`, continues the run in
/// `out` from its newest complete checkpoint.
pub fn train(recipe: &Recipe, out: &Path, resume: bool, progress: bool) -> Result<Outcome> {
    let t = &recipe.train;
    let mut objective = registry::for_recipe(recipe)?;
    let dp = Group::from_env(&dist_options(recipe))?;
    let run = setup::open_run(&dp, recipe, out, resume)?;
    let required = state::required_files(recipe.lora.is_some());
    let _signals = crate::signals::hand_to_training();
    let resume_from = if resume {
        let point = run.resume_point(&required)?;
        if point.is_none() && dp.is_main() {
            eprintln!(
                "warning: {}: no checkpoint to resume from (none was due yet: \
                 train.save_steps); starting the run over",
                out.display()
            );
        }
        point
    } else {
        None
    };
    let device = setup::device(recipe, &dp)?;
    let base = &recipe.model.path;
    let base_config = ModelConfig::from_path(base)?;
    let pad = base_config.padding_id();
    let resume_dir = resume_from.as_ref().map(|(_, d)| d.as_path());
    let setup = setup(recipe, objective.as_ref(), &device, resume_dir, pad)?;
    let mut sets = data::prepare_data(recipe, objective.as_ref(), base_config.vocab_size)?;
    // Said once everything that can refuse the run has had its say (the objective's own
    // checks come in `prepare` and `Loop::new`), so a refused run prints only its error.
    let mut warnings = data::warnings(
        recipe,
        objective.as_ref(),
        &sets,
        base_config.max_position_embeddings,
    );
    warnings.extend(setup::adapter_warnings(recipe, &setup));
    let inner = device.clone().inner();
    objective.prepare(Prepare {
        base,
        config: &base_config,
        reference: setup.reference.as_ref(),
        train: &mut sets.train,
        eval: &mut sets.eval,
        train_file: &recipe.data.train,
        lora_init: recipe.lora.as_ref().and_then(|l| l.init_from.as_deref()),
        precision: Precision::from_flags(t.bf16, t.fp16),
        batch_size: t.per_device_train_batch_size,
        pad,
        device: &inner,
    })?;
    let mut state = state::TrainerState::fresh();
    let mut optim = setup::optimizer(t, &setup.model);
    if let Some((_, dir)) = &resume_from {
        (state, optim) = state::resume(dir, optim, objective.as_mut(), dp.world_size())?;
    }
    let parts = looping::Parts {
        recipe,
        objective,
        dp: &dp,
        run: &run,
        required: &required,
        device,
        inner,
        setup: &setup,
        sets: &sets,
        pad,
    };
    let training = looping::Loop::new(parts, state, optim, progress)?;
    warnings.extend(training.warnings());
    // Only once the resume is known to go ahead: the lines past its checkpoint are redone.
    if let Some((step, _)) = &resume_from {
        run.truncate_metrics(*step)?;
    }
    if dp.is_main() {
        for warning in warnings {
            eprintln!("warning: {warning}");
        }
    }
    let outcome = training.run();
    // The page is written for a run that stopped too (diverged, interrupted, failed), once
    // it logged a step: what it logged is what someone will want to look at. (One that
    // logged nothing is a directory a rerun may take, which a page would block.) A page
    // that cannot be written then does not hide why the run stopped.
    if dp.is_main() {
        match &outcome {
            Ok(_) => {
                crate::report::write_run_page(out)?;
            }
            Err(_) if out.join(checkpoints::run_dir::METRICS_FILE).is_file() => {
                let _ = crate::report::write_run_page(out);
            }
            Err(_) => {}
        }
    }
    outcome
}
