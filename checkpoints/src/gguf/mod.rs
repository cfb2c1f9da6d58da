//! GGUF, llama.cpp's file format: the container ([`container`]), ggml's quantized types
//! ([`quant`]), a GGUF model seen as a Hugging Face checkpoint ([`GgufModel`]: config,
//! tensors under transformers' names, tokenizer and chat template), and writing ([`writer`]).
//!
//! A model path may name a `.gguf` file, or a directory holding one ([`locate`]); the
//! readers of config, weights, tokenizer and template all take that path.

pub mod container;
mod export;
mod model;
pub mod quant;
pub mod quantize;
mod tokenizer;
pub mod writer;

pub use container::{GgufFile, MetaValue, TensorInfo};
pub use export::{ExportInput, ExportType, export_gguf};
pub use model::{
    ARCHITECTURES, GgufModel, gguf_name, hf_name, llama3_rope_factors, llama3_rope_factors_with,
    locate, permute_rows, unpermute_rows,
};
pub use quant::{Blocks, GgmlType, blocks, dequantize};
pub use tokenizer::PRE_TOKENIZERS;
pub use writer::{GgufWriter, TensorOut};

#[cfg(test)]
mod tests;
