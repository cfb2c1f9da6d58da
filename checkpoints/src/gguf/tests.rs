//! GGUF files written here, block by block from chosen codes and scales, read back: each
//! quant type against its formula, the metadata as a config, the q/k row order, and every
//! kind of damaged file as a one-line error naming it.

use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::*;
use crate::ModelConfig;

/// A small deterministic generator, so each block's codes differ.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
    fn half(&mut self) -> f16 {
        f16::from_f32((self.below(2000) as f32 - 1000.0) / 4096.0)
    }
}

fn write_one(dir: &Path, ty: GgmlType, dims: Vec<u64>, bytes: Vec<u8>) -> PathBuf {
    let path = dir.join(format!("{}.gguf", ty.name()));
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()));
    w.tensor(TensorOut {
        name: "t".into(),
        dims,
        ty,
        bytes,
    });
    w.write(&path).unwrap();
    path
}

/// Writes `blocks` blocks of `ty` made by `make`, which returns a block's bytes and the
/// values its formula gives; checks the reader's dequantization equals them exactly.
fn check_type(ty: GgmlType, blocks: usize, mut make: impl FnMut(&mut Lcg) -> (Vec<u8>, Vec<f32>)) {
    let mut rng = Lcg(ty.id() as u64 + 1);
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..blocks {
        let (b, v) = make(&mut rng);
        assert_eq!(b.len(), ty.block_bytes(), "{}", ty.name());
        assert_eq!(v.len(), ty.block_len(), "{}", ty.name());
        bytes.extend(b);
        expected.extend(v);
    }
    let dir = tempfile::tempdir().unwrap();
    let rows = 2;
    let cols = expected.len() / rows;
    let path = write_one(dir.path(), ty, vec![cols as u64, rows as u64], bytes);
    let file = GgufFile::open(&path).unwrap();
    let t = file.tensor("t").unwrap();
    assert_eq!(t.shape(), vec![rows, cols]);
    let got = dequantize(t.ty, file.bytes(t)).unwrap();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{} value {i}: {g} vs {e}",
            ty.name()
        );
    }
}

#[test]
fn plain_types_read_as_written() {
    check_type(GgmlType::F32, 64, |r| {
        let v = (r.below(1000) as f32 - 500.0) / 7.0;
        (v.to_le_bytes().to_vec(), vec![v])
    });
    check_type(GgmlType::F16, 64, |r| {
        let v = r.half();
        (v.to_le_bytes().to_vec(), vec![v.to_f32()])
    });
    check_type(GgmlType::BF16, 64, |r| {
        let v = bf16::from_f32((r.below(1000) as f32 - 500.0) / 3.0);
        (v.to_le_bytes().to_vec(), vec![v.to_f32()])
    });
}

#[test]
fn q8_0_is_scale_times_code() {
    check_type(GgmlType::Q8_0, 4, |r| {
        let d = r.half();
        let q: Vec<i8> = (0..32).map(|_| (r.below(256) as i32 - 128) as i8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(q.iter().map(|&v| v as u8));
        (b, q.iter().map(|&v| d.to_f32() * v as f32).collect())
    });
}

/// Nibbles packed as ggml does: value `j` in the low half of byte `j`, value `j + 16` in
/// its high half.
fn nibbles(q: &[u8]) -> Vec<u8> {
    (0..16)
        .map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4))
        .collect()
}

/// The fifth bits of 32 five-bit codes, bit `j` for value `j`.
fn fifth_bits(q: &[u8]) -> [u8; 4] {
    let qh: u32 = (0..32).map(|j| ((q[j] as u32 >> 4) & 1) << j).sum();
    qh.to_le_bytes()
}

