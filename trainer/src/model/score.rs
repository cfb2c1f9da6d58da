//! The scalar `score` head that turns the decoder into a reward model, as transformers'
//! `*ForSequenceClassification` has it: `[1, hidden]`, no bias, no `lm_head`.

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};

use super::ids::with_path_ids;
use super::linear::{Linear, Weight};
use super::llama::Llama;

/// transformers' `initializer_range` default, the std of a fresh head.
const INIT_STD: f64 = 0.02;

/// Gives `model` a fresh score head (drawn from the device's seeded generator) unless it
/// already has one, and drops the language-model head.
pub fn with_score_head(mut model: Llama, device: &Device) -> Llama {
    if model.score.is_none() {
        let hidden = model.embed_tokens.dims()[1];
        model.score = Some(Linear {
            weight: Weight::Dense(Param::from_tensor(Tensor::random(
                [1, hidden],
                Distribution::Normal(0.0, INIT_STD),
                device,
            ))),
            bias: None,
            lora: None,
        });
    }
    model.lm_head = None;
    with_path_ids(model)
}
