//! `trainer_state.json`: where a run stands, saved with every checkpoint so a resumed run
//! continues exactly.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::run_dir::STATE_FILE;
use crate::{CheckpointError, Result};

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    /// The data position: the epoch, the micro-batches of it already consumed (counted
    /// over every rank, so a run can resume with another world size), and how often the
    /// group starting there was already used (GRPO's `num_iterations`).
    pub epoch: usize,
    #[serde(default)]
    pub next_micro: usize,
    #[serde(default)]
    pub next_iteration: usize,
    pub seen_tokens: usize,
    pub first_loss: f64,
    pub history: Vec<(usize, f64)>,
    pub eval_history: Vec<(usize, f64)>,
    /// Steps whose update was skipped for a non-finite loss or gradient.
    #[serde(default)]
    pub skipped_steps: usize,
    /// Sequences (or GRPO completions) one optimizer step takes over all processes, the
    /// global batch, so a resume on another number of processes can be held to it. 0 in a
    /// state saved before it was recorded.
    #[serde(default)]
    pub global_batch: usize,
    /// Rows (sequences, pairs or GRPO prompts) in each of the run's micro-batches, the
    /// unit `next_micro` counts in. GRPO's micro-batch is a rank's prompts of one step, so
    /// it changes with the number of processes; a resume converts the position by it. 0
    /// in a state saved before it was recorded.
    #[serde(default)]
    pub micro_rows: usize,
    /// The steps since the last logged line, kept in checkpoints so that a run resumed
    /// inside a `logging_steps` window logs the same average.
    #[serde(default)]
    pub log_window: LogWindow,
    /// A hash of the training examples as tokenised (`Examples::fingerprint`), which a
    /// resume must find unchanged. 0 in a state saved before it was recorded.
    #[serde(default)]
    pub train_data: u64,
    /// A hash of each checkpoint the run reads (the base, an initial adapter, reward and
    /// client models), by the recipe key naming it, which a resume must find unchanged.
    /// Empty in a state saved before it was recorded.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, u64>,
}

/// The finite steps since the last logged line: their count, their losses summed, and each
/// metric summed with the number of steps it came in.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LogWindow {
    pub steps: usize,
    pub loss: f64,
    pub metrics: Vec<(String, f64, usize)>,
}

impl TrainerState {
    /// A run at its start.
    pub fn fresh() -> Self {
        Self {
            global_step: 0,
            epoch: 0,
            next_micro: 0,
            next_iteration: 0,
            seen_tokens: 0,
            first_loss: f64::NAN,
            history: Vec::new(),
            eval_history: Vec::new(),
            skipped_steps: 0,
            global_batch: 0,
            micro_rows: 0,
            log_window: LogWindow::default(),
            train_data: 0,
            models: Default::default(),
        }
    }

    /// Reads the state a checkpoint in `dir` holds.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::Run {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes it into the checkpoint directory `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string(self).unwrap_or_default();
        crate::write_text(&dir.join(STATE_FILE), &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_old_files_default_what_they_lack() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = TrainerState::fresh();
        state.global_step = 7;
        state.first_loss = 2.5;
        state.history = vec![(1, 2.5), (7, 1.25)];
        state.write(dir.path()).unwrap();
        assert_eq!(TrainerState::read(dir.path()).unwrap(), state);
        // A state written before the data position and skip count were kept.
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"global_step":3,"epoch":1,"seen_tokens":9,"first_loss":1.0,"history":[],"eval_history":[]}"#,
        )
        .unwrap();
        let old = TrainerState::read(dir.path()).unwrap();
        assert_eq!(
            (old.global_step, old.next_micro, old.skipped_steps),
            (3, 0, 0)
        );
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        let err = TrainerState::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE), "{err}");
    }
}
