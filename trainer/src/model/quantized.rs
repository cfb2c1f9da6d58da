//! Frozen projection weights stored blockwise quantized, so a large base fits beside its
//! adapters (QLoRA): NF4 as bitsandbytes makes it (64-value blocks, double-quantized
//! absmax), or Q8_0 as GGUF has it (32-value blocks, f16 scales). The packed codes, one
//! f32 scale per block and the code table live on the device; the matmul
//! ([`kernels::quant_matmul`]) dequantizes a tile at a time, and the weight takes no
//! gradient.
//!
//! What is quantized: the attention and MLP projections (`q_proj` … `down_proj`), less
//! those named in `model.quantize_skip`. By default the embeddings and the output head stay
//! in the compute dtype, as bitsandbytes leaves embeddings and `lm_head`: quantizing them
//! costs accuracy on every token. `model.quantize_embeddings = true` quantizes them too
//! (one matrix when tied), which a small model needs to bring its whole base under 0.3×
//! bf16 (SmolLM2-135M's tied embeddings are a fifth of it): the lookup dequantizes only
//! the rows it reads, and the head's log-probs dequantize a tile at a time like a
//! projection. Norms and a reward model's score head always stay dense.
//!
//! `keep` takes a GGUF model's own types: every quantized projection hearth reads (Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) is held as the file's blocks
//! ([`checkpoints::gguf::Blocks`]: its values exactly), F32/F16/BF16 ones stay dense. The
//! layout is hearth's, not ggml's: 4-bit codes stay 4-bit, 5- and 6-bit ones take a byte,
//! and K-quants' sub-block scales and minimums are expanded to f32, so Q4_1 and Q4_K hold
//! 6 bits per value (0.375× bf16), Q5/Q6 types 9 to 10.
//!
//! NF4's two-level scales are expanded to one f32 per block when the weight is loaded
//! (what bitsandbytes' dequantization computes from them), so the stored size is
//! 4.5 bits per value: 0.28× bf16. Q8_0 stores 9 bits per value: 0.56×.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use checkpoints::gguf::{Blocks, GgmlType};
use kernels::QuantLayout;

use crate::choices::Quantize;
use crate::{Result, TrainerError};

/// The projections a load quantizes: every decoder projection
/// ([`checkpoints::peft::LAYER_PROJECTIONS`]) but those skipped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quantization {
    pub scheme: Option<Quantize>,
    /// Projection names (`down_proj`) or weight prefixes (`model.layers.0.mlp.down_proj`)
    /// left dense.
    pub skip: Vec<String>,
    /// Also the token embeddings and the output head (one matrix when tied):
    /// `model.quantize_embeddings`.
    pub embeddings: bool,
    /// For `keep`: each weight's type in the GGUF being loaded, by Hugging Face name.
    pub source_types: std::collections::HashMap<String, GgmlType>,
    /// For `keep`: the quantized weights' blocks as the file holds them, and their
    /// `[out, in]`, by name.
    pub kept: std::collections::HashMap<String, (std::sync::Arc<Blocks>, [usize; 2])>,
}

/// How one weight is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nf4,
    Q8_0,
    Q4_0,
    /// A GGUF tensor's own blocks, as the loader read them ([`Quantization::kept`]).
    Kept,
}

