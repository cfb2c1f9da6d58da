//! Every fused op against its reference twin on one device: the output and every input
//! gradient, with their largest errors and a verdict from one tolerance table.
//!
//! Two users share it, so what the GPU check proves is what CI proves: `hearth selftest`
//! runs [`model_cases`] (the shapes of Llama-3.2-1B and of an 8B) on a real device, and the
//! parity tests run odd small shapes on flex and lavapipe. Gradients come from
//! `Σ y·r` for a fixed random `r`, so the output gradient has no symmetry to hide an error.

use std::fmt;
use std::time::Instant;

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::launches::{Counts, Kernel};
use crate::{Head, HeadWeight, fused, reference};

/// How far a fused output may stray from its reference, per dtype: `|got − want| ≤ abs +
/// rel·max(|want|, rms(want))`. Half types are relative, to the element or to the tensor's
/// RMS, whichever is larger: a half-precision reference rounds each intermediate, and an
/// element that is a small difference of large terms carries the error of those terms.
/// f32 is absolute, plus a relative part for the long sums of model-sized shapes. bf16
/// keeps 8 significant bits to f16's 11, so its bound is about six of its ulps (2⁻⁷ each)
/// where f16's is about ten of its own: loose enough for a reference that rounds every
/// intermediate, and still far below the O(1) error of a wrong formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

pub fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => Tolerance {
            abs: 1e-4,
            rel: 1e-5,
        },
        DType::BF16 => Tolerance {
            abs: 0.0,
            rel: 5e-2,
        },
        _ => Tolerance {
            abs: 0.0,
            rel: 1e-2,
        },
    }
}

/// One output or gradient, fused against reference.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub len: usize,
    /// Largest `|got − want|`.
    pub max_abs: f32,
    /// Largest `|got − want| / max(|want|, rms(want))`.
    pub max_rel: f32,
    /// Elements beyond the tolerance, NaN or infinite ones included.
    pub bad: usize,
    /// The first few of them: index, got, want.
    pub first_bad: Vec<(usize, f32, f32)>,
    pub tolerance: Tolerance,
}

impl Comparison {
    pub fn pass(&self) -> bool {
        self.bad == 0
    }
}

/// Compares element by element under `dtype`'s tolerance.
pub fn compare(name: &str, got: &[f32], want: &[f32], dtype: DType) -> Comparison {
    let tol = tolerance(dtype);
    let mut c = Comparison {
        name: name.to_string(),
        len: want.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        bad: 0,
        first_bad: Vec::new(),
        tolerance: tol,
    };
    if got.len() != want.len() {
        c.bad = got.len().abs_diff(want.len()).max(1);
        c.max_abs = f32::INFINITY;
        c.max_rel = f32::INFINITY;
        return c;
    }
    let rms =
        (want.iter().map(|w| (w * w) as f64).sum::<f64>() / want.len().max(1) as f64).sqrt() as f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        let scale = w.abs().max(rms);
        let finite = g.is_finite() && w.is_finite();
        if finite {
            c.max_abs = c.max_abs.max(diff);
            if scale > 0.0 {
                c.max_rel = c.max_rel.max(diff / scale);
            }
        } else {
            c.max_abs = f32::INFINITY;
            c.max_rel = f32::INFINITY;
        }
        if !finite || diff > tol.abs + tol.rel * scale {
            c.bad += 1;
            if c.first_bad.len() < 5 {
                c.first_bad.push((i, g, w));
            }
        }
    }
    c
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: max abs {:.3e}, max rel {:.3e} (abs {:.0e} + rel {:.0e})",
            self.name, self.max_abs, self.max_rel, self.tolerance.abs, self.tolerance.rel
        )?;
        if self.bad > 0 {
            write!(
                f,
                "; {} of {} beyond, first {:?}",
                self.bad, self.len, self.first_bad
            )?;
        }
        Ok(())
    }
}

