use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use checkpoints::ModelConfig;

use super::attention::{Attention, LayerCache};
use super::linear::{Linear, Weight};
use super::lora::Lora;
use super::mask::attention_mask;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::precision::{Precision, f32, to};
use super::quantized::{QuantWeight, Quantization};
use super::rope::{cos_sin, inverse_frequencies};
use crate::{Result, TrainerError};

/// What generation carries between steps: each layer's keys and values, and which key
/// slots are padding (`[B, S]`, true for padding).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub key_padding: Tensor<2, Bool>,
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    pub sliding_window: Option<usize>,
}

impl DecoderLayer {
    fn forward_cached(
        &self,
        x: Tensor<3>,
        cos: &Tensor<3>,
        sin: &Tensor<3>,
        masked: Tensor<4, Bool>,
        cache: Option<LayerCache>,
    ) -> (Tensor<3>, LayerCache) {
        let (attn, cache) = self.self_attn.forward_cached(
            self.input_layernorm.forward(x.clone()),
            cos.clone(),
            sin.clone(),
            masked,
            cache,
        );
        let x = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        (x + mlp, cache)
    }

    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<3>,
        sin: &Tensor<3>,
        masked: Tensor<4, Bool>,
    ) -> Tensor<3> {
        let attn = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            cos.clone(),
            sin.clone(),
            masked,
        );
        let x = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + mlp
    }
}

/// The decoder. It stops at the final norm's hidden states: whoever needs token scores
/// applies [`Llama::head`] through `kernels`, so no caller holds `[tokens × vocab]`
/// logits it does not need.
#[derive(Module, Debug)]
pub struct Llama {
    /// `[vocab, hidden]`; quantized under `model.quantize_embeddings`.
    pub embed_tokens: Weight,
    /// An adapter on the embeddings (PEFT's `lora_embedding_A` / `_B`).
    pub embed_lora: Option<Lora>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// The `[labels, hidden]` head of a sequence-classification (reward) model, read at the
    /// last real token; such a model has no `lm_head` of its own.
    pub score: Option<Linear>,
    #[module(skip)]
    inv_freq: Vec<f32>,
    /// What the activations compute in (see [`super::precision`]).
    #[module(skip)]
    pub precision: Precision,
}

