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
//! `keep` takes a GGUF model's own types: its Q8_0 and Q4_0 projections are held as they
//! are (their blocks re-read exactly), F32/F16/BF16 ones stay dense, and any other type
//! (Q4_1, the K-quants…) is refused, naming the tensor.
//!
//! NF4's two-level scales are expanded to one f32 per block when the weight is loaded
//! (what bitsandbytes' dequantization computes from them), so the stored size is
//! 4.5 bits per value: 0.28× bf16. Q8_0 stores 9 bits per value: 0.56×.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use checkpoints::gguf::GgmlType;
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
}

/// How one weight is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nf4,
    Q8_0,
    Q4_0,
}

impl Quantization {
    /// From the recipe's `model.quantize` and `model.quantize_skip`.
    pub fn new(scheme: Quantize, skip: &[String]) -> Self {
        Self {
            scheme: (scheme != Quantize::None).then_some(scheme),
            skip: skip.to_vec(),
            embeddings: false,
            source_types: Default::default(),
        }
    }

    /// With the embeddings and output head quantized too, or not.
    pub fn with_embeddings(mut self, embeddings: bool) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// How to hold the weight at `prefix` (`model.layers.3.self_attn.q_proj`,
    /// `model.embed_tokens`, `lm_head`): `None` keeps it dense. Under `keep`, a GGUF type hearth cannot hold is refused.
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
                    Some(other) => {
                        return Err(TrainerError::Input(format!(
                            "model.quantize = \"keep\": {name} is {} in the GGUF, which a \
                             quantized base cannot hold as it is (it keeps Q8_0 and Q4_0); \
                             use \"nf4\" or \"q8_0\"",
                            other.name()
                        )));
                    }
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
        let (block, bits, label) = match layout {
            Layout::Nf4 => (checkpoints::nf4::BLOCK, 4, "nf4"),
            Layout::Q8_0 => (GgmlType::Q8_0.block_len(), 8, "q8_0"),
            Layout::Q4_0 => (GgmlType::Q4_0.block_len(), 4, "q4_0"),
        };
        if inp % block != 0 {
            return Err(TrainerError::Input(format!(
                "model.quantize = \"{label}\": {name} rows hold {inp} values, not a whole \
                 number of {block}-value blocks; leave it dense with model.quantize_skip"
            )));
        }
        let (codes, scales, code): (Vec<u8>, Vec<f32>, Vec<f32>) = match layout {
            Layout::Nf4 => {
                let q = checkpoints::nf4::quantize(values);
                let absmax = q.absmax();
                (q.codes, absmax, checkpoints::nf4::CODE.to_vec())
            }
            Layout::Q8_0 => q8_0(values)?,
            Layout::Q4_0 => q4_0(values)?,
        };
        let layout = QuantLayout {
            bits,
            block: block as u32,
        };
        let packed = kernels::pack_codes(&codes, bits);
        let words = inp / layout.per_word();
        let n_scales = scales.len();
        let levels = code.len();
        Ok(Self {
            packed: Param::initialized(
                ParamId::new(),
                Tensor::<2, Int>::from_data(
                    TensorData::new(packed, [out, words]),
                    (device, DType::U32),
                ),
            ),
            scales: Param::from_tensor(Tensor::from_data(
                TensorData::new(scales, [n_scales]),
                (device, DType::F32),
            ))
            .set_require_grad(false),
            code: Param::from_tensor(Tensor::from_data(
                TensorData::new(code, [levels]),
                (device, DType::F32),
            ))
            .set_require_grad(false),
            bits,
            block: block as u32,
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
        let dense = kernels::dequantize_host(&packed, &scales, &code, self.layout(), out, inp);
        Tensor::from_data(TensorData::new(dense, [out, inp]), &device)
    }

    /// Bytes held on the device: packed codes, scales and code table.
    pub fn bytes(&self) -> usize {
        let [out, words] = self.packed.shape().dims::<2>();
        out * words * 4
            + self.scales.shape().num_elements() * 4
            + self.code.shape().num_elements() * 4
    }
}

/// Q8_0 as GGUF encodes it (f16 scale, 32 signed bytes per block): the bytes' codes as
/// indices into the table of the 256 byte values read as i8, and the scales widened.
fn q8_0(values: &[f32]) -> Result<(Vec<u8>, Vec<f32>, Vec<f32>)> {
    let bytes = checkpoints::gguf::quantize::quantize(GgmlType::Q8_0, values)
        .ok_or_else(|| TrainerError::Input("q8_0: values are not whole blocks".into()))?;
    let per = GgmlType::Q8_0.block_bytes();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(bytes.len() / per);
    for block in bytes.chunks_exact(per) {
        scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        codes.extend_from_slice(&block[2..]);
    }
    let code = (0..=255u8).map(|b| f32::from(b as i8)).collect();
    Ok((codes, scales, code))
}

/// Q4_0 as GGUF encodes it (f16 scale, 32 values as nibbles: the first 16 in the low
/// halves, the next 16 in the high ones), each value `d · (q − 8)`: codes in value order
/// and the table of `q − 8`.
fn q4_0(values: &[f32]) -> Result<(Vec<u8>, Vec<f32>, Vec<f32>)> {
    let bytes = checkpoints::gguf::quantize::quantize(GgmlType::Q4_0, values)
        .ok_or_else(|| TrainerError::Input("q4_0: values are not whole blocks".into()))?;
    let per = GgmlType::Q4_0.block_bytes();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(bytes.len() / per);
    for block in bytes.chunks_exact(per) {
        scales.push(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        let qs = &block[2..];
        codes.extend(qs.iter().map(|b| b & 0x0F));
        codes.extend(qs.iter().map(|b| b >> 4));
    }
    let code = (0..16).map(|q| (q - 8) as f32).collect();
    Ok((codes, scales, code))
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
