//! Session-level GRPO: whole sessions against a simulated client. The cached turn streams
//! decode exactly what recomputing the dialogue decodes; a scripted client's session gives
//! the hand-computed loss, with no gradient from the client's tokens; the tiny recipe's
//! reward rises; a failing client ends the run with one line after a safe checkpoint; and a
//! resumed run ends where an uninterrupted one does.

use std::path::Path;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use data::Message;
use data::batch::Batch;
use data::render::{TemplateChoice, template_for};
use data::tokenize::Sequence;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use trainer::batch::LmBatch;
use trainer::examples::PromptItem;
use trainer::generate::{Sampling, generate_batch, stop_tokens};
use trainer::model::adapter::{LoraSettings, attach_lora};
use trainer::model::{Llama, NewModel, init_model, load_model, load_tokenizer};
use trainer::objectives::grpo::GrpoSettings;
use trainer::objectives::grpo::loss::{GrpoLossType, ScaleRewards, Surrogate, advantages};
use trainer::objectives::grpo::rollout::{Rollouts, Sampler};
use trainer::objectives::grpo::session::client::Client;
use trainer::objectives::grpo::session::rollout::{Counselor, play};
use trainer::objectives::grpo::session::{ClientSection, End, SessionRecord, SessionSettings};
use trainer::recipe::Recipe;
use trainer::rewards::Rewards;
use trainer::train::train;

mod common;
use common::{copy_dir, root, serial, shipped_recipe};

const SESSIONS: &str = "counseling-sessions.jsonl";

fn recipe(base: &Path, extra: &[&str]) -> Recipe {
    shipped_recipe("tiny-session-grpo.toml", SESSIONS, base, extra)
}

/// The tiny base, its tokenizer, template and stop tokens.
struct Tiny {
    dir: std::path::PathBuf,
    tokenizer: tokenizers::Tokenizer,
    template: data::ChatTemplate,
    stop: Vec<u32>,
    pad: u32,
    config: checkpoints::ModelConfig,
}

fn tiny(dir: &Path) -> Tiny {
    let config = init_model(
        dir,
        &NewModel {
            seed: 5,
            ..Default::default()
        },
        Default::default(),
    )
    .unwrap();
    let tokenizer = load_tokenizer(dir, config.vocab_size).unwrap();
    let stop = stop_tokens(dir, &config, &tokenizer);
    Tiny {
        dir: dir.to_path_buf(),
        template: template_for(dir, TemplateChoice::Shipped(None)).unwrap(),
        pad: config.pad_token_id.unwrap_or(0),
        tokenizer,
        stop,
        config,
    }
}

/// The client `section` describes, on the tiny base (sharing the policy's base or not).
fn client(t: &Tiny, section: &ClientSection, shares: bool, device: &Device) -> Client {
    let template = template_for(&t.dir, TemplateChoice::Shipped(None)).unwrap();
    Client::start(
        section,
        &t.dir,
        template,
        &t.config,
        shares,
        Default::default(),
        device,
    )
    .unwrap()
}

/// The bundled session openings as GRPO's prompts.
fn openings(t: &Tiny) -> Vec<PromptItem> {
    let text = std::fs::read_to_string(root().join("data/examples").join(SESSIONS)).unwrap();
    text.lines()
        .map(|l| {
            let mut row: serde_json::Map<String, Value> = serde_json::from_str(l).unwrap();
            let messages: Vec<Message> =
                serde_json::from_value(row.remove("prompt").unwrap()).unwrap();
            let ids =
                data::chat::encode(&t.tokenizer, &t.template.render(&messages, true).unwrap())
                    .unwrap();
            PromptItem {
                ids,
                messages,
                extra: row,
            }
        })
        .collect()
}

/// The runs of trained tokens in a session: `[start, end)` of each counselor turn.
fn turns(s: &SessionRecord) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut t = 0;
    while t < s.loss_mask.len() {
        if s.loss_mask[t] == 1 {
            let start = t;
            while t < s.loss_mask.len() && s.loss_mask[t] == 1 {
                t += 1;
            }
            out.push((start, t));
        } else {
            t += 1;
        }
    }
    out
}