/// Refuses a `quantize_skip` entry that names no weight a load would quantize: a typo
/// (`down-proj`) would quantize a projection the user meant to keep dense. An entry is a
/// projection name, `embed_tokens` or `lm_head`, or a weight's whole prefix
/// (`model.layers.0.mlp.down_proj`); `layers`, when known, bounds the layer number.
pub fn check_skip(skip: &[String], layers: Option<usize>) -> std::result::Result<(), String> {
    let projections = checkpoints::peft::LAYER_PROJECTIONS;
    for entry in skip {
        let named = projections.contains(&entry.as_str())
            || ["embed_tokens", "lm_head", "model.embed_tokens"].contains(&entry.as_str());
        let prefix = entry
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(layer, rest)| {
                let canonical = layer.bytes().all(|b| b.is_ascii_digit())
                    && (layer.len() == 1 || !layer.starts_with('0'));
                let (block, proj) = rest.split_once('.')?;
                let in_block = match block {
                    "self_attn" => ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&proj),
                    "mlp" => ["gate_proj", "up_proj", "down_proj"].contains(&proj),
                    _ => false,
                };
                (canonical && in_block).then(|| layer.parse::<usize>().ok())?
            });
        if !named && prefix.is_none() {
            return Err(format!(
                "`{entry}` names no weight: give a projection ({}), embed_tokens, lm_head, or \
                 a weight's prefix such as model.layers.0.mlp.down_proj",
                projections.join(", ")
            ));
        }
        if let (Some(layer), Some(layers)) = (prefix, layers)
            && layer >= layers
        {
            return Err(format!(
                "`{entry}`: the model has {layers} layers (0 to {})",
                layers.saturating_sub(1)
            ));
        }
    }
    Ok(())
}

impl Quantization {
    /// From the recipe's `model.quantize` and `model.quantize_skip`.
    pub fn new(scheme: Quantize, skip: &[String]) -> Self {
        Self {
            scheme: (scheme != Quantize::None).then_some(scheme),
            skip: skip.to_vec(),
            embeddings: false,
            source_types: Default::default(),
            kept: Default::default(),
        }
    }

    /// With the embeddings and output head quantized too, or not.
    pub fn with_embeddings(mut self, embeddings: bool) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// How to hold the weight at `prefix` (`model.layers.3.self_attn.q_proj`,
    /// `model.embed_tokens`, `lm_head`): `None` keeps it dense. Under `keep`, a quantized
    /// GGUF tensor is [`Layout::Kept`]: the loader reads its blocks.
    pub fn layout_for(&self, prefix: &str) -> Result<Option<Layout>> {
        let Some(scheme) = self.scheme else {
            return Ok(None);
        };
        let module = prefix.rsplit('.').next().unwrap_or(prefix);
        let projection = checkpoints::peft::LAYER_PROJECTIONS.contains(&module);
        let vocab = prefix == "model.embed_tokens" || prefix == "lm_head";
        let skipped = self.skip.iter().any(|s| s == module || s == prefix);
        if !(projection || vocab && self.embeddings) || skipped {
            return Ok(None);
        }
        Ok(match scheme {
            Quantize::None => None,
            Quantize::Nf4 => Some(Layout::Nf4),
            Quantize::Q8_0 => Some(Layout::Q8_0),
            Quantize::Keep => {
                let name = format!("{prefix}.weight");
                match self.source_types.get(&name) {
                    Some(GgmlType::Q8_0) => Some(Layout::Q8_0),
                    Some(GgmlType::Q4_0) => Some(Layout::Q4_0),
                    Some(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => None,
                    // Every quantized type hearth reads is held as its blocks; one it
                    // cannot read is refused when the loader reads it, naming it.
                    Some(_) => Some(Layout::Kept),
                    None => {
                        return Err(TrainerError::Input(
                            "model.quantize = \"keep\" keeps a GGUF model's own types; this \
                             model is not a GGUF file"
                                .into(),
                        ));
                    }
                }
            }
        })
    }
}

/// A frozen `[out, in]` weight in a blockwise-quantized layout (see
/// [`kernels::quant_matmul`]).
#[derive(Module, Debug)]
pub struct QuantWeight {
    /// `[out, in · bits / 32]` u32 words of code indices.
    pub packed: Param<Tensor<2, Int>>,
    /// `[out · in / block]`, f32.
    pub scales: Param<Tensor<1>>,
    /// `[2^bits]`, f32.
    pub code: Param<Tensor<1>>,
    /// `[out · in / block]` f32, added to each block (GGUF's types with a minimum).
    pub offsets: Option<Param<Tensor<1>>>,
    pub bits: u32,
    pub block: u32,
}

impl QuantWeight {
    /// Quantizes the `[out, in]` row-major `values` of tensor `name` with `scheme`; the
    /// rows must be a whole number of blocks.
    pub fn quantize(
        name: &str,
        values: &[f32],
        [out, inp]: [usize; 2],
        layout: Layout,
        device: &Device,
    ) -> Result<Self> {
        let (block, label, ggml_type) = match layout {
            Layout::Nf4 => (checkpoints::nf4::BLOCK, "nf4", None),
            Layout::Q8_0 => (GgmlType::Q8_0.block_len(), "q8_0", Some(GgmlType::Q8_0)),
            Layout::Q4_0 => (GgmlType::Q4_0.block_len(), "q4_0", Some(GgmlType::Q4_0)),
            Layout::Kept => {
                return Err(TrainerError::Input(format!(
                    "{name}: model.quantize = \"keep\" takes a GGUF tensor's blocks as \
                     the file holds them, not values"
                )));
            }
        };
        if inp % block != 0 {
            return Err(TrainerError::Input(format!(
                "model.quantize = \"{label}\": {name} rows hold {inp} values, not a whole \
                 number of {block}-value blocks; leave it dense with model.quantize_skip"
            )));
        }
        let ggml = |ty: GgmlType| {
            let bytes = checkpoints::gguf::quantize::quantize(ty, values);
            bytes
                .and_then(|b| checkpoints::gguf::blocks(ty, &b))
                .ok_or_else(|| TrainerError::Input(format!("{name}: values are not whole blocks")))
        };
        let blocks = match ggml_type {
            None => {
                let q = checkpoints::nf4::quantize(values);
                Blocks {
                    scales: q.absmax(),
                    codes: q.codes,
                    offsets: None,
                    block,
                    bits: 4,
                    table: checkpoints::nf4::CODE.to_vec(),
                }
            }
            Some(ty) => ggml(ty)?,
        };
        Self::from_blocks(name, &blocks, [out, inp], device)
    }

