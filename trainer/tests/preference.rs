//! DPO, ORPO and the reward model, end to end on the bundled pairs with the tiny recipes:
//! they learn, the reference is exactly the initial policy, reference log-probs cache, and
//! the reward model saves in the layouts transformers and PEFT read.

use std::path::Path;

use burn::tensor::Device;
use trainer::batch::PairBatch;
use trainer::examples::Examples;
use trainer::model::{load_model, tensor_specs};
use trainer::objectives::Objective;
use trainer::objectives::registry::for_recipe;
use trainer::objectives::sequences::{LogitsOver, sequence_logps, sequence_logps_and_stats};
use trainer::recipe::{Recipe, load};
use trainer::train::data::{Method, Rows, tokenize};
use trainer::train::{Outcome, setup, train};

mod common;
use common::{root, serial, shipped_recipe};

/// A shipped tiny preference recipe on the bundled pairs.
fn recipe(name: &str, base: &Path, extra: &[&str]) -> Recipe {
    shipped_recipe(name, "counseling-preference.jsonl", base, extra)
}

fn run(r: &Recipe, out: &Path) -> Outcome {
    train(r, out, false, false).unwrap()
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Mean `rewards/accuracies` over the first `n` logged training steps.
fn early_accuracy(out: &Path, key: &str, n: usize) -> f64 {
    let lines: Vec<f64> = metrics(out)
        .iter()
        .filter_map(|m| m.get(key).and_then(|v| v.as_f64()))
        .take(n)
        .collect();
    lines.iter().sum::<f64>() / lines.len() as f64
}

#[test]
fn dpo_and_orpo_raise_reward_accuracy() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    for (name, method) in [("tiny-dpo.toml", "dpo"), ("tiny-orpo.toml", "orpo")] {
        let out = tmp.path().join(method);
        let outcome = run(&recipe(name, &base, &[]), &out);
        let early = early_accuracy(&out, "rewards/accuracies", 3);
        let held_out = outcome.eval_metrics.get("rewards/accuracies").unwrap();
        // Measured: DPO 0.0 (all ties at B = 0) → 1.0 held out; ORPO 0.29 → 1.0.
        assert!(
            held_out >= 0.8 && held_out > early + 0.3,
            "{method}: rewards/accuracies {early} → {held_out}"
        );
        assert!(outcome.last_loss < outcome.first_loss, "{method}");
        let first = &metrics(&out)[0];
        for key in [
            "loss",
            "learning_rate",
            "grad_norm",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(first.get(key).is_some(), "{method}: metrics lack `{key}`");
        }
        if method == "orpo" {
            for key in ["nll_loss", "log_odds_ratio", "log_odds_chosen"] {
                assert!(first.get(key).is_some(), "orpo: metrics lack `{key}`");
            }
        }
        assert!(out.join("final/adapter_model.safetensors").is_file());
    }
}

/// SimPO and CPO through the one loop: no reference model is built, the chosen side wins more
/// often held out than at the start, and the metrics carry TRL's names (CPO's `nll_loss`).
#[test]
fn simpo_and_cpo_learn_without_a_reference() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    for method in ["simpo", "cpo"] {
        let r = recipe(&format!("tiny-{method}.toml"), &base, &[]);
        let out = tmp.path().join(method);
        let outcome = run(&r, &out);
        let objective = for_recipe(&r).unwrap();
        assert_eq!(objective.name(), method);
        let device = Device::flex().autodiff();
        let s = setup(&r, objective.as_ref(), &device, None, 0).unwrap();
        assert!(s.reference.is_none(), "{method} built a reference");
        // The margin β·(lp_c − lp_r) on the training pairs grows. CPO's rewards are summed
        // log-probs, and the bundled chosen replies are longer than the rejected ones, so
        // its accuracy can stay at 0 while the margin closes (TRL's CPO logs the same).
        let margins: Vec<f64> = metrics(&out)
            .iter()
            .filter_map(|m| m.get("rewards/margins").and_then(|v| v.as_f64()))
            .collect();
        let (first3, last3) = (&margins[..3], &margins[margins.len() - 3..]);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            mean(last3) > mean(first3),
            "{method}: rewards/margins {first3:?} → {last3:?}"
        );
        if method == "simpo" {
            let early = early_accuracy(&out, "rewards/accuracies", 3);
            let held_out = outcome.eval_metrics.get("rewards/accuracies").unwrap();
            assert!(
                held_out > early,
                "simpo: rewards/accuracies {early} → {held_out}"
            );
        }
        assert!(outcome.last_loss < outcome.first_loss, "{method}");
        let first = &metrics(&out)[0];
        for key in ["rewards/margins", "logps/chosen", "logps/rejected"] {
            assert!(first.get(key).is_some(), "{method}: metrics lack `{key}`");
        }
        assert_eq!(first.get("nll_loss").is_some(), method == "cpo", "{method}");
    }
}