#[test]
fn q4_0_and_q4_1_are_affine_in_the_nibble() {
    check_type(GgmlType::Q4_0, 4, |r| {
        let d = r.half();
        let q: Vec<u8> = (0..32).map(|_| r.below(16) as u8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(nibbles(&q));
        (
            b,
            q.iter().map(|&v| (v as f32 - 8.0) * d.to_f32()).collect(),
        )
    });
    check_type(GgmlType::Q4_1, 4, |r| {
        let (d, m) = (r.half(), r.half());
        let q: Vec<u8> = (0..32).map(|_| r.below(16) as u8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(m.to_le_bytes());
        b.extend(nibbles(&q));
        (
            b,
            q.iter()
                .map(|&v| v as f32 * d.to_f32() + m.to_f32())
                .collect(),
        )
    });
}

#[test]
fn q5_0_and_q5_1_add_a_fifth_bit() {
    check_type(GgmlType::Q5_0, 4, |r| {
        let d = r.half();
        let q: Vec<u8> = (0..32).map(|_| r.below(32) as u8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(fifth_bits(&q));
        b.extend(nibbles(&q));
        (
            b,
            q.iter().map(|&v| (v as f32 - 16.0) * d.to_f32()).collect(),
        )
    });
    check_type(GgmlType::Q5_1, 4, |r| {
        let (d, m) = (r.half(), r.half());
        let q: Vec<u8> = (0..32).map(|_| r.below(32) as u8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(m.to_le_bytes());
        b.extend(fifth_bits(&q));
        b.extend(nibbles(&q));
        (
            b,
            q.iter()
                .map(|&v| v as f32 * d.to_f32() + m.to_f32())
                .collect(),
        )
    });
}

/// Codes of a 256-value super-block with 8 sub-blocks of 32: the low nibbles of bytes
/// `32p..32p+32` hold sub-block `2p`, the high nibbles sub-block `2p + 1`.
fn k_nibbles(q: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    for p in 0..4 {
        for l in 0..32 {
            out[32 * p + l] = (q[64 * p + l] & 0xF) | ((q[64 * p + 32 + l] & 0xF) << 4);
        }
    }
    out
}

fn k_scales(r: &mut Lcg) -> ([u8; 8], [u8; 8]) {
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = r.below(64) as u8;
        lm[j] = r.below(64) as u8;
    }
    (ls, lm)
}

#[test]
fn q4_k_uses_six_bit_scales_and_mins_per_32_values() {
    check_type(GgmlType::Q4K, 4, |r| {
        let (d, dmin) = (r.half(), r.half());
        let (ls, lm) = k_scales(r);
        let q: Vec<u8> = (0..256).map(|_| r.below(16) as u8).collect();
        let mut b = d.to_le_bytes().to_vec();
        b.extend(dmin.to_le_bytes());
        b.extend(super::quantize::pack_scale_min_k4(&ls, &lm));
        b.extend(k_nibbles(&q));
        let v = (0..256)
            .map(|k| {
                let s = k / 32;
                let scale = d.to_f32() * ls[s] as f32;
                let min = dmin.to_f32() * lm[s] as f32;
                scale * q[k] as f32 - min
            })
            .collect();
        (b, v)
    });
}

#[test]
fn q5_k_adds_a_fifth_bit_per_sub_block() {
    check_type(GgmlType::Q5K, 4, |r| {
        let (d, dmin) = (r.half(), r.half());
        let (ls, lm) = k_scales(r);
        let q: Vec<u8> = (0..256).map(|_| r.below(32) as u8).collect();
        let mut qh = [0u8; 32];
        for (k, &v) in q.iter().enumerate() {
            qh[k % 32] |= (v >> 4) << (k / 32);
        }
        let mut b = d.to_le_bytes().to_vec();
        b.extend(dmin.to_le_bytes());
        b.extend(super::quantize::pack_scale_min_k4(&ls, &lm));
        b.extend(qh);
        b.extend(k_nibbles(&q));
        // ggml rounds `d · sc` once, then multiplies by the code.
        let v = (0..256)
            .map(|k| {
                let s = k / 32;
                let scale = d.to_f32() * ls[s] as f32;
                let min = dmin.to_f32() * lm[s] as f32;
                scale * q[k] as f32 - min
            })
            .collect();
        (b, v)
    });
}

#[test]
fn q6_k_uses_signed_scales_per_16_values() {
    check_type(GgmlType::Q6K, 4, |r| {
        let d = r.half();
        let sc: Vec<i8> = (0..16).map(|_| (r.below(256) as i32 - 128) as i8).collect();
        let l: Vec<u8> = (0..256).map(|_| r.below(64) as u8).collect();
        // Packed as llama.cpp's quantize_row_q6_K.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            let (j, ql, qh) = (half * 128, &mut ql[half * 64..], &mut qh[half * 32..]);
            for i in 0..32 {
                ql[i] = (l[j + i] & 0xF) | ((l[j + i + 64] & 0xF) << 4);
                ql[i + 32] = (l[j + i + 32] & 0xF) | ((l[j + i + 96] & 0xF) << 4);
                qh[i] = (l[j + i] >> 4)
                    | ((l[j + i + 32] >> 4) << 2)
                    | ((l[j + i + 64] >> 4) << 4)
                    | ((l[j + i + 96] >> 4) << 6);
            }
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(sc.iter().map(|&s| s as u8));
        b.extend(d.to_le_bytes());
        let v = (0..256)
            .map(|k| d.to_f32() * sc[k / 16] as f32 * (l[k] as i32 - 32) as f32)
            .collect();
        (b, v)
    });
}

/// Every quantized type taken apart into codes, scales and offsets gives back its
/// dequantized values bit for bit, on random blocks (finite f16 scales, any codes).
#[test]
fn blocks_reassemble_to_the_dequantized_values() {
    let mut r = Lcg(11);
    let halves: [(GgmlType, &[usize]); 8] = [
        (GgmlType::Q8_0, &[0]),
        (GgmlType::Q4_0, &[0]),
        (GgmlType::Q4_1, &[0, 2]),
        (GgmlType::Q5_0, &[0]),
        (GgmlType::Q5_1, &[0, 2]),
        (GgmlType::Q4K, &[0, 2]),
        (GgmlType::Q5K, &[0, 2]),
        (GgmlType::Q6K, &[208]),
    ];
    for (ty, at) in halves {
        let n = 3;
        let mut bytes: Vec<u8> = (0..n * ty.block_bytes())
            .map(|_| r.below(256) as u8)
            .collect();
        for b in bytes.chunks_exact_mut(ty.block_bytes()) {
            for &i in at {
                b[i..i + 2].copy_from_slice(&r.half().to_le_bytes());
            }
        }
        let want = dequantize(ty, &bytes).unwrap();
        let got = blocks(ty, &bytes).unwrap();
        assert_eq!(got.codes.len(), want.len(), "{}", ty.name());
        assert!(got.codes.iter().all(|&c| (c as usize) < got.table.len()));
        assert_eq!(got.scales.len() * got.block, want.len(), "{}", ty.name());
        let values = got.values();
        for (i, (g, w)) in values.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} value {i}: {g} vs {w}",
                ty.name()
            );
        }
    }
    assert!(blocks(GgmlType::F16, &[0, 0]).is_none());
    assert!(blocks(GgmlType::Q4_0, &[0; 17]).is_none());
}