#[test]
fn cached_turns_decode_what_recomputing_the_dialogue_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tiny(&tmp.path().join("base"));
    let device = Device::flex();
    let (_, policy) = load_model(&t.dir, &device).unwrap();
    let prompts = openings(&t);
    // Rows 0–5 include openings by the client (rows whose prompt is a system message only).
    assert!(prompts[..6].iter().any(|p| p.messages.len() == 1));
    assert!(prompts[..6].iter().any(|p| p.messages.len() == 2));
    let section = ClientSection {
        temperature: 0.0,
        max_new_tokens: 10,
        ..Default::default()
    };
    let settings = SessionSettings::new(3, 4096, "mean", Some(&section)).unwrap();
    let mut client = client(&t, &section, false, &device);
    let greedy = Sampling {
        max_new_tokens: 12,
        ..Default::default()
    };
    let counselor = Counselor {
        template: &t.template,
        tokenizer: &t.tokenizer,
        stop: &t.stop,
        sampling: &greedy,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let idx: Vec<usize> = (0..6).collect();
    let sessions = play(
        &policy,
        &counselor,
        &mut client,
        &settings,
        &prompts,
        &idx,
        1,
        &mut rng,
        &device,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(sessions.len(), 6);
    let mut checked = 0;
    for s in &sessions {
        let spans = turns(s);
        assert_eq!(spans.len(), s.turns(), "one run of trained tokens per turn");
        if s.end == End::MaxTurns {
            assert_eq!(s.turns(), 3);
        }
        // Client turns sit between the counselor's: the stream holds untrained tokens
        // after every turn but the last.
        for w in spans.windows(2) {
            assert!(
                w[1].0 > w[0].1 + 1,
                "no client turn between two counselor turns"
            );
        }
        for &(a, b) in &spans {
            let fresh = generate_batch(
                &policy,
                &[s.ids[..a].to_vec()],
                &t.stop,
                &greedy,
                &mut ChaCha8Rng::seed_from_u64(0),
                &device,
            )
            .unwrap();
            assert_eq!(
                fresh[0].trained_tokens(),
                s.ids[a..b].to_vec(),
                "a cached turn differs from decoding the whole dialogue afresh"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} turns checked");

    // Padding slots stretch what a sliding window measures, so a windowed model is refused
    // once the cache outgrows its window, never silently masked wrong.
    let mut windowed = policy.clone();
    for layer in &mut windowed.layers {
        layer.sliding_window = Some(48);
    }
    let err = play(
        &windowed,
        &counselor,
        &mut client,
        &settings,
        &prompts,
        &idx,
        1,
        &mut rng,
        &device,
        &|_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("past the model's sliding window of 48"),
        "{err}"
    );
}

/// A client that says two scripted things and then ends the session.
const SCRIPTED: &str = r#"while IFS= read -r line; do
  case "$line" in
    *'"turn":0'*) echo '"I feel stuck at work."' ;;
    *'"turn":1'*) echo '{"content": "Maybe I could talk to my manager."}' ;;
    *) echo '{"end": true}' ;;
  esac
done"#;

fn host(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

/// The GRPO loss of the sessions written out by hand from full logits: per counselor
/// token, `−A·ρ + β·(e^{ref−θ} − (ref−θ) − 1)` with ρ = e^{θ−sg(θ)}, summed over every
/// session's tokens `trained` and divided by their count (DAPO).
#[allow(clippy::too_many_arguments)]
fn hand_loss(
    model: &Llama,
    sessions: &[SessionRecord],
    trained: &dyn Fn(&SessionRecord, usize) -> bool,
    adv: &[f64],
    reference: &dyn Fn(usize, usize) -> f32,
    beta: f64,
    pad: u32,
    device: &Device,
) -> Tensor<1> {
    let mut terms = Vec::new();
    for (k, s) in sessions.iter().enumerate() {
        let seq = Sequence {
            ids: s.ids.clone(),
            loss_mask: vec![1; s.ids.len()],
        };
        let lm = LmBatch::new(&Batch::padded(&[&seq], pad), device);
        let logits = model.logits(model.hidden_packed(lm.ids, lm.positions, lm.segments));
        let [_, n, v] = logits.dims();
        let logp = log_softmax(logits.reshape([n, v]), 1).reshape([n * v]);
        let picks: Vec<i64> = (1..n)
            .filter(|&t| trained(s, t))
            .map(|t| ((t - 1) * v + s.ids[t] as usize) as i64)
            .collect();
        let m = picks.len();
        let theta = logp.select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(picks, [m]), device),
        );
        let reference = Tensor::<1>::from_data(
            TensorData::new((0..m).map(|j| reference(k, j)).collect::<Vec<_>>(), [m]),
            device,
        );
        let ratio = (theta.clone() - theta.clone().detach()).exp();
        let d = reference - theta;
        let kl = d.clone().exp() - d - 1.0;
        terms.push(ratio.mul_scalar(-adv[k]) + kl.mul_scalar(beta));
    }
    let all = Tensor::cat(terms, 0);
    let count = all.dims()[0] as f64;
    all.sum().div_scalar(count)
}

