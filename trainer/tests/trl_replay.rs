//! TRL's own training runs, replayed step by step (`../shared/fixtures/trl-e2e`, made with
//! TRL 1.16 + PEFT 0.21 on the CPU in f32): the same base, adapters, data and settings give
//! the same loss, grad_norm and method metrics at every one of the 10 steps, and the same
//! final adapter. Its README gives the settings: the full batch of 8 rows each step,
//! AdamW lr 1e-3 constant, betas 0.9/0.999, eps 1e-8, no weight decay, no clipping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use trainer::recipe::parse;
use trainer::train::train;

mod common;
use common::{adapter_tensors, serial};

fn fixture() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/trl-e2e");
    assert!(dir.is_dir(), "fixture {} is missing", dir.display());
    dir
}

/// The run's recipe: TRL's settings in hearth's names.
fn recipe(method: &str, data: &str, adapter: &str, section: &str) -> String {
    let f = fixture();
    format!(
        r#"
[model]
path = "{base}"

[data]
train = "{data}"
max_length = 1024
eval_fraction = 0.0

[lora]
r = 8
alpha = 16.0
dropout = 0.0
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
init_from = "{adapter}"

[train]
method = "{method}"
learning_rate = 1e-3
lr_scheduler_type = "constant"
adam_beta1 = 0.9
adam_beta2 = 0.999
adam_epsilon = 1e-8
weight_decay = 0.0
per_device_train_batch_size = 8
gradient_accumulation_steps = 1
max_steps = 10
max_grad_norm = 0.0
logging_steps = 1
eval_steps = 0
save_steps = 0
seed = 0
device = "cpu"
{section}
"#,
        base = f.join("base").display(),
        data = f.join("data").join(data).display(),
        adapter = f.join(adapter).display(),
    )
}

/// TRL's `log_history`: one map of metric → value per step.
fn trl_log(name: &str) -> Vec<BTreeMap<String, f64>> {
    let path = fixture().join("runs").join(format!("{name}.json"));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    run["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| {
            l.as_object()
                .unwrap()
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .collect()
}

/// hearth's step lines from `metrics.jsonl`.
fn hearth_log(run: &Path) -> Vec<serde_json::Value> {
    trainer::run_dir::read_metrics(run)
        .unwrap()
        .into_iter()
        .filter(|l| l.get("loss").is_some() && l.get("step").is_some())
        .collect()
}

/// `|a − b| ≤ 1e-5·|b|`, with an absolute floor for values that are (nearly) zero.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1e-2)
}

/// The bound for a DPO reward, `β·(log π − log π_ref)`: 1e-5 of it, plus 1e-6 of the
/// log-probs it is the difference of. A reward is a small difference of two sums in the
/// hundreds, whose last f32 bits (6e-6 at 90) already move it by more than 1e-5 of
/// itself, in TRL as here; the log-probs themselves are held to 1e-5.
fn reward_tolerance(key: &str, want: f64, trl: &BTreeMap<String, f64>, beta: f64) -> f64 {
    let side = |k: &str| trl.get(k).copied().unwrap_or(0.0).abs();
    let logps = match key {
        "rewards/chosen" => side("logps/chosen"),
        "rewards/rejected" => side("logps/rejected"),
        _ => side("logps/chosen") + side("logps/rejected"),
    };
    1e-5 * want.abs().max(1e-2) + 1e-6 * beta * logps
}

/// Every tensor of two PEFT adapter files, within `tol`.
fn adapters_match(ours: &Path, theirs: &Path, tol: f32) {
    let (a, b) = (adapter_tensors(ours), adapter_tensors(theirs));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "adapter tensor names"
    );
    for (name, x) in &a {
        let y = &b[name];
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{name}: differs from TRL's by {worst}");
    }
}

