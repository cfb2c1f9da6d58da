//! A GGUF file seen as a Hugging Face checkpoint: its metadata as `config.json`, its tensors
//! under transformers' names (dequantized, with llama.cpp's q/k row permutation undone), and
//! the file names hearth uses for each part.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::container::{GgufFile, MetaValue, TensorInfo, gguf_err};
use super::quant::{Blocks, GgmlType, blocks, dequantize};
use crate::Result;

/// The architectures read (`general.architecture`): both map onto hearth's Llama.
pub const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Llama 3.1's rope scaling constants, assumed when recovering it from `rope_freqs.weight`
/// (llama.cpp stores the per-frequency factors, not the parameters) and then checked.
const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;
const LLAMA3_ORIGINAL_CONTEXT: f64 = 8192.0;

/// The GGUF file a model path names: the path itself when it is a GGUF file, or the one
/// `.gguf` file of a directory that has no `config.json`. `Ok(None)` for anything else (a
/// Hugging Face checkpoint directory, a missing path), which other readers then report.
pub fn locate(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        let by_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        return Ok((by_name || starts_with_magic(path)).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join(crate::names::CONFIG).exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|e| crate::CheckpointError::io(path, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(gguf_err(
            path,
            format!(
                "holds {} GGUF files ({}); name the one to use",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn starts_with_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == super::container::MAGIC
}

/// The GGUF name of the tensor transformers calls `hf` (and back, with [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, true)
}

/// The transformers name of the GGUF tensor `gguf`.
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, false)
}

/// One table, read either way: transformers' names to llama.cpp's (`to_gguf`) or back.
fn rename(name: &str, to_gguf: bool) -> Option<String> {
    let pick = |&(hf, gg): &(&'static str, &'static str)| if to_gguf { (hf, gg) } else { (gg, hf) };
    if let Some((_, to)) = TOP_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.into());
    }
    let (prefix, target) = pick(&("model.layers.", "blk."));
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, to) = LAYER_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == module)?;
    Some(format!("{target}{layer}.{to}.{kind}"))
}

const TOP_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

const LAYER_NAMES: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// llama.cpp's converter interleaves the two rotary halves of each head's rows of q and k
/// for the `llama` architecture; this puts rows back in transformers' order. `rows` holds
/// `heads` heads of `2·half` rows, each `cols` wide. [`permute_rows`] is its inverse.
pub fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(values, heads, cols, false)
}

/// transformers' row order to llama.cpp's (for writing GGUF).
pub fn permute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    reorder_rows(values, heads, cols, true)
}