#[test]
fn a_scripted_session_gives_the_hand_computed_loss_and_client_tokens_no_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tiny(&tmp.path().join("base"));
    let plain = Device::flex();
    let (_, policy) = load_model(&t.dir, &plain).unwrap();
    let prompts = openings(&t);
    let section = ClientSection {
        kind: "command".into(),
        command: Some(vec!["sh".into(), "-c".into(), SCRIPTED.into()]),
        timeout_s: 10.0,
        ..Default::default()
    };
    let settings = SessionSettings::new(5, 4096, "mean", Some(&section)).unwrap();
    let mut client = client(&t, &section, false, &plain);
    let sampling = Sampling {
        max_new_tokens: 8,
        temperature: 1.0,
        ..Default::default()
    };
    let counselor = Counselor {
        template: &t.template,
        tokenizer: &t.tokenizer,
        stop: &t.stop,
        sampling: &sampling,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Opening 0 has the client's first turn in the data; opening 2 leaves it to the client.
    assert_eq!(prompts[0].messages.len(), 2);
    assert_eq!(prompts[2].messages.len(), 1);
    let sessions = play(
        &policy,
        &counselor,
        &mut client,
        &settings,
        &prompts,
        &[0, 2],
        2,
        &mut rng,
        &plain,
        &|_, _| {},
    )
    .unwrap();
    let said = |s: &SessionRecord| -> Vec<String> {
        s.messages[s.first_new..]
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.clone())
            .collect()
    };
    for (k, s) in sessions.iter().enumerate() {
        assert_eq!(s.end, End::Client, "session {k}");
        if k < 2 {
            // The data's opening, then the script's turns 0 and 1; turn 2 ends it.
            assert_eq!(s.turns(), 3);
            assert_eq!(
                said(s),
                ["I feel stuck at work.", "Maybe I could talk to my manager."]
            );
        } else {
            // The script opens (turn 0), answers once (turn 1), then ends.
            assert_eq!(s.turns(), 2);
            assert_eq!(
                said(s),
                ["I feel stuck at work.", "Maybe I could talk to my manager."]
            );
        }
        // The client's words are in the stream, untrained.
        let words = data::chat::encode(&t.tokenizer, "Maybe I could talk to my manager.").unwrap();
        let at = s
            .ids
            .windows(words.len())
            .position(|w| w == words)
            .expect("the client's turn is not in the counselor's stream");
        assert!(s.loss_mask[at..at + words.len()].iter().all(|&m| m == 0));
    }

    // The loss over these sessions, through GRPO's own micro-batch losses, on LoRA.
    let device = Device::flex().autodiff();
    device.seed(3);
    let (_, model) = load_model(&t.dir, &device).unwrap();
    let lora = LoraSettings {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "lm_head".into()],
        use_rslora: false,
        layers_to_transform: None,
    };
    let model = attach_lora(model, &lora, &device).unwrap();
    let rewards = [1.0, 0.0, 0.5, 2.0];
    let (adv, _) = advantages(&rewards, 2, ScaleRewards::Group);
    let reference = |k: usize, j: usize| -5.0 - 0.01 * (k * 7 + j) as f32;
    let beta = 0.04;
    let r = Rollouts {
        prompt: sessions.iter().map(|s| s.opening).collect(),
        rewards: rewards.to_vec(),
        advantages: adv.clone(),
        ref_logps: Some(
            sessions
                .iter()
                .enumerate()
                .map(|(k, s)| (0..s.trained()).map(|j| reference(k, j)).collect())
                .collect(),
        ),
        sessions: sessions.clone(),
        ..Default::default()
    };
    let settings = GrpoSettings {
        num_generations: 2,
        sampling: sampling.clone(),
        surrogate: Surrogate {
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta,
        },
        loss_type: GrpoLossType::Dapo,
        scale_rewards: ScaleRewards::Group,
        num_iterations: 1,
        mask_truncated_completions: false,
        log_completions: false,
        session: Some(settings),
    };
    let sampler = Sampler {
        settings,
        rewards: Rewards(Vec::new()),
        tokenizer: t.tokenizer.clone(),
        stop: t.stop.clone(),
        sessions: None,
    };
    let outs = sampler
        .micro_losses(&model, &r, &prompts, 4, t.pad, &device)
        .unwrap();
    assert_eq!(outs.len(), 1);
    let loss = outs[0].loss.clone();
    let counselor_only = |s: &SessionRecord, t: usize| s.loss_mask[t] == 1;
    let hand = hand_loss(
        &model,
        &sessions,
        &counselor_only,
        &adv,
        &reference,
        beta,
        t.pad,
        &device,
    );
    let (got, want) = (host(loss.clone())[0], host(hand.clone())[0]);
    assert!(
        (got - want).abs() < 1e-5,
        "loss {got} vs hand-computed {want}"
    );

    // Gradients agree parameter by parameter, so the client's tokens (left out of the hand
    // loss) contribute none; counting them would have changed the gradient.
    let grads = |l: Tensor<1>| {
        let g = GradientsParams::from_grads(l.backward(), &model);
        let mut out = Vec::new();
        model.visit(&mut GradCollector {
            grads: &g,
            out: &mut out,
        });
        out
    };
    let (mine, theirs) = (grads(loss), grads(hand));
    assert!(mine.iter().any(|&x| x != 0.0));
    let gap = mine
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(gap < 1e-5, "gradients differ by {gap}");
    let everything = |_: &SessionRecord, _: usize| true;
    let with_client = grads(hand_loss(
        &model,
        &sessions,
        &everything,
        &adv,
        &reference,
        beta,
        t.pad,
        &device,
    ));
    let gap = mine
        .iter()
        .zip(&with_client)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap > 1e-4,
        "training on every token changed nothing: the check is blind"
    );
}

