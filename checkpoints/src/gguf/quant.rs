//! ggml's tensor types and their dequantization to f32, following ggml's reference C
//! (`dequantize_row_*` in ggml-quants.c): each block's scale (and minimum) is an f16 widened
//! to f32, and every value is computed in f32 in the same order, so the results equal
//! llama.cpp's and the `gguf` Python package's bit for bit.

use half::{bf16, f16};

/// The ggml tensor types hearth knows by name. Only some can be dequantized
/// ([`GgmlType::can_dequantize`]); the others are named in the error that refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
}

/// Values in one K-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// `(type, id, name, values per block, bytes per block)`, as in ggml.h and ggml.c.
    const TABLE: [(GgmlType, u32, &'static str, usize, usize); 31] = [
        (Self::F32, 0, "F32", 1, 4),
        (Self::F16, 1, "F16", 1, 2),
        (Self::Q4_0, 2, "Q4_0", 32, 18),
        (Self::Q4_1, 3, "Q4_1", 32, 20),
        (Self::Q5_0, 6, "Q5_0", 32, 22),
        (Self::Q5_1, 7, "Q5_1", 32, 24),
        (Self::Q8_0, 8, "Q8_0", 32, 34),
        (Self::Q8_1, 9, "Q8_1", 32, 36),
        (Self::Q2K, 10, "Q2_K", QK_K, 84),
        (Self::Q3K, 11, "Q3_K", QK_K, 110),
        (Self::Q4K, 12, "Q4_K", QK_K, 144),
        (Self::Q5K, 13, "Q5_K", QK_K, 176),
        (Self::Q6K, 14, "Q6_K", QK_K, 210),
        (Self::Q8K, 15, "Q8_K", QK_K, 292),
        (Self::Iq2Xxs, 16, "IQ2_XXS", QK_K, 66),
        (Self::Iq2Xs, 17, "IQ2_XS", QK_K, 74),
        (Self::Iq3Xxs, 18, "IQ3_XXS", QK_K, 98),
        (Self::Iq1S, 19, "IQ1_S", QK_K, 50),
        (Self::Iq4Nl, 20, "IQ4_NL", 32, 18),
        (Self::Iq3S, 21, "IQ3_S", QK_K, 110),
        (Self::Iq2S, 22, "IQ2_S", QK_K, 82),
        (Self::Iq4Xs, 23, "IQ4_XS", QK_K, 136),
        (Self::I8, 24, "I8", 1, 1),
        (Self::I16, 25, "I16", 1, 2),
        (Self::I32, 26, "I32", 1, 4),
        (Self::I64, 27, "I64", 1, 8),
        (Self::F64, 28, "F64", 1, 8),
        (Self::Iq1M, 29, "IQ1_M", QK_K, 56),
        (Self::BF16, 30, "BF16", 1, 2),
        (Self::Tq1_0, 34, "TQ1_0", QK_K, 54),
        (Self::Tq2_0, 35, "TQ2_0", QK_K, 66),
    ];

    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        Self::TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every type is in the table")
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    pub fn id(self) -> u32 {
        self.row().1
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Values per block (1 for plain types).
    pub fn block_len(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.row().4
    }

    /// The types [`dequantize`] reads.
    pub const READABLE: [GgmlType; 11] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    pub fn can_dequantize(self) -> bool {
        Self::READABLE.contains(&self)
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The values of `bytes`, whole blocks of type `ty`, widened to f32. `None` for a type
/// hearth cannot dequantize or bytes that are not whole blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let bb = ty.block_bytes();
    if !ty.can_dequantize() || !bytes.len().is_multiple_of(bb) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / bb * ty.block_len());
    for block in bytes.chunks_exact(bb) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([block[0], block[1], block[2], block[3]])),
            GgmlType::F16 => out.push(half_at(block, 0)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
            GgmlType::Q8_0 => q8_0(block, &mut out),
            GgmlType::Q4_0 => q4_0(block, &mut out),
            GgmlType::Q4_1 => q4_1(block, &mut out),
            GgmlType::Q5_0 => q5_0(block, &mut out),
            GgmlType::Q5_1 => q5_1(block, &mut out),
            GgmlType::Q4K => q4_k(block, &mut out),
            GgmlType::Q5K => q5_k(block, &mut out),
            GgmlType::Q6K => q6_k(block, &mut out),
            _ => return None,
        }
    }
    Some(out)
}

