/// Errors of the trainer crate; lower crates' errors pass through with their context.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Checkpoint(#[from] checkpoints::CheckpointError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("device `{0}` is not available: {1}")]
    Device(String, String),
    #[error("{0}")]
    Input(String),
    /// Training stopped on a signal after writing a checkpoint; exit with 128 + `signal`.
    #[error(
        "stopped by {} after step {step}; checkpoint written to {}; {then}",
        crate::signals::name(*signal),
        checkpoint.display()
    )]
    Interrupted {
        signal: i32,
        step: usize,
        checkpoint: std::path::PathBuf,
        /// How to go on: `--resume` for a run, the same command for a pipeline's stage.
        then: String,
    },
    /// The data-parallel process group could not be set up or failed.
    #[error("data parallel: {0}")]
    Dist(#[from] crate::dist::DistError),
    /// Too many consecutive steps with a non-finite loss or gradient.
    #[error("{0}")]
    Diverged(String),
}