/// Every trainable parameter's gradient, flattened in visiting order.
struct GradCollector<'a> {
    grads: &'a GradientsParams,
    out: &'a mut Vec<f32>,
}

impl burn::module::ModuleVisitor for GradCollector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.out
                .extend(g.into_data().try_into_vec_as::<f32>().unwrap());
        }
    }
}

fn training_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m.get("loss").is_some())
        .collect()
}

#[test]
fn tiny_session_grpo_raises_the_reward() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(&tmp.path().join("base"), &[]);
    let out = tmp.path().join("run");
    let outcome = train(&r, &out, false, false).unwrap();
    assert_eq!(outcome.steps, 20);
    let lines = training_lines(&out);
    assert_eq!(lines.len(), 20);
    for key in [
        "reward",
        "rewards/length/mean",
        "session/turns",
        "session/tokens",
        "session/client_tokens",
        "session/reward_per_turn",
        "session/tokens_per_second",
        "session/ended_max_turns",
        "session/ended_client",
        "session/ended_length",
        "completions/mean_length",
        "entropy",
    ] {
        assert!(
            lines.iter().all(|l| l[key].is_number()),
            "`{key}` missing from a step's metrics"
        );
    }
    for l in &lines {
        let ended = ["max_turns", "client", "length"]
            .iter()
            .map(|e| l[format!("session/ended_{e}")].as_f64().unwrap())
            .sum::<f64>();
        assert!(
            (ended - 1.0).abs() < 1e-9,
            "every session ends one way: {l}"
        );
        let turns = l["session/turns"].as_f64().unwrap();
        assert!((1.0..=3.0).contains(&turns), "{l}");
        assert!(l["session/client_tokens"].as_f64().unwrap() > 0.0);
    }
    let reward = |l: &Value| l["reward"].as_f64().unwrap();
    let first: f64 = lines[..5].iter().map(reward).sum::<f64>() / 5.0;
    let last: f64 = lines[15..].iter().map(reward).sum::<f64>() / 5.0;
    // Measured: about 0.76 over the first five steps, 1.0 over the last five.
    assert!(
        first < 0.85 && last > 0.95,
        "mean reward {first:.3} (steps 1–5) → {last:.3} (steps 16–20)"
    );
    assert!(
        !out.join("completions.jsonl").exists(),
        "sessions were written without log_completions"
    );
}

