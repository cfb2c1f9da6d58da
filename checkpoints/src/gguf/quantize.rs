//! Encoding f32 rows into ggml's types, for `hearth export gguf`. The legacy types (Q8_0,
//! Q4_0, Q5_0) follow ggml's reference quantizers exactly. The K-quants (Q4_K, Q6_K) use a
//! plain fit (each sub-block's range, then its scale rounded onto the super-block's 6- or
//! 8-bit grid), not llama.cpp's iterative search: the blocks are valid and decode the same
//! everywhere, with somewhat larger error than llama.cpp's own quantizer gives.

use half::{bf16, f16};

use super::quant::{GgmlType, QK_K};

/// `values` (whole rows of whole blocks) encoded as `ty`; `None` for a type hearth does not
/// write.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let bl = ty.block_len();
    if !values.len().is_multiple_of(bl) {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / bl * ty.block_bytes());
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => values.chunks_exact(32).for_each(|b| q8_0(b, &mut out)),
        GgmlType::Q4_0 => values.chunks_exact(32).for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q4_1 => values.chunks_exact(32).for_each(|b| q4_1(b, &mut out)),
        GgmlType::Q5_0 => values.chunks_exact(32).for_each(|b| q5_0(b, &mut out)),
        GgmlType::Q4K => values.chunks_exact(QK_K).for_each(|b| q4_k(b, &mut out)),
        GgmlType::Q6K => values.chunks_exact(QK_K).for_each(|b| q6_k(b, &mut out)),
        _ => return None,
    }
    Some(out)
}

/// The types [`quantize`] writes.
pub const WRITABLE: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// ggml's `quantize_row_q8_0_ref`: `d = max|x| / 127`, codes rounded.
fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// The value of largest magnitude, with its sign (ggml's legacy quantizers scale by it).
fn signed_max(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// ggml's `quantize_row_q4_0_ref`: `d = max / −8`, codes `min(15, x/d + 8.5)` truncated.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(x) / -8.0;
    let id = inverse(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out.push(lo | (hi << 4));
    }
}

/// ggml's `quantize_row_q4_1_ref`: `d = (max − min) / 15`, `m = min`, codes
/// `min(15, (x − min)/d + 0.5)` truncated.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::MAX, f32::min);
    let max = x.iter().copied().fold(f32::MIN, f32::max);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(f16::from_f32(min).to_le_bytes());
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        out.push(lo | (hi << 4));
    }
}

/// ggml's `quantize_row_q5_0_ref`: `d = max / −16`, 5-bit codes, fifth bits in `qh`.
fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(x) / -16.0;
    let id = inverse(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let lo = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let hi = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        qs[j] = (lo & 0xF) | ((hi & 0xF) << 4);
        qh |= (((lo >> 4) & 1) as u32) << j;
        qh |= (((hi >> 4) & 1) as u32) << (j + 16);
    }
    out.extend(qh.to_le_bytes());
    out.extend(qs);
}

/// Eight 6-bit scales and mins in 12 bytes, as llama.cpp's Q4_K/Q5_K pack them.
pub(crate) fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Q4_K: each 32-value sub-block is fitted as `scale · q − min` with `q` in 0..15 over its
/// range (its minimum clamped to ≤ 0, as llama.cpp does), then the eight scales and mins are
/// put on the super-block's 6-bit grids `d · ls` and `dmin · lm` (rounded up), and the codes recomputed
/// with the scales as stored.
fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (s, sub) in x.chunks_exact(32).enumerate() {
        let min = sub.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
        let max = sub.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        scales[s] = (max - min) / 15.0;
        mins[s] = -min;
    }
    let max_scale = scales.iter().fold(0.0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for s in 0..8 {
        // Rounded up, so a sub-block's codes cover its range without clamping.
        ls[s] = (scales[s] * inverse(df)).ceil().clamp(0.0, 63.0) as u8;
        lm[s] = (mins[s] * inverse(dminf)).ceil().clamp(0.0, 63.0) as u8;
    }
    let mut q = [0u8; QK_K];
    for (k, v) in x.iter().enumerate() {
        let s = k / 32;
        let scale = df * ls[s] as f32;
        let min = dminf * lm[s] as f32;
        q[k] = ((v + min) * inverse(scale)).round().clamp(0.0, 15.0) as u8;
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(pack_scale_min_k4(&ls, &lm));
    for p in 0..4 {
        for l in 0..32 {
            out.push((q[64 * p + l] & 0xF) | ((q[64 * p + 32 + l] & 0xF) << 4));
        }
    }
}

/// Q6_K: each 16-value sub-block gets the scale that maps its largest magnitude to 31
/// (codes −32..31), put on the super-block's signed 8-bit grid `d · sc`.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0.0f32; 16];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        scales[s] = sub.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 31.0;
    }
    let max_scale = scales.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_scale / 127.0);
    let df = d.to_f32();
    let sc: Vec<i8> = scales
        .iter()
        .map(|s| (s * inverse(df)).ceil().clamp(0.0, 127.0) as i8)
        .collect();
    let mut l = [0u8; QK_K];
    for (k, v) in x.iter().enumerate() {
        let scale = df * sc[k / 16] as f32;
        l[k] = ((v * inverse(scale)).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let j = half * 128;
        for i in 0..32 {
            ql[half * 64 + i] = (l[j + i] & 0xF) | ((l[j + i + 64] & 0xF) << 4);
            ql[half * 64 + i + 32] = (l[j + i + 32] & 0xF) | ((l[j + i + 96] & 0xF) << 4);
            qh[half * 32 + i] = (l[j + i] >> 4)
                | ((l[j + i + 32] >> 4) << 2)
                | ((l[j + i + 64] >> 4) << 4)
                | ((l[j + i + 96] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(d.to_le_bytes());
}
