//! hearth's data pipeline: tokenizers, chat templates and assistant masks today; readers,
//! formats, packing and batching as they land.

pub mod chat;
mod error;
mod message;
pub mod template;
pub mod tokenizer;

pub use chat::{Rendered, render_with_mask};
pub use error::DataError;
pub use message::Message;
pub use template::{ChatTemplate, SpecialTokens};
