//! hearth's data pipeline: tokenizers today; readers, formats, chat templates, loss masks
//! and batching as they land.

mod error;
pub mod tokenizer;

pub use error::DataError;
