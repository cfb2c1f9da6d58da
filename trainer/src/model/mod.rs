//! The Llama-family decoder (Llama 2/3/3.x, Qwen2, Mistral), configured from a Hugging Face
//! `config.json` and loaded from its safetensors by their HF names.

pub mod adapter;
mod attention;
mod checkpoint;
mod gguf;
mod ids;
mod init;
pub mod linear;
mod llama;
mod lora;
pub(crate) mod mask;
mod mlp;
mod norm;
pub mod precision;
pub mod quantized;
mod rope;
mod score;
mod specs;

pub use adapter::load_tuned;
pub use attention::LayerCache;
pub use checkpoint::{
    convert, copy_companions, export_weights, init_random_weights, load_model, load_model_with,
    load_tokenizer, save_model, weights_f32,
};
pub use gguf::export_to_gguf;
pub use ids::with_path_ids;
pub use init::{NewModel, init_model};
pub use llama::{KvCache, Llama, with_precision};
pub use mask::attention_mask;
pub use rope::inverse_frequencies;
pub use score::{one_label, refuse_reward_model, reward_head, with_score_head};
pub use specs::{TensorSpec, tensor_specs};