impl Llama {
    /// Builds the model from converted tensors keyed by their Hugging Face names; every
    /// name in [`super::tensor_specs`] must be present.
    pub(crate) fn from_tensors(
        config: &ModelConfig,
        mut tensors: HashMap<String, TensorData>,
        device: &Device,
        quant: &Quantization,
    ) -> Result<Self> {
        let mut take = |name: &str| -> Result<TensorData> {
            tensors
                .remove(name)
                .ok_or_else(|| TrainerError::Input(format!("tensor `{name}` was not loaded")))
        };
        let embed_tokens = weight(&mut take, "model.embed_tokens", device, quant)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut take, &format!("{p}.input_layernorm"), config, device)?,
                self_attn: Attention {
                    q_proj: proj(
                        &mut take,
                        &format!("{p}.self_attn.q_proj"),
                        config.qkv_bias,
                        device,
                        quant,
                    )?,
                    k_proj: proj(
                        &mut take,
                        &format!("{p}.self_attn.k_proj"),
                        config.qkv_bias,
                        device,
                        quant,
                    )?,
                    v_proj: proj(
                        &mut take,
                        &format!("{p}.self_attn.v_proj"),
                        config.qkv_bias,
                        device,
                        quant,
                    )?,
                    o_proj: proj(
                        &mut take,
                        &format!("{p}.self_attn.o_proj"),
                        config.o_bias,
                        device,
                        quant,
                    )?,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                post_attention_layernorm: norm(
                    &mut take,
                    &format!("{p}.post_attention_layernorm"),
                    config,
                    device,
                )?,
                mlp: Mlp {
                    gate_proj: proj(
                        &mut take,
                        &format!("{p}.mlp.gate_proj"),
                        config.mlp_bias,
                        device,
                        quant,
                    )?,
                    up_proj: proj(
                        &mut take,
                        &format!("{p}.mlp.up_proj"),
                        config.mlp_bias,
                        device,
                        quant,
                    )?,
                    down_proj: proj(
                        &mut take,
                        &format!("{p}.mlp.down_proj"),
                        config.mlp_bias,
                        device,
                        quant,
                    )?,
                },
                sliding_window: config.sliding_windows.get(i).copied().flatten(),
            });
        }
        let norm = norm(&mut take, "model.norm", config, device)?;
        let (lm_head, score) = match config.score_labels {
            Some(_) => (None, Some(proj(&mut take, "score", false, device, quant)?)),
            None if config.tie_word_embeddings => (None, None),
            None => (
                Some(proj(&mut take, "lm_head", false, device, quant)?),
                None,
            ),
        };
        Ok(Self {
            embed_tokens,
            embed_lora: None,
            layers,
            norm,
            lm_head,
            score,
            inv_freq: inverse_frequencies(config),
            precision: Default::default(),
        })
    }

    /// Final hidden states of a right-padded batch. `ids`, `padding`: `[B, T]`, padding 0
    /// where a position is padding. Returns `[B, T, hidden]`.
    pub fn hidden(&self, ids: Tensor<2, Int>, padding: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = ids.dims();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &ids.device())
            .reshape([1, t])
            .expand([b, t]);
        self.hidden_packed(ids, positions, padding)
    }

    /// Final hidden states of rows that may hold several examples each (packing).
    /// `positions`: `[B, T]`, restarting at 0 in each example; `segments`: `[B, T]`, the
    /// example each token belongs to (from 1; 0 for padding). No token attends to another
    /// example's tokens. Returns `[B, T, hidden]`.
    pub fn hidden_packed(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Tensor<2, Int>,
    ) -> Tensor<3> {
        let [_, t] = ids.dims();
        let (cos, sin) = cos_sin(&self.inv_freq, positions);
        let full = attention_mask(segments.clone(), None);
        let mut windowed: Vec<(usize, Tensor<4, Bool>)> = Vec::new();
        let mut x = self.embed(ids);
        for layer in &self.layers {
            let masked = match layer.sliding_window {
                Some(w) if w < t => {
                    if let Some((_, m)) = windowed.iter().find(|(ww, _)| *ww == w) {
                        m.clone()
                    } else {
                        let m = attention_mask(segments.clone(), Some(w));
                        windowed.push((w, m.clone()));
                        m
                    }
                }
                _ => full.clone(),
            };
            x = layer.forward(x, &cos, &sin, masked);
        }
        f32(self.norm.forward(x))
    }

    /// Final hidden states of `ids` (`[B, n]`) continuing the sequences held in `cache`
    /// (`None` at the start). `positions`: `[B, n]` rotary positions of the new tokens;
    /// `padding`: `[B, n]`, true for slots that are padding (a left-padded prompt), which no
    /// later query may see. Queries see earlier slots only, so left padding keeps every
    /// row's real tokens contiguous and its distances (for sliding windows) true.
    /// Returns the hidden states `[B, n, hidden]` and the extended cache.
    pub fn hidden_cached(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        padding: Tensor<2, Bool>,
        cache: Option<KvCache>,
    ) -> (Tensor<3>, KvCache) {
        let [b, n] = ids.dims();
        let device = ids.device();
        let (layers, key_padding) = match cache {
            Some(c) => (c.layers, Tensor::cat(vec![c.key_padding, padding], 1)),
            None => (Vec::new(), padding),
        };
        let start = key_padding.dims()[1] - n;
        let total = start + n;
        let (cos, sin) = cos_sin(&self.inv_freq, positions);
        let query = Tensor::<1, Int>::arange(start as i64..total as i64, &device).reshape([n, 1]);
        let key = Tensor::<1, Int>::arange(0..total as i64, &device).reshape([1, total]);
        let distance = query.expand([n, total]) - key.expand([n, total]);
        let pad_keys = key_padding
            .clone()
            .reshape([b, 1, 1, total])
            .expand([b, 1, n, total]);
        let mut x = self.embed(ids);
        let mut caches = layers.into_iter();
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut masked = distance.clone().lower_elem(0);
            if let Some(w) = layer.sliding_window {
                masked = masked.bool_or(distance.clone().greater_equal_elem(w as i64));
            }
            let masked = masked
                .reshape([1, 1, n, total])
                .expand([b, 1, n, total])
                .bool_or(pad_keys.clone());
            let (y, c) = layer.forward_cached(x, &cos, &sin, masked, caches.next());
            x = y;
            out.push(c);
        }
        (
            f32(self.norm.forward(x)),
            KvCache {
                layers: out,
                key_padding,
            },
        )
    }

    /// Token embeddings `[B, T, hidden]`, with the embedding adapter's delta when one is on.
    /// They start the activations off in the model's compute dtype.
    fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let base = match &self.embed_tokens {
            Weight::Dense(w) => f32(embedding(w.val(), ids.clone())),
            Weight::Quantized(q) => {
                let [b, t] = ids.dims();
                let rows = q.matrix().rows(ids.clone().reshape([b * t]));
                let hidden = rows.dims()[1];
                rows.reshape([b, t, hidden])
            }
        };
        let x = match &self.embed_lora {
            Some(lora) => base + lora.embedding_delta(ids),
            None => base,
        };
        to(x, self.precision.dtype())
    }

    /// The output head for hidden rows `[N, hidden]`: `lm_head` (or the embeddings when
    /// tied), plus its adapter's low-rank term for those rows when `lm_head` has one.
    pub fn head(&self, rows: &Tensor<2>) -> kernels::Head {
        self.head_with(rows, true)
    }

    /// [`Self::head`] without the adapter's dropout, for a metric: it draws nothing from
    /// the random stream, so logging the metric leaves training's dropout masks as they are.
    pub fn metric_head(&self, rows: &Tensor<2>) -> kernels::Head {
        self.head_with(rows, false)
    }

    fn head_with(&self, rows: &Tensor<2>, dropout: bool) -> kernels::Head {
        let weight = |w: &Weight| match w {
            Weight::Dense(w) => kernels::HeadWeight::Dense(w.val()),
            Weight::Quantized(q) => kernels::HeadWeight::Quantized(q.matrix()),
        };
        match &self.lm_head {
            // The head's matmul runs in its stored dtype, a chunk of rows at a time; the
            // logits and the log-softmax over the vocabulary are f32.
            Some(head) => kernels::Head {
                weight: weight(&head.weight),
                low_rank: head.lora.as_ref().map(|l| {
                    let input = if dropout {
                        l.dropout.forward(rows.clone())
                    } else {
                        rows.clone()
                    };
                    let down = linear(input, l.a.val().transpose(), None).mul_scalar(l.scale);
                    (down, l.b.val())
                }),
            },
            None => kernels::Head {
                weight: weight(&self.embed_tokens),
                low_rank: None,
            },
        }
    }

    /// Every attention and MLP projection, layer by layer.
    pub fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            [
                &l.self_attn.q_proj,
                &l.self_attn.k_proj,
                &l.self_attn.v_proj,
                &l.self_attn.o_proj,
                &l.mlp.gate_proj,
                &l.mlp.up_proj,
                &l.mlp.down_proj,
            ]
        })
    }

    /// The float parameters of quantized weights (scales, code tables).
    fn quantized_param_ids(&self) -> Vec<ParamId> {
        self.projections()
            .map(|p| &p.weight)
            .chain(self.lm_head.as_ref().map(|h| &h.weight))
            .chain([&self.embed_tokens])
            .flat_map(|w| match w {
                Weight::Quantized(q) => {
                    let mut ids = vec![q.scales.id, q.code.id];
                    ids.extend(q.offsets.as_ref().map(|o| o.id));
                    ids
                }
                Weight::Dense(_) => Vec::new(),
            })
            .collect()
    }

    /// Full logits `[B, T, vocab]` for the given hidden states. Only for inspection and
    /// parity checks; training reads log-probs through the fused path instead.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, h] = hidden.dims();
        let rows = hidden.reshape([b * t, h]);
        let head = self.head(&rows);
        let logits = head.logits(&rows, 0, b * t);
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }
}