#[test]
fn an_unsupported_type_is_named_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = tiny_llama(&[]);
    w.tensor(TensorOut {
        name: "blk.0.attn_v.weight".into(),
        dims: vec![256, 4],
        ty: GgmlType::Iq2Xxs,
        bytes: vec![0; 4 * 66],
    });
    w.write(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let m = model
        .tensor_f32("model.layers.0.self_attn.v_proj.weight", &[4, 256])
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("m.gguf") && m.contains("IQ2_XXS") && m.contains("Q4_K"),
        "{m}"
    );
}

/// A two-layer Llama's metadata (no tensors but the embedding), with `extra` entries
/// (replacing those of the same key).
fn tiny_llama(extra: &[(&str, MetaValue)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    let u = MetaValue::U32;
    let defaults = [
        ("general.architecture", MetaValue::Str("llama".into())),
        ("llama.block_count", u(2)),
        ("llama.context_length", u(256)),
        ("llama.embedding_length", u(16)),
        ("llama.feed_forward_length", u(40)),
        ("llama.attention.head_count", u(4)),
        ("llama.attention.head_count_kv", u(2)),
        ("llama.rope.freq_base", MetaValue::F32(500000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        ),
        ("general.file_type", u(1)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
    ];
    for (k, v) in defaults {
        if !extra.iter().any(|(e, _)| *e == k) {
            w.meta(k, v);
        }
    }
    for (k, v) in extra {
        w.meta(k, v.clone());
    }
    w.tensor(TensorOut {
        name: "token_embd.weight".into(),
        dims: vec![16, 8],
        ty: GgmlType::F32,
        bytes: vec![0; 16 * 8 * 4],
    });
    w
}

#[test]
fn metadata_becomes_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_llama(&[]).write(&path).unwrap();
    // A directory holding one GGUF file stands for it.
    let c = ModelConfig::from_path(dir.path()).unwrap();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (16, 40, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 4)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (8, 256));
    // The f32 metadata keeps its decimal value.
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 500000.0));
    assert!(c.tie_word_embeddings, "no output.weight: tied");
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.dtype, crate::WeightDtype::F16);
    assert_eq!(c.rope_scaling, crate::RopeScaling::Default);
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let factors: Vec<u8> = llama3_rope_factors(500000.0, 4, 32.0)
        .iter()
        .flat_map(|&f| (f as f32).to_le_bytes())
        .collect();
    let mut w = tiny_llama(&[]);
    w.tensor(TensorOut {
        name: "rope_freqs.weight".into(),
        dims: vec![2],
        ty: GgmlType::F32,
        bytes: factors,
    });
    w.write(&path).unwrap();
    let c = ModelConfig::from_path(&path).unwrap();
    assert_eq!(
        c.rope_scaling,
        crate::RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
    // Factors that are no Llama 3 scaling are refused, not guessed.
    let mut w = tiny_llama(&[]);
    w.tensor(TensorOut {
        name: "rope_freqs.weight".into(),
        dims: vec![2],
        ty: GgmlType::F32,
        bytes: [3.0f32, 5.0].iter().flat_map(|f| f.to_le_bytes()).collect(),
    });
    w.write(&path).unwrap();
    let m = ModelConfig::from_path(&path).unwrap_err().to_string();
    assert!(m.contains("rope_freqs.weight"), "{m}");
}

