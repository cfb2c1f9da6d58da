//! What a quantized base holds in memory, measured with a counting allocator (flex keeps
//! tensors in host memory, allocated through the global allocator): the projections in NF4
//! take at most 0.3× their bf16 bytes, Q8_0 at most 0.6×. One test in its own binary, so
//! nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Device;
use trainer::choices::Quantize;
use trainer::model::precision::Precision;
use trainer::model::quantized::Quantization;
use trainer::model::{Llama, NewModel, init_model, load_model_with, with_precision};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        NOW.fetch_add(layout.size(), Ordering::Relaxed);
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

/// The model `load` builds, and the bytes it holds once everything else it allocated
/// (the host copies of the checkpoint) is freed.
fn resident(load: impl FnOnce() -> Llama) -> (Llama, usize) {
    let before = NOW.load(Ordering::Relaxed);
    let model = load();
    (model, NOW.load(Ordering::Relaxed).saturating_sub(before))
}

#[test]
fn quantized_projections_take_under_a_third_of_their_bf16_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    // Projections dominate, as in real models: hidden 512, MLP 1536, vocabulary 512.
    let spec = NewModel {
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        vocab_size: 512,
        ..Default::default()
    };
    init_model(&path, &spec, Default::default()).unwrap();
    let device = Device::flex();
    let (path, device) = (&path, &device);
    let load = |scheme: Quantize, embeddings: bool| {
        let q = Quantization::new(scheme, &[]).with_embeddings(embeddings);
        move || {
            with_precision(
                load_model_with(path, device, &q).unwrap().1,
                Precision::Bf16,
            )
        }
    };
    // Warm-up: whatever the first load allocates once and keeps (thread pools, tables).
    drop(resident(load(Quantize::None, false)));
    let (dense, dense_bytes) = resident(load(Quantize::None, false));
    let projection_params: usize = dense
        .projections()
        .map(|p| {
            let [o, i] = p.out_in();
            o * i
        })
        .sum();
    let bf16_projections = 2 * projection_params;
    drop(dense);
    for (scheme, bound) in [(Quantize::Nf4, 0.3), (Quantize::Q8_0, 0.6)] {
        let (model, bytes) = resident(load(scheme, false));
        let held = bf16_projections - (dense_bytes - bytes);
        let ratio = held as f64 / bf16_projections as f64;
        let whole = bytes as f64 / dense_bytes as f64;
        eprintln!(
            "{scheme:?}: projections {held} B of {bf16_projections} in bf16 ({ratio:.3}×); \
             whole model {bytes} B of {dense_bytes} ({whole:.3}×)"
        );
        assert!(ratio <= bound, "{scheme:?}: {ratio:.3}× of bf16");
        // Within a few percent of the layout's own count: nothing dense left behind.
        let layout: usize = model
            .projections()
            .map(|p| match &p.weight {
                trainer::model::linear::Weight::Quantized(q) => q.bytes(),
                trainer::model::linear::Weight::Dense(_) => unreachable!("all quantized"),
            })
            .sum();
        assert!(
            (held as f64 - layout as f64).abs() < 0.05 * layout as f64,
            "{scheme:?}: measured {held} B, layout {layout} B"
        );
    }
    // With the embeddings and head quantized too, the whole base (norms included).
    let (_, bytes) = resident(load(Quantize::Nf4, true));
    let whole = bytes as f64 / dense_bytes as f64;
    eprintln!("Nf4 with embeddings: whole model {bytes} B of {dense_bytes} ({whole:.3}×)");
    assert!(whole <= 0.3, "whole NF4 base: {whole:.3}× of bf16");
}