fn proj(
    take: &mut impl FnMut(&str) -> Result<TensorData>,
    prefix: &str,
    bias: bool,
    device: &Device,
    quant: &Quantization,
) -> Result<Linear> {
    let weight = weight(take, prefix, device, quant)?;
    let bias = if bias {
        Some(Param::from_tensor(Tensor::from_data(
            take(&format!("{prefix}.bias"))?,
            device,
        )))
    } else {
        None
    };
    Ok(Linear {
        weight,
        bias,
        lora: None,
    })
}

/// The weight at `prefix`, quantized as `quant` says or dense.
fn weight(
    take: &mut impl FnMut(&str) -> Result<TensorData>,
    prefix: &str,
    device: &Device,
    quant: &Quantization,
) -> Result<Weight> {
    let name = format!("{prefix}.weight");
    let layout = quant.layout_for(prefix)?;
    if layout == Some(super::quantized::Layout::Kept) {
        let (blocks, shape) = quant
            .kept
            .get(&name)
            .ok_or_else(|| TrainerError::Input(format!("{name}: its GGUF blocks were not read")))?;
        return Ok(Weight::Quantized(QuantWeight::from_blocks(
            &name, blocks, *shape, device,
        )?));
    }
    let data = take(&name)?;
    Ok(match layout {
        Some(layout) => {
            let shape: [usize; 2] = [data.shape()[0], data.shape()[1]];
            let values = data
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| TrainerError::Input(format!("{name}: {e:?}")))?;
            Weight::Quantized(QuantWeight::quantize(
                &name, &values, shape, layout, device,
            )?)
        }
        None => Weight::Dense(Param::from_tensor(Tensor::from_data(data, device))),
    })
}

fn norm(
    take: &mut impl FnMut(&str) -> Result<TensorData>,
    prefix: &str,
    config: &ModelConfig,
    device: &Device,
) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: Param::from_tensor(Tensor::from_data(
            take(&format!("{prefix}.weight"))?,
            device,
        )),
        eps: config.rms_norm_eps,
    })
}

/// Stores every frozen weight of `model` in `precision`'s dtype and marks the model to
/// compute in it; trainable weights stay f32 masters.
pub fn with_precision(model: Llama, precision: Precision) -> Llama {
    /// Halves frozen float weights, but a quantized weight's scales and code table, which
    /// stay f32 as bitsandbytes keeps them.
    struct Halve(DType, Vec<ParamId>);
    impl ModuleMapper for Halve {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if param.is_require_grad() || self.1.contains(&param.id) {
                return param;
            }
            let dtype = self.0;
            param.map(|t| to(t, dtype))
        }
    }
    let mut model = if precision == Precision::F32 {
        model
    } else {
        let keep = model.quantized_param_ids();
        model.map(&mut Halve(precision.dtype(), keep))
    };
    model.precision = precision;
    model
}