/// The pairs of the bundled file through the base's template.
fn pairs(r: &Recipe, objective: &dyn Objective) -> Vec<data::tokenize::PairTokens> {
    let loaded = data::load_examples(&r.data.train, &r.data.load_options().unwrap()).unwrap();
    let template = data::ChatTemplate::from_dir(&r.model.path, None)
        .unwrap()
        .unwrap();
    let tokenizer = data::tokenizer::load(&r.model.path).unwrap();
    let t = data::tokenize::Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length: r.data.max_length,
        truncation: r.data.truncation().unwrap(),
    };
    let mut counts = Default::default();
    let rows = Rows {
        path: &r.data.train,
        locations: &loaded.locations[..6],
        skip: false,
    };
    match tokenize(
        &Method::of(objective),
        &t,
        &loaded.examples[..6],
        &rows,
        None,
        &mut counts,
    )
    .unwrap()
    .examples
    {
        Examples::Pairs(p) => p.into_iter().map(|p| p.tokens).collect(),
        _ => panic!("pairs expected"),
    }
}

#[test]
fn the_reference_is_exactly_the_initial_policy() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    // A trained adapter to continue from (the usual SFT → DPO path).
    let first = recipe("tiny-dpo.toml", &base, &["train.max_steps=4"]);
    run(&first, &tmp.path().join("first"));
    let adapter = tmp.path().join("first/final");
    let fresh = recipe("tiny-dpo.toml", &base, &[]);
    let continued = recipe(
        "tiny-dpo.toml",
        &base,
        &[&format!("lora.init_from=\"{}\"", adapter.display())],
    );
    let objective = for_recipe(&fresh).unwrap();
    let pairs = pairs(&fresh, objective.as_ref());
    let refs: Vec<_> = pairs.iter().collect();
    let pad = 0;
    let mut per_case = Vec::new();
    for r in [&fresh, &continued] {
        let device = Device::flex().autodiff();
        device.seed(5);
        let s = setup(r, objective.as_ref(), &device, None, pad).unwrap();
        let reference = s.reference.as_ref().unwrap().logps(&refs, pad);
        // The policy as training computes it: on the autodiff device, bit for bit.
        let batch = PairBatch::new(&refs, &[], pad, &device);
        let plain = sequence_logps(&s.model, &batch);
        assert!(
            plain.stats.is_none(),
            "a reference's pass reads no statistics"
        );
        let with_stats = sequence_logps_and_stats(&s.model, &batch, LogitsOver::CompletionTokens);
        let hits = with_stats.stats.expect("asked for").hits;
        let hits: Vec<f64> = hits.into_data().try_into_vec_as::<f64>().unwrap();
        let lens: Vec<f64> = batch
            .completion_len
            .clone()
            .into_data()
            .try_into_vec_as()
            .unwrap();
        assert!(hits.iter().zip(&lens).all(|(h, l)| *h >= 0.0 && h <= l));
        let policy: Vec<f64> = plain
            .completion
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap();
        let same: Vec<f64> = with_stats.completion.into_data().try_into_vec_as().unwrap();
        assert_eq!(policy, same, "statistics leave the log-probs bit for bit");
        let n = refs.len();
        for i in 0..n {
            assert_eq!(reference[i], (policy[i], policy[n + i]), "pair {i}");
        }
        per_case.push(reference);
    }
    // The two references differ: the continued one really carries the trained adapter.
    assert_ne!(per_case[0], per_case[1]);
}

#[test]
fn precomputed_reference_log_probs_are_cached_and_reused() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let cache = tmp.path().join("cache");
    let live = run(
        &recipe("tiny-dpo.toml", &base, &["train.max_steps=6"]),
        &tmp.path().join("live"),
    );
    let cached_recipe = recipe(
        "tiny-dpo.toml",
        &base,
        &[
            "train.max_steps=6",
            "dpo.precompute_ref_log_probs=true",
            &format!("dpo.ref_cache_dir=\"{}\"", cache.display()),
        ],
    );
    let first = run(&cached_recipe, &tmp.path().join("cached1"));
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 2, "one cache file for train, one for eval");
    // Same values as the live reference, up to batch-shape rounding.
    assert!(
        (first.last_loss - live.last_loss).abs() < 1e-4,
        "{} vs {}",
        first.last_loss,
        live.last_loss
    );
    let stamp = |p: &Path| {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().modified().unwrap())
            .collect::<Vec<_>>()
    };
    let before = stamp(&cache);
    let second = run(&cached_recipe, &tmp.path().join("cached2"));
    assert_eq!(stamp(&cache), before, "the cache was rewritten, not reused");
    assert_eq!(second.last_loss, first.last_loss);
}