/// One op at one shape. Attention's `block` picks the blocked twin's query block (flex,
/// and few queries on Cube); `None` takes the dispatching default, the flash kernel on
/// Cube unless [`crate::AttentionPath::Blocked`] is set (the label then says `blocked`).
#[derive(Clone, Debug, PartialEq)]
pub enum Case {
    RmsNorm {
        shape: [usize; 3],
    },
    Swiglu {
        shape: [usize; 3],
    },
    /// A base output `[b, t, o]` plus rank-`r` factors, kept in f32 as LoRA keeps them.
    LoraUp {
        b: usize,
        t: usize,
        o: usize,
        r: usize,
    },
    /// `n` hidden rows of width `h` through a head of vocabulary `v`, with a rank-`r`
    /// term when `r > 0`, `chunk` rows at a time.
    TokenLogprobs {
        n: usize,
        h: usize,
        v: usize,
        r: usize,
        chunk: usize,
    },
    /// [`Case::TokenLogprobs`] under a frozen head, as LoRA trains: only the hidden rows'
    /// gradient, which the fused path computes in the forward and scales in the backward.
    FrozenHead {
        n: usize,
        h: usize,
        v: usize,
        chunk: usize,
    },
    /// Grouped causal attention; the queries are the last `t` of `s` positions (a KV cache
    /// when `t < s`), and the second row ends in `pad` padding tokens.
    Attention {
        b: usize,
        h: usize,
        hkv: usize,
        d: usize,
        t: usize,
        s: usize,
        pad: usize,
        block: Option<usize>,
    },
    /// RoPE on `[b, h, t, d]` with per-row tables (positions differ per row, as in packed
    /// batches).
    Rotary {
        b: usize,
        h: usize,
        t: usize,
        d: usize,
    },
    /// `m` rows through a frozen `[n, k]` weight quantized to `bits` (4: NF4's layout, 64
    /// values per scale; 8: Q8_0's, 32), against the same weight dequantized whole.
    QuantMatmul {
        m: usize,
        n: usize,
        k: usize,
        bits: u32,
    },
    /// [`Case::TokenLogprobs`] through a head stored quantized in `bits` (no rank term),
    /// against the dense head of its dequantized values.
    QuantHead {
        n: usize,
        h: usize,
        v: usize,
        chunk: usize,
        bits: u32,
    },
}

/// What one case found.
#[derive(Clone, Debug)]
pub struct Report {
    pub case: Case,
    pub dtype: DType,
    pub outputs: Vec<Comparison>,
    /// CubeCL kernels launched by the fused run (none on flex).
    pub kernels: Vec<(Kernel, u64)>,
    pub seconds: f64,
}

impl Report {
    pub fn pass(&self) -> bool {
        self.outputs.iter().all(Comparison::pass)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass() { "pass" } else { "FAIL" };
        write!(f, "{verdict} {} {:?}", self.case.label(), self.dtype)?;
        for c in &self.outputs {
            write!(f, "\n  {c}")?;
        }
        Ok(())
    }
}

