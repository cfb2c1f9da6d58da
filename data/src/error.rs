use std::path::PathBuf;

/// Errors of the data crate, each naming the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("training a tokenizer failed: {0}")]
    Training(String),
}