/// `d: f16, qs: [i8; 32]`: `d · q`.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// `d: f16, qs: [u8; 16]`, low nibbles first: `d · (q − 8)`.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// `d: f16, m: f16, qs: [u8; 16]`: `d · q + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// The 5-bit values of a Q5 block: nibbles from `qs`, fifth bits from the u32 `qh`.
fn five_bits(qh: u32, qs: &[u8]) -> [i32; 32] {
    let mut q = [0; 32];
    for j in 0..16 {
        let high_lo = ((qh >> j) & 1) << 4;
        let high_hi = ((qh >> (j + 16)) & 1) << 4;
        q[j] = ((qs[j] & 0xF) as u32 | high_lo) as i32;
        q[j + 16] = ((qs[j] >> 4) as u32 | high_hi) as i32;
    }
    q
}

/// `d: f16, qh: u32, qs: [u8; 16]`: `d · (q − 16)`.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    out.extend(
        five_bits(qh, &b[6..22])
            .iter()
            .map(|&q| (q - 16) as f32 * d),
    );
}

/// `d: f16, m: f16, qh: u32, qs: [u8; 16]`: `d · q + m`.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    out.extend(five_bits(qh, &b[8..24]).iter().map(|&q| q as f32 * d + m));
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed
/// into 12 bytes as ggml's `get_scale_min_k4`.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight sub-blocks of 32, each
/// `d · sc · q − dmin · m`.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for pair in 0..4 {
        let q = &qs[pair * 32..pair * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        out.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - m1));
        out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - m2));
    }
}

/// `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: as Q4_K with a fifth bit
/// per value from `qh` (bit `2·pair` for the low nibbles, `2·pair + 1` for the high).
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for pair in 0..4 {
        let ql = &qs[pair * 32..pair * 32 + 32];
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let high = if qh[l] & u1 != 0 { 16 } else { 0 };
            out.push(d1 * ((ql[l] & 0xF) + high) as f32 - m1);
        }
        for l in 0..32 {
            let high = if qh[l] & u2 != 0 { 16 } else { 0 };
            out.push(d2 * ((ql[l] >> 4) + high) as f32 - m2);
        }
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen sub-blocks of 16, each
/// `d · sc · (q − 32)` with 6-bit `q` from a nibble of `ql` and two bits of `qh`.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[is + k] as i8 as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

/// A quantized tensor taken apart the way a blockwise matmul reads it: one code index per
/// value, and per block of `block` consecutive values a scale and, for the types with a
/// minimum (Q4_1, Q5_1, Q4_K, Q5_K), an offset, so that
/// `value = table[code] · scale + offset` — the same products and sums ggml's
/// `dequantize_row_*` computes, so the values are the file's bit for bit. K-quants'
/// sub-block scales (`d · sc`, `dmin · m`) are expanded to one f32 per sub-block; 5- and
/// 6-bit codes take a byte each.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offsets: Option<Vec<f32>>,
    /// Values per scale: 32 (Q4_0 … Q8_0, Q4_K and Q5_K sub-blocks), 16 (Q6_K sub-blocks).
    pub block: usize,
    /// Bits per code index as stored: 4 or 8.
    pub bits: u32,
    /// `2^bits` entries: the value of each code before its scale.
    pub table: Vec<f32>,
}

impl Blocks {
    /// Every value, in order.
    pub fn values(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let b = i / self.block;
                let v = self.table[c as usize] * self.scales[b];
                match &self.offsets {
                    Some(o) => v + o[b],
                    None => v,
                }
            })
            .collect()
    }
}

