//! Few-row products against a transposed weight, without OpenBLAS: one dot product per
//! output, each weight row streamed once for all the rows.
//!
//! Why: decoding multiplies a handful of rows by every weight, `x·Wᵀ` with `W` row-major,
//! so each output is a dot product of two contiguous slices. `gemm`, the fallback where
//! OpenBLAS is not installed, packs the weight slice before every such product: at batch 8
//! that copy was 55–60 % of a decoding profile (BENCHMARKS.md). Here each weight row is read
//! once for all the rows, which stay in cache, and nothing is copied.
//!
//! Bits: each dot product sums 16 interleaved lanes (element `p` into lane `p mod 16`),
//! then the lanes pairwise in a fixed tree, then the tail; plain multiplies and adds (no
//! fused multiply-add), so the AVX2 build of the loop and the portable one give the same
//! bits, which depend only on `k`, not on the rows computed beside it.

use super::Mat;

/// Rows of `lhs` at most this many take the dot-product path: past it, `gemm`'s packing is
/// shared by enough rows to pay for itself.
pub(crate) const DOT_MAX_ROWS: usize = 16;

/// Lanes of each dot product's partial sums.
const LANES: usize = 16;

/// Whether `lhs·rhs` suits [`dots_into`]: few rows, each row of `lhs` and each column of
/// `rhs` contiguous (`rhs` is a row-major weight seen transposed).
pub(crate) fn suits(lhs: &Mat<'_>, rhs: &Mat<'_>) -> bool {
    lhs.rows <= DOT_MAX_ROWS && (lhs.cs == 1 || lhs.cols <= 1) && (rhs.rs == 1 || rhs.rows <= 1)
}

/// `dst = (accumulate ? dst : 0) + scale · lhs·rhs`, `dst` row-major with rows `ld` apart,
/// for operands that [`suits`] accepts and that lie inside their slices.
///
/// Each column of `rhs` (a weight row, read once into cache) goes against four rows of
/// `lhs` at a time, which share each load of it and keep eight independent sums in
/// flight, then against the rows left one by one. Every row's sum is the same as alone.
pub(crate) fn dots_into(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: &Mat<'_>,
    rhs: &Mat<'_>,
    scale: f32,
) {
    let avx2 = has_avx2();
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let row = |i: usize| &lhs.data[lhs.start + i * lhs.rs..][..k];
    let mut put = |i: usize, j: usize, v: f32| {
        let out = &mut dst[i * ld + j];
        *out = if accumulate {
            *out + scale * v
        } else {
            scale * v
        };
    };
    for j in 0..n {
        let w = &rhs.data[rhs.start + j * rhs.cs..][..k];
        let mut i = 0;
        while i + 4 <= m {
            let sums = rows(avx2, [row(i), row(i + 1), row(i + 2), row(i + 3)], w);
            sums.iter().enumerate().for_each(|(r, &v)| put(i + r, j, v));
            i += 4;
        }
        for i in i..m {
            put(i, j, rows(avx2, [row(i)], w)[0]);
        }
    }
}

/// Whether this CPU runs [`avx2::dot_rows`].
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[allow(unreachable_code)]
    false
}