fn reorder_rows<T: Copy + Default>(
    values: &[T],
    heads: usize,
    cols: usize,
    to_gguf: bool,
) -> Vec<T> {
    let rows = values.len() / cols;
    let half = rows / heads / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * 2 * half + j * half + i;
                let gg = h * 2 * half + i * 2 + j;
                let (from, to) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// An open GGUF model.
pub struct GgufModel {
    file: GgufFile,
    arch: String,
    taken: RefCell<BTreeSet<String>>,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| gguf_err(path, "no `general.architecture` in its metadata"))?
            .to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(gguf_err(
                path,
                format!(
                    "architecture `{arch}` is not in the Llama family hearth reads ({})",
                    ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(Self {
            file,
            arch,
            taken: RefCell::default(),
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn architecture(&self) -> &str {
        &self.arch
    }

    fn err(&self, reason: impl Into<String>) -> crate::CheckpointError {
        gguf_err(self.path(), reason)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn count(&self, key: &str) -> Result<Option<usize>> {
        let full = self.arch_key(key);
        match self.file.get(&full) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{full}` = {v:?} is not a count"))),
        }
    }

    /// `block_count`, checked as a config's `num_hidden_layers` is.
    fn layer_count(&self) -> Result<usize> {
        let layers = self.required("block_count")?;
        match crate::config::bad_layer_count(layers as u64) {
            None => Ok(layers),
            Some(reason) => Err(self.err(format!("`{}`: {reason}", self.arch_key("block_count")))),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.count(key)?
            .ok_or_else(|| self.err(format!("no `{}` in its metadata", self.arch_key(key))))
    }

    /// A float as written (an f32 is given its shortest decimal form, so `1e-5` stays 1e-5).
    /// NaN and ±∞ are refused: JSON has no form for them, so they would turn into the
    /// default silently.
    fn float(&self, key: &str) -> Result<Option<f64>> {
        let full = self.arch_key(key);
        let Some(raw) = self.file.get(&full) else {
            return Ok(None);
        };
        let value = match raw {
            MetaValue::F32(v) => format!("{v}").parse().ok(),
            v => v.as_f64(),
        };
        match value {
            Some(x) if x.is_finite() => Ok(Some(x)),
            Some(x) => Err(self.err(format!("`{full}` = {x} is not a finite number"))),
            None => Err(self.err(format!("`{full}` = {raw:?} is not a number"))),
        }
    }

    fn token_id(&self, which: &str) -> Option<u64> {
        self.file
            .get(&format!("tokenizer.ggml.{which}_token_id"))
            .and_then(MetaValue::as_u64)
    }

    /// The vocabulary the embedding holds: its rows.
    pub fn vocab_size(&self) -> Result<usize> {
        let embed = self
            .file
            .tensor("token_embd.weight")
            .ok_or_else(|| self.err("no tensor `token_embd.weight`"))?;
        Ok(*embed.dims.get(1).unwrap_or(&0) as usize)
    }

    /// The model's `config.json`, in the Hub's style, from the GGUF metadata.
    pub fn config_json(&self) -> Result<String> {
        let heads = self.required("attention.head_count")?;
        let hidden = self.required("embedding_length")?;
        let kv_heads = self.count("attention.head_count_kv")?.unwrap_or(heads);
        for (key, n) in [
            ("attention.head_count", heads),
            ("attention.head_count_kv", kv_heads),
        ] {
            if n == 0 {
                return Err(self.err(format!("`{}` is 0", self.arch_key(key))));
            }
        }
        let head_dim = self
            .count("attention.key_length")?
            .unwrap_or(hidden / heads);
        if let Some(rot) = self.count("rope.dimension_count")?
            && rot != head_dim
        {
            return Err(self.err(format!(
                "`{}` = {rot} rotates part of each {head_dim}-wide head; hearth rotates whole heads",
                self.arch_key("rope.dimension_count")
            )));
        }
        let vocab = self.vocab_size()?;
        if let Some(tokens) = self
            .file
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            && tokens.len() > vocab
        {
            return Err(self.err(format!(
                "its tokenizer has {} tokens but `token_embd.weight` only {vocab} rows",
                tokens.len()
            )));
        }
        let mut config = json!({
            "architectures": [if self.arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": self.arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.required("feed_forward_length")?,
            "num_hidden_layers": self.layer_count()?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": self.float("rope.freq_base")?.unwrap_or(10000.0),
            "max_position_embeddings": self.count("context_length")?.unwrap_or(4096),
            "tie_word_embeddings": self.file.tensor("output.weight").is_none(),
            "torch_dtype": self.dtype_name(),
        });
        if self.arch == "llama" {
            config["attention_bias"] = json!(self.file.tensor("blk.0.attn_q.bias").is_some());
            config["mlp_bias"] = json!(self.file.tensor("blk.0.ffn_gate.bias").is_some());
        }
        if let Some(bos) = self.token_id("bos") {
            config["bos_token_id"] = json!(bos);
        }
        if let Some(eos) = self.token_id("eos") {
            config["eos_token_id"] = json!(eos);
        }
        if let Some(pad) = self.token_id("padding") {
            config["pad_token_id"] = json!(pad);
        }
        if let Some(scaling) = self.rope_scaling(head_dim, config["rope_theta"].as_f64())? {
            config["rope_scaling"] = scaling;
        }
        Ok(serde_json::to_string_pretty(&config).unwrap_or_default())
    }

    /// The dtype a dequantized checkpoint is written in: the file's own for plain float
    /// files, f32 (exact) for quantized ones.
    fn dtype_name(&self) -> &'static str {
        match self
            .file
            .get("general.file_type")
            .and_then(MetaValue::as_u64)
        {
            Some(1) => "float16",
            Some(32) => "bfloat16",
            _ => "float32",
        }
    }

    fn rope_scaling(&self, head_dim: usize, theta: Option<f64>) -> Result<Option<Value>> {
        let kind = self
            .file
            .get(&self.arch_key("rope.scaling.type"))
            .and_then(MetaValue::as_str);
        let factor = self.float("rope.scaling.factor")?;
        match kind {
            None | Some("none") => {}
            Some("linear") => {
                let factor =
                    factor.ok_or_else(|| self.err("linear rope scaling without a factor"))?;
                return Ok(Some(json!({"rope_type": "linear", "factor": factor})));
            }
            Some(other) => {
                return Err(self.err(format!(
                    "rope scaling `{other}` is not supported (none, linear, and Llama 3's)"
                )));
            }
        }
        let Some(freqs) = self.file.tensor("rope_freqs.weight") else {
            return Ok(None);
        };
        self.taken.borrow_mut().insert(freqs.name.clone());
        let factors = self.values(freqs)?;
        if factors.len() != head_dim / 2 {
            return Err(self.err(format!(
                "`rope_freqs.weight` has {} values, expected {} (half a head)",
                factors.len(),
                head_dim / 2
            )));
        }
        let theta = theta.unwrap_or(10000.0);
        // 1 when no frequency lies in the band Llama 3 rescales (or none fits): then every
        // stored factor must be 1 and the scaling changes nothing.
        let factor = llama3_factor_of(theta, head_dim, &factors).unwrap_or(1.0);
        let expected = llama3_rope_factors(theta, head_dim, factor);
        let matches = expected
            .iter()
            .zip(&factors)
            .all(|(&e, &f)| (e - f as f64).abs() <= 1e-4 * e.abs().max(1.0));
        if !matches {
            return Err(self.err(
                "`rope_freqs.weight` is not Llama 3's rope scaling (low 1, high 4, original \
                 context 8192) with any factor; other per-frequency factors are not supported",
            ));
        }
        if factor == 1.0 {
            return Ok(None);
        }
        Ok(Some(json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT as usize,
        })))
    }

    fn values(&self, tensor: &TensorInfo) -> Result<Vec<f32>> {
        dequantize(tensor.ty, self.file.bytes(tensor)).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` has type {}, which hearth cannot dequantize (supported: {})",
                tensor.name,
                tensor.ty.name(),
                GgmlType::READABLE.map(GgmlType::name).join(", ")
            ))
        })
    }

    /// The tensor transformers calls `hf`, which must have the row-major shape `expected`,
    /// dequantized to f32 and in transformers' row order.
    pub fn tensor_f32(&self, hf: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let tensor = self.take_tensor(hf, expected)?;
        let values = self.values(tensor)?;
        Ok(match self.row_heads(tensor)? {
            Some(heads) => unpermute_rows(&values, heads, expected.get(1).copied().unwrap_or(1)),
            None => values,
        })
    }

    /// The quantized tensor transformers calls `hf` (shape `expected`) taken apart into
    /// codes, scales and offsets as they are in the file ([`Blocks`]), rows in transformers'
    /// order. `None` (and the tensor left untaken) when its type is a plain float one.
    pub fn tensor_blocks(&self, hf: &str, expected: &[usize]) -> Result<Option<Blocks>> {
        let name = gguf_name(hf).ok_or_else(|| self.err(format!("no GGUF name for `{hf}`")))?;
        let ty = self.file.tensor(&name).map(|t| t.ty);
        if ty.is_none_or(|ty| blocks(ty, &[]).is_none()) {
            return Ok(None);
        }
        let tensor = self.take_tensor(hf, expected)?;
        let mut b = blocks(tensor.ty, self.file.bytes(tensor)).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` ({}) is not a whole number of blocks",
                tensor.name,
                tensor.ty.name()
            ))
        })?;
        let cols = expected.get(1).copied().unwrap_or(1);
        if let Some(heads) = self.row_heads(tensor)? {
            b.codes = reorder_rows(&b.codes, heads, cols, false);
            b.scales = reorder_rows(&b.scales, heads, cols / b.block, false);
            b.offsets = b
                .offsets
                .map(|o| reorder_rows(&o, heads, cols / b.block, false));
        }
        Ok(Some(b))
    }

    /// The tensor transformers calls `hf`, checked to have the shape `expected`, marked taken.
    fn take_tensor(&self, hf: &str, expected: &[usize]) -> Result<&TensorInfo> {
        let name = gguf_name(hf).ok_or_else(|| self.err(format!("no GGUF name for `{hf}`")))?;
        let tensor = self.file.tensor(&name).ok_or_else(|| {
            self.err(format!(
                "missing tensor `{name}` (`{hf}`, shape {expected:?})"
            ))
        })?;
        if tensor.shape() != expected {
            return Err(self.err(format!(
                "tensor `{name}` (`{hf}`) has shape {:?}, expected {expected:?}",
                tensor.shape()
            )));
        }
        self.taken.borrow_mut().insert(name);
        Ok(tensor)
    }

    /// The head count whose rows llama.cpp's converter interleaved in `tensor` (q and k of
    /// the `llama` architecture), or `None` when its rows are in transformers' order.
    fn row_heads(&self, tensor: &TensorInfo) -> Result<Option<usize>> {
        let name = &tensor.name;
        let permuted =
            self.arch == "llama" && (name.contains(".attn_q.") || name.contains(".attn_k."));
        if !permuted {
            return Ok(None);
        }
        let heads = self.required("attention.head_count")?;
        Ok(Some(if name.contains(".attn_q.") {
            heads
        } else {
            self.count("attention.head_count_kv")?.unwrap_or(heads)
        }))
    }

    /// Fails on the first tensor nobody took.
    pub fn ensure_all_taken(&self) -> Result<()> {
        let taken = self.taken.borrow();
        match self.file.tensors.iter().find(|t| !taken.contains(&t.name)) {
            None => Ok(()),
            Some(t) => Err(self.err(format!(
                "unexpected tensor `{}` (shape {:?}) not used by this model",
                t.name,
                t.shape()
            ))),
        }
    }
}

/// The `factor` of Llama 3's scaling that gives `factors`, read off the lowest frequency
/// (the one rescaled most); `None` when it is not rescaled, or by no positive factor.
fn llama3_factor_of(theta: f64, head_dim: usize, factors: &[f32]) -> Option<f64> {
    let last = factors.len().checked_sub(1)?;
    let freq = 1.0 / theta.powf((2 * last) as f64 / head_dim as f64);
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let r = factors[last] as f64;
    if wavelen < LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR {
        None
    } else if wavelen > LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR {
        Some(r)
    } else {
        // r = 1 / ((1 − s)/factor + s), solved for factor.
        let s = (LLAMA3_ORIGINAL_CONTEXT / wavelen - LLAMA3_LOW_FREQ_FACTOR)
            / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR);
        let denominator = 1.0 / r - s;
        // Read through an f32 the factor carries float noise; factors are round numbers
        // (8, 16, 32), and the caller checks every frequency against the rounded one.
        (denominator > 0.0).then(|| ((1.0 - s) / denominator * 1000.0).round() / 1000.0)
    }
}

/// The per-frequency divisors llama.cpp's converter writes for Llama 3's rope scaling with
/// Llama 3.1's constants.
pub fn llama3_rope_factors(theta: f64, head_dim: usize, factor: f64) -> Vec<f64> {
    llama3_rope_factors_with(
        theta,
        head_dim,
        factor,
        LLAMA3_LOW_FREQ_FACTOR,
        LLAMA3_HIGH_FREQ_FACTOR,
        LLAMA3_ORIGINAL_CONTEXT,
    )
}

/// [`llama3_rope_factors`] with every constant given.
pub fn llama3_rope_factors_with(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}