#[test]
fn q_and_k_rows_go_back_to_transformers_order() {
    // One head of 4 rows (2 pairs), 1 column: llama.cpp stores rows 0,2,1,3 of transformers'.
    let hf = [10.0, 11.0, 12.0, 13.0];
    let gguf = permute_rows(&hf, 1, 1);
    assert_eq!(gguf, vec![10.0, 12.0, 11.0, 13.0]);
    assert_eq!(unpermute_rows(&gguf, 1, 1), hf.to_vec());
    // Two heads of 6 rows, 2 columns: a round trip.
    let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
    assert_eq!(unpermute_rows(&permute_rows(&values, 2, 2), 2, 2), values);
}

#[test]
fn names_map_both_ways() {
    for (hf, gg) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.3.self_attn.q_proj.weight",
            "blk.3.attn_q.weight",
        ),
        ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
        (
            "model.layers.12.mlp.down_proj.weight",
            "blk.12.ffn_down.weight",
        ),
        (
            "model.layers.1.post_attention_layernorm.weight",
            "blk.1.ffn_norm.weight",
        ),
    ] {
        assert_eq!(gguf_name(hf).as_deref(), Some(gg));
        assert_eq!(hf_name(gg).as_deref(), Some(hf));
    }
}

fn one_line_error(path: &Path) -> String {
    let m = match GgufModel::open(path) {
        Ok(model) => model.config_json().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(m.contains(&path.display().to_string()), "{m}");
    assert!(!m.contains('\n'), "{m}");
    m
}

#[test]
fn damaged_files_are_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_llama(&[]).to_bytes();
    let path = dir.path().join("bad.gguf");
    // Cut anywhere: header, metadata, descriptors, data.
    for cut in [0, 3, 10, 30, 200, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let m = GgufFile::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(m.contains("truncated"), "cut at {cut}: {m}");
    }
    let mut v = good.clone();
    v[4] = 9;
    std::fs::write(&path, &v).unwrap();
    assert!(one_line_error(&path).contains("unknown GGUF version 9"));
    // A tensor count the file cannot hold.
    let mut v = good.clone();
    v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &v).unwrap();
    assert!(one_line_error(&path).contains("tensor count"));
    // A tensor whose offset lies past the end: its descriptor's last 8 bytes.
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()));
    w.tensor(TensorOut {
        name: "t".into(),
        dims: vec![4],
        ty: GgmlType::F32,
        bytes: vec![0; 16],
    });
    // Header, one string entry, then the descriptor: name, dims count, dim, type, offset.
    let descriptor_end = 24 + (8 + 20 + 4 + 8 + 5) + (8 + 1 + 4 + 8 + 4 + 8);
    let mut v = w.to_bytes();
    let at = descriptor_end - 8;
    v[at..at + 8].copy_from_slice(&4096u64.to_le_bytes());
    std::fs::write(&path, &v).unwrap();
    let m = one_line_error(&path);
    assert!(
        m.contains("tensor `t`") && m.contains("past the end"),
        "{m}"
    );
    // An unknown tensor type id.
    let mut v = w.to_bytes();
    let at = descriptor_end - 12;
    v[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &v).unwrap();
    assert!(one_line_error(&path).contains("unknown tensor type 99"));
}

