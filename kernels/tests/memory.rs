//! The fused head log-probs never hold `[N, V]` logits: their peak memory over forward and
//! backward grows with the vocabulary by about one chunk's `[chunk, V]` tensors (plus the
//! head-sized gradient), where the reference keeps every chunk's logits for backward. The
//! fused attention likewise never holds `[T, S]` scores, only one block's.
//!
//! Measured on flex with a counting allocator (flex allocates through the global
//! allocator); one test in its own binary, so nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use kernels::{Head, fused, reference};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated at the peak of `f` above what was live when it started.
fn peak_of(f: impl FnOnce()) -> usize {
    let start = NOW.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - start
}

const ROWS: usize = 512;
const HIDDEN: usize = 32;
const CHUNK: usize = 32;

/// Peak bytes of one forward + backward at vocabulary `v`, the head frozen (as under LoRA).
fn peak(v: usize, fused_path: bool) -> usize {
    let device = Device::flex().autodiff();
    let values = |n: usize, k: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * k) % 97) as f32 / 97.0 - 0.5).collect()
    };
    let hidden = Tensor::<2>::from_data(
        TensorData::new(values(ROWS * HIDDEN, 7), [ROWS, HIDDEN]),
        &device,
    )
    .require_grad();
    let head = Head::new(Tensor::<2>::from_data(
        TensorData::new(values(v * HIDDEN, 13), [v, HIDDEN]),
        &device,
    ));
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new((0..ROWS as i64).map(|i| i % v as i64).collect(), [ROWS]),
        &device,
    );
    peak_of(|| {
        let lp = if fused_path {
            fused::token_logprobs(hidden.clone(), &head, targets, CHUNK)
        } else {
            reference::token_logprobs(hidden.clone(), &head, targets, CHUNK)
        }
        .logprobs;
        let grads = lp.sum().backward();
        let dh = hidden.grad(&grads).expect("dh");
        assert_eq!(dh.dims(), [ROWS, HIDDEN]);
    })
}

/// Both measurements in one test: tests in one binary run on parallel threads, and the
/// allocator counts for the whole process.
#[test]
fn fused_ops_hold_one_chunk_or_block_at_a_time() {
    logprob_memory_grows_by_one_chunk_with_the_vocabulary();
    attention_memory_holds_one_block_of_scores();
}

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const BLOCK: usize = 64;

/// Peak bytes of one attention forward + backward over `t` causal tokens.
fn attention_peak(t: usize, fused_path: bool) -> usize {
    let device = Device::flex().autodiff();
    let filled = |shape: [usize; 4], k: usize| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * k) % 89) as f32 / 89.0 - 0.5).collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), &device).require_grad()
    };
    let q = filled([1, HEADS, t, HEAD_DIM], 3);
    let k = filled([1, KV_HEADS, t, HEAD_DIM], 5);
    let v = filled([1, KV_HEADS, t, HEAD_DIM], 7);
    let causal: Vec<bool> = (0..t * t).map(|n| n % t > n / t).collect();
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(causal, [1, 1, t, t]), &device);
    peak_of(|| {
        let out = if fused_path {
            fused::attention_blocked(q.clone(), k.clone(), v.clone(), mask, BLOCK)
        } else {
            reference::attention(q.clone(), k.clone(), v.clone(), mask)
        };
        let grads = out.sum().backward();
        assert_eq!(q.grad(&grads).expect("dq").dims(), [1, HEADS, t, HEAD_DIM]);
    })
}

fn attention_memory_holds_one_block_of_scores() {
    let t = 1024;
    attention_peak(128, true);
    let fused_peak = attention_peak(t, true);
    let reference_peak = attention_peak(t, false);
    let scores = HEADS * t * t * 4;
    let block_scores = HEADS * BLOCK * t * 4;
    eprintln!(
        "attention peak above inputs at T={t}: fused {fused_peak} B, reference \
         {reference_peak} B; [H, T, T] f32 scores: {scores} B; one block's: {block_scores} B"
    );
    // A few block-sized tensors (scores, probabilities, their gradient) and O(T) rows.
    assert!(
        fused_peak <= 8 * block_scores,
        "fused attention peaked at {fused_peak} B, over 8 blocks of scores ({block_scores} B)"
    );
    assert!(
        reference_peak >= scores,
        "reference peak {reference_peak} B below [H, T, T] scores ({scores} B): the probe is blind"
    );
}

fn logprob_memory_grows_by_one_chunk_with_the_vocabulary() {
    let (small, large) = (2048, 16384);
    // Warm up thread pools and caches so they do not count in the first measurement.
    peak(small, true);
    let f_small = peak(small, true);
    let f_large = peak(large, true);
    let r_large = peak(large, false);
    let chunk_bytes = |v: usize| CHUNK * v * 4;
    let head_bytes = |v: usize| v * HIDDEN * 4;
    let all_logits = ROWS * large * 4;
    eprintln!(
        "peak above inputs: fused {f_small} B at V={small}, {f_large} B at V={large}; \
         reference {r_large} B at V={large}; one chunk of logits at V={large}: {} B; all \
         logits: {all_logits} B",
        chunk_bytes(large)
    );
    // Growth from the small to the large vocabulary: a few [chunk, V] tensors (logits,
    // probabilities, their gradient) and a transposed copy of the head, nothing [N, V].
    let growth = f_large.saturating_sub(f_small);
    let allowed =
        4 * (chunk_bytes(large) - chunk_bytes(small)) + (head_bytes(large) - head_bytes(small));
    assert!(
        growth <= allowed,
        "fused peak grew by {growth} B from V={small} to V={large}; one chunk grows by {} B",
        chunk_bytes(large) - chunk_bytes(small)
    );
    assert!(
        f_large < all_logits / 2,
        "fused peak {f_large} B is not far below the {all_logits} B of [N, V] logits"
    );
    // The reference does hold them: the measurement can tell the two apart.
    assert!(
        r_large >= all_logits,
        "reference peak {r_large} B below [N, V] logits ({all_logits} B): the probe is blind"
    );
}