impl Case {
    /// The op's name.
    pub fn op(&self) -> &'static str {
        match self {
            Case::RmsNorm { .. } => "rms_norm",
            Case::Swiglu { .. } => "swiglu",
            Case::LoraUp { .. } => "lora_up",
            Case::TokenLogprobs { .. } => "token_logprobs",
            Case::FrozenHead { .. } => "frozen_head_logprobs",
            Case::Attention { .. } => "attention",
            Case::Rotary { .. } => "rotary",
            Case::QuantMatmul { .. } => "quant_matmul",
            Case::QuantHead { .. } => "quant_head_logprobs",
        }
    }

    /// The op and its shape, in one line.
    pub fn label(&self) -> String {
        let shape = match self {
            Case::RmsNorm { shape } | Case::Swiglu { shape } => format!("{shape:?}"),
            Case::LoraUp { b, t, o, r } => format!("[{b}, {t}, {o}] r {r}"),
            Case::TokenLogprobs { n, h, v, r, chunk } => {
                format!("N {n} H {h} V {v} r {r} chunk {chunk}")
            }
            Case::FrozenHead { n, h, v, chunk } => format!("N {n} H {h} V {v} chunk {chunk}"),
            Case::Attention {
                b,
                h,
                hkv,
                d,
                t,
                s,
                pad,
                block,
            } => {
                let block = block.map_or_else(
                    || match crate::attention_path() {
                        crate::AttentionPath::Blocked => "blocked".into(),
                        _ => "flash".into(),
                    },
                    |q| format!("block {q}"),
                );
                format!("B {b} H {h}/{hkv} D {d} T {t} S {s} pad {pad} {block}")
            }
            Case::Rotary { b, h, t, d } => format!("[{b}, {h}, {t}, {d}]"),
            Case::QuantMatmul { m, n, k, bits } => format!("M {m} N {n} K {k} bits {bits}"),
            Case::QuantHead {
                n,
                h,
                v,
                chunk,
                bits,
            } => format!("N {n} H {h} V {v} chunk {chunk} bits {bits}"),
        };
        format!("{} {shape}", self.op())
    }

    /// Runs the fused op and its reference on `device` (an autodiff device) in `dtype`.
    pub fn run(&self, device: &Device, dtype: DType) -> Report {
        let start = Instant::now();
        let before = Counts::now();
        let mut outputs = Vec::new();
        let mut add = |names: &[&str], got: Vec<Vec<f32>>, want: Vec<Vec<f32>>, dts: &[DType]| {
            for (i, name) in names.iter().enumerate() {
                outputs.push(compare(name, &got[i], &want[i], dts[i]));
            }
        };
        match *self {
            Case::RmsNorm { shape } => {
                let (g, w) = (
                    rms_norm(device, dtype, shape, true),
                    rms_norm(device, dtype, shape, false),
                );
                add(&["y", "dx", "dw"], g, w, &[dtype; 3]);
            }
            Case::Swiglu { shape } => {
                let (g, w) = (
                    swiglu(device, dtype, shape, true),
                    swiglu(device, dtype, shape, false),
                );
                add(&["y", "d_gate", "d_up"], g, w, &[dtype; 3]);
            }
            Case::LoraUp { b, t, o, r } => {
                let dims = (b, t, o, r);
                let (g, w) = (
                    lora(device, dtype, dims, true),
                    lora(device, dtype, dims, false),
                );
                // The factors' gradients are f32 whatever the base's dtype.
                let f = DType::F32;
                add(
                    &["y", "d_base", "d_down", "d_b"],
                    g,
                    w,
                    &[dtype, dtype, f, f],
                );
            }
            Case::TokenLogprobs { n, h, v, r, chunk } => {
                let dims = (n, h, v, r, chunk);
                let (g, w) = (
                    logprobs(device, dtype, dims, true, false),
                    logprobs(device, dtype, dims, false, false),
                );
                let names = ["log-probs", "hits", "entropy", "dh", "dw", "d_down", "d_up"];
                add(&names[..g.len()], g, w, &[dtype; 7]);
            }
            Case::FrozenHead { n, h, v, chunk } => {
                let dims = (n, h, v, 0, chunk);
                let (g, w) = (
                    logprobs(device, dtype, dims, true, true),
                    logprobs(device, dtype, dims, false, true),
                );
                add(&["log-probs", "hits", "entropy", "dh"], g, w, &[dtype; 4]);
            }
            Case::Attention { .. } => {
                let (g, w) = (
                    attention(self, device, dtype, true),
                    attention(self, device, dtype, false),
                );
                add(&["out", "dq", "dk", "dv"], g, w, &[dtype; 4]);
            }
            Case::Rotary { b, h, t, d } => {
                let dims = [b, h, t, d];
                let (g, w) = (
                    rotary(device, dtype, dims, true),
                    rotary(device, dtype, dims, false),
                );
                add(&["y", "dx"], g, w, &[dtype; 2]);
            }
            Case::QuantMatmul { m, n, k, bits } => {
                let dims = (m, n, k, bits);
                let (g, w) = (
                    quant_matmul(device, dtype, dims, true),
                    quant_matmul(device, dtype, dims, false),
                );
                add(&["y", "dx"], g, w, &[dtype; 2]);
            }
            Case::QuantHead {
                n,
                h,
                v,
                chunk,
                bits,
            } => {
                let dims = (n, h, v, chunk, bits);
                let (g, w) = (
                    quant_head(device, dtype, dims, true),
                    quant_head(device, dtype, dims, false),
                );
                add(&["log-probs", "hits", "entropy", "dh"], g, w, &[dtype; 4]);
            }
        }
        let counts = Counts::now().since(&before);
        let kernels = Kernel::ALL
            .iter()
            .map(|&k| (k, counts.kernel(k)))
            .filter(|&(_, n)| n > 0)
            .collect();
        Report {
            case: self.clone(),
            dtype,
            outputs,
            kernels,
            seconds: start.elapsed().as_secs_f64(),
        }
    }
}