/// Trains `name`'s recipe and checks every step's `keys` and the final adapter. `beta`:
/// DPO's, for the rewards' bound.
fn replay(name: &str, recipe_text: &str, keys: &[&str], beta: f64) {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = parse(recipe_text, name, &[]).unwrap();
    let run = tmp.path().join(name);
    train(&recipe, &run, false, false).unwrap();
    let ours = hearth_log(&run);
    let theirs = trl_log(name);
    assert_eq!(ours.len(), 10, "{name}: hearth logged {} steps", ours.len());
    assert_eq!(theirs.len(), 10, "{name}: TRL's log");
    let mut failures = Vec::new();
    for (step, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        for key in keys {
            let want = t[*key];
            let got = o[*key]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: step {}: no `{key}` in {o}", step + 1));
            let ok = match *key {
                "rewards/chosen" | "rewards/rejected" | "rewards/margins" => {
                    (got - want).abs() <= reward_tolerance(key, want, t, beta)
                }
                _ => close(got, want),
            };
            if !ok {
                failures.push(format!("step {} {key}: {got} vs TRL {want}", step + 1));
            }
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    adapters_match(
        &run.join("final"),
        &fixture().join("runs").join(format!("{name}-final")),
        1e-5,
    );
}

const DPO_KEYS: [&str; 13] = [
    "loss",
    "num_tokens",
    "mean_token_accuracy",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
];

#[test]
fn sft_matches_trl_at_every_step() {
    replay(
        "sft",
        &recipe("sft", "sft.jsonl", "init_adapter", ""),
        &[
            "loss",
            "grad_norm",
            "mean_token_accuracy",
            "entropy",
            "num_tokens",
        ],
        0.0,
    );
}

/// From a fresh adapter (B = 0), the reference is the base: at step 1 every margin is
/// exactly 0, the rewards exactly 0, the loss exactly log 2, and the gradient takes half
/// of log σ's slope there.
#[test]
fn dpo_from_a_fresh_adapter_matches_trl_at_every_step() {
    replay(
        "dpo-fresh",
        &recipe(
            "dpo",
            "pref.jsonl",
            "fresh_adapter",
            "[dpo]\nbeta = 0.1\nloss_type = \"sigmoid\"\n",
        ),
        &DPO_KEYS,
        0.1,
    );
}

#[test]
fn dpo_ipo_from_an_adapter_matches_trl_at_every_step() {
    replay(
        "dpo-ipo",
        &recipe(
            "dpo",
            "pref.jsonl",
            "init_adapter",
            "[dpo]\nbeta = 0.1\nloss_type = \"ipo\"\n",
        ),
        &DPO_KEYS,
        0.1,
    );
}

#[test]
fn orpo_matches_trl_at_every_step() {
    replay(
        "orpo",
        &recipe(
            "orpo",
            "pref.jsonl",
            "init_adapter",
            "[orpo]\nlambda = 0.1\n",
        ),
        &[
            "loss",
            "grad_norm",
            "nll_loss",
            "log_odds_ratio",
            "log_odds_chosen",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
            "logits/rejected",
        ],
        0.1,
    );
}

/// hearth's own fresh adapter (no `init_from`): the policy is the base plus an adapter whose
/// B is zero, the reference the base alone. The two must give bit-identical log-probs, so
/// step 1 reports rewards of exactly 0 and an accuracy of 0, as TRL does, not noise.
#[test]
fn a_fresh_adapter_starts_exactly_at_its_reference() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let text = recipe(
        "dpo",
        "pref.jsonl",
        "fresh_adapter",
        "[dpo]\nbeta = 0.1\nloss_type = \"sigmoid\"\n",
    );
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("init_from"))
        .map(|l| format!("{l}\n"))
        .collect();
    let recipe = parse(&text, "fresh", &["train.max_steps=2".into()]).unwrap();
    let run = tmp.path().join("fresh");
    train(&recipe, &run, false, false).unwrap();
    let first = &hearth_log(&run)[0];
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ] {
        assert_eq!(first[key].as_f64(), Some(0.0), "{key} at step 1: {first}");
    }
    assert_eq!(
        first["loss"].as_f64().map(|l| l as f32),
        Some(std::f32::consts::LN_2),
        "{first}"
    );
}