/// `bytes` (whole blocks of `ty`) as [`Blocks`]. `None` for plain float types and the
/// types hearth cannot read.
pub fn blocks(ty: GgmlType, bytes: &[u8]) -> Option<Blocks> {
    let bb = ty.block_bytes();
    let (block, bits, table, has_offsets): (usize, u32, Vec<f32>, bool) = match ty {
        GgmlType::Q8_0 => (
            32,
            8,
            (0..=255u8).map(|b| f32::from(b as i8)).collect(),
            false,
        ),
        GgmlType::Q4_0 => (32, 4, (0..16).map(|q| (q - 8) as f32).collect(), false),
        GgmlType::Q4_1 | GgmlType::Q4K => (32, 4, (0..16).map(|q| q as f32).collect(), true),
        GgmlType::Q5_0 => (32, 8, (0..256).map(|q| (q - 16) as f32).collect(), false),
        GgmlType::Q5_1 | GgmlType::Q5K => (32, 8, (0..256).map(|q| q as f32).collect(), true),
        GgmlType::Q6K => (16, 8, (0..256).map(|q| (q - 32) as f32).collect(), false),
        _ => return None,
    };
    if !bytes.len().is_multiple_of(bb) {
        return None;
    }
    let n = bytes.len() / bb * ty.block_len();
    let mut out = Blocks {
        codes: Vec::with_capacity(n),
        scales: Vec::with_capacity(n / block),
        offsets: has_offsets.then(|| Vec::with_capacity(n / block)),
        block,
        bits,
        table,
    };
    for b in bytes.chunks_exact(bb) {
        split_block(ty, b, &mut out);
    }
    Some(out)
}

/// Appends one block of `ty` to `out` (see [`blocks`] for the layouts, and each type's
/// `dequantize` twin above for its formula).
fn split_block(ty: GgmlType, b: &[u8], out: &mut Blocks) {
    let mut push = |scale: f32, offset: Option<f32>| {
        out.scales.push(scale);
        if let (Some(o), Some(v)) = (out.offsets.as_mut(), offset) {
            o.push(v);
        }
    };
    match ty {
        GgmlType::Q8_0 => {
            push(half_at(b, 0), None);
            out.codes.extend_from_slice(&b[2..34]);
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (offset, qs) = match ty {
                GgmlType::Q4_0 => (None, &b[2..18]),
                _ => (Some(half_at(b, 2)), &b[4..20]),
            };
            push(half_at(b, 0), offset);
            out.codes.extend(qs.iter().map(|q| q & 0xF));
            out.codes.extend(qs.iter().map(|q| q >> 4));
        }
        GgmlType::Q5_0 => {
            push(half_at(b, 0), None);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            out.codes
                .extend(five_bits(qh, &b[6..22]).iter().map(|&q| q as u8));
        }
        GgmlType::Q5_1 => {
            push(half_at(b, 0), Some(half_at(b, 2)));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            out.codes
                .extend(five_bits(qh, &b[8..24]).iter().map(|&q| q as u8));
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = match ty {
                GgmlType::Q4K => (None, &b[16..144]),
                _ => (Some(&b[16..48]), &b[48..176]),
            };
            for pair in 0..4 {
                let q = &qs[pair * 32..pair * 32 + 32];
                for (half, shift) in [(0, 0), (1, 4)] {
                    let (sc, m) = scale_min_k4(2 * pair + half, scales);
                    push(d * sc as f32, Some(-(dmin * m as f32)));
                    let bit = 1u8 << (2 * pair + half);
                    out.codes.extend(q.iter().enumerate().map(|(l, &v)| {
                        let high = qh.map_or(0, |h| if h[l] & bit != 0 { 16 } else { 0 });
                        ((v >> shift) & 0xF) + high
                    }));
                }
            }
        }
        GgmlType::Q6K => {
            let d = half_at(b, 208);
            let mut codes = [0u8; QK_K];
            for half in 0..2 {
                let ql = &b[half * 64..half * 64 + 64];
                let qh = &b[128 + half * 32..128 + half * 32 + 32];
                let y = &mut codes[half * 128..half * 128 + 128];
                for l in 0..32 {
                    y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            // Sub-block j (16 values) of half h has scale sc[8h + j]: values 16j.. of the
            // half, as `is + 2k` indexes them above.
            for half in 0..2 {
                for j in 0..8 {
                    push(d * b[192 + half * 8 + j] as i8 as f32, None);
                }
            }
            out.codes.extend_from_slice(&codes);
        }
        _ => unreachable!("blocks() admits only the types above"),
    }
}