/// The shapes the GPU check proves: Llama-3.2-1B's (hidden 2048, MLP 8192, 32 query heads
/// on 8 K/V heads of 64) and an 8B's (hidden 4096, MLP 14 336, heads of 128), vocabulary
/// 128 256, 2 × 2048 tokens with the second row padded, and a decode step against a
/// 2048-token cache. `small` keeps the structure (head dims, GQA, padding, a KV cache, a
/// head larger than one chunk) at sizes a CPU runs in seconds, to dry-run the plumbing.
pub fn model_cases(small: bool) -> Vec<Case> {
    let (t, vocab, hidden, mlp, heads, pad, chunk) = if small {
        (70, 1000, [96, 128], [192, 256], (4, 2), 23, 32)
    } else {
        (
            2048,
            128_256,
            [2048, 4096],
            [8192, 14_336],
            (32, 8),
            333,
            1024,
        )
    };
    let (h, hkv) = heads;
    let mut cases = Vec::new();
    for (i, d) in [64, 128].into_iter().enumerate() {
        cases.push(Case::RmsNorm {
            shape: [2, t, hidden[i]],
        });
        cases.push(Case::Swiglu {
            shape: [2, t, mlp[i]],
        });
        cases.push(Case::Rotary { b: 2, h, t, d });
        cases.push(Case::LoraUp {
            b: 2,
            t,
            o: mlp[i],
            r: [16, 64][i],
        });
        cases.push(Case::Attention {
            b: 2,
            h,
            hkv,
            d,
            t,
            s: t,
            pad,
            block: None,
        });
        cases.push(Case::TokenLogprobs {
            n: t,
            h: hidden[i],
            v: vocab,
            r: [0, 16][i],
            chunk,
        });
    }
    // LoRA's head: frozen, so its log-probs take the slope path, at the 1B's hidden size.
    cases.push(Case::FrozenHead {
        n: t,
        h: hidden[0],
        v: vocab,
        chunk,
    });
    // QLoRA's frozen projections: the down projection (K = the MLP width, a whole number
    // of blocks at every size), in NF4 and in Q8_0.
    for (i, bits) in [4, 8].into_iter().enumerate() {
        cases.push(Case::QuantMatmul {
            m: t,
            n: hidden[i],
            k: mlp[i],
            bits,
        });
    }
    // A head quantized with model.quantize_embeddings (NF4), at the 1B's hidden size.
    cases.push(Case::QuantHead {
        n: t,
        h: hidden[0],
        v: vocab,
        chunk,
        bits: 4,
    });
    // A decode step of a rollout: four new queries against the whole cache.
    cases.push(Case::Attention {
        b: 2,
        h,
        hkv,
        d: 128,
        t: 4,
        s: t,
        pad,
        block: None,
    });
    cases
}

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `v` as a tensor of `dtype` on `device`.
pub fn tensor<const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(v.to_vec(), shape), device).cast(dtype)
}

