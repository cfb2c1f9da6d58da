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
}