#[test]
fn metadata_that_would_be_replaced_or_allocate_without_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    // NaN has no JSON form: it became `null`, which reads as the default.
    for key in [
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
    ] {
        for bad in [f32::NAN, f32::INFINITY] {
            tiny_llama(&[(key, MetaValue::F32(bad))])
                .write(&path)
                .unwrap();
            let m = ModelConfig::from_path(&path).unwrap_err().to_string();
            assert!(m.contains(&format!("`{key}` = {bad}")), "{m}");
        }
    }
    // A block count that would size per-layer vectors past memory.
    tiny_llama(&[("llama.block_count", MetaValue::U32(u32::MAX))])
        .write(&path)
        .unwrap();
    let m = ModelConfig::from_path(&path).unwrap_err().to_string();
    assert!(
        m.contains("`llama.block_count`") && m.contains("4294967295"),
        "{m}"
    );
}

#[test]
fn a_tensor_off_the_alignment_is_refused_not_read_shifted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()));
    for name in ["a", "b"] {
        w.tensor(TensorOut {
            name: name.into(),
            dims: vec![8],
            ty: GgmlType::F32,
            bytes: vec![0; 32],
        });
    }
    // Header, one string entry, then two descriptors (name, dims count, dim, type,
    // offset); `b`'s offset, 32, moved on by one byte still ends inside the file.
    let descriptor = |name_len: usize| 8 + name_len + 4 + 8 + 4 + 8;
    let second_end = 24 + (8 + 20 + 4 + 8 + 5) + descriptor(1) * 2;
    let mut v = w.to_bytes();
    let at = second_end - 8;
    assert_eq!(v[at..at + 8], 32u64.to_le_bytes());
    v[at..at + 8].copy_from_slice(&33u64.to_le_bytes());
    v.extend([0; 32]);
    std::fs::write(&path, &v).unwrap();
    let m = one_line_error(&path);
    assert!(
        m.contains("tensor `b`") && m.contains("offset 33") && m.contains("alignment 32"),
        "{m}"
    );
}

#[test]
fn models_outside_the_family_and_short_vocabularies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("gpt2".into()));
    w.write(&path).unwrap();
    let m = one_line_error(&path);
    assert!(m.contains("architecture `gpt2`"), "{m}");
    // Nine tokens for an eight-row embedding.
    let tokens = MetaValue::Array((0..9).map(|i| MetaValue::Str(format!("t{i}"))).collect());
    tiny_llama(&[("tokenizer.ggml.tokens", tokens)])
        .write(&path)
        .unwrap();
    let m = one_line_error(&path);
    assert!(m.contains("9 tokens") && m.contains("8 rows"), "{m}");
    // A head count of 0 is named by its key.
    for key in [
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
    ] {
        tiny_llama(&[(key, MetaValue::U32(0))])
            .write(&path)
            .unwrap();
        let m = one_line_error(&path);
        assert!(m.contains(&format!("`{key}` is 0")), "{m}");
    }
}

