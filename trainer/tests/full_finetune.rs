//! Full fine-tuning: every weight trains, the run resumes exactly from a full checkpoint,
//! and `final/` is a Hugging Face checkpoint our loader (and transformers) reads.

use std::path::Path;

use burn::tensor::Device;
use trainer::model::load_model;
use trainer::recipe::load;
use trainer::train::train;

mod common;
use common::copy_dir;

#[test]
fn full_sft_trains_every_weight_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = tmp.path().join("base");
    let sets = vec![
        format!("model.path=\"{}\"", base.display()),
        format!(
            "data.train=\"{}\"",
            root.join("data/examples/counseling-sft.jsonl").display()
        ),
        "train.max_steps=6".into(),
        "train.save_steps=2".into(),
        "train.save_total_limit=3".into(),
        "train.learning_rate=1e-3".into(),
        "train.weight_decay=0.1".into(),
    ];
    // The tiny SFT recipe without its [lora] section asks for full fine-tuning.
    let text = std::fs::read_to_string(root.join("recipes/tiny-sft.toml")).unwrap();
    let full =
        text[..text.find("[lora]").unwrap()].to_string() + &text[text.find("[train]").unwrap()..];
    let recipe_path = tmp.path().join("full.toml");
    std::fs::write(&recipe_path, full).unwrap();
    let recipe = load(&recipe_path, &sets).unwrap();
    assert!(recipe.lora.is_none());

    let a = tmp.path().join("a");
    let outcome = train(&recipe, &a, false, false).unwrap();
    assert!(outcome.last_loss < outcome.first_loss);

    // final/ is a full HF checkpoint in the base's dtype, with the tokenizer beside it,
    // and every weight — norms included — moved.
    let fin = a.join("final");
    assert!(fin.join("tokenizer.json").is_file());
    let (_, trained) = load_model(&fin, &Device::flex()).unwrap();
    let (_, initial) = load_model(&base, &Device::flex()).unwrap();
    let host = |t: burn::tensor::Tensor<1>| t.into_data().try_into_vec_as::<f32>().unwrap();
    assert_ne!(
        host(trained.norm.weight.val()),
        host(initial.norm.weight.val())
    );
    let q = |m: &trainer::model::Llama| {
        m.layers[0]
            .self_attn
            .q_proj
            .dense_weight()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    assert_ne!(q(&trained), q(&initial));

    // A copy of the run without its end resumes from checkpoint-4 to the same weights.
    let b = tmp.path().join("b");
    copy_dir(&a, &b);
    std::fs::remove_dir_all(b.join("final")).unwrap();
    assert!(b.join("checkpoint-4/model.safetensors").is_file());
    train(&recipe, &b, true, false).unwrap();
    let bytes = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(
        bytes(&a) == bytes(&b),
        "resumed full fine-tuning ended with different weights"
    );
}