#[test]
fn reward_model_learns_and_saves_as_a_sequence_classifier() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let out = tmp.path().join("reward");
    let outcome = run(&recipe("tiny-reward.toml", &base, &[]), &out);
    let acc = outcome.eval_metrics.get("accuracy").unwrap();
    // Measured: 1.0 held-out pairwise accuracy (eval loss 0.0006) after 39 steps.
    assert!(acc >= 0.9, "held-out accuracy {acc}");
    for key in ["min_reward", "mean_reward", "max_reward", "margin"] {
        assert!(outcome.eval_metrics.get(key).is_some(), "{key}");
    }

    // final/: a LlamaForSequenceClassification checkpoint...
    let fin = out.join("final");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"][0].as_str(),
        Some("LlamaForSequenceClassification")
    );
    assert_eq!(config["num_labels"].as_u64(), Some(1));
    assert!(config["pad_token_id"].as_u64().is_some());
    let weights = checkpoints::WeightFiles::open_dir(&fin).unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    assert_eq!(weights.get("score.weight").unwrap().shape, &[1, hidden]);
    assert!(!weights.contains("lm_head.weight"));
    let (cfg, model) = load_model(&fin, &Device::flex()).unwrap();
    assert!(model.score.is_some());
    assert_eq!(tensor_specs(&cfg).len(), weights.names().count());

    // ...and the PEFT SEQ_CLS adapter beside it, with the head in modules_to_save.
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fin.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["task_type"].as_str(), Some("SEQ_CLS"));
    assert_eq!(adapter["modules_to_save"], serde_json::json!(["score"]));
    let adapter_weights =
        checkpoints::WeightFiles::open_file(&fin.join("adapter/adapter_model.safetensors"))
            .unwrap();
    assert_eq!(
        adapter_weights
            .get("base_model.model.score.weight")
            .unwrap()
            .shape,
        &[1, hidden]
    );
}

#[test]
fn orpo_nll_covers_the_whole_chosen_sequence_unless_restricted() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let nll = |extra: &[&str], out: &str| {
        let mut sets = vec!["train.max_steps=1"];
        sets.extend_from_slice(extra);
        let out = tmp.path().join(out);
        run(&recipe("tiny-orpo.toml", &base, &sets), &out);
        metrics(&out)[0]["nll_loss"].as_f64().unwrap()
    };
    let whole = nll(&[], "whole");
    let completion = nll(&["orpo.nll_completion_only=true"], "completion");
    // A random model's per-token NLL is near log(vocab) everywhere, so the two differ a
    // little (measured 6.24592 vs 6.24523); the counts below pin what each one averages.
    assert!(
        (whole - completion).abs() > 1e-5,
        "the option changed nothing: {whole} vs {completion}"
    );
    let r = recipe("tiny-orpo.toml", &base, &[]);
    let pairs = pairs(&r, for_recipe(&r).unwrap().as_ref());
    let refs: Vec<_> = pairs.iter().collect();
    let batch = PairBatch::new(&refs, &[], 0, &Device::flex());
    let host = |t: burn::tensor::Tensor<1>| t.into_data().try_into_vec_as::<f64>().unwrap();
    let (predicted, completion) = (host(batch.predicted_len), host(batch.completion_len));
    for (i, p) in pairs.iter().enumerate() {
        // Every token after the first is predicted; only the chosen ones are completion.
        assert_eq!(predicted[i] as usize, p.prompt.len() + p.chosen.len() - 1);
        assert_eq!(completion[i] as usize, p.chosen.len());
        let j = pairs.len() + i;
        assert_eq!(predicted[j] as usize, p.prompt.len() + p.rejected.len() - 1);
        assert_eq!(completion[j] as usize, p.rejected.len());
    }
}

#[test]
fn full_reward_model_trains_with_a_margin_column() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    // The bundled pairs with a `margin` column.
    let data = tmp.path().join("pairs.jsonl");
    let text =
        std::fs::read_to_string(root().join("data/examples/counseling-preference.jsonl")).unwrap();
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["margin"] = serde_json::json!(0.5);
            row.to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let source = std::fs::read_to_string(root().join("recipes/tiny-reward.toml")).unwrap();
    let full = source[..source.find("[lora]").unwrap()].to_string()
        + &source[source.find("[train]").unwrap()..]
        + "\n[reward]\nmargin_column = \"margin\"\ncenter_rewards_coefficient = 0.01\n";
    let path = tmp.path().join("full-reward.toml");
    std::fs::write(&path, full).unwrap();
    let r = load(
        &path,
        &[
            format!("model.path=\"{}\"", base.display()),
            format!("data.train=\"{}\"", data.display()),
            "train.learning_rate=1e-3".into(),
        ],
    )
    .unwrap();
    let out = tmp.path().join("run");
    let outcome = run(&r, &out);
    assert!(outcome.last_loss < outcome.first_loss);
    let acc = outcome.eval_metrics.get("accuracy").unwrap();
    assert!(acc >= 0.9, "held-out accuracy {acc}");
    // A full run's final/ is the whole classifier, no adapter.
    let (_, model) = load_model(&out.join("final"), &Device::flex()).unwrap();
    assert!(model.score.is_some() && model.lm_head.is_none());
    assert!(!out.join("final/adapter").exists());

    // A margin column that is not a number is an error naming the file, line and column
    // (the other rows stay, so the split has rows to train on).
    let bad: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| match i {
            0 => l.replace("\"margin\":0.5", "\"margin\":\"big\""),
            _ => l.clone(),
        })
        .collect();
    assert!(bad[0].contains("\"big\""));
    std::fs::write(&data, bad.join("\n")).unwrap();
    let err = train(&r, &tmp.path().join("bad"), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{}: line 1", data.display())) && err.contains("`margin`"),
        "{err}"
    );
}
