//! f32 matrix products on the CPU through OpenBLAS when the machine has it, through the
//! `gemm` crate otherwise.
//!
//! Why: on the AVX-512 machine of BENCHMARKS.md, `gemm` 0.19 ran the training step's
//! products at about 95 GF/s on 2 cores, and Debian's OpenBLAS 0.3.21 at 200–300 GF/s
//! (PyTorch's own matmul at 200–310). The step is matmul-bound, so this is most of the gap.
//!
//! The library is opened at run time (`libopenblas.so.0`, Debian's `libopenblas0`), not
//! linked: the binary still starts, and computes the same products through `gemm`, on a
//! machine without it (the GPU kit, a bare container), and `HEARTH_BLAS=off` turns it off.
//! OpenBLAS runs single-threaded; the threads split the output between them (its rows, or
//! a few rows' columns), each part one call, so a product's bits depend only on its shape
//! and the thread count.

use std::ffi::c_int;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::Mat;

/// `cblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The library names tried, in order: Debian's runtime package, then a plain install.
const NAMES: [&str; 2] = ["libopenblas.so.0", "libopenblas.so"];

struct OpenBlas {
    sgemm: Sgemm,
    /// Keeps the library mapped for the process's life.
    _lib: libloading::Library,
}

static LIBRARY: OnceLock<Option<OpenBlas>> = OnceLock::new();

fn open() -> Option<OpenBlas> {
    if std::env::var("HEARTH_BLAS").is_ok_and(|v| v == "off" || v == "0") {
        return None;
    }
    NAMES.iter().find_map(|name| {
        // SAFETY: OpenBLAS's initialisers only set up its own state; the two symbols
        // below have the C signatures declared here in every OpenBLAS release.
        unsafe {
            let lib = libloading::Library::new(name).ok()?;
            let sgemm: Sgemm = *lib.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
            let threads = *lib
                .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
                .ok()?;
            // One thread per call: hearth's threads split the work (see the module doc).
            threads(1);
            Some(OpenBlas { sgemm, _lib: lib })
        }
    })
}

fn library() -> Option<&'static OpenBlas> {
    LIBRARY.get_or_init(open).as_ref()
}

/// Whether products run through OpenBLAS (for the run's log and the benches).
pub fn available() -> bool {
    library().is_some()
}

/// A matrix as BLAS takes it: `(transposed, leading dimension)`, or `None` when neither
/// of its strides is 1.
fn blas_layout(m: &Mat<'_>) -> Option<(c_int, usize)> {
    if m.cs == 1 && (m.rows <= 1 || m.rs >= m.cols) {
        Some((NO_TRANS, m.rs.max(m.cols).max(1)))
    } else if m.rs == 1 && (m.cols <= 1 || m.cs >= m.rows) {
        Some((TRANS, m.cs.max(m.rows).max(1)))
    } else {
        None
    }
}