#[test]
fn a_failing_client_ends_the_run_with_one_line_after_a_safe_checkpoint() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // Answers 32 client turns, then misbehaves.
    for (name, misbehave, want) in [
        ("crash", "exit 3", "exited before answering"),
        ("hang", "sleep 30", "no answer within 1 s"),
        (
            "garbage",
            "echo 'the client is confused'; continue",
            "not JSON",
        ),
    ] {
        let script = tmp.path().join(format!("{name}.sh"));
        std::fs::write(
            &script,
            format!(
                "n=0\nwhile IFS= read -r line; do\n  n=$((n+1))\n  if [ $n -gt 32 ]; then {misbehave}; fi\n  echo '\"I see.\"'\ndone\n"
            ),
        )
        .unwrap();
        let out = tmp.path().join(format!("run-{name}"));
        let r = recipe(
            &tmp.path().join("base"),
            &[
                "train.max_steps=3",
                "train.save_steps=1",
                "grpo.max_turns=2",
                "grpo.client.kind=\"command\"",
                "grpo.client.timeout_s=1.0",
                &format!(
                    "grpo.client.command=[\"sh\", {:?}]",
                    script.display().to_string()
                ),
            ],
        );
        let err = train(&r, &out, false, false).unwrap_err().to_string();
        assert!(
            err.contains("client command")
                && err.contains(&format!("{name}.sh"))
                && err.contains(want),
            "{name}: {err}"
        );
        assert!(!err.contains('\n'), "{name}: not one line: {err}");
        // Step 1 needs 16 to 32 answers, so the client fails in step 2 or 3; every step
        // before it was checkpointed and logged.
        let steps = training_lines(&out).len();
        assert!((1..3).contains(&steps), "{name}: {steps} steps logged");
        assert!(
            out.join(format!("checkpoint-{steps}/adapter_model.safetensors"))
                .is_file(),
            "{name}: step {steps}'s checkpoint is missing"
        );
        assert!(!out.join(format!("checkpoint-{}", steps + 1)).exists());
        assert!(!out.join("final").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{name}: half-written files {leftovers:?}"
        );
    }
}

/// A client that ends a session where it should open it is asked again: an unlucky draw
/// does not stop the run, but one that never opens is named.
#[test]
fn a_client_that_ends_instead_of_opening_is_asked_again() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // The bundled sessions that the client opens (their prompt ends with no client turn).
    let rows: Vec<String> = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/examples/counseling-sessions.jsonl"),
    )
    .unwrap()
    .lines()
    .filter(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        v["prompt"].as_array().unwrap().last().unwrap()["role"] != "user"
    })
    .map(|l| format!("{l}\n"))
    .collect();
    assert!(!rows.is_empty());
    let data = tmp.path().join("client-opens.jsonl");
    std::fs::write(&data, rows.concat()).unwrap();
    for (name, ends, ok) in [("twice", 2, true), ("always", 1000, false)] {
        let script = tmp.path().join(format!("{name}.sh"));
        std::fs::write(
            &script,
            format!(
                "n=0\nwhile IFS= read -r line; do\n  case \"$line\" in\n    *'\"turn\":0'*) \
                 n=$((n+1)); if [ $n -le {ends} ]; then echo '{{\"end\": true}}'; continue; fi ;;\n  \
                 esac\n  echo '\"I feel stuck.\"'\ndone\n"
            ),
        )
        .unwrap();
        let r = recipe(
            &tmp.path().join("base"),
            &[
                "train.max_steps=1",
                "grpo.max_turns=1",
                &format!("data.train={:?}", data.display().to_string()),
                "grpo.client.kind=\"command\"",
                &format!(
                    "grpo.client.command=[\"sh\", {:?}]",
                    script.display().to_string()
                ),
            ],
        );
        let out = tmp.path().join(format!("run-{name}"));
        match train(&r, &out, false, false) {
            Ok(_) => assert!(ok, "{name}: a client that never opens was taken"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    !ok && e.contains("before its opening turn, 3 times in a row"),
                    "{name}: {e}"
                );
            }
        }
    }
}

