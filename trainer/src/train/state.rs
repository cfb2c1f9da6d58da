//! What a checkpoint holds besides the model's own files: the trainer state, the
//! optimizer state (in a stable byte order), and GRPO's samples between iterations; and
//! the resume that reads them back.

use std::path::Path;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use checkpoints::WeightDtype;
use checkpoints::run_dir::{OPTIMIZER_FILE, ROLLOUTS_FILE};

use super::setup::{Setup, Tuning};
use super::step::all_finite;
use crate::model::adapter::{merge_lora, save_adapter};
use crate::model::{Llama, copy_companions, save_model};
use crate::objectives::Objective;
use crate::{Result, TrainerError};

pub(super) use checkpoints::run_dir::required_files;
pub(super) use checkpoints::run_state::TrainerState;

/// Reads a checkpoint's trainer state and optimizer record into `optim`, and hands the
/// objective what it saved (only in a single process: the samples are each rank's own).
pub(super) fn resume(
    dir: &Path,
    optim: ModuleOptimizer,
    objective: &mut dyn Objective,
    world: usize,
) -> Result<(TrainerState, ModuleOptimizer)> {
    let io =
        |p: &Path, e: &dyn std::fmt::Display| TrainerError::Input(format!("{}: {e}", p.display()));
    let state = TrainerState::read(dir)?;
    let path = dir.join(OPTIMIZER_FILE);
    let record = burn::optim::OptimizerRecord::load(&path)
        .map_err(|e| TrainerError::Input(format!("{}: {e:?}", path.display())))?;
    let optim = optim.load_record(record);
    let saved = dir.join(ROLLOUTS_FILE);
    if saved.exists() && world == 1 {
        let text = std::fs::read_to_string(&saved).map_err(|e| io(&saved, &e))?;
        objective.restore_state(&text)?;
    }
    Ok((state, optim))
}

/// A resume must keep the global batch: the sequences per optimizer step over all
/// processes (`saved`, 0 when the checkpoint predates the record) against this start's.
/// Another accumulation on another number of processes keeps it; on the same number it
/// does not, and the learning-rate schedule and the data position would both be off.
pub(super) fn check_global_batch(
    saved: usize,
    now: usize,
    t: &crate::recipe::TrainSection,
    world: usize,
) -> Result<()> {
    if saved == 0 || saved == now {
        return Ok(());
    }
    let processes = |n: usize| format!("{n} process{}", if n == 1 { "" } else { "es" });
    let per_accumulation = t.per_device_train_batch_size * world;
    let hint = if saved.is_multiple_of(per_accumulation) {
        format!(
            "; on {} that is train.gradient_accumulation_steps = {}",
            processes(world),
            saved / per_accumulation
        )
    } else {
        String::new()
    };
    Err(TrainerError::Input(format!(
        "--resume: the run took {saved} sequences per optimizer step over all its processes, \
         and this start would take {now} (per_device_train_batch_size {} × \
         gradient_accumulation_steps {} × {}); resume with the same global batch{hint}",
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        processes(world),
    )))
}

/// The hash of each checkpoint `recipe` reads, by the key naming it
/// ([`Recipe::checkpoints`](crate::recipe::Recipe::checkpoints)).
pub(super) fn model_hashes(
    recipe: &crate::recipe::Recipe,
) -> Result<std::collections::BTreeMap<String, u64>> {
    recipe
        .checkpoints()
        .into_iter()
        .map(|(key, path)| {
            let mut h = crate::fnv::Fnv::new();
            h.checkpoint(path)
                .map_err(|e| TrainerError::Input(format!("{key}: {e}")))?;
            Ok((key, h.0))
        })
        .collect()
}

/// Refuses a resume whose checkpoints are not the files the run started from (`saved`,
/// empty when the checkpoint predates the record): training on would fit the saved
/// weights and optimizer to another model, without a word.
pub(super) fn check_models(
    saved: &std::collections::BTreeMap<String, u64>,
    now: &std::collections::BTreeMap<String, u64>,
    recipe: &crate::recipe::Recipe,
) -> Result<()> {
    let changed = recipe
        .checkpoints()
        .into_iter()
        .find(|(key, _)| matches!((saved.get(key), now.get(key)), (Some(a), Some(b)) if a != b));
    match changed {
        None => Ok(()),
        Some((key, path)) => Err(TrainerError::Input(format!(
            "--resume: {key} {}: its files changed since the run started (other weights or \
             config); resume with the checkpoint the run started from, or start a new run",
            path.display()
        ))),
    }
}