/// `dst = (accumulate ? dst : 0) + scale·lhs·rhs` on the calling thread through OpenBLAS;
/// `false` when it cannot (no library, a stride BLAS cannot express, a size past `int`).
/// The operands' bounds are checked by the caller.
pub(crate) fn sgemm(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: &Mat<'_>,
    rhs: &Mat<'_>,
    scale: f32,
) -> bool {
    let Some(lib) = library() else {
        return false;
    };
    let (Some((ta, lda)), Some((tb, ldb))) = (blas_layout(lhs), blas_layout(rhs)) else {
        return false;
    };
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let int = |x: usize| c_int::try_from(x).ok();
    let (Some(m), Some(n), Some(k), Some(lda), Some(ldb), Some(ldc)) =
        (int(m), int(n), int(k), int(lda), int(ldb), int(ld.max(n)))
    else {
        return false;
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller checked that every element of both operands and of the
    // destination lies inside its slice; `dst` is borrowed mutably.
    unsafe {
        (lib.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            m,
            n,
            k,
            scale,
            lhs.data.as_ptr().add(lhs.start),
            lda,
            rhs.data.as_ptr().add(rhs.start),
            ldb,
            beta,
            dst.as_mut_ptr(),
            ldc,
        );
    }
    true
}

/// Rows from which a product splits its rows over the threads; fewer rows (a decoding
/// step's batch) split the columns instead.
const SPLIT_MIN_ROWS: usize = 64;

/// Below this many `k × columns` multiply-adds per row, a few-row product stays whole:
/// handing out the parts would cost more than they save.
const SPLIT_MIN_WORK: usize = 1 << 16;

/// Up to this many rows, a few-row product is cut into narrow column parts (see
/// [`column_parts`]); from here to [`SPLIT_MIN_ROWS`] into one part per thread.
const NARROW_MAX_ROWS: usize = 32;

/// How many column parts a few-row product (`m` rows, inner size `k`, `n` columns) is cut
/// into: a multiple of the thread count, so that the threads get even shares.
///
/// Why narrow parts: a product too large for OpenBLAS's "small matrix" kernels (0.3.21's
/// SkylakeX build takes them up to `m·n·k ≤ 10⁶` and, in this layout, `m·n ≤ 1200`)
/// first copies the whole weight slice into a packed buffer. A decoding step reads each
/// weight once, so that copy doubled its memory traffic: 59 % of a batch-8 decoding
/// profile was `sgemm_incopy`. Parts of `512 / m` columns, within 16 to 128, stay inside
/// both bounds at the projection shapes of the models we run, and the narrower parts also
/// kept a batch-1 step's weight slices in cache better than 512 columns did.
/// `benches/cpu/few-rows.sh` measures it (BENCHMARKS.md); the packed path won again from
/// about 48 rows. Where the small kernels do not exist (other CPUs, other builds), a narrow
/// part is packed like a wide one, so the copy costs the same in total.
fn column_parts(m: usize, k: usize, n: usize, threads: usize) -> usize {
    let width = if m <= NARROW_MAX_ROWS {
        (512 / m)
            .clamp(16, 128)
            .min(1_000_000 / (m * k).max(1))
            .max(1)
    } else {
        n
    };
    n.div_ceil(width).div_ceil(threads) * threads
}

/// `lhs·rhs` as a new row-major `[lhs.rows, rhs.cols]`, cut into one part per thread,
/// each a single-threaded product (OpenBLAS, or `gemm` without it): the output's rows
/// when there are many, its columns when there are few. The parts' bounds depend only on
/// the shape and the thread count, so the bits do too.
pub(crate) fn matmul(lhs: Mat<'_>, rhs: Mat<'_>) -> Vec<f32> {
    let mut out = vec![0f32; lhs.rows * rhs.cols];
    matmul_into(&mut out, lhs, rhs, 1.0, false);
    out
}

/// [`matmul`] into `out` (row-major `[lhs.rows, rhs.cols]`): `out = (accumulate ? out : 0)
/// + scale·lhs·rhs`.
pub(crate) fn matmul_into(
    out: &mut [f32],
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(out.len(), m * n, "matmul_into: output size");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if m < SPLIT_MIN_ROWS && k * n >= SPLIT_MIN_WORK {
        let per = n.div_ceil(column_parts(m, k, n, threads).min(n));
        let part_rhs = |first: usize, cols: usize| Mat {
            start: rhs.start + first * rhs.cs,
            cols,
            ..rhs
        };
        if m == 1 {
            // One row: the parts are consecutive slices of it.
            out.par_chunks_mut(per).enumerate().for_each(|(part, dst)| {
                let cols = dst.len();
                super::gemm_into(
                    dst,
                    cols,
                    accumulate,
                    lhs,
                    part_rhs(part * per, cols),
                    scale,
                );
            });
            return;
        }
        // Several rows: each part fills its own `[m, cols]` block of `parts`, which is then
        // laid into the output's rows.
        let mut parts = vec![0f32; m * n];
        parts
            .par_chunks_mut(m * per)
            .enumerate()
            .for_each(|(part, dst)| {
                let cols = dst.len() / m;
                super::gemm_into(dst, cols, false, lhs, part_rhs(part * per, cols), scale);
            });
        for (part, block) in parts.chunks(m * per).enumerate() {
            let (first, cols) = (part * per, block.len() / m);
            for (row, src) in out.chunks_mut(n).zip(block.chunks(cols)) {
                let row = &mut row[first..first + cols];
                if accumulate {
                    row.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                } else {
                    row.copy_from_slice(src);
                }
            }
        }
        return;
    }
    let parts = if m < SPLIT_MIN_ROWS { 1 } else { threads };
    let per = m.div_ceil(parts);
    out.par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(part, dst)| {
            let first = part * per;
            let rows = dst.len() / n;
            let part_lhs = Mat {
                start: lhs.start + first * lhs.rs,
                rows,
                ..lhs
            };
            super::gemm_into(dst, n, accumulate, part_lhs, rhs, scale);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), shared with the selftest.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        crate::selftest::values(n, seed as u64)
    }

    /// `a·b` in f64 from row-major `a` `[m, k]` and `b` `[k, n]`.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        out
    }

    /// CI installs OpenBLAS and says so (`HEARTH_EXPECT_BLAS=1`): there the products must
    /// really run through it, or the speed the benches report is not what CI tested.
    #[test]
    fn openblas_is_loaded_where_it_is_expected() {
        if std::env::var("HEARTH_EXPECT_BLAS").is_ok_and(|v| v == "1") {
            assert!(
                available(),
                "HEARTH_EXPECT_BLAS=1 but libopenblas.so.0 did not load"
            );
        }
    }

    /// `out += s·lhs·rhs` (LoRA's up-projection folded into the base output) over one row,
    /// a few rows and many rows, each split its own way: the sum of what was there and
    /// the scaled product, to f32 rounding.
    #[test]
    fn accumulating_products_add_the_scaled_product() {
        for (m, k, n) in [(1, 300, 700), (8, 300, 517), (40, 200, 400), (100, 40, 31)] {
            let (a, b) = (values(m * k, 3), values(k * n, 4));
            let base = values(m * n, 5);
            let mut out = base.clone();
            matmul_into(
                &mut out,
                Mat::rows(&a, 0, m, k, k),
                Mat::rows(&b, 0, k, n, n),
                0.5,
                true,
            );
            let product = naive(&a, &b, m, k, n);
            for ((o, b), p) in out.iter().zip(&base).zip(&product) {
                let want = *b as f64 + 0.5 * p;
                assert!(
                    (*o as f64 - want).abs() < 1e-4,
                    "{m}x{k}x{n}: {o} vs {want}"
                );
            }
        }
    }

    /// Every layout the projections use (plain, transposed left, transposed right, both),
    /// with row counts around the split thresholds: one row and a few rows cut into narrow
    /// column parts, some rows cut into one column part per thread, parts cut short. The
    /// products match an f64 product, and a second run gives the same bits.
    #[test]
    fn split_products_match_the_math_in_every_layout() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for (m, k, n) in [
                (1, 7, 5),
                (1, 300, 700),
                (8, 300, 517),
                (63, 33, 17),
                (64, 16, 9),
                (40, 200, 400),
                (200, 40, 31),
            ] {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let want = naive(&a, &b, m, k, n);
                // Transposed copies, so each layout reads the same matrices.
                let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let layouts = [
                    (Mat::rows(&a, 0, m, k, k), Mat::rows(&b, 0, k, n, n)),
                    (Mat::rows(&at, 0, k, m, m).t(), Mat::rows(&b, 0, k, n, n)),
                    (Mat::rows(&a, 0, m, k, k), Mat::rows(&bt, 0, n, k, k).t()),
                    (
                        Mat::rows(&at, 0, k, m, m).t(),
                        Mat::rows(&bt, 0, n, k, k).t(),
                    ),
                ];
                for (i, (l, r)) in layouts.into_iter().enumerate() {
                    let got = matmul(l, r);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-4,
                            "{m}x{k}x{n} layout {i}: {g} vs {w}"
                        );
                    }
                    assert_eq!(got, matmul(l, r), "{m}x{k}x{n} layout {i}: not repeatable");
                }
            }
        });
    }
}
