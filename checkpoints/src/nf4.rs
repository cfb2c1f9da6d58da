//! NF4, bitsandbytes' 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): blocks of 64
//! values, each stored as the index of the nearest of 16 code values after dividing by the
//! block's absolute maximum; with double quantization, the blocks' absmax values (less
//! their mean) are themselves quantized blockwise, 256 at a time, to 8 bits with
//! bitsandbytes' signed dynamic map. This is the format's arithmetic on the host — the
//! code tables, quantizing, dequantizing — as bitsandbytes defines it; the fused
//! dequantizing matmul that reads it is `kernels::quant_matmul`.

/// Values per NF4 block.
pub const BLOCK: usize = 64;
/// Block absmax values per block of the second (double) quantization.
pub const NESTED_BLOCK: usize = 256;

/// The 16 NF4 code values: quantiles of N(0, 1) scaled to [−1, 1], with an exact zero
/// (bitsandbytes `get_4bit_type("nf4")`), written as bitsandbytes lists them: each is an
/// f32 printed in full, so the literal's extra digits name the same f32.
#[allow(clippy::excessive_precision)]
pub const CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), which
/// double quantization uses for the block absmax values: for each decade
/// `10^(i−6)`, `i` in 0..7, the midpoints of `2^i + 1` points evenly spaced over
/// [0.1, 1], scaled by the decade, with both signs; then 0 and 1. Sorted, 256 values.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let points = (1usize << i) + 1;
        let bounds = linspace(0.1, 1.0, points);
        let decade = 10f64.powi(i - 6) as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| decade * m));
        data.extend(means.iter().map(|m| -decade * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `steps` points from `start` to `end` in f32, computed as torch's CPU `linspace` does
/// (from the start for the first half, from the end for the second), so the dynamic map
/// has bitsandbytes' bits.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// The index of the entry of sorted `code` nearest to `x` (the lower on a tie).
fn nearest(code: &[f32], x: f32) -> u8 {
    let above = code.partition_point(|&c| c < x);
    let idx = match above {
        0 => 0,
        n if n == code.len() => n - 1,
        n => {
            if (code[n] - x) < (x - code[n - 1]) {
                n
            } else {
                n - 1
            }
        }
    };
    idx as u8
}

/// Blockwise quantization of `values` to `code` in blocks of `block`: per block, its
/// absolute maximum and each value's nearest code index after scaling by its reciprocal
/// (as bitsandbytes' kernel scales). An all-zero block has absmax 0 and codes for 0.
fn blockwise(values: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for b in values.chunks(block) {
        let m = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
        codes.extend(b.iter().map(|&x| nearest(code, x * inv)));
        absmax.push(m);
    }
    (codes, absmax)
}

/// A tensor in NF4 with double-quantized block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// One NF4 code index (0..16) per value.
    pub codes: Vec<u8>,
    /// Per 64-value block: its absmax, less `offset`, as an index into [`dynamic_map`].
    pub absmax_codes: Vec<u8>,
    /// Per 256 blocks: the absmax of their (absmax − offset) values.
    pub absmax_scales: Vec<f32>,
    /// The mean of every block's absmax.
    pub offset: f32,
}

/// Quantizes `values` (a whole number of 64-value blocks) to NF4 with double quantization,
/// as bitsandbytes' `quantize_4bit(quant_type="nf4", compress_statistics=True)`.
pub fn quantize(values: &[f32]) -> Nf4 {
    debug_assert_eq!(values.len() % BLOCK, 0);
    let (codes, absmax) = blockwise(values, BLOCK, &CODE);
    let offset =
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (absmax_codes, absmax_scales) = blockwise(&centred, NESTED_BLOCK, &dynamic_map());
    Nf4 {
        codes,
        absmax_codes,
        absmax_scales,
        offset,
    }
}

impl Nf4 {
    /// Each block's absmax as dequantization recovers it:
    /// `map[code] · scale + offset`.
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.absmax_scales[i / NESTED_BLOCK] + self.offset)
            .collect()
    }

    /// Every value: `CODE[code] · absmax` of its block.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| CODE[c as usize] * absmax[i / BLOCK])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_map_holds_bitsandbytes_values() {
        let map = dynamic_map();
        assert_eq!(map.len(), 256);
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map[255], 1.0);
        // The largest decade's 64 midpoints end at (0.9859375 + 1) / 2 = 0.99296875.
        assert!((map[254] - 0.992_968_75).abs() < 1e-7, "{}", map[254]);
        assert_eq!(map[0], -map[254]);
        assert!(map.contains(&0.0));
        // The smallest magnitudes: the 10⁻⁶ decade's one midpoint, 0.55e−6, both signs.
        let tiny = map.iter().filter(|x| x.abs() < 1e-5 && **x != 0.0).count();
        assert_eq!(tiny, 2 + 4);
        assert!(map.iter().any(|&x| (x - 0.55e-6).abs() < 1e-12));
    }

    #[test]
    fn codes_are_the_nearest_nf4_value_of_the_scaled_input() {
        // One block: absmax 2, so x / 2 lands on or between code values.
        let mut block = vec![0f32; BLOCK];
        block[0] = 2.0;
        block[1] = -2.0;
        block[2] = 0.0;
        block[3] = 2.0 * 0.5626; // just above code 13
        block[4] = 2.0 * 0.64; // nearer 0.5626 than 0.7230 (midpoint 0.6428)
        block[5] = 2.0 * 0.645; // past the midpoint: 0.7230
        block[6] = -2.0 * 0.04; // nearer 0 than −0.0911
        block[7] = -2.0 * 0.05; // nearer −0.0911
        let q = quantize(&block);
        assert_eq!(&q.codes[..8], &[15, 0, 7, 13, 13, 14, 7, 6]);
    }

    #[test]
    fn double_quantized_absmax_is_map_times_scale_plus_the_mean() {
        // Three blocks with absmax 1, 3 and 8: mean 4, centred −3, −1, 4, second-level
        // scale 4, so normalised −0.75, −0.25, 1.
        let mut v = vec![0f32; 3 * BLOCK];
        v[0] = 1.0;
        v[BLOCK] = -3.0;
        v[2 * BLOCK + 5] = 8.0;
        let q = quantize(&v);
        assert_eq!(q.offset, 4.0);
        assert_eq!(q.absmax_scales, vec![4.0]);
        let map = dynamic_map();
        for (code, want) in q.absmax_codes.iter().zip([-0.75f32, -0.25, 1.0]) {
            let got = map[*code as usize];
            // The nearest map entry: no other entry is closer.
            assert!(map.iter().all(|m| (m - want).abs() >= (got - want).abs()));
        }
        let absmax = q.absmax();
        for (got, want) in absmax.iter().zip([1.0f32, 3.0, 8.0]) {
            assert!((got - want).abs() < 0.04 * 4.0, "{got} vs {want}");
        }
        assert_eq!(
            absmax[2], 8.0,
            "1 is on the map: the largest block is exact"
        );
        let back = q.dequantize();
        assert_eq!(back[2 * BLOCK + 5], 8.0);
        assert_eq!(back[1], 0.0);
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_the_widest_code_gap() {
        let values: Vec<f32> = (0..BLOCK * 512)
            .map(|i| ((i as f32 * 0.618).sin() * 3.0) * (1.0 + (i % 7) as f32))
            .collect();
        let q = quantize(&values);
        assert_eq!(q.absmax_scales.len(), 2);
        let back = q.dequantize();
        let absmax = q.absmax();
        let widest = CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
        for (i, (x, y)) in values.iter().zip(&back).enumerate() {
            let m = absmax[i / BLOCK];
            // Half a code gap of the block's scale, plus what the scale itself lost.
            let true_max = values[i / BLOCK * BLOCK..][..BLOCK]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            let bound = widest / 2.0 * m + (m - true_max).abs() + 1e-5;
            assert!((x - y).abs() <= bound, "{i}: {x} vs {y} (bound {bound})");
        }
    }
}
