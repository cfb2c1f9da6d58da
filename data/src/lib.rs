//! hearth's data pipeline: tokenizers, chat templates and assistant masks today; readers,
//! formats, packing and batching as they land.

pub mod batch;
pub mod chat;
pub mod choice_items;
mod columnar;
pub mod config;
pub mod dataset;
mod error;
pub mod format;
pub mod inspect;
mod message;
pub mod output;
pub mod read;
pub mod render;
pub mod strict_json;
pub mod synth;
pub mod template;
mod template_guards;
pub mod tokenize;
pub mod tokenizer;

pub use chat::{Rendered, render_with_mask, render_with_mask_from};
pub use dataset::{
    LoadOptions, Loaded, load_bundled_examples, load_examples, load_examples_in_order,
};
pub use error::DataError;
pub use format::{Example, Format};
pub use message::Message;
pub use template::{ChatTemplate, SpecialTokens};
