use std::path::PathBuf;

/// Everything that can go wrong reading or writing a checkpoint. Every variant names the file
/// (and the tensor or key) so a user can find the culprit from one line.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(
        "{path}: model_type `{model_type}` is not supported (supported: llama, qwen2, mistral)"
    )]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: `{key}` = {value} changes the model's math and is not supported{hint}")]
    UnsupportedConfig {
        path: PathBuf,
        key: String,
        value: String,
        hint: String,
    },
    #[error("{path}: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    /// A run directory, or one of its files, that cannot be used as asked.
    #[error("{path}: {reason}")]
    Run { path: PathBuf, reason: String },
    /// A setting no file of this kind can have; the reason names where it came from.
    #[error("{reason}")]
    Invalid { reason: String },
    /// A GGUF file that cannot be read as asked; the reason names the key or tensor.
    #[error("{path}: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error(
        "{dir}: no weights found (expected model.safetensors or model.safetensors.index.json){hint}"
    )]
    NoWeights { dir: PathBuf, hint: String },
    #[error("{index}: names shard `{shard}`, which does not exist")]
    MissingShard { index: PathBuf, shard: String },
    #[error("{index}: maps tensor `{tensor}` to `{shard}`, but that shard does not hold it")]
    IndexMismatch {
        index: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{path}: missing tensor `{tensor}`{}", expected.as_ref().map(|e| format!(" (expected shape {e:?})")).unwrap_or_default())]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        /// The shape the reader wanted, where it asked for one.
        expected: Option<Vec<usize>>,
    },
    #[error("{path}: unexpected tensor `{tensor}` (shape {shape:?}) not used by this model")]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Weights about to be written hold NaN or ±∞: no loader refuses them, and everything
    /// computed from them is NaN, so nothing is written.
    #[error("{path}: refusing to write weights holding NaN or infinite values (tensor `{tensor}`)")]
    NonFinite { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