#[test]
fn a_directory_with_two_gguf_files_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.gguf", "b.gguf"] {
        tiny_llama(&[]).write(&dir.path().join(name)).unwrap();
    }
    let m = ModelConfig::from_path(dir.path()).unwrap_err().to_string();
    assert!(m.contains("a.gguf, b.gguf"), "{m}");
}

/// Quantize then dequantize normal-looking rows: each value within the type's step (half a
/// code at the block's scale, plus the f16 rounding of the scale), and a zero block stays
/// zero. Also pins ggml's reference codes for Q8_0 and Q4_0 on one hand-made block.
#[test]
fn quantizers_round_trip_within_their_step() {
    use super::quantize::quantize;
    let mut r = Lcg(7);
    let values: Vec<f32> = (0..2048)
        .map(|i| {
            let u = (r.below(20001) as f32 - 10000.0) / 10000.0;
            u * u * u * if i % 97 == 0 { 3.0 } else { 1.0 }
        })
        .collect();
    // The largest error each type allows, as a share of the block's largest magnitude:
    // half a step for round-to-nearest types; a whole step for ggml's Q4_0/Q5_0, which clamp
    // the extreme of the other sign; a step of the block's range for the K-quants, whose
    // minimum is rounded up onto its grid.
    for (ty, share) in [
        (GgmlType::F16, 0.001),
        (GgmlType::BF16, 0.005),
        (GgmlType::Q8_0, 0.5 / 127.0),
        (GgmlType::Q5_0, 1.0 / 16.0),
        (GgmlType::Q4_0, 1.0 / 8.0),
        // Half a step of the block's range (at most twice its largest magnitude).
        (GgmlType::Q4_1, 1.0 / 15.0),
        (GgmlType::Q6K, 1.0 / 31.0),
        (GgmlType::Q4K, 2.0 / 15.0),
    ] {
        let bytes = quantize(ty, &values).unwrap();
        assert_eq!(
            bytes.len(),
            values.len() / ty.block_len() * ty.block_bytes()
        );
        let back = dequantize(ty, &bytes).unwrap();
        let bl = ty.block_len().max(32);
        for (b, (xs, ys)) in values.chunks(bl).zip(back.chunks(bl)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            // With room for the scale's own f16 and grid rounding.
            let tol = amax * share * 1.1 + 1e-6;
            for (x, y) in xs.iter().zip(ys) {
                assert!(
                    (x - y).abs() <= tol,
                    "{} block {b}: {x} -> {y} (tol {tol})",
                    ty.name()
                );
            }
        }
        let zeros = dequantize(ty, &quantize(ty, &vec![0.0; 256]).unwrap()).unwrap();
        assert!(zeros.iter().all(|&v| v == 0.0), "{}", ty.name());
    }
    // ggml's codes: Q8_0 rounds x·127/amax; Q4_0 scales by the signed extreme / −8.
    let block: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let q8 = quantize(GgmlType::Q8_0, &block).unwrap();
    assert_eq!(
        f16::from_le_bytes([q8[0], q8[1]]),
        f16::from_f32(16.0 / 127.0)
    );
    assert_eq!(q8[2] as i8, -127);
    assert_eq!(q8[2 + 17] as i8, (127.0f32 / 16.0).round() as i8);
    let q4 = quantize(GgmlType::Q4_0, &block).unwrap();
    assert_eq!(f16::from_le_bytes([q4[0], q4[1]]).to_f32(), 2.0);
    // −16 / 2 + 8.5 → 0 (low nibble of byte 0); value 16 (j = 0 + 16): 0/2 + 8.5 → 8.
    assert_eq!(q4[2], 8 << 4);
}