    /// The `[out, in]` weight `name` from its blocks (a GGUF tensor's, or a quantizer's).
    pub fn from_blocks(
        name: &str,
        blocks: &Blocks,
        [out, inp]: [usize; 2],
        device: &Device,
    ) -> Result<Self> {
        let layout = QuantLayout {
            bits: blocks.bits,
            block: blocks.block as u32,
        };
        if inp % blocks.block != 0
            || inp % layout.per_word() != 0
            || blocks.codes.len() != out * inp
        {
            return Err(TrainerError::Input(format!(
                "{name}: [{out}, {inp}] is not a whole number of {}-value blocks per row",
                blocks.block
            )));
        }
        let packed = kernels::pack_codes(&blocks.codes, blocks.bits);
        let words = inp / layout.per_word();
        let floats = |v: &[f32]| {
            Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(v.to_vec(), [v.len()]),
                (device, DType::F32),
            ))
            .set_require_grad(false)
        };
        Ok(Self {
            packed: Param::initialized(
                ParamId::new(),
                Tensor::<2, Int>::from_data(
                    TensorData::new(packed, [out, words]),
                    (device, DType::U32),
                ),
            ),
            scales: floats(&blocks.scales),
            code: floats(&blocks.table),
            offsets: blocks.offsets.as_deref().map(floats),
            bits: blocks.bits,
            block: blocks.block as u32,
        })
    }

    pub fn layout(&self) -> QuantLayout {
        QuantLayout {
            bits: self.bits,
            block: self.block,
        }
    }

    /// `[out, in]`.
    pub fn out_in(&self) -> [usize; 2] {
        let [out, words] = self.packed.shape().dims();
        [out, words * self.layout().per_word()]
    }

    /// `x·Wᵀ` in `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.matrix().matmul(x)
    }

    /// The parts as the ops take them.
    pub fn matrix(&self) -> kernels::QuantMatrix {
        kernels::QuantMatrix {
            packed: self.packed.val(),
            scales: self.scales.val(),
            code: self.code.val(),
            offsets: self.offsets.as_ref().map(|o| o.val()),
            layout: self.layout(),
        }
    }

    /// The whole weight in f32 on its device: for merging an adapter into it and for
    /// writing a dense checkpoint.
    pub fn dequantize(&self) -> Tensor<2> {
        let [out, inp] = self.out_in();
        let device = self.scales.val().device();
        let host = |t: TensorData| t.convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let packed = self
            .packed
            .val()
            .into_data()
            .convert::<u32>()
            .try_into_vec::<u32>()
            .unwrap_or_default();
        let scales = host(self.scales.val().into_data());
        let code = host(self.code.val().into_data());
        let mut dense = kernels::dequantize_host(&packed, &scales, &code, self.layout(), out, inp);
        if let Some(o) = &self.offsets {
            let offsets = host(o.val().into_data());
            let block = self.block as usize;
            for (i, v) in dense.iter_mut().enumerate() {
                *v += offsets[i / block];
            }
        }
        Tensor::from_data(TensorData::new(dense, [out, inp]), &device)
    }

    /// Bytes held on the device: packed codes, scales, offsets and code table.
    pub fn bytes(&self) -> usize {
        let [out, words] = self.packed.shape().dims::<2>();
        let offsets = self
            .offsets
            .as_ref()
            .map_or(0, |o| o.shape().num_elements() * 4);
        out * words * 4
            + self.scales.shape().num_elements() * 4
            + self.code.shape().num_elements() * 4
            + offsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.37).sin()) * 0.05).collect()
    }

    #[test]
    fn both_schemes_dequantize_as_their_codecs_do() {
        let device = Device::flex();
        let v = values(4 * 128);
        let nf4 = QuantWeight::quantize("w", &v, [4, 128], Layout::Nf4, &device).unwrap();
        assert_eq!(nf4.out_in(), [4, 128]);
        let got = nf4.dequantize().into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(got, checkpoints::nf4::quantize(&v).dequantize());

        let q8 = QuantWeight::quantize("w", &v, [4, 128], Layout::Q8_0, &device).unwrap();
        let got = q8.dequantize().into_data().try_into_vec::<f32>().unwrap();
        let bytes = checkpoints::gguf::quantize::quantize(GgmlType::Q8_0, &v).unwrap();
        let want = checkpoints::gguf::dequantize(GgmlType::Q8_0, &bytes).unwrap();
        assert_eq!(got, want);
        // 4.5 and 9 bits per value, plus the code tables.
        assert_eq!(nf4.bytes(), 4 * 128 / 2 + 4 * 2 * 4 + 16 * 4);
        assert_eq!(q8.bytes(), 4 * 128 + 4 * 4 * 4 + 256 * 4);

        let q4 = QuantWeight::quantize("w", &v, [4, 128], Layout::Q4_0, &device).unwrap();
        let got = q4.dequantize().into_data().try_into_vec::<f32>().unwrap();
        let bytes = checkpoints::gguf::quantize::quantize(GgmlType::Q4_0, &v).unwrap();
        assert_eq!(
            got,
            checkpoints::gguf::dequantize(GgmlType::Q4_0, &bytes).unwrap()
        );
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_refused_naming_the_tensor() {
        let e = QuantWeight::quantize(
            "model.layers.0.mlp.down_proj.weight",
            &values(2 * 96),
            [2, 96],
            Layout::Nf4,
            &Device::flex(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("model.layers.0.mlp.down_proj.weight rows hold 96 values"),
            "{e}"
        );
        assert!(e.contains("64-value blocks"), "{e}");
    }
}