/// A tensor's values on the host, as f32.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("a float tensor cast to f32 reads back as f32")
}

/// `Σ y·r` for a fixed `r`, so the output gradient is `r`.
fn probe<const D: usize>(y: Tensor<D>, seed: u64) -> Tensor<1> {
    let r = Tensor::<D>::from_data(
        TensorData::new(values(y.shape().num_elements(), seed), y.shape()),
        &y.device(),
    )
    .cast(y.dtype());
    (y * r).cast(DType::F32).sum()
}

fn grad<const D: usize>(t: &Tensor<D>, grads: &burn::tensor::Gradients, what: &str) -> Vec<f32> {
    host(
        t.grad(grads)
            .unwrap_or_else(|| panic!("{what} took no gradient")),
    )
}

fn rms_norm(device: &Device, dtype: DType, shape: [usize; 3], fused_path: bool) -> Vec<Vec<f32>> {
    let c = shape[2];
    let x = tensor(&values(shape.iter().product(), 1), shape, device, dtype).require_grad();
    // Scales away from 1, some negative, so `dw` and `w`'s part in `dx` both matter.
    let wv: Vec<f32> = values(c, 2).iter().map(|v| 1.5 * v).collect();
    let w = tensor(&wv, [c], device, dtype).require_grad();
    let y = if fused_path {
        fused::rms_norm(x.clone(), w.clone(), 1e-5)
    } else {
        reference::rms_norm(x.clone(), w.clone(), 1e-5)
    };
    let grads = probe(y.clone(), 3).backward();
    vec![host(y), grad(&x, &grads, "x"), grad(&w, &grads, "w")]
}

fn swiglu(device: &Device, dtype: DType, shape: [usize; 3], fused_path: bool) -> Vec<Vec<f32>> {
    let n = shape.iter().product();
    // Gates over [-4, 4) reach both tails of the sigmoid.
    let gv: Vec<f32> = values(n, 4).iter().map(|v| 4.0 * v).collect();
    let g = tensor(&gv, shape, device, dtype).require_grad();
    let u = tensor(&values(n, 5), shape, device, dtype).require_grad();
    let y = if fused_path {
        fused::swiglu(g.clone(), u.clone())
    } else {
        reference::swiglu(g.clone(), u.clone())
    };
    let grads = probe(y.clone(), 6).backward();
    vec![host(y), grad(&g, &grads, "gate"), grad(&u, &grads, "up")]
}

fn lora(
    device: &Device,
    dtype: DType,
    (b, t, o, r): (usize, usize, usize, usize),
    fused_path: bool,
) -> Vec<Vec<f32>> {
    let base = tensor(&values(b * t * o, 41), [b, t, o], device, dtype).require_grad();
    let down = tensor(&values(b * t * r, 42), [b, t, r], device, DType::F32).require_grad();
    let up = tensor(&values(o * r, 43), [o, r], device, DType::F32).require_grad();
    let y = if fused_path {
        fused::lora_up(base.clone(), down.clone(), up.clone(), 0.75)
    } else {
        reference::lora_up(base.clone(), down.clone(), up.clone(), 0.75)
    };
    let grads = probe(y.clone(), 44).backward();
    vec![
        host(y),
        grad(&base, &grads, "base"),
        grad(&down, &grads, "down"),
        grad(&up, &grads, "B"),
    ]
}