#[test]
fn session_grpo_resumes_exactly() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    // Two optimizer steps per batch of sessions, a KL term, and a checkpoint after step 3,
    // between the two iterations over the second batch.
    let r = recipe(
        &tmp.path().join("base"),
        &[
            "train.max_steps=4",
            "train.save_steps=3",
            "grpo.num_iterations=2",
            "grpo.beta=0.04",
            "grpo.max_turns=2",
            "grpo.log_completions=true",
        ],
    );
    let a = tmp.path().join("a");
    train(&r, &a, false, false).unwrap();
    assert!(a.join("checkpoint-3/rollouts.json").is_file());
    let sessions = std::fs::read_to_string(a.join("completions.jsonl")).unwrap();
    // Sessions are played at steps 1 and 3: 2 × 16.
    assert_eq!(sessions.lines().count(), 2 * 16);
    let first: Value = serde_json::from_str(sessions.lines().next().unwrap()).unwrap();
    assert!(first["session"].as_array().unwrap().len() >= 3);
    assert!(first["reward"].is_number() && first["end"].is_string());

    let b = tmp.path().join("b");
    copy_dir(&a, &b);
    std::fs::remove_dir_all(b.join("final")).unwrap();
    train(&r, &b, true, false).unwrap();
    let bytes = |run: &Path| std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();
    assert!(
        bytes(&a) == bytes(&b),
        "the resumed session run ended with different weights"
    );
    let strip = |mut l: Value| {
        for key in trainer::train::TIMING_KEYS {
            l.as_object_mut().unwrap().remove(key);
        }
        l
    };
    let all = |run: &Path| -> Vec<Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| strip(serde_json::from_str(l).unwrap()))
            .collect()
    };
    assert_eq!(all(&a), all(&b), "metrics differ after resuming");
    assert_eq!(
        std::fs::read_to_string(b.join("completions.jsonl")).unwrap(),
        sessions
    );
}

/// Whole Cactus dialogues open sessions as they are: the counselor's greeting and the
/// client's first turn are the opening, and the persona comes from the row's columns.
#[test]
fn cactus_dialogues_open_sessions() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cactus.jsonl");
    let row = |name: &str, thought: &str| {
        serde_json::json!({
            "intake_form": format!("Name: {name}\nAge: 30"),
            "attitude": "neutral",
            "thought": thought,
            "dialogue": format!("Counselor: Hi {name}, what brings you here today?\nClient: I keep thinking {thought}.\nCounselor: That sounds hard.\nClient: It is."),
        })
        .to_string()
    };
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            row("Ana", "I always fail"),
            row("Lee", "nobody likes me")
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let mut r = recipe(
        &tmp.path().join("base"),
        &[
            "data.format=\"cactus\"",
            "train.max_steps=1",
            "grpo.max_turns=2",
            "grpo.log_completions=true",
        ],
    );
    r.data.train = data;
    train(&r, &out, false, false).unwrap();
    let lines = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 16);
    for l in lines.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let s = v["session"].as_array().unwrap();
        assert!(s[0]["content"].as_str().unwrap().starts_with("Hi "), "{v}");
        assert_eq!(s[1]["role"], "user");
        assert!(
            s[1]["content"]
                .as_str()
                .unwrap()
                .starts_with("I keep thinking")
        );
        // The data's later turns are not part of the opening: the policy speaks next.
        assert_eq!(s[2]["role"], "assistant");
        assert_ne!(s[2]["content"], "That sounds hard.");
    }
}

/// A client checkpoint that ships no chat template is named as such (the policy's
/// data.template does not apply to it), and a missing one as missing.
#[test]
fn a_client_checkpoint_without_a_template_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tiny(&tmp.path().join("base"));
    let other = tmp.path().join("plain");
    init_model(&other, &NewModel::default(), Default::default()).unwrap();
    std::fs::remove_file(other.join("tokenizer_config.json")).unwrap();
    let start = |path: &Path| {
        let section = ClientSection {
            path: Some(path.to_path_buf()),
            ..Default::default()
        };
        let template = template_for(&t.dir, TemplateChoice::Shipped(None)).unwrap();
        match Client::start(
            &section,
            &t.dir,
            template,
            &t.config,
            false,
            Default::default(),
            &Device::flex(),
        ) {
            Ok(_) => panic!("{} was taken as a client", path.display()),
            Err(e) => e.to_string(),
        }
    };
    let e = start(&other);
    assert!(
        e.contains("grpo.client.path") && e.contains("ships no chat template"),
        "{e}"
    );
    assert!(!e.contains("--template"), "{e}");
    let e = start(&tmp.path().join("nowhere"));
    assert!(e.contains("nowhere") && e.contains("No such file"), "{e}");
}