/// Writes a checkpoint's contents into `dir`: weights, the objective's pending state,
/// optimizer and trainer state. Weights holding NaN or ∞ are never written.
pub(super) fn save(
    dir: &Path,
    setup: &Setup,
    (model, optim): (&Llama, &ModuleOptimizer),
    state: &TrainerState,
    pending: Option<String>,
    last: bool,
) -> Result<()> {
    if !all_finite(model) {
        return Err(TrainerError::Diverged(format!(
            "{}: refusing to write weights holding NaN or infinite values",
            dir.display()
        )));
    }
    save_weights(dir, setup, model, last)?;
    if let Some(text) = pending {
        checkpoints::write_text(&dir.join(ROLLOUTS_FILE), &text)?;
    }
    save_optimizer(optim, &dir.join(OPTIMIZER_FILE))?;
    Ok(state.write(dir)?)
}

/// Writes the trained weights into `dir`: the adapter (LoRA) or a full checkpoint. The
/// final save of a full run uses the base's dtype; a LoRA reward model is also merged into a
/// `*ForSequenceClassification` checkpoint, with its adapter under `adapter/`.
pub(super) fn save_weights(dir: &Path, s: &Setup, model: &Llama, last: bool) -> Result<()> {
    let base_name = s.base.display().to_string();
    let base = s.base.as_path();
    match &s.tuning {
        Tuning::Lora(settings) if last && model.score.is_some() => {
            save_adapter(&dir.join("adapter"), model, settings, &base_name)?;
            carry_template(&dir.join("adapter"), s)?;
            let merged = merge_lora(model.valid());
            save_model(dir, &s.config, &merged, s.config.dtype, Default::default())?;
            copy_companions(base, dir)?;
            carry_template(dir, s)
        }
        Tuning::Lora(settings) => {
            save_adapter(dir, model, settings, &base_name)?;
            carry_template(dir, s)
        }
        Tuning::Full => {
            let dtype = if last {
                s.config.dtype
            } else {
                WeightDtype::F32
            };
            save_model(dir, &s.config, model, dtype, Default::default())?;
            copy_companions(base, dir)?;
            carry_template(dir, s)
        }
    }
}

/// Writes the recipe's built-in template as `dir`'s `chat_template.jinja`: in a checkpoint
/// it overrides the one copied from the base (as in transformers), beside an adapter it is
/// the adapter's own (`template_for_tuned`). What the weights were trained on is what
/// `generate`, `reward score` and the evals then render with, not the base's template.
fn carry_template(dir: &Path, s: &Setup) -> Result<()> {
    let Some(name) = &s.template else {
        return Ok(());
    };
    let source = data::template::builtin_source(name).ok_or_else(|| {
        crate::TrainerError::Input(format!("data.template: unknown built-in template `{name}`"))
    })?;
    checkpoints::write_text(&dir.join("chat_template.jinja"), source)?;
    Ok(())
}

/// Writes the optimizer state with its tensors sorted by name. burn lists them in hash-map
/// order, so the same state would otherwise be different bytes from run to run, and
/// identical runs could not be checked by their checkpoints' checksums.
pub(super) fn save_optimizer(optim: &ModuleOptimizer, path: &Path) -> Result<()> {
    let bad = |e: &dyn std::fmt::Debug| TrainerError::Input(format!("{}: {e:?}", path.display()));
    let bytes = optim.to_record().into_bytes().map_err(|e| bad(&e))?;
    let reader = burn_pack::Reader::from_bytes(bytes).map_err(|e| bad(&e))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let mut tensors = reader.into_tensors().map_err(|e| bad(&e))?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut writer = burn_pack::Writer::new(tensors);
    for (k, v) in &scalars {
        writer = writer.with_scalar(k, *v);
    }
    for (k, v) in &metadata {
        writer = writer.with_metadata(k, v);
    }
    let bytes = writer.into_bytes().map_err(|e| bad(&e))?;
    // The OS's own words ("No space left on device"), not the Debug form of the error.
    std::fs::write(path, &bytes[..])
        .map_err(|e| TrainerError::Input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::check_global_batch;

    #[test]
    fn a_resume_keeps_the_global_batch() {
        let t = |batch: usize, accumulation: usize| crate::recipe::TrainSection {
            per_device_train_batch_size: batch,
            gradient_accumulation_steps: accumulation,
            ..Default::default()
        };
        // Two processes of 4 × 2, resumed on one with 4 × 4: the same 16 sequences.
        check_global_batch(16, 16, &t(4, 4), 1).unwrap();
        // A checkpoint from before the record cannot be checked.
        check_global_batch(0, 32, &t(4, 8), 1).unwrap();
        let err = check_global_batch(16, 32, &t(4, 8), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("took 16 sequences per optimizer step")
                && err.contains("would take 32 (per_device_train_batch_size 4 × gradient_accumulation_steps 8 × 1 process)")
                && err.contains("on 1 process that is train.gradient_accumulation_steps = 4"),
            "{err}"
        );
        // No whole accumulation gets back to 12 sequences on two processes of 4.
        let err = check_global_batch(12, 16, &t(4, 2), 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 processes") && !err.contains("that is"),
            "{err}"
        );
    }
}