fn logprobs(
    device: &Device,
    dtype: DType,
    (n, h, v, r, chunk): (usize, usize, usize, usize, usize),
    fused_path: bool,
    frozen: bool,
) -> Vec<Vec<f32>> {
    let hv: Vec<f32> = values(n * h, 11).iter().map(|x| 3.0 * x).collect();
    let hidden = tensor(&hv, [n, h], device, dtype).require_grad();
    // A head of unit-variance logits whatever its width, as a trained head has.
    let scale = (3.0 / h as f32).sqrt();
    let wv: Vec<f32> = values(v * h, 12).iter().map(|x| scale * x).collect();
    let weight = tensor(&wv, [v, h], device, dtype);
    let weight = if frozen {
        weight
    } else {
        weight.require_grad()
    };
    let low_rank = (r > 0).then(|| {
        (
            tensor(&values(n * r, 13), [n, r], device, dtype).require_grad(),
            tensor(&values(v * r, 14), [v, r], device, dtype).require_grad(),
        )
    });
    let head = Head {
        weight: HeadWeight::Dense(weight.clone()),
        low_rank: low_rank.clone(),
    };
    let tv: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 5) % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(tv, [n]), device);
    let rows = if fused_path {
        fused::token_logprobs(hidden.clone(), &head, targets, chunk)
    } else {
        reference::token_logprobs(hidden.clone(), &head, targets, chunk)
    };
    let grads = probe(rows.logprobs.clone(), 15).backward();
    let mut out = vec![
        host(rows.logprobs),
        host(rows.hits.float()),
        host(rows.entropy),
        grad(&hidden, &grads, "hidden"),
    ];
    if frozen {
        assert!(
            weight.grad(&grads).is_none(),
            "a frozen head got a gradient"
        );
    } else {
        out.push(grad(&weight, &grads, "head"));
    }
    if let Some((down, up)) = low_rank {
        out.push(grad(&down, &grads, "down"));
        out.push(grad(&up, &grads, "up"));
    }
    out
}

fn attention(case: &Case, device: &Device, dtype: DType, fused_path: bool) -> Vec<Vec<f32>> {
    let Case::Attention {
        b,
        h,
        hkv,
        d,
        t,
        s,
        pad,
        block,
    } = *case
    else {
        unreachable!("attention() takes an attention case")
    };
    let q = tensor(&values(b * h * t * d, 21), [b, h, t, d], device, dtype).require_grad();
    let k = tensor(&values(b * hkv * s * d, 22), [b, hkv, s, d], device, dtype).require_grad();
    let v = tensor(&values(b * hkv * s * d, 23), [b, hkv, s, d], device, dtype).require_grad();
    let offset = s - t;
    // Causal, and in every row but the first the last `pad` positions are padding: padded
    // queries see no key at all.
    let masked: Vec<bool> = (0..b * t * s)
        .map(|n| {
            let (bi, i, j) = (n / (t * s), (n / s) % t, n % s);
            j > i + offset || (bi > 0 && (j >= s - pad || i + offset >= s - pad))
        })
        .collect();
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(masked, [b, 1, t, s]), device);
    let out = match (fused_path, block) {
        (true, Some(block)) => {
            fused::attention_blocked(q.clone(), k.clone(), v.clone(), mask, block)
        }
        (true, None) => fused::attention(q.clone(), k.clone(), v.clone(), mask),
        (false, _) => reference::attention(q.clone(), k.clone(), v.clone(), mask),
    };
    let grads = probe(out.clone(), 24).backward();
    vec![
        host(out),
        grad(&q, &grads, "q"),
        grad(&k, &grads, "k"),
        grad(&v, &grads, "v"),
    ]
}

