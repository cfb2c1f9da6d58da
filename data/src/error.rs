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
    #[error("{path}: line {line}, column {column}: invalid JSON: {reason}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
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

impl DataError {
    /// A whole JSON document at `path` that did not parse, positioned once, in the file.
    pub(crate) fn json(path: &std::path::Path, e: &serde_json::Error) -> Self {
        DataError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            reason: json_message(e),
        }
    }
}

/// serde_json's message without its trailing "at line L column C": hearth's errors say
/// where once, in the file's own terms (a JSON Lines row is one line of the file).
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&position) {
        Some(message) => message.to_string(),
        None => full,
    }
}
