use std::path::PathBuf;

/// Errors of the data crate, each naming the file (and line or row) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: invalid JSON: {reason}")]
    Json {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: not a valid tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("training a tokenizer failed: {0}")]
    Training(String),
    #[error("{origin}: {reason}")]
    Template { origin: String, reason: String },
    #[error("{0}")]
    Conversation(String),
    #[error("{path}: {location}{}: {reason}", column.as_ref().map(|c| format!(", column `{c}`")).unwrap_or_default())]
    Row {
        path: PathBuf,
        location: crate::read::Location,
        column: Option<String>,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// A GGUF model's tokenizer or template that cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] checkpoints::CheckpointError),
}