fn rotary(
    device: &Device,
    dtype: DType,
    [b, h, t, d]: [usize; 4],
    fused_path: bool,
) -> Vec<Vec<f32>> {
    let x = tensor(&values(b * h * t * d, 31), [b, h, t, d], device, dtype).require_grad();
    // Angles of a real table: position · θ^(−2i/d), with row `bi` starting at position 5·bi.
    let (mut cv, mut sv) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for ti in 0..t {
            for c in 0..d {
                let pos = (ti + 5 * bi) as f32;
                let angle = pos * 10000f32.powf(-2.0 * (c % (d / 2)) as f32 / d as f32);
                cv.push(angle.cos());
                sv.push(angle.sin());
            }
        }
    }
    // f32 tables, as the model makes them, whatever `x`'s dtype.
    let cos = tensor(&cv, [b, t, d], device, DType::F32);
    let sin = tensor(&sv, [b, t, d], device, DType::F32);
    let y = if fused_path {
        fused::rotary(x.clone(), cos, sin)
    } else {
        reference::rotary(x.clone(), cos, sin)
    };
    let grads = probe(y.clone(), 32).backward();
    vec![host(y), grad(&x, &grads, "x")]
}

/// A `[n, k]` weight quantized with `bits`-bit codes: its parts on `device`, and the same
/// weight dequantized whole (the reference's operand).
fn quantized_weight(
    n: usize,
    k: usize,
    bits: u32,
    device: &Device,
) -> (
    Tensor<2, Int>,
    Tensor<1>,
    Tensor<1>,
    crate::QuantLayout,
    Vec<f32>,
) {
    let layout = crate::QuantLayout {
        bits,
        block: if bits == 4 { 64 } else { 32 },
    };
    let levels = 1usize << bits;
    let codes: Vec<u8> = values(n * k, 51)
        .iter()
        .map(|v| (((v + 1.0) / 2.0 * levels as f32) as usize).min(levels - 1) as u8)
        .collect();
    // Scales of a real projection's magnitude (absmax ≈ 0.05 per block).
    let scales: Vec<f32> = values(n * k / layout.block as usize, 52)
        .iter()
        .map(|v| 0.05 + 0.02 * v)
        .collect();
    let code: Vec<f32> = (0..levels)
        .map(|i| 2.0 * i as f32 / (levels - 1) as f32 - 1.0)
        .collect();
    let packed = crate::pack_codes(&codes, bits);
    let dense = crate::dequantize_host(&packed, &scales, &code, layout, n, k);
    let words = k / layout.per_word();
    (
        Tensor::from_data(TensorData::new(packed, [n, words]), (device, DType::U32)),
        Tensor::from_data(
            TensorData::new(scales, [n * k / layout.block as usize]),
            device,
        ),
        Tensor::from_data(TensorData::new(code, [levels]), device),
        layout,
        dense,
    )
}

fn quant_matmul(
    device: &Device,
    dtype: DType,
    (m, n, k, bits): (usize, usize, usize, u32),
    fused_path: bool,
) -> Vec<Vec<f32>> {
    let (packed, scales, code, layout, dense) = quantized_weight(n, k, bits, device);
    let x = tensor(&values(m * k, 53), [m, k], device, dtype).require_grad();
    let y = if fused_path {
        crate::quant_matmul(x.clone(), packed, scales, code, layout)
    } else {
        let w = tensor(&dense, [n, k], device, dtype);
        x.clone().matmul(w.transpose())
    };
    let grads = probe(y.clone(), 54).backward();
    vec![host(y), grad(&x, &grads, "x")]
}