/// A LoRA run's client is the policy with its adapters left out: it plays exactly as the
/// base loaded on its own, however far the adapters have moved the policy.
#[test]
fn a_shared_base_client_plays_as_the_loaded_base() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tiny(&tmp.path().join("base"));
    let device = Device::flex();
    let (_, base) = load_model(&t.dir, &device).unwrap();
    let lora = LoraSettings {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
            "lm_head".into(),
        ],
        use_rslora: false,
        layers_to_transform: None,
    };
    let mut policy = attach_lora(base.clone(), &lora, &device).unwrap();
    for layer in &mut policy.layers {
        let l = layer.self_attn.v_proj.lora.as_mut().unwrap();
        l.b = burn::module::Param::from_tensor(l.b.val().ones_like().mul_scalar(0.5));
    }
    let prompts = openings(&t);
    let section = ClientSection {
        temperature: 0.0,
        max_new_tokens: 8,
        ..Default::default()
    };
    let settings = SessionSettings::new(2, 4096, "mean", Some(&section)).unwrap();
    let greedy = Sampling {
        max_new_tokens: 6,
        ..Default::default()
    };
    let counselor = Counselor {
        template: &t.template,
        tokenizer: &t.tokenizer,
        stop: &t.stop,
        sampling: &greedy,
    };
    let run = |policy: &Llama, shares: bool| {
        let mut client = client(&t, &section, shares, &device);
        play(
            policy,
            &counselor,
            &mut client,
            &settings,
            &prompts,
            &[0, 1, 2, 3],
            1,
            &mut ChaCha8Rng::seed_from_u64(0),
            &device,
            &|_, _| {},
        )
        .unwrap()
    };
    let (shared, loaded) = (run(&policy, true), run(&policy, false));
    assert_eq!(shared, loaded);
    // The adapters do change the policy: its own turns are not the base's.
    let base_sessions = run(&base, false);
    assert_ne!(
        shared, base_sessions,
        "the adapters changed nothing: the check is blind"
    );
}

/// Every loss type and reward scaling trains on sessions. Step 1's sessions are the same
/// for all of them (drawn before any update), so their losses relate by their normalisers:
/// Dr. GRPO divides the token sum by sessions × max_completion_length × max_turns, BNPO
/// and DAPO by the trained tokens.
#[test]
fn every_loss_type_and_scaling_trains_on_sessions() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut first = std::collections::BTreeMap::new();
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"] {
        for scale in ["group", "batch", "none"] {
            let out = tmp.path().join(format!("run-{loss_type}-{scale}"));
            let r = recipe(
                &tmp.path().join("base"),
                &[
                    "train.max_steps=2",
                    "grpo.max_turns=2",
                    "grpo.beta=0.04",
                    &format!("grpo.loss_type=\"{loss_type}\""),
                    &format!("grpo.scale_rewards=\"{scale}\""),
                ],
            );
            train(&r, &out, false, false).unwrap();
            let lines = training_lines(&out);
            assert_eq!(lines.len(), 2);
            for l in &lines {
                assert!(
                    l["loss"].as_f64().unwrap().is_finite(),
                    "{loss_type}/{scale}: {l}"
                );
                assert!(l["kl"].is_number(), "{loss_type}/{scale}: {l}");
            }
            assert!(
                lines.iter().any(|l| l["grad_norm"].as_f64().unwrap() > 0.0),
                "{loss_type}/{scale}: no gradient"
            );
            first.insert((loss_type, scale), lines[0].clone());
        }
    }
    let l = |k: &str| first[&(k, "group")]["loss"].as_f64().unwrap();
    let trained = first[&("bnpo", "group")]["completions/mean_length"]
        .as_f64()
        .unwrap()
        * 16.0;
    assert!(l("bnpo").abs() > 1e-6, "step 1 has no loss to compare");
    assert!((l("bnpo") - l("dapo")).abs() < 1e-6);
    let (dr, bnpo) = (l("dr_grpo") * (16.0 * 16.0 * 2.0), l("bnpo") * trained);
    assert!(
        (dr - bnpo).abs() < 1e-4 * bnpo.abs().max(1.0),
        "{dr} vs {bnpo}"
    );
}