/// ggml's Q4_1 on a hand-made block: `d = (max − min)/15`, `m = min`, codes rounded; and
/// quantizing what a Q4_1 block decodes to gives the block back, byte for byte (so
/// `--type keep` rewrites an unchanged tensor exactly).
#[test]
fn q4_1_follows_ggml_and_requantizes_to_the_same_bytes() {
    use super::quantize::quantize;
    let x: Vec<f32> = (0..32).map(|i| -1.0 + i as f32 * 0.1).collect();
    let bytes = quantize(GgmlType::Q4_1, &x).unwrap();
    assert_eq!(bytes.len(), 20);
    let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    let m = half::f16::from_le_bytes([bytes[2], bytes[3]]).to_f32();
    assert_eq!(d, half::f16::from_f32(3.1 / 15.0).to_f32());
    assert_eq!(m, -1.0);
    // x[3] = −0.7: (−0.7 + 1)/d + 0.5 = 1.95 → 1; x[16] = 0.6: 7.74 + 0.5 → 8.
    assert_eq!(bytes[4 + 3] & 0xF, 1);
    assert_eq!(bytes[4] >> 4, 8);
    let back = dequantize(GgmlType::Q4_1, &bytes).unwrap();
    assert_eq!(quantize(GgmlType::Q4_1, &back).unwrap(), bytes);
}

/// Q4_K and Q6_K as ggml's reference quantizers write them: two hand-made super-blocks
/// (a signed wave, then an all-positive one, which exercises the minimums) against the bytes
/// `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` produced for the same f32 values
/// (transcribed from ggml-quants.c and built with `gcc -O2 -ffp-contract=off`).
#[test]
fn k_quants_match_ggmls_reference_quantizers_byte_for_byte() {
    let x: Vec<f32> = (0..512)
        .map(|i| {
            let f = i as f32;
            if i < 256 {
                (f * 0.37).sin() * 0.05 + (i % 7) as f32 * 0.003
            } else {
                0.2 + (f * 0.91).cos() * 0.1
            }
        })
        .collect();
    let hex = |parts: &[&str]| -> Vec<u8> {
        let h: String = parts.concat();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    let q4_k = hex(&[
        "51086b12f7fff8fcfafdfbfeb9cbf96436598c8eafcfdedac8b674523222102235284a7d9fbdddedcbb9a78561403001",
        "30210316385b8bbddecedddccab593723111121424476a6c9ebfdfecead89674b574523222102235285a7dafcdedfccb",
        "b9a78561403002041639698bbdbecedddeedecdab593722102030525487a7daecfeffcfae89674533220112306295c8e",
        "910d1003fffafaff3f0000000d0b090b9edaf6d5975b6e9deaf6d5875b6eadeaf6c5885c6eade9f6c5885c6ebde9f5c5",
        "e7d5975b5f8fcbe7c5875c5f8fcbe7c5885c5f9edae6c5885c6f9edae6b5785da66a5e8ecbf7e5a66a5e8edbf7d5976b",
        "5e9edaf6d5975b6e9edaf6d5875c6ead5e7fcdf8e5a66a5e8fccf8e5a76b5f8fdcf7d5976b5f9fdbf7d5975c6f9fdbf7",
    ]);
    let q6_k = hex(&[
        "a055dc3571b0d3531a1249ae2160e63f362be17780e746b95e161de434a71682fb21d686fc4581b013591c144bb133c2",
        "fd40675d039af3f049bc41080f364bb7135abf3170f64e654af07780c7177a00161ee646b82792daf07535cc2581e164",
        "4d0d044bbf41d02c8ea58c229ad4d11aa93f0800485ecc4ab50c210569eb4490baf9e4e4908040010102060a1b2f6f7e",
        "bafde9e4e490504040010506171b6b6f02060a1b2b6f7efaf9e9e4e4905040410101061b1b6b6faeaef9f9e4e0908040",
        "8b8c918596849c8e8a90809995859f8f1e0102591285010881125a1375001791235b03750f26a0335cf4650e25b0345d",
        "e4550e35c1455ee5440d44d1464fd5440c54e1564fc5330b53f15730b5230a62f158230a52f05730a522096101582195",
        "11087102591285010881125a1375001791235b03750f26a0335cf4650e25b0345de4550e35c1455ee5440d44d1464fd5",
        "440c10101141410404101011414104041010114140040410100141440404101001414144040010114141040410101141",
        "41040410101141410404101011414104041082838082878584858582838086878584f604",
    ]);
    assert_eq!(quantize::quantize(GgmlType::Q4K, &x).unwrap(), q4_k);
    assert_eq!(quantize::quantize(GgmlType::Q6K, &x).unwrap(), q6_k);
}