/// [`avx2::dot_rows`] where `avx2` (from [`has_avx2`]), else [`dot_rows`]: the same bits.
#[inline(always)]
fn rows<const R: usize>(avx2: bool, xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` comes from `has_avx2`: the CPU has AVX2.
        return unsafe { avx2::dot_rows(xs, w) };
    }
    let _ = avx2;
    dot_rows(xs, w)
}

/// The dot products of `R` rows with `w`, each summed in [`LANES`] interleaved lanes
/// (element `p` into lane `p mod 16`), then the lanes pairwise (`l + 8` into `l`, then
/// `l + 4`, `l + 2`, `l + 1`), then the tail in order: the definition [`avx2::dot_rows`]
/// computes with vectors.
fn dot_rows<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    let whole = w.len() / LANES * LANES;
    let mut acc = [[0f32; LANES]; R];
    for c in (0..whole).step_by(LANES) {
        for (a, x) in acc.iter_mut().zip(&xs) {
            for l in 0..LANES {
                a[l] += x[c + l] * w[c + l];
            }
        }
    }
    let mut out = [0f32; R];
    for ((o, a), x) in out.iter_mut().zip(&mut acc).zip(&xs) {
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                a[l] += a[l + width];
            }
            width /= 2;
        }
        *o = a[0] + tail(&x[whole..], &w[whole..]);
    }
    out
}

/// The last `k mod 16` products, summed in order.
#[inline(always)]
fn tail(x: &[f32], w: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (p, q) in x.iter().zip(w) {
        sum += p * q;
    }
    sum
}

/// [`dot_rows`] with AVX2 vectors: lanes 0–7 and 8–15 in two registers per row, multiplied
/// and added separately (no fused multiply-add), reduced in the same tree.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LANES, tail};

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_rows<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
        const { assert!(R >= 1 && R <= 4, "one to four rows at a time") };
        let whole = w.len() / LANES * LANES;
        // Named accumulators (rows 0–3, lanes 0–7 and 8–15), so they stay in registers;
        // rows past `R` are never read.
        let z = _mm256_setzero_ps();
        let (mut a0, mut b0, mut a1, mut b1, mut a2, mut b2, mut a3, mut b3) =
            (z, z, z, z, z, z, z, z);
        let (p0, p1, p2, p3) = (
            xs[0].as_ptr(),
            xs[1.min(R - 1)].as_ptr(),
            xs[2.min(R - 1)].as_ptr(),
            xs[3.min(R - 1)].as_ptr(),
        );
        let mut c = 0;
        while c < whole {
            // SAFETY: `c + 16 <= whole <= len` for `w` and for every row (each has `w`'s
            // length); unaligned loads.
            unsafe {
                let w0 = _mm256_loadu_ps(w.as_ptr().wrapping_add(c));
                let w1 = _mm256_loadu_ps(w.as_ptr().wrapping_add(c + 8));
                // A macro, not a closure: a closure would not inherit AVX2 and would take
                // its vectors through memory.
                macro_rules! step {
                    ($acc:ident, $x:expr, $wv:expr) => {
                        $acc = _mm256_add_ps($acc, _mm256_mul_ps(_mm256_loadu_ps($x), $wv))
                    };
                }
                step!(a0, p0.wrapping_add(c), w0);
                step!(b0, p0.wrapping_add(c + 8), w1);
                if R > 1 {
                    step!(a1, p1.wrapping_add(c), w0);
                    step!(b1, p1.wrapping_add(c + 8), w1);
                }
                if R > 2 {
                    step!(a2, p2.wrapping_add(c), w0);
                    step!(b2, p2.wrapping_add(c + 8), w1);
                }
                if R > 3 {
                    step!(a3, p3.wrapping_add(c), w0);
                    step!(b3, p3.wrapping_add(c + 8), w1);
                }
            }
            c += LANES;
        }
        let sums = [(a0, b0), (a1, b1), (a2, b2), (a3, b3)];
        let mut out = [0f32; R];
        for (r, o) in out.iter_mut().enumerate() {
            let (a, b) = sums[r];
            let s = _mm256_add_ps(a, b);
            let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
            *o = _mm_cvtss_f32(q) + tail(&xs[r][whole..], &w[whole..]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), shared with the selftest.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        crate::selftest::values(n, seed as u64)
    }

    /// Against the product in f64, for `k` below, at and past the lanes, a padded `ld`, an
    /// offset start, accumulation and a scale: `x·Wᵀ` with `W` row-major, as decoding has it.
    #[test]
    fn dot_products_match_the_math() {
        for (m, k, n) in [
            (1, 5, 3),
            (3, 16, 7),
            (8, 37, 11),
            (16, 576, 9),
            (2, 1536, 4),
        ] {
            let (x, w) = (values(m * k + 3, 1), values(n * k + 5, 2));
            let lhs = Mat::rows(&x, 3, m, k, k);
            let rhs = Mat::rows(&w, 5, n, k, k).t();
            assert!(suits(&lhs, &rhs));
            let ld = n + 2;
            for accumulate in [false, true] {
                let start = values(m * ld, 3);
                let mut dst = start.clone();
                dots_into(&mut dst, ld, accumulate, &lhs, &rhs, 0.5);
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|p| x[3 + i * k + p] as f64 * w[5 + j * k + p] as f64)
                            .sum::<f64>()
                            * 0.5
                            + if accumulate {
                                start[i * ld + j] as f64
                            } else {
                                0.0
                            };
                        let got = dst[i * ld + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                            "[{m}, {k}, {n}] ({i}, {j}) accumulate {accumulate}: {got} vs {exact}"
                        );
                    }
                    // The padding between rows is untouched.
                    assert_eq!(dst[i * ld + n..i * ld + ld], start[i * ld + n..i * ld + ld]);
                }
            }
        }
    }

    /// The AVX2 build and the portable loop give the same bits, for four rows and for one,
    /// with a tail past the last 16 lanes.
    #[test]
    fn every_build_of_the_loop_gives_the_same_bits() {
        if !has_avx2() {
            eprintln!("no AVX2 on this CPU: only the portable loop runs here");
            return;
        }
        let k = 1000;
        let x = values(4 * k, 4);
        let xs: [&[f32]; 4] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
        for seed in [5, 6] {
            let w = values(k, seed);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&rows(true, xs, &w)), bits(&rows(false, xs, &w)));
            assert_eq!(
                bits(&rows(true, [xs[1]], &w)),
                bits(&rows(false, [xs[1]], &w))
            );
        }
    }

    /// A row's bits do not depend on how many rows are computed beside it (rows go four
    /// at a time, then one by one): a decoding step gives each sequence the same values
    /// whatever the batch.
    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        let (m, k, n) = (7, 333, 5);
        let (x, w) = (values(m * k, 6), values(n * k, 7));
        let rhs = Mat::rows(&w, 0, n, k, k).t();
        let mut all = vec![0f32; m * n];
        dots_into(&mut all, n, false, &Mat::rows(&x, 0, m, k, k), &rhs, 1.0);
        for i in 0..m {
            let mut alone = vec![0f32; n];
            dots_into(
                &mut alone,
                n,
                false,
                &Mat::rows(&x, i * k, 1, k, k),
                &rhs,
                1.0,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&all[i * n..(i + 1) * n]), bits(&alone), "row {i}");
        }
    }

    /// Many rows, or a weight whose rows are not contiguous, stay with `gemm`.
    #[test]
    fn only_few_contiguous_rows_take_the_dots() {
        let (x, w) = (values(64 * 8, 1), values(8 * 8, 2));
        let rhs = Mat::rows(&w, 0, 8, 8, 8).t();
        assert!(suits(&Mat::rows(&x, 0, DOT_MAX_ROWS, 8, 8), &rhs));
        assert!(!suits(&Mat::rows(&x, 0, DOT_MAX_ROWS + 1, 8, 8), &rhs));
        assert!(!suits(
            &Mat::rows(&x, 0, 4, 8, 8),
            &Mat::rows(&w, 0, 8, 8, 8)
        ));
        assert!(!suits(&Mat::rows(&x, 0, 4, 8, 8).t(), &rhs));
    }
}