/// The head's log-probs through a quantized head (the fused path computes the hidden
/// gradient in the forward) or, as the reference, through the dense head of the same values.
fn quant_head(
    device: &Device,
    dtype: DType,
    (n, h, v, chunk, bits): (usize, usize, usize, usize, u32),
    fused_path: bool,
) -> Vec<Vec<f32>> {
    let (packed, scales, code, layout, dense) = quantized_weight(v, h, bits, device);
    let hidden = tensor(&values(n * h, 55), [n, h], device, dtype).require_grad();
    let tv: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 5) % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(tv, [n]), device);
    let rows = if fused_path {
        let head = Head::quantized(crate::QuantMatrix {
            packed,
            scales,
            code,
            offsets: None,
            layout,
        });
        fused::token_logprobs(hidden.clone(), &head, targets, chunk)
    } else {
        let head = Head::new(tensor(&dense, [v, h], device, DType::F32));
        reference::token_logprobs(hidden.clone().cast(DType::F32), &head, targets, chunk)
    };
    let grads = probe(rows.logprobs.clone(), 56).backward();
    vec![
        host(rows.logprobs),
        host(rows.hits.float()),
        host(rows.entropy),
        grad(&hidden, &grads, "hidden"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_beyond_the_tolerance_fails_and_names_the_element() {
        let want = [1.0, -2.0, 0.5, 0.0];
        let mut got = want;
        assert!(compare("y", &got, &want, DType::F32).pass());
        // f32: 1e-4 absolute plus 1e-5 of max(|w|, rms): at w = -2 the bound is 1.2e-4.
        got[1] = -2.0 + 1.1e-4;
        assert!(compare("y", &got, &want, DType::F32).pass());
        got[1] = -2.0 + 1.3e-4;
        let c = compare("y", &got, &want, DType::F32);
        assert!(!c.pass());
        assert_eq!((c.bad, c.first_bad[0].0), (1, 1));
        assert!((c.max_abs - 1.3e-4).abs() < 1e-6, "{}", c.max_abs);
    }

    #[test]
    fn half_types_are_judged_relative_to_the_tensor_rms() {
        // rms = √0.8 ≈ 0.894; at w = 0 the bound is 1e-2·rms ≈ 0.0089 in f16 and
        // 5e-2·rms ≈ 0.0447 in bf16.
        let want = [1.0, -1.0, 1.0, -1.0, 0.0];
        let mut got = want;
        got[4] = 0.0085;
        assert!(compare("y", &got, &want, DType::F16).pass());
        got[4] = 0.0095;
        assert!(!compare("y", &got, &want, DType::F16).pass());
        assert!(compare("y", &got, &want, DType::BF16).pass());
        got[4] = 0.046;
        assert!(!compare("y", &got, &want, DType::BF16).pass());
    }

    #[test]
    fn a_nan_or_a_missing_element_never_passes() {
        let c = compare("y", &[f32::NAN, 1.0], &[0.0, 1.0], DType::F32);
        assert_eq!(c.bad, 1);
        assert!(!compare("y", &[1.0], &[1.0, 1.0], DType::F32).pass());
    }

    #[test]
    fn the_model_shapes_are_the_two_llama_sizes_and_their_decode_step() {
        let full = model_cases(false);
        assert!(full.contains(&Case::Attention {
            b: 2,
            h: 32,
            hkv: 8,
            d: 128,
            t: 2048,
            s: 2048,
            pad: 333,
            block: None
        }));
        assert!(full.contains(&Case::TokenLogprobs {
            n: 2048,
            h: 4096,
            v: 128_256,
            r: 16,
            chunk: 1024
        }));
        // The small set checks the same ops in the same order.
        let ops = |c: &[Case]| c.iter().map(Case::op).collect::<Vec<_>>();
        assert_eq!(ops(&full), ops(&model_cases(true)));
    }

    /// The whole small set passes on flex (the primitive-op twins and hand-written
    /// backwards), and a case that skips a gradient would not: every output is compared.
    #[test]
    fn the_small_set_passes_on_flex() {
        let device = Device::flex().autodiff();
        for case in model_cases(true) {
            let report = case.run(&device, DType::F32);
            assert!(report.pass(), "{report}");
            let want = match case.op() {
                "rms_norm" | "swiglu" => 3,
                "rotary" | "quant_matmul" => 2,
                "quant_head_logprobs" | "frozen_head_logprobs" => 4,
                "token_logprobs" => 5 + 2 * usize::from(report.outputs.len() > 5),
                _ => 4,
            };
            assert_eq!(report.outputs.len(), want, "{report}");
            assert!(report.kernels.is_empty(), "flex launches no CubeCL kernel");
        }
    }
}
